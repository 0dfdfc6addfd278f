"""Attention benchmarks: RG-SA cross-attention here; L-SA window attention from bench/attention_rwin.py.

    python bench/attention.py [--quick] [--dtype bf16|fp16|fp32] [--out PATH]

RG-SA providers, all in one process on identical inputs (q, k, v as the model passes them: permuted views of
(B, tokens, heads, d)), each checked against a float32 reference (computed in query chunks, so it fits even
where eager attention does not) before it is timed:
- fused: rgt.ops.rgsa_attention(kernels="fused"), the Triton kernels of kernels/rg_attn.py;
- reference: eager math, softmax(q k^T * scale) v, which materialises the N x N' scores;
- reference+compile: torch.compile of the same function;
- sdpa-padded: F.scaled_dot_product_attention with q/k zero-padded to 16 and v to 32 (exact), so the
  mem-efficient and cuDNN backends are eligible (head dims 15/30 alone fall back to math);
- flex-padded: compiled FlexAttention with the same padding (its head dims must be powers of two).
Modes: fwd, and fwd+bwd (torch.autograd.grad of q, k, v with a fixed random upstream gradient).

Shapes (RGT: 6 heads, dqk 15, dv 30): a 256x256 LR image (N = 65536, N' = 256), a whole 750x1000 LR image
(N = 750000, N' = 46*62 = 2852) and a training batch (32 x 64x64 patches, N = 4096, N' = 16).

Throughput model: forward FLOPs = 2*B*h*N*N'*(dqk + dv), i.e. flash-attention's 4*B*h*N*N'*d with
d = (dqk + dv)/2, on the unpadded dims; backward = 2.5x forward, fwd+bwd = 3.5x. TFLOP/s is divided by the
bf16 dense peak of bench/_device.py. The exp bound is B*h*N*N' exponentials per pass over the scores at the
GPU's MUFU rate, forward 1 pass, fwd+bwd 2 (a backward that recomputes P once, as the fused one does for
N' <= 256; for larger N' its dq and dk/dv kernels recompute it twice). Peak memory from
torch.cuda.max_memory_allocated() over one call.

Without CUDA the script runs a small correctness-only pass of the fused kernels under the Triton interpreter
(fp32) and says so; nothing is timed.

L-SA plug-in: if bench/attention_rwin.py exists, its `run(dtype, quick, correctness_only) -> list[dict]` is
called and its records (built with bench/_harness.py, same fields) are saved in the same JSON.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import _harness
import torch
import torch.nn.functional as F
from _device import ceiling

SHAPES = {  # name: (B, heads, N, N', dqk, dv)
    "infer-256x256": (1, 6, 65536, 256, 15, 30),
    "whole-750x1000": (1, 6, 750_000, 2852, 15, 30),
    "train-32x64x64": (32, 6, 4096, 16, 15, 30),
}
CPU_SHAPES = {"cpu-resident": (1, 2, 300, 16, 15, 30), "cpu-streamed": (1, 2, 300, 300, 15, 30),
              "cpu-tiny-config": (2, 2, 50, 17, 3, 6)}
TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-3}  # max rel error vs the fp32 reference
REF_CHUNK = 32768  # query rows per chunk of the checking reference
MODES = ("fwd", "fwd+bwd")


def _pad(t: torch.Tensor, d: int) -> torch.Tensor:
    return F.pad(t, (0, d - t.shape[-1]))


def providers(quick: bool) -> dict[str, Callable]:
    """name -> fn(q, k, v, scale) -> (B, h, N, dv)."""
    from rgt.ops import reference, rgsa_attention

    def sdpa(q, k, v, scale):
        dv = v.shape[-1]
        return F.scaled_dot_product_attention(_pad(q, 16), _pad(k, 16), _pad(v, 32), scale=scale)[..., :dv]

    out = {"fused": lambda q, k, v, s: rgsa_attention(q, k, v, s, kernels="fused"),
           "reference": reference.rgsa_attention, "sdpa-padded": sdpa}
    if not quick:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention)

        def flex_padded(q, k, v, scale):
            return flex(_pad(q, 16), _pad(k, 16), _pad(v, 32), scale=scale)[..., :v.shape[-1]]

        out["reference+compile"] = torch.compile(reference.rgsa_attention)
        out["flex-padded"] = flex_padded
    return out


def make_inputs(shape, dtype, device, seed=0):
    """q, k, v (permuted views of token-major tensors, requiring grad), upstream gradient, scale."""
    B, H, N, n_kv, dqk, dv = shape
    g = torch.Generator(device).manual_seed(seed)
    q = torch.randn(B, N, H, dqk, generator=g, device=device, dtype=dtype).permute(0, 2, 1, 3)
    k = torch.randn(B, n_kv, H, dqk, generator=g, device=device, dtype=dtype).permute(0, 2, 1, 3)
    v = torch.randn(B, n_kv, H, dv, generator=g, device=device, dtype=dtype).permute(0, 2, 1, 3)
    do = torch.randn(B, H, N, dv, generator=g, device=device, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v)], do, dqk ** -0.5


def chunked_reference(q, k, v, do, scale):
    """fp32 out, dq, dk, dv of softmax(q k^T * scale) v, in query chunks of REF_CHUNK rows."""
    from rgt.ops import reference

    k32, v32 = (t.detach().float().requires_grad_() for t in (k, v))
    outs, dqs = [], []
    for s in range(0, q.shape[2], REF_CHUNK):
        qc = q[:, :, s:s + REF_CHUNK].detach().float().requires_grad_()
        o = reference.rgsa_attention(qc, k32, v32, scale)
        o.backward(do[:, :, s:s + REF_CHUNK].float())
        outs.append(o.detach())
        dqs.append(qc.grad)
    return torch.cat(outs, 2), torch.cat(dqs, 2), k32.grad, v32.grad


def run_mode(fn, mode, q, k, v, do, scale):
    """One call: the output (fwd) or (out, dq, dk, dv) (fwd+bwd)."""
    if mode == "fwd":
        with torch.no_grad():
            return (fn(q, k, v, scale),)
    out = fn(q, k, v, scale)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), do))


def errors(results, expected) -> dict:
    names = ("out", "dq", "dk", "dv")
    return {n: _harness.max_rel_err(a, e) for n, a, e in zip(names, results, expected, strict=False)}


def flops(shape, mode) -> float:
    B, H, N, n_kv, dqk, dv = shape
    fwd = 2.0 * B * H * N * n_kv * (dqk + dv)
    return fwd if mode == "fwd" else 3.5 * fwd


def exp_bound_ms(shape, mode, ceil) -> float | None:
    B, H, N, n_kv, _, _ = shape
    passes = 1 if mode == "fwd" else 2
    return None if ceil is None else 1e3 * passes * B * H * N * n_kv / ceil.exp_per_s


def bench_one(name, fn, mode, shape, dtype, inputs, expected, ceil) -> dict:
    """Check fn against the reference, then time it and measure its peak memory."""
    (q, k, v), do, scale = inputs
    rec = {"op": "rgsa_attention", "provider": name, "mode": mode, "shape": shape_name(shape),
           "dims": dict(zip(("B", "heads", "N", "N_kv", "dqk", "dv"), shape, strict=True)),
           "dtype": str(dtype).removeprefix("torch."), "gflop": flops(shape, mode) / 1e9,
           "exp_bound_ms": exp_bound_ms(shape, mode, ceil)}
    rec = _harness.check_and_time(rec, lambda: run_mode(fn, mode, q, k, v, do, scale),
                                  lambda out: errors(out, expected), TOL[dtype])
    if rec["status"] != "ok":
        return rec
    rec["tflops"] = flops(shape, mode) / rec["ms_p50"] / 1e9
    if ceil is not None:
        rec["pct_bf16_peak"] = 100 * rec["tflops"] / ceil.bf16_tflops
    return rec


def shape_name(shape) -> str:
    return next((n for n, s in {**SHAPES, **CPU_SHAPES}.items() if s == shape), str(shape))


def gpu_pass(dtype: torch.dtype, quick: bool) -> list[dict]:
    ceil = ceiling(_harness.device_name())
    provs = providers(quick)
    shapes = [s for n, s in SHAPES.items() if not (quick and n.startswith("whole"))]
    records = []
    for shape in shapes:
        inputs = make_inputs(shape, dtype, "cuda")
        expected = chunked_reference(*inputs[0], inputs[1], inputs[2])
        for mode in MODES:
            for name, fn in provs.items():
                records.append(bench_one(name, fn, mode, shape, dtype, inputs, expected, ceil))
                print(_harness.attention_line(records[-1], 16), flush=True)
        del inputs, expected
        torch.cuda.empty_cache()
    return records


def cpu_pass() -> list[dict]:
    """Fused (Triton interpreter) vs the reference on tiny shapes, fp32, forward and gradients; no timing."""
    fused = providers(quick=True)["fused"]
    records = []
    for name, shape in CPU_SHAPES.items():
        (q, k, v), do, scale = make_inputs(shape, torch.float32, "cpu")
        err = errors(run_mode(fused, "fwd+bwd", q, k, v, do, scale), chunked_reference(q, k, v, do, scale))
        ok = max(err.values()) <= 1e-5
        records.append({"op": "rgsa_attention", "provider": "fused", "mode": "fwd+bwd", "shape": name,
                        "dims": dict(zip(("B", "heads", "N", "N_kv", "dqk", "dv"), shape, strict=True)),
                        "dtype": "float32", "max_rel_err": err,
                        "status": "ok (correctness only)" if ok else "mismatch (tolerance 1e-5)"})
        print(_harness.attention_line(records[-1], 16), flush=True)
    return records


def rwin_records(dtype: torch.dtype, quick: bool, correctness_only: bool) -> list[dict]:
    """Records of bench/attention_rwin.py (L-SA) when that file exists."""
    if importlib.util.find_spec("attention_rwin") is None:
        return []
    import attention_rwin

    return attention_rwin.run(dtype=dtype, quick=quick, correctness_only=correctness_only)


def summarize(records: list[dict]) -> list[dict]:
    """Per (op, shape, mode): fused p50 against the fastest correct baseline."""
    rows = []
    for key in dict.fromkeys((r["op"], r["shape"], r["mode"]) for r in records):
        ok = [r for r in records if (r["op"], r["shape"], r["mode"]) == key and r["status"] == "ok"]
        fused = [r for r in ok if r["provider"] == "fused"]
        base = [r for r in ok if r["provider"] != "fused"]
        if fused and base:
            best = min(base, key=lambda r: r["ms_p50"])
            rows.append({"op": key[0], "shape": key[1], "mode": key[2], "fused_ms": fused[0]["ms_p50"],
                         "best_baseline": best["provider"], "best_baseline_ms": best["ms_p50"],
                         "speedup": best["ms_p50"] / fused[0]["ms_p50"]})
    return rows


def main(argv: list[str] | None = None) -> None:
    args = _harness.arg_parser(__doc__, "attention", "skip the whole-image shape and the compiled providers",
                               list(_harness.DTYPES)).parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before rgt is imported: @triton.jit reads it then
        print("No CUDA device: correctness-only pass of the fused kernels (Triton interpreter, fp32), "
              "nothing is timed.")
    dtype = _harness.DTYPES[args.dtype] if cuda else torch.float32
    records = gpu_pass(dtype, args.quick) if cuda else cpu_pass()
    records += rwin_records(dtype, args.quick, correctness_only=not cuda)
    ceil = ceiling(_harness.device_name())
    head = _harness.header(
        correctness_only=not cuda, dtype=str(dtype).removeprefix("torch."), quick=args.quick,
        note=None if cuda else "CPU-only machine: fused kernels checked in the Triton interpreter, not timed",
        flop_model="fwd 2*B*h*N*N'*(dqk+dv) (= 4*B*h*N*N'*d, d = mean head dim); bwd 2.5x fwd",
        ceiling=ceil.as_dict() if ceil else None,
    )
    summary = summarize(records)
    path = _harness.result_path("attention", args.out)
    _harness.save(path, head, records, summary=summary)
    for row in summary:
        print(f"{row['shape']:>16} {row['mode']:>8}: fused {row['fused_ms']:.3f} ms, best baseline "
              f"{row['best_baseline']} {row['best_baseline_ms']:.3f} ms, speedup {row['speedup']:.2f}x")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
