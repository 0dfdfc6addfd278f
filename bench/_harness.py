"""Shared benchmark plumbing: timing, peak memory, error checks, the JSON header and writing results.

Every script times with `triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])` on a GPU (ms p50/p20/p80; a
wall-clock loop with the same quantiles on CPU) and writes `bench/results/<device>/<script>.json`: a header
(hardware, versions, git sha, UTC time, command) and one record per (provider, mode, shape, dtype).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUANTILES = (0.5, 0.2, 0.8)


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _git_sha() -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha + ("-dirty" if dirty else "")


def _hardware() -> dict:
    if torch.cuda.is_available():
        return {"kind": "cuda", "name": torch.cuda.get_device_name(),
                "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)}
    name = platform.processor() or platform.machine()
    try:
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    # The load average says how much of the machine other processes held during the run.
    return {"kind": "cpu", "name": name, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_1m": round(os.getloadavg()[0], 2)}


def header(**extra) -> dict:
    """What produced the results: hardware, versions, code and command."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "gpu": device_name(),
        "hardware": _hardware(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_sha": _git_sha(),
        "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable), *sys.argv]),
        **extra,
    }


def time_ms(fn: Callable[[], object], device: torch.device | None = None, *, quick: bool = False) -> dict:
    """{"ms_p50", "ms_p20", "ms_p80"} of fn(). CUDA: do_bench (flushes L2 between runs). CPU: a wall-clock loop
    after one warm-up call, at least 3 runs (quick) or 10, up to about 0.5 s (quick) or 2 s."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        from triton.testing import do_bench

        warmup, rep = (10, 40) if quick else (25, 100)
        p50, p20, p80 = do_bench(fn, warmup=warmup, rep=rep, quantiles=list(QUANTILES))
        return {"ms_p50": p50, "ms_p20": p20, "ms_p80": p80}
    fn()
    budget, at_least = (0.5, 3) if quick else (2.0, 10)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < at_least or (time.perf_counter() - start < budget and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    cuts = statistics.quantiles(times, n=100, method="inclusive")
    return {"ms_p50": statistics.median(times), "ms_p20": cuts[19], "ms_p80": cuts[79]}


def peak_memory_gb(fn: Callable[[], object]) -> dict:
    """Peak allocated GPU memory during one call of fn, in total and above what was allocated before it
    ({} on CPU, where torch keeps no such statistic)."""
    if not torch.cuda.is_available():
        return {}
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"peak_mem_gb": peak / 2**30, "extra_mem_gb": (peak - base) / 2**30}


def check_and_time(rec: dict, run: Callable[[], object], check: Callable[[object], dict], tol: float) -> dict:
    """Check run()'s result with `check` (returns {name: max relative error}) against `tol`, then time run and
    take its peak memory. Returns rec with status "ok", "mismatch ...", "oom" or "error: ...": one provider
    failing (OOM, unsupported backend) must not stop the others."""
    try:
        rec["max_rel_err"] = check(run())
        if max(rec["max_rel_err"].values()) > tol:
            return {**rec, "status": f"mismatch (tolerance {tol})"}
        rec.update(time_ms(run))
        rec.update(peak_memory_gb(run))
    except Exception as exc:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {**rec, "status": "oom" if is_oom(exc) else f"error: {type(exc).__name__}: {exc}"[:300]}
    return {**rec, "status": "ok"}


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (a scale-free error that tolerates exact zeros)."""
    scale = expected.abs().max().item()
    return (actual.float() - expected.float()).abs().max().item() / max(scale, 1e-30)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc)


def arg_parser(doc: str, script: str, quick_help: str, dtypes: list[str] | None = None) -> argparse.ArgumentParser:
    """The options every benchmark takes: --quick, --out (default `result_path(script, None)`) and, with
    `dtypes`, --dtype (its first entry the default). Scripts add their own on top."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    if dtypes:
        parser.add_argument("--dtype", choices=dtypes, default=dtypes[0])
    parser.add_argument("--out", help=f"JSON path (default bench/results/<device>/{script}.json)")
    return parser


def attention_line(r: dict, shape_width: int) -> str:
    """One printed row of an attention record: shape, mode, provider, timing (GB/s when the record has it),
    largest relative error, status."""
    err = max(r.get("max_rel_err", {}).values(), default=float("nan"))
    timing = ""
    if "ms_p50" in r:
        gbps = f" {r['gbps']:7.0f} GB/s" if "gbps" in r else ""
        timing = f"{r['ms_p50']:9.3f} ms {r['tflops']:7.1f} TFLOP/s{gbps} {r['peak_mem_gb']:6.2f} GB"
    return f"{r['shape']:>{shape_width}} {r['mode']:>8} {r['provider']:>18} {timing:<52} err {err:.1e}  {r['status']}"


def result_path(script: str, out: str | os.PathLike | None) -> Path:
    """--out if given, else bench/results/<device>/<script>.json with the device name made file-safe."""
    if out:
        return Path(out)
    return RESULTS / re.sub(r"[^A-Za-z0-9_.-]+", "_", device_name()) / f"{script}.json"


def save(path: Path, head: dict, records: list[dict], **extra) -> None:
    """JSON with the header, the records and any extra top-level entries (e.g. a summary)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"header": head, "records": records, **extra}, indent=1) + "\n")
