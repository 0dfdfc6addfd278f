"""rgt.ops.recursive_dwconv: the C++/CUDA op against `times` applications of F.conv2d(groups=C)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from _utils import gen

import rgt.ops._dispatch as dispatch
from rgt.ops import _ext, dwconv, recursive_dwconv, reference

BUILT = _ext.load_error() is None
needs_ext = pytest.mark.skipif(not BUILT, reason="rgt._C not built (pip install --no-build-isolation -e .)")

# (atol, rtol) per dtype for the output and each gradient against the float64 reference: about 4x the max abs
# errors measured over SHAPES (values up to 6, d(weight) up to 67 as it sums over up to 47k pixels):
# float32 out 1.3e-6, d(x) 1.3e-7, d(weight) 2.3e-5, d(bias) 1.3e-5;
# float64 out 2.7e-15, d(x) 0, d(weight) 8.9e-14, d(bias) 3.4e-14.
TOL = {
    torch.float64: {"out": (1e-14, 0), "x": (1e-15, 0), "weight": (4e-13, 0), "bias": (1.5e-13, 0)},
    torch.float32: {"out": (5e-6, 0), "x": (5e-7, 0), "weight": (1e-4, 0), "bias": (5e-5, 0)},
}

# (B, C, H, W, k, times): odd sizes with leftovers at every level, a last level of 1 pixel, C % 8 != 0.
SHAPES = [
    (1, 5, 17, 23, 4, 1),
    (3, 13, 63, 250, 4, 2),
    (2, 7, 16, 19, 4, 2),  # last level 1 x 1
    (1, 6, 70, 130, 4, 3),  # 17x32 -> 4x8 -> 1x2
    (2, 10, 37, 41, 3, 2),  # k = 3
    (3, 9, 20, 9, 2, 2),  # k = 2, W leaves 1 column at level 2
]


def make_inputs(case: str, B: int, C: int, H: int, W: int, k: int, *, bias: bool = True,
                dtype: torch.dtype = torch.float64):
    """x, weight, bias in float64 (cast later). Weights ~ N(0, 1/k^2) keep every level's values O(1)."""
    g = gen(case)
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    w = torch.randn(C, 1, k, k, generator=g, dtype=torch.float64) / k
    b = torch.randn(C, generator=g, dtype=torch.float64) if bias else None
    return (t.to(dtype) if t is not None else None for t in (x, w, b))


def run(x, w, b, times, kernels, grad_out=None):
    """Output and its gradients {x, weight, bias} for upstream gradient grad_out, on fresh leaf copies."""
    leaves = [None if t is None else t.detach().clone(memory_format=torch.preserve_format).requires_grad_()
              for t in (x, w, b)]
    out = recursive_dwconv(*leaves, times, kernels=kernels)
    if grad_out is None:
        return out, None
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], grad_out)
    return out, dict(zip(["x", "weight", "bias"], grads, strict=False))


def layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def test_reference_is_a_conv2d_chain():
    x, w, b = make_inputs("ref-chain", 2, 3, 37, 41, 3)
    want = F.conv2d(F.conv2d(x, w, b, stride=3, groups=3), w, b, stride=3, groups=3)
    torch.testing.assert_close(reference.recursive_dwconv(x, w, b, 2), want, atol=0, rtol=0)


@needs_ext
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_conv_chain(shape, dtype, channels_last):
    B, C, H, W, k, times = shape
    case = f"match-{shape}"
    x, w, b = make_inputs(case, B, C, H, W, k)
    x = layout(x, channels_last)
    out_shape = (B, C, H // k**times, W // k**times)
    grad_out = torch.randn(out_shape, generator=gen(case + "-grad"), dtype=torch.float64)
    ref, ref_grads = run(x, w, b, times, "reference", grad_out)
    out, grads = run(x.to(dtype), w.to(dtype), b.to(dtype), times, "fused", grad_out.to(dtype))
    assert out.dtype == dtype and out.shape == out_shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt) and grads["x"].is_contiguous(memory_format=fmt)
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref, atol=tol["out"][0], rtol=tol["out"][1])
    for name, want in ref_grads.items():
        atol, rtol = tol[name]
        torch.testing.assert_close(grads[name].double(), want, atol=atol, rtol=rtol,
                                   msg=lambda m, n=name: f"{n}: {m}")


def assert_low_precision_close(x, w, b, times, grad_out, dtype) -> None:
    """The fused op in `dtype` (from fp32 inputs) errs, against the fp32 reference, at most twice as much as the
    reference op run in `dtype` does (plus one ulp of the output's scale), for the output and every gradient."""
    want, want_grads = run(x, w, b, times, "reference", grad_out)
    low = [t.to(dtype) for t in (x, w, b, grad_out)]
    ref_out, ref_grads = run(*low[:3], times, "reference", low[3])
    out, grads = run(*low[:3], times, "fused", low[3])
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads.values())
    eps = torch.finfo(dtype).eps
    for name, got, ref, exact in [("out", out, ref_out, want)] + [
            (n, grads[n], ref_grads[n], want_grads[n]) for n in want_grads]:
        err = (got.float() - exact).abs().max().item()
        ref_err = (ref.float() - exact).abs().max().item()
        scale = exact.abs().max().item()
        assert err <= 2 * ref_err + eps * scale, f"{name}: fused error {err:.3g}, reference {ref_err:.3g}"


@needs_ext
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3], SHAPES[4]], ids=lambda s: "x".join(map(str, s)))
def test_low_precision(shape, dtype, channels_last):
    """Fused bf16/fp16 (float accumulation) vs the fp32 reference: within 2x the reference's own error."""
    B, C, H, W, k, times = shape
    case = f"lowp-{shape}"
    x, w, b = make_inputs(case, B, C, H, W, k, dtype=torch.float32)
    x = layout(x, channels_last)
    grad_out = torch.randn((B, C, H // k**times, W // k**times), generator=gen(case + "-grad"))
    assert_low_precision_close(x, w, b, times, grad_out, dtype)


@needs_ext
def test_autocast_runs_in_the_autocast_dtype():
    """Under autocast the fused op casts like F.conv2d does (fp32 weights with a bf16 map, say)."""
    x, w, b = make_inputs("autocast", 2, 6, 40, 36, 4, dtype=torch.float32)
    x = x.contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(2, 6, 2, 2, generator=gen("autocast-grad"))
    exact, exact_grads = run(x, w, b, 2, "reference", grad_out)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, ref_grads = run(x, w, b, 2, "reference", grad_out.bfloat16())
        out, grads = run(x, w, b, 2, "fused", grad_out.bfloat16())
    assert out.dtype == ref.dtype == torch.bfloat16
    assert all(grads[n].dtype == ref_grads[n].dtype == torch.float32 for n in grads)  # fp32 leaves
    for name, got, want, e in [("out", out, ref, exact)] + [(n, grads[n], ref_grads[n], exact_grads[n])
                                                           for n in grads]:
        err, ref_err = ((t.float() - e).abs().max().item() for t in (got, want))
        assert err <= 2 * ref_err + 1e-6, f"{name}: {err:.3g} vs reference {ref_err:.3g}"


@needs_ext
def test_token_view_is_read_in_place():
    """The model's tokens (B, H*W, C) viewed as (B, C, H, W) are channels_last: read without a copy."""
    B, H, W, C, times = 2, 40, 36, 11, 2
    g = gen("token-view")
    tokens = torch.randn(B, H * W, C, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(C, 1, 4, 4, generator=g, dtype=torch.float64) / 4).requires_grad_()
    b = torch.randn(C, generator=g, dtype=torch.float64, requires_grad=True)
    x = tokens.view(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W), strides (HWC, 1, WC, C)
    with torch.profiler.profile(record_shapes=True) as prof:
        out = recursive_dwconv(x, w, b, times, kernels="fused")
    copies = [e for e in prof.events() if e.name in ("aten::copy_", "aten::clone", "aten::contiguous")
              and any(list(s) == [B, C, H, W] for s in e.input_shapes)]
    assert not copies, f"the input map was copied: {[e.name for e in copies]}"
    assert out.is_contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(out, (tokens, w, b), grad_out)
    want_out = reference.recursive_dwconv(x, w, b, times)
    want = torch.autograd.grad(want_out, (tokens, w, b), grad_out)
    torch.testing.assert_close(out, want_out)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e)


@needs_ext
@pytest.mark.parametrize("times,bias,channels_last", [(1, True, False), (2, False, True), (3, True, True)])
def test_gradcheck(times, bias, channels_last):
    x, w, b = make_inputs(f"gradcheck-{times}", 2, 3, 4**times + 3, 4**times + 1, 4, bias=bias)
    inputs = [t.requires_grad_() for t in (layout(x, channels_last), w, b) if t is not None]
    fn = (lambda x, w, b: recursive_dwconv(x, w, b, times, kernels="fused")) if bias else (
        lambda x, w: recursive_dwconv(x, w, None, times, kernels="fused"))
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


@needs_ext
def test_opcheck():
    x, w, b = make_inputs("opcheck", 2, 5, 20, 35, 4)
    for args in [(x, w, b, 2), (x.contiguous(memory_format=torch.channels_last), w, None, 1)]:
        torch.library.opcheck(torch.ops.rgt.recursive_dwconv_fwd.default, args)
    grad_out = torch.randn(2, 5, 1, 2, generator=gen("opcheck-grad"), dtype=torch.float64)
    torch.library.opcheck(torch.ops.rgt.recursive_dwconv_bwd.default, (grad_out, x, w, b, 2))


@needs_ext
def test_double_backward_raises():
    x, w, b = (t.requires_grad_() for t in make_inputs("double-bwd", 1, 3, 16, 16, 4))
    out = recursive_dwconv(x, w, b, 2, kernels="fused")
    (gx,) = torch.autograd.grad(out, x, torch.ones_like(out), create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        gx.sum().backward()


def _bad(x=None, w=None, b="default", times=2):
    dx, dw, db = make_inputs("bad", 1, 4, 17, 23, 4, dtype=torch.float32)
    return (dx if x is None else x), (dw if w is None else w), (db if isinstance(b, str) else b), times


@needs_ext
@pytest.mark.parametrize("args,match", [
    (_bad(times=3), r"level 3 of 3 would fall below the kernel size: its input is 1x1 but the kernel is 4x4 "
                    r"\(x is 17x23\)"),
    (_bad(x=torch.zeros(1, 4, 3, 30)), r"level 1 of 2 would fall below the kernel size: its input is 3x30"),
    (_bad(w=torch.zeros(5, 1, 4, 4)), r"weight must be \(C, 1, k, k\) = \(4, 1, k, k\).*got \[5, 1, 4, 4\]"),
    (_bad(w=torch.zeros(4, 1, 4, 3)), r"weight must be \(C, 1, k, k\).*got \[4, 1, 4, 3\]"),
    (_bad(w=torch.zeros(4, 2, 4, 4)), r"weight must be \(C, 1, k, k\)"),
    (_bad(b=torch.zeros(5)), r"bias must be \(C,\) = \(4,\), got \[5\]"),
    (_bad(w=torch.zeros(4, 1, 4, 4, dtype=torch.float64)), r"weight is Double but x is Float"),
    (_bad(b=torch.zeros(4, dtype=torch.float16)), r"bias is Half but x is Float"),
    (_bad(x=torch.zeros(4, 17, 23)), r"x must be \(B, C, H, W\), got shape \[4, 17, 23\]"),
    (_bad(x=torch.ones(1, 4, 17, 23, dtype=torch.int32), w=torch.ones(4, 1, 4, 4, dtype=torch.int32), b=None),
     r"x must be float32, float64, float16 or bfloat16, got Int"),
    (_bad(times=-1), r"times must be >= 1, got -1"),
], ids=["level-too-small", "level1-too-small", "weight-channels", "weight-not-square", "weight-groups",
        "bias-shape", "weight-dtype", "bias-dtype", "x-dims", "x-int", "times"])
def test_bad_arguments(args, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.rgt.recursive_dwconv_fwd(*args)


@needs_ext
def test_bad_grad_out():
    x, w, b = make_inputs("bad-grad", 1, 4, 17, 23, 4)
    with pytest.raises(RuntimeError, match=r"grad_out must be \(1, 4, 1, 1\), got \[1, 4, 4, 5\]"):
        torch.ops.rgt.recursive_dwconv_bwd(torch.zeros(1, 4, 4, 5, dtype=torch.float64), x, w, b, 2)
    with pytest.raises(RuntimeError, match=r"grad_out is Float but x is Double"):
        torch.ops.rgt.recursive_dwconv_bwd(torch.zeros(1, 4, 1, 1), x, w, b, 2)


@needs_ext
def test_times_zero_and_empty_batch():
    x, w, b = make_inputs("edge", 2, 3, 8, 8, 4)
    assert recursive_dwconv(x, w, b, 0, kernels="fused") is x
    x0 = x[:0].requires_grad_()
    w0 = w.clone().requires_grad_()
    out = recursive_dwconv(x0, w0, b, 1, kernels="fused")
    assert out.shape == (0, 3, 2, 2)
    gx, gw = torch.autograd.grad(out, (x0, w0), torch.zeros_like(out))
    assert gx.shape == x0.shape and gw.abs().sum() == 0


def grad_out_views(shape, case: str, device="cpu"):
    """Upstream gradients autograd may pass: expanded (stride 0, from a sum) and permuted (non-contiguous)."""
    B, C, H, W = shape
    yield torch.full((1, 1, 1, 1), 0.5, dtype=torch.float64, device=device).expand(shape)
    yield torch.randn(B, H, C, W, generator=gen(case), dtype=torch.float64).to(device).permute(0, 2, 1, 3)


@needs_ext
def test_grad_out_of_any_strides():
    x, w, b = make_inputs("grad-strides", 2, 5, 33, 40, 4)
    for grad_out in grad_out_views((2, 5, 2, 2), "grad-strides-g"):
        got = torch.ops.rgt.recursive_dwconv_bwd(grad_out, x, w, b, 2)
        want = torch.ops.rgt.recursive_dwconv_bwd(grad_out.contiguous(), x, w, b, 2)
        for a, e in zip(got, want, strict=True):
            torch.testing.assert_close(a, e, atol=1e-14, rtol=0)


@needs_ext
def test_backward_is_deterministic_across_thread_counts():
    x, w, b = make_inputs("determinism", 4, 70, 64, 64, 4, dtype=torch.float32)
    grad_out = torch.randn(4, 70, 4, 4, generator=gen("determinism-grad"))
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            results.append(torch.ops.rgt.recursive_dwconv_bwd(grad_out, x, w, b, 2))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, e in zip(results[0], other, strict=True):
            assert torch.equal(a, e)


@needs_ext
def test_dispatch_fused_and_reference():
    x, w, b = make_inputs("dispatch", 1, 3, 16, 16, 4)
    assert dwconv.OP.select("fused", x) is dwconv._fused
    assert dwconv.OP.select("auto", x) is dwconv._fused  # the CPU kernel runs wherever rgt._C is built
    assert dwconv.OP.select("reference", x) is reference.recursive_dwconv
    with torch.profiler.profile() as prof:
        recursive_dwconv(x, w, b, 2, kernels="reference")
    names = {e.name for e in prof.events()}
    assert "aten::conv2d" in names and "rgt::recursive_dwconv_fwd" not in names
    with torch.profiler.profile() as prof:
        recursive_dwconv(x, w, b, 2, kernels="fused")
    names = {e.name for e in prof.events()}
    assert "rgt::recursive_dwconv_fwd" in names and "aten::conv2d" not in names


def test_dispatch_without_extension(monkeypatch):
    """A failed build: 'auto' falls back to the reference with one warning, 'fused' says how to build."""
    monkeypatch.setattr(_ext, "load_error", lambda: "the C++ extension rgt._C could not be loaded (test). "
                        "Build it with `pip install --no-build-isolation -e .` against the torch you run.")
    monkeypatch.setattr(dispatch, "_said", set())
    x, w, b = make_inputs("no-ext", 1, 3, 16, 16, 4)
    with pytest.raises(RuntimeError, match=r"kernels='fused'.*pip install --no-build-isolation -e \."):
        recursive_dwconv(x, w, b, 2, kernels="fused")
    with pytest.warns(RuntimeWarning, match="falling back to reference ops"):
        out = recursive_dwconv(x, w, b, 2, kernels="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recursive_dwconv(x, w, b, 2, kernels="auto")  # warned once only
    torch.testing.assert_close(out, reference.recursive_dwconv(x, w, b, 2), atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------------- CUDA

GPU_SHAPES = SHAPES + [(1, 180, 256, 256, 4, 2), (32, 180, 64, 64, 4, 2), (1, 180, 1100, 1030, 4, 3)]
GPU_TOL = {torch.float32: (2e-5, 1e-4)}  # fp32 against float64: sums of up to 256 products (FMA on the GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_matches_conv_chain(shape, dtype, channels_last):
    B, C, H, W, k, times = shape
    case = f"cuda-{shape}"
    x, w, b = (t.cuda() for t in make_inputs(case, B, C, H, W, k, dtype=torch.float32))
    x = layout(x, channels_last)
    grad_out = torch.randn((B, C, H // k**times, W // k**times), generator=gen(case + "-grad")).cuda()
    if dtype == torch.float32:
        want, want_grads = run(x.double(), w.double(), b.double(), times, "reference", grad_out.double())
        out, grads = run(x, w, b, times, "fused", grad_out)
        atol, rtol = GPU_TOL[dtype]
        torch.testing.assert_close(out.double(), want, atol=atol, rtol=rtol)
        for name in want_grads:  # d(weight), d(bias) sum over up to 300k pixels: scale atol by their size
            scale = want_grads[name].abs().max().item()
            torch.testing.assert_close(grads[name].double(), want_grads[name], atol=atol * max(1.0, scale),
                                       rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")
        return
    assert_low_precision_close(x, w, b, times, grad_out, dtype)


@pytest.mark.gpu
def test_cuda_gradcheck_opcheck_and_determinism():
    x, w, b = (t.cuda().requires_grad_() for t in make_inputs("cuda-gradcheck", 2, 70, 35, 37, 4))
    for times in (1, 2):
        fn = lambda x, w, b, t=times: recursive_dwconv(x, w, b, t, kernels="fused")  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, w, b), fast_mode=True)
    xd, wd, bd = x.detach(), w.detach(), b.detach()
    torch.library.opcheck(torch.ops.rgt.recursive_dwconv_fwd.default, (xd.float(), wd.float(), bd.float(), 2))
    grad_out = torch.randn(2, 70, 2, 2, device="cuda", dtype=torch.float64)
    torch.library.opcheck(torch.ops.rgt.recursive_dwconv_bwd.default, (grad_out, xd, wd, bd, 2))
    for g in grad_out_views((2, 70, 2, 2), "cuda-grad-strides", "cuda"):
        got = torch.ops.rgt.recursive_dwconv_bwd(g, xd, wd, bd, 2)
        want = torch.ops.rgt.recursive_dwconv_bwd(g.contiguous(), xd, wd, bd, 2)
        assert all(torch.allclose(a, e, atol=1e-12, rtol=0) for a, e in zip(got, want, strict=True))
    xb, wb, bb, gb = (t.to(torch.bfloat16) for t in (xd, wd, bd, grad_out))
    xb = xb.contiguous(memory_format=torch.channels_last)
    first = torch.ops.rgt.recursive_dwconv_bwd(gb, xb, wb, bb, 2)
    again = torch.ops.rgt.recursive_dwconv_bwd(gb, xb, wb, bb, 2)
    assert all(torch.equal(a, e) for a, e in zip(first, again, strict=True))


@pytest.mark.gpu
def test_cuda_bad_arguments():
    x, w, b = (t.cuda().float() for t in make_inputs("cuda-bad", 1, 4, 40, 40, 4))
    with pytest.raises(RuntimeError, match="weight is on cpu but x is on cuda"):
        torch.ops.rgt.recursive_dwconv_fwd(x, w.cpu(), b, 2)
    with pytest.raises(RuntimeError, match="kernel sizes up to 4"):
        torch.ops.rgt.recursive_dwconv_fwd(x, torch.randn(4, 1, 5, 5, device="cuda"), b, 2)


@pytest.mark.gpu
def test_cuda_compile_fullgraph():
    x, w, b = (t.cuda().float() for t in make_inputs("cuda-compile", 2, 180, 64, 64, 4))
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()

    def step(x, w, b):
        return recursive_dwconv(x, w, b, 2, kernels="fused").square().mean()

    compiled = torch.compile(step, fullgraph=True)
    torch.testing.assert_close(compiled(x, w, b), step(x, w, b))
    (g_compiled,) = torch.autograd.grad(compiled(x, w, b), x)
    (g_eager,) = torch.autograd.grad(step(x, w, b), x)
    torch.testing.assert_close(g_compiled, g_eager)
