// The fresh, left-padded prefill (models/attention.h, PaddedPrefill): the packing of the rows' real tokens, and on
// a GPU the flash variable-length path against the masked path and against each row prefilled alone in float32.
#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "common/error.h"
#include "models/attention.h"
#include "models/kv_cache.h"
#include "models/model.h"
#include "models/safetensors.h"
#include "test_paths.h"

using namespace kvd;

namespace {

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(torch::kDouble) - b.to(torch::kDouble)).abs().max().item<double>();
}

// Restores the process-wide setting when a test ends.
struct PaddedPrefillScope {
  PaddedPrefill saved = padded_prefill();
  explicit PaddedPrefillScope(PaddedPrefill p) { set_padded_prefill(p); }
  ~PaddedPrefillScope() { set_padded_prefill(saved); }
};

}  // namespace

TEST(PaddedPrefillAttention, PacksTheRealTokensInRowOrder) {
  // T = 4; row 0 has 2 padding rows, row 1 none, row 2 is all padding: packed rows 2, 3 | 4, 5, 6, 7 | -.
  const PackedRows r = pack_left_padded({2, 0, 4}, 4, torch::kCPU);
  EXPECT_EQ(r.total, 6);
  EXPECT_EQ(r.max_len, 4);
  EXPECT_TRUE(torch::equal(r.index, torch::tensor({2, 3, 4, 5, 6, 7}, torch::kLong)));
  EXPECT_TRUE(torch::equal(r.cu_seqlens, torch::tensor({0, 2, 6, 6}, torch::kInt)));
  EXPECT_THROW(pack_left_padded({5}, 4, torch::kCPU), Error);
  EXPECT_FALSE(varlen_flash_applies(torch::kCPU, torch::kBFloat16, 64, false));
  EXPECT_FALSE(varlen_flash_applies(torch::kCUDA, torch::kFloat, 64, false));
  EXPECT_FALSE(varlen_flash_applies(torch::kCUDA, torch::kBFloat16, 64, /*sliding_window=*/true));
  EXPECT_FALSE(varlen_flash_applies(torch::kCUDA, torch::kBFloat16, 12, false));
  EXPECT_TRUE(varlen_flash_applies(torch::kCUDA, torch::kBFloat16, 64, false));
}

// Rows of 40, 33, 25, 9 and 1 tokens of the golden ids, left-padded to 40, prefilled in bf16 on the GPU by each
// path; the reference is every row prefilled alone (no padding) in float32. The flash path must be as close to it
// as the masked path is, up to bf16 rounding, in the last position's logits and in every stored key and value.
TEST(PaddedPrefillAttention, FlashMatchesEachRowAloneOnTheGpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  for (const std::string family : {"llama3", "qwen3", "mistral"}) {
    const std::string dir = std::string(KVD_TESTDATA) + "/decoder_golden/" + family;
    const Model bf = Model::load(dir, torch::kCUDA, torch::kBFloat16);
    const Model f32 = Model::load(dir, torch::kCUDA, torch::kFloat);
    SafetensorsFile golden(dir + "/golden.safetensors");
    const at::Tensor all = view_to_tensor(golden.at("input_ids"));  // (B0, 40)
    const int64_t T = all.size(1);
    const std::vector<int64_t> lens = {40, 33, 25, 9, 1};
    const int64_t B = static_cast<int64_t>(lens.size());
    std::vector<int64_t> lead(B);
    at::Tensor ids = torch::zeros({B, T}, torch::kLong);
    for (int64_t b = 0; b < B; ++b) {
      lead[b] = T - lens[b];
      ids[b].narrow(0, lead[b], lens[b]).copy_(all[b % all.size(0)].narrow(0, 0, lens[b]));
    }
    auto run = [&](PaddedPrefill p, KVCache& c) {
      PaddedPrefillScope scope(p);
      return bf.prefill(ids, c, LogitsMode::LastPosition, {}, lead);  // (B, V)
    };
    KVCache cf = bf.new_cache(B), cm = bf.new_cache(B);
    const at::Tensor lf = run(PaddedPrefill::Flash, cf), lm = run(PaddedPrefill::Masked, cm);
    double e_flash = 0, e_masked = 0, kv_flash = 0, kv_masked = 0, scale = 0, between = 0;
    for (int64_t b = 0; b < B; ++b) {
      KVCache one = f32.new_cache(1);
      const at::Tensor ref = f32.prefill(ids[b].narrow(0, lead[b], lens[b]).view({1, lens[b]}), one);  // (1, V)
      const double s = ref.abs().max().item<double>(), ef = max_abs_diff(lf[b], ref[0]), em = max_abs_diff(lm[b], ref[0]);
      // Row by row: the flash path within twice the masked path's error (both are bf16 runs of the same math).
      EXPECT_LE(ef, 2 * em + 0.02 * s) << family << " row " << b;
      scale = std::max(scale, s);
      e_flash = std::max(e_flash, ef);
      e_masked = std::max(e_masked, em);
      between = std::max(between, max_abs_diff(lf[b], lm[b]));
      for (int64_t l = 0; l < bf.config().num_layers; ++l) {
        EXPECT_EQ(cf.length(l, b, 0), lens[b]);
        const KVLayerView r = one.layer(l), a = cf.layer(l), m = cm.layer(l);
        for (const auto& [x, y] : {std::pair{a.k, r.k}, std::pair{a.v, r.v}})
          kv_flash = std::max(kv_flash, max_abs_diff(x[b].narrow(1, 0, lens[b]), y[0]));
        for (const auto& [x, y] : {std::pair{m.k, r.k}, std::pair{m.v, r.v}})
          kv_masked = std::max(kv_masked, max_abs_diff(x[b].narrow(1, 0, lens[b]), y[0]));
      }
    }
    std::cout << family << ": last-position logits vs each row alone in float32 (max |logit| " << scale
              << "): flash " << e_flash << ", masked " << e_masked << "; stored K/V: flash " << kv_flash << ", masked "
              << kv_masked << "; flash vs masked " << between << "\n";
    EXPECT_LE(e_flash, 2 * e_masked + 0.02 * scale) << family;
    EXPECT_LE(kv_flash, 2 * kv_masked + 0.02) << family;
    EXPECT_LE(e_flash, 0.05 * scale) << family;
    EXPECT_LE(between, 0.05 * scale) << family;
  }
}
