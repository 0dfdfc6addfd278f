"""Fused RG-SA attention (rgt.kernels.rg_attn, via rgt.ops.rgsa_attention) against the float64 reference.

Without CUDA the kernels run in the Triton interpreter on CPU (tests/conftest.py), so sizes stay tiny: B = 2,
2 heads, N of a few dozen tokens (never a multiple of the 64/128-row blocks).
"""

import copy

import pytest
import torch
from _utils import TINY, assert_as_accurate, deterministic_fill, gen, model_step, rgt_ops_run

from rgt import RGT
from rgt.ops import reference, rgsa_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# fp32 vs the float64 reference on the same inputs, atol = rtol, about 4x the largest error measured over
# CASES under the interpreter: out 5.3e-7, dq 1.1e-6, dk 2.0e-6, dv 2.9e-6 (dv sums up to 70 rows of dO).
FP32_TOL = {"out": 2e-6, "dq": 5e-6, "dk": 1e-5, "dv": 1e-5}
# Low precision (and fp32 with ill-conditioned logits): error vs the float64 reference within 2x the
# reference's own error in that dtype, plus atol.
REF_ERR_ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}
# Error floor of fp32 attention with large logits, in units of 2^-23 * max|logit| * max|exact value|: rounding
# each logit alone moves a probability by ~2^-24 |logit| of itself. Measured maxima over the extreme-logit
# cases (TRITON_INTERPRET=1, torch 2.13.0+cpu, numpy 2.4 OpenBLAS, 1 and 2 threads) on an Intel Xeon (AVX-512)
# / with the AVX2 kernels an AMD EPYC runs (ATEN_CPU_CAPABILITY=avx2, MKL_ENABLE_INSTRUCTIONS=AVX2,
# OPENBLAS_CORETYPE=Haswell; this reproduces the errors measured on an EPYC to 3 digits):
# out 0.35 / 0.33, dq 0.46 / 2.62, dk 0.21 / 0.88, dv 0.18 / 0.44; about 2x above the worst.
LOGIT_ROUNDING_FLOOR = {"out": 0.75, "dq": 5.0, "dk": 2.0, "dv": 1.0}

# (N, N', dqk, dv): every N' of the issue with the real dims (15/30); tiny-config dims (3/6, 6/12); 16/32
# (no padding). N' = 300 streams K/V in 64-key blocks (dq kernel + split dk/dv); N' <= 256 keeps them
# resident (one program computes dq, dk and dv).
CASES = [
    (37, 1, 15, 30), (37, 4, 15, 30), (37, 16, 15, 30), (37, 17, 15, 30), (70, 300, 15, 30),
    (37, 4, 6, 12), (70, 17, 6, 12),
    (37, 16, 16, 32), (40, 300, 16, 32),
    (37, 1, 3, 6), (50, 16, 3, 6),
]


def _inputs(case_id: str, N: int, n_kv: int, dqk: int, dv: int, B: int = 2, H: int = 2,
            logits: str = "normal"):
    """fp32 q, k, v as the model passes them (permuted views of (B, tokens, heads, d)) and upstream grad.

    logits "large": q scaled by 10; "negative": every q.k < -9 * dqk (exp underflows without the max shift).
    """
    g = gen(case_id)
    q = torch.randn(B, N, H, dqk, generator=g)
    k = torch.randn(B, n_kv, H, dqk, generator=g)
    if logits == "large":
        q = q * 10
    elif logits == "negative":
        q, k = q.abs() + 3, -(k.abs() + 3)
    v = torch.randn(B, n_kv, H, dv, generator=g)
    do = torch.randn(B, H, N, dv, generator=g)
    return [t.to(DEVICE).permute(0, 2, 1, 3) for t in (q, k, v)], do.to(DEVICE)


def _run(fn, q, k, v, do, scale, dtype=None):
    """Output and (dq, dk, dv) of fn with upstream gradient do, inputs cast to dtype if given."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, scale)
    return (out, *torch.autograd.grad(out, leaves, do.to(dtype)))


def _fused(q, k, v, scale):
    return rgsa_attention(q, k, v, scale, kernels="fused")


def _check_fp32(case_id, N, n_kv, dqk, dv, scale=None):
    (q, k, v), do = _inputs(case_id, N, n_kv, dqk, dv)
    scale = dqk ** -0.5 if scale is None else scale
    _assert_fp32_close(_run(_fused, q, k, v, do, scale), _run(reference.rgsa_attention, q, k, v, do, scale,
                                                              dtype=torch.float64))


def _assert_fp32_close(actual, expected):
    for name, a, e in zip(FP32_TOL, actual, expected, strict=True):
        assert a.dtype == torch.float32 and a.shape == e.shape, name
        tol = FP32_TOL[name]
        torch.testing.assert_close(a.double(), e, atol=tol, rtol=tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("N, n_kv, dqk, dv", CASES)
def test_matches_float64_reference(N, n_kv, dqk, dv):
    _check_fp32(f"rgsa-{N}-{n_kv}-{dqk}-{dv}", N, n_kv, dqk, dv)


@pytest.mark.parametrize("logits", ["large", "negative"])
@pytest.mark.parametrize("n_kv", [17, 300])
def test_extreme_logits(n_kv, logits):
    """Logits of std ~40 (the online max must rescale across key blocks), or all below -135 (2^logit
    underflows fp32 and padded keys must not turn into inf * 0). Rounding logits of magnitude 100-300 costs
    1e-5-1e-3 in fp32, so the bound is 3x the fp32 reference's own error (measured up to 2.2x, dv: base-2
    logits take two more roundings at that magnitude, x scale*log2(e) and lse), with the CPU-independent
    floor LOGIT_ROUNDING_FLOOR: the fused kernel's dots run in the BLAS of the interpreter, whose summation
    order differs between CPUs while the reference's may not."""
    _check_vs_reference_error(torch.float32, 45, n_kv, 15, 30, scale=1.0, logits=logits, factor=3,
                              floor=LOGIT_ROUNDING_FLOOR)


@pytest.mark.parametrize("n_kv", [17, 300])
def test_multi_tile_programs(monkeypatch, n_kv):
    """Few programs: forward programs loop over several query tiles (resident K/V), backward programs over
    several query tiles of their split; at the default targets these tiny sizes get one tile per program."""
    monkeypatch.setattr("rgt.kernels.rg_attn.TARGET_PROGRAMS", {"fwd": 1, "bwd": 1})
    _check_fp32(f"rgsa-tiles-{n_kv}", 200, n_kv, 6, 12)


def test_arbitrary_strides():
    """q with head-dim stride 2 (a packed tensor's slice), k with token stride 1, transposed dO."""
    g = gen("rgsa-strides")
    B, H, N, n_kv, dqk, dv = 2, 2, 41, 17, 15, 30
    q = torch.randn(B, H, N, 2 * dqk, generator=g)[..., ::2]
    k = torch.randn(B, H, dqk, n_kv, generator=g).transpose(-1, -2)
    v = torch.randn(B, H, n_kv, dv, generator=g)
    do = torch.randn(B, H, dv, N, generator=g).transpose(-1, -2)
    q, k, v, do = (t.to(DEVICE) for t in (q, k, v, do))
    expected = _run(reference.rgsa_attention, q, k, v, do, 0.3, dtype=torch.float64)
    _assert_fp32_close(_run(_fused, q, k, v, do, 0.3), expected)


def _check_vs_reference_error(dtype, N, n_kv, dqk, dv, scale=None, logits="normal", factor=2, floor=None):
    """Error of fused(dtype) vs the float64 reference <= factor x the reference's own in dtype, + atol.

    floor: {tensor: c}, the factor-times-reference term is at least c * 2^-23 * max|logit| * max|exact|."""
    (q, k, v), do = _inputs(f"rgsa-{dtype}-{N}-{n_kv}-{logits}", N, n_kv, dqk, dv, logits=logits)
    scale = dqk ** -0.5 if scale is None else scale
    exact = _run(reference.rgsa_attention, q, k, v, do, scale, dtype=torch.float64)
    ref_low = _run(reference.rgsa_attention, q, k, v, do, scale, dtype=dtype)
    fused = _run(_fused, q, k, v, do, scale, dtype=dtype)
    max_logit = (q.double() @ k.double().transpose(-1, -2)).abs().max().item() * scale
    for name, f, r, e in zip(FP32_TOL, fused, ref_low, exact, strict=True):
        assert f.dtype == dtype, name
        ref_err = (r.double() - e).abs().max().item()
        err = (f.double() - e).abs().max().item()
        low = floor[name] * 2**-23 * max_logit * e.abs().max().item() if floor else 0.0
        bound = max(factor * ref_err, low) + REF_ERR_ATOL[dtype]
        assert err <= bound, f"{name}: fused {err:.3g}, reference {ref_err:.3g}, bound {bound:.3g}"


@pytest.mark.parametrize("N, n_kv", [(37, 17), (40, 300)])
def test_float16(N, n_kv):
    _check_vs_reference_error(torch.float16, N, n_kv, 15, 30)


@pytest.mark.gpu
@pytest.mark.parametrize("N, n_kv", [(37, 17), (40, 300), (4096, 16), (3000, 256)])
def test_bfloat16(N, n_kv):
    """bf16 dots are wrong in the Triton interpreter (fp16 and fp32 are exact), so bf16 runs on a GPU only."""
    _check_vs_reference_error(torch.bfloat16, N, n_kv, 15, 30)


@pytest.mark.gpu
@pytest.mark.parametrize("N, n_kv", [(70_000, 16), (5000, 257)])
def test_large_shapes_gpu(N, n_kv):
    """Real compilation, many programs per head, K/V streamed just past the resident limit."""
    _check_fp32(f"rgsa-gpu-{N}-{n_kv}", N, n_kv, 15, 30)


@pytest.mark.gpu
def test_compile_matches_eager():
    """torch.compile(fullgraph=True) traces the triton_op (fake, autograd, kernels visible to Inductor)."""
    (q, k, v), do = _inputs("rgsa-compile", 1000, 17, 15, 30)
    eager = _run(_fused, q, k, v, do, 0.25)
    compiled = _run(torch.compile(_fused, fullgraph=True), q, k, v, do, 0.25)
    for name, a, e in zip(FP32_TOL, compiled, eager, strict=True):
        torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_backward_is_deterministic(monkeypatch):
    """Several query splits per key block: their fp32 partial dk/dv are summed in a fixed order."""
    monkeypatch.setattr("rgt.kernels.rg_attn.TARGET_PROGRAMS", {"fwd": 1024, "bwd": 4096})
    (q, k, v), do = _inputs("rgsa-determinism", 150, 17, 15, 30)
    first, second = (_run(_fused, q, k, v, do, 0.25) for _ in range(2))
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_opcheck():
    (q, k, v), do = _inputs("rgsa-opcheck", 37, 17, 15, 30)
    out, lse = torch.ops.rgt.rgsa_attn_fwd(q, k, v, 0.25)
    torch.library.opcheck(torch.ops.rgt.rgsa_attn_fwd.default, (q, k, v, 0.25))
    torch.library.opcheck(torch.ops.rgt.rgsa_attn_bwd.default, (do, q, k, v, out, lse, 0.25),
                          test_utils=("test_schema", "test_faketensor"))


def _ops_called(fn) -> set[str]:
    return set(rgt_ops_run(fn)[1])


def test_dispatch():
    (q, k, v), do = _inputs("rgsa-dispatch", 37, 4, 3, 6)
    qg = q.detach().requires_grad_()
    fused = _ops_called(lambda: rgsa_attention(qg, k, v, 0.5, kernels="fused").backward(do))
    assert fused == {"rgt::rgsa_attn_fwd", "rgt::rgsa_attn_bwd"}
    assert _ops_called(lambda: rgsa_attention(qg, k, v, 0.5, kernels="reference").backward(do)) == set()


def test_old_interpreter_with_new_numpy_is_one_clear_error(monkeypatch):
    """Triton 3.6's interpreter (the H200's Triton) fails inside any kernel under NumPy >= 2.4 (measured:
    'only 0-dimensional arrays can be converted to Python scalars'); 3.7 and later, and older NumPy, run."""
    from rgt.kernels import _common

    check = _common._check_interpreter.__wrapped__
    for triton_version, numpy_version, fails in [("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False),
                                                  ("3.7.0", "2.4.6", False), ("3.9.0", "2.5.0rc1", False)]:
        monkeypatch.setattr(_common.triton, "__version__", triton_version)
        monkeypatch.setattr(_common.np, "__version__", numpy_version)
        if fails:
            with pytest.raises(RuntimeError, match=r"Triton 3\.6\.0 needs numpy < 2\.4.*pip install 'numpy<2\.4'"):
                check()
        else:
            check()


def test_empty():
    for B, N in [(0, 5), (2, 0)]:
        (q, k, v), do = _inputs(f"rgsa-empty-{B}-{N}", N, 3, 15, 30, B=B)
        out, dq, dk, dv = _run(_fused, q, k, v, do, 0.25)
        assert out.shape == (B, 2, N, 30) and dq.shape == q.shape
        assert dk.shape == k.shape and dv.shape == v.shape and not dk.any() and not dv.any()


def test_double_backward_raises():
    (q, k, v), _ = _inputs("rgsa-double", 5, 3, 3, 6)
    q = q.detach().requires_grad_()
    (dq,) = torch.autograd.grad(_fused(q, k, v, 0.5).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="no double backward"):
        dq.sum().backward()


def test_validation():
    q, k, v = torch.zeros(2, 2, 5, 15), torch.zeros(2, 2, 3, 15), torch.zeros(2, 2, 3, 30)
    bad = [
        ((q[0], k, v), ValueError, "4-D"),
        ((q, k[:, :1], v), ValueError, "expected q"),
        ((q, k, v[:, :, :2]), ValueError, "expected q"),
        ((q, k[:, :, :0], v[:, :, :0]), ValueError, "N' >= 1"),
        ((torch.zeros(2, 2, 5, 65), torch.zeros(2, 2, 3, 65), v), ValueError, "up to 64"),
        ((q, k, torch.zeros(2, 2, 3, 80)), ValueError, "up to 64"),
        ((q.half(), k, v), TypeError, "one dtype"),
        ((q.double(), k.double(), v.double()), TypeError, "one dtype"),
    ]
    for args, exc, match in bad:
        with pytest.raises(exc, match=match):
            rgsa_attention(*(t.to(DEVICE) for t in args), 0.5, kernels="fused")


def test_reference_gradcheck():
    (q, k, v), _ = _inputs("rgsa-gradcheck", 6, 3, 3, 6)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(lambda *a: reference.rgsa_attention(*a, 0.5), leaves, fast_mode=True)


# Relative to the largest exact value (out) or parameter gradient (grad). Measured max error / that scale of
# kernels="auto" in fp32, eval / training, Intel AVX-512 and AVX2 kernels (as on AMD EPYC), 1-2 threads:
# out 1.0e-6 / 1.2e-6; grad 2.3e-6 / 1.5e-5 (AVX-512), 7.9e-6 (EPYC, conv_first.weight); the fp32 reference's
# own: out 1.3e-6, grad up to 1.9e-5. Floors about 3x the worst auto error.
MODEL_FP32_FLOOR = {"out": 4e-6, "grad": 5e-5}


@pytest.mark.parametrize("training", [False, True])
def test_model_auto_matches_reference(training):
    """Tiny RGT in fp32, kernels="auto" (fused RG-SA; other ops fused where available) vs "reference", both
    against the float64 reference model: output and every parameter gradient (assert_as_accurate, with
    MODEL_FP32_FLOOR; the keys' gradients are ~0 at N' = 1, where the reference's fp32 softmax backward gives
    exact zeros and the fused one fp32 noise). 20x24 input: eval has one representative token (N' = 1),
    training 5x6 = 30."""
    model = RGT(**TINY, drop_path_rate=0.0, kernels="reference").train(training).to(DEVICE)
    deterministic_fill(model)
    x = torch.rand(1, 3, 20, 24, generator=gen(f"rgsa-model-{training}"), dtype=torch.float64)
    dy = torch.randn(1, 3, 40, 48, generator=gen("rgsa-model-grad"), dtype=torch.float64)
    exact = model_step(copy.deepcopy(model).double(), x, dy, "reference")
    ref32, ref_ops = rgt_ops_run(lambda: model_step(model, x, dy, "reference"))
    auto32, auto_ops = rgt_ops_run(lambda: model_step(model, x, dy, "auto"))
    assert not ref_ops and {"rgt::rgsa_attn_fwd", "rgt::rgsa_attn_bwd"} <= auto_ops.keys(), (ref_ops, auto_ops)
    assert_as_accurate(exact, ref32, auto32, MODEL_FP32_FLOOR["out"], MODEL_FP32_FLOOR["grad"])
