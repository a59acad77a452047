#include "gates/distill_objective.h"

#include <torch/torch.h>

#include "losses/distill.h"
#include "models/model.h"
#include "models/profile.h"

namespace kvd {

DistillTerms distill_to_frozen(const Model& model, const TrainBatch& tb, const AttentionMods& mods,
                               const LossOptions& opt) {
  ProfileLap lap(model.device(), "train ");
  at::Tensor teacher;  // (B, T, d)
  {
    torch::NoGradGuard ng;
    AttentionMods plain;
    plain.kernels = opt.kernels;
    teacher = model.forward_train(tb.ids, tb.positions, plain, tb.doc_ids).hidden;
  }
  lap("teacher forward");
  AttentionMods student_mods = mods;
  student_mods.kernels = opt.kernels;
  at::Tensor student = model.forward_train(tb.ids, tb.positions, student_mods, tb.doc_ids, opt.checkpointing).hidden;  // (B, T, d)
  lap("student forward");
  const LogitsFn logits = [&](const at::Tensor& h) { return model.logits(h); };
  const int64_t B = tb.ids.size(0);
  DistillTerms out;
  out.kl = torch::zeros({}, student.options().dtype(torch::kFloat32));
  out.ce = torch::zeros({}, student.options().dtype(torch::kFloat32));
  for (int64_t b = 0; b < B; ++b) {
    DistillLosses d = distill_losses(teacher.narrow(0, b, 1), student.narrow(0, b, 1), tb.labels.narrow(0, b, 1),
                                     logits, opt.block, DistillImpl::Blocked, opt.kernels);
    out.kl = out.kl + d.kl / static_cast<double>(B);
    out.ce = out.ce + d.ce / static_cast<double>(B);
    out.tokens += d.tokens;
  }
  lap("kl/ce forward");
  return out;
}

}  // namespace kvd
