"""What the sm_90 compiler makes of every Triton kernel the model launches, without a GPU.

    python bench/sm90.py [--gate] [--jobs 2] [--no-cache] [--out PATH] [--markdown]

Captures the launches of RGT-S (and RGT) training (64x64 LR, B = 8 and 32) and inference (256x256, 250x250,
750x1000 LR) in fp32, fp16 and bf16 (bench/_sm90_capture.py), compiles each distinct variant for sm_90 through
Triton's JIT with its bundled ptxas (bench/_sm90_compile.py) and writes, per variant: registers, spill
stores / loads and stack (bytes per thread), shared memory per block, how its dots were lowered (wgmma,
mma.sync, FMA) with the SASS HMMA / HGMMA counts, and the compile time. Beside them, per op, direction,
workload and dtype: the analytic floor (FLOPs, HBM bytes and exponentials against the H200 ceilings of
bench/_device.py; the largest of the three times is the lower bound) and the op's share of the model's FLOPs
per forward and per training step. `--gate` compiles the representative set tests/test_sm90.py gates on
(GATE_WORKLOADS): one variant per (kernel, dtypes, constexprs, warps, stages), dropping int-alignment
specialisations. Default output: bench/results/sm90/triton-<version>.json. On a GPU machine the same
ops are timed beside their floors with `--time`.
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # compiling is the point: the kernels must be real JIT functions

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

import _harness  # noqa: E402
import _sm90_capture as capture  # noqa: E402
import _sm90_compile as compiler  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
from _device import CEILINGS  # noqa: E402

H200 = CEILINGS[0]
# The CI gate (tests/test_sm90.py): fp16/bf16 everywhere users run, fp32 where users train and at 256x256.
GATE_WORKLOADS = {"train-64x64-b8": ("fp32", "fp16", "bf16"), "infer-256x256": ("fp32", "fp16", "bf16"),
                  "infer-750x1000": ("fp16", "bf16")}


def op_work(op: str, phase: str, args: tuple, itemsize: int) -> dict:
    """FLOPs, minimum HBM bytes and exponentials of one fused op call (read inputs and write outputs once).

    rgsa (B, h, N, N', dqk, dv): forward 2BhNN'(dqk + dv); backward recomputes S and forms dP, dV, dK, dQ:
    2BhNN'(3 dqk + 2 dv). rwin: both branches' windows of N = s0*s1 tokens on the padded map (padding tokens
    are keys), forward 4 B hb windows N^2 D per branch, backward 2.5x. One exponential per score and pass.
    """
    if op == "rgsa_attention":
        q, k, v = args[:3]
        B, h, N, dqk = q.shape
        n_kv, dv = k.shape[2], v.shape[3]
        scores = B * h * N * n_kv
        flops = 2 * scores * ((dqk + dv) if phase == "fwd" else (3 * dqk + 2 * dv))
        q_el, kv_el, o_el = q.numel(), k.numel() + v.numel(), B * h * N * dv
        elems = q_el + kv_el + o_el if phase == "fwd" else 2 * (q_el + kv_el) + 2 * o_el
        lse = B * h * N * 4 * (1 if phase == "fwd" else 1)
    else:
        qkv, _, H, W, split, _, heads = args[:7]
        B, L, C3 = qkv.shape
        p, n = max(split), split[0] * split[1]
        windows = 2 * B * (-(-H // p) * p) * (-(-W // p) * p) // n * (heads // 2)  # both branches, all heads
        d = C3 // 3 // heads
        scores = windows * n * n
        flops = 4 * scores * d * (1 if phase == "fwd" else 2.5)
        elems = B * L * (C3 + C3 // 3) if phase == "fwd" else B * L * (2 * C3 + 2 * C3 // 3)
        lse = B * heads * L * 4 * (1 if phase == "fwd" else 2)  # bwd: lse and delta
    return {"flops": flops, "bytes": elems * itemsize + lse, "exps": scores}


def floor_s(work: dict, dtype: str) -> tuple[float, str]:
    """Lower-bound seconds on an H200 and what bounds it. fp32 dots are IEEE (no TF32): CUDA-core peak."""
    peak = (H200.fp32_tflops if dtype == "fp32" else H200.bf16_tflops) * 1e12
    times = {"flops": work["flops"] / peak, "bytes": work["bytes"] / (H200.hbm_tbs * 1e12),
             "exps": work["exps"] / H200.exp_per_s}
    bound = max(times, key=times.get)
    return times[bound], bound


def collect(workloads, dtypes: dict, count_flops: bool, timed: bool = False):
    """Variants {key: (launch, info)} and per-(workload, dtype, op, phase) floors of all runs (with the
    measured time beside each floor when `timed`)."""
    variants: dict[str, dict] = {}
    floors = []
    for w in workloads:
        calls, gflop = capture.model_calls(w, count_flops)
        for dtype in dtypes[w.name]:
            for op, phase, launch in capture.launches(calls, dtype):
                v = variants.setdefault(launch.key, {"launch": launch, "op": op, "phase": phase, "dtype": dtype,
                                                     "launches": defaultdict(int)})
                v["launches"][w.name] += 1
            measured = measure(calls, dtype) if timed else {}
            floors += [{**f, **({"measured_ms": measured[f["op"], f["phase"]]} if measured else {})}
                       for f in _floors(w, dtype, calls, gflop)]
    return variants, floors


def _floors(w, dtype: str, calls, gflop: dict) -> list[dict]:
    itemsize = capture.DTYPES[dtype].itemsize
    acc: dict[tuple, dict] = defaultdict(lambda: {"calls": 0, "flops": 0.0, "bytes": 0.0, "exps": 0.0,
                                                  "floor_s": 0.0, "bound": defaultdict(float)})
    for op, args in calls:
        for phase in ("fwd", "bwd"):
            work = op_work(op, phase, args, itemsize)
            a = acc[op, phase]
            a["calls"] += 1
            for k in ("flops", "bytes", "exps"):
                a[k] += work[k]
            s, bound = floor_s(work, dtype)
            a["floor_s"] += s
            a["bound"][bound] += s
    out = []
    for (op, phase), a in acc.items():
        rec = {"workload": w.name, "model": w.model, "dtype": dtype, "op": op, "phase": phase,
               "calls": a["calls"], "gflop": a["flops"] / 1e9, "gbytes": a["bytes"] / 1e9,
               "gexp": a["exps"] / 1e9, "floor_ms": a["floor_s"] * 1e3,
               "bound": max(a["bound"], key=a["bound"].get)}
        if gflop:
            fwd = acc[op, "fwd"]["flops"]
            rec["share_of_forward"] = fwd / (gflop["forward"] * 1e9) if phase == "fwd" else None
            if "train_step" in gflop:
                rec["share_of_train_step"] = a["flops"] / (gflop["train_step"] * 1e9)
            rec["model_gflop"] = gflop
        out.append(rec)
    return out


def measure(calls: list, dtype: str) -> dict[tuple[str, str], float]:
    """GPU only: {(op, phase): ms} summed over the model's calls, each distinct call's fused forward and
    backward timed once (`_harness.time_ms`, do_bench p50) on random tensors with the model's layouts."""
    per_call: dict[tuple, dict] = {}
    total: dict[tuple[str, str], float] = defaultdict(float)
    for op, args in calls:
        sig = (op, tuple((tuple(a.shape), a.stride()) if isinstance(a, torch.Tensor) else a for a in args))
        if sig not in per_call:
            per_call[sig] = _time_call(capture.FUSED[op],
                                       tuple(capture.retype(a, capture.DTYPES[dtype], "cuda") for a in args))
        for phase in ("fwd", "bwd"):
            total[op, phase] += per_call[sig][phase]
    return total


def _time_call(fused, args: tuple) -> dict:
    res = fused.fwd(*args)
    do = torch.randn_like(res[0])
    return {"fwd": _harness.time_ms(lambda: fused.fwd(*args))["ms_p50"],
            "bwd": _harness.time_ms(lambda: fused.bwd(do, res, *args))["ms_p50"]}


def gate_set(variants: dict) -> dict:
    """One variant per (kernel, argument dtypes, constexprs, warps, stages): int specialisations dropped."""
    chosen: dict[tuple, dict] = {}
    for v in variants.values():
        launch = v["launch"]
        dtypes = tuple(str(a.dtype) for a in launch.args if hasattr(a, "dtype"))
        sig = (launch.name, dtypes, tuple(sorted((k, str(x)) for k, x in launch.kwargs.items())))
        rep = chosen.setdefault(sig, {**v, "launches": defaultdict(int)})
        for workload, n in v["launches"].items():  # the workloads of every variant it stands for
            rep["launches"][workload] += n
    return {v["launch"].key: v for v in chosen.values()}


def record(key: str, v: dict, report: dict) -> dict:
    launch = v["launch"]
    return {"kernel": launch.name, "op": v["op"], "phase": v["phase"], "dtype": v["dtype"], "key": key,
            "constexprs": launch.constexprs(), "num_warps": launch.kwargs.get("num_warps"),
            "num_stages": launch.kwargs.get("num_stages"), "launches_per_step": dict(v["launches"]),
            **{k: x for k, x in report.items() if k != "key"}}


def markdown(records: list[dict]) -> str:
    """Per kernel and dtype: registers, spills and shared memory (worst variant), tensor-core lowering."""
    rows: dict[tuple, list] = defaultdict(list)
    for r in records:
        rows[r["kernel"], r["dtype"]].append(r)
    lines = ["| kernel | dtype | variants | regs | spill st / ld (B/thread) | shared KB | dots (wgmma/mma/fma) |",
             "|---|---|---|---|---|---|---|"]
    for (kernel, dtype), rs in sorted(rows.items()):
        ok = [r for r in rs if r["compiled"]]
        failed = f" ({len(rs) - len(ok)} failed)" if len(ok) < len(rs) else ""
        if not ok:
            lines.append(f"| `{kernel}` | {dtype} | {len(rs)}{failed} | | | | |")
            continue
        regs = sorted({r["registers"] for r in ok})
        st = max(r["spill_store_bytes"] for r in ok)
        ld = max(r["spill_load_bytes"] for r in ok)
        smem = max(r["shared_bytes"] for r in ok) / 1024
        dots = "/".join(str(max(r[f"dots_{k}"] for r in ok)) for k in ("wgmma", "mma", "fma"))
        span = f"{regs[0]}-{regs[-1]}" if len(regs) > 1 else str(regs[0])
        lines.append(f"| `{kernel}` | {dtype} | {len(rs)}{failed} | {span} | {st} / {ld} | {smem:.0f} | {dots} |")
    return "\n".join(lines)


def floors_markdown(floors: list[dict], workloads=("train-64x64-b8", "infer-256x256", "infer-750x1000")) -> str:
    """Per op and direction, RGT-S workloads: the H200 floor summed over the model's calls, what bounds it,
    the share of the model's FLOPs, and the measured time where a GPU run added it."""
    lines = ["| workload | dtype | op | calls | GFLOP | GB | floor ms (bound) | share of fwd / train step | "
             "measured ms |", "|---|---|---|---|---|---|---|---|---|"]
    for f in floors:
        if f["workload"] not in workloads or f["dtype"] == "fp16":
            continue
        share = [f.get("share_of_forward"), f.get("share_of_train_step")]
        share = " / ".join("-" if x is None else f"{100 * x:.1f}%" for x in share)
        measured = f"{f['measured_ms']:.3f}" if "measured_ms" in f else "-"
        lines.append(f"| {f['workload']} | {f['dtype']} | {f['op'].removesuffix('_attention')} {f['phase']} | "
                     f"{f['calls']} | {f['gflop']:.1f} | {f['gbytes']:.2f} | {f['floor_ms']:.3f} ({f['bound']}) | "
                     f"{share} | {measured} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gate", action="store_true", help="only the representative set the CI gate checks")
    parser.add_argument("--jobs", type=int, default=2, help="parallel compiles (default 2)")
    parser.add_argument("--no-cache", action="store_true", help=f"recompile everything (cache: "
                        f"{compiler.default_cache_dir()}, or $RGT_SM90_CACHE)")
    parser.add_argument("--out", help="JSON path (default bench/results/sm90/triton-<version>.json)")
    parser.add_argument("--markdown", action="store_true", help="also print the README table")
    parser.add_argument("--time", action="store_true", help="GPU only: time each op call beside its floor")
    a = parser.parse_args(argv)
    if a.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {a.jobs}")
    if a.time and not torch.cuda.is_available():
        parser.error("--time measures the fused ops on a GPU, and no CUDA device is available")
    t0 = time.perf_counter()
    workloads = [w for w in capture.WORKLOADS if not a.gate or w.name in GATE_WORKLOADS]
    dtypes = GATE_WORKLOADS if a.gate else {w.name: tuple(capture.DTYPES) for w in workloads}
    variants, floors = collect(workloads, dtypes, count_flops=not a.gate, timed=a.time)
    if a.gate:
        variants = gate_set(variants)
    t1 = time.perf_counter()
    cache = None if a.no_cache else compiler.default_cache_dir()
    reports = compiler.compile_all([compiler.job(v["launch"]) for v in variants.values()], a.jobs, cache)
    records = sorted((record(k, v, reports[k]) for k, v in variants.items()),
                     key=lambda r: (r["op"], r["kernel"], r["dtype"], r["key"]))
    head = _harness.header(target="sm_90 (GPUTarget('cuda', 90, 32)), compiled without a GPU",
                           ceiling=H200.as_dict(), gate=a.gate, capture_s=round(t1 - t0, 1),
                           compile_wall_s=round(time.perf_counter() - t1, 1), jobs=a.jobs)
    out = Path(a.out) if a.out else _harness.RESULTS / "sm90" / f"triton-{triton.__version__}.json"
    _harness.save(out, head, records, floors=floors)
    table = markdown(records)
    print(table if a.markdown else "\n".join(table.splitlines()[2:]))
    if a.markdown and not a.gate:
        print(floors_markdown(floors))
    bad = [r for r in records if not r["compiled"]]
    print(f"{len(records)} variants ({sum(r.get('cached', False) for r in records)} cached), {len(bad)} failed to "
          f"compile; capture {t1 - t0:.0f} s, compile {time.perf_counter() - t1:.0f} s")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
