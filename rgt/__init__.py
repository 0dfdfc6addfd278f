"""RGT: the Recursive Generalization Transformer for image super-resolution (Chen et al., ICLR 2024)."""

from rgt.arch import RGT

__all__ = ["RGT"]
