// The fused retention-biased attention (kernels/retention_attention.*) against its explicit reference.
//
// CPU (always, CI): the reference against a scalar brute force of the same math (masks, documents, windows, the
// diagonal rule of the log-mask, GQA) and against SDPA without mods; the CPU fallback of retention_attention;
// argument checks.
// GPU (skipped without one): kernel vs the float64 reference on random inputs at S = 1, 19, 111, 989, 4097, with
// documents and windows, D = 64 and 128, GQA, non-contiguous inputs. Metric for the output and for every gradient:
// the relative L2 error ||x - ref|| / ||ref|| (float64), under 1e-2 for out and 2e-2 for the gradients (bf16
// operands land between 1e-3 and 1e-2). A determinism test: two backward passes are bitwise equal.
#include <cmath>
#include <cstdio>
#include <limits>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "common/error.h"
#include "kernels/retention_attention.h"

namespace {

using kvd::retention_attention;
using kvd::retention_attention_reference;

struct Case {
  int64_t B, H, Hkv, S, D;
  bool rate, mask, docs;
  std::optional<int64_t> window;
  bool noncontig;
};

struct Inputs {
  at::Tensor q, k, v, pos, doc, rate, mask;
};

// Random packed documents: doc ids ascending, positions restarting at 0 in each.
void make_docs(int64_t B, int64_t S, bool docs, torch::Generator gen, at::Tensor& pos, at::Tensor& doc) {
  pos = torch::empty({B, S}, torch::kLong);
  doc = torch::empty({B, S}, torch::kLong);
  auto P = pos.accessor<int64_t, 2>();
  auto Dd = doc.accessor<int64_t, 2>();
  for (int64_t b = 0; b < B; ++b) {
    int64_t d = 0, p = 0;
    for (int64_t i = 0; i < S; ++i) {
      // A new document with probability ~3/S (a few per row), never at i = 0.
      if (docs && i > 0 && torch::randint(0, S, {1}, gen).item<int64_t>() < 3) {
        ++d;
        p = 0;
      }
      P[b][i] = p++;
      Dd[b][i] = d;
    }
  }
}

Inputs make_inputs(const Case& c, c10::ScalarType dt, c10::Device dev, uint64_t seed) {
  torch::Generator gen = at::detail::createCPUGenerator(seed);
  Inputs in;
  auto opt = torch::TensorOptions().dtype(torch::kFloat);
  if (c.noncontig) {  // (B, S, H, D) storage, viewed as (B, H, S, D): the model's layout after its projections
    in.q = torch::randn({c.B, c.S, c.H, c.D}, gen, opt).transpose(1, 2);
    in.k = torch::randn({c.B, c.S, c.Hkv, c.D}, gen, opt).transpose(1, 2);
    in.v = torch::randn({c.B, c.S, c.Hkv, c.D}, gen, opt).transpose(1, 2);
  } else {
    in.q = torch::randn({c.B, c.H, c.S, c.D}, gen, opt);
    in.k = torch::randn({c.B, c.Hkv, c.S, c.D}, gen, opt);
    in.v = torch::randn({c.B, c.Hkv, c.S, c.D}, gen, opt);
  }
  make_docs(c.B, c.S, c.docs, gen, in.pos, in.doc);
  if (!c.docs) in.doc = at::Tensor();
  // log β near 0 (most decays slow, some fast), as a trained TRIM-KV gate gives.
  if (c.rate) in.rate = -torch::exp(torch::randn({c.B, c.Hkv, c.S}, gen, opt) * 1.5 - 5.0);
  if (c.mask) in.mask = torch::log_sigmoid(torch::randn({c.B, c.Hkv, c.S}, gen, opt) * 2.0 + 1.0);
  auto mv = [&](at::Tensor t, c10::ScalarType d) {
    if (!t.defined()) return t;
    at::Tensor r = t.to(dev, d);
    if (c.noncontig && r.dim() == 4) {  // keep the transposed layout on the device
      r = t.transpose(1, 2).contiguous().to(dev, d).transpose(1, 2);
    }
    return r;
  };
  in.q = mv(in.q, dt);
  in.k = mv(in.k, dt);
  in.v = mv(in.v, dt);
  in.pos = in.pos.to(dev);
  if (in.doc.defined()) in.doc = in.doc.to(dev);
  if (in.rate.defined()) in.rate = in.rate.to(dev);
  if (in.mask.defined()) in.mask = in.mask.to(dev);
  return in;
}

double rel_l2(const at::Tensor& x, const at::Tensor& ref) {
  at::Tensor a = x.to(torch::kDouble), r = ref.to(torch::kDouble).to(a.device());
  const double den = r.norm().item<double>();
  const double num = (a - r).norm().item<double>();
  return den > 0 ? num / den : num;
}

// --- CPU: the reference's semantics -------------------------------------------------------------------------

// Scalar brute force of the documented math, float64.
at::Tensor brute_force(const Inputs& in, const Case& c, double scale) {
  at::Tensor q = in.q.to(torch::kDouble).contiguous(), k = in.k.to(torch::kDouble).contiguous(),
             v = in.v.to(torch::kDouble).contiguous();
  at::Tensor out = torch::zeros({c.B, c.H, c.S, c.D}, torch::kDouble);
  auto Q = q.accessor<double, 4>(), K = k.accessor<double, 4>(), V = v.accessor<double, 4>();
  auto O = out.accessor<double, 4>();
  auto P = in.pos.accessor<int64_t, 2>();
  const int64_t G = c.H / c.Hkv;
  std::vector<double> s(c.S);
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.H; ++h) {
      const int64_t hk = h / G;
      for (int64_t i = 0; i < c.S; ++i) {
        double mx = -INFINITY;
        for (int64_t j = 0; j < c.S; ++j) {
          bool vis = j <= i;
          if (c.docs) vis = vis && in.doc[b][i].item<int64_t>() == in.doc[b][j].item<int64_t>();
          if (c.window) vis = vis && P[b][i] - P[b][j] < *c.window;
          if (!vis) {
            s[j] = -INFINITY;
            continue;
          }
          double dot = 0;
          for (int64_t d = 0; d < c.D; ++d) dot += Q[b][h][i][d] * K[b][hk][j][d];
          double x = dot * scale;
          if (c.rate) x += std::max<int64_t>(P[b][i] - P[b][j], 0) * in.rate[b][hk][j].item<double>();
          if (c.mask && j != i) x += in.mask[b][hk][j].item<double>();
          s[j] = x;
          mx = std::max(mx, x);
        }
        double den = 0;
        for (int64_t j = 0; j < c.S; ++j) den += s[j] == -INFINITY ? 0 : std::exp(s[j] - mx);
        for (int64_t j = 0; j < c.S; ++j) {
          if (s[j] == -INFINITY) continue;
          const double p = std::exp(s[j] - mx) / den;
          for (int64_t d = 0; d < c.D; ++d) O[b][h][i][d] += p * V[b][hk][j][d];
        }
      }
    }
  return out;
}

TEST(RetentionAttentionReference, MatchesBruteForce) {
  const std::vector<Case> cases = {
      {1, 2, 1, 1, 8, true, true, false, std::nullopt, false},
      {2, 4, 2, 19, 8, true, true, true, std::nullopt, false},
      {1, 3, 3, 23, 16, true, false, true, 5, true},
      {2, 6, 2, 17, 8, false, true, false, 4, false},
  };
  for (const Case& c : cases) {
    Inputs in = make_inputs(c, torch::kDouble, torch::kCPU, 7 + c.S);
    const double scale = 1.0 / std::sqrt(static_cast<double>(c.D));
    at::Tensor ref = retention_attention_reference(in.q, in.k, in.v, in.pos, in.doc, in.rate, in.mask, c.window,
                                                   scale);
    at::Tensor bf = brute_force(in, c, scale);
    EXPECT_LT(rel_l2(ref, bf), 1e-12) << "S=" << c.S << " H=" << c.H << " Hkv=" << c.Hkv;
  }
}

TEST(RetentionAttentionReference, NoModsIsCausalSdpa) {
  Case c{2, 4, 2, 33, 16, false, false, false, std::nullopt, false};
  Inputs in = make_inputs(c, torch::kDouble, torch::kCPU, 3);
  at::Tensor ref = retention_attention_reference(in.q, in.k, in.v, in.pos, {}, {}, {}, std::nullopt, 0.25);
  at::Tensor sd = at::scaled_dot_product_attention(in.q, in.k.repeat_interleave(2, 1), in.v.repeat_interleave(2, 1),
                                                   {}, 0.0, true, 0.25);
  EXPECT_LT(rel_l2(ref, sd), 1e-12);
}

TEST(RetentionAttentionReference, CpuFallbackIsDifferentiable) {
  Case c{1, 4, 2, 19, 16, true, true, true, 7, false};
  Inputs in = make_inputs(c, torch::kFloat, torch::kCPU, 5);
  at::Tensor rate = in.rate.clone().requires_grad_(true), mask = in.mask.clone().requires_grad_(true);
  at::Tensor q = in.q.clone().requires_grad_(true);
  at::Tensor out = retention_attention(q, in.k, in.v, in.pos, in.doc, rate, mask, c.window, 0.25);
  ASSERT_EQ(out.scalar_type(), torch::kFloat);
  out.square().sum().backward();
  ASSERT_TRUE(rate.grad().defined() && mask.grad().defined() && q.grad().defined());
  EXPECT_TRUE(torch::isfinite(rate.grad()).all().item<bool>());
  EXPECT_GT(rate.grad().abs().sum().item<double>(), 0.0);
}

TEST(RetentionAttentionReference, RejectsBadShapes) {
  at::Tensor q = torch::randn({1, 4, 8, 16}), k = torch::randn({1, 3, 8, 16}), pos = torch::zeros({1, 8}, torch::kLong);
  EXPECT_THROW(retention_attention(q, k, k, pos, {}, {}, {}, std::nullopt, 1.0), kvd::Error);  // 4 % 3
  at::Tensor k2 = torch::randn({1, 2, 8, 16});
  EXPECT_THROW(retention_attention(q, k2, k2, pos, {}, torch::zeros({1, 4, 8}), {}, std::nullopt, 1.0), kvd::Error);
  EXPECT_THROW(retention_attention(q, k2, k2, pos.narrow(1, 0, 7), {}, {}, {}, std::nullopt, 1.0), kvd::Error);
  EXPECT_THROW(retention_attention(q, k2, k2, pos, {}, {}, {}, 0, 1.0), kvd::Error);
}

// --- GPU: the fused kernel ----------------------------------------------------------------------------------

bool have_fused() {
  if (!torch::cuda::is_available()) return false;
  at::Tensor q = torch::empty({1, 1, 1, 64}, torch::TensorOptions().dtype(torch::kBFloat16).device(torch::kCUDA));
  return kvd::retention_attention_fused_available(q, q);
}

struct GradErrors {
  double out, dq, dk, dv, drate, dmask;
};

GradErrors compare(const Case& c, uint64_t seed) {
  Inputs in = make_inputs(c, torch::kBFloat16, torch::kCUDA, seed);
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.D));
  auto leaf = [](const at::Tensor& t) { return t.defined() ? t.detach().clone().requires_grad_(true) : t; };
  // Kernel
  at::Tensor q = leaf(in.q), k = leaf(in.k), v = leaf(in.v), rate = leaf(in.rate), mask = leaf(in.mask);
  if (c.noncontig) {  // keep the transposed layouts as leaves
    q = in.q.detach().requires_grad_(true);
    k = in.k.detach().requires_grad_(true);
    v = in.v.detach().requires_grad_(true);
  }
  at::Tensor out = retention_attention(q, k, v, in.pos, in.doc, rate, mask, c.window, scale);
  torch::Generator gen = at::detail::createCPUGenerator(seed + 1);
  at::Tensor dout = torch::randn(out.sizes(), gen).to(torch::kCUDA, torch::kBFloat16);
  out.backward(dout);
  // Reference, float64 on the GPU
  at::Tensor qr = leaf(in.q.to(torch::kDouble)), kr = leaf(in.k.to(torch::kDouble)),
             vr = leaf(in.v.to(torch::kDouble));
  at::Tensor rr = leaf(in.rate.defined() ? in.rate.to(torch::kDouble) : at::Tensor());
  at::Tensor mr = leaf(in.mask.defined() ? in.mask.to(torch::kDouble) : at::Tensor());
  at::Tensor ref = retention_attention_reference(qr, kr, vr, in.pos, in.doc, rr, mr, c.window, scale);
  ref.backward(dout.to(torch::kDouble));

  GradErrors e{};
  EXPECT_TRUE(torch::isfinite(out).all().item<bool>());
  e.out = rel_l2(out, ref);
  e.dq = rel_l2(q.grad(), qr.grad());
  e.dk = rel_l2(k.grad(), kr.grad());
  e.dv = rel_l2(v.grad(), vr.grad());
  e.drate = c.rate ? rel_l2(rate.grad(), rr.grad()) : 0.0;
  e.dmask = c.mask ? rel_l2(mask.grad(), mr.grad()) : 0.0;
  std::printf("  B=%ld H=%ld Hkv=%ld S=%ld D=%ld rate=%d mask=%d docs=%d window=%ld noncontig=%d | rel L2: out %.2e "
              "dq %.2e dk %.2e dv %.2e dkey_rate %.2e dkey_log_mask %.2e\n",
              (long)c.B, (long)c.H, (long)c.Hkv, (long)c.S, (long)c.D, c.rate, c.mask, c.docs,
              (long)(c.window ? *c.window : 0), c.noncontig, e.out, e.dq, e.dk, e.dv, e.drate, e.dmask);
  return e;
}

void expect_close(const Case& c, uint64_t seed) {
  GradErrors e = compare(c, seed);
  EXPECT_LT(e.out, 1e-2) << "S=" << c.S << " D=" << c.D;
  EXPECT_LT(e.dq, 2e-2) << "S=" << c.S << " D=" << c.D;
  EXPECT_LT(e.dk, 2e-2) << "S=" << c.S << " D=" << c.D;
  EXPECT_LT(e.dv, 2e-2) << "S=" << c.S << " D=" << c.D;
  EXPECT_LT(e.drate, 2e-2) << "S=" << c.S << " D=" << c.D;
  EXPECT_LT(e.dmask, 2e-2) << "S=" << c.S << " D=" << c.D;
}

TEST(RetentionAttentionKernel, MatchesReferenceAwkwardLengths) {
  if (!have_fused()) GTEST_SKIP() << "no CUDA device or no fused kernel in this build";
  uint64_t seed = 100;
  for (int64_t D : {64, 128}) {
    expect_close({1, 2, 1, 1, D, true, true, false, std::nullopt, false}, seed++);
    expect_close({2, 3, 1, 19, D, true, true, true, std::nullopt, false}, seed++);
    expect_close({1, 6, 2, 111, D, true, true, true, 32, true}, seed++);
    expect_close({2, 4, 4, 989, D, true, false, false, std::nullopt, false}, seed++);
    expect_close({1, 4, 2, 989, D, false, true, true, 200, true}, seed++);
    expect_close({1, 4, 2, 4097, D, true, true, true, 1000, false}, seed++);
  }
}

TEST(RetentionAttentionKernel, NoModsMatchesReference) {
  if (!have_fused()) GTEST_SKIP() << "no CUDA device or no fused kernel in this build";
  expect_close({1, 9, 3, 4097, 64, false, false, false, std::nullopt, true}, 11);
  expect_close({1, 4, 1, 777, 128, false, false, false, std::nullopt, false}, 12);
}

// The TRIM-KV case of a frozen backbone: only key_rate needs a gradient (autograd skips the dQ pass; doc ids
// shift the autograd edge of key_rate). Then only the log-mask, with q needing one.
TEST(RetentionAttentionKernel, PartialGradients) {
  if (!have_fused()) GTEST_SKIP() << "no CUDA device or no fused kernel in this build";
  for (int variant = 0; variant < 2; ++variant) {
    Case c{1, 6, 2, 700, 64, variant == 0, variant == 1, true, std::nullopt, false};
    Inputs in = make_inputs(c, torch::kBFloat16, torch::kCUDA, 77 + variant);
    const double scale = 0.125;
    at::Tensor q = in.q.detach().requires_grad_(variant == 1);
    at::Tensor leafp = (variant == 0 ? in.rate : in.mask).detach().clone().requires_grad_(true);
    at::Tensor out = retention_attention(q, in.k, in.v, in.pos, in.doc, variant == 0 ? leafp : at::Tensor(),
                                         variant == 1 ? leafp : at::Tensor(), c.window, scale);
    at::Tensor dout = torch::randn_like(out);
    out.backward(dout);
    at::Tensor qr = in.q.to(torch::kDouble).requires_grad_(variant == 1);
    at::Tensor pr = leafp.detach().to(torch::kDouble).requires_grad_(true);
    at::Tensor ref = retention_attention_reference(qr, in.k.to(torch::kDouble), in.v.to(torch::kDouble), in.pos, in.doc, variant == 0 ? pr : at::Tensor(),
                                                   variant == 1 ? pr : at::Tensor(), c.window, scale);
    ref.backward(dout.to(torch::kDouble));
    ASSERT_TRUE(leafp.grad().defined());
    const double e = rel_l2(leafp.grad(), pr.grad());
    std::printf("  partial grads, variant %d: rel L2 %.2e\n", variant, e);
    EXPECT_LT(e, 2e-2);
    if (variant == 1) EXPECT_LT(rel_l2(q.grad(), qr.grad()), 2e-2);
  }
}

TEST(RetentionAttentionKernel, BackwardIsDeterministic) {
  if (!have_fused()) GTEST_SKIP() << "no CUDA device or no fused kernel in this build";
  Case c{2, 6, 2, 1500, 128, true, true, true, 700, false};
  Inputs in = make_inputs(c, torch::kBFloat16, torch::kCUDA, 42);
  kvd::RetentionAttentionForward f =
      kvd::retention_attention_forward(in.q, in.k, in.v, in.pos, in.doc, in.rate, in.mask, c.window, 0.088);
  at::Tensor dout = torch::randn_like(f.out);
  auto run = [&] {
    return kvd::retention_attention_backward(dout, in.q, in.k, in.v, f, in.pos, in.doc, in.rate, in.mask, c.window,
                                             0.088);
  };
  kvd::RetentionAttentionGrads a = run(), b = run();
  EXPECT_TRUE(torch::equal(a.dq, b.dq));
  EXPECT_TRUE(torch::equal(a.dk, b.dk));
  EXPECT_TRUE(torch::equal(a.dv, b.dv));
  EXPECT_TRUE(torch::equal(a.dkey_rate, b.dkey_rate));
  EXPECT_TRUE(torch::equal(a.dkey_log_mask, b.dkey_log_mask));
  // The forward too.
  kvd::RetentionAttentionForward f2 =
      kvd::retention_attention_forward(in.q, in.k, in.v, in.pos, in.doc, in.rate, in.mask, c.window, 0.088);
  EXPECT_TRUE(torch::equal(f.out, f2.out));
  EXPECT_TRUE(torch::equal(f.lse, f2.lse));
}

TEST(RetentionAttentionKernel, WritesEveryOutput) {
  if (!have_fused()) GTEST_SKIP() << "no CUDA device or no fused kernel in this build";
  // Poison: fill then free a large block, so that the caching allocator hands NaN-filled memory to the outputs;
  // an element the kernels never write stays NaN.
  Case c{1, 4, 2, 333, 64, true, true, true, 50, false};
  Inputs in = make_inputs(c, torch::kBFloat16, torch::kCUDA, 9);
  {
    std::vector<at::Tensor> poison;  // small blocks: the allocator's small pool serves outputs under 1 MB
    for (int i = 0; i < 64; ++i)
      poison.push_back(torch::full({int64_t{1} << 17}, NAN, torch::TensorOptions().device(torch::kCUDA)));
  }
  kvd::RetentionAttentionForward f =
      kvd::retention_attention_forward(in.q, in.k, in.v, in.pos, in.doc, in.rate, in.mask, c.window, 0.125);
  EXPECT_TRUE(torch::isfinite(f.out).all().item<bool>());
  EXPECT_TRUE(torch::isfinite(f.lse).all().item<bool>());
  kvd::RetentionAttentionGrads g = kvd::retention_attention_backward(torch::randn_like(f.out), in.q, in.k, in.v, f,
                                                                     in.pos, in.doc, in.rate, in.mask, c.window, 0.125);
  for (const at::Tensor& t : {g.dq, g.dk, g.dv, g.dkey_rate, g.dkey_log_mask})
    EXPECT_TRUE(torch::isfinite(t).all().item<bool>());
}

}  // namespace
