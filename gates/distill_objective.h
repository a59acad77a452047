// The distillation objective shared by the components that change the frozen model's attention (TRIM-KV's
// retention gate, and the Attention-Gate / DMS-style parts): a teacher forward of the frozen model, a student
// forward of the same model with the component's AttentionMods, and the blocked KL / CE of losses/distill.h
// between their next-token distributions.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

#include "gates/component.h"

namespace kvd {

struct DistillTerms {
  at::Tensor kl;        // () float32: per-sequence mean KL(teacher ‖ student), averaged over the batch rows
  at::Tensor ce;        // () float32: per-sequence mean next-token CE of the student, averaged likewise
  int64_t tokens = 0;   // label-valid tokens
};

// Per-sequence means averaged over the batch rows, so a global batch gives the same loss however it is split
// over micro-steps and ranks. Only label-valid rows count (completion-only data gives completion-only KL/CE).
DistillTerms distill_to_frozen(const Model& model, const TrainBatch& batch, const AttentionMods& student_mods,
                               const LossOptions& options);

}  // namespace kvd
