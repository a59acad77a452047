// The fused soft cache size (kernels/soft_cache_size.*) against a dense float64 reference of the same sum.
// Metric: relative L2 error of S and of dS/dx (float32 accumulation and ex2.approx: under 1e-4); two backward
// passes bitwise equal. GPU only (skipped without one); the CPU paths of the capacity loss have their own tests.
#include <cstdio>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "kernels/soft_cache_size.h"

namespace {

at::Tensor dense_reference(const at::Tensor& x, const at::Tensor& docs) {  // (B, H, T), (B, T) -> (B, H, T)
  const int64_t T = x.size(2);
  at::Tensor r = torch::arange(T, docs.options());
  at::Tensor d = r.view({T, 1}) - r.view({1, T});  // t − j
  at::Tensor vis = docs.unsqueeze(-1).eq(docs.unsqueeze(1)).logical_and(d.ge(0).unsqueeze(0));  // (B, T, T)
  at::Tensor e = torch::exp(d.clamp_min(0).to(x.scalar_type()) * x.unsqueeze(2));             // (B, H, T, T)
  return e.masked_fill(vis.logical_not().unsqueeze(1), 0).sum(-1);
}

double rel_l2(const at::Tensor& a, const at::Tensor& r) {
  at::Tensor ad = a.to(torch::kDouble), rd = r.to(torch::kDouble);
  const double den = rd.norm().item<double>(), num = (ad - rd).norm().item<double>();
  return den > 0 ? num / den : num;  // T = 1: every gradient is 0
}

TEST(SoftCacheSizeKernel, MatchesDenseReference) {
  if (!torch::cuda::is_available() || !kvd::soft_cache_size_fused_available(torch::empty({1, 1, 1}, torch::kCUDA)))
    GTEST_SKIP() << "no CUDA device or no fused kernel in this build";
  for (int64_t T : {1, 19, 111, 989, 4097}) {
    const int64_t B = 2, H = 3;
    auto f = torch::TensorOptions().device(torch::kCUDA);
    // log β near 0 (slow decay) for most, a few fast; packed documents in row 1, one document in row 0.
    at::Tensor x = torch::log_sigmoid(torch::randn({B, H, T}, f) * 2.0 + 5.0);
    at::Tensor docs = torch::zeros({B, T}, f.dtype(torch::kLong));
    if (T > 3) docs[1] = torch::div(torch::arange(T, f.dtype(torch::kLong)) * 5, T, "floor");  // 5 documents
    at::Tensor xl = x.clone().requires_grad_(true);
    at::Tensor s = kvd::soft_cache_size_fused(xl, docs);
    at::Tensor dout = torch::randn_like(s);
    s.backward(dout);
    at::Tensor xr = x.to(torch::kDouble).requires_grad_(true);
    at::Tensor ref = dense_reference(xr, docs);
    ref.backward(dout.to(torch::kDouble));
    const double es = rel_l2(s, ref), eg = rel_l2(xl.grad(), xr.grad());
    std::printf("  T=%ld: rel L2 S %.2e, dS/dx %.2e\n", (long)T, es, eg);
    EXPECT_LT(es, 1e-4) << "T=" << T;
    EXPECT_LT(eg, 1e-4) << "T=" << T;
    // Deterministic
    at::Tensor x2 = x.clone().requires_grad_(true);
    kvd::soft_cache_size_fused(x2, docs).backward(dout);
    EXPECT_TRUE(torch::equal(x2.grad(), xl.grad()));
  }
}

}  // namespace
