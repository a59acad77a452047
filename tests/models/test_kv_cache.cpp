// KVCache: storage, growth, byte counts, keep() compaction, and decoding after per-head eviction (checked
// against forward_train with the evicted keys masked out for the later query rows).
#include <gtest/gtest.h>

#include <limits>

#include "common/error.h"
#include "models/kv_cache.h"
#include "models/model.h"
#include "models/safetensors.h"
#include "models/weights.h"
#include "test_paths.h"

using namespace kvd;

namespace {

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(torch::kDouble) - b.to(torch::kDouble)).abs().max().item<double>();
}

}  // namespace

TEST(KVCache, AppendGrowsAndViews) {
  const int64_t L = 2, B = 2, H = 3, hd = 4;
  KVCache c(L, B, H, hd, torch::kFloat, torch::kCPU);
  EXPECT_EQ(c.bytes(), 0);
  EXPECT_EQ(c.bytes_per_entry(), 2 * hd * 4);
  torch::manual_seed(0);
  at::Tensor k1 = torch::randn({B, H, 5, hd}), v1 = torch::randn({B, H, 5, hd});
  at::Tensor p1 = torch::arange(5, torch::kLong).view({1, 5}).expand({B, 5});
  c.append(0, k1, v1, p1);
  EXPECT_EQ(c.max_length(0), 5);
  EXPECT_EQ(c.max_length(1), 0);
  EXPECT_EQ(c.bytes(), B * H * 5 * c.bytes_per_entry());
  // Growth past the first allocation keeps the old entries.
  at::Tensor k2 = torch::randn({B, H, 70, hd}), v2 = torch::randn({B, H, 70, hd});
  at::Tensor p2 = torch::arange(5, 75, torch::kLong).view({1, 70}).expand({B, 70});
  c.append(0, k2, v2, p2);
  KVLayerView view = c.layer(0);
  EXPECT_EQ(view.n, 75);
  EXPECT_FALSE(view.valid.defined());
  EXPECT_TRUE(torch::equal(view.k, torch::cat({k1, k2}, 2)));
  EXPECT_TRUE(torch::equal(view.v, torch::cat({v1, v2}, 2)));
  EXPECT_TRUE(torch::equal(view.pos, torch::arange(75, torch::kLong).view({1, 1, 75}).expand({B, H, 75})));
  EXPECT_TRUE(torch::equal(c.positions(0), view.pos));
  EXPECT_EQ(c.length(0, 1, 2), 75);
  EXPECT_EQ(c.bytes(), B * H * 75 * c.bytes_per_entry());
  EXPECT_GE(c.allocated_bytes(), c.bytes());
  EXPECT_EQ(c.peak_bytes(), c.bytes());
  // Per-head positions may be given directly.
  at::Tensor ph = torch::arange(B * H, torch::kLong).view({B, H, 1}) + 100;
  c.append(1, k1.narrow(2, 0, 1), v1.narrow(2, 0, 1), ph);
  EXPECT_TRUE(torch::equal(c.positions(1), ph));
  EXPECT_THROW(c.append(1, torch::randn({B, H + 1, 1, hd}), torch::randn({B, H + 1, 1, hd}), p1.narrow(1, 0, 1)),
               Error);
  EXPECT_THROW(c.layer(2), Error);
  c.clear();
  EXPECT_EQ(c.bytes(), 0);
  EXPECT_EQ(c.peak_bytes(), 0);
  EXPECT_EQ(c.next_position(), 0);
}

TEST(KVCache, KeepCompactsEachHead) {
  const int64_t B = 2, H = 2, hd = 3, n = 100;
  KVCache c(1, B, H, hd, torch::kFloat, torch::kCPU);
  torch::manual_seed(1);
  at::Tensor k = torch::randn({B, H, n, hd}), v = torch::randn({B, H, n, hd});
  at::Tensor pos = torch::arange(n, torch::kLong).view({1, n}).expand({B, n}) + 7;
  c.append(0, k, v, pos);
  const int64_t peak = c.peak_bytes();
  const int64_t alloc = c.allocated_bytes();
  // Keeping more than half of the capacity compacts in place (no reallocation).
  at::Tensor idx60 = torch::arange(40, n, torch::kLong).view({1, 1, 60}).expand({B, H, 60}).contiguous();
  c.keep(0, idx60);
  EXPECT_EQ(c.allocated_bytes(), alloc);
  EXPECT_TRUE(torch::equal(c.layer(0).k, k.narrow(2, 40, 60)));
  // Different sorted indices for every (batch row, head); 30 <= capacity / 2: the storage shrinks for real.
  at::Tensor idx = std::get<0>(torch::rand({B, H, 60}).argsort(/*dim=*/int64_t{-1}, /*descending=*/false)
                                   .narrow(-1, 0, 30).sort(-1));  // (B, H, 30) into the 60 kept
  c.keep(0, idx);
  KVLayerView view = c.layer(0);
  ASSERT_EQ(view.n, 30);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      at::Tensor ix = idx[b][h] + 40;  // into the original entries
      EXPECT_TRUE(torch::equal(view.k[b][h], k[b][h].index_select(0, ix)));
      EXPECT_TRUE(torch::equal(view.v[b][h], v[b][h].index_select(0, ix)));
      EXPECT_TRUE(torch::equal(view.pos[b][h], ix + 7));  // original positions travel with the entries
      EXPECT_EQ(c.length(0, b, h), 30);
    }
  EXPECT_EQ(c.bytes(), B * H * 30 * c.bytes_per_entry());
  EXPECT_EQ(c.peak_bytes(), peak);
  EXPECT_LT(c.allocated_bytes(), alloc);
  // Appending after keep continues behind the kept entries.
  at::Tensor k2 = torch::randn({B, H, 2, hd});
  c.append(0, k2, k2, torch::full({B, 2}, 500, torch::kLong));
  view = c.layer(0);
  EXPECT_EQ(view.n, 32);
  EXPECT_TRUE(torch::equal(view.k.narrow(2, 30, 2), k2));
  EXPECT_TRUE(torch::equal(view.pos.narrow(2, 0, 30), idx + 47));
  EXPECT_TRUE(torch::equal(view.pos.narrow(2, 30, 2), torch::full({B, H, 2}, 500, torch::kLong)));
  // Bad indices.
  EXPECT_THROW(c.keep(0, torch::full({B, H, 1}, 32, torch::kLong)), Error);  // 32 entries: 0..31
  EXPECT_THROW(c.keep(0, torch::full({B, H, 1}, -1, torch::kLong)), Error);
  EXPECT_THROW(c.keep(0, torch::zeros({B, H + 1, 1}, torch::kLong)), Error);
  // Keeping nothing empties the layer.
  c.keep(0, torch::zeros({B, H, 0}, torch::kLong));
  EXPECT_EQ(c.max_length(0), 0);
  EXPECT_EQ(c.bytes(), 0);
}

namespace {

// Decoding after eviction must equal the full forward in which the later query rows (>= n_prompt) cannot see
// the evicted (layer, KV head, key) entries.
void check_decode_after_eviction(const std::string& family, int64_t B) {
  const std::string dir = std::string(KVD_TESTDATA) + "/decoder_golden/" + family;
  Model m = Model::load(dir, torch::kCPU);
  const ModelConfig& cfg = m.config();
  SafetensorsFile golden(dir + "/golden.safetensors");
  at::Tensor ids = view_to_tensor(golden.at("input_ids")).narrow(0, 0, B);  // (B, 40)
  const int64_t N = 20, chunk = 3, steps = 5, T = N + chunk + steps;
  torch::manual_seed(2);
  KVCache cache = m.new_cache(B);
  m.prefill(ids.narrow(1, 0, N), cache);
  // evicted[l]: (B, H_kv, T) bool, only among the prompt's keys; each head keeps a different 12 of 20.
  std::vector<at::Tensor> evicted;
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    at::Tensor keep = std::get<0>(torch::rand({B, cfg.num_kv_heads, N}).argsort(/*dim=*/int64_t{-1}, /*descending=*/false).narrow(-1, 0, 12).sort(-1));
    cache.keep(l, keep);
    at::Tensor ev = torch::ones({B, cfg.num_kv_heads, T}, torch::kBool);
    ev.narrow(2, N, T - N).fill_(false);
    ev.scatter_(2, keep, false);
    evicted.push_back(ev);
  }
  EXPECT_EQ(cache.bytes(), cfg.num_layers * B * cfg.num_kv_heads * 12 * cache.bytes_per_entry());
  // Continue: one chunk of 3 (a prefill against the evicted cache), then single-token decodes.
  std::vector<at::Tensor> got;  // (B, V) per position N + chunk - 1 .. T - 1
  got.push_back(m.prefill(ids.narrow(1, N, chunk), cache));
  for (int64_t t = N + chunk; t < T; ++t) got.push_back(m.decode(ids.narrow(1, t, 1), cache));
  EXPECT_EQ(cache.next_position(), T);

  AttentionMods mods;
  mods.layer_hook = [&](const LayerInput& in) {
    LayerMods lm;
    const at::Tensor ev = evicted[in.layer];  // (B, H_kv, S)
    lm.pair_bias = [ev, N](const PairBiasQuery& q) {
      at::Tensor later = q.q_rows.ge(N).unsqueeze(1).unsqueeze(-1);  // (B, 1, Sq, 1)
      at::Tensor hide = later.logical_and(ev.unsqueeze(2));            // (B, H_kv, Sq, S)
      return torch::zeros(hide.sizes()).masked_fill(hide, -std::numeric_limits<float>::infinity());
    };
    return lm;
  };
  at::Tensor pos = sequential_positions(B, T, torch::kCPU);
  at::Tensor ref = m.logits(m.forward_train(ids.narrow(1, 0, T), pos, mods).hidden);  // (B, T, V)
  at::Tensor full = m.logits(m.forward_train(ids.narrow(1, 0, T), pos).hidden);       // no eviction
  double worst = 0, moved = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const int64_t t = N + chunk - 1 + static_cast<int64_t>(i);
    worst = std::max(worst, max_abs_diff(got[i], ref.select(1, t)));
    moved = std::max(moved, max_abs_diff(got[i], full.select(1, t)));
  }
  std::cout << family << " B=" << B << ": decode after per-head eviction vs masked forward, max-abs-diff " << worst
            << " (vs no eviction: " << moved << ")\n";
  EXPECT_LE(worst, 1e-4);
  EXPECT_GT(moved, 1e-2);  // the eviction mattered
}

}  // namespace

TEST(KVCache, DecodeAfterEvictionUsesStoredPositions) {
  check_decode_after_eviction("llama3", 1);
  check_decode_after_eviction("qwen3", 2);
  check_decode_after_eviction("mistral", 2);  // sliding window over stored positions
}
