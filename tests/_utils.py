"""Shared test helpers: reproducible per-case generators and weights, the model-level accuracy check, and the
paths of the reference data in tests/data."""

import zlib
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

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
    _fill(model, lambda k, n: torch.sin(1.7 * torch.arange(n, dtype=torch.float64) + 0.3 * k))


def random_fill(model: torch.nn.Module, case_id: str) -> None:
    """deterministic_fill's scales with s uniform in [-1, 1) from gen(case_id): random weights that are the same
    on every machine and whatever ran before (the default init draws from the global generator, and its normal
    and erfinv kernels round differently under AVX2 and AVX-512)."""
    g = gen(case_id)
    _fill(model, lambda k, n: 2 * torch.rand(n, generator=g, dtype=torch.float64) - 1)


def _fill(model: torch.nn.Module, draw) -> None:
    """Every parameter, in sorted-name order k, from s = draw(k, numel) scaled as deterministic_fill says."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, name in enumerate(sorted(params)):
            p = params[name]
            s = draw(k, p.numel())
            if p.ndim >= 2:
                value = s * (2.0 / (p.numel() / p.shape[0])) ** 0.5
            elif name.endswith("weight"):
                value = 1 + 0.05 * s
            else:
                value = 0.05 * s
            p.copy_(value.view_as(p))


def model_step(model: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor, mode: str) -> dict[str, torch.Tensor]:
    """Output and every parameter gradient, as float64, of one forward/backward of `model` under kernels=mode
    in the model's dtype and on its device; x and dy are cast to both."""
    p = next(model.parameters())
    model.set_kernels(mode)
    model.zero_grad(set_to_none=True)
    out = model(x.to(p))
    out.backward(dy.to(p))
    return {"out": out.detach().double(), **{n: q.grad.double() for n, q in model.named_parameters()}}


def rgt_ops_run(fn):
    """fn()'s result, and how many times each rgt:: op ran in it (a Counter, from the profiler's CPU events:
    autograd's backward thread included)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = fn()
    return result, Counter(e.name for e in prof.events() if e.name.startswith("rgt::"))


def assert_as_accurate(exact: dict, ref: dict, fast: dict, floor_out: float, floor_grad: float) -> None:
    """Each tensor of `fast` (model_step's) is within 2x the error of the same-dtype reference `ref` against the
    float64 `exact`, or a floor, whichever is larger. The floor is floor_out of max|out| for the output and
    floor_grad of the largest gradient of any parameter for gradients: it keeps the bound independent of how
    accurate the reference's BLAS happens to be on a given CPU, and covers gradients that are 0 in exact
    arithmetic, where the reference may give exact zeros and a kernel rounding noise."""
    grad_scale = max(g.abs().max().item() for n, g in exact.items() if n != "out")
    for name, e in exact.items():
        low = floor_out * e.abs().max().item() if name == "out" else floor_grad * grad_scale
        err, ref_err = ((r[name] - e).abs().max().item() for r in (fast, ref))
        assert err <= max(2 * ref_err, low), f"{name}: fast {err:.3g}, reference {ref_err:.3g}, floor {low:.3g}"


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
