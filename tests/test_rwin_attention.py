"""Fused Rwin (L-SA) attention vs the reference op: outputs, d(qkv) and d(bias_table), geometry edge cases,
registration, dispatch and the model-level check. On CPU the Triton kernels run under TRITON_INTERPRET=1.

Errors are max|fused - oracle| / max|oracle| per tensor. fp32 kernels are compared with the float64 reference.
fp16/bf16 kernels are compared with the fp32 reference and may err at most 2x as much as the reference run in
that dtype (plus a floor for tensors the reference happens to get nearly exact).
"""

from __future__ import annotations

import copy

import pytest
import torch
from _utils import RWIN_CASES, SMALL96, assert_as_accurate, gen, model_step, random_fill, rgt_ops_run
from rgt.kernels import rwin_attn

from rgt.ops import reference, rwin_attention

# CPU tensors run the kernels in the Triton interpreter (conftest sets it without CUDA); CUDA ones on the GPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 vs float64: measured max 7e-7 (out, dqkv, dbias) on the cases below; the target is 1e-5.
FP32_REL = 3e-6
# Model, fp32 (assert_as_accurate): where 'auto' erred more than 2x the fp32 reference, its error was at most
# 6.1e-7 of the largest gradient; its output error at most 1.35e-6 of max|out|, always within 2x the reference's.
# Measured over 16 weight/input seeds, Triton 3.6 and 3.9 interpreters, AVX-512 and AVX2 (EPYC) kernels.
MODEL_FP32_FLOOR = {"out": 3e-6, "grad": 2e-6}
LOW_FLOOR = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # ~2 ulp of the dtype at the tensor's max

CASES = RWIN_CASES


def make_inputs(case_id: str, B: int, H: int, W: int, split, heads: int, D: int, dtype=torch.float64):
    """qkv (B, H*W, 3C), bias table (2, M, heads//2) and an upstream gradient (B, H*W, C) on DEVICE."""
    g = gen(case_id)
    C = heads * D
    M = (2 * split[0] - 1) * (2 * split[1] - 1)
    qkv = torch.randn(B, H * W, 3 * C, generator=g, dtype=dtype)
    bias = torch.randn(2, M, heads // 2, generator=g, dtype=dtype)
    dout = torch.randn(B, H * W, C, generator=g, dtype=dtype)
    return qkv.to(DEVICE), bias.to(DEVICE), dout.to(DEVICE)


def run(fn, qkv, bias, dout, *args):
    """(out, dqkv, dbias) of fn(qkv, bias, *args) with upstream gradient dout."""
    qkv, bias = qkv.detach().requires_grad_(), bias.detach().requires_grad_()
    out = fn(qkv, bias, *args)
    dqkv, dbias = torch.autograd.grad(out, (qkv, bias), dout.to(out.dtype))
    return out, dqkv, dbias


def fused(qkv, bias, *args):
    return rwin_attention(qkv, bias, *args, kernels="fused")


def rel_err(actual, expected) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def assert_fp32_matches(case, got, want):
    for name, a, b in zip(("out", "dqkv", "dbias"), got, want, strict=True):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        assert rel_err(a, b) <= FP32_REL, f"{case}: {name} error {rel_err(a, b):.2e}"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fp32_matches_float64_reference(case):
    case_id, B, H, W, split, shift, heads, D = case
    qkv, bias, dout = make_inputs(case_id, B, H, W, split, heads, D)
    args = (H, W, split, shift, heads, D**-0.5)
    want = run(reference.rwin_attention, qkv, bias, dout, *args)
    assert_fp32_matches(case_id, run(fused, qkv.float(), bias.float(), dout.float(), *args), want)


@pytest.mark.parametrize(
    "split, block, per_chunk",
    [((4, 8), 16, 3), ((4, 8), (16, 32), 2), ((4, 8), (32, 16), 4), ((3, 6), (16, 32), 3)],
    ids=["4x8-16", "4x8-16x32", "4x8-32x16", "3x6-16x32"],
)
def test_small_tiles_and_window_chunks_match(split, block, per_chunk):
    """The GPU's multi-tile loops (2 query or key tiles per window here; unequal query and key tiles as some
    CONFIGS have; a last tile past an odd window's end) and uneven chunks of windows for the bias-gradient
    partials (e.g. 3 + 1 windows), through the launchers."""
    B, H, W, heads, D = 1, 8, 16, 2, 6
    qkv, bias, dout = make_inputs(f"small-tiles-{split}", B, H, W, split, heads, D)
    args = (H, W, split, True, heads, D**-0.5)
    want = run(reference.rwin_attention, qkv, bias, dout, *args)
    q32, b32 = qkv.float(), bias.float()
    out, lse = rwin_attn.rwin_attn_fwd(q32, b32, *args, block=block)
    dqkv, dbias = rwin_attn.rwin_attn_bwd(dout.float(), q32, b32, out, lse, *args, block=block,
                                          windows_per_program=per_chunk)
    assert_fp32_matches("small-tiles", (out, dqkv, dbias), want)


def test_configs_are_valid_tiles():
    """Every launch config (default and autotuning candidates) has power-of-two tiles >= 16 (tl.dot) and a
    sane launch shape, for every kernel and both dot kinds."""
    for kernel, by_kind in rwin_attn.CONFIGS.items():
        assert set(by_kind) == {False, True}, kernel
        for cfg in (c for configs in by_kind.values() for c in configs):
            for size in (cfg.block_m, cfg.block_n):
                assert size >= 16 and size & (size - 1) == 0, (kernel, cfg)
            assert cfg.num_warps in (4, 8) and cfg.num_stages in (1, 2), (kernel, cfg)


@pytest.mark.parametrize("block", [24, (16, 8), (32, 48)])
def test_bad_tiles_raise(block):
    qkv, bias = torch.zeros(1, 64, 24), torch.zeros(2, 105, 1)
    with pytest.raises(ValueError, match="block must be powers of two >= 16"):
        rwin_attn.rwin_attn_fwd(qkv, bias, 8, 8, (4, 8), False, 2, 0.5, block=block)


def test_fp16_within_twice_the_reference_error():
    B, H, W, split, heads, D = 1, 7, 9, (4, 8), 2, 8
    qkv, bias, dout = make_inputs("fp16", B, H, W, split, heads, D)
    args = (H, W, split, True, heads, D**-0.5)
    assert_low_precision_matches(torch.float16, qkv, bias, dout, args)


def assert_low_precision_matches(dtype, qkv, bias, dout, args):
    oracle = run(reference.rwin_attention, qkv.float(), bias.float(), dout.float(), *args)
    ref_low = run(reference.rwin_attention, qkv.to(dtype), bias.to(dtype), dout.to(dtype), *args)
    got = run(fused, qkv.to(dtype), bias.to(dtype), dout.to(dtype), *args)
    for name, a, r, o in zip(("out", "dqkv", "dbias"), got, ref_low, oracle, strict=True):
        assert a.dtype == dtype, name
        bound = max(2 * rel_err(r, o), LOW_FLOOR[dtype])
        assert rel_err(a, o) <= bound, f"{dtype} {name}: error {rel_err(a, o):.2e} > {bound:.2e}"


def test_strided_inputs_give_identical_results():
    """qkv, bias and upstream gradient as permuted views (channel stride != 1): bits of contiguous ones."""
    B, H, W, split, heads, D = 1, 7, 8, (4, 8), 2, 6
    qkv, bias, dout = make_inputs("strided", B, H, W, split, heads, D, dtype=torch.float32)
    args = (H, W, split, True, heads, D**-0.5)
    qkv_t = qkv.permute(2, 0, 1).contiguous().permute(1, 2, 0)  # (B, L, 3C) with strides (1, B, B*L)
    dout_t = dout.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    bias_t = bias.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    assert not (qkv_t.is_contiguous() or dout_t.is_contiguous() or bias_t.is_contiguous())
    strided = run(fused, qkv_t, bias_t, dout_t, *args)
    for a, b in zip(run(fused, qkv, bias, dout, *args), strided, strict=True):
        assert torch.equal(a, b)


def test_empty_batch():
    qkv, bias, dout = make_inputs("empty", 0, 8, 8, (4, 8), 2, 4, dtype=torch.float32)
    out, dqkv, dbias = run(fused, qkv, bias, dout, 8, 8, (4, 8), True, 2, 0.5)
    assert out.shape == (0, 64, 8) and dqkv.shape == qkv.shape
    assert torch.equal(dbias, torch.zeros_like(bias))


def test_double_backward_raises():
    qkv, bias, dout = make_inputs("double", 1, 8, 8, (4, 8), 2, 4, dtype=torch.float32)
    qkv.requires_grad_()
    out = fused(qkv, bias, 8, 8, (4, 8), False, 2, 0.5)
    (dqkv,) = torch.autograd.grad(out, qkv, dout, create_graph=True)
    with pytest.raises(RuntimeError, match="no double backward"):
        dqkv.sum().backward()


@pytest.mark.parametrize(
    "H, W, split, heads, C, bias_shape, match",
    [
        (8, 8, (4, 8), 2, 130, (2, 105, 1), "head dim 65 exceeds"),
        (8, 8, (3, 8), 2, 8, (2, 75, 1), "multiple of min"),
        (8, 8, (4, 8), 2, 8, (2, 104, 1), r"bias_table must be \(2, 105, 1\)"),
        (8, 9, (4, 8), 2, 8, (2, 105, 1), "64 tokens but H\\*W"),
        (8, 8, (16, 32), 2, 8, (2, 1953, 1), "exceed the kernel's 256"),
        (8, 8, (4, 8), 1, 8, (2, 105, 0), "heads=1"),
    ],
)
def test_bad_arguments_raise_clear_errors(H, W, split, heads, C, bias_shape, match):
    qkv, bias = torch.zeros(1, 64, 3 * C), torch.zeros(bias_shape)
    with pytest.raises(ValueError, match=match):
        rwin_attn.rwin_attn_fwd(qkv, bias, H, W, split, False, heads, 0.5)


def test_dispatch(monkeypatch):
    """'auto' takes the fused op where it can run (fp32 under the interpreter) and the reference for float64;
    'fused' on float64 raises and says why; 'reference' never calls the kernels."""
    calls = []
    real = rwin_attn.rwin_attn_fwd
    monkeypatch.setattr(rwin_attn, "rwin_attn_fwd", lambda *a, **k: calls.append(a[0].dtype) or real(*a, **k))
    qkv, bias, _ = make_inputs("dispatch", 1, 8, 8, (4, 8), 2, 4)
    args = (8, 8, (4, 8), True, 2, 0.5)
    fused_out = rwin_attention(qkv.float(), bias.float(), *args, kernels="auto")
    assert calls == [torch.float32]
    ref_out = rwin_attention(qkv.float(), bias.float(), *args, kernels="reference")
    rwin_attention(qkv, bias, *args, kernels="auto")
    with pytest.raises(RuntimeError, match="kernels='fused'.*float64"):
        rwin_attention(qkv, bias, *args, kernels="fused")
    assert calls == [torch.float32]
    assert rel_err(fused_out, ref_out) <= FP32_REL


def test_opcheck():
    qkv, bias, dout = make_inputs("opcheck", 1, 8, 8, (4, 8), 2, 4, dtype=torch.float32)
    args = (8, 8, 4, 8, True, 2, 0.5)
    fwd, bwd = torch.ops.rgt.rwin_attn_fwd.default, torch.ops.rgt.rwin_attn_bwd.default
    torch.library.opcheck(fwd, (qkv.requires_grad_(), bias.requires_grad_(), *args))
    out, lse = fwd(qkv.detach(), bias.detach(), *args)
    torch.library.opcheck(bwd, (dout, qkv.detach(), bias.detach(), out, lse, *args))


def test_model_small96_fused_matches_reference():
    """RGT small96 (bias MLP of width 5, so the table varies per offset) with random weights, a padded 20x24
    input, eval mode, fp32: 'auto' (every L-SA fused, other ops fused where available) and 'reference', both
    against the float64 reference: output and every parameter gradient (assert_as_accurate, MODEL_FP32_FLOOR)."""
    from rgt import RGT
    from rgt.arch.lsa import L_SA

    model = RGT(**SMALL96, kernels="reference").eval().to(DEVICE)
    random_fill(model, "small96-weights")
    x = torch.rand(1, 3, 20, 24, generator=gen("small96-x"), dtype=torch.float64)
    dy = torch.randn(1, 3, 40, 48, generator=gen("small96-dy"), dtype=torch.float64)
    exact = model_step(copy.deepcopy(model).double(), x, dy, "reference")
    ref32 = model_step(model, x, dy, "reference")
    auto32, ops = rgt_ops_run(lambda: model_step(model, x, dy, "auto"))
    n_lsa = sum(isinstance(m, L_SA) for m in model.modules())
    assert n_lsa > 0 and ops["rgt::rwin_attn_fwd"] == ops["rgt::rwin_attn_bwd"] == n_lsa, ops
    assert_as_accurate(exact, ref32, auto32, MODEL_FP32_FLOOR["out"], MODEL_FP32_FLOOR["grad"])


# ------------------------------------------------------------------------------ GPU only (not run on CPU CI)
REAL_HEADS, REAL_D, REAL_SPLIT = 6, 30, (8, 32)  # RGT's L-SA: C = 180, 3 heads of 30 per branch


@pytest.mark.gpu
@pytest.mark.parametrize("H, W", [(64, 64), (70, 50)])
@pytest.mark.parametrize("shift", [False, True])
def test_gpu_fp32_real_geometry(H, W, shift):
    case_id = f"gpu-fp32-{H}x{W}-{shift}"
    qkv, bias, dout = make_inputs(case_id, 2, H, W, REAL_SPLIT, REAL_HEADS, REAL_D)
    args = (H, W, REAL_SPLIT, shift, REAL_HEADS, REAL_D**-0.5)
    want = run(reference.rwin_attention, qkv, bias, dout, *args)
    assert_fp32_matches(case_id, run(fused, qkv.float(), bias.float(), dout.float(), *args), want)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shift", [False, True])
def test_gpu_low_precision_real_geometry(dtype, shift):
    qkv, bias, dout = make_inputs(f"gpu-{dtype}-{shift}", 2, 70, 50, REAL_SPLIT, REAL_HEADS, REAL_D)
    args = (70, 50, REAL_SPLIT, shift, REAL_HEADS, REAL_D**-0.5)
    assert_low_precision_matches(dtype, qkv, bias, dout, args)


@pytest.mark.gpu
def test_gpu_backward_is_deterministic():
    """No atomics: two backward passes give the same bits, the bias-table gradient included."""
    qkv, bias, dout = make_inputs("gpu-determinism", 4, 64, 64, REAL_SPLIT, REAL_HEADS, REAL_D)
    args = (64, 64, REAL_SPLIT, True, REAL_HEADS, REAL_D**-0.5)
    first = run(fused, qkv.bfloat16(), bias.bfloat16(), dout.bfloat16(), *args)
    second = run(fused, qkv.bfloat16(), bias.bfloat16(), dout.bfloat16(), *args)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_compile_fullgraph_matches_eager():
    """The triton_ops trace into torch.compile(fullgraph=True): same output and gradients as eager."""
    qkv, bias, dout = make_inputs("gpu-compile", 2, 40, 52, REAL_SPLIT, REAL_HEADS, REAL_D, torch.bfloat16)
    args = (40, 52, REAL_SPLIT, True, REAL_HEADS, REAL_D**-0.5)
    compiled = torch.compile(fused, fullgraph=True)
    for a, b in zip(run(compiled, qkv, bias, dout, *args), run(fused, qkv, bias, dout, *args), strict=True):
        assert rel_err(a, b) <= 1e-6
