"""CI smoke test of an installed rgt: the compiled extension loads, and a tiny model's forward through it is the
same under every torch CI builds against.

    python .ci/smoke.py --save FILE              # write the outputs (CI: under torch 2.13.0)
    python .ci/smoke.py --compare FILE --kernels cpu+cuda   # same outputs under this torch; rgt._C has those kernels
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _utils import TINY, deterministic_fill, spec_input  # noqa: E402

import rgt  # noqa: E402
from rgt.ops import _ext  # noqa: E402

# float64 runs the same arithmetic under both torch builds (measured: max difference 0 for 2.13.0+cpu vs
# 2.14.1+cu130 on this CPU); fp32 may take other vector kernels in another release: measured 0, bound ~30 ulp of 1.
TOL = {torch.float64: 1e-12, torch.float32: 4e-6}


def outputs() -> dict[str, torch.Tensor]:
    """Tiny x2 RGT, 20x28 input: padding, both shift masks and the C++ dwconv op (kernels="auto"). Weights and
    input are the spec's closed-form fills: torch's random initialisers differ between releases."""
    model = rgt.RGT(**TINY).eval()
    deterministic_fill(model)
    x = spec_input(20, 28)
    result = {}
    with torch.no_grad():
        for dtype in TOL:
            result[str(dtype)] = model.to(dtype)(x.to(dtype)).double()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--save")
    p.add_argument("--compare")
    p.add_argument("--kernels", help="the kernels rgt._C must have been built with, e.g. cpu or cpu+cuda")
    args = p.parse_args()
    if _ext.load_error() is not None:
        sys.exit(f"smoke: {_ext.load_error()}")
    if args.kernels and _ext.built_kernels() != args.kernels:
        sys.exit(f"smoke: rgt._C was built with {_ext.built_kernels()} kernels, expected {args.kernels}")
    got = outputs()
    if args.save:
        torch.save(got, args.save)
    if args.compare:
        want = torch.load(args.compare, weights_only=True)
        for dtype, tol in TOL.items():
            err = (got[str(dtype)] - want[str(dtype)]).abs().max().item()
            print(f"smoke: torch {torch.__version__} {dtype}: max |difference| {err:.3g} (bound {tol:g})")
            if not err <= tol:
                sys.exit(f"smoke: {dtype} output differs from the saved one by {err:.3g} > {tol:g}")
    print(f"smoke: ok (torch {torch.__version__}, rgt._C {_ext.built_kernels()})")


if __name__ == "__main__":
    main()
