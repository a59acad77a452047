// TRIM-KV's soft cache size S_t (the capacity loss's O(T²) sum, shared/specs/trimkv.md), fused on the GPU
// (framework-free launchers; the binding is kernels/soft_cache_size.{h,cpp}).
//
//   out[b, h, t] = Σ_{start[b, t] <= j <= t} exp((t − j) · x[b, h, j])            x = log β <= 0
//   dx[b, h, j]  = Σ_{j <= t <= end[b, j]} dout[b, h, t] · (t − j) · exp((t − j) · x[b, h, j])
// where [start, end] is the row range of the row's document (documents are contiguous runs of rows).
// One thread per output element, fp32 accumulation in a fixed order (deterministic), exp through ex2.approx.
// Tiles of 256 rows are staged in shared memory; a block starts at its first row's document start (forward) and
// stops at its last row's document end (backward), so packed documents cost only their own squares.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace kvd::kernels {

// x, out: (B, H, T) contiguous fp32; start: (B, T) contiguous int32 (first row of each row's document).
cudaError_t soft_cache_size_fwd(const float* x, const int32_t* start, float* out, int B, int H, int T,
                                cudaStream_t stream);
// x, dout, dx: (B, H, T) contiguous fp32; end: (B, T) contiguous int32 (last row of each row's document).
cudaError_t soft_cache_size_bwd(const float* x, const float* dout, const int32_t* end, float* dx, int B, int H, int T,
                                cudaStream_t stream);

}  // namespace kvd::kernels
