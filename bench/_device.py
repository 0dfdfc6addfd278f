"""Hardware ceilings the benchmarks divide by, per GPU (../shared/notes/performance.md sections 0 and 8).

bf16 dense tensor-core peak, HBM bandwidth and MUFU exp2 rate are vendor numbers (spec sheets; the exp rate
is 16 ops/clk/SM x SMs x boost clock); `measured_*` are what the H200 used for the project's benchmarks did
(2026-10): a bf16 8192^3 GEMM and a device-to-device copy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from _harness import time_ms


@dataclass(frozen=True)
class Ceiling:
    name: str
    bf16_tflops: float  # dense tensor-core peak
    fp32_tflops: float  # CUDA cores, non-tensor
    hbm_tbs: float  # HBM bandwidth, TB/s
    exp_per_s: float  # MUFU exp2 throughput
    measured_bf16_tflops: float | None = None
    measured_hbm_tbs: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


# Matched by substring of torch.cuda.get_device_name(), first match wins (H200 before H100).
CEILINGS = (
    Ceiling("H200", bf16_tflops=989.0, fp32_tflops=66.9, hbm_tbs=4.8, exp_per_s=3.9e12,
            measured_bf16_tflops=798.0, measured_hbm_tbs=4.3),
    Ceiling("H100", bf16_tflops=989.0, fp32_tflops=66.9, hbm_tbs=3.35, exp_per_s=3.9e12),
)


def ceiling(device_name: str) -> Ceiling | None:
    """The ceilings of the named GPU, or None when it is not in the table (percentages are then omitted)."""
    for c in CEILINGS:
        if c.name in device_name:
            return c
    return None


def copy_bandwidth_gbs(device: torch.device, *, quick: bool = False) -> float:
    """Device-to-device copy bandwidth in GB/s, counting the read and the write, over a buffer well beyond the
    caches (1 GiB on GPUs; 256 MiB on CPUs): the ceiling of a memory-bound op on this very machine."""
    nbytes = 2**30 if device.type == "cuda" else 2**28
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    p50 = time_ms(lambda: dst.copy_(src), device, quick=quick)["ms_p50"]
    return 2 * nbytes / (p50 * 1e-3) / 1e9
