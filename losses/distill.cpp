#include "losses/distill.h"

#include <algorithm>

#include <torch/autograd.h>
#include <torch/torch.h>

#include "common/error.h"
#include "kernels/distill_rows.h"

namespace kvd {
namespace {

// Per block: sums of KL and CE over the block's rows, and (RowGrads::Yes) d(sum)/d(student rows) for each.
struct BlockedDistillFn : public torch::autograd::Function<BlockedDistillFn> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const at::Tensor& student_rows,  // (N, d) valid rows only
                                                const at::Tensor& teacher_rows,  // (N, d)
                                                const at::Tensor& targets,       // (N) int64
                                                const LogitsFn& logits, int64_t block, RowGrads need,
                                                KernelPath kernels) {
    const int64_t N = student_rows.size(0);
    auto f32 = student_rows.options().dtype(torch::kFloat);
    at::Tensor kl_sum = torch::zeros({}, f32), ce_sum = torch::zeros({}, f32);  // ()
    at::Tensor g_kl, g_ce;  // (N, d) float32
    if (need == RowGrads::Yes) {
      g_kl = torch::zeros({N, student_rows.size(1)}, f32);
      g_ce = torch::zeros({N, student_rows.size(1)}, f32);
    }
    for (int64_t r0 = 0; r0 < N; r0 += block) {
      const int64_t n = std::min(block, N - r0);
      at::Tensor tgt = targets.narrow(0, r0, n);  // (n)
      at::Tensor zt;                                // (n, V) teacher logits, model dtype
      {
        torch::NoGradGuard no_grad;
        zt = logits(teacher_rows.narrow(0, r0, n));
      }
      torch::AutoGradMode grad_mode(need == RowGrads::Yes);
      at::Tensor h = student_rows.narrow(0, r0, n).detach().requires_grad_(need == RowGrads::Yes);  // (n, d)
      at::Tensor raw = logits(h);                                  // (n, V) model dtype
      at::Tensor dkl, dce;                                         // (n, V) model dtype: d(sum)/d(raw)
      if (kernels == KernelPath::Fused && distill_rows_fused_available(raw) && zt.scalar_type() == raw.scalar_type()) {
        // One kernel for the vocabulary work (kernels/distill_rows.cuh); the chain below is its reference.
        DistillRows rows = distill_rows_fused(zt, raw.detach(), tgt, need);
        torch::NoGradGuard no_grad;
        kl_sum += rows.kl.sum();
        ce_sum += rows.ce.sum();
        dkl = rows.dkl;
        dce = rows.dce;
      } else {
        at::Tensor logp;  // (n, V) teacher log-probabilities, float32
        {
          torch::NoGradGuard no_grad;
          logp = torch::log_softmax(zt.to(torch::kFloat), -1);
        }
        at::Tensor logq = torch::log_softmax(raw.detach().to(torch::kFloat), -1);  // (n, V)
        at::Tensor p = logp.exp();                                                 // (n, V)
        torch::NoGradGuard no_grad;
        kl_sum += (p * (logp - logq)).sum();
        ce_sum -= logq.gather(1, tgt.unsqueeze(1)).sum();
        if (need == RowGrads::Yes) {
          // d/dlogits Σ KL = q − p;  d/dlogits Σ CE = q − onehot(target).
          at::Tensor q = logq.exp();                                              // (n, V)
          dkl = (q - p).to(raw.scalar_type());
          dce = q.scatter_add(1, tgt.unsqueeze(1), -torch::ones({n, 1}, q.options())).to(raw.scalar_type());
        }
      }
      if (need == RowGrads::Yes) {
        at::Tensor gk = torch::autograd::grad({raw}, {h}, {dkl}, /*retain_graph=*/true)[0];   // (n, d)
        at::Tensor gc = torch::autograd::grad({raw}, {h}, {dce}, /*retain_graph=*/false)[0];  // (n, d)
        torch::NoGradGuard no_grad;
        g_kl.narrow(0, r0, n).copy_(gk);
        g_ce.narrow(0, r0, n).copy_(gc);
      }
    }
    const double inv = 1.0 / static_cast<double>(std::max<int64_t>(N, 1));
    ctx->save_for_backward({g_kl, g_ce});
    ctx->saved_data["inv"] = inv;
    ctx->saved_data["dtype"] = static_cast<int64_t>(student_rows.scalar_type());
    return {kl_sum * inv, ce_sum * inv};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor& g_kl = saved[0];  // (N, d)
    const at::Tensor& g_ce = saved[1];  // (N, d)
    const double inv = ctx->saved_data["inv"].toDouble();
    const auto dt = static_cast<c10::ScalarType>(ctx->saved_data["dtype"].toInt());
    at::Tensor g = torch::zeros_like(g_kl);  // (N, d)
    if (grads[0].defined()) g = g + g_kl * (grads[0].to(torch::kFloat) * inv);
    if (grads[1].defined()) g = g + g_ce * (grads[1].to(torch::kFloat) * inv);
    return {g.to(dt), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

DistillLosses distill_losses(const at::Tensor& teacher_hidden, const at::Tensor& student_hidden,
                             const at::Tensor& labels, const LogitsFn& logits, int64_t block_rows,
                             DistillImpl impl, KernelPath kernels) {
  KVD_CHECK(student_hidden.dim() == 3 && teacher_hidden.sizes() == student_hidden.sizes(),
            "distill_losses: teacher and student hidden must both be (B, T, d), got ", teacher_hidden.sizes(), " and ",
            student_hidden.sizes());
  KVD_CHECK(labels.dim() == 2 && labels.size(0) == student_hidden.size(0) && labels.size(1) == student_hidden.size(1),
            "distill_losses: labels must be (B, T) = (", student_hidden.size(0), ", ", student_hidden.size(1), "), got ",
            labels.sizes());
  KVD_CHECK(block_rows > 0, "distill_losses: block_rows must be positive");
  const int64_t d = student_hidden.size(2);
  at::Tensor flat_labels = labels.reshape({-1}).to(student_hidden.device(), torch::kLong);  // (B*T)
  at::Tensor idx = flat_labels.ne(kIgnoreLabel).nonzero().view({-1});                      // (N)
  const int64_t N = idx.size(0);
  DistillLosses out;
  out.tokens = N;
  if (N == 0) {
    at::Tensor zero = student_hidden.sum().to(torch::kFloat) * 0;  // () keeps the graph
    out.kl = zero;
    out.ce = zero.clone();
    return out;
  }
  at::Tensor targets = flat_labels.index_select(0, idx);                               // (N)
  at::Tensor s_rows = student_hidden.reshape({-1, d}).index_select(0, idx);           // (N, d)
  at::Tensor t_rows;                                                                   // (N, d)
  {
    torch::NoGradGuard no_grad;
    t_rows = teacher_hidden.reshape({-1, d}).index_select(0, idx);
  }
  if (impl == DistillImpl::Unblocked) {
    at::Tensor logp;  // (N, V)
    {
      torch::NoGradGuard no_grad;
      logp = torch::log_softmax(logits(t_rows).to(torch::kFloat), -1);
    }
    at::Tensor logq = torch::log_softmax(logits(s_rows).to(torch::kFloat), -1);  // (N, V)
    out.kl = (logp.exp() * (logp - logq)).sum() / static_cast<double>(N);
    out.ce = -logq.gather(1, targets.unsqueeze(1)).sum() / static_cast<double>(N);
    return out;
  }
  const RowGrads need = (s_rows.requires_grad() && torch::GradMode::is_enabled()) ? RowGrads::Yes : RowGrads::No;
  auto r = BlockedDistillFn::apply(s_rows, t_rows, targets, logits, block_rows, need, kernels);
  out.kl = r[0];
  out.ce = r[1];
  return out;
}

}  // namespace kvd
