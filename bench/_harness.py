"""Shared benchmark plumbing: timing, peak memory, error checks, the JSON header and writing results.

Every script times with `triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])` (ms p50/p20/p80) and writes
`bench/results/<gpu>/<script>.json`: a header (GPU, versions, git sha, UTC time, command) and one record per
(provider, mode, shape, dtype).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def header(**extra) -> dict:
    """What produced the results: hardware, versions, code and command."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "gpu": device_name(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "git_sha": _git_sha(),
        "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        **extra,
    }


def time_ms(fn: Callable[[], object]) -> dict:
    """p50/p20/p80 milliseconds of fn on the GPU (do_bench flushes L2 between runs)."""
    import triton.testing

    p50, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
    return {"ms_p50": p50, "ms_p20": p20, "ms_p80": p80}


def peak_memory_gb(fn: Callable[[], object]) -> dict:
    """Peak allocated memory during one call of fn, in total and above what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"peak_mem_gb": peak / 2**30, "extra_mem_gb": (peak - base) / 2**30}


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (a scale-free error that tolerates exact zeros)."""
    scale = expected.abs().max().item()
    return (actual.float() - expected.float()).abs().max().item() / max(scale, 1e-30)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc)


def result_path(script: str, out: str | None) -> Path:
    """--out if given, else bench/results/<gpu>/<script>.json with the GPU name made file-safe."""
    if out:
        return Path(out)
    return RESULTS / re.sub(r"[^A-Za-z0-9_.-]+", "_", device_name()) / f"{script}.json"


def save(path: Path, head: dict, records: list[dict], **extra) -> None:
    """JSON with the header, the records and any extra top-level entries (e.g. a summary)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"header": head, "records": records, **extra}, indent=1) + "\n")
