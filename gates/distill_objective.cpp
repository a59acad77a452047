#include "gates/distill_objective.h"

#include <torch/torch.h>

#include "losses/distill.h"
#include "models/model.h"

namespace kvd {

DistillTerms distill_to_frozen(const Model& model, const TrainBatch& tb, const AttentionMods& mods,
                               const LossOptions& opt) {
  at::Tensor teacher;  // (B, T, d)
  {
    torch::NoGradGuard ng;
    teacher = model.forward_train(tb.ids, tb.positions, AttentionMods(), tb.doc_ids).hidden;
  }
  at::Tensor student = model.forward_train(tb.ids, tb.positions, mods, tb.doc_ids, opt.checkpointing).hidden;  // (B, T, d)
  const LogitsFn logits = [&](const at::Tensor& h) { return model.logits(h); };
  const int64_t B = tb.ids.size(0);
  DistillTerms out;
  out.kl = torch::zeros({}, student.options().dtype(torch::kFloat32));
  out.ce = torch::zeros({}, student.options().dtype(torch::kFloat32));
  for (int64_t b = 0; b < B; ++b) {
    DistillLosses d = distill_losses(teacher.narrow(0, b, 1), student.narrow(0, b, 1), tb.labels.narrow(0, b, 1),
                                     logits, opt.block);
    out.kl = out.kl + d.kl / static_cast<double>(B);
    out.ce = out.ce + d.ce / static_cast<double>(B);
    out.tokens += d.tokens;
  }
  return out;
}

}  // namespace kvd
