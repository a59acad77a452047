// The ragged decode attention kernel (kernels/decode_attention.*) on the GPU against a naive float64 loop
// (tests/kernels/decode_attention_cases.h): awkward lengths (0, 1, 19, 111, 989, 4097, up to 8192), GQA groups 1-8,
// head dims 64 and 128, a sliding window, segments scattered in the storage. Metric: elementwise
// |out - ref| <= 8e-3 * max(1, |ref|) (bf16 output). Two calls give bitwise-equal outputs. Skipped without a GPU;
// the same kernel code runs in CI through the emulator (emu_decode_attention).
#include <cstdio>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "kernels/decode_attention.h"
#include "tests/kernels/decode_attention_cases.h"

namespace {

kvd::DecodeAttentionInput to_cuda(kvd::DecodeAttentionInput in) {
  for (at::Tensor* t : {&in.q, &in.k, &in.v, &in.start, &in.len, &in.kpos, &in.qpos}) *t = t->to(torch::kCUDA);
  return in;
}

TEST(DecodeAttentionKernel, MatchesNaiveReference) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  uint64_t seed = 1;
  for (const kvd_test::DecodeCase& c : kvd_test::decode_cases(true)) {
    const kvd::DecodeAttentionInput cpu = kvd_test::make_decode_input(c, seed++);
    const kvd::DecodeAttentionInput in = to_cuda(cpu);
    if (!kvd::decode_attention_fused_available(in)) GTEST_SKIP() << "no fused kernel in this build";
    const at::Tensor out = kvd::decode_attention_fused(in);
    const double err = kvd_test::decode_error(out, kvd_test::naive_decode_attention(cpu));
    std::printf("  B %ld H %ld H_kv %ld hd %ld max_len %ld window %ld: error %.2e\n", (long)c.B, (long)c.H,
                (long)c.Hkv, (long)c.hd, (long)c.max_len, (long)c.window.value_or(0), err);
    EXPECT_LE(err, 8e-3);
    EXPECT_TRUE(torch::equal(out, kvd::decode_attention_fused(in))) << "not deterministic";
    // The LibTorch reference on the same device agrees too.
    EXPECT_LE(kvd_test::decode_error(kvd::decode_attention_reference(in), kvd_test::naive_decode_attention(cpu)), 8e-3);
  }
}

TEST(DecodeAttentionKernel, RefusesWhatItCannotRun) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  kvd_test::DecodeCase c{1, 4, 1, 64, {5}, 5, std::nullopt};
  kvd::DecodeAttentionInput in = to_cuda(kvd_test::make_decode_input(c, 3));
  in.q = in.q.to(torch::kFloat);  // fp32: reference only
  EXPECT_FALSE(kvd::decode_attention_fused_available(in));
  EXPECT_THROW(kvd::decode_attention_fused(in), std::exception);
  EXPECT_NO_THROW(kvd::decode_attention(in));  // falls back to the reference
}

}  // namespace
