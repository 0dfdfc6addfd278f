// CUDA implementation of rgt::recursive_dwconv_fwd / _bwd: tensors in, argument structs out. The kernels and
// their design notes are in recursive_dwconv_kernels.cuh (torch-free, so tests can compile it with plain nvcc).
//
// `times` levels run as passes of two fused levels (plus one single level when `times` is odd, last, on the
// smallest map); between passes the levels live in channels_last float scratch. The backward recomputes the pass
// inputs with forward passes, runs the backward passes top-down, then one kernel turns the CTAs' partial sums
// into grad_weight and grad_bias. For RGT (times = 2) a forward is one kernel and a backward two.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

#include "cuda/recursive_dwconv_kernels.cuh"
#include "recursive_dwconv.h"

namespace rgt::dwconv {
namespace {

namespace K = rgt::dwconv_cuda;

K::View view_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// One pass of the plan: how many levels it fuses and its output size.
struct Pass {
  int levels;
  int64_t Ho, Wo;
};

std::vector<Pass> plan(const Geometry& g) {
  std::vector<Pass> passes;
  int64_t h = g.H, w = g.W;
  for (int64_t left = g.times; left > 0;) {
    const int levels = left >= 2 ? 2 : 1;
    for (int l = 0; l < levels; ++l) {
      h /= g.k;
      w /= g.k;
    }
    passes.push_back({levels, h, w});
    left -= levels;
  }
  return passes;
}

K::Geometry pass_geometry(const Geometry& g, const Pass& p) {
  TORCH_CHECK(g.B * p.Ho * p.Wo <= std::numeric_limits<int32_t>::max(), "recursive_dwconv (CUDA): ",
              g.B * p.Ho * p.Wo, " output pixels in one pass exceed the grid limit 2^31 - 1; split the batch");
  return {g.B, p.Ho, p.Wo, static_cast<int>(g.C), static_cast<int>(g.k), p.levels};
}

void check_cuda_args(const char* op, const at::Tensor& x, const Geometry& g) {
  TORCH_CHECK(g.k <= K::kMaxK, op, ": the CUDA kernels support kernel sizes up to ", K::kMaxK, " (RGT uses 4), got ",
              g.k, "x", g.k, "; use kernels='reference'");
  TORCH_CHECK(g.C <= static_cast<int64_t>(65535) * K::kLanes, op, ": too many channels for the CUDA grid: ", g.C);
}

// The kernels read channel vectors: a contiguous (NCHW) input costs one conversion to channels_last.
at::Tensor channels_innermost(const at::Tensor& x) {
  return x.stride(1) == 1 ? x : x.contiguous(at::MemoryFormat::ChannelsLast);
}

at::Tensor scratch(const at::Tensor& x, int64_t h, int64_t w, at::ScalarType acc) {
  return at::empty({x.size(0), x.size(1), h, w}, x.options().dtype(acc).memory_format(at::MemoryFormat::ChannelsLast));
}

// The op's parameters as the kernels read them: contiguous (C, 1, k, k) weights and (C,) bias (or none).
template <typename W>
struct Params {
  at::Tensor weight, bias;
  const W* w() const { return weight.const_data_ptr<W>(); }
  const W* b() const { return bias.defined() ? bias.const_data_ptr<W>() : nullptr; }
};

template <typename W>
Params<W> params(const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  return {weight.contiguous(), bias.has_value() ? bias->contiguous() : at::Tensor()};
}

template <typename In, typename Out, typename W, typename A>
void forward_pass(const at::Tensor& src, const at::Tensor& dst, const Params<W>& pw, const Geometry& g,
                  const Pass& p) {
  const K::FwdArgs<In, Out, W, A> a{src.const_data_ptr<In>(), view_of(src), dst.mutable_data_ptr<Out>(),
                                    view_of(dst),             pw.w(),       pw.b(),
                                    pass_geometry(g, p)};
  const bool vec = K::vectorizable(a.src, a.sv, a.g.C, sizeof(In));
  K::launch_fwd(a, vec, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Runs passes [0, upto) from x; returns every pass input (inputs[0] = x) and the output of the last pass run,
// which is `out` when the plan is run to the end.
template <typename S, typename A>
std::vector<at::Tensor> forward_passes(const at::Tensor& x, const Params<S>& pw, const Geometry& g,
                                       const std::vector<Pass>& passes, size_t upto, const at::Tensor& out) {
  const auto acc = c10::CppTypeToScalarType<A>::value;
  std::vector<at::Tensor> inputs{x};
  for (size_t i = 0; i < upto; ++i) {
    const bool first = i == 0, last = i + 1 == passes.size();
    const at::Tensor dst = last ? out : scratch(x, passes[i].Ho, passes[i].Wo, acc);
    if (first && last) forward_pass<S, S, S, A>(inputs.back(), dst, pw, g, passes[i]);
    else if (first) forward_pass<S, A, S, A>(inputs.back(), dst, pw, g, passes[i]);
    else if (last) forward_pass<A, S, S, A>(inputs.back(), dst, pw, g, passes[i]);
    else forward_pass<A, A, S, A>(inputs.back(), dst, pw, g, passes[i]);
    inputs.push_back(dst);
  }
  return inputs;
}

at::Tensor recursive_dwconv_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, int64_t times) {
  const char* op = "recursive_dwconv_fwd";
  const Geometry g = check_args(op, x, weight, bias, times);
  check_cuda_args(op, x, g);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  at::Tensor out = empty_like_layout(x, {g.B, g.C, g.Ho, g.Wo});
  if (out.numel() == 0) return out;
  const at::Tensor xc = channels_innermost(x);
  const std::vector<Pass> passes = plan(g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "recursive_dwconv_fwd_cuda", [&] {
    using A = typename K::AccOf<scalar_t>::type;
    forward_passes<scalar_t, A>(xc, params<scalar_t>(weight, bias), g, passes, passes.size(), out);
  });
  return out;
}

// partial: this pass's rows of the partial-sum buffer, one per CTA (per channel tile).
template <typename In, typename Gout, typename W, typename A>
void backward_pass(const at::Tensor& src, const at::Tensor& gout, const at::Tensor& gin, const at::Tensor& partial,
                   const Params<W>& pw, const Geometry& g, const Pass& p) {
  const K::BwdArgs<In, Gout, W, A> a{src.const_data_ptr<In>(), view_of(src), gout.const_data_ptr<Gout>(),
                                     view_of(gout),            gin.mutable_data_ptr<In>(), view_of(gin),
                                     pw.w(),                   pw.b(),       partial.mutable_data_ptr<A>(),
                                     pass_geometry(g, p)};
  const bool vec = K::vectorizable(a.src, a.sv, a.g.C, sizeof(In)) && K::vectorizable(a.gin, a.giv, a.g.C, sizeof(In));
  K::launch_bwd(a, static_cast<unsigned>(partial.size(0)), vec, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// CTAs per channel tile of a backward pass: about two per SM in all, so each writes one row of partial sums
// and loops over several output pixels.
int64_t backward_ctas(const Geometry& g, int64_t pixels) {
  const int64_t tiles = (g.C + K::kLanes - 1) / K::kLanes;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return std::max<int64_t>(1, std::min(pixels, (2 * sms + tiles - 1) / tiles));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> recursive_dwconv_bwd_cuda(const at::Tensor& grad_out,
                                                                         const at::Tensor& x,
                                                                         const at::Tensor& weight,
                                                                         const std::optional<at::Tensor>& bias,
                                                                         int64_t times) {
  const char* op = "recursive_dwconv_bwd";
  const Geometry g = check_args(op, x, weight, bias, times);
  check_grad_out(op, grad_out, x, g);
  check_cuda_args(op, x, g);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const std::vector<Pass> passes = plan(g);
  at::Tensor grad_x = empty_like_layout(x, x.sizes());
  at::Tensor grad_w = at::empty({g.C, 1, g.k, g.k}, weight.options());
  at::Tensor grad_b = at::empty({g.C}, x.options());
  // One row of partial sums per CTA of every pass: pass i owns rows [first_row[i], first_row[i + 1]).
  std::vector<int64_t> first_row{0};
  for (const Pass& p : passes) first_row.push_back(first_row.back() + backward_ctas(g, g.B * p.Ho * p.Wo));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "recursive_dwconv_bwd_cuda", [&] {
    using S = scalar_t;
    using A = typename K::AccOf<scalar_t>::type;
    const auto acc = c10::CppTypeToScalarType<A>::value;
    if (x.numel() == 0) {
      grad_x.zero_();
      grad_w.zero_();
      grad_b.zero_();
      return;
    }
    const Params<S> pw = params<S>(weight, bias);
    const std::vector<at::Tensor> inputs =
        forward_passes<S, A>(channels_innermost(x), pw, g, passes, passes.size() - 1, at::Tensor());
    const at::Tensor partial = at::empty({first_row.back(), g.kk + 1, g.C}, x.options().dtype(acc));
    at::Tensor gout = grad_out;
    for (size_t i = passes.size(); i-- > 0;) {
      const Pass& p = passes[i];
      const bool first = i == 0, last = i + 1 == passes.size();
      const at::Tensor& src = inputs[i];
      at::Tensor gin = first ? grad_x : scratch(x, src.size(2), src.size(3), acc);
      const int64_t span = p.levels == 2 ? g.kk : g.k;  // input pixels per output pixel, per side
      zero_uncovered(gin, span * p.Ho, span * p.Wo);
      const at::Tensor rows = partial.narrow(0, first_row[i], first_row[i + 1] - first_row[i]);
      if (first && last) backward_pass<S, S, S, A>(src, gout, gin, rows, pw, g, p);
      else if (first) backward_pass<S, A, S, A>(src, gout, gin, rows, pw, g, p);
      else if (last) backward_pass<A, S, S, A>(src, gout, gin, rows, pw, g, p);
      else backward_pass<A, A, S, A>(src, gout, gin, rows, pw, g, p);
      gout = gin;
    }
    const K::FinalizeArgs<S, A> fa{partial.const_data_ptr<A>(), partial.size(0), static_cast<int>(g.C),
                                   static_cast<int>(g.kk), grad_w.mutable_data_ptr<S>(), grad_b.mutable_data_ptr<S>()};
    K::launch_finalize(fa, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_x, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(rgt, CUDA, m) {
  m.impl("recursive_dwconv_fwd", &recursive_dwconv_fwd_cuda);
  m.impl("recursive_dwconv_bwd", &recursive_dwconv_bwd_cuda);
}

}  // namespace rgt::dwconv
