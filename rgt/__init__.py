"""RGT: the Recursive Generalization Transformer for image super-resolution (Chen et al., ICLR 2024).

    model = rgt.models.rgt_s(4)                      # official RGT-S x4 architecture
    rgt.load_checkpoint(model, "RGT_S_x4.pth")       # official / BasicSR / slim / safetensors weights
    sr = model.eval()(lr)                            # (B, 3, H, W) in [0, 1] -> (B, 3, 4H, 4W)

    model = rgt.load_model("RGT_S_x4.pth")           # config detected from the checkpoint's keys and shapes
    up = rgt.Upscaler("RGT_S_x4.pth", tile=0)        # numpy / PIL / tensor in, same kind out
"""

from rgt import data, metrics, models
from rgt.arch import RGT
from rgt.checkpoint import load_checkpoint, save_checkpoint
from rgt.detect import load_model
from rgt.inference import Upscaler

__version__ = "0.1.0"
__all__ = ["RGT", "Upscaler", "data", "load_checkpoint", "load_model", "metrics", "models", "save_checkpoint"]
