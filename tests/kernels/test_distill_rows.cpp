// The fused distillation rows (kernels/distill_rows.*) on the GPU: distill_losses with KernelPath::Fused against the
// LibTorch chain (KernelPath::Reference), over a random LM head, in bf16 (the training dtype) and float32, with a
// partial last block and a vocabulary that is not a multiple of the 16-byte vectors. Metrics: KL and CE within 1e-4
// relative (bf16) / 1e-5 (float32); the gradient with respect to the student hidden rows within 1e-3 relative L2
// (bf16: both paths round q − p to bf16, from fp32 values computed in another order; 6e-5 on an H100) / 1e-5
// (float32); two fused backward passes bitwise equal. GPU only (skipped without one); tests/kernels/emu_distill_rows.cpp
// runs the kernel's code on the CPU.
#include <cstdio>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "kernels/distill_rows.h"
#include "losses/distill.h"

namespace {

double rel_l2(const at::Tensor& a, const at::Tensor& r) {
  at::Tensor ad = a.to(torch::kDouble), rd = r.to(torch::kDouble);
  return (ad - rd).norm().item<double>() / std::max(rd.norm().item<double>(), 1e-300);
}

struct Losses {
  double kl, ce;
  at::Tensor grad;  // (B, T, d)
};

Losses run(const at::Tensor& teacher, const at::Tensor& student, const at::Tensor& labels, const at::Tensor& w,
        kvd::KernelPath path) {
  at::Tensor s = student.clone().requires_grad_(true);
  const kvd::LogitsFn logits = [&](const at::Tensor& h) { return torch::matmul(h, w.t()); };
  kvd::DistillLosses d = kvd::distill_losses(teacher, s, labels, logits, 256, kvd::DistillImpl::Blocked, path);
  (d.kl * 0.7 + d.ce * 0.3).backward();
  return {d.kl.item<double>(), d.ce.item<double>(), s.grad()};
}

TEST(DistillRowsKernel, FusedLossesMatchTheLibTorchChain) {
  if (!torch::cuda::is_available() || !kvd::distill_rows_fused_available(torch::empty({1}, torch::kCUDA)))
    GTEST_SKIP() << "no CUDA device or no fused kernel in this build";
  torch::manual_seed(0);
  for (auto dtype : {torch::kBFloat16, torch::kFloat})
    for (int64_t V : {int64_t{4096}, int64_t{1003}}) {
      const int64_t B = 1, T = 700, d = 64;
      auto f = torch::TensorOptions().device(torch::kCUDA).dtype(dtype);
      at::Tensor w = torch::randn({V, d}, f) * 0.3;                 // (V, d) LM head
      at::Tensor teacher = torch::randn({B, T, d}, f);              // (B, T, d)
      at::Tensor student = (teacher + torch::randn({B, T, d}, f) * 0.3).to(dtype);
      at::Tensor labels = torch::randint(0, V, {B, T}, f.dtype(torch::kLong));
      labels.narrow(1, 0, 9).fill_(kvd::kIgnoreLabel);  // ignored rows
      Losses fused = run(teacher, student, labels, w, kvd::KernelPath::Fused);
      Losses ref = run(teacher, student, labels, w, kvd::KernelPath::Reference);
      const bool bf = dtype == torch::kBFloat16;
      const double eg = rel_l2(fused.grad, ref.grad);
      std::printf("  %s V=%ld: kl %.6f / %.6f, ce %.6f / %.6f, grad rel L2 %.2e\n", bf ? "bf16" : "f32", (long)V,
                  fused.kl, ref.kl, fused.ce, ref.ce, eg);
      EXPECT_NEAR(fused.kl, ref.kl, (bf ? 1e-4 : 1e-5) * std::abs(ref.kl));
      EXPECT_NEAR(fused.ce, ref.ce, (bf ? 1e-4 : 1e-5) * std::abs(ref.ce));
      EXPECT_LT(eg, bf ? 1e-3 : 1e-5);
      Losses again = run(teacher, student, labels, w, kvd::KernelPath::Fused);
      EXPECT_TRUE(torch::equal(again.grad, fused.grad)) << "two fused backward passes differ";
      EXPECT_EQ(again.kl, fused.kl);
    }
}

TEST(DistillRowsKernel, RejectsMismatchedInputs) {
  if (!torch::cuda::is_available() || !kvd::distill_rows_fused_available(torch::empty({1}, torch::kCUDA)))
    GTEST_SKIP() << "no CUDA device or no fused kernel in this build";
  auto f = torch::TensorOptions().device(torch::kCUDA);
  at::Tensor a = torch::randn({4, 32}, f), b = torch::randn({4, 31}, f);
  at::Tensor t = torch::zeros({4}, f.dtype(torch::kLong));
  EXPECT_THROW(kvd::distill_rows_fused(a, b, t, kvd::RowGrads::No), std::exception);
  EXPECT_THROW(kvd::distill_rows_fused(a, a.to(torch::kBFloat16), t, kvd::RowGrads::No), std::exception);
  EXPECT_THROW(kvd::distill_rows_fused(a, a, t.narrow(0, 0, 3), kvd::RowGrads::No), std::exception);
  EXPECT_THROW(kvd::distill_rows_fused(a.cpu(), a.cpu(), t.cpu(), kvd::RowGrads::No), std::exception);
}

}  // namespace
