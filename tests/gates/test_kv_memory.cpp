// Ragged KV cache memory: per-head keep with different counts compacts for real, appends after it go to each
// head's own end, and the reported bytes are Σ kept entries × bytes per entry. On SmolLM2, AdaKV(SnapKV) at
// ratio 0.75 holds about 25% of the uncompressed bytes, and decoding after it still works.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <iostream>

#include <torch/torch.h>

#include "common/error.h"
#include "gates/compress.h"
#include "gates/registry.h"
#include "gates/selector.h"
#include "models/kv_cache.h"
#include "models/model.h"
#include "models/tokenizer.h"
#include "test_paths.h"

using namespace kvd;

TEST(KVMemory, RaggedKeepCompactsAndAppendsPerHead) {
  const int64_t B = 1, H = 3, hd = 4, n = 10;
  KVCache c(1, B, H, hd, torch::kFloat, torch::kCPU);
  torch::manual_seed(0);
  at::Tensor k = torch::randn({B, H, n, hd}), v = torch::randn({B, H, n, hd});  // (B, H_kv, n, hd)
  c.append(0, k, v, torch::arange(n, torch::kLong).view({1, n}));
  // Head 0 keeps 3, head 1 keeps none, head 2 keeps 6.
  at::Tensor mask = torch::zeros({B, H, n}, torch::kBool);
  mask[0][0].index_put_({torch::tensor({1, 4, 9})}, true);
  mask[0][2].narrow(0, 2, 6).fill_(true);
  c.keep(0, ragged_from_mask(mask));
  EXPECT_EQ(c.length(0, 0, 0), 3);
  EXPECT_EQ(c.length(0, 0, 1), 0);
  EXPECT_EQ(c.length(0, 0, 2), 6);
  EXPECT_EQ(c.bytes(), 9 * c.bytes_per_entry());
  // Storage is exactly the 9 kept entries (K, V and an int64 position each), not the original 10 per head.
  EXPECT_EQ(c.allocated_bytes(), 9 * (c.bytes_per_entry() + 8));
  KVLayerView view = c.layer(0);
  ASSERT_TRUE(view.valid.defined());
  EXPECT_TRUE(torch::equal(view.k[0][0].narrow(0, 0, 3), k[0][0].index_select(0, torch::tensor({1, 4, 9}))));
  EXPECT_TRUE(torch::equal(view.pos[0][2].narrow(0, 0, 6), torch::arange(2, 8, torch::kLong)));
  // A ragged append: every head's new entry follows its own entries.
  at::Tensor k1 = torch::randn({B, H, 1, hd}), v1 = torch::randn({B, H, 1, hd});
  c.append(0, k1, v1, torch::full({1, 1}, n, torch::kLong));
  EXPECT_EQ(c.length(0, 0, 0), 4);
  EXPECT_EQ(c.length(0, 0, 1), 1);
  EXPECT_EQ(c.length(0, 0, 2), 7);
  view = c.layer(0);
  EXPECT_TRUE(torch::equal(view.k[0][1][0], k1[0][1][0]));
  EXPECT_TRUE(torch::equal(view.v[0][0][3], v1[0][0][0]));
  EXPECT_EQ(view.pos[0][2][6].item<int64_t>(), n);
  EXPECT_EQ(c.bytes(), 12 * c.bytes_per_entry());
}

TEST(KVMemory, AdaKVOnSmolLM2HoldsAQuarterAtRatio075) {
  if (!std::filesystem::exists(std::string(KVD_MODEL_DIR) + "/config.json")) GTEST_SKIP() << "no SmolLM2 model";
  const Tokenizer tok = Tokenizer::from_file(KVD_MODEL_DIR);
  std::string text;
  for (int i = 0; i < 40; ++i)
    text += "Record " + std::to_string(i) + ": the courier left the depot at " + std::to_string(7 + i % 5) +
            " o'clock carrying parcel " + std::to_string(1000 + 37 * i) + ". ";
  std::vector<int32_t> ids32 = tok.encode(text);
  at::Tensor ids = torch::tensor(std::vector<int64_t>(ids32.begin(), ids32.end()), torch::kLong).view({1, -1});
  Model model = Model::load(KVD_MODEL_DIR, torch::kCPU);
  KVCache cache = model.new_cache(1);
  Method m = make_method("adakv_snapkv", 0.75);
  const CompressStats st = compress_prefill(model, cache, ids, m);
  const int64_t T = ids.size(1), L = cache.num_layers(), H = cache.num_kv_heads();
  // Reported bytes = Σ kept entries × bytes per entry, and the kept entries are floor(T/4) per head on average.
  int64_t entries = 0;
  bool ragged = false;
  for (int64_t l = 0; l < L; ++l)
    for (int64_t h = 0; h < H; ++h) {
      entries += cache.length(l, 0, h);
      ragged = ragged || cache.length(l, 0, h) != cache.length(l, 0, 0);
    }
  EXPECT_TRUE(ragged) << "AdaKV should give heads different counts";
  EXPECT_EQ(st.kept_bytes, entries * cache.bytes_per_entry());
  EXPECT_EQ(entries, L * H * (T / 4));
  const double frac = static_cast<double>(st.kept_bytes) / static_cast<double>(st.full_bytes);
  EXPECT_NEAR(frac, 0.25, 0.01);
  // Compression happens per layer during prefill, so the peak is far below the full cache.
  EXPECT_LT(st.peak_bytes, st.full_bytes / 2);
  // The storage really holds only the kept entries: allocated slots × (K+V) within 1% of the kept bytes
  // (each allocated slot also carries an int64 position, counted separately).
  const int64_t slots = st.allocated_bytes / (cache.bytes_per_entry() + 8);
  EXPECT_EQ(st.allocated_bytes % (cache.bytes_per_entry() + 8), 0);
  const int64_t alloc_kv = slots * cache.bytes_per_entry();
  const double alloc_frac = static_cast<double>(alloc_kv) / static_cast<double>(st.full_bytes);
  std::cout << "[ memory ] T=" << T << " full=" << st.full_bytes << " kept=" << st.kept_bytes << " kept/full=" << frac
            << " peak=" << st.peak_bytes << " allocated K+V=" << alloc_kv << " allocated/full=" << alloc_frac
            << " (with positions: " << st.allocated_bytes << ")\n";
  EXPECT_LE(std::abs(static_cast<double>(alloc_kv - st.kept_bytes)), 0.01 * static_cast<double>(st.kept_bytes));
  EXPECT_NEAR(alloc_frac, 0.25, 0.011);
  // Decoding on the ragged cache works (ragged append + masked attention) and stays finite.
  at::Tensor lg = model.decode(ids.narrow(1, T - 1, 1), cache);  // (1, V)
  EXPECT_TRUE(torch::isfinite(lg).all().item<bool>());
  EXPECT_EQ(cache.bytes(), st.kept_bytes + L * H * cache.bytes_per_entry());
}
