"""Training-step throughput: iterations/s and peak memory of one full step (forward, L1 loss, backward, Adam).

GPU: RGT-S x4 at the official batch (32 x 64x64 LR patches, i.e. 8 per GPU x 4 GPUs, on one device) and at a
single-GPU batch (8), reference vs fused ops, fp32 vs bf16 autocast; it also states how long the official 500k
iterations would take on this one device. CPU: the tiny test config at a small batch, reference vs "auto" (the
C++ recursive dwconv where built; the Triton attentions only run in the interpreter on a CPU, which is not a
performance path, so they fall back to the reference), and it says so.

    python bench/train_step.py [--quick] [--out FILE.json]
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402

import rgt  # noqa: E402
from rgt.train import build  # noqa: E402

OFFICIAL_ITERS = 500_000
TINY = dict(upscale=4, embed_dim=36, depth=[2, 2], num_heads=[6, 6], mlp_ratio=2, split_size=[8, 32], c_ratio=0.5)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _step_fn(net: torch.nn.Module, batch: int, patch: int, dtype: str, device: torch.device):
    """A closure running one training step on fixed random data."""
    scale = net.upscale
    g = torch.Generator(device="cpu").manual_seed(0)
    lq = torch.rand(batch, 3, patch, patch, generator=g).to(device)
    gt = torch.rand(batch, 3, patch * scale, patch * scale, generator=g).to(device)
    opt = torch.optim.Adam(net.parameters(), 2e-4, betas=(0.9, 0.99))
    bf16 = dtype == "bf16"

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            out = net(lq)
        loss = torch.nn.functional.l1_loss(out.float(), gt)
        loss.backward()
        opt.step()
        return loss

    return step


def measure(net_kwargs: dict, kernels: str, batch: int, patch: int, dtype: str, device: torch.device,
            warmup: int, iters: int) -> dict:
    """{'it_per_s', 'ms_per_step', 'samples_per_s', 'peak_mem_gb'} or {'error': ...}."""
    record = {"kernels": kernels, "batch": batch, "lr_patch": patch, "dtype": dtype}
    try:
        torch.manual_seed(0)
        net = rgt.RGT(**net_kwargs, kernels=kernels).to(device).train()
        step = _step_fn(net, batch, patch, dtype, device)
        for _ in range(warmup):
            step()
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        _sync(device)
        dt = (time.perf_counter() - t0) / iters
    except (RuntimeError, NotImplementedError) as exc:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {**record, "error": ("out of memory" if _harness.is_oom(exc) else str(exc).splitlines()[0])}
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {**record, "it_per_s": 1 / dt, "ms_per_step": dt * 1e3, "samples_per_s": batch / dt,
            "peak_mem_gb": peak}


def cases(cuda: bool, quick: bool) -> tuple[dict, list[tuple[str, int, int, str]]]:
    """(model kwargs, [(kernels, batch, patch, dtype)])."""
    if not cuda:
        return TINY, [(k, 2, 64, d) for k in ("reference", "auto") for d in ("fp32", "bf16")]
    batches = [8] if quick else [32, 8]
    return (rgt.models.config("rgt_s", 4),
            [(k, b, 64, d) for b in batches for k in ("reference", "fused") for d in ("fp32", "bf16")])


def main(argv: list[str] | None = None) -> None:
    args = _harness.arg_parser(__doc__, "train_step", "fewer steps; GPU: the single-GPU batch only").parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    net_kwargs, todo = cases(cuda, args.quick)
    warmup, iters = (1, 2) if args.quick or not cuda else (3, 10)
    if not cuda:
        print("No CUDA device: timing the tiny config (C=36, 2x2 blocks, x4) on the CPU, reference vs auto "
              "(C++ dwconv; attentions fall back to the reference); RGT-S and the Triton path need a GPU.")
    records = []
    for kernels, batch, patch, dtype in todo:
        rec = measure(net_kwargs, kernels, batch, patch, dtype, device, warmup, iters)
        if cuda and "it_per_s" in rec and batch == 32:
            rec["official_500k_days_one_device"] = OFFICIAL_ITERS / rec["it_per_s"] / 86400
        records.append(rec)
        shown = (f"{rec['it_per_s']:.3f} it/s, {rec['ms_per_step']:.1f} ms/step"
                 + (f", peak {rec['peak_mem_gb']:.1f} GiB" if rec.get("peak_mem_gb") else "")
                 + (f", 500k iterations = {rec['official_500k_days_one_device']:.1f} days"
                    if "official_500k_days_one_device" in rec else "")) if "it_per_s" in rec else rec["error"]
        print(f"{kernels:>9} {dtype} batch {batch}x{patch}x{patch}: {shown}")
    model = "RGT-S x4" if cuda else "tiny config (embed_dim 36, depth [2, 2], heads [6, 6], x4), CPU"
    paths = build.kernel_report(rgt.RGT(**net_kwargs, kernels="auto"), device)
    head = _harness.header(model=model, quick=args.quick, warmup=warmup, iters=iters, auto_op_paths=paths,
                           note=None if cuda else "CPU: tiny config, not RGT-S; Triton attentions not timed")
    path = _harness.result_path("train_step", args.out)
    _harness.save(path, head, records)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
