// The row kernels of a decode step (kernels/decode_step.*) on the GPU against their LibTorch references on the same
// device and inputs. Metric: the largest distance in bf16 units in the last place: 0 for RoPE, the residual sum and
// the append; at most 2 for RMSNorm (the mean's summation order may move the normalized value by 1 unit, which
// the product with w can make 2) and 1 for SiLU · up (exp). Also the layouts the decoder hands them
// (a projection's output viewed and transposed, Qwen3's per-head norm) and the fall-back to the reference. Skipped
// without a GPU; the kernels' code runs in CI through the emulator (emu_decode_step).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "kernels/decode_step.h"
#include "tests/kernels/decode_step_cases.h"

namespace {

using kvd::KernelPath;
using kvd_test::bf16_randn;
using kvd_test::max_ulps;

at::Tensor cuda(const at::Tensor& t) { return t.to(torch::kCUDA); }

TEST(DecodeStepKernels, MatchTheReferences) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  const at::Tensor probe = cuda(bf16_randn({4}, 1));
  if (!kvd::row_kernels_apply({probe})) GTEST_SKIP() << "no fused kernels in this build";
  for (int64_t n : {64, 576, 4096}) {
    const at::Tensor x = cuda(bf16_randn({16, 1, n}, n, 3.0)), r = cuda(bf16_randn({16, 1, n}, n + 1, 2.0));
    const at::Tensor w = cuda(bf16_randn({n}, n + 2));
    EXPECT_LE(max_ulps(kvd::rms_norm(x, w, 1e-5, KernelPath::Fused), kvd::rms_norm(x, w, 1e-5)), 2) << n;
    const kvd::AddRmsNorm f = kvd::add_rms_norm(x, r, w, 1e-6, KernelPath::Fused), ref = kvd::add_rms_norm(x, r, w, 1e-6);
    EXPECT_EQ(max_ulps(f.sum, ref.sum), 0) << n;
    EXPECT_LE(max_ulps(f.normed, ref.normed), 2) << n;
    const at::Tensor g = cuda(bf16_randn({16, 1, n}, n + 3, 4.0));
    EXPECT_LE(max_ulps(kvd::silu_mul(g, r, KernelPath::Fused), kvd::silu_mul(g, r)), 1) << n;
  }
  for (int64_t hd : {64, 128}) {
    for (int64_t S : {1, 7}) {
      const int64_t B = 3, H = 8, Hkv = 2;
      // Projection outputs (B, S, heads * hd) viewed and transposed, as the decoder layer hands them over.
      const at::Tensor q = cuda(bf16_randn({B, S, H * hd}, hd + S)).view({B, S, H, hd}).transpose(1, 2);
      const at::Tensor k = cuda(bf16_randn({B, S, Hkv * hd}, hd + S + 1)).view({B, S, Hkv, hd}).transpose(1, 2);
      const at::Tensor ang = torch::rand({B, 1, S, hd / 2}, torch::kDouble) * 4096;
      const at::Tensor cos = cuda(torch::cat({ang, ang}, -1).cos().to(torch::kFloat).to(torch::kBFloat16));
      const at::Tensor sin = cuda(torch::cat({ang, ang}, -1).sin().to(torch::kFloat).to(torch::kBFloat16));
      const auto [qf, kf] = kvd::rope(q, k, cos, sin, KernelPath::Fused);
      const auto [qr, kr] = kvd::rope(q, k, cos, sin);
      EXPECT_EQ(max_ulps(qf, qr), 0) << hd << " " << S;
      EXPECT_EQ(max_ulps(kf, kr), 0) << hd << " " << S;
      // Qwen3's per-head norm on the transposed view: the result keeps its layout.
      const at::Tensor wn = cuda(bf16_randn({hd}, 7));
      const at::Tensor qn = kvd::rms_norm(q, wn, 1e-6, KernelPath::Fused);
      EXPECT_EQ(qn.strides(), q.strides());
      EXPECT_LE(max_ulps(qn, kvd::rms_norm(q, wn, 1e-6)), 2);
    }
  }
}

TEST(DecodeStepKernels, AppendMatchesTheReference) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  const int64_t B = 5, Hkv = 4, hd = 128, C = 9, S = B * Hkv;
  const at::Tensor k = cuda(bf16_randn({B, Hkv, hd}, 40)), v = cuda(bf16_randn({B, Hkv, hd}, 41));
  const at::Tensor qpos = cuda(torch::randint(0, 5000, {B}, torch::kLong));
  const at::Tensor start = cuda(torch::randperm(S, torch::kLong) * C);
  const at::Tensor len0 = cuda(torch::randint(0, C, {S}, torch::kLong));
  auto fresh = [&] {
    return std::vector<at::Tensor>{cuda(bf16_randn({S * C, hd}, 42)), cuda(bf16_randn({S * C, hd}, 43)),
                                   cuda(torch::full({S * C}, -1, torch::kLong)), len0.clone()};
  };
  std::vector<at::Tensor> f = fresh(), r = fresh();
  kvd::decode_append({k, v, qpos, start, f[3], f[0], f[1], f[2]}, KernelPath::Fused);
  kvd::decode_append({k, v, qpos, start, r[3], r[0], r[1], r[2]});
  for (int i = 0; i < 4; ++i) EXPECT_TRUE(torch::equal(f[i], r[i])) << "tensor " << i;
}

// Training: RMSNorm where x needs a gradient runs the forward kernel and kernels::rms_norm_bwd through autograd.
// Metric as in emu_decode_step: |dx − ref| ≤ 2⁻⁷·|ref| + 1e-5 · the size of dx's two terms (taken from float64).
TEST(DecodeStepKernels, RmsNormGradientMatchesAutogradThroughTheReference) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  if (!kvd::row_kernels_apply({cuda(bf16_randn({4}, 1))})) GTEST_SKIP() << "no fused kernels in this build";
  for (int64_t n : {64, 576, 4096}) {
    const at::Tensor x = cuda(bf16_randn({2, 33, n}, n, 3.0)), r = cuda(bf16_randn({2, 33, n}, n + 1, 2.0));
    const at::Tensor w = cuda(bf16_randn({n}, n + 2)), dy = cuda(bf16_randn({2, 33, n}, n + 3, 0.5));
    for (bool residual : {false, true}) {
      auto grads = [&](KernelPath path) {
        const at::Tensor xg = x.clone().requires_grad_(true);
        const at::Tensor y = residual ? kvd::add_rms_norm(xg, r, w, 1e-5, path).normed : kvd::rms_norm(xg, w, 1e-5, path);
        EXPECT_TRUE(y.requires_grad());
        y.backward(dy);
        return std::make_pair(y.detach(), xg.grad());
      };
      const auto [yf, gf] = grads(KernelPath::Fused);
      const auto [yr, gr] = grads(KernelPath::Reference);
      EXPECT_LE(max_ulps(yf, yr), 2) << n;
      const at::Tensor s = residual ? (x + r).to(torch::kDouble) : x.to(torch::kDouble);
      const at::Tensor u = (dy * w).to(torch::kDouble);
      const at::Tensor rs = torch::rsqrt(s.pow(2).mean(-1, true) + 1e-5);
      const at::Tensor scale = rs * u.abs() + s.abs() * (rs.pow(3) * (u * s).mean(-1, true)).abs();
      const at::Tensor a = gf.to(torch::kDouble), b = gr.to(torch::kDouble);
      EXPECT_EQ((a - b).abs().gt(b.abs() / 128 + scale * 1e-5).sum().item<int64_t>(), 0)
          << "n " << n << " residual " << residual << ": largest difference " << (a - b).abs().max().item<double>();
      // deterministic
      EXPECT_TRUE(torch::equal(grads(KernelPath::Fused).second, gf));
    }
  }
}

// Training: RoPE (q / k from a projection, viewed and transposed) and SiLU · up where inputs need gradients run the
// forward kernels and their backward kernels through autograd. Metric: bf16 units in the last place against
// LibTorch's autograd through the references: 0 for RoPE, at most 1 for SiLU · up (exp). Also a RoPE whose k output
// gets no gradient, and two backward passes bitwise equal.
TEST(DecodeStepKernels, RopeAndSiluMulGradientsMatchAutogradThroughTheReferences) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  if (!kvd::row_kernels_apply({cuda(bf16_randn({4}, 1))})) GTEST_SKIP() << "no fused kernels in this build";
  const int64_t B = 2, S = 37, H = 9, Hkv = 3;
  for (int64_t hd : {64, 128}) {
    const at::Tensor pq = cuda(bf16_randn({B, S, H * hd}, hd)), pk = cuda(bf16_randn({B, S, Hkv * hd}, hd + 1));
    const at::Tensor ang = torch::rand({B, 1, S, hd / 2}, torch::kDouble) * 4096;
    const at::Tensor cos = cuda(torch::cat({ang, ang}, -1).cos().to(torch::kFloat).to(torch::kBFloat16));
    const at::Tensor sin = cuda(torch::cat({ang, ang}, -1).sin().to(torch::kFloat).to(torch::kBFloat16));
    const at::Tensor dq = cuda(bf16_randn({B, H, S, hd}, hd + 2)), dk = cuda(bf16_randn({B, Hkv, S, hd}, hd + 3));
    for (bool k_used : {true, false}) {
      auto grads = [&](KernelPath path) {
        const at::Tensor q0 = pq.clone().requires_grad_(true), k0 = pk.clone().requires_grad_(true);
        const at::Tensor q = q0.view({B, S, H, hd}).transpose(1, 2), k = k0.view({B, S, Hkv, hd}).transpose(1, 2);
        const auto [qo, ko] = kvd::rope(q, k, cos, sin, path);
        EXPECT_TRUE(qo.requires_grad() && ko.requires_grad());
        const at::Tensor loss = (qo.to(torch::kFloat) * dq.to(torch::kFloat)).sum() +
                                (k_used ? (ko.to(torch::kFloat) * dk.to(torch::kFloat)).sum() : torch::zeros({}, dq.options().dtype(torch::kFloat)));
        loss.backward();
        return std::make_tuple(qo.detach(), q0.grad(), k_used ? k0.grad() : torch::zeros_like(pk));
      };
      const auto [of, gqf, gkf] = grads(KernelPath::Fused);
      const auto [orf, gqr, gkr] = grads(KernelPath::Reference);
      EXPECT_EQ(max_ulps(of, orf), 0) << hd;
      EXPECT_EQ(max_ulps(gqf, gqr), 0) << hd << " k used " << k_used;
      if (k_used) EXPECT_EQ(max_ulps(gkf, gkr), 0) << hd;
      EXPECT_TRUE(torch::equal(std::get<1>(grads(KernelPath::Fused)), gqf));
    }
  }
  const int64_t n = 3 * 37 * 1536 + 5;
  const at::Tensor g = cuda(bf16_randn({n}, 60, 4.0)), u = cuda(bf16_randn({n}, 61, 2.0)), dy = cuda(bf16_randn({n}, 62));
  auto silu_grads = [&](KernelPath path) {
    const at::Tensor gg = g.clone().requires_grad_(true), ug = u.clone().requires_grad_(true);
    const at::Tensor y = kvd::silu_mul(gg, ug, path);
    EXPECT_TRUE(y.requires_grad());
    y.backward(dy);
    return std::make_tuple(y.detach(), gg.grad(), ug.grad());
  };
  const auto [yf, dgf, duf] = silu_grads(KernelPath::Fused);
  const auto [yr, dgr, dur] = silu_grads(KernelPath::Reference);
  EXPECT_LE(max_ulps(yf, yr), 1);
  EXPECT_LE(max_ulps(dgf, dgr), 1);
  EXPECT_LE(max_ulps(duf, dur), 1);
}

TEST(DecodeStepKernels, FallBackWhereTheyDoNotApply) {
  // float32, or a tensor that requires grad: the reference runs (any device).
  const c10::Device dev = torch::cuda::is_available() ? c10::Device(torch::kCUDA) : c10::Device(torch::kCPU);
  const at::Tensor x = torch::randn({4, 64}).to(dev), w = torch::randn({64}).to(dev).requires_grad_(true);
  EXPECT_FALSE(kvd::row_kernels_apply({x, w}));
  const at::Tensor y = kvd::rms_norm(x, w, 1e-6, KernelPath::Fused);
  EXPECT_TRUE(y.requires_grad());
  EXPECT_TRUE(torch::allclose(y, kvd::rms_norm(x, w, 1e-6)));
  // bf16 on CUDA that requires grad: the inference kernels only where grad mode is off (nothing is recorded).
  if (!torch::cuda::is_available()) return;
  const at::Tensor xb = cuda(bf16_randn({4, 64}, 3)).requires_grad_(true), wb = cuda(bf16_randn({64}, 4));
  if (!kvd::row_kernels_apply({wb})) return;  // no fused kernels in this build
  EXPECT_FALSE(kvd::row_kernels_apply({xb, wb}));
  torch::NoGradGuard no_grad;
  EXPECT_TRUE(kvd::row_kernels_apply({xb, wb}));
  EXPECT_FALSE(kvd::rms_norm(xb, wb, 1e-6, KernelPath::Fused).requires_grad());
}

}  // namespace
