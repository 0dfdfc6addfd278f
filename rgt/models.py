"""The official RGT / RGT-S configurations (x2, x3, x4) as constructors."""

from __future__ import annotations

from rgt.arch import RGT

_COMMON = dict(in_chans=3, img_size=64, img_range=1.0, embed_dim=180, mlp_ratio=2.0, resi_connection="1conv",
               split_size=(8, 32), c_ratio=0.5)
CONFIGS = {
    "rgt_s": dict(_COMMON, depth=(6,) * 6, num_heads=(6,) * 6),
    "rgt": dict(_COMMON, depth=(6,) * 8, num_heads=(6,) * 8),
}
SCALES = (2, 3, 4)


def config(name: str, scale: int) -> dict:
    """Constructor arguments of an official model: name "rgt_s" or "rgt", scale 2, 3 or 4."""
    if name not in CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(CONFIGS)}")
    if scale not in SCALES:
        raise ValueError(f"official RGT models exist for scales {SCALES}, got {scale}")
    return dict(CONFIGS[name], upscale=scale)


def rgt_s(scale: int = 4, **overrides) -> RGT:
    """RGT-S: 6 residual groups of 6 blocks, C = 180 (10.20 M parameters at x4)."""
    return RGT(**{**config("rgt_s", scale), **overrides})


def rgt(scale: int = 4, **overrides) -> RGT:
    """RGT: 8 residual groups of 6 blocks, C = 180 (13.37 M parameters at x4)."""
    return RGT(**{**config("rgt", scale), **overrides})
