// A CPU stand-in for the parts of CUDA's execution model that rgt's kernels use, so tests can run them without a
// GPU: each thread of a block is a std::thread, __syncthreads() is a barrier, and blocks run one after another,
// so a kernel's __shared__ arrays (function statics here) belong to the running block. Slow: tiny grids only.
#pragma once

#include <barrier>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
inline std::barrier<>* emu_barrier = nullptr;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static

inline void __syncthreads() { emu_barrier->arrive_and_wait(); }

template <typename Kernel, typename Args>
void emu_launch(dim3 grid, dim3 block, Kernel kernel, const Args& args) {
  gridDim = grid;
  blockDim = block;
  const unsigned n = block.x * block.y * block.z;
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::barrier<> bar(n);
        emu_barrier = &bar;
        std::vector<std::thread> threads;
        threads.reserve(n);
        for (unsigned t = 0; t < n; ++t) {
          threads.emplace_back([&, t] {
            blockIdx = {bx, by, bz};
            threadIdx = {t % block.x, t / block.x % block.y, t / (block.x * block.y)};
            kernel(args);
          });
        }
        for (auto& th : threads) th.join();
      }
    }
  }
}

// bfloat16 with round-to-nearest-even, as torch.bfloat16 (no NaN handling: tests use finite values).
struct bf16 {
  uint16_t bits;
  bf16() = default;
  bf16(float f) {  // NOLINT: implicit like CUDA's __nv_bfloat16
    uint32_t u;
    std::memcpy(&u, &f, 4);
    bits = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
  operator float() const {
    const uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
