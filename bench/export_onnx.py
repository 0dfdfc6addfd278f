"""Benchmark and check of the ONNX export (`rgt.export`): ONNX Runtime (CPU provider) against PyTorch on the CPU.

For RGT-S x4 (the spec's deterministic weights, or -m CHECKPOINT) it exports fp32 files at a size L-SA does not pad
(64 x 64) and one it pads (48 x 80 -> 64 x 96), both with shifted-window blocks, and an fp16 file at 64 x 64;
`rgt.export.verify_onnx` compares each with PyTorch (fp32: max abs error <= 1e-4; fp16: ORT's error against
float64 <= 2x PyTorch fp16's). Then it times one forward at the exported size: ORT and PyTorch (reference ops,
and "auto", which runs the C++ recursive_dwconv) alternate in one loop, so machine load hits both alike, with
the same number of threads (--threads, default 1: on a shared, oversubscribed machine two OpenMP threads made
PyTorch 10-25x slower than one, which would measure the contention rather than the runtimes).
--quick runs the tiny test config at 32 x 32 instead.

Usage: python bench/export_onnx.py [--quick] [-m CHECKPOINT] [--reps N] [--out PATH]
"""

from __future__ import annotations

import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
from _harness import arg_parser, header, result_path, save

import rgt
from rgt.export import export_onnx, verify_onnx

# The spec's deterministic weights (ARCHITECTURE.md section 10) and the tiny config, from the tests: they give
# peaked attention and shift masks that matter, a harsher check than a fresh initialisation, whose attention is
# nearly uniform (a 1% change of the q.k scale moves the tiny model's output by 2e-7 there, 4e-3 here).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _utils import TINY, deterministic_fill  # noqa: E402


def build(args) -> tuple[rgt.RGT, str, list[tuple[tuple[int, int], bool]]]:
    """The model, its name and the (size, fp16) exports to check; the first size is the one timed."""
    if args.quick:
        model = rgt.RGT(**TINY).eval()
        deterministic_fill(model)
        return model, "tiny x2 (spec weights)", [((32, 32), False), ((20, 40), False), ((32, 32), True)]
    cases = [((64, 64), False), ((48, 80), False), ((64, 64), True)]
    if args.checkpoint:
        return rgt.load_model(args.checkpoint), args.checkpoint, cases
    model = rgt.models.rgt_s(4).eval()
    deterministic_fill(model)
    return model, "RGT-S x4 (spec weights)", cases


def interleaved_ms(fns: dict, reps: int) -> dict:
    """p50/p20/p80 ms of each fn, called in turn in each of `reps` rounds after one warm-up round."""
    times = {name: [] for name in fns}
    for r in range(reps + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if r:
                times[name].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=10, method="inclusive") if len(ts) > 1 else ts * 9
        out[name] = {"ms_p50": statistics.median(ts), "ms_p20": q[1], "ms_p80": q[7], "runs": len(ts)}
    return out


def main() -> int:
    parser = arg_parser(__doc__, "export_onnx", "tiny config at 32 x 32 instead of RGT-S x4 at 64 x 64")
    parser.add_argument("-m", "--checkpoint", help="a checkpoint to export instead of random RGT-S x4 weights")
    parser.add_argument("--reps", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of ORT and torch alike (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, name, cases = build(args)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for size, fp16 in cases:
            path = Path(tmp) / f"{size[0]}x{size[1]}{'_fp16' if fp16 else ''}.onnx"
            t0 = time.perf_counter()
            export_onnx(model, path, size, fp16=fp16, clamp=False)
            rec = {"model": name, "size": list(size), "dtype": "fp16" if fp16 else "fp32",
                   "export_s": round(time.perf_counter() - t0, 1), "file_mb": round(path.stat().st_size / 1e6, 1)}
            rec.update(verify_onnx(path, model))
            print(rec, flush=True)
            records.append(rec)
        (H, W), _ = cases[0]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
        session = ort.InferenceSession(str(Path(tmp) / f"{H}x{W}.onnx"), opts, providers=["CPUExecutionProvider"])
        x = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(1))
        fns = {"onnxruntime": lambda: session.run(None, {"input": x.numpy()})}
        for kernels in ("reference", "auto"):
            net = copy.deepcopy(model)
            net.set_kernels(kernels)
            fns[f"torch {kernels}"] = (lambda n: lambda: n(x))(net)
        with torch.inference_mode():
            timing = interleaved_ms(fns, args.reps)
    for provider, t in timing.items():
        records.append({"model": name, "size": [H, W], "dtype": "fp32", "provider": provider, **t})
        print(f"{name} {H}x{W} fp32 {provider:>16}: {t['ms_p50']:9.1f} ms (p20 {t['ms_p20']:.1f}, p80 "
              f"{t['ms_p80']:.1f})", flush=True)
    out = result_path("export_onnx", args.out)
    save(out, header(onnxruntime=ort.__version__, onnx=onnx.__version__,
                     threads=args.threads), records)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
