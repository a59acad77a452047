// See soft_cache_size.cuh.
#include "kernels/soft_cache_size.cuh"

// KVD_SIMT_EMULATION: compiled as host C++ against tests/kernels/simt_emulator.h for CPU tests (see
// kernels/retention_attention.cu); the launchers then live in kvd::kernels::emulated.
#ifdef KVD_SIMT_EMULATION
#include <cmath>

#include "tests/kernels/simt_emulator.h"
#define KVD_SCS_NAMESPACE kvd::kernels::emulated
#else
#define KVD_SCS_NAMESPACE kvd::kernels
#define KVD_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define KVD_LAST_ERROR() cudaGetLastError()
#define KVD_SHARED_ARRAY(type, name, n) __shared__ type name[n]
#endif

namespace KVD_SCS_NAMESPACE {
namespace {

constexpr int kTile = 256;
constexpr float kLog2e = 1.4426950408889634f;

#ifdef KVD_SIMT_EMULATION
inline float ex2(float x) { return std::exp2(x); }
#else
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
#endif

// grid (ceil(T / kTile), H, B); thread = one row t.
__global__ void __launch_bounds__(kTile) fwd_kernel(const float* __restrict__ x, const int32_t* __restrict__ start,
                                                    float* __restrict__ out, int H, int T) {
  KVD_SHARED_ARRAY(float, sx, kTile);
  const int b = blockIdx.z, h = blockIdx.y, t0 = blockIdx.x * kTile;
  const int t = t0 + threadIdx.x;
  const float* xr = x + (static_cast<int64_t>(b) * H + h) * T;
  const int32_t* st = start + static_cast<int64_t>(b) * T;
  const int my_start = t < T ? st[t] : T;
  const int j_begin = st[t0];  // starts are non-decreasing: the block's smallest
  const int j_end = min(T, t0 + kTile);
  float acc = 0.f;
  for (int c0 = j_begin; c0 < j_end; c0 += kTile) {
    __syncthreads();
    if (c0 + static_cast<int>(threadIdx.x) < T) sx[threadIdx.x] = xr[c0 + threadIdx.x] * kLog2e;
    __syncthreads();
    const int n = min(kTile, j_end - c0);
    float age = static_cast<float>(t - c0);  // t − j for j = c0, decremented per step (exact below 2^24)
    for (int jj = 0; jj < n; ++jj, age -= 1.f) {
      const int j = c0 + jj;
      const float e = ex2(age * sx[jj]);
      acc += (j >= my_start && j <= t) ? e : 0.f;
    }
  }
  if (t < T) out[(static_cast<int64_t>(b) * H + h) * T + t] = acc;
}

// grid (ceil(T / kTile), H, B); thread = one key row j.
__global__ void __launch_bounds__(kTile) bwd_kernel(const float* __restrict__ x, const float* __restrict__ dout,
                                                    const int32_t* __restrict__ end, float* __restrict__ dx, int H,
                                                    int T) {
  KVD_SHARED_ARRAY(float, sd, kTile);
  const int b = blockIdx.z, h = blockIdx.y, j0 = blockIdx.x * kTile;
  const int j = j0 + threadIdx.x;
  const int64_t row = (static_cast<int64_t>(b) * H + h) * T;
  const int32_t* en = end + static_cast<int64_t>(b) * T;
  const int last = min(T, j0 + kTile) - 1;
  const int t_end = en[last] + 1;  // ends are non-decreasing: the block's largest
  const int my_end = j < T ? en[j] : -1;
  const float x2 = j < T ? x[row + j] * kLog2e : 0.f;
  float acc = 0.f;
  for (int c0 = j0; c0 < t_end; c0 += kTile) {
    __syncthreads();
    if (c0 + static_cast<int>(threadIdx.x) < T) sd[threadIdx.x] = dout[row + c0 + threadIdx.x];
    __syncthreads();
    const int n = min(kTile, t_end - c0);
    float age = static_cast<float>(c0 - j);  // t − j for t = c0
    for (int tt = 0; tt < n; ++tt, age += 1.f) {
      const int t = c0 + tt;
      const float g = sd[tt] * age * ex2(age * x2);
      acc += (t >= j && t <= my_end) ? g : 0.f;
    }
  }
  if (j < T) dx[row + j] = acc;
}

}  // namespace

cudaError_t soft_cache_size_fwd(const float* x, const int32_t* start, float* out, int B, int H, int T,
                                cudaStream_t stream) {
  if (B <= 0 || H <= 0 || T <= 0 || !x || !start || !out) return cudaErrorInvalidValue;
  KVD_LAUNCH(fwd_kernel, dim3((T + kTile - 1) / kTile, H, B), kTile, 0, stream, x, start, out, H, T);
  return KVD_LAST_ERROR();
}

cudaError_t soft_cache_size_bwd(const float* x, const float* dout, const int32_t* end, float* dx, int B, int H, int T,
                                cudaStream_t stream) {
  if (B <= 0 || H <= 0 || T <= 0 || !x || !dout || !end || !dx) return cudaErrorInvalidValue;
  KVD_LAUNCH(bwd_kernel, dim3((T + kTile - 1) / kTile, H, B), kTile, 0, stream, x, dout, end, dx, H, T);
  return KVD_LAST_ERROR();
}

}  // namespace KVD_SCS_NAMESPACE
