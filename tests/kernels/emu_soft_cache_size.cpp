// The soft cache size kernels' own code (kernels/soft_cache_size.cu) on the CPU through the SIMT emulator, against
// a dense float64 reference of S_t and of its gradient. Metric: relative L2 error under 1e-5 (float32 sums of exact
// exponentials). Runs in CI.
#define KVD_SIMT_EMULATION 1
#include "kernels/soft_cache_size.cu"

#include <cstdio>

#include <gtest/gtest.h>
#include <torch/torch.h>

namespace {

at::Tensor dense_reference(const at::Tensor& x, const at::Tensor& docs) {  // (B, H, T), (B, T) -> (B, H, T)
  const int64_t T = x.size(2);
  at::Tensor r = torch::arange(T, docs.options());
  at::Tensor d = r.view({T, 1}) - r.view({1, T});
  at::Tensor vis = docs.unsqueeze(-1).eq(docs.unsqueeze(1)).logical_and(d.ge(0).unsqueeze(0));
  at::Tensor e = torch::exp(d.clamp_min(0).to(x.scalar_type()) * x.unsqueeze(2));
  return e.masked_fill(vis.logical_not().unsqueeze(1), 0).sum(-1);
}

double rel_l2(const at::Tensor& a, const at::Tensor& r) {
  at::Tensor ad = a.to(torch::kDouble), rd = r.to(torch::kDouble);
  const double den = rd.norm().item<double>(), num = (ad - rd).norm().item<double>();
  return den > 0 ? num / den : num;  // T = 1: every gradient is 0
}

TEST(SoftCacheSizeEmulated, MatchesDenseReference) {
  torch::manual_seed(0);
  for (int64_t T : {1, 19, 300, 700}) {
    const int64_t B = 2, H = 2;
    at::Tensor x = torch::log_sigmoid(torch::randn({B, H, T}) * 2.0 + 5.0);  // (B, H, T) log β, mostly near 0
    at::Tensor docs = torch::zeros({B, T}, torch::kLong);
    if (T > 3) docs[1] = torch::div(torch::arange(T, torch::kLong) * 3, T, "floor");  // row 1: three packed documents
    // start / end rows of each row's document
    at::Tensor start = torch::empty({B, T}, torch::kInt), end = torch::empty({B, T}, torch::kInt);
    for (int64_t b = 0; b < B; ++b) {
      int64_t s0 = 0;
      for (int64_t t = 0; t < T; ++t) {
        if (t > 0 && docs[b][t].item<int64_t>() != docs[b][t - 1].item<int64_t>()) s0 = t;
        start[b][t] = static_cast<int>(s0);
      }
      int64_t e0 = T - 1;
      for (int64_t t = T - 1; t >= 0; --t) {
        if (t < T - 1 && docs[b][t].item<int64_t>() != docs[b][t + 1].item<int64_t>()) e0 = t;
        end[b][t] = static_cast<int>(e0);
      }
    }
    at::Tensor out = torch::full({B, H, T}, NAN), dout = torch::randn({B, H, T}), dx = torch::full({B, H, T}, NAN);
    ASSERT_EQ(kvd::kernels::emulated::soft_cache_size_fwd(x.data_ptr<float>(), start.data_ptr<int32_t>(),
                                                          out.data_ptr<float>(), B, H, T, nullptr),
              cudaSuccess);
    ASSERT_EQ(kvd::kernels::emulated::soft_cache_size_bwd(x.data_ptr<float>(), dout.data_ptr<float>(),
                                                          end.data_ptr<int32_t>(), dx.data_ptr<float>(), B, H, T,
                                                          nullptr),
              cudaSuccess);
    at::Tensor xr = x.to(torch::kDouble).requires_grad_(true);
    at::Tensor ref = dense_reference(xr, docs);
    ref.backward(dout.to(torch::kDouble));
    const double es = rel_l2(out, ref), eg = rel_l2(dx, xr.grad());
    std::printf("  emulated T=%ld: rel L2 S %.2e, dS/dx %.2e\n", (long)T, es, eg);
    EXPECT_LT(es, 1e-5) << "T=" << T;
    EXPECT_LT(eg, 1e-5) << "T=" << T;
  }
}

}  // namespace
