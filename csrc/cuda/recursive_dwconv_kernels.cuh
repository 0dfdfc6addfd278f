// CUDA kernels of RGT's recursive depthwise stride convolution (Chen et al., "Recursive Generalization
// Transformer for Image Super-Resolution", ICLR 2024, RG-SA's recursive generalization module): a depthwise
// k x k convolution with stride k, no padding and one set of weights, applied `times` times.
//
// Torch-free on purpose: tests compile this header with plain nvcc on machines without torch's CUDA build, and
// run the kernels on the CPU with a small emulation of threads, blocks and barriers (tests/cuda_emu); only the
// launchers at the end need nvcc. recursive_dwconv.cu turns tensors into the argument structs below.
//
// Changes from the unfused F.conv2d chain:
//   * A pass fuses up to two levels. A CTA owns one output pixel of the pass and 32*V channels; warp t owns the
//     pass-input child t (of k*k) and, for two fused levels, reads its k x k input patch, so the CTA reads the
//     whole k^2 x k^2 receptive field once (16 x 16 for RGT's k = 4) and never writes level 1 to memory. Warp
//     partials are summed in shared memory in warp order (deterministic). More levels chain passes through
//     float scratch at 1/256 of the input size.
//   * Channels are the fastest dimension (channels_last; the model's tokens are already laid out so): lane l reads
//     channels [V*l, V*l + V) of one pixel, so a warp load covers 32*V consecutive channels. V = 2 for 16-bit
//     types makes each warp load 128 contiguous bytes.
//   * Weights and bias are read from the op's (C, 1, k, k) and (C,) tensors and staged per CTA in shared memory
//     as float, so a call launches no conversion kernels.
//   * The backward is fused the same way: it recomputes level 1 from the input patch (nothing but x is saved),
//     writes grad_x once and keeps d(weight), d(bias) per thread in registers; each CTA writes one row of
//     partial sums, and one small kernel adds the rows in a fixed order into grad_weight and grad_bias (no
//     atomics: deterministic).
// Limits: k <= kMaxK = 4 (per-thread weights and weight grads live in registers); all math in float (double for
// float64). A one-level pass (times = 1, or the last level of an odd `times`) gives each thread one load:
// correct but not tuned, as RGT only uses times >= 2 on full-size maps.
#pragma once

#include <cstdint>

namespace rgt::dwconv_cuda {

constexpr int kLanes = 32;                // channel groups per CTA: one warp
constexpr int kMaxK = 4;                  // largest supported kernel side
constexpr int kMaxWarps = kMaxK * kMaxK;  // one warp per child pixel

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// Element strides of a (B, C, H, W) tensor.
struct View {
  int64_t sb, sc, sh, sw;
  __host__ __device__ int64_t at(int64_t b, int64_t h, int64_t w) const { return b * sb + h * sh + w * sw; }
};

// One pass: `levels` (1 or 2) levels from src (the pass input) to an output of B x Ho x Wo pixels.
struct Geometry {
  int64_t B, Ho, Wo;
  int C, k, levels;
  __host__ __device__ int64_t pixels() const { return B * Ho * Wo; }
};

// In, Out: pass input and output types (the op's dtype, or the float scratch between passes); W: the op's dtype
// (weights, bias, gradients); A: the accumulation type.
template <typename In, typename Out, typename W, typename A>
struct FwdArgs {
  const In* src;
  View sv;
  Out* dst;
  View dv;
  const W* weight;  // (C, 1, k, k) contiguous: weight[c, 0, p, q] at c*k*k + p*k + q
  const W* bias;    // (C,), or nullptr for none
  Geometry g;
};

template <typename In, typename Gout, typename W, typename A>
struct BwdArgs {
  const In* src;  // the pass input
  View sv;
  const Gout* gout;  // dL/d(pass output)
  View gv;
  In* gin;  // dL/d(pass input), written over the covered region k^levels * (Ho, Wo)
  View giv;
  const W* weight;
  const W* bias;
  A* partial;  // [gridDim.x][k*k + 1][C]: this CTA's sums of d(weight) (rows p*k + q) and d(bias) (row k*k)
  Geometry g;
};

// Sums `rows` rows of [k*k + 1][C] partial sums (every backward pass's CTAs) into the op's gradients.
template <typename W, typename A>
struct FinalizeArgs {
  const A* partial;
  int64_t rows;
  int C, kk;
  W* grad_weight;  // (C, 1, k, k) contiguous
  W* grad_bias;    // (C,)
};

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// V consecutive channels at p. For V > 1 the caller guarantees unit channel stride and alignment (V = 1 is any
// stride: p already points at the channel).
template <int V, typename T, typename A>
__device__ __forceinline__ void load(const T* p, A (&out)[V]) {
  if constexpr (V == 1) {
    out[0] = static_cast<A>(p[0]);
  } else {
    const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
    for (int v = 0; v < V; ++v) out[v] = static_cast<A>(pk.v[v]);
  }
}

template <int V, typename T, typename A>
__device__ __forceinline__ void store(T* p, const A (&val)[V]) {
  if constexpr (V == 1) {
    p[0] = static_cast<T>(val[0]);
  } else {
    Pack<T, V> pk;
#pragma unroll
    for (int v = 0; v < V; ++v) pk.v[v] = static_cast<T>(val[v]);
    *reinterpret_cast<Pack<T, V>*>(p) = pk;
  }
}

// Where a CTA's thread works: its channel group, its child (k*k children per pass output pixel) and the
// child's offset (cp, cq) inside the pass output pixel.
struct Lane {
  int lane, child, cp, cq;
  int64_t c;
  bool active;
  __device__ Lane(int C, int k, int V) {
    lane = threadIdx.x;
    child = threadIdx.y;
    cp = child / k;
    cq = child % k;
    c = (static_cast<int64_t>(blockIdx.y) * kLanes + lane) * V;
    active = c < C;  // C % V == 0 whenever V > 1
  }
};

// The CTA's channel tile of weights and bias in shared memory as A: ws[p*k + q][i], bs[i] for channel
// c0 + i, zero past C. Consecutive threads read consecutive weights; ends with a barrier.
template <int V, typename W, typename A>
__device__ __forceinline__ void stage_params(A (&ws)[kMaxWarps][kLanes * V], A (&bs)[kLanes * V], const W* weight,
                                             const W* bias, int C, int kk) {
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kLanes * V;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x, nthreads = blockDim.x * blockDim.y;
  for (int idx = tid; idx < kk * kLanes * V; idx += nthreads) {
    const int i = idx / kk, e = idx % kk;
    ws[e][i] = c0 + i < C ? static_cast<A>(weight[(c0 + i) * kk + e]) : A(0);
  }
  for (int i = tid; i < kLanes * V; i += nthreads) {
    bs[i] = bias != nullptr && c0 + i < C ? static_cast<A>(bias[c0 + i]) : A(0);
  }
  __syncthreads();
}

// Forward of one pass. Grid (B*Ho*Wo, channel tiles), block (kLanes, k*k).
//   levels = 1: out = b + sum_t w[t] * src[child t]
//   levels = 2: out = b + sum_t w[t] * (b + sum_{p,q} w[p*k+q] * src[k*child_t + (p, q)])
template <typename In, typename Out, typename W, typename A, int V, int L>
__global__ void __launch_bounds__(kLanes* kMaxWarps) rdw_fwd_kernel(FwdArgs<In, Out, W, A> a) {
  __shared__ A red[kMaxWarps][kLanes][V];
  __shared__ A ws[kMaxWarps][kLanes * V];
  __shared__ A bs[kLanes * V];
  const int k = a.g.k, C = a.g.C;
  const Lane t(C, k, V);
  stage_params<V>(ws, bs, a.weight, a.bias, C, k * k);
  const int i0 = t.lane * V;  // this lane's first channel in the tile
  const int64_t pix = blockIdx.x;
  const int64_t j = pix % a.g.Wo, i = (pix / a.g.Wo) % a.g.Ho, b = pix / (a.g.Wo * a.g.Ho);
  const int64_t ci = k * i + t.cp, cj = k * j + t.cq;  // the child's position in the level below the output
  A part[V];
#pragma unroll
  for (int v = 0; v < V; ++v) part[v] = 0;
  if (t.active) {
    const In* base = a.src + t.c * a.sv.sc;
    A val[V];
    if constexpr (L == 1) {
      load<V>(base + a.sv.at(b, ci, cj), val);
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v) val[v] = bs[i0 + v];
      // All k*k loads are independent: fully unrolled, they are in flight together.
#pragma unroll
      for (int p = 0; p < kMaxK; ++p) {
#pragma unroll
        for (int q = 0; q < kMaxK; ++q) {
          if (p < k && q < k) {
            A xv[V];
            load<V>(base + a.sv.at(b, k * ci + p, k * cj + q), xv);
#pragma unroll
            for (int v = 0; v < V; ++v) val[v] += ws[p * k + q][i0 + v] * xv[v];
          }
        }
      }
    }
#pragma unroll
    for (int v = 0; v < V; ++v) part[v] = ws[t.child][i0 + v] * val[v];
  }
#pragma unroll
  for (int v = 0; v < V; ++v) red[t.child][t.lane][v] = part[v];
  __syncthreads();
  if (t.child == 0 && t.active) {
    Out* o = a.dst + a.dv.at(b, i, j) + t.c * a.dv.sc;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      A acc = bs[i0 + v];
      for (int w = 0; w < k * k; ++w) acc += red[w][t.lane][v];
      o[v * a.dv.sc] = static_cast<Out>(acc);
    }
  }
}

// acc[cp][cq] += val without indexing a register array by a runtime index (which would spill it to memory).
template <typename A, int V>
__device__ __forceinline__ void add_at(A (&acc)[kMaxK][kMaxK][V], int cp, int cq, const A (&val)[V]) {
#pragma unroll
  for (int p = 0; p < kMaxK; ++p) {
#pragma unroll
    for (int q = 0; q < kMaxK; ++q) {
      if (p == cp && q == cq) {
#pragma unroll
        for (int v = 0; v < V; ++v) acc[p][q][v] += val[v];
      }
    }
  }
}

// Backward of one pass. Grid (G, channel tiles) with G <= B*Ho*Wo, block (kLanes, k*k); CTA x loops over output
// pixels x, x + G, ... For each pixel with upstream gradient g, warp t (child t):
//   levels = 1: d(src[child]) = w[t] g;  dW[t] += g src[child]
//   levels = 2: g1 = w[t] g;  y1 = b + sum_{p,q} w[p,q] x[p,q] (recomputed);  d(x[p,q]) = w[p,q] g1;
//               dW[p,q] += g1 x[p,q];  dW[t] += g y1;  db += g1
// and warp 0 adds g to db once per pixel.
template <typename In, typename Gout, typename W, typename A, int V, int L>
__global__ void __launch_bounds__(kLanes* kMaxWarps) rdw_bwd_kernel(BwdArgs<In, Gout, W, A> a) {
  __shared__ A red[kMaxWarps][kLanes][V];
  __shared__ A ws[kMaxWarps][kLanes * V];
  __shared__ A bs[kLanes * V];
  const int k = a.g.k, C = a.g.C;
  const Lane t(C, k, V);
  stage_params<V>(ws, bs, a.weight, a.bias, C, k * k);
  const int i0 = t.lane * V;
  A dw[kMaxK][kMaxK][V], db[V];
  A w[kMaxK][kMaxK][V];  // this lane's weights, reused for every pixel of the loop
#pragma unroll
  for (int p = 0; p < kMaxK; ++p) {
#pragma unroll
    for (int q = 0; q < kMaxK; ++q) {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        dw[p][q][v] = 0;
        w[p][q][v] = p < k && q < k ? ws[p * k + q][i0 + v] : A(0);
      }
    }
  }
#pragma unroll
  for (int v = 0; v < V; ++v) db[v] = 0;
  if (t.active) {
    A wc[V];  // the weight of this warp's child
#pragma unroll
    for (int v = 0; v < V; ++v) wc[v] = ws[t.child][i0 + v];
    for (int64_t pix = blockIdx.x; pix < a.g.pixels(); pix += gridDim.x) {
      const int64_t j = pix % a.g.Wo, i = (pix / a.g.Wo) % a.g.Ho, b = pix / (a.g.Wo * a.g.Ho);
      const int64_t ci = k * i + t.cp, cj = k * j + t.cq;
      const Gout* gp = a.gout + a.gv.at(b, i, j) + t.c * a.gv.sc;
      A g[V];
#pragma unroll
      for (int v = 0; v < V; ++v) {
        g[v] = static_cast<A>(gp[v * a.gv.sc]);
        if (t.child == 0) db[v] += g[v];
      }
      if constexpr (L == 1) {
        A xv[V], gx[V], dwt[V];
        load<V>(a.src + a.sv.at(b, ci, cj) + t.c * a.sv.sc, xv);
#pragma unroll
        for (int v = 0; v < V; ++v) {
          dwt[v] = g[v] * xv[v];
          gx[v] = wc[v] * g[v];
        }
        add_at(dw, t.cp, t.cq, dwt);
        store<V>(a.gin + a.giv.at(b, ci, cj) + t.c * a.giv.sc, gx);
      } else {
        A g1[V], y1[V];
#pragma unroll
        for (int v = 0; v < V; ++v) {
          g1[v] = wc[v] * g[v];
          db[v] += g1[v];
          y1[v] = bs[i0 + v];
        }
#pragma unroll
        for (int p = 0; p < kMaxK; ++p) {
#pragma unroll
          for (int q = 0; q < kMaxK; ++q) {
            if (p < k && q < k) {
              A xv[V], gx[V];
              load<V>(a.src + a.sv.at(b, k * ci + p, k * cj + q) + t.c * a.sv.sc, xv);
#pragma unroll
              for (int v = 0; v < V; ++v) {
                y1[v] += w[p][q][v] * xv[v];
                dw[p][q][v] += g1[v] * xv[v];
                gx[v] = w[p][q][v] * g1[v];
              }
              store<V>(a.gin + a.giv.at(b, k * ci + p, k * cj + q) + t.c * a.giv.sc, gx);
            }
          }
        }
        A dwt[V];
#pragma unroll
        for (int v = 0; v < V; ++v) dwt[v] = g[v] * y1[v];
        add_at(dw, t.cp, t.cq, dwt);
      }
    }
  }
  // Sum the k*k warps' d(weight) and d(bias) in warp order: one round per row of this CTA's partial block.
  A* row = a.partial + static_cast<int64_t>(blockIdx.x) * (k * k + 1) * C + t.c;
#pragma unroll
  for (int e = 0; e <= kMaxK * kMaxK; ++e) {
    const int p = e / kMaxK, q = e % kMaxK;
    const bool is_bias = e == kMaxK * kMaxK;
    if (!is_bias && (p >= k || q >= k)) continue;  // uniform across the CTA: the barriers below stay matched
#pragma unroll
    for (int v = 0; v < V; ++v) red[t.child][t.lane][v] = is_bias ? db[v] : dw[p][q][v];
    __syncthreads();
    if (t.child == 0 && t.active) {
      const int64_t r = is_bias ? k * k : p * k + q;
#pragma unroll
      for (int v = 0; v < V; ++v) {
        A acc = 0;
        for (int x = 0; x < k * k; ++x) acc += red[x][t.lane][v];
        row[r * C + v] = acc;
      }
    }
    __syncthreads();
  }
}

// grad_weight[c, e] and grad_bias[c] from the partial rows, one thread per (e, c), rows added in order.
template <typename W, typename A>
__global__ void rdw_finalize_kernel(FinalizeArgs<W, A> a) {
  const int64_t n = static_cast<int64_t>(a.kk + 1) * a.C;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n) return;
  A sum = 0;
  for (int64_t r = 0; r < a.rows; ++r) sum += a.partial[r * n + idx];
  const int64_t e = idx / a.C, c = idx % a.C;
  if (e < a.kk) {
    a.grad_weight[c * a.kk + e] = static_cast<W>(sum);
  } else {
    a.grad_bias[c] = static_cast<W>(sum);
  }
}

constexpr int kFinalizeThreads = 256;

// Whether V = 2 channel vectors can be used on a tensor: unit channel stride, even strides, 4-byte alignment.
inline bool vectorizable(const void* p, const View& v, int C, int elem_size) {
  return elem_size == 2 && C % 2 == 0 && v.sc == 1 && v.sb % 2 == 0 && v.sh % 2 == 0 && v.sw % 2 == 0 &&
         reinterpret_cast<uintptr_t>(p) % 4 == 0;
}

inline unsigned channel_tiles(int C, int V) { return static_cast<unsigned>((C + kLanes * V - 1) / (kLanes * V)); }

#ifdef __CUDACC__

template <int V, typename In, typename Out, typename W, typename A>
void launch_fwd_v(const FwdArgs<In, Out, W, A>& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.g.pixels()), channel_tiles(a.g.C, V));
  const dim3 block(kLanes, a.g.k * a.g.k);
  if (a.g.levels == 2) {
    rdw_fwd_kernel<In, Out, W, A, V, 2><<<grid, block, 0, stream>>>(a);
  } else {
    rdw_fwd_kernel<In, Out, W, A, V, 1><<<grid, block, 0, stream>>>(a);
  }
}

// Launches one forward pass; `vec` says whether src allows V = 2 (see vectorizable()). The caller checks
// B*Ho*Wo < 2^31, k <= kMaxK and the launch error.
template <typename In, typename Out, typename W, typename A>
void launch_fwd(const FwdArgs<In, Out, W, A>& a, bool vec, cudaStream_t stream) {
  if constexpr (sizeof(In) == 2) {
    if (vec) return launch_fwd_v<2>(a, stream);
  }
  launch_fwd_v<1>(a, stream);
}

template <int V, typename In, typename Gout, typename W, typename A>
void launch_bwd_v(const BwdArgs<In, Gout, W, A>& a, unsigned ctas, cudaStream_t stream) {
  const dim3 grid(ctas, channel_tiles(a.g.C, V));
  const dim3 block(kLanes, a.g.k * a.g.k);
  if (a.g.levels == 2) {
    rdw_bwd_kernel<In, Gout, W, A, V, 2><<<grid, block, 0, stream>>>(a);
  } else {
    rdw_bwd_kernel<In, Gout, W, A, V, 1><<<grid, block, 0, stream>>>(a);
  }
}

// Launches one backward pass over `ctas` CTAs per channel tile (a.partial has that many row blocks); `vec` says
// whether both src and gin allow V = 2.
template <typename In, typename Gout, typename W, typename A>
void launch_bwd(const BwdArgs<In, Gout, W, A>& a, unsigned ctas, bool vec, cudaStream_t stream) {
  if constexpr (sizeof(In) == 2) {
    if (vec) return launch_bwd_v<2>(a, ctas, stream);
  }
  launch_bwd_v<1>(a, ctas, stream);
}

template <typename W, typename A>
void launch_finalize(const FinalizeArgs<W, A>& a, cudaStream_t stream) {
  const int64_t n = static_cast<int64_t>(a.kk + 1) * a.C;
  const unsigned blocks = static_cast<unsigned>((n + kFinalizeThreads - 1) / kFinalizeThreads);
  rdw_finalize_kernel<W, A><<<blocks, kFinalizeThreads, 0, stream>>>(a);
}

#endif  // __CUDACC__

}  // namespace rgt::dwconv_cuda
