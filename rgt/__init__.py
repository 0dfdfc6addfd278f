"""RGT: the Recursive Generalization Transformer for image super-resolution (Chen et al., ICLR 2024).

    model = rgt.models.rgt_s(4)                      # official RGT-S x4 architecture
    rgt.load_checkpoint(model, "RGT_S_x4.pth")       # official / BasicSR / slim / safetensors weights
    sr = model.eval()(lr)                            # (B, 3, H, W) in [0, 1] -> (B, 3, 4H, 4W)

    model = rgt.load_model("RGT_S_x4.pth")           # config stored in / detected from the checkpoint
    up = rgt.Upscaler("RGT_S_x4.pth", tile=0)        # numpy / PIL / tensor in, same kind out

The names below are imported on first use (PEP 562), so `python -m rgt.upscale --help` and the other command
lines start without loading torch and its compiler stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"
_EXPORTS = {  # public name -> module that defines it (a module itself when the names are equal)
    "RGT": "rgt.arch",
    "Upscaler": "rgt.inference",
    "data": "rgt.data",
    "load_checkpoint": "rgt.checkpoint",
    "load_model": "rgt.detect",
    "metrics": "rgt.metrics",
    "models": "rgt.models",
    "save_checkpoint": "rgt.checkpoint",
}
__all__ = ["RGT", "Upscaler", "data", "load_checkpoint", "load_model", "metrics", "models", "save_checkpoint"]

if TYPE_CHECKING:
    from rgt import data, metrics, models
    from rgt.arch import RGT
    from rgt.checkpoint import load_checkpoint, save_checkpoint
    from rgt.detect import load_model
    from rgt.inference import Upscaler


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rgt' has no attribute {name!r}")
    value = importlib.import_module(module)
    if module != f"rgt.{name}":
        value = getattr(value, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
