// The distillation losses' per-row work over the vocabulary, fused (framework-free launcher; the binding is
// kernels/distill_rows.{h,cpp}, the caller losses/distill.cpp). For each row r of teacher logits zt and student
// logits zs (V entries each):
//   logp = zt − logsumexp(zt),  logq = zs − logsumexp(zs)
//   kl[r]  = Σ_v exp(logp_v) · (logp_v − logq_v)                  forward KL(p ‖ q)
//   ce[r]  = −logq[target[r]]                                       next-token cross-entropy
//   dkl[r] = exp(logq) − exp(logp)                                  d kl[r] / d zs      (optional)
//   dce[r] = exp(logq) − onehot(target[r])                          d ce[r] / d zs      (optional)
// One CTA per row, two passes over the row (online max / sum of both softmaxes, then the sums and gradients), fp32
// arithmetic, every reduction in a fixed order (deterministic). It replaces a chain of about fifteen full-size fp32
// tensors per block of rows (casts, two log-softmaxes, exp, products, sums, scatter) by two reads of each logits
// row and one write of each gradient row in the logits' own dtype.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace kvd::kernels {

enum class LogitsDtype { Bf16, F32 };

// zt, zs: (n, V) in `dtype` (bf16 as raw 16-bit words), rows `ld_t` / `ld_s` elements apart, entries contiguous.
// target: (n) int64 in [0, V) (a row whose target is outside gets ce = NaN). kl, ce: (n) fp32. dkl, dce: (n, V)
// contiguous in `dtype`, both null (no gradients) or both set.
cudaError_t distill_rows(const void* zt, const void* zs, LogitsDtype dtype, const int64_t* target, int n, int V,
                         int64_t ld_t, int64_t ld_s, float* kl, float* ce, void* dkl, void* dce, cudaStream_t stream);

}  // namespace kvd::kernels
