"""Shared test helpers: reproducible per-case generators and the paths of the reference data in tests/data."""

import zlib
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# Real MATLAB R2017b imresize outputs (see its README.md): the oracle of the bicubic and metric tests.
MATLAB_DATA = REPO / "tests" / "data" / "matlab_imresize"


def gen(case_id: str) -> torch.Generator:
    """A generator seeded from a stable hash of the case name (str hash() changes per process)."""
    return torch.Generator().manual_seed(zlib.crc32(case_id.encode()))


def deterministic_fill(model: torch.nn.Module) -> None:
    """The spec's weight-independent fill (ARCHITECTURE.md section 10), applied in place to every parameter.

    Parameters in sorted-name order, k = position: s = sin(1.7 i + 0.3 k) over the flat index i; matrices get
    s * sqrt(2 / fan_in), 1-D weights 1 + 0.05 s, other 1-D (biases, gamma) 0.05 s.
    """
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, name in enumerate(sorted(params)):
            p = params[name]
            s = torch.sin(1.7 * torch.arange(p.numel(), dtype=torch.float64) + 0.3 * k)
            if p.ndim >= 2:
                value = s * (2.0 / (p.numel() / p.shape[0])) ** 0.5
            elif name.endswith("weight"):
                value = 1 + 0.05 * s
            else:
                value = 0.05 * s
            p.copy_(value.view_as(p))


def spec_input(H: int, W: int, B: int = 1, C: int = 3) -> torch.Tensor:
    """The spec's input x[b,c,h,w] = 0.5 + 0.4 sin(0.11 (h W + w) + 0.7 c + 0.3 b), float64."""
    b, c, h, w = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in (B, C, H, W)), indexing="ij")
    return 0.5 + 0.4 * torch.sin(0.11 * (h * W + w) + 0.7 * c + 0.3 * b)


TINY = dict(upscale=2, embed_dim=36, depth=[2, 2], num_heads=[6, 6], mlp_ratio=2, split_size=[8, 32], c_ratio=0.5)
SMALL96 = dict(TINY, embed_dim=96)

# Rectangle-window attention geometries (fused and portable tests): id, B, H, W, split, shift, heads, head dim
RWIN_CASES = [
    ("pad-17x23-shift", 1, 17, 23, (8, 16), True, 2, 8),
    ("pad-40x52-noshift", 1, 40, 52, (8, 32), False, 2, 4),
    ("exact-8x16-b2-shift", 2, 8, 16, (4, 8), True, 4, 6),
    ("exact-8x16-noshift", 1, 8, 16, (4, 8), False, 2, 6),
    ("real-8x32-hd30-shift", 1, 20, 24, (8, 32), True, 2, 30),
    ("real-8x32-hd30-noshift", 1, 20, 24, (8, 32), False, 2, 30),
    ("square-8x8-hd64", 1, 12, 10, (8, 8), True, 2, 64),
    ("odd-window-3x6", 1, 5, 11, (3, 6), True, 2, 5),
    ("tiny-window-2x4", 1, 3, 7, (2, 4), True, 2, 6),
]
