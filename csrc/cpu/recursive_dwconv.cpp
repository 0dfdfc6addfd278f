// CPU kernels of rgt::recursive_dwconv_fwd / _bwd: a depthwise k x k, stride-k convolution (no padding, shared
// weights) applied `times` times, with PyTorch's floor semantics at every level.
//
// Work split: one task per (image, output row, range of output columns), all channels. The outputs of a task
// depend only on its input strip (K = k^times rows, K columns per output), so the task computes every level in
// one pass, keeping the inner levels in float (double for float64) scratch laid out (rows, cols, channels). With
// channels_last input every read is a contiguous run of whole pixels and the channel loop vectorises. The
// backward recomputes the inner levels instead of saving them, then walks the levels top-down. Each task sums
// its d(weight), d(bias) into its own row of a partial buffer; the rows are then added in a fixed order, so the
// result does not depend on the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "recursive_dwconv.h"

namespace rgt::dwconv {
namespace {

// Input elements per task, about: large enough to amortise the scratch set-up, small enough for many tasks.
constexpr int64_t kTaskElems = int64_t(1) << 16;

// A (rows, cols, channels) strided view of one image of one level.
template <typename T>
struct Plane {
  T* p;
  int64_t sh, sw, sc;
  T* px(int64_t h, int64_t w) const { return p + h * sh + w * sw; }
  operator Plane<const T>() const { return {p, sh, sw, sc}; }
};

template <typename T>
Plane<T> scratch_plane(std::vector<T>& buf, int64_t cols, int64_t C) {
  return {buf.data(), cols * C, C, 1};
}

// acc[i] = b[c + i] + sum_{p,q} w[p*k + q][c + i] * src(h0 + p, w0 + q, c + i) for i < n (n = N when N > 0):
// with a compile-time N the accumulators stay in vector registers across the k*k terms.
template <int64_t N, typename S, typename A>
inline void patch_sum(const Plane<const S>& src, int64_t h0, int64_t w0, int64_t k, const A* w, const A* b,
                      int64_t C, int64_t c, int64_t n, A* __restrict__ acc) {
  const int64_t m = N > 0 ? N : n;
  for (int64_t i = 0; i < m; ++i) acc[i] = b[c + i];
  for (int64_t p = 0; p < k; ++p) {
    for (int64_t q = 0; q < k; ++q) {
      const S* __restrict__ s = src.px(h0 + p, w0 + q) + c;
      const A* __restrict__ wr = w + (p * k + q) * C + c;
      for (int64_t i = 0; i < m; ++i) acc[i] += wr[i] * static_cast<A>(s[i]);
    }
  }
}

// dst(r, j, c) = b[c] + sum_{p,q} w[p*k + q][c] * src(k*r + p, k*j + q, c) for r < rows, j < cols, c < C.
// Both loop orders add the terms in the same order, so contiguous and channels_last inputs agree exactly.
template <typename S, typename D, typename A>
void level_fwd(Plane<const S> src, Plane<D> dst, int64_t rows, int64_t cols, int64_t C, const A* w, const A* b,
               int64_t k) {
  if (src.sc == 1 && dst.sc == 1) {
    constexpr int64_t kBlock = 16;  // channels per register block (4 SSE / 2 AVX registers of float)
    A acc[kBlock];
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < cols; ++j) {
        D* d = dst.px(r, j);
        int64_t c = 0;
        for (; c + kBlock <= C; c += kBlock) {
          patch_sum<kBlock>(src, k * r, k * j, k, w, b, C, c, kBlock, acc);
          for (int64_t i = 0; i < kBlock; ++i) d[c + i] = static_cast<D>(acc[i]);
        }
        patch_sum<0>(src, k * r, k * j, k, w, b, C, c, C - c, acc);
        for (int64_t i = 0; c + i < C; ++i) d[c + i] = static_cast<D>(acc[i]);
      }
    }
    return;
  }
  for (int64_t c = 0; c < C; ++c) {  // channel planes (contiguous NCHW input): the columns are contiguous
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < cols; ++j) {
        A acc = b[c];
        for (int64_t p = 0; p < k; ++p) {
          const S* s = src.px(k * r + p, k * j) + c * src.sc;
          for (int64_t q = 0; q < k; ++q) acc += w[(p * k + q) * C + c] * static_cast<A>(s[q * src.sw]);
        }
        dst.px(r, j)[c * dst.sc] = static_cast<D>(acc);
      }
    }
  }
}

// Backward of one level, given g = dL/d(dst) over rows x cols:
//   dsrc(k*r + p, k*j + q, c) = w[p*k + q][c] * g(r, j, c),  dw[p*k + q][c] += g * src(...),  db[c] += g,
// with db = row k*k of dw.
template <typename S, typename G, typename D, typename A>
void level_bwd(Plane<const S> src, Plane<const G> g, Plane<D> dsrc, int64_t rows, int64_t cols, int64_t C,
               const A* w, int64_t k, A* dw) {
  A* db = dw + k * k * C;
  if (src.sc == 1 && dsrc.sc == 1) {
    std::vector<A> gv_buf(C);
    A* __restrict__ gv = gv_buf.data();
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < cols; ++j) {
        const G* gp = g.px(r, j);
        for (int64_t c = 0; c < C; ++c) {
          gv[c] = static_cast<A>(gp[c * g.sc]);
          db[c] += gv[c];
        }
        for (int64_t p = 0; p < k; ++p) {
          for (int64_t q = 0; q < k; ++q) {
            const S* __restrict__ s = src.px(k * r + p, k * j + q);
            D* __restrict__ d = dsrc.px(k * r + p, k * j + q);
            const A* __restrict__ wr = w + (p * k + q) * C;
            A* __restrict__ dwr = dw + (p * k + q) * C;
            for (int64_t c = 0; c < C; ++c) {
              dwr[c] += gv[c] * static_cast<A>(s[c]);
              d[c] = static_cast<D>(wr[c] * gv[c]);
            }
          }
        }
      }
    }
    return;
  }
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < cols; ++j) {
        const A gc = static_cast<A>(g.px(r, j)[c * g.sc]);
        db[c] += gc;
        for (int64_t p = 0; p < k; ++p) {
          for (int64_t q = 0; q < k; ++q) {
            const int64_t e = p * k + q;
            dw[e * C + c] += gc * static_cast<A>(src.px(k * r + p, k * j + q)[c * src.sc]);
            dsrc.px(k * r + p, k * j + q)[c * dsrc.sc] = static_cast<D>(w[e * C + c] * gc);
          }
        }
      }
    }
  }
}

// The task split: `width` output columns per task, `per_row` tasks per output row. It depends on the geometry
// only (never on the thread count), which keeps the gradient sums reproducible.
struct Split {
  int64_t width, per_row, count;
  explicit Split(const Geometry& g) {
    width = std::clamp<int64_t>(kTaskElems / (g.K * g.K * g.C), 1, g.Wo);
    per_row = (g.Wo + width - 1) / width;
    count = g.B * g.Ho * per_row;
  }
};

// Task t: image b, output row i, output columns [j0, j0 + nj).
struct Task {
  int64_t b, i, j0, nj;
  Task(const Geometry& g, const Split& s, int64_t t) {
    const int64_t row = t / s.per_row;
    b = row / g.Ho;
    i = row % g.Ho;
    j0 = (t % s.per_row) * s.width;
    nj = std::min(s.width, g.Wo - j0);
  }
};

// The input strip (or grad_x strip) behind a task, and its piece of an output row.
template <typename T>
Plane<T> input_strip(T* base, const at::Tensor& t, const Geometry& g, const Task& task) {
  return {base + task.b * t.stride(0) + g.K * task.i * t.stride(2) + g.K * task.j0 * t.stride(3), t.stride(2),
          t.stride(3), t.stride(1)};
}

template <typename T>
Plane<T> output_row(T* base, const at::Tensor& t, const Task& task) {
  return {base + task.b * t.stride(0) + task.i * t.stride(2) + task.j0 * t.stride(3), t.stride(2), t.stride(3),
          t.stride(1)};
}

// Levels 1 .. times-1 of a task's strip: level l has k^(times-l) rows and nj * k^(times-l) columns.
template <typename S, typename A>
std::vector<std::vector<A>> inner_levels(Plane<const S> x, const Geometry& g, int64_t nj, const A* w, const A* b) {
  std::vector<std::vector<A>> ys(g.times);  // ys[l] holds level l; ys[0] is unused (level 0 is x)
  int64_t rows = g.K, cols = g.K * nj;
  for (int64_t l = 1; l < g.times; ++l) {
    rows /= g.k;
    cols /= g.k;
    ys[l].resize(rows * cols * g.C);
    if (l == 1) {
      level_fwd<S, A, A>(x, scratch_plane(ys[1], cols, g.C), rows, cols, g.C, w, b, g.k);
    } else {
      level_fwd<A, A, A>(scratch_plane(ys[l - 1], cols * g.k, g.C), scratch_plane(ys[l], cols, g.C), rows, cols,
                         g.C, w, b, g.k);
    }
  }
  return ys;
}

// Weights as [k*k][C] and bias as [C] in the accumulation type (zeros when there is no bias).
std::tuple<at::Tensor, at::Tensor> acc_params(const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                              const Geometry& g, at::ScalarType acc) {
  at::Tensor w = weight.reshape({g.C, g.kk}).to(acc).t().contiguous();
  at::Tensor b = bias.has_value() ? bias->to(acc).contiguous() : at::zeros({g.C}, weight.options().dtype(acc));
  return {w, b};
}

at::Tensor recursive_dwconv_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, int64_t times) {
  const Geometry g = check_args("recursive_dwconv_fwd", x, weight, bias, times);
  at::Tensor out = empty_like_layout(x, {g.B, g.C, g.Ho, g.Wo});
  if (out.numel() == 0) return out;
  const Split split(g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "recursive_dwconv_fwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const auto [wt, bt] = acc_params(weight, bias, g, c10::CppTypeToScalarType<A>::value);
    const A* w = wt.data_ptr<A>();
    const A* b = bt.data_ptr<A>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, split.count, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const Task task(g, split, t);
        const Plane<const scalar_t> xs = input_strip(xp, x, g, task);
        const Plane<scalar_t> o = output_row(op, out, task);
        auto ys = inner_levels<scalar_t, A>(xs, g, task.nj, w, b);
        if (g.times == 1) {
          level_fwd<scalar_t, scalar_t, A>(xs, o, 1, task.nj, g.C, w, b, g.k);
        } else {
          level_fwd<A, scalar_t, A>(scratch_plane(ys[g.times - 1], task.nj * g.k, g.C), o, 1, task.nj, g.C, w, b,
                                    g.k);
        }
      }
    });
  });
  return out;
}

// Backward of one task. part: this task's [k*k + 1][C] partial sums of d(weight) and d(bias).
template <typename S, typename A>
void task_bwd(const Geometry& g, int64_t nj, Plane<const S> xs, Plane<const S> go, Plane<S> gx, const A* w,
              const A* b, A* part) {
  auto ys = inner_levels<S, A>(xs, g, nj, w, b);
  std::vector<std::vector<A>> gs(g.times);  // gs[l] = dL/d(level l) for 1 <= l < times
  int64_t rows = 1, cols = nj;
  for (int64_t l = g.times; l >= 1; --l) {
    const int64_t cols_in = cols * g.k;
    if (l > 1) gs[l - 1].resize(rows * g.k * cols_in * g.C);
    // The four (source, grad, destination) type combinations: levels above 1 read and write scratch.
    if (l == 1 && l == g.times) {
      level_bwd<S, S, S, A>(xs, go, gx, rows, cols, g.C, w, g.k, part);
    } else if (l == 1) {
      level_bwd<S, A, S, A>(xs, scratch_plane(gs[1], cols, g.C), gx, rows, cols, g.C, w, g.k, part);
    } else {
      const Plane<const A> src = scratch_plane(ys[l - 1], cols_in, g.C);
      const Plane<A> dst = scratch_plane(gs[l - 1], cols_in, g.C);
      if (l == g.times) {
        level_bwd<A, S, A, A>(src, go, dst, rows, cols, g.C, w, g.k, part);
      } else {
        level_bwd<A, A, A, A>(src, scratch_plane(gs[l], cols, g.C), dst, rows, cols, g.C, w, g.k, part);
      }
    }
    rows *= g.k;
    cols = cols_in;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> recursive_dwconv_bwd_cpu(const at::Tensor& grad_out,
                                                                        const at::Tensor& x,
                                                                        const at::Tensor& weight,
                                                                        const std::optional<at::Tensor>& bias,
                                                                        int64_t times) {
  const Geometry g = check_args("recursive_dwconv_bwd", x, weight, bias, times);
  check_grad_out("recursive_dwconv_bwd", grad_out, x, g);
  at::Tensor grad_x = empty_like_layout(x, x.sizes());
  zero_uncovered(grad_x, g.K * g.Ho, g.K * g.Wo);
  const Split split(g);
  const int64_t rows = g.kk + 1;  // partial rows per task: d(weight) as [k*k][C], then d(bias)
  at::Tensor total;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "recursive_dwconv_bwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<A>::value;
    const auto [wt, bt] = acc_params(weight, bias, g, acc);
    at::Tensor part = at::zeros({g.B == 0 ? 0 : split.count, rows, g.C}, x.options().dtype(acc));
    const A* w = wt.data_ptr<A>();
    const A* b = bt.data_ptr<A>();
    A* pp = part.data_ptr<A>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gop = grad_out.const_data_ptr<scalar_t>();
    scalar_t* gxp = grad_x.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, part.size(0), 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const Task task(g, split, t);
        task_bwd<scalar_t, A>(g, task.nj, input_strip(xp, x, g, task), output_row(gop, grad_out, task),
                              input_strip(gxp, grad_x, g, task), w, b, pp + t * rows * g.C);
      }
    });
    // Add the task rows in task order for every entry (the same result whatever the number of threads),
    // reading each row's slice of entries contiguously.
    total = at::zeros({rows, g.C}, part.options());
    A* tp = total.data_ptr<A>();
    const int64_t ntask = part.size(0);
    at::parallel_for(0, rows * g.C, 512, [&](int64_t begin, int64_t end) {
      for (int64_t t = 0; t < ntask; ++t) {
        const A* row = pp + t * rows * g.C;
        for (int64_t e = begin; e < end; ++e) tp[e] += row[e];
      }
    });
  });
  return {grad_x, total.narrow(0, 0, g.kk).t().reshape({g.C, 1, g.k, g.k}).to(x.scalar_type()).contiguous(),
          total.select(0, g.kk).to(x.scalar_type(), /*non_blocking=*/false, /*copy=*/true)};
}

}  // namespace

TORCH_LIBRARY_IMPL(rgt, CPU, m) {
  m.impl("recursive_dwconv_fwd", &recursive_dwconv_fwd_cpu);
  m.impl("recursive_dwconv_bwd", &recursive_dwconv_bwd_cpu);
}

}  // namespace rgt::dwconv
