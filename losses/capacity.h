// TRIM-KV capacity loss (docs/methods/trimkv.md, "Capacity loss"): the soft cache size
//   S_t = Σ_{i ≤ t, same document} exp((t − i) · x_i),   x = log β ≤ 0
// and L_cap = Σ max(0, (S_t − M) / max(t − M, 1)) / #{S_t − M > 0}, t = position within its document.
//
// soft_cache_size never materializes T×T: a custom autograd Function tiles over (t, i) blocks with fp32 (or
// float64 for float64 input) accumulation; memory is O(B·H·T + B·H·block²). Its backward is
//   dx_j = Σ_{t ≥ j, same doc} dout_t · (t − j) · exp((t − j) · x_j)
// (first order only: no double backward). Pure tensor functions; documents are contiguous runs of equal
// doc ids (packed sequences), as the data layer writes them.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

namespace kvd {

enum class CapacityImpl {
  Tiled,  // block x block tiles through autograd (the default, every device)
  Dense,  // the T x T reference (tests only)
  Fused   // CUDA: kernels/soft_cache_size.h, one deterministic pass (the retention gate uses it on CUDA under
          // train.kernels=fused; checked against Tiled on an H200, bench/RESULTS.md)
};

// x (B, H, T) log β (float32 / bfloat16 / float64), doc_ids (B, T) int64 or undefined (one document per row).
// Returns S (B, H, T) in float32 (float64 for float64 x), by the CapacityImpl chosen.
at::Tensor soft_cache_size(const at::Tensor& x, const at::Tensor& doc_ids, CapacityImpl impl = CapacityImpl::Tiled,
                           int64_t block = 256);

// The capacity loss above (a scalar, same dtype as soft_cache_size's output). Rows with doc id < 0
// (padding) are left out. budget M > 0. When no entry exceeds M the loss is 0 (still in the graph).
at::Tensor capacity_loss(const at::Tensor& x,        // (B, H, T) log β
                         const at::Tensor& doc_ids,  // (B, T) int64 or undefined
                         double budget, CapacityImpl impl = CapacityImpl::Tiled, int64_t block = 256);

// Positions within documents: (B, T) doc ids -> (B, T) int64 (0 at each document's first row); undefined
// doc_ids: 0 .. T-1 per row. `T` and `device` are used when doc_ids is undefined.
at::Tensor positions_in_document(const at::Tensor& doc_ids, int64_t batch, int64_t T, c10::Device device);

}  // namespace kvd
