// The distillation kernel's own code (kernels/distill_rows.cu) on the CPU through the SIMT emulator, against a
// float64 reference of each row's KL(p ‖ q), cross-entropy and their gradients with respect to the student logits.
// Metrics: kl and ce within 2e-6 absolute + 1e-5 relative (fp32 sums over the row); each gradient entry within one
// rounding of its dtype (bf16: 2^-8 relative) plus the fp32 rounding of the difference q − p (1e-6 of p + q). Runs in
// CI.
#define KVD_SIMT_EMULATION 1
#include "kernels/distill_rows.cu"

#include <cstdio>

#include <gtest/gtest.h>
#include <torch/torch.h>

namespace {

using kvd::kernels::LogitsDtype;

struct Ref {
  at::Tensor kl, ce, dkl, dce;  // float64
  at::Tensor scale;             // p + q, the size of the terms each gradient entry is a difference of
};

Ref reference(const at::Tensor& zt, const at::Tensor& zs, const at::Tensor& tgt) {  // (n, V) as given, (n)
  at::Tensor t = zt.to(torch::kDouble), s = zs.to(torch::kDouble);
  at::Tensor logp = torch::log_softmax(t, -1), logq = torch::log_softmax(s, -1), p = logp.exp(), q = logq.exp();
  at::Tensor term = torch::where(p.eq(0), torch::zeros_like(p), p * (logp - logq));
  Ref r;
  r.kl = term.sum(-1);
  r.ce = -logq.gather(1, tgt.unsqueeze(1)).squeeze(1);
  r.dkl = q - p;
  r.dce = q - torch::nn::functional::one_hot(tgt, zt.size(1)).to(torch::kDouble);
  r.scale = p + q;
  return r;
}

struct Out {
  at::Tensor kl, ce, dkl, dce;
};

Out run(const at::Tensor& zt, const at::Tensor& zs, const at::Tensor& tgt, bool grads) {
  const int64_t n = zs.size(0), V = zs.size(1);
  const LogitsDtype dt = zs.scalar_type() == torch::kBFloat16 ? LogitsDtype::Bf16 : LogitsDtype::F32;
  Out o;
  o.kl = torch::full({n}, NAN);
  o.ce = torch::full({n}, NAN);
  if (grads) {
    o.dkl = torch::full({n, V}, NAN, zs.options());
    o.dce = torch::full({n, V}, NAN, zs.options());
  }
  const cudaError_t e = kvd::kernels::emulated::distill_rows(
      zt.data_ptr(), zs.data_ptr(), dt, tgt.data_ptr<int64_t>(), n, V, zt.stride(0), zs.stride(0),
      o.kl.data_ptr<float>(), o.ce.data_ptr<float>(), grads ? o.dkl.data_ptr() : nullptr,
      grads ? o.dce.data_ptr() : nullptr, nullptr);
  EXPECT_EQ(e, cudaSuccess);
  return o;
}

void expect_close_grad(const at::Tensor& got, const at::Tensor& ref, const at::Tensor& scale, double rel,
                       const char* what) {
  at::Tensor g = got.to(torch::kDouble);
  at::Tensor bad = (g - ref).abs().gt(ref.abs() * rel + scale * 1e-6 + 1e-12);
  EXPECT_EQ(bad.sum().item<int64_t>(), 0) << what << ": largest difference " << (g - ref).abs().max().item<double>();
}

TEST(DistillRowsEmulated, MatchesFloat64Reference) {
  torch::manual_seed(0);
  // V = 1000: 16-byte vectors; V = 997: one entry at a time. Rows strided (a wider parent) for the teacher.
  for (auto dtype : {torch::kBFloat16, torch::kFloat})
    for (int64_t V : {1000, 997}) {
      const int64_t n = 4;
      at::Tensor parent = (torch::randn({n, V + 8}) * 3).to(dtype);
      at::Tensor zt = parent.narrow(1, 0, V);                                               // (n, V) strided rows
      at::Tensor zs = (zt.to(torch::kFloat) + torch::randn({n, V}) * 0.5).to(dtype).contiguous();  // (n, V)
      zt.index_put_({1, 3}, -INFINITY);  // a token the teacher rules out
      zt.index_put_({2, 5}, 30.f);       // a peaked row
      at::Tensor tgt = torch::randint(0, V, {n}, torch::kLong);
      Out o = run(zt, zs, tgt, true);
      Ref r = reference(zt, zs, tgt);
      const double rel = dtype == torch::kBFloat16 ? 1.0 / 256 : 1e-5;
      for (int64_t i = 0; i < n; ++i) {
        const double kl = o.kl[i].item<double>(), ce = o.ce[i].item<double>();
        const double rkl = r.kl[i].item<double>(), rce = r.ce[i].item<double>();
        std::printf("  %s V=%ld row %ld: kl %.7f (ref %.7f), ce %.6f (ref %.6f)\n",
                    dtype == torch::kBFloat16 ? "bf16" : "f32", (long)V, (long)i, kl, rkl, ce, rce);
        EXPECT_NEAR(kl, rkl, 2e-6 + 1e-5 * std::abs(rkl));
        EXPECT_NEAR(ce, rce, 2e-6 + 1e-5 * std::abs(rce));
      }
      expect_close_grad(o.dkl, r.dkl, r.scale, rel, "dkl");
      expect_close_grad(o.dce, r.dce, r.scale, rel, "dce");
      // Without gradients: the same sums.
      Out o2 = run(zt, zs, tgt, false);
      EXPECT_TRUE(torch::equal(o2.kl, o.kl));
      EXPECT_TRUE(torch::equal(o2.ce, o.ce));
    }
}

TEST(DistillRowsEmulated, EqualRowsHaveZeroKlAndGradient) {
  // p = q exactly: each KL term is p · 0 and each dkl entry q − p = 0, with no rounding.
  torch::manual_seed(1);
  const int64_t n = 3, V = 512;
  at::Tensor z = (torch::randn({n, V}) * 4).to(torch::kBFloat16);
  at::Tensor tgt = torch::tensor({0, 511, 17}, torch::kLong);
  Out o = run(z, z, tgt, true);
  EXPECT_TRUE(torch::equal(o.kl, torch::zeros({n})));
  EXPECT_TRUE(torch::equal(o.dkl.to(torch::kFloat), torch::zeros({n, V})));
  // CE of a uniform row is log V.
  at::Tensor u = torch::zeros({1, V}, torch::kBFloat16);
  Out ou = run(u, u, torch::tensor({7}, torch::kLong), false);
  EXPECT_NEAR(ou.ce[0].item<double>(), std::log(static_cast<double>(V)), 1e-6);
}

TEST(DistillRowsEmulated, TargetOutsideTheVocabularyGivesNan) {
  const int64_t V = 64;
  at::Tensor z = torch::randn({2, V});
  Out o = run(z, z, torch::tensor({int64_t{-100}, V}, torch::kLong), false);
  EXPECT_TRUE(std::isnan(o.ce[0].item<float>()));
  EXPECT_TRUE(std::isnan(o.ce[1].item<float>()));
}

TEST(DistillRowsEmulated, RejectsBadArguments) {
  float kl = 0, ce = 0;
  int64_t t = 0;
  float z[4] = {0, 0, 0, 0};
  EXPECT_EQ(kvd::kernels::emulated::distill_rows(z, z, LogitsDtype::F32, &t, 1, 4, 2, 4, &kl, &ce, nullptr, nullptr,
                                                 nullptr),
            cudaErrorInvalidValue);  // a row stride below V
  EXPECT_EQ(kvd::kernels::emulated::distill_rows(z, z, LogitsDtype::F32, &t, 1, 4, 4, 4, &kl, &ce, z, nullptr,
                                                 nullptr),
            cudaErrorInvalidValue);  // one gradient without the other
}

}  // namespace
