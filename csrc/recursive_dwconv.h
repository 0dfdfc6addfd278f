// Argument checks and output allocation shared by the CPU and CUDA kernels of rgt::recursive_dwconv_{fwd,bwd}:
// one depthwise k x k convolution with stride k (no padding) applied `times` times with the same weights.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

namespace rgt::dwconv {

struct Geometry {
  int64_t B, C, H, W;  // input
  int64_t k, kk;       // kernel side (= stride) and k * k
  int64_t times;
  int64_t Ho, Wo;  // output: floor(H / k^times), floor(W / k^times)
  int64_t K;       // k^times: side of the input patch behind one output pixel
};

inline bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline Geometry check_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, int64_t times) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be (B, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(supported_dtype(x.scalar_type()), op, ": x must be float32, float64, float16 or bfloat16, got ",
              x.scalar_type());
  const int64_t C = x.size(1);
  TORCH_CHECK(C >= 1, op, ": x has no channels (shape ", x.sizes(), ")");
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1 && weight.size(2) == weight.size(3) &&
                  weight.size(2) >= 1,
              op, ": weight must be (C, 1, k, k) = (", C, ", 1, k, k) for x of shape ", x.sizes(), ", got ",
              weight.sizes());
  TORCH_CHECK(weight.device() == x.device(), op, ": weight is on ", weight.device(), " but x is on ", x.device());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight is ", weight.scalar_type(), " but x is ",
              x.scalar_type());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == C, op, ": bias must be (C,) = (", C, ",), got ", bias->sizes());
    TORCH_CHECK(bias->device() == x.device(), op, ": bias is on ", bias->device(), " but x is on ", x.device());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias is ", bias->scalar_type(), " but x is ",
                x.scalar_type());
  }
  TORCH_CHECK(times >= 1, op, ": times must be >= 1, got ", times);
  Geometry g{x.size(0), C, x.size(2), x.size(3), weight.size(2), weight.size(2) * weight.size(2), times, 0, 0, 1};
  int64_t h = g.H, w = g.W;
  for (int64_t level = 1; level <= times; ++level) {
    TORCH_CHECK(h >= g.k && w >= g.k, op, ": level ", level, " of ", times,
                " would fall below the kernel size: its input is ", h, "x", w, " but the kernel is ", g.k, "x", g.k,
                " (x is ", g.H, "x", g.W, ")");
    h /= g.k;
    w /= g.k;
    g.K *= g.k;
  }
  g.Ho = h;
  g.Wo = w;
  return g;
}

inline void check_grad_out(const char* op, const at::Tensor& grad_out, const at::Tensor& x, const Geometry& g) {
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == g.B && grad_out.size(1) == g.C &&
                  grad_out.size(2) == g.Ho && grad_out.size(3) == g.Wo,
              op, ": grad_out must be (", g.B, ", ", g.C, ", ", g.Ho, ", ", g.Wo, "), got ", grad_out.sizes());
  TORCH_CHECK(grad_out.device() == x.device(), op, ": grad_out is on ", grad_out.device(), " but x is on ",
              x.device());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), op, ": grad_out is ", grad_out.scalar_type(),
              " but x is ", x.scalar_type());
}

// Outputs and grad_x follow x's layout: channels_last when x's channels are contiguous (the model's token view
// (B, H*W, C) -> (B, C, H, W)), contiguous otherwise. rgt/ops/dwconv.py's fakes apply the same rule.
inline at::MemoryFormat layout_of(const at::Tensor& x) {
  return x.size(1) > 1 && x.stride(1) == 1 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

inline at::Tensor empty_like_layout(const at::Tensor& x, at::IntArrayRef sizes) {
  return at::empty(sizes, x.options().memory_format(layout_of(x)));
}

// Leftover rows/columns of x (beyond K*Ho, K*Wo) never reach the output: their gradient is zero. The kernels
// write only the covered region, so this zeroes the rest.
inline void zero_uncovered(at::Tensor& grad, int64_t covered_h, int64_t covered_w) {
  if (grad.size(2) > covered_h) grad.narrow(2, covered_h, grad.size(2) - covered_h).zero_();
  if (grad.size(3) > covered_w) grad.narrow(3, covered_w, grad.size(3) - covered_w).zero_();
}

}  // namespace rgt::dwconv
