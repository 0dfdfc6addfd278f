// CPU kernels of rgt::recursive_dwconv_fwd / _bwd: a depthwise k x k, stride-k convolution (no padding, shared
// weights) applied `times` times, with PyTorch's floor semantics at every level.
//
// Work split: one task per (image, output row, chunk of kChunk channels). Output row i of the last level depends
// only on input rows [K*i, K*i + K) (K = k^times), so a task computes every level for its strip in one pass,
// keeping the intermediate levels in float (double for float64) scratch laid out (rows, cols, channels). The
// backward recomputes those levels instead of saving them, then walks the levels top-down. Grad weight and bias
// are summed per output row into a partial buffer and reduced in a fixed order: deterministic for any thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "recursive_dwconv.h"

namespace rgt::dwconv {
namespace {

// Channels per task. With channels contiguous (channels_last input, and all scratch) they are the inner loop,
// which the compiler vectorises; 64 keeps the accumulators of one pixel in a few cache lines.
constexpr int64_t kChunk = 64;

// A (rows, cols, channels) strided view of one image of one level, offset to the task's first channel.
template <typename T>
struct Plane {
  T* p;
  int64_t sh, sw, sc;
  T* px(int64_t h, int64_t w) const { return p + h * sh + w * sw; }
  operator Plane<const T>() const { return {p, sh, sw, sc}; }
};

template <typename T>
Plane<T> scratch_plane(std::vector<T>& buf, int64_t cols, int64_t nc) {
  return {buf.data(), cols * nc, nc, 1};
}

// dst(r, j, c) = b[c] + sum_{p,q} w[p*k + q][c] * src(k*r + p, k*j + q, c) for r < rows, j < cols, c < nc.
// Both loop orders add the terms in the same order, so contiguous and channels_last inputs agree exactly.
template <typename S, typename D, typename A>
void level_fwd(Plane<const S> src, Plane<D> dst, int64_t rows, int64_t cols, int64_t nc, const A* w, int64_t ldw,
               const A* b, int64_t k) {
  if (src.sc == 1 && dst.sc == 1) {
    A acc[kChunk];
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < cols; ++j) {
        std::copy(b, b + nc, acc);
        for (int64_t p = 0; p < k; ++p) {
          for (int64_t q = 0; q < k; ++q) {
            const S* s = src.px(k * r + p, k * j + q);
            const A* wr = w + (p * k + q) * ldw;
            for (int64_t c = 0; c < nc; ++c) acc[c] += wr[c] * static_cast<A>(s[c]);
          }
        }
        D* d = dst.px(r, j);
        for (int64_t c = 0; c < nc; ++c) d[c] = static_cast<D>(acc[c]);
      }
    }
    return;
  }
  for (int64_t c = 0; c < nc; ++c) {  // channel planes (contiguous NCHW input): the columns are contiguous
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < cols; ++j) {
        A acc = b[c];
        for (int64_t p = 0; p < k; ++p) {
          const S* s = src.px(k * r + p, k * j) + c * src.sc;
          for (int64_t q = 0; q < k; ++q) acc += w[(p * k + q) * ldw + c] * static_cast<A>(s[q * src.sw]);
        }
        dst.px(r, j)[c * dst.sc] = static_cast<D>(acc);
      }
    }
  }
}

// Backward of one level, given g = dL/d(dst) over rows x cols:
//   dsrc(k*r + p, k*j + q, c) = w[p*k + q][c] * g(r, j, c),  dw[p*k + q][c] += g * src(...),  db[c] += g.
// dw has rows of length ldd; db follows it as row kk.
template <typename S, typename G, typename D, typename A>
void level_bwd(Plane<const S> src, Plane<const G> g, Plane<D> dsrc, int64_t rows, int64_t cols, int64_t nc,
               const A* w, int64_t ldw, int64_t k, A* dw, int64_t ldd) {
  A* db = dw + k * k * ldd;
  if (src.sc == 1 && dsrc.sc == 1) {
    A gv[kChunk];
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < cols; ++j) {
        const G* gp = g.px(r, j);
        for (int64_t c = 0; c < nc; ++c) {
          gv[c] = static_cast<A>(gp[c * g.sc]);
          db[c] += gv[c];
        }
        for (int64_t p = 0; p < k; ++p) {
          for (int64_t q = 0; q < k; ++q) {
            const S* s = src.px(k * r + p, k * j + q);
            D* d = dsrc.px(k * r + p, k * j + q);
            const A* wr = w + (p * k + q) * ldw;
            A* dwr = dw + (p * k + q) * ldd;
            for (int64_t c = 0; c < nc; ++c) {
              dwr[c] += gv[c] * static_cast<A>(s[c]);
              d[c] = static_cast<D>(wr[c] * gv[c]);
            }
          }
        }
      }
    }
    return;
  }
  for (int64_t c = 0; c < nc; ++c) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < cols; ++j) {
        const A gc = static_cast<A>(g.px(r, j)[c * g.sc]);
        db[c] += gc;
        for (int64_t p = 0; p < k; ++p) {
          for (int64_t q = 0; q < k; ++q) {
            const int64_t e = p * k + q;
            dw[e * ldd + c] += gc * static_cast<A>(src.px(k * r + p, k * j + q)[c * src.sc]);
            dsrc.px(k * r + p, k * j + q)[c * dsrc.sc] = static_cast<D>(w[e * ldw + c] * gc);
          }
        }
      }
    }
  }
}

// Everything a task needs: the image, output row and channel chunk it owns, and the shape of each level's strip.
struct Task {
  int64_t b, i, c0, nc;
  Task(const Geometry& g, int64_t t) {
    const int64_t nchunk = (g.C + kChunk - 1) / kChunk;
    const int64_t strip = t / nchunk;
    b = strip / g.Ho;
    i = strip % g.Ho;
    c0 = (t % nchunk) * kChunk;
    nc = std::min(kChunk, g.C - c0);
  }
};

// The strip of x (or of grad_x) behind task t: rows [K*i, K*i + K), all channels of its chunk.
template <typename T>
Plane<T> input_strip(T* base, const at::Tensor& t, const Geometry& g, const Task& task) {
  return {base + task.b * t.stride(0) + g.K * task.i * t.stride(2) + task.c0 * t.stride(1), t.stride(2),
          t.stride(3), t.stride(1)};
}

template <typename T>
Plane<T> output_row(T* base, const at::Tensor& t, const Task& task) {
  return {base + task.b * t.stride(0) + task.i * t.stride(2) + task.c0 * t.stride(1), t.stride(2), t.stride(3),
          t.stride(1)};
}

// Levels 1 .. times-1 of a task's strip (level l has k^(times-l) rows and Wo * k^(times-l) columns).
template <typename S, typename A>
std::vector<std::vector<A>> inner_levels(Plane<const S> x, const Geometry& g, int64_t nc, const A* w, const A* b) {
  std::vector<std::vector<A>> ys(g.times);  // ys[l] holds level l; ys[0] is unused (level 0 is x)
  int64_t rows = g.K, cols = g.K * g.Wo;
  for (int64_t l = 1; l < g.times; ++l) {
    rows /= g.k;
    cols /= g.k;
    ys[l].resize(rows * cols * nc);
    if (l == 1) {
      level_fwd<S, A, A>(x, scratch_plane(ys[1], cols, nc), rows, cols, nc, w, g.C, b, g.k);
    } else {
      level_fwd<A, A, A>(scratch_plane(ys[l - 1], cols * g.k, nc), scratch_plane(ys[l], cols, nc), rows, cols, nc,
                         w, g.C, b, g.k);
    }
  }
  return ys;
}

at::Tensor recursive_dwconv_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, int64_t times) {
  const Geometry g = check_args("recursive_dwconv_fwd", x, weight, bias, times);
  at::Tensor out = empty_like_layout(x, {g.B, g.C, g.Ho, g.Wo});
  const int64_t ntask = g.B * g.Ho * ((g.C + kChunk - 1) / kChunk);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "recursive_dwconv_fwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const auto [wt, bt] = acc_params(weight, bias, g, c10::CppTypeToScalarType<A>::value);
    const A* w = wt.data_ptr<A>();
    const A* b = bt.data_ptr<A>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, ntask, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const Task task(g, t);
        const Plane<const scalar_t> xs = input_strip(xp, x, g, task);
        const Plane<scalar_t> o = output_row(op, out, task);
        auto ys = inner_levels<scalar_t, A>(xs, g, task.nc, w + task.c0, b + task.c0);
        if (g.times == 1) {
          level_fwd<scalar_t, scalar_t, A>(xs, o, 1, g.Wo, task.nc, w + task.c0, g.C, b + task.c0, g.k);
        } else {
          level_fwd<A, scalar_t, A>(scratch_plane(ys[g.times - 1], g.Wo * g.k, task.nc), o, 1, g.Wo, task.nc,
                                    w + task.c0, g.C, b + task.c0, g.k);
        }
      }
    });
  });
  return out;
}

// Backward of one task's strip. part points at this output row's [kk + 1][C] partial sums, offset to the chunk.
template <typename S, typename A>
void task_bwd(const Geometry& g, int64_t nc, Plane<const S> xs, Plane<const S> go, Plane<S> gx, const A* w,
              const A* b, A* part) {
  auto ys = inner_levels<S, A>(xs, g, nc, w, b);
  std::vector<std::vector<A>> gs(g.times);  // gs[l] = dL/d(level l) for 1 <= l < times
  int64_t rows = 1, cols = g.Wo;
  for (int64_t l = g.times; l >= 1; --l) {
    const int64_t cols_in = cols * g.k;
    if (l > 1) gs[l - 1].resize(rows * g.k * cols_in * nc);
    // The four (source, grad, destination) type combinations: levels above 1 read and write scratch.
    if (l == 1 && l == g.times) {
      level_bwd<S, S, S, A>(xs, go, gx, rows, cols, nc, w, g.C, g.k, part, g.C);
    } else if (l == 1) {
      level_bwd<S, A, S, A>(xs, scratch_plane(gs[1], cols, nc), gx, rows, cols, nc, w, g.C, g.k, part, g.C);
    } else {
      const Plane<const A> src = scratch_plane(ys[l - 1], cols_in, nc);
      const Plane<A> dst = scratch_plane(gs[l - 1], cols_in, nc);
      if (l == g.times) {
        level_bwd<A, S, A, A>(src, go, dst, rows, cols, nc, w, g.C, g.k, part, g.C);
      } else {
        level_bwd<A, A, A, A>(src, scratch_plane(gs[l], cols, nc), dst, rows, cols, nc, w, g.C, g.k, part, g.C);
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
  const int64_t nrow = g.B * g.Ho, nchunk = (g.C + kChunk - 1) / kChunk;
  at::Tensor total;  // [kk + 1][C] in the accumulation type: d(weight) as [k*k][C], then d(bias)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "recursive_dwconv_bwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<A>::value;
    const auto [wt, bt] = acc_params(weight, bias, g, acc);
    // part[row][e][c]: e < kk is d(weight[c, p, q]) with e = p*k + q, e = kk is d(bias[c]).
    at::Tensor part = at::zeros({nrow, g.kk + 1, g.C}, x.options().dtype(acc));
    const A* w = wt.data_ptr<A>();
    const A* b = bt.data_ptr<A>();
    A* pp = part.data_ptr<A>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gop = grad_out.const_data_ptr<scalar_t>();
    scalar_t* gxp = grad_x.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, nrow * nchunk, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const Task task(g, t);
        task_bwd<scalar_t, A>(g, task.nc, input_strip(xp, x, g, task), output_row(gop, grad_out, task),
                              input_strip(gxp, grad_x, g, task), w + task.c0, b + task.c0,
                              pp + (t / nchunk) * (g.kk + 1) * g.C + task.c0);
      }
    });
    // Sum the rows in order, per channel: the same result whatever the number of threads.
    total = at::empty({g.kk + 1, g.C}, part.options());
    A* tp = total.data_ptr<A>();
    at::parallel_for(0, g.C, 16, [&](int64_t begin, int64_t end) {
      for (int64_t e = 0; e <= g.kk; ++e) {
        for (int64_t c = begin; c < end; ++c) {
          A s = 0;
          for (int64_t r = 0; r < nrow; ++r) s += pp[(r * (g.kk + 1) + e) * g.C + c];
          tp[e * g.C + c] = s;
        }
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
