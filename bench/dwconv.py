"""Benchmark of rgt.ops.recursive_dwconv: the fused C++/CUDA op against the F.conv2d chain it replaces.

Shapes (k = 4, T = 2, channels_last input as the model passes it): inference 1 x 180 x 256 x 256 and
training 32 x 180 x 64 x 64. Providers: "reference" (T calls of F.conv2d), "reference+compile" (torch.compile
of it; by default on CUDA only) and "fused". Modes: fwd (no grad), bwd (grad of a kept graph), fwd+bwd.

Throughput model (the op is memory-bound, ~1 FLOP/B): the bytes it must move. fwd reads x and writes the
output; bwd reads x and grad_out and writes grad_x; fwd+bwd is both. GB/s over those bytes is reported as a
percentage of the copy bandwidth measured in the same process (read + write), and of HBM spec on known GPUs.

Usage: python bench/dwconv.py [--quick] [--dtype bf16|fp32|all] [--out PATH] [--providers a,b]
"""

from __future__ import annotations

import torch
from _device import ceiling, copy_bandwidth_gbs
from _harness import arg_parser, device_name, header, max_rel_err, result_path, save, time_ms

from rgt.ops import recursive_dwconv

SHAPES = {"inference": (1, 180, 256, 256), "training": (32, 180, 64, 64)}
K, TIMES = 4, 2
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def providers(names: list[str]) -> dict:
    def reference(x, w, b):
        return recursive_dwconv(x, w, b, TIMES, kernels="reference")

    def fused(x, w, b):
        return recursive_dwconv(x, w, b, TIMES, kernels="fused")

    table = {"reference": reference, "fused": fused}
    if "reference+compile" in names:
        table["reference+compile"] = torch.compile(reference)
    return {n: table[n] for n in names}


def inputs(shape, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    B, C, H, W = shape
    x = torch.randn(B, C, H, W, generator=g).to(device, dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(C, 1, K, K, generator=g) / K).to(device, dtype)
    b = torch.randn(C, generator=g).to(device, dtype)
    return x, w, b


def forward_backward(fn, x, w, b, grad_out):
    leaves = [t.detach().requires_grad_() for t in (x, w, b)]
    out = fn(*leaves)
    return out, torch.autograd.grad(out, leaves, grad_out)


def max_errors(fns, x, w, b, grad_out) -> dict:
    """Each provider's max relative difference (max |diff| / max |reference|) from the reference's output and
    gradients, on the same inputs."""
    ref_out, ref_grads = forward_backward(fns["reference"], x, w, b, grad_out)
    errors = {}
    for name, fn in fns.items():
        out, grads = forward_backward(fn, x, w, b, grad_out)
        pairs = zip(["out", "x", "weight", "bias"], (out, *grads), (ref_out, *ref_grads), strict=True)
        errors[name] = {n: max_rel_err(a, e) for n, a, e in pairs}
    return errors


def modes(fn, x, w, b, grad_out) -> dict:
    leaves = [t.detach().requires_grad_() for t in (x, w, b)]
    kept = fn(*leaves)

    def fwd():
        with torch.no_grad():
            fn(x, w, b)

    return {
        "fwd": fwd,
        "bwd": lambda: torch.autograd.grad(kept, leaves, grad_out, retain_graph=True),
        "fwd+bwd": lambda: forward_backward(fn, x, w, b, grad_out),
    }


def bytes_moved(x, out_numel: int) -> dict:
    xb, ob = x.numel() * x.element_size(), out_numel * x.element_size()
    return {"fwd": xb + ob, "bwd": 2 * xb + ob, "fwd+bwd": 3 * xb + 2 * ob}


def run(args) -> tuple[dict, list[dict]]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = args.providers.split(",") if args.providers else (
        ["reference", "reference+compile", "fused"] if device.type == "cuda" else ["reference", "fused"])
    names = ["reference"] + [n for n in names if n != "reference"]  # the baseline, first
    fns = providers(names)
    copy_gbs = copy_bandwidth_gbs(device, quick=args.quick)
    hbm = ceiling(device_name()) if device.type == "cuda" else None
    head = header() | {"copy_bandwidth_gbs": round(copy_gbs, 1), "peak": hbm.as_dict() if hbm else None,
                             "model": "GB/s over the bytes the op must move (see bench/dwconv.py)"}
    records = []
    for dtype_name in (DTYPES if args.dtype == "all" else [args.dtype]):
        dtype = DTYPES[dtype_name]
        for shape_name, shape in SHAPES.items():
            x, w, b = inputs(shape, dtype, device)
            out_shape = (*shape[:2], shape[2] // K**TIMES, shape[3] // K**TIMES)
            grad_out = torch.randn(out_shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
            errors = max_errors(fns, x, w, b, grad_out)
            nbytes = bytes_moved(x, grad_out.numel())
            base = {}
            for name, fn in fns.items():
                for mode, call in modes(fn, x, w, b, grad_out).items():
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    t = time_ms(call, device, quick=args.quick)
                    p50, p20, p80 = t["ms_p50"], t["ms_p20"], t["ms_p80"]
                    gbs = nbytes[mode] / (p50 * 1e-3) / 1e9
                    base.setdefault(mode, p50)  # "reference" runs first
                    records.append({
                        "provider": name, "mode": mode, "shape": shape_name, "size": [*shape, K, TIMES],
                        "dtype": dtype_name, "ms_p50": round(p50, 4), "ms_p20": round(p20, 4),
                        "ms_p80": round(p80, 4), "gb_s": round(gbs, 1),
                        "pct_copy_bw": round(100 * gbs / copy_gbs, 1),
                        "pct_hbm_spec": round(100 * gbs / (1e3 * hbm.hbm_tbs), 1) if hbm else None,
                        "speedup_vs_reference": round(base[mode] / p50, 2),
                        "peak_mem_mib": (round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
                                         if device.type == "cuda" else None),
                        "max_rel_err_vs_reference": errors[name],
                    })
                    r = records[-1]
                    print(f"{dtype_name:4} {shape_name:9} {mode:7} {name:17} {p50:9.3f} ms  {gbs:7.1f} GB/s "
                          f"({r['pct_copy_bw']:5.1f}% of copy)  x{r['speedup_vs_reference']:.2f}", flush=True)
    return head, records


def main() -> None:
    parser = arg_parser(__doc__, "dwconv", "fewer repetitions", ["all", *DTYPES])
    parser.add_argument("--providers", help="comma-separated subset of reference,reference+compile,fused")
    args = parser.parse_args()
    head, records = run(args)
    out = result_path("dwconv", args.out)
    save(out, head, records)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
