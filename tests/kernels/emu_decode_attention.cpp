// The ragged decode attention kernel's own code (kernels/decode_attention.cu) on the CPU through the SIMT emulator,
// against a naive float64 loop (tests/kernels/decode_attention_cases.h) on bf16 inputs. Metric: elementwise
// |out - ref| <= 8e-3 * max(1, |ref|) (the bf16 rounding of the output is 2^-9 relative); one to several splits per
// head (9: the merge's 4 groups take 2 or 3 splits each), so the split merge is exercised. Runs in CI.
#define KVD_SIMT_EMULATION 1
#include "kernels/decode_attention.cu"

#include <cstdio>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "tests/kernels/decode_attention_cases.h"

namespace {

at::Tensor run_emulated(const kvd::DecodeAttentionInput& in, int splits) {
  const int64_t B = in.q.size(0), H = in.q.size(1), hd = in.q.size(2);
  kvd::kernels::DecodeAttentionArgs a;
  a.B = static_cast<int>(B);
  a.H = static_cast<int>(H);
  a.Hkv = static_cast<int>(in.start.size(0) / B);
  a.hd = static_cast<int>(hd);
  a.max_len = in.max_len;
  a.splits = splits;
  a.scale = static_cast<float>(in.scale);
  a.window = in.window ? *in.window : 0;
  a.holes = in.empty_slots == kvd::EmptySlots::NegativePosition ? 1 : 0;
  at::Tensor q = in.q.contiguous(), k = in.k.contiguous(), v = in.v.contiguous();
  at::Tensor part_o = torch::full({splits + 1, B * H, hd}, NAN), part_ml = torch::full({splits + 1, B * H, 2}, NAN);
  at::Tensor out = torch::full({B, H, hd}, NAN).to(torch::kBFloat16);
  a.q = reinterpret_cast<const uint16_t*>(q.data_ptr());
  a.k = reinterpret_cast<const uint16_t*>(k.data_ptr());
  a.v = reinterpret_cast<const uint16_t*>(v.data_ptr());
  a.start = in.start.data_ptr<int64_t>();
  a.len = in.len.data_ptr<int64_t>();
  a.kpos = in.kpos.data_ptr<int64_t>();
  a.qpos = in.qpos.data_ptr<int64_t>();
  a.part_o = part_o.data_ptr<float>();
  a.part_ml = part_ml.data_ptr<float>();
  a.out = reinterpret_cast<uint16_t*>(out.data_ptr());
  EXPECT_EQ(kvd::kernels::emulated::decode_attention(a, nullptr), cudaSuccess);
  return out;
}

TEST(DecodeAttentionEmulated, MatchesNaiveReference) {
  uint64_t seed = 1;
  for (const kvd_test::DecodeCase& c : kvd_test::decode_cases(false)) {
    const kvd::DecodeAttentionInput in = kvd_test::make_decode_input(c, seed++);
    const at::Tensor ref = kvd_test::naive_decode_attention(in);
    for (int splits : {1, 3, 9, kvd::kernels::emulated::decode_attention_splits(static_cast<int>(c.B * c.Hkv), c.max_len,
                                                                                   static_cast<int>(c.hd), static_cast<int>(c.H / c.Hkv))}) {
      const double err = kvd_test::decode_error(run_emulated(in, splits), ref);
      std::printf("  B %ld H %ld H_kv %ld hd %ld max_len %ld window %ld splits %d: error %.2e\n", (long)c.B,
                  (long)c.H, (long)c.Hkv, (long)c.hd, (long)c.max_len, (long)c.window.value_or(0), splits, err);
      EXPECT_LE(err, 8e-3);
    }
  }
}

TEST(DecodeAttentionEmulated, RefusesUnsupportedShapes) {
  kvd::kernels::DecodeAttentionArgs a;
  a.B = 1, a.H = 4, a.Hkv = 1, a.hd = 96, a.splits = 1;  // head dim 96
  EXPECT_EQ(kvd::kernels::emulated::decode_attention(a, nullptr), cudaErrorInvalidValue);
  a.hd = 64, a.H = 18, a.Hkv = 2;  // G = 9 > 8
  EXPECT_EQ(kvd::kernels::emulated::decode_attention(a, nullptr), cudaErrorInvalidValue);
}

// The LibTorch reference (what CPU runs and unsupported shapes use) against the same loops, in float64.
TEST(DecodeAttentionReference, MatchesNaiveReference) {
  uint64_t seed = 100;
  for (const kvd_test::DecodeCase& c : kvd_test::decode_cases(false)) {
    kvd::DecodeAttentionInput in = kvd_test::make_decode_input(c, seed++);
    in.q = in.q.to(torch::kDouble), in.k = in.k.to(torch::kDouble), in.v = in.v.to(torch::kDouble);
    const double err = kvd_test::decode_error(kvd::decode_attention_reference(in), kvd_test::naive_decode_attention(in));
    EXPECT_LE(err, 1e-12) << "max_len " << c.max_len;
  }
}

}  // namespace
