"""Ceilings for the benchmarks' percentages: vendor peaks per GPU, and the copy bandwidth measured here."""

from __future__ import annotations

import torch
from _harness import time_ms

# Name substring -> (dense bf16 tensor TFLOP/s, HBM TB/s), from the vendors' SXM specs. First match wins.
PEAKS = {
    "H200": (989.0, 4.8),
    "H100": (989.0, 3.35),
    "A100": (312.0, 2.0),
}


def peak(device: torch.device) -> dict | None:
    """{"bf16_tflops", "hbm_tbs"} for a known GPU, else None (CPUs: use the measured copy bandwidth)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (tflops, tbs) in PEAKS.items():
        if key in name:
            return {"bf16_tflops": tflops, "hbm_tbs": tbs}
    return None


def copy_bandwidth_gbs(device: torch.device, *, quick: bool = False) -> float:
    """Device-to-device copy bandwidth in GB/s, counting the read and the write, over a buffer well beyond the
    caches (1 GiB on GPUs; 256 MiB on CPUs)."""
    nbytes = 2**30 if device.type == "cuda" else 2**28
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    p50, _, _ = time_ms(lambda: dst.copy_(src), device, quick=quick)
    return 2 * nbytes / (p50 * 1e-3) / 1e9
