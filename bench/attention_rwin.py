"""L-SA (rectangle-window) attention benchmark: the fused Triton op against PyTorch baselines.

    python bench/attention.py ...      (calls run() below and saves these records with RG-SA's)
    python bench/attention_rwin.py [--quick] [--dtype bf16|fp16|fp32] [--out PATH]     (L-SA alone)

The op: qkv (B, H*W, 3C) -> (B, H*W, C) with padding to a multiple of 32, two branches of 8x32 / 32x8
windows, the shift and its -100 region masks and the relative-position bias, as in RGT's L-SA.
Providers, in one process on identical inputs, each checked against the fp32 reference before timing:
- fused: rgt.ops.rwin_attention(kernels="fused") (kernels/rwin_attn.py);
- reference: the eager op (pad, roll, window partition, materialised scores, softmax, reverse);
- reference+compile: torch.compile of it;
- sdpa-padded: the same pad/roll/partition in PyTorch, then F.scaled_dot_product_attention per branch with
  head dims zero-padded 30 -> 32 (so mem-efficient / cuDNN are eligible) and the gathered bias plus the shift
  mask folded into one float attn_mask (windows x heads, broadcast over the batch);
- flex-padded: the same layout through compiled FlexAttention, with a score_mod that gathers the bias from
  the (M, heads) table and applies the region mask (head dims padded to 32).
Modes: fwd, fwd+bwd (torch.autograd.grad of qkv and the bias table, fixed random upstream gradient).

Shapes (C = 180, 6 heads: 3 of 30 per branch, 8x32 split, shifted and unshifted blocks): a 256x256 LR image
(inference) and a training batch of 32 x 64x64 patches.

Models: FLOPs = 4 * B * nW * h * N^2 * d forward over both branches (nW windows of N = 256 tokens on the
padded map, h = 3 heads per branch, d = 30), backward 2.5x (flash-attention's convention). Minimum bytes:
forward reads qkv and writes out (4C per token); backward reads qkv, out, dout and writes dqkv (8C per
token); GB/s = minimum bytes / time. Exp bound: B*nW*2h*N^2 exponentials per pass over the scores at the
GPU's MUFU rate; 1 pass forward, 4 fwd+bwd (the fused backward recomputes P in its dk/dv, dq and d(bias) kernels).
Without CUDA: a small correctness-only pass (fused kernels in the Triton interpreter, fp32), nothing timed.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import _harness
import torch
import torch.nn.functional as F
from _device import ceiling

SPLIT, HEADS, C = (8, 32), 6, 180
SHAPES = {  # name: (B, H, W, C, heads, split, shift)
    "infer-256x256-shift": (1, 256, 256, C, HEADS, SPLIT, True),
    "infer-256x256-noshift": (1, 256, 256, C, HEADS, SPLIT, False),
    "train-32x64x64-shift": (32, 64, 64, C, HEADS, SPLIT, True),
}
CPU_SHAPES = {"cpu-real-20x24": (1, 20, 24, 60, 2, SPLIT, True),
              "cpu-small-17x23": (2, 17, 23, 24, 4, (4, 8), True)}
TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-3}  # max rel error vs the fp32 reference
MODES = ("fwd", "fwd+bwd")
NAMES = ("out", "dqkv", "dbias")


def _branches(attend: Callable) -> Callable:
    """The reference's pad / roll / window partition and reverse around attend(q, k, v, table, geometry),
    which gets q, k, v as (B, nW * hb, N, d) (windows folded into heads) and returns the same shape."""
    from rgt.ops import reference

    def fn(qkv, bias_table, H, W, split, shift, heads, scale):
        B, L, C3 = qkv.shape
        Cq, hb = C3 // 3, heads // 2
        half, d = Cq // 2, Cq // heads
        Hp, Wp = reference.padded_size(H, W, split)
        x = F.pad(qkv.view(B, H, W, C3), (0, 0, 0, Wp - W, 0, Hp - H))  # (B, Hp, Wp, 3C)
        outs = []
        for i in range(2):
            hs, ws = reference.branch_geometry(split, i)
            N, nW = hs * ws, Hp * Wp // (hs * ws)
            q, k, v = (x[..., j * Cq + i * half: j * Cq + (i + 1) * half] for j in range(3))
            if shift:
                q, k, v = (torch.roll(t, (-(hs // 2), -(ws // 2)), (1, 2)) for t in (q, k, v))
            # (B*nW, N, C/2) -> (B, nW*hb, N, d)
            q, k, v = (reference.window_partition(t, hs, ws).view(B, nW, N, hb, d).transpose(2, 3)
                       .reshape(B, nW * hb, N, d) for t in (q, k, v))
            o = attend(q, k, v, bias_table[i], (hs, ws, Hp, Wp, shift, scale))
            o = o.view(B, nW, hb, N, d).transpose(2, 3).reshape(B * nW, N, half)
            o = reference.window_merge(o, hs, ws, B, Hp, Wp)
            if shift:
                o = torch.roll(o, (hs // 2, ws // 2), (1, 2))
            outs.append(o[:, :H, :W].reshape(B, L, half))
        return torch.cat(outs, dim=-1)

    return fn


def _sdpa_attend(q, k, v, table, geometry):
    """SDPA with head dims padded to 32 and bias + shift mask as one (1, nW*hb, N, N) float attn_mask."""
    from rgt.ops import reference

    hs, ws, Hp, Wp, shift, scale = geometry
    N, hb, d = hs * ws, table.shape[-1], q.shape[-1]
    nW = q.shape[1] // hb
    index = reference.relative_position_index(hs, ws, q.device)
    mask = table[index.view(-1)].view(N, N, hb).permute(2, 0, 1).expand(nW, hb, N, N)
    if shift:
        mask = mask + reference.shift_mask(Hp, Wp, hs, ws, q.device, q.dtype)[:, None]
    mask = mask.reshape(1, nW * hb, N, N).to(q.dtype)
    pad = (0, 32 - d)
    q, k, v = (F.pad(t, pad) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)[..., :d]


def _flex_attend(flex: Callable) -> Callable:
    """FlexAttention whose score_mod gathers the bias from the table and applies the shift-region mask."""

    def attend(q, k, v, table, geometry):
        hs, ws, Hp, Wp, shift, scale = geometry
        hb, d = table.shape[-1], q.shape[-1]
        region = _regions(hs, ws, Hp, Wp, q.device)  # (nW, N)

        def score_mod(score, b, h, q_idx, kv_idx):
            rel = (q_idx // ws - kv_idx // ws + hs - 1) * (2 * ws - 1) + (q_idx % ws - kv_idx % ws + ws - 1)
            score = score + table[rel, h % hb]
            if shift:
                w = h // hb
                score = torch.where(region[w, q_idx] == region[w, kv_idx], score, score - 100.0)
            return score

        pad = (0, 32 - d)
        return flex(F.pad(q, pad), F.pad(k, pad), F.pad(v, pad), score_mod=score_mod, scale=scale)[..., :d]

    return attend


def _regions(hs: int, ws: int, Hp: int, Wp: int, device) -> torch.Tensor:
    """(nW, N) shift-region id of every token of every window (rgt.ops.reference.shift_mask's bands)."""
    from rgt.ops import reference

    def bands(n, w):
        idx = torch.arange(n, device=device)
        return (idx >= n - w).int() + (idx >= n - w // 2).int()

    region = bands(Hp, hs)[:, None] * 3 + bands(Wp, ws)[None, :]
    return reference.window_partition(region[None, :, :, None], hs, ws).squeeze(-1)


def providers(quick: bool, compiled: bool) -> dict[str, Callable]:
    """name -> fn(qkv, bias_table, H, W, split, shift, heads, scale) -> out."""
    from torch.nn.attention.flex_attention import flex_attention

    from rgt.ops import reference, rwin_attention

    out = {"fused": lambda *a: rwin_attention(*a, kernels="fused"), "reference": reference.rwin_attention,
           "sdpa-padded": _branches(_sdpa_attend)}
    if not compiled:  # CPU correctness pass: the baselines' math, uncompiled
        out["flex-padded"] = _branches(_flex_attend(flex_attention))
    elif not quick:
        out["reference+compile"] = torch.compile(reference.rwin_attention)
        out["flex-padded"] = _branches(_flex_attend(torch.compile(flex_attention)))
    return out


def make_inputs(shape, dtype, device, seed=0):
    """qkv, bias table (both requiring grad), upstream gradient, and the op's remaining arguments."""
    B, H, W, Cq, heads, split, shift = shape
    g = torch.Generator(device).manual_seed(seed)
    M = (2 * split[0] - 1) * (2 * split[1] - 1)
    qkv = torch.randn(B, H * W, 3 * Cq, generator=g, device=device, dtype=dtype).requires_grad_()
    table = torch.randn(2, M, heads // 2, generator=g, device=device, dtype=dtype).requires_grad_()
    dout = torch.randn(B, H * W, Cq, generator=g, device=device, dtype=dtype)
    return qkv, table, dout, (H, W, split, shift, heads, (Cq // heads) ** -0.5)


def run_mode(fn, mode, qkv, table, dout, args):
    """One call: (out,) for fwd, (out, dqkv, dtable) for fwd+bwd."""
    if mode == "fwd":
        with torch.no_grad():
            return (fn(qkv, table, *args),)
    out = fn(qkv, table, *args)
    return (out.detach(), *torch.autograd.grad(out, (qkv, table), dout))


def expected(qkv, table, dout, args):
    """fp32 reference out, dqkv, dtable."""
    from rgt.ops import reference

    q32, t32 = (t.detach().float().requires_grad_() for t in (qkv, table))
    return run_mode(reference.rwin_attention, "fwd+bwd", q32, t32, dout.float(), args)


def errors(results, want) -> dict:
    return {n: _harness.max_rel_err(a, e) for n, a, e in zip(NAMES, results, want, strict=False)}


def models(shape, mode, dtype) -> dict:
    """FLOPs, minimum bytes and exponentials of one call (see the module docstring)."""
    B, H, W, Cq, heads, split, _ = shape
    p = max(split)
    Hp, Wp = H + (-H) % p, W + (-W) % p
    N = split[0] * split[1]
    nW = Hp * Wp // N
    fwd = 4.0 * B * nW * heads * N * N * (Cq // heads)
    elt = torch.tensor([], dtype=dtype).element_size()
    return {"flop": fwd if mode == "fwd" else 3.5 * fwd,
            "bytes": B * H * W * Cq * elt * (4 if mode == "fwd" else 12),
            "exps": B * nW * heads * N * N * (1 if mode == "fwd" else 4)}


def record(name, mode, shape_name, shape, dtype) -> dict:
    keys = ("B", "H", "W", "C", "heads", "split", "shift")
    return {"op": "rwin_attention", "provider": name, "mode": mode, "shape": shape_name,
            "dims": dict(zip(keys, shape, strict=True)), "dtype": str(dtype).removeprefix("torch.")}


def bench_one(name, fn, mode, shape_name, shape, dtype, inputs, want, ceil) -> dict:
    """Check fn against the fp32 reference, then time it and measure its peak memory."""
    qkv, table, dout, args = inputs
    m = models(shape, mode, dtype)
    rec = record(name, mode, shape_name, shape, dtype)
    rec.update(gflop=m["flop"] / 1e9, min_gb=m["bytes"] / 1e9,
               exp_bound_ms=None if ceil is None else 1e3 * m["exps"] / ceil.exp_per_s)
    rec = _harness.check_and_time(rec, lambda: run_mode(fn, mode, qkv, table, dout, args),
                                  lambda out: errors(out, want), TOL[dtype])
    if rec["status"] != "ok":
        return rec
    rec["tflops"] = m["flop"] / rec["ms_p50"] / 1e9
    rec["gbps"] = m["bytes"] / rec["ms_p50"] / 1e6
    if ceil is not None:
        rec["pct_bf16_peak"] = 100 * rec["tflops"] / ceil.bf16_tflops
        rec["pct_hbm"] = 100 * rec["gbps"] / (1e3 * ceil.hbm_tbs)
    return rec


def gpu_pass(dtype: torch.dtype, quick: bool) -> list[dict]:
    ceil = ceiling(_harness.device_name())
    # Compiled Flex and reference get one graph per (shape, branch geometry, mode): above dynamo's default 8.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    provs = providers(quick, compiled=True)
    records = []
    for shape_name, shape in SHAPES.items():
        inputs = make_inputs(shape, dtype, "cuda")
        want = expected(*inputs)
        for mode in MODES:
            for name, fn in provs.items():
                records.append(bench_one(name, fn, mode, shape_name, shape, dtype, inputs, want, ceil))
                print(_harness.attention_line(records[-1], 22), flush=True)
        del inputs, want
        torch.cuda.empty_cache()
    return records


def cpu_pass() -> list[dict]:
    """Every provider (fused in the Triton interpreter, baselines uncompiled) vs the reference on small
    shapes, fp32, forward and gradients; nothing is timed."""
    records = []
    for shape_name, shape in CPU_SHAPES.items():
        inputs = make_inputs(shape, torch.float32, "cpu")
        want = expected(*inputs)
        for name, fn in providers(quick=True, compiled=False).items():
            mode = "fwd" if name == "flex-padded" else "fwd+bwd"  # FlexAttention has no CPU backward
            rec = record(name, mode, shape_name, shape, torch.float32)
            with warnings.catch_warnings():  # uncompiled Flex on purpose: only its math is checked here
                warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
                rec["max_rel_err"] = errors(run_mode(fn, mode, *inputs), want)
            ok = max(rec["max_rel_err"].values()) <= 1e-5
            rec["status"] = "ok (correctness only)" if ok else "mismatch (tolerance 1e-5)"
            records.append(rec)
            print(_harness.attention_line(rec, 22), flush=True)
    return records


def run(quick: bool = False, dtype: torch.dtype = torch.bfloat16, device: str | None = None, *,
        correctness_only: bool | None = None) -> list[dict]:
    """Records for bench/attention.py: timed on a GPU, a correctness-only pass otherwise.

    Without CUDA, TRITON_INTERPRET=1 must be set before rgt is imported (bench/attention.py's main does).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if correctness_only is None:
        correctness_only = device != "cuda"
    return cpu_pass() if correctness_only else gpu_pass(dtype, quick)


def main(argv: list[str] | None = None) -> None:
    args = _harness.arg_parser(__doc__, "attention_rwin", "skip the compiled providers",
                               list(_harness.DTYPES)).parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before rgt is imported: @triton.jit reads it then
    dtype = _harness.DTYPES[args.dtype] if cuda else torch.float32
    records = run(args.quick, dtype, "cuda" if cuda else "cpu")
    ceil = ceiling(_harness.device_name())
    head = _harness.header(correctness_only=not cuda, dtype=str(dtype).removeprefix("torch."),
                           quick=args.quick, ceiling=ceil.as_dict() if ceil else None)
    path = _harness.result_path("attention_rwin", args.out)
    _harness.save(path, head, records)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
