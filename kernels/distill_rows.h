// The distillation losses' per-row vocabulary work on the GPU (kernels/distill_rows.cuh): binding. The caller is
// losses/distill.cpp, whose LibTorch chain (log-softmaxes in fp32) is the reference.
#pragma once

#include <ATen/core/Tensor.h>

namespace kvd {

enum class RowGrads { No, Yes };

struct DistillRows {
  at::Tensor kl;   // (n) float32: Σ_v p (log p − log q) per row
  at::Tensor ce;   // (n) float32: −log q[target] per row
  at::Tensor dkl;  // (n, V) in the logits' dtype: q − p (RowGrads::Yes), else undefined
  at::Tensor dce;  // (n, V) in the logits' dtype: q − onehot(target) (RowGrads::Yes), else undefined
};

// Whether distill_rows_fused runs for these logits: a build with the CUDA kernels, a CUDA tensor, bf16 or float32.
bool distill_rows_fused_available(const at::Tensor& logits);

// teacher_logits, student_logits (n, V) of one dtype on one CUDA device, entries contiguous (rows may be strided);
// targets (n) integer in [0, V). No autograd: the gradients are returned (the caller chains them through its own
// logits function). Deterministic.
DistillRows distill_rows_fused(const at::Tensor& teacher_logits, const at::Tensor& student_logits,
                               const at::Tensor& targets, RowGrads grads);

}  // namespace kvd
