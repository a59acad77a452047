// A small SIMT emulator on host threads, so that CPU machines (CI has no GPU) can run the real CUDA kernel code of
// kernels/retention_attention.cu at small sizes. Compile the .cu as C++ with KVD_SIMT_EMULATION defined: the
// kernel then calls the functions below instead of its inline PTX.
//
// One std::thread per CUDA thread; a CTA at a time. __syncthreads is a barrier over the CTA; the warp-collective
// instructions (ldmatrix, mma.sync, shfl.xor, ballot) exchange operands through a per-warp slot array between two warp
// barriers, then each lane computes its own result as the PTX ISA defines it:
//   ldmatrix .m8n8.x4.b16: lanes 8i..8i+7 give the row addresses of matrix i; lane l receives, in register i,
//     row l/4, columns 2(l%4) and 2(l%4)+1 of matrix i (.trans: rows 2(l%4), 2(l%4)+1 of column l/4);
//   mma.m16n8k16.row.col bf16 -> f32 (g = l/4, t = l%4): A regs (g, 2t..), (g+8, 2t..), (g, 2t+8..),
//     (g+8, 2t+8..); B regs (k = 2t.., n = g), (k = 2t+8.., n = g); C (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1).
// Dynamic shared memory starts filled with 0xFF bytes (NaN in bf16 and fp32), so reading what nothing wrote
// shows up as NaN in the results.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __forceinline__
#define __forceinline__ inline
#undef __launch_bounds__
#define __launch_bounds__(...)

#include <algorithm>
using std::max;  // the CUDA device library's integer min / max
using std::min;

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace kvd_sim {

class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lk(m_);
    const uint64_t gen = gen_;
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
      cv_.notify_all();
    } else {
      cv_.wait(lk, [&] { return gen_ != gen; });
    }
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  int n_, count_ = 0;
  uint64_t gen_ = 0;
};

struct Warp {
  Barrier bar{32};
  alignas(16) unsigned char slot[32][64];
};

struct Cta {
  Cta(int threads, size_t smem_bytes) : bar(threads), smem(smem_bytes + 65536, 0xFF) {  // + static __shared__
    for (int w = 0; w < (threads + 31) / 32; ++w) warps.emplace_back(std::make_unique<Warp>());
  }
  Barrier bar;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<unsigned char> smem;
};

inline thread_local Cta* tl_cta = nullptr;
inline thread_local int tl_lane = 0, tl_warp = 0;

inline Warp& warp() { return *tl_cta->warps[tl_warp]; }
template <class T>
void post(const T& v) {
  static_assert(sizeof(T) <= 64);
  std::memcpy(warp().slot[tl_lane], &v, sizeof(T));
  warp().bar.wait();
}
template <class T>
T peek(int lane) {
  T v;
  std::memcpy(&v, warp().slot[lane], sizeof(T));
  return v;
}
inline void done() { warp().bar.wait(); }

inline unsigned char* dynamic_smem() {
  // 16-byte aligned like the real thing (the vector's data is at least that).
  return tl_cta->smem.data();
}

inline float bf16_bits_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline void ldmatrix_x4(uint32_t (&r)[4], const void* p, bool trans) {
  post(p);
  const int l = tl_lane;
  for (int i = 0; i < 4; ++i) {
    const uint16_t* rows[8];
    for (int k = 0; k < 8; ++k) rows[k] = static_cast<const uint16_t*>(peek<const void*>(8 * i + k));
    uint16_t lo, hi;
    if (!trans) {
      lo = rows[l / 4][2 * (l % 4)];
      hi = rows[l / 4][2 * (l % 4) + 1];
    } else {
      lo = rows[2 * (l % 4)][l / 4];
      hi = rows[2 * (l % 4) + 1][l / 4];
    }
    r[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
  done();
}

inline void mma_m16n8k16_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  struct Frag {
    uint32_t a[4], b[2];
  };
  post(Frag{{a[0], a[1], a[2], a[3]}, {b0, b1}});
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const Frag f = peek<Frag>(l);
    const int g = l / 4, t = l % 4;
    auto lo = [](uint32_t u) { return bf16_bits_to_float(static_cast<uint16_t>(u & 0xFFFF)); };
    auto hi = [](uint32_t u) { return bf16_bits_to_float(static_cast<uint16_t>(u >> 16)); };
    A[g][2 * t] = lo(f.a[0]), A[g][2 * t + 1] = hi(f.a[0]);
    A[g + 8][2 * t] = lo(f.a[1]), A[g + 8][2 * t + 1] = hi(f.a[1]);
    A[g][2 * t + 8] = lo(f.a[2]), A[g][2 * t + 9] = hi(f.a[2]);
    A[g + 8][2 * t + 8] = lo(f.a[3]), A[g + 8][2 * t + 9] = hi(f.a[3]);
    B[2 * t][g] = lo(f.b[0]), B[2 * t + 1][g] = hi(f.b[0]);
    B[2 * t + 8][g] = lo(f.b[1]), B[2 * t + 9][g] = hi(f.b[1]);
  }
  const int g = tl_lane / 4, t = tl_lane % 4;
  const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
  for (int i = 0; i < 4; ++i) {
    float s = 0.f;
    for (int k = 0; k < 16; ++k) s += A[rows[i]][k] * B[k][cols[i]];
    c[i] += s;
  }
  done();
}

template <class T>
T shfl_xor(T v, int mask) {
  post(v);
  const T r = peek<T>(tl_lane ^ mask);
  done();
  return r;
}

// Runs kernel(args...) over the grid, one CTA at a time, blockDim.x threads each (1-D blocks).
template <class K, class... A>
void launch(K kernel, dim3 grid, dim3 block, size_t smem_bytes, const A&... args) {
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        Cta cta(static_cast<int>(block.x), smem_bytes);
        std::vector<std::thread> ts;
        ts.reserve(block.x);
        for (unsigned t = 0; t < block.x; ++t)
          ts.emplace_back([&, t] {
            threadIdx = uint3{t, 0, 0};
            blockIdx = uint3{x, y, z};
            blockDim = block;
            gridDim = grid;
            tl_cta = &cta;
            tl_lane = static_cast<int>(t % 32);
            tl_warp = static_cast<int>(t / 32);
            kernel(args...);
          });
        for (auto& th : ts) th.join();
      }
}

}  // namespace kvd_sim

inline void __syncthreads() { kvd_sim::tl_cta->bar.wait(); }
inline float __shfl_xor_sync(unsigned, float v, int mask) { return kvd_sim::shfl_xor(v, mask); }
inline int __shfl_xor_sync(unsigned, int v, int mask) { return kvd_sim::shfl_xor(v, mask); }
inline unsigned __ballot_sync(unsigned, int pred) {
  kvd_sim::post(pred ? 1 : 0);
  unsigned r = 0;
  for (int l = 0; l < 32; ++l) r |= kvd_sim::peek<int>(l) ? (1u << l) : 0u;
  kvd_sim::done();
  return r;
}
inline int __shfl_up_sync(unsigned, int v, int delta) {
  kvd_sim::post(v);
  const int r = kvd_sim::tl_lane >= delta ? kvd_sim::peek<int>(kvd_sim::tl_lane - delta) : v;
  kvd_sim::done();
  return r;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }

#define KVD_DYNAMIC_SMEM(name) unsigned char* name = ::kvd_sim::dynamic_smem()
// A static __shared__ array: one per CTA, i.e. per emulated CTA's dynamic buffer (launch with smem >= its size).
#define KVD_SHARED_ARRAY(type, name, n) type* name = reinterpret_cast<type*>(::kvd_sim::dynamic_smem())
#define KVD_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::kvd_sim::launch(kernel, dim3(grid), dim3(block), smem, __VA_ARGS__)
#define KVD_LAST_ERROR() cudaSuccess
