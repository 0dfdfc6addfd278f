"""The portable attentions (`rgt.ops.portable`, what "auto" runs without Triton) against the float64 reference:
outputs and every gradient, default and tiny chunks, the memory bound, dispatch and the once-per-path log.

Errors are max|portable - reference| / max|reference| per tensor, on fresh random inputs per case.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from _utils import RWIN_CASES as RWIN_KERNEL_CASES
from _utils import SMALL96, TINY, gen

from rgt import RGT
from rgt.ops import portable, reference, rgsa_attention, rwin_attention

# fp32 portable vs float64 reference, about 4x the largest measured over the cases below (out 7.4e-7,
# d(qkv) 9.7e-7, d(bias) 3.7e-7 for L-SA; out 7.4e-7, dq 7.8e-7, dk, dv 4.1e-7 for RG-SA).
FP32_REL = 4e-6
# float64 portable vs float64 reference: the same sums in another order, measured max 2.1e-15.
FP64_REL = 1e-13
TINY_CHUNK = 1  # bytes: one window (L-SA) or one query row (RG-SA) per SDPA call
MID_CHUNK = 2 * 2**20  # the real geometry at 32x64: single rows, split into column chunks in the 32x8 branch

# the fused kernel's geometry cases (padding, shifts, batches, odd windows), plus larger maps of the real one
RWIN_CASES = RWIN_KERNEL_CASES + [
    ("real-32x64-hd30-shift", 1, 32, 64, (8, 32), True, 6, 30),
    ("real-32x64-hd30-noshift", 2, 32, 64, (8, 32), False, 6, 30),
]
# id, N, N', dqk, dv: the model's 15/30 (q, k padded to 30), tiny-config dims, dqk > dv (v padded)
RGSA_CASES = [
    ("real-15-30", 37, 4, 15, 30), ("real-300", 70, 300, 15, 30), ("tiny-6-12", 50, 17, 6, 12),
    ("equal", 33, 16, 16, 16), ("dqk-larger", 10, 3, 32, 16),
]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).abs().max() / b.abs().max()).item()


def grads(fn, inputs, dout):
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return [out, *torch.autograd.grad(out, leaves, dout.to(out.dtype))]


def rwin_inputs(case_id, B, H, W, split, heads, D):
    g = gen(case_id)
    C, M = heads * D, (2 * split[0] - 1) * (2 * split[1] - 1)
    qkv = torch.randn(B, H * W, 3 * C, generator=g, dtype=torch.float64)
    bias = torch.randn(2, M, heads // 2, generator=g, dtype=torch.float64)
    return qkv, bias, torch.randn(B, H * W, C, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("case", RWIN_CASES, ids=[c[0] for c in RWIN_CASES])
@pytest.mark.parametrize("chunk", ["default", "small"])
def test_rwin_matches_reference(case, chunk):
    case_id, B, H, W, split, shift, heads, D = case
    chunk = portable.CHUNK_BYTES if chunk == "default" else (MID_CHUNK if H * W >= 2048 else TINY_CHUNK)
    qkv, bias, dout = rwin_inputs(case_id, B, H, W, split, heads, D)
    args = (H, W, split, shift, heads, D**-0.5)
    expected = grads(lambda a, b: reference.rwin_attention(a, b, *args), (qkv, bias), dout)
    for dtype, tol in ((torch.float64, FP64_REL), (torch.float32, FP32_REL)):
        got = grads(lambda a, b: portable.rwin_attention(a, b, *args, chunk_bytes=chunk),
                    (qkv.to(dtype), bias.to(dtype)), dout)
        for name, g, e in zip(("out", "dqkv", "dbias"), got, expected, strict=True):
            assert g.dtype == dtype and rel(g, e) <= tol, (name, dtype, rel(g, e))
        with torch.no_grad():  # inference: chunks copied into place, and SDPA's flash kernel takes the mask
            out = portable.rwin_attention(qkv.to(dtype), bias.to(dtype), *args, chunk_bytes=chunk)
        assert rel(out, expected[0]) <= tol, ("no_grad out", dtype, rel(out, expected[0]))


@pytest.mark.parametrize("case", RGSA_CASES, ids=[c[0] for c in RGSA_CASES])
@pytest.mark.parametrize("chunk", [portable.CHUNK_BYTES, TINY_CHUNK], ids=["default-chunks", "tiny-chunks"])
def test_rgsa_matches_reference(case, chunk):
    case_id, N, n_kv, dqk, dv = case
    g = gen(case_id)
    B, h = 2, 3
    # permuted views of (B, tokens, heads, d), as the model passes them
    q, k = (torch.randn(B, n, h, dqk, generator=g, dtype=torch.float64).transpose(1, 2) for n in (N, n_kv))
    v = torch.randn(B, n_kv, h, dv, generator=g, dtype=torch.float64).transpose(1, 2)
    dout = torch.randn(B, h, N, dv, generator=g, dtype=torch.float64)
    expected = grads(lambda *t: reference.rgsa_attention(*t, 0.3), (q, k, v), dout)
    for dtype, tol in ((torch.float64, FP64_REL), (torch.float32, FP32_REL)):
        got = grads(lambda *t: portable.rgsa_attention(*t, 0.3, chunk_bytes=chunk),
                    [t.to(dtype) for t in (q, k, v)], dout)
        for name, g_, e in zip(("out", "dq", "dk", "dv"), got, expected, strict=True):
            assert g_.shape == e.shape and rel(g_, e) <= tol, (name, dtype, rel(g_, e))


def test_scores_per_call_stay_under_the_chunk_bound(monkeypatch):
    """Every SDPA call's score matrix (what a math fallback would materialise) fits in chunk_bytes, so peak
    memory follows the image, not N x N' or the whole image's window scores."""
    sizes = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        sizes.append(q.shape[:-1].numel() * k.shape[-2] * q.element_size())
        return real(q, k, v, **kw)

    monkeypatch.setattr(portable.F, "scaled_dot_product_attention", spy)
    chunk = 3 * 2**20
    qkv, bias, _ = rwin_inputs("bound-rwin", 1, 64, 96, (8, 32), 6, 30)
    portable.rwin_attention(qkv.float(), bias.float(), 64, 96, (8, 32), True, 6, 0.2, chunk_bytes=chunk)
    whole = 2 * 64 * 96 * 3 * 256 * 4  # both branches' scores for the whole image: 18.9 MB
    assert len(sizes) > 2 and max(sizes) <= chunk < whole, sizes
    sizes.clear()
    q = torch.randn(1, 6, 4096, 15)
    k, v = torch.randn(1, 6, 256, 15), torch.randn(1, 6, 256, 30)
    portable.rgsa_attention(q, k, v, 0.25, chunk_bytes=chunk)
    assert len(sizes) == 8 and max(sizes) <= chunk < 4096 * 256 * 6 * 4, sizes


@pytest.mark.parametrize("config", [TINY, SMALL96], ids=["tiny", "small96"])
def test_model_portable_matches_reference(config):
    """A whole model (padded, shifted blocks, RG-SA recursion), train mode: fp32 portable vs float64 reference,
    output and every parameter gradient."""
    torch.manual_seed(0)
    ref = RGT(**config, drop_path_rate=0.0, kernels="reference").double().train()
    port = copy.deepcopy(ref).float()
    port.set_kernels("portable")
    g = gen(f"model-portable-{config['embed_dim']}")
    x = torch.rand(2, 3, 20, 24, generator=g, dtype=torch.float64)
    dout = torch.randn(2, 3, 20 * config["upscale"], 24 * config["upscale"], generator=g, dtype=torch.float64)
    ref(x).backward(dout)
    out = port(x.float())
    out.backward(dout.float())
    # measured: output 2.2e-7, gradients up to 8e-6 relative to their own max (sums over 480 tokens)
    assert rel(out, ref(x)) <= 1e-6
    for (name, p), q in zip(ref.named_parameters(), port.parameters(), strict=True):
        assert rel(q.grad, p.grad) <= 4e-5 or (q.grad.double() - p.grad).abs().max() <= 1e-7, name


def test_auto_runs_portable_without_triton_and_says_it_once(monkeypatch, caplog):
    """Where no Triton kernel can run (a CPU tensor, no interpreter), "auto" takes the portable ops, and the log
    names each (op, path, device, dtype) once, however many calls (the quickstart log had 4 lines per step)."""
    from rgt.ops import _dispatch, rgsa, rwin

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(_dispatch, "_said", set())
    qkv, bias, _ = rwin_inputs("log-once", 1, 8, 16, (4, 8), 2, 4)
    with caplog.at_level(logging.DEBUG, logger="rgt.ops"):
        for _ in range(5):
            rwin_attention(qkv.float(), bias.float(), 8, 16, (4, 8), True, 2, 0.5, kernels="auto")
            rgsa_attention(*(torch.rand(1, 2, 9, 3) for _ in range(3)), 0.5, kernels="auto")
        rwin_attention(qkv, bias, 8, 16, (4, 8), True, 2, 0.5, kernels="auto")  # another dtype: one more line
    lines = [r.getMessage() for r in caplog.records]
    assert sum("rwin_attention runs the portable on cpu float32" in m for m in lines) == 1, lines
    assert sum("rgsa_attention runs the portable on cpu float32" in m for m in lines) == 1, lines
    assert sum("rwin_attention runs the portable on cpu float64" in m for m in lines) == 1, lines
    x = torch.zeros(1)
    assert rwin.OP.select("auto", x) is portable.rwin_attention
    assert rgsa.OP.select("auto", x) is portable.rgsa_attention
    assert rgsa.OP.select("reference", x) is reference.rgsa_attention
