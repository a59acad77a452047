// Distillation losses (docs/methods/distillation.md): forward KL(p_teacher ‖ q_student) per token over the
// vocabulary plus next-token cross-entropy, both averaged over label-valid tokens (label != -100).
//
// Computed in blocks of rows: for each block the teacher's and the student's logits are formed, turned into
// fp32 log-probabilities, reduced to the two sums, and the gradient of each sum with respect to the block's
// student hidden rows is formed right there (through `logits`, e.g. Model::logits). So full-vocabulary logits
// exist for one block at a time and are never kept for the backward pass: the autograd graph holds two
// (N, d) gradients instead of (N, V) probabilities. The teacher side runs under no-grad.
#pragma once

#include <cstdint>
#include <functional>

#include <ATen/core/Tensor.h>

#include "models/kernel_path.h"

namespace kvd {

// (n, d) hidden rows -> (n, V) logits, any floating dtype (e.g. [&](auto& h) { return model.logits(h); }).
using LogitsFn = std::function<at::Tensor(const at::Tensor&)>;

constexpr int64_t kIgnoreLabel = -100;

struct DistillLosses {
  at::Tensor kl;     // () mean forward KL(p_teacher ‖ q_student) over valid tokens, float32; grads -> student hidden
  at::Tensor ce;     // () mean next-token cross-entropy of the student over valid tokens, float32
  int64_t tokens = 0;  // number of valid tokens (0: both losses are 0)
};

enum class DistillImpl { Blocked, Unblocked };

// teacher_hidden, student_hidden (B, T, d) final hidden states (after the final norm); labels (B, T) int64
// next-token targets aligned with the rows (label[t] = ids[t+1]), -100 = ignore. Only student_hidden gets
// gradients. Unblocked: the plain full-logits computation through autograd (the reference for tests).
// KernelPath::Fused: on CUDA (bf16 or float32 logits) each block's vocabulary work is one kernel
// (kernels/distill_rows.h: two reads of each logits row, the gradients written in the logits' dtype); the fp32
// LibTorch chain otherwise, and always with KernelPath::Reference.
DistillLosses distill_losses(const at::Tensor& teacher_hidden, const at::Tensor& student_hidden,
                             const at::Tensor& labels, const LogitsFn& logits, int64_t block_rows = 1024,
                             DistillImpl impl = DistillImpl::Blocked, KernelPath kernels = KernelPath::Fused);

}  // namespace kvd
