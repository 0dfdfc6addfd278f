"""Shared benchmark plumbing: timing with quantiles, and JSON results with a header saying where they ran."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

QUANTILES = (0.5, 0.2, 0.8)


def time_ms(fn: Callable[[], object], device: torch.device, *,
            quick: bool = False) -> tuple[float, float, float]:
    """(p50, p20, p80) milliseconds of fn(). CUDA: triton.testing.do_bench (flushes L2 between runs); CPU: a
    wall-clock loop after warm-up, min 3 runs (quick) or 10, up to about 2 s (quick: 0.5 s)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        warmup, rep = (10, 40) if quick else (25, 100)
        return tuple(do_bench(fn, warmup=warmup, rep=rep, quantiles=list(QUANTILES)))
    fn()
    budget, at_least = (0.5, 3) if quick else (2.0, 10)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < at_least or (time.perf_counter() - start < budget and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    cuts = statistics.quantiles(times, n=100, method="inclusive")
    return tuple(statistics.median(times) if q == 0.5 else cuts[round(q * 100) - 1] for q in QUANTILES)


def _git_sha() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header(device: torch.device) -> dict:
    """Hardware, versions, git sha, UTC time and the command line of this run."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        hardware = {"kind": "cuda", "name": torch.cuda.get_device_name(device),
                    "memory_gib": round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)}
    else:
        # The load average says how much of the machine other processes held during the run.
        hardware = {"kind": "cpu", "name": _cpu_name(), "logical_cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "load_average_1m": round(os.getloadavg()[0], 2)}
    return {
        "hardware": hardware,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_sha": _git_sha(),
        "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
    }


def default_out(device: torch.device, script: str) -> Path:
    """bench/results/<device>/<script>.json, the device name made path-safe ("cpu" on CPU)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name).strip("_")
    return Path(__file__).resolve().parent / "results" / safe / f"{script}.json"


def write_json(path: Path, head: dict, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"header": head, "records": records}, indent=1) + "\n")
