// See distill_rows.cuh.
#include "kernels/distill_rows.cuh"

// KVD_SIMT_EMULATION: compiled as host C++ against tests/kernels/simt_emulator.h for CPU tests (see
// kernels/retention_attention.cu); the launcher then lives in kvd::kernels::emulated.
#ifdef KVD_SIMT_EMULATION
#include <cmath>
#include <cstring>

#include "tests/kernels/simt_emulator.h"
#define KVD_DR_NAMESPACE kvd::kernels::emulated
#else
#define KVD_DR_NAMESPACE kvd::kernels
#define KVD_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define KVD_LAST_ERROR() cudaGetLastError()
#define KVD_SHARED_ARRAY(type, name, n) __shared__ type name[n]
#endif

#include <cmath>

#include "kernels/bf16_bits.cuh"

namespace KVD_DR_NAMESPACE {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Vector loads and stores of VW elements (16 bytes when VW > 1) as fp32.
template <class T, int VW>
__device__ __forceinline__ void load(const T* p, float (&x)[VW]) {
  if constexpr (VW == 1) {
    if constexpr (sizeof(T) == 2) x[0] = bits::bf16_to_float(*p);
    else x[0] = *p;
  } else {
    uint4 u;
#ifdef KVD_SIMT_EMULATION
    std::memcpy(&u, p, sizeof u);
#else
    u = *reinterpret_cast<const uint4*>(p);
#endif
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
    if constexpr (sizeof(T) == 2) {
      static_assert(VW == 8);
      for (int i = 0; i < 4; ++i) {
        x[2 * i] = bits::bits_to_float(w[i] << 16);
        x[2 * i + 1] = bits::bits_to_float(w[i] & 0xFFFF0000u);
      }
    } else {
      static_assert(VW == 4);
      for (int i = 0; i < 4; ++i) x[i] = bits::bits_to_float(w[i]);
    }
  }
}

template <class T, int VW>
__device__ __forceinline__ void store(T* p, const float (&x)[VW]) {
  if constexpr (VW == 1) {
    if constexpr (sizeof(T) == 2) *p = bits::to_bf16(x[0]);
    else *p = x[0];
  } else {
    uint32_t w[4];
    if constexpr (sizeof(T) == 2) {
      for (int i = 0; i < 4; ++i)
        w[i] = static_cast<uint32_t>(bits::to_bf16(x[2 * i])) | (static_cast<uint32_t>(bits::to_bf16(x[2 * i + 1])) << 16);
    } else {
      for (int i = 0; i < 4; ++i) w[i] = bits::float_to_bits(x[i]);
    }
    const uint4 u{w[0], w[1], w[2], w[3]};
#ifdef KVD_SIMT_EMULATION
    std::memcpy(p, &u, sizeof u);
#else
    *reinterpret_cast<uint4*>(p) = u;
#endif
  }
}

// Online softmax state: running max m and Σ exp(x − m). −inf entries add nothing; NaN propagates.
__device__ __forceinline__ void online(float x, float& m, float& s) {
  if (x > m) {
    s = s * expf(m - x) + 1.f;  // m = −inf: expf(−inf) = 0
    m = x;
  } else {
    s += x == -INFINITY ? 0.f : expf(x - m);
  }
}

__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
  const float mm = fmaxf(m, m2);
  const float a = m == -INFINITY ? 0.f : s * expf(m - mm);
  const float b = m2 == -INFINITY ? 0.f : s2 * expf(m2 - mm);
  m = mm;
  s = a + b;
}

// Block-wide (m, s) of the teacher and the student, in a fixed order; every thread gets the result.
__device__ void reduce_softmax(float& mt, float& st, float& ms, float& ss, float* red) {
  for (int o = 16; o > 0; o >>= 1) {
    const float mt2 = __shfl_xor_sync(0xffffffffu, mt, o), st2 = __shfl_xor_sync(0xffffffffu, st, o);
    const float ms2 = __shfl_xor_sync(0xffffffffu, ms, o), ss2 = __shfl_xor_sync(0xffffffffu, ss, o);
    merge(mt, st, mt2, st2);
    merge(ms, ss, ms2, ss2);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    red[4 * warp] = mt, red[4 * warp + 1] = st, red[4 * warp + 2] = ms, red[4 * warp + 3] = ss;
  }
  __syncthreads();
  mt = red[0], st = red[1], ms = red[2], ss = red[3];
  for (int w = 1; w < kWarps; ++w) {
    merge(mt, st, red[4 * w], red[4 * w + 1]);
    merge(ms, ss, red[4 * w + 2], red[4 * w + 3]);
  }
  __syncthreads();  // red is reused
}

__device__ float reduce_sum(float x, float* red) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) red[warp] = x;
  __syncthreads();
  float s = red[0];
  for (int w = 1; w < kWarps; ++w) s += red[w];
  return s;
}

// grid (n): one row per CTA, kThreads threads; VW elements per access (V % VW == 0 when VW > 1).
template <class T, int VW>
__global__ void __launch_bounds__(kThreads)
    distill_rows_kernel(const T* __restrict__ zt, const T* __restrict__ zs, const int64_t* __restrict__ target, int V,
                        int64_t ld_t, int64_t ld_s, float* __restrict__ kl, float* __restrict__ ce, T* __restrict__ dkl,
                        T* __restrict__ dce) {
  KVD_SHARED_ARRAY(float, red, 4 * kWarps);
  const int64_t r = blockIdx.x;
  const T* rt = zt + r * ld_t;
  const T* rs = zs + r * ld_s;
  const int first = static_cast<int>(threadIdx.x) * VW, stride = kThreads * VW;

  // Pass 1: both log-normalizers.
  float mt = -INFINITY, st = 0.f, ms = -INFINITY, ss = 0.f;
  for (int i = first; i < V; i += stride) {
    float a[VW], b[VW];
    load<T, VW>(rt + i, a);
    load<T, VW>(rs + i, b);
    for (int k = 0; k < VW; ++k) {
      online(a[k], mt, st);
      online(b[k], ms, ss);
    }
  }
  reduce_softmax(mt, st, ms, ss, red);
  const float lse_t = mt + logf(st), lse_s = ms + logf(ss);

  // Pass 2: KL terms, and the gradients.
  const int64_t tgt = target[r];
  float acc = 0.f;
  T* gk = dkl ? dkl + r * static_cast<int64_t>(V) : nullptr;
  T* gc = dce ? dce + r * static_cast<int64_t>(V) : nullptr;
  for (int i = first; i < V; i += stride) {
    float a[VW], b[VW], ok[VW], oc[VW];
    load<T, VW>(rt + i, a);
    load<T, VW>(rs + i, b);
    for (int k = 0; k < VW; ++k) {
      const float lp = a[k] - lse_t, lq = b[k] - lse_s;
      const float p = expf(lp);
      acc += p == 0.f ? 0.f : p * (lp - lq);  // 0 · log 0 = 0
      const float q = expf(lq);
      ok[k] = q - p;
      oc[k] = (i + k == tgt) ? q - 1.f : q;
    }
    if (gk) {
      store<T, VW>(gk + i, ok);
      store<T, VW>(gc + i, oc);
    }
  }
  const float kl_row = reduce_sum(acc, red);
  if (threadIdx.x == 0) {
    kl[r] = kl_row;
    float z = NAN;
    if (tgt >= 0 && tgt < V) {
      if constexpr (sizeof(T) == 2) z = bits::bf16_to_float(rs[tgt]);
      else z = rs[tgt];
    }
    ce[r] = lse_s - z;
  }
}

template <class T>
cudaError_t launch(const void* zt, const void* zs, const int64_t* target, int n, int V, int64_t ld_t, int64_t ld_s,
                   float* kl, float* ce, void* dkl, void* dce, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const auto aligned = [](const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  const bool vec = V % kVec == 0 && ld_t % kVec == 0 && ld_s % kVec == 0 && aligned(zt) && aligned(zs) &&
                   aligned(dkl) && aligned(dce);
  const T *t = static_cast<const T*>(zt), *s = static_cast<const T*>(zs);
  T *gk = static_cast<T*>(dkl), *gc = static_cast<T*>(dce);
  if (vec)
    KVD_LAUNCH((distill_rows_kernel<T, kVec>), dim3(n), kThreads, 0, stream, t, s, target, V, ld_t, ld_s, kl, ce, gk,
               gc);
  else
    KVD_LAUNCH((distill_rows_kernel<T, 1>), dim3(n), kThreads, 0, stream, t, s, target, V, ld_t, ld_s, kl, ce, gk, gc);
  return KVD_LAST_ERROR();
}

}  // namespace

cudaError_t distill_rows(const void* zt, const void* zs, LogitsDtype dtype, const int64_t* target, int n, int V,
                         int64_t ld_t, int64_t ld_s, float* kl, float* ce, void* dkl, void* dce, cudaStream_t stream) {
  if (n < 0 || V <= 0 || ld_t < V || ld_s < V || (n > 0 && (!zt || !zs || !target || !kl || !ce)) ||
      (dkl == nullptr) != (dce == nullptr))
    return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  return dtype == LogitsDtype::Bf16
             ? launch<uint16_t>(zt, zs, target, n, V, ld_t, ld_s, kl, ce, dkl, dce, stream)
             : launch<float>(zt, zs, target, n, V, ld_t, ld_s, kl, ce, dkl, dce, stream);
}

}  // namespace KVD_DR_NAMESPACE
