"""The CUDA kernels of csrc/cuda/recursive_dwconv_kernels.cuh without a GPU.

1. They compile with plain nvcc for sm_90 (every dtype and pass type the launcher uses), without spills.
2. They compute the right thing: the header also compiles as C++ for a CPU emulation of threads, blocks and
   barriers (tests/cuda_emu), and the passes, chained as csrc/cuda/recursive_dwconv.cu chains them, match
   F.conv2d. Only the launch itself (<<<>>>, streams) and real GPU timing/memory effects stay untested here.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess

import pytest
import torch
from _utils import REPO, gen

from rgt.ops import reference

CSRC = REPO / "csrc"
EMU = REPO / "tests" / "cuda_emu"
NVCC = shutil.which("nvcc")
CXX = shutil.which("g++")

INSTANTIATE = r"""
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/recursive_dwconv_kernels.cuh"

namespace k = rgt::dwconv_cuda;

// Every (pass input, pass output or upstream grad) type pair recursive_dwconv.cu launches, for one dtype.
template <typename S>
void instantiate(cudaStream_t s) {
  using A = typename k::AccOf<S>::type;
  k::launch_fwd(k::FwdArgs<S, S, S, A>{}, true, s);
  k::launch_fwd(k::FwdArgs<S, A, S, A>{}, true, s);
  k::launch_fwd(k::FwdArgs<A, S, S, A>{}, false, s);
  k::launch_fwd(k::FwdArgs<A, A, S, A>{}, false, s);
  k::launch_bwd(k::BwdArgs<S, S, S, A>{}, 1, true, s);
  k::launch_bwd(k::BwdArgs<S, A, S, A>{}, 1, true, s);
  k::launch_bwd(k::BwdArgs<A, S, S, A>{}, 1, false, s);
  k::launch_bwd(k::BwdArgs<A, A, S, A>{}, 1, false, s);
  k::launch_finalize(k::FinalizeArgs<S, A>{}, s);
}
template void instantiate<__nv_bfloat16>(cudaStream_t);
template void instantiate<__half>(cudaStream_t);
template void instantiate<float>(cudaStream_t);
template void instantiate<double>(cudaStream_t);
"""


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_kernels_compile_with_nvcc(tmp_path):
    src = tmp_path / "instantiate.cu"
    src.write_text(INSTANTIATE)
    cmd = [NVCC, "-c", str(src), "-o", str(tmp_path / "instantiate.o"), f"-I{CSRC}", "-std=c++17", "-O3",
           "--use_fast_math", "-arch=sm_90", "-Xptxas", "-v"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    # 60 kernels: per 16-bit dtype 12 forward + 12 backward (V = 1, 2 where the input is 16-bit) + finalize;
    # per 32/64-bit dtype 2 + 2 + 1.
    assert len(re.findall(r"Compiling entry function", res.stderr)) == 60, res.stderr
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", res.stderr)]
    assert len(spills) == 120 and not any(spills), "register spills:\n" + res.stderr


# ------------------------------------------------------------------------------------------- CPU emulation

CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2}


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    if CXX is None:
        pytest.skip("g++ not found")
    lib = tmp_path_factory.mktemp("emu") / "dwconv_emu.so"
    cmd = [CXX, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", f"-I{CSRC}", f"-I{EMU}",
           str(EMU / "dwconv_emu.cpp"), "-o", str(lib)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    return ctypes.CDLL(str(lib))


def _i64(*values):
    return (ctypes.c_int64 * len(values))(*values)


def _ptr(t: torch.Tensor | None):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else None


def _view(t: torch.Tensor):
    return _i64(*t.stride())


def _vec(lib, *ts):
    return int(all(lib.emu_vectorizable(_ptr(t), _view(t), t.shape[1], t.element_size()) for t in ts))


def _plan(times: int) -> list[int]:
    return [2] * (times // 2) + [1] * (times % 2)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scratch(like, h, w, acc):
    out = torch.empty(like.shape[0], like.shape[1], h, w, dtype=acc)
    return out.contiguous(memory_format=torch.channels_last)


def _layout(x):
    return torch.channels_last if x.shape[1] > 1 and x.stride(1) == 1 else torch.contiguous_format


def _forward_passes(lib, x, w, b, passes, upto, out):
    """recursive_dwconv.cu's forward_passes: every pass input, chaining float scratch between passes."""
    k = w.shape[-1]
    inputs = [x if x.stride(1) == 1 else x.contiguous(memory_format=torch.channels_last)]
    for i in range(upto):
        src, L = inputs[-1], passes[i]
        Ho, Wo = src.shape[2] // k**L, src.shape[3] // k**L
        dst = out if i + 1 == len(passes) else _scratch(src, Ho, Wo, _acc(x.dtype))
        geom = _i64(src.shape[0], Ho, Wo, src.shape[1], k, L)
        rc = lib.emu_fwd(CODES[src.dtype], CODES[dst.dtype], CODES[w.dtype], _ptr(src), _view(src), _ptr(dst),
                         _view(dst), _ptr(w), _ptr(b), geom, _vec(lib, src))
        assert rc == 0
        inputs.append(dst)
    return inputs


def emu_fwd(lib, x, w, b, times):
    k = w.shape[-1]
    out = torch.empty(x.shape[0], x.shape[1], x.shape[2] // k**times, x.shape[3] // k**times, dtype=x.dtype)
    out = out.contiguous(memory_format=_layout(x))
    passes = _plan(times)
    _forward_passes(lib, x, w, b, passes, len(passes), out)
    return out


def emu_bwd(lib, grad_out, x, w, b, times, ctas):
    """recursive_dwconv.cu's backward with at most `ctas` CTAs per channel tile (so CTAs loop over pixels)."""
    k, C, acc = w.shape[-1], x.shape[1], _acc(x.dtype)
    passes = _plan(times)
    inputs = _forward_passes(lib, x, w, b, passes, len(passes) - 1, None)
    nan = float("nan")  # the kernels must write every element of their outputs
    grad_x = torch.full_like(x, nan, memory_format=_layout(x))
    sizes = [min(ctas, x.shape[0] * (src.shape[2] // k**L) * (src.shape[3] // k**L))
             for src, L in zip(inputs, passes, strict=False)]
    first_row = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    partial = torch.full((first_row[-1], k * k + 1, C), nan, dtype=acc)
    gout = grad_out
    for i in reversed(range(len(passes))):
        src, L = inputs[i], passes[i]
        Ho, Wo = src.shape[2] // k**L, src.shape[3] // k**L
        gin = grad_x if i == 0 else _scratch(src, src.shape[2], src.shape[3], acc)
        gin[:, :, k**L * Ho:] = 0  # zero_uncovered
        gin[:, :, :, k**L * Wo:] = 0
        rows = partial[first_row[i]:first_row[i + 1]]
        geom = _i64(x.shape[0], Ho, Wo, C, k, L)
        types = (CODES[src.dtype], CODES[gout.dtype], CODES[w.dtype])
        rc = lib.emu_bwd(*types, _ptr(src), _view(src), _ptr(gout), _view(gout), _ptr(gin), _view(gin),
                         _ptr(w), _ptr(b), _ptr(rows), geom, sizes[i], _vec(lib, src, gin))
        assert rc == 0
        gout = gin
    grad_w, grad_b = torch.full_like(w, nan), torch.full((C,), nan, dtype=w.dtype)
    rc = lib.emu_finalize(CODES[w.dtype], _ptr(partial), ctypes.c_int64(partial.shape[0]), C, k * k,
                          _ptr(grad_w), _ptr(grad_b))
    assert rc == 0
    return grad_x, grad_w, grad_b


# (B, C, H, W, k, times, dtype, channels_last, ctas, bias): both channel-vector widths, odd C, one- and
# two-level passes, every chain of pass types (times = 5: input -> scratch -> scratch -> output), CTAs looping
# over pixels, no bias.
EMU_CASES = [
    (2, 70, 37, 35, 4, 2, torch.bfloat16, True, 3, True),  # V = 2, two channel tiles, 8 pixels on 3 CTAs
    (1, 13, 70, 90, 4, 3, torch.float32, False, 2, True),  # NCHW input, passes 2 + 1, last level 1 pixel
    (2, 5, 29, 31, 3, 2, torch.float64, True, 4, False),  # k = 3, no bias
    (3, 7, 9, 11, 2, 1, torch.bfloat16, True, 5, True),  # one one-level pass, odd C (V = 1 for bf16)
    (1, 3, 70, 66, 2, 5, torch.float32, True, 3, True),  # passes 2 + 2 + 1
]


@pytest.mark.parametrize("case", EMU_CASES, ids=lambda c: "x".join(map(str, c[:6])) + f"-{str(c[6])[6:]}")
def test_emulated_kernels_match_conv_chain(emu, case):
    B, C, H, W, k, times, dtype, channels_last, ctas, bias = case
    g = gen(f"emu-{case}")
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    w = torch.randn(C, 1, k, k, generator=g, dtype=torch.float64) / k
    b = torch.randn(C, generator=g, dtype=torch.float64) if bias else torch.zeros(C, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    xs, ws, bs = (t.to(dtype) for t in (x, w, b))
    bs = bs if bias else None  # the kernels take no bias as a null pointer; d(bias) is still computed
    x64, w64, b64 = (t.to(dtype).double().requires_grad_() for t in (x, w, b))  # the values the kernels see
    want = reference.recursive_dwconv(x64, w64, b64, times)
    grad_out = torch.randn(want.shape, generator=g, dtype=torch.float64).to(dtype)
    want_grads = torch.autograd.grad(want, (x64, w64, b64), grad_out.double())

    out = emu_fwd(emu, xs, ws, bs, times)
    grads = emu_bwd(emu, grad_out, xs, ws, bs, times, ctas)
    assert out.is_contiguous(memory_format=_layout(x)) and grads[0].is_contiguous(memory_format=_layout(x))
    # Float accumulation and one rounding to `dtype` at the end: float64 tight, float32 ~1e-6, bf16 2^-8.
    rtol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 8e-3}[dtype]
    names = ["out", "x", "weight", "bias"]
    for name, got, exp in zip(names, (out, *grads), (want, *want_grads), strict=True):
        scale = exp.abs().max().item()
        torch.testing.assert_close(got.double(), exp, atol=rtol * scale, rtol=rtol,
                                   msg=lambda m, n=name: f"{n}: {m}")
