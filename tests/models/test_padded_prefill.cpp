// A chunk of tokens into the cache (models/attention.h, ChunkAttention): the packing of a left-padded chunk's real
// tokens, the segment table flash reads a cache layer through, and on a GPU the flash variable-length paths
// against the masked path and a float32 reference: the fresh left-padded prefill against each row prefilled
// alone, and chunks over a cache compressed per head (heads of different counts, one of them empty).
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
struct ChunkAttentionScope {
  ChunkAttention saved = chunk_attention();
  explicit ChunkAttentionScope(ChunkAttention a) { set_chunk_attention(a); }
  ~ChunkAttentionScope() { set_chunk_attention(saved); }
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
    auto run = [&](ChunkAttention p, KVCache& c) {
      ChunkAttentionScope scope(p);
      return bf.prefill(ids, c, LogitsMode::LastPosition, {}, lead);  // (B, V)
    };
    KVCache cf = bf.new_cache(B), cm = bf.new_cache(B);
    const at::Tensor lf = run(ChunkAttention::Flash, cf), lm = run(ChunkAttention::Masked, cm);
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

namespace {

// Per layer, a ragged keep of the cache's entries drawn from `gen`: head row r keeps a sorted random subset of a
// random count in [0, len_r] (row 0's first KV head keeps nothing in layer 0), the same for every call with the
// same seed.
std::vector<RaggedIndices> random_keeps(const KVCache& c, uint64_t seed) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  std::vector<RaggedIndices> keeps;
  for (int64_t l = 0; l < c.num_layers(); ++l) {
    std::vector<int64_t> idx, off = {0};
    const std::vector<int64_t>& len = c.lengths(l);
    for (size_t r = 0; r < len.size(); ++r) {
      int64_t n = l == 0 && r == 0 ? 0 : torch::randint(0, len[r] + 1, {1}, gen).item<int64_t>();
      at::Tensor pick = std::get<0>(torch::randperm(len[r], gen).narrow(0, 0, n).sort());
      for (int64_t i = 0; i < n; ++i) idx.push_back(pick[i].item<int64_t>());
      off.push_back(static_cast<int64_t>(idx.size()));
    }
    keeps.push_back({torch::tensor(idx, torch::kLong), torch::tensor(off, torch::kLong)});
  }
  return keeps;
}

// A golden family's model in bf16 and in float32 on the GPU, and its golden ids (B0, 40).
struct GoldenPair {
  Model bf, f32;
  at::Tensor ids;
};
GoldenPair load_golden_pair(const std::string& family) {
  const std::string dir = std::string(KVD_TESTDATA) + "/decoder_golden/" + family;
  SafetensorsFile golden(dir + "/golden.safetensors");
  return {Model::load(dir, torch::kCUDA, torch::kBFloat16), Model::load(dir, torch::kCUDA, torch::kFloat),
          view_to_tensor(golden.at("input_ids")).clone()};
}

// Rows of lens[b] golden tokens (row b from golden row (b + from) % B0) left-padded to `width`; lead[b] gets row b's
// padding. Returns (B, width).
at::Tensor left_padded(const at::Tensor& all, const std::vector<int64_t>& lens, int64_t width, int64_t from,
                       std::vector<int64_t>& lead) {
  const int64_t B = static_cast<int64_t>(lens.size());
  at::Tensor ids = torch::zeros({B, width}, torch::kLong);
  lead.assign(B, 0);
  for (int64_t b = 0; b < B; ++b) {
    lead[b] = width - lens[b];
    ids[b].narrow(0, lead[b], lens[b]).copy_(all[(b + from) % all.size(0)].narrow(0, 0, lens[b]));
  }
  return ids;
}

}  // namespace

TEST(ChunkAttentionSegments, EachHeadRowsSlotsHoldItsEntries) {
  // A cache of 2 rows x 2 KV heads, 6 entries each, then a ragged keep and a 3-token append: every head row's
  // segment (start, len) holds exactly what layer() shows for that head, in the flat storage.
  KVCache c(1, 2, 2, 4, torch::kFloat, torch::kCPU);
  c.append(0, torch::randn({2, 2, 6, 4}), torch::randn({2, 2, 6, 4}), torch::arange(6).view({1, 6}).expand({2, 6}));
  c.keep(0, RaggedIndices{torch::tensor({0, 5, 1, 2, 3, 4}, torch::kLong), torch::tensor({0, 2, 2, 3, 6}, torch::kLong)});
  c.append(0, torch::randn({2, 2, 3, 4}), torch::randn({2, 2, 3, 4}), torch::arange(6, 9).view({1, 3}).expand({2, 3}),
           std::vector<int64_t>{1, 0});
  const KVLayerSegments s = c.segments(0);
  const KVLayerView v = c.layer(0);
  EXPECT_EQ(s.max_len, 6);
  EXPECT_EQ(s.start.scalar_type(), torch::kInt);
  EXPECT_TRUE(torch::equal(s.len, torch::tensor({4, 2, 4, 6}, torch::kInt)));
  ASSERT_EQ(s.start.size(0), 5);
  EXPECT_EQ(s.start[4].item<int64_t>(), s.k.size(0));
  for (int64_t r = 0; r < 4; ++r) {
    const int64_t a = s.start[r].item<int64_t>(), n = s.len[r].item<int64_t>();
    EXPECT_TRUE(torch::equal(s.k.narrow(0, a, n), v.k[r / 2][r % 2].narrow(0, 0, n))) << r;
    EXPECT_TRUE(torch::equal(s.v.narrow(0, a, n), v.v[r / 2][r % 2].narrow(0, 0, n))) << r;
  }
}

// Three rows of 40, 25 and 9 golden tokens prefilled left-padded, then every layer compressed per head at random
// (different counts per head, one head empty), then chunks into that cache: left-padded rows of 5, 12 and 1 tokens,
// an unpadded chunk of 4, and a single token, in bf16 by the flash and the masked paths, and in float32 by the
// masked path (the reference). The flash path must be as close to the reference as the masked bf16 path is, up to
// bf16 rounding, in every chunk's last-position logits.
TEST(ChunkAttentionSegments, FlashOverACompressedCacheMatchesTheMaskedPathOnTheGpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  for (const std::string family : {"llama3", "qwen3"}) {
    const GoldenPair g = load_golden_pair(family);
    const Model &bf = g.bf, &f32 = g.f32;
    const at::Tensor& all = g.ids;  // (B0, 40)
    const int64_t T = all.size(1), B = 3;
    std::vector<int64_t> lead0, lead1;
    const at::Tensor ids0 = left_padded(all, {40, 25, 9}, T, 0, lead0);  // (B, T)
    const at::Tensor ids1 = left_padded(all, {5, 12, 1}, 12, 1, lead1);  // (B, 12)
    const at::Tensor ids2 = all.narrow(1, 20, 4).narrow(0, 0, 1).expand({B, 4}).contiguous();  // (B, 4)
    const at::Tensor ids3 = all.narrow(1, 30, 1).narrow(0, 0, 1).expand({B, 1}).contiguous();  // (B, 1)
    auto run = [&](const Model& m, ChunkAttention a) {
      ChunkAttentionScope scope(a);
      KVCache c = m.new_cache(B);
      m.prefill(ids0, c, LogitsMode::LastPosition, {}, lead0);
      const std::vector<RaggedIndices> keeps = random_keeps(c, 11);
      for (int64_t l = 0; l < c.num_layers(); ++l) c.keep(l, keeps[l]);
      std::vector<at::Tensor> out;
      out.push_back(m.prefill(ids1, c, LogitsMode::LastPosition, {}, lead1));  // (B, V)
      out.push_back(m.prefill(ids2, c, LogitsMode::LastPosition));
      out.push_back(m.prefill(ids3, c, LogitsMode::LastPosition));
      return out;
    };
    const std::vector<at::Tensor> fl = run(bf, ChunkAttention::Flash), ma = run(bf, ChunkAttention::Masked),
                                  ref = run(f32, ChunkAttention::Masked);
    for (size_t i = 0; i < fl.size(); ++i) {
      const double s = ref[i].abs().max().item<double>(), ef = max_abs_diff(fl[i], ref[i]),
                   em = max_abs_diff(ma[i], ref[i]);
      std::cout << family << " chunk " << i << ": last-position logits vs float32 (max |logit| " << s << "): flash "
                << ef << ", masked " << em << "\n";
      EXPECT_TRUE(torch::isfinite(fl[i]).all().item<bool>()) << family << " chunk " << i;
      EXPECT_LE(ef, 2 * em + 0.02 * s) << family << " chunk " << i;
      EXPECT_LE(ef, 0.05 * s) << family << " chunk " << i;
    }
  }
}

// Model::forward_extra's fused attention for rows placed after the cache (ExtraPlacement::AfterCache, KVzip's
// repeat): on a cache compressed per head at random (one head empty), 7 extra rows, in bf16 through flash (the
// segments and the rows merged by log-sum-exp) and through the masked path, against the masked path in float32.
TEST(ChunkAttentionSegments, ExtraRowsAfterTheCacheMatchTheMaskedPathOnTheGpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  for (const std::string family : {"llama3", "qwen3"}) {
    const GoldenPair g = load_golden_pair(family);
    const Model &bf = g.bf, &f32 = g.f32;
    const at::Tensor& all = g.ids;  // (B0, 40)
    const int64_t B = 3, n = 7;
    std::vector<int64_t> lead;
    const at::Tensor ids = left_padded(all, {40, 25, 9}, all.size(1), 0, lead);  // (B, 40)
    const at::Tensor extra_ids = all[0].narrow(0, 3, n).view({1, n}).expand({B, n}).contiguous();  // (B, n)
    auto run = [&](const Model& m, ExtraPlacement placement, bool compress) {
      KVCache c = m.new_cache(B);
      m.prefill(ids, c, LogitsMode::LastPosition, {}, lead);
      if (compress) {
        const std::vector<RaggedIndices> keeps = random_keeps(c, 5);
        for (int64_t l = 0; l < c.num_layers(); ++l) c.keep(l, keeps[l]);
      }
      AttentionMods mods;
      mods.extra.embeddings = m.embed(extra_ids.to(m.device()));  // (B, n, d)
      mods.extra.positions = (torch::tensor(c.next_positions(), torch::kLong).view({B, 1}) +
                              torch::arange(n, torch::kLong).view({1, n})).to(m.device());  // (B, n)
      mods.extra.attention = ExtraAttention::Fused;
      mods.extra.placement = placement;
      return m.forward_extra(c, mods).hidden;  // (B, n, d)
    };
    for (const bool compress : {false, true}) {
      const at::Tensor fl = run(bf, ExtraPlacement::AfterCache, compress), ma = run(bf, ExtraPlacement::Anywhere, compress),
                       ref = run(f32, ExtraPlacement::Anywhere, compress);
      const double s = ref.abs().max().item<double>(), ef = max_abs_diff(fl, ref), em = max_abs_diff(ma, ref);
      std::cout << family << (compress ? " compressed" : " full") << ": extra rows' hidden vs float32 (max " << s
                << "): flash " << ef << ", masked " << em << "\n";
      EXPECT_TRUE(torch::isfinite(fl).all().item<bool>()) << family;
      EXPECT_LE(ef, 2 * em + 0.02 * s) << family << " compressed " << compress;
    }
  }
}
