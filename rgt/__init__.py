"""RGT: the Recursive Generalization Transformer for image super-resolution (Chen et al., ICLR 2024)."""
