// Runs the kernels of csrc/cuda/recursive_dwconv_kernels.cuh on the CPU (tests/cuda_emu/emu.h) with the grid
// and block of their launchers. Called through ctypes by tests/test_cuda_kernels.py. dtype codes: 0 float32,
// 1 float64, 2 bfloat16; the accumulation type is double for float64 and float otherwise.
#include "emu.h"
// emu.h first: it stands in for the CUDA keywords the kernel header uses.
#include "cuda/recursive_dwconv_kernels.cuh"

namespace k = rgt::dwconv_cuda;

namespace {

k::View view(const int64_t* s) { return {s[0], s[1], s[2], s[3]}; }

k::Geometry geometry(const int64_t* g) {
  return {g[0], g[1], g[2], static_cast<int>(g[3]), static_cast<int>(g[4]), static_cast<int>(g[5])};
}

template <typename T0, typename T1, typename W, typename A>
struct Fwd {
  int operator()(const void* src, const int64_t* sv, void* dst, const int64_t* dv, const void* w, const void* b,
                 const int64_t* g, int vec) const {
    const k::FwdArgs<T0, T1, W, A> a{static_cast<const T0*>(src), view(sv), static_cast<T1*>(dst), view(dv),
                                     static_cast<const W*>(w),    static_cast<const W*>(b), geometry(g)};
    const int V = vec && sizeof(T0) == 2 ? 2 : 1;  // as launch_fwd
    const dim3 grid{static_cast<unsigned>(a.g.pixels()), k::channel_tiles(a.g.C, V), 1};
    const dim3 block{k::kLanes, static_cast<unsigned>(a.g.k * a.g.k), 1};
    if (V == 2 && a.g.levels == 2) emu_launch(grid, block, k::rdw_fwd_kernel<T0, T1, W, A, 2, 2>, a);
    if (V == 2 && a.g.levels == 1) emu_launch(grid, block, k::rdw_fwd_kernel<T0, T1, W, A, 2, 1>, a);
    if (V == 1 && a.g.levels == 2) emu_launch(grid, block, k::rdw_fwd_kernel<T0, T1, W, A, 1, 2>, a);
    if (V == 1 && a.g.levels == 1) emu_launch(grid, block, k::rdw_fwd_kernel<T0, T1, W, A, 1, 1>, a);
    return 0;
  }
};

template <typename T0, typename T1, typename W, typename A>
struct Bwd {
  int operator()(const void* src, const int64_t* sv, const void* gout, const int64_t* gv, void* gin,
                 const int64_t* giv, const void* w, const void* b, void* partial, const int64_t* g, int ctas,
                 int vec) const {
    const k::BwdArgs<T0, T1, W, A> a{static_cast<const T0*>(src), view(sv),
                                     static_cast<const T1*>(gout), view(gv),
                                     static_cast<T0*>(gin),        view(giv),
                                     static_cast<const W*>(w),     static_cast<const W*>(b),
                                     static_cast<A*>(partial),     geometry(g)};
    const int V = vec && sizeof(T0) == 2 ? 2 : 1;  // as launch_bwd
    const dim3 grid{static_cast<unsigned>(ctas), k::channel_tiles(a.g.C, V), 1};
    const dim3 block{k::kLanes, static_cast<unsigned>(a.g.k * a.g.k), 1};
    if (V == 2 && a.g.levels == 2) emu_launch(grid, block, k::rdw_bwd_kernel<T0, T1, W, A, 2, 2>, a);
    if (V == 2 && a.g.levels == 1) emu_launch(grid, block, k::rdw_bwd_kernel<T0, T1, W, A, 2, 1>, a);
    if (V == 1 && a.g.levels == 2) emu_launch(grid, block, k::rdw_bwd_kernel<T0, T1, W, A, 1, 2>, a);
    if (V == 1 && a.g.levels == 1) emu_launch(grid, block, k::rdw_bwd_kernel<T0, T1, W, A, 1, 1>, a);
    return 0;
  }
};

template <typename T0, typename T1, typename W, typename A>
struct Finalize {
  int operator()(const void* partial, int64_t rows, int C, int kk, void* grad_w, void* grad_b) const {
    const k::FinalizeArgs<W, A> a{static_cast<const A*>(partial), rows, C, kk, static_cast<W*>(grad_w),
                                  static_cast<W*>(grad_b)};
    const int64_t n = static_cast<int64_t>(kk + 1) * C;  // as launch_finalize
    const dim3 grid{static_cast<unsigned>((n + k::kFinalizeThreads - 1) / k::kFinalizeThreads), 1, 1};
    emu_launch(grid, dim3{k::kFinalizeThreads, 1, 1}, k::rdw_finalize_kernel<W, A>, a);
    return 0;
  }
};

// Calls F<T0, T1, W, A> for the dtype codes of the two tensor types and of the op (W): the combinations
// recursive_dwconv.cu uses, where T0 and T1 are W or its accumulation type.
template <template <typename, typename, typename, typename> class F, typename... Args>
int dispatch(int t0, int t1, int w, Args... args) {
  if (w == 0 && t0 == 0 && t1 == 0) return F<float, float, float, float>{}(args...);
  if (w == 1 && t0 == 1 && t1 == 1) return F<double, double, double, double>{}(args...);
  if (w == 2 && t0 == 2 && t1 == 2) return F<bf16, bf16, bf16, float>{}(args...);
  if (w == 2 && t0 == 2 && t1 == 0) return F<bf16, float, bf16, float>{}(args...);
  if (w == 2 && t0 == 0 && t1 == 2) return F<float, bf16, bf16, float>{}(args...);
  if (w == 2 && t0 == 0 && t1 == 0) return F<float, float, bf16, float>{}(args...);
  return -1;
}

}  // namespace

extern "C" {

// g: B, Ho, Wo, C, k, levels of the pass output. b may be null (no bias).
int emu_fwd(int in_t, int out_t, int w_t, const void* src, const int64_t* sv, void* dst, const int64_t* dv,
            const void* w, const void* b, const int64_t* g, int vec) {
  return dispatch<Fwd>(in_t, out_t, w_t, src, sv, dst, dv, w, b, g, vec);
}

int emu_bwd(int in_t, int gout_t, int w_t, const void* src, const int64_t* sv, const void* gout, const int64_t* gv,
            void* gin, const int64_t* giv, const void* w, const void* b, void* partial, const int64_t* g, int ctas,
            int vec) {
  return dispatch<Bwd>(in_t, gout_t, w_t, src, sv, gout, gv, gin, giv, w, b, partial, g, ctas, vec);
}

int emu_finalize(int w_t, const void* partial, int64_t rows, int C, int kk, void* grad_w, void* grad_b) {
  return dispatch<Finalize>(w_t, w_t, w_t, partial, rows, C, kk, grad_w, grad_b);
}

int emu_vectorizable(const void* p, const int64_t* s, int C, int elem_size) {
  return k::vectorizable(p, view(s), C, elem_size);
}
}
