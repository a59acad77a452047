// The row kernels of a decode step (kernels/decode_step.cu: RMSNorm with the residual add, RoPE, SiLU · up, the
// fixed-shape append) on the CPU through the SIMT emulator, against the LibTorch references of
// kernels/decode_step.h on the same bf16 inputs. Metric: the largest distance in bf16 units in the last place.
// RoPE, the residual sum and the append must be bitwise equal; SiLU · up may differ by 1 unit (exp) and RMSNorm by
// 2 (the mean's summation order may move the normalized value by 1 unit before the product with w). Runs in CI.
#define KVD_SIMT_EMULATION 1
#include "kernels/decode_step.cu"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "kernels/decode_step.h"
#include "tests/kernels/decode_step_cases.h"

namespace {

namespace emu = kvd::kernels::emulated;
using kvd_test::bf16_randn;
using kvd_test::max_ulps;

const uint16_t* in(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr()); }
uint16_t* out(const at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr()); }

TEST(DecodeStepEmulated, RmsNormMatchesTheReference) {
  uint64_t seed = 1;
  for (int64_t n : {64, 576, 1000}) {
    for (bool residual : {false, true}) {
      const at::Tensor x = bf16_randn({3, n}, seed++, 3.0), r = bf16_randn({3, n}, seed++, 2.0);
      const at::Tensor w = bf16_randn({n}, seed++);
      const double eps = 1e-5;
      at::Tensor y = torch::full({3, n}, NAN).to(torch::kBFloat16), sum = torch::full({3, n}, NAN).to(torch::kBFloat16);
      kvd::kernels::RmsNormArgs a;
      a.x = in(x), a.residual = residual ? in(r) : nullptr, a.w = in(w), a.sum = residual ? out(sum) : nullptr;
      a.y = out(y), a.rows = 3, a.n = static_cast<int>(n), a.eps = static_cast<float>(eps);
      ASSERT_EQ(emu::rms_norm(a, nullptr), cudaSuccess);
      if (residual) {
        const kvd::AddRmsNorm ref = kvd::add_rms_norm(x, r, w, eps);
        EXPECT_EQ(max_ulps(sum, ref.sum), 0) << "n " << n;
        EXPECT_LE(max_ulps(y, ref.normed), 2) << "n " << n;
      } else {
        EXPECT_LE(max_ulps(y, kvd::rms_norm(x, w, eps)), 2) << "n " << n;
      }
    }
  }
}

// RMSNorm's backward (training, w frozen) against float64 and against LibTorch's autograd through the reference
// chain on the same bf16 inputs. dx = r·u − x·r³·mean(u·x) is a difference, so the metric is relative to the size
// of its terms: |dx − ref| ≤ 2⁻⁸·|ref| (one bf16 rounding) + 1e-5·(r·|u| + |x|·|c|) (fp32 sums in another order).
TEST(DecodeStepEmulated, RmsNormBackwardMatchesFloat64AndAutograd) {
  uint64_t seed = 100;
  for (int64_t n : {64, 576, 1000}) {
    const int64_t rows = 3;
    const at::Tensor x = bf16_randn({rows, n}, seed++, 3.0), w = bf16_randn({n}, seed++);
    const at::Tensor dy = bf16_randn({rows, n}, seed++, 0.5);
    const double eps = 1e-5;
    at::Tensor dx = torch::full({rows, n}, NAN).to(torch::kBFloat16);
    kvd::kernels::RmsNormBwdArgs a;
    a.x = in(x), a.w = in(w), a.dy = in(dy), a.dx = out(dx), a.rows = rows, a.n = static_cast<int>(n);
    a.eps = static_cast<float>(eps);
    ASSERT_EQ(emu::rms_norm_bwd(a, nullptr), cudaSuccess);
    // float64 from the same rounded u = bf16(dy · w)
    const at::Tensor u = (dy * w).to(torch::kDouble), xd = x.to(torch::kDouble);
    const at::Tensor r = torch::rsqrt(xd.pow(2).mean(-1, true) + eps);           // (rows, 1)
    const at::Tensor c = r.pow(3) * (u * xd).mean(-1, true);                     // (rows, 1)
    const at::Tensor ref = r * u - xd * c;                                        // (rows, n)
    const at::Tensor scale = r * u.abs() + xd.abs() * c.abs();
    const at::Tensor got = dx.to(torch::kDouble);
    EXPECT_EQ((got - ref).abs().gt(ref.abs() / 256 + scale * 1e-5).sum().item<int64_t>(), 0)
        << "n " << n << ": largest difference " << (got - ref).abs().max().item<double>();
    // LibTorch's autograd through the reference chain (bf16, CPU)
    const at::Tensor xg = x.clone().requires_grad_(true);
    kvd::rms_norm(xg, w, eps).backward(dy);
    const at::Tensor ag = xg.grad().to(torch::kDouble);
    EXPECT_EQ((got - ag).abs().gt(ag.abs() / 128 + scale * 1e-5).sum().item<int64_t>(), 0)
        << "n " << n << ": largest difference to autograd " << (got - ag).abs().max().item<double>();
  }
}

TEST(DecodeStepEmulated, RopeIsBitwiseTheReference) {
  for (int64_t hd : {64, 128}) {
    const int64_t B = 2, S = 3, H = 4, Hkv = 2;
    const at::Tensor qm = bf16_randn({B, S, H, hd}, 10 + hd), km = bf16_randn({B, S, Hkv, hd}, 11 + hd);
    // cos / sin of real angles, as the model builds them.
    const at::Tensor ang = torch::rand({B, 1, S, hd / 2}, at::detail::createCPUGenerator(12), torch::kDouble) * 100;
    const at::Tensor cos = torch::cat({ang, ang}, -1).cos().to(torch::kFloat).to(torch::kBFloat16);
    const at::Tensor sin = torch::cat({ang, ang}, -1).sin().to(torch::kFloat).to(torch::kBFloat16);
    at::Tensor qo = torch::full({B, S, H, hd}, NAN).to(torch::kBFloat16);
    at::Tensor ko = torch::full({B, S, Hkv, hd}, NAN).to(torch::kBFloat16);
    kvd::kernels::RopeArgs a;
    a.q = in(qm), a.k = in(km), a.cos = in(cos), a.sin = in(sin), a.q_out = out(qo), a.k_out = out(ko);
    a.tokens = B * S, a.H = H, a.Hkv = Hkv, a.hd = static_cast<int>(hd);
    ASSERT_EQ(emu::rope(a, nullptr), cudaSuccess);
    const auto [qr, kr] = kvd::rope(qm.transpose(1, 2), km.transpose(1, 2), cos, sin);  // (B, H, S, hd)
    EXPECT_EQ(max_ulps(qo.transpose(1, 2), qr), 0) << "hd " << hd;
    EXPECT_EQ(max_ulps(ko.transpose(1, 2), kr), 0) << "hd " << hd;
  }
}

// RoPE's backward pass (training): the gradients autograd computes through the LibTorch reference chain on the same
// bf16 inputs, bitwise, and the float64 transpose within one rounding.
TEST(DecodeStepEmulated, RopeBackwardIsBitwiseAutogradThroughTheReference) {
  for (int64_t hd : {64, 128}) {
    const int64_t B = 2, S = 3, H = 4, Hkv = 2;
    const at::Tensor dqm = bf16_randn({B, S, H, hd}, 40 + hd), dkm = bf16_randn({B, S, Hkv, hd}, 41 + hd);
    const at::Tensor ang = torch::rand({B, 1, S, hd / 2}, at::detail::createCPUGenerator(42), torch::kDouble) * 100;
    const at::Tensor cos = torch::cat({ang, ang}, -1).cos().to(torch::kFloat).to(torch::kBFloat16);
    const at::Tensor sin = torch::cat({ang, ang}, -1).sin().to(torch::kFloat).to(torch::kBFloat16);
    at::Tensor gq = torch::full({B, S, H, hd}, NAN).to(torch::kBFloat16);
    at::Tensor gk = torch::full({B, S, Hkv, hd}, NAN).to(torch::kBFloat16);
    kvd::kernels::RopeArgs a;
    a.pass = kvd::kernels::RopePass::Backward;
    a.q = in(dqm), a.k = in(dkm), a.cos = in(cos), a.sin = in(sin), a.q_out = out(gq), a.k_out = out(gk);
    a.tokens = B * S, a.H = H, a.Hkv = Hkv, a.hd = static_cast<int>(hd);
    ASSERT_EQ(emu::rope(a, nullptr), cudaSuccess);
    const at::Tensor q = bf16_randn({B, H, S, hd}, 43).requires_grad_(true);
    const at::Tensor k = bf16_randn({B, Hkv, S, hd}, 44).requires_grad_(true);
    const auto [qr, kr] = kvd::rope(q, k, cos, sin);
    torch::autograd::backward({qr, kr}, {dqm.transpose(1, 2), dkm.transpose(1, 2)});
    EXPECT_EQ(max_ulps(gq.transpose(1, 2), q.grad()), 0) << "hd " << hd;
    EXPECT_EQ(max_ulps(gk.transpose(1, 2), k.grad()), 0) << "hd " << hd;
    // float64: dx = dy·cos − rotate_half(dy·sin) with rotate_half(z) = (−z₂, z₁), i.e. the rotation by −angle.
    const at::Tensor dy = dqm.transpose(1, 2).to(torch::kDouble), c = cos.to(torch::kDouble), s = sin.to(torch::kDouble);
    const at::Tensor z = dy * s;
    const at::Tensor rz = torch::cat({-z.narrow(-1, hd / 2, hd / 2), z.narrow(-1, 0, hd / 2)}, -1);
    const at::Tensor ref = dy * c - rz;
    const at::Tensor got = gq.transpose(1, 2).to(torch::kDouble);
    EXPECT_LE((got - ref).abs().max().item<double>(), 3 * (dy.abs() * (c.abs() + s.abs())).max().item<double>() / 256)
        << "hd " << hd;
  }
}

// SiLU · up's backward (training): against autograd through the LibTorch chain (bf16, CPU) within 1 bf16 unit (exp
// and the product's order), and against float64 from the same rounded intermediate values within 2⁻⁸ relative.
TEST(DecodeStepEmulated, SiluMulBackwardMatchesAutogradAndFloat64) {
  const int64_t n = 1537;
  const at::Tensor g = bf16_randn({n}, 50, 4.0), u = bf16_randn({n}, 51, 2.0), dy = bf16_randn({n}, 52, 0.5);
  at::Tensor dg = torch::full({n}, NAN).to(torch::kBFloat16), du = torch::full({n}, NAN).to(torch::kBFloat16);
  kvd::kernels::SiluMulBwdArgs a;
  a.g = in(g), a.u = in(u), a.dy = in(dy), a.dg = out(dg), a.du = out(du), a.n = n;
  ASSERT_EQ(emu::silu_mul_bwd(a, nullptr), cudaSuccess);
  const at::Tensor gg = g.clone().requires_grad_(true), ug = u.clone().requires_grad_(true);
  kvd::silu_mul(gg, ug).backward(dy);
  EXPECT_LE(max_ulps(dg, gg.grad()), 1);
  EXPECT_LE(max_ulps(du, ug.grad()), 1);
  const at::Tensor gd = g.to(torch::kDouble), sig = torch::sigmoid(gd);
  const at::Tensor t = (dy * u).to(torch::kDouble);  // bf16(dy · u), as the chain rounds it
  const at::Tensor ref_dg = t * sig * (1 + gd * (1 - sig));
  EXPECT_LE(((dg.to(torch::kDouble) - ref_dg).abs() - ref_dg.abs() / 256).max().item<double>(), 1e-6);
  // A mutation check on the hand-derived formula: silu's derivative is not σ alone.
  EXPECT_GT((dg.to(torch::kDouble) - t * sig).abs().max().item<double>(), 0.1);
}

TEST(DecodeStepEmulated, SiluMulMatchesTheReference) {
  const int64_t n = 1537;  // several CTAs, a ragged tail
  const at::Tensor g = bf16_randn({n}, 20, 4.0), u = bf16_randn({n}, 21, 2.0);
  at::Tensor o = torch::full({n}, NAN).to(torch::kBFloat16);
  kvd::kernels::SiluMulArgs a;
  a.g = in(g), a.u = in(u), a.out = out(o), a.n = n;
  ASSERT_EQ(emu::silu_mul(a, nullptr), cudaSuccess);
  EXPECT_LE(max_ulps(o, kvd::silu_mul(g, u)), 1);
}

TEST(DecodeStepEmulated, AppendWritesEachSegmentsNextSlot) {
  const int64_t B = 2, Hkv = 3, hd = 64, C = 5, S = B * Hkv;
  const at::Tensor k = bf16_randn({B, Hkv, hd}, 30), v = bf16_randn({B, Hkv, hd}, 31);
  const at::Tensor qpos = torch::tensor({17, 4}, torch::kLong);
  // Segments in reverse order in the storage, with different fills.
  const at::Tensor start = (torch::arange(S, torch::kLong).flip(0) * C).contiguous();
  const at::Tensor len0 = torch::tensor({0, 4, 2, 1, 3, 0}, torch::kLong);
  auto fresh = [&] {
    return std::vector<at::Tensor>{bf16_randn({S * C, hd}, 32), bf16_randn({S * C, hd}, 33),
                                   torch::full({S * C}, -1, torch::kLong), len0.clone()};
  };
  std::vector<at::Tensor> mine = fresh(), ref = fresh();
  kvd::kernels::DecodeAppendArgs a;
  a.k = in(k), a.v = in(v), a.qpos = qpos.data_ptr<int64_t>(), a.start = start.data_ptr<int64_t>();
  a.len = mine[3].data_ptr<int64_t>(), a.k_store = out(mine[0]), a.v_store = out(mine[1]);
  a.pos_store = mine[2].data_ptr<int64_t>(), a.B = B, a.Hkv = Hkv, a.hd = hd;
  ASSERT_EQ(emu::decode_append(a, nullptr), cudaSuccess);
  kvd::DecodeAppend r{k, v, qpos, start, ref[3], ref[0], ref[1], ref[2]};
  kvd::decode_append(r);
  for (int i = 0; i < 4; ++i) EXPECT_TRUE(torch::equal(mine[i], ref[i])) << "tensor " << i;
  EXPECT_TRUE(torch::equal(mine[3], len0 + 1));
  // Hand-checked: segment 1 (row 0, head 1) lives at rows 20..24 and held 4 entries: slot 24 gets k[0, 1].
  EXPECT_TRUE(torch::equal(mine[0][4 * C + 4], k[0][1]));
  EXPECT_EQ(mine[2][4 * C + 4].item<int64_t>(), 17);
}

TEST(DecodeStepEmulated, RefusesBadShapes) {
  kvd::kernels::RopeArgs r;
  r.tokens = 1, r.H = 1, r.Hkv = 1, r.hd = 63;  // odd head dim
  EXPECT_EQ(emu::rope(r, nullptr), cudaErrorInvalidValue);
  kvd::kernels::RmsNormArgs n;
  n.rows = 1, n.n = 8, n.residual = reinterpret_cast<const uint16_t*>(&n);  // a residual without its sum
  EXPECT_EQ(emu::rms_norm(n, nullptr), cudaErrorInvalidValue);
  kvd::kernels::SiluMulBwdArgs sb;
  sb.n = 8;  // no tensors
  EXPECT_EQ(emu::silu_mul_bwd(sb, nullptr), cudaErrorInvalidValue);
  kvd::kernels::RmsNormBwdArgs nb;
  nb.rows = 1, nb.n = 8;  // no tensors
  EXPECT_EQ(emu::rms_norm_bwd(nb, nullptr), cudaErrorInvalidValue);
  kvd::kernels::DecodeAppendArgs d;
  d.B = 1, d.Hkv = 1, d.hd = 2048;
  EXPECT_EQ(emu::decode_append(d, nullptr), cudaErrorInvalidValue);
}

}  // namespace
