// The fused soft cache size of TRIM-KV's capacity loss (kernels/soft_cache_size.cuh): binding and autograd.
//   S[b, h, t] = Σ_{j <= t, same document} exp((t − j) · x[b, h, j]),   x = log β (B, H, T)
// Documents are contiguous runs of equal doc ids (packed sequences). The reference is
// losses/capacity.cpp's soft_cache_size (Tiled / Dense), which calls this on CUDA.
#pragma once

#include <ATen/core/Tensor.h>

namespace kvd {

// Whether soft_cache_size_fused runs for x: a build with the CUDA kernels and x on a CUDA device.
bool soft_cache_size_fused_available(const at::Tensor& x);

// x (B, H, T) floating on CUDA (any strides), doc_ids (B, T) integer or undefined (one document per row).
// Returns S (B, H, T) float32, differentiable in x (first order); deterministic.
at::Tensor soft_cache_size_fused(const at::Tensor& x, const at::Tensor& doc_ids);

}  // namespace kvd
