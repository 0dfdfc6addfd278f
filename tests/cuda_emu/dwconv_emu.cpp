// Runs one pass of csrc/cuda/recursive_dwconv_kernels.cuh on the CPU (tests/cuda_emu/emu.h), with the grid and
// block of its launchers. Called through ctypes by tests/test_cuda_kernels.py. dtype codes: 0 float32,
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

template <typename In, typename Out, typename A>
void fwd(const void* src, const int64_t* sv, void* dst, const int64_t* dv, const void* wt, const void* bias,
         const int64_t* g, int vec) {
  const k::FwdArgs<In, Out, A> a{static_cast<const In*>(src), view(sv), static_cast<Out*>(dst), view(dv),
                                 static_cast<const A*>(wt),    static_cast<const A*>(bias), geometry(g)};
  const int V = vec && sizeof(In) == 2 ? 2 : 1;  // as launch_fwd
  const dim3 grid{static_cast<unsigned>(a.g.pixels()), k::channel_tiles(a.g.C, V), 1};
  const dim3 block{k::kLanes, static_cast<unsigned>(a.g.k * a.g.k), 1};
  if (V == 2 && a.g.levels == 2) emu_launch(grid, block, k::rdw_fwd_kernel<In, Out, A, 2, 2>, a);
  if (V == 2 && a.g.levels == 1) emu_launch(grid, block, k::rdw_fwd_kernel<In, Out, A, 2, 1>, a);
  if (V == 1 && a.g.levels == 2) emu_launch(grid, block, k::rdw_fwd_kernel<In, Out, A, 1, 2>, a);
  if (V == 1 && a.g.levels == 1) emu_launch(grid, block, k::rdw_fwd_kernel<In, Out, A, 1, 1>, a);
}

template <typename In, typename Gout, typename A>
void bwd(const void* src, const int64_t* sv, const void* gout, const int64_t* gv, void* gin, const int64_t* giv,
         const void* wt, const void* bias, void* partial, const int64_t* g, int ctas, int vec) {
  const k::BwdArgs<In, Gout, A> a{static_cast<const In*>(src),  view(sv),  static_cast<const Gout*>(gout),
                                  view(gv),                     static_cast<In*>(gin), view(giv),
                                  static_cast<const A*>(wt),    static_cast<const A*>(bias),
                                  static_cast<A*>(partial),     geometry(g)};
  const int V = vec && sizeof(In) == 2 ? 2 : 1;  // as launch_bwd
  const dim3 grid{static_cast<unsigned>(ctas), k::channel_tiles(a.g.C, V), 1};
  const dim3 block{k::kLanes, static_cast<unsigned>(a.g.k * a.g.k), 1};
  if (V == 2 && a.g.levels == 2) emu_launch(grid, block, k::rdw_bwd_kernel<In, Gout, A, 2, 2>, a);
  if (V == 2 && a.g.levels == 1) emu_launch(grid, block, k::rdw_bwd_kernel<In, Gout, A, 2, 1>, a);
  if (V == 1 && a.g.levels == 2) emu_launch(grid, block, k::rdw_bwd_kernel<In, Gout, A, 1, 2>, a);
  if (V == 1 && a.g.levels == 1) emu_launch(grid, block, k::rdw_bwd_kernel<In, Gout, A, 1, 1>, a);
}

// Calls f<T0, T1, A> for the dtype codes of the two tensor types.
template <template <typename, typename, typename> class F, typename... Args>
int dispatch(int t0, int t1, Args... args) {
  if (t0 == 0 && t1 == 0) return F<float, float, float>{}(args...);
  if (t0 == 1 && t1 == 1) return F<double, double, double>{}(args...);
  if (t0 == 2 && t1 == 2) return F<bf16, bf16, float>{}(args...);
  if (t0 == 2 && t1 == 0) return F<bf16, float, float>{}(args...);
  if (t0 == 0 && t1 == 2) return F<float, bf16, float>{}(args...);
  return -1;
}

template <typename In, typename Out, typename A>
struct Fwd {
  template <typename... Args>
  int operator()(Args... args) {
    fwd<In, Out, A>(args...);
    return 0;
  }
};

template <typename In, typename Gout, typename A>
struct Bwd {
  template <typename... Args>
  int operator()(Args... args) {
    bwd<In, Gout, A>(args...);
    return 0;
  }
};

}  // namespace

extern "C" {

// g: B, Ho, Wo, C, k, levels of the pass output.
int emu_fwd(int in_t, int out_t, const void* src, const int64_t* sv, void* dst, const int64_t* dv, const void* wt,
            const void* bias, const int64_t* g, int vec) {
  return dispatch<Fwd>(in_t, out_t, src, sv, dst, dv, wt, bias, g, vec);
}

int emu_bwd(int in_t, int gout_t, const void* src, const int64_t* sv, const void* gout, const int64_t* gv, void* gin,
            const int64_t* giv, const void* wt, const void* bias, void* partial, const int64_t* g, int ctas,
            int vec) {
  return dispatch<Bwd>(in_t, gout_t, src, sv, gout, gv, gin, giv, wt, bias, partial, g, ctas, vec);
}

int emu_vectorizable(const void* p, const int64_t* s, int C, int elem_size) {
  return k::vectorizable(p, view(s), C, elem_size);
}
}
