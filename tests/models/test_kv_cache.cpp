// KVCache: storage, growth, byte counts, keep() compaction, and decoding after per-head eviction (checked
// against forward_train with the evicted keys masked out for the later query rows).
#include <gtest/gtest.h>

#include <algorithm>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

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
  // keep() reallocates to exactly the kept entries (K, V and the int64 position of each).
  at::Tensor idx60 = torch::arange(40, n, torch::kLong).view({1, 1, 60}).expand({B, H, 60}).contiguous();
  c.keep(0, idx60);
  EXPECT_EQ(c.allocated_bytes(), B * H * 60 * (c.bytes_per_entry() + 8));
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
  {  // A ragged keep whose last head asks for entry 32: the message names that head, and the layer is untouched.
    RaggedIndices bad;
    const int64_t rows = B * H;
    bad.offsets = torch::arange(rows + 1, torch::kLong);                                // one index per head
    bad.indices = torch::cat({torch::zeros({rows - 1}, torch::kLong), torch::full({1}, 32, torch::kLong)});
    try {
      c.keep(0, bad);
      ADD_FAILURE() << "an index past the head's entries was accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("head row " + std::to_string(rows - 1) + ": index 32 is outside its 32"),
                std::string::npos) << e.what();
    }
    EXPECT_EQ(c.layer(0).n, 32);
    EXPECT_TRUE(torch::equal(c.layer(0).k.narrow(2, 30, 2), k2));
  }
  // Keeping nothing empties the layer.
  c.keep(0, torch::zeros({B, H, 0}, torch::kLong));
  EXPECT_EQ(c.max_length(0), 0);
  EXPECT_EQ(c.bytes(), 0);
}

// concat_rows: the rows of two caches (one with a ragged keep and a payload column, one plain, another batch size)
// become one cache whose rows hold exactly what they held, with their positions, bytes and peaks; appends and a
// rewind then act on each row as on the originals.
TEST(KVCache, ConcatRowsKeepsEveryRowsEntries) {
  const int64_t L = 2, H = 2, hd = 3;
  torch::manual_seed(3);
  KVCache a(L, 2, H, hd, torch::kFloat, torch::kCPU), b(L, 1, H, hd, torch::kFloat, torch::kCPU);
  a.add_payload("score", torch::kFloat, -1.0);
  for (int64_t l = 0; l < L; ++l) {
    a.append(l, torch::randn({2, H, 6, hd}), torch::randn({2, H, 6, hd}),
             torch::arange(6, torch::kLong).view({1, 6}).expand({2, 6}));
    a.set_payload_tail(l, "score", torch::rand({2, H, 6}));
    b.append(l, torch::randn({1, H, 4, hd}), torch::randn({1, H, 4, hd}), torch::arange(4, torch::kLong).view({1, 4}));
  }
  RaggedIndices keep{torch::tensor({0, 2, 5, 1, 1, 2, 3, 4, 5, 0}, torch::kLong), torch::tensor({0, 3, 4, 9, 10}, torch::kLong)};
  a.keep(0, keep);  // layer 0 ragged: 3 / 1 / 5 / 1 entries
  a.advance(std::vector<int64_t>{6, 6});
  b.advance(std::vector<int64_t>{4});
  const KVCache c = KVCache::concat_rows({&a, &b});
  ASSERT_EQ(c.batch(), 3);
  EXPECT_TRUE(c.has_payload("score"));
  EXPECT_EQ(c.next_positions(), (std::vector<int64_t>{6, 6, 4}));
  for (int64_t l = 0; l < L; ++l) {
    const KVLayerView va = a.layer(l), vb = b.layer(l), vc = c.layer(l);
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t r = 0; r < 2; ++r) {
        const int64_t n = a.length(l, r, h);
        ASSERT_EQ(c.length(l, r, h), n);
        EXPECT_TRUE(torch::equal(vc.k[r][h].narrow(0, 0, n), va.k[r][h].narrow(0, 0, n)));
        EXPECT_TRUE(torch::equal(vc.v[r][h].narrow(0, 0, n), va.v[r][h].narrow(0, 0, n)));
        EXPECT_TRUE(torch::equal(vc.pos[r][h].narrow(0, 0, n), va.pos[r][h].narrow(0, 0, n)));
        EXPECT_TRUE(torch::equal(vc.payload.at("score")[r][h].narrow(0, 0, n), va.payload.at("score")[r][h].narrow(0, 0, n)));
      }
      ASSERT_EQ(c.length(l, 2, h), 4);
      EXPECT_TRUE(torch::equal(vc.k[2][h].narrow(0, 0, 4), vb.k[0][h]));
      EXPECT_TRUE(torch::equal(vc.pos[2][h].narrow(0, 0, 4), vb.pos[0][h]));
      // b had no "score": its entries get the column's fill.
      EXPECT_TRUE(torch::equal(vc.payload.at("score")[2][h].narrow(0, 0, 4), torch::full({4}, -1.0f)));
    }
  }
  for (int64_t r = 0; r < 2; ++r) {
    EXPECT_EQ(c.row_bytes(r), a.row_bytes(r));
    EXPECT_EQ(c.row_peak_bytes(r), a.row_peak_bytes(r));
  }
  EXPECT_EQ(c.row_bytes(2), b.row_bytes(0));
  EXPECT_EQ(c.row_peak_bytes(2), b.row_peak_bytes(0));
  EXPECT_EQ(c.bytes(), a.bytes() + b.bytes());
  // An append lands behind each row's own entries; a rewind takes it back.
  KVCache d = KVCache::concat_rows({&a, &b});
  const at::Tensor k1 = torch::randn({3, H, 1, hd});
  d.append(0, k1, k1, torch::tensor({6, 6, 4}, torch::kLong).view({3, 1}));
  EXPECT_EQ(d.length(0, 0, 1), 2);  // row 0 head 1 kept 1 entry
  EXPECT_TRUE(torch::equal(d.layer(0).k[0][1][1], k1[0][1][0]));
  EXPECT_TRUE(torch::equal(d.layer(0).k[2][0][4], k1[2][0][0]));
  KVCache e(L, 1, H + 1, hd, torch::kFloat, torch::kCPU);
  EXPECT_THROW(KVCache::concat_rows({&a, &e}), Error);  // other KV heads
}

// Per-row state: keep() and rewind() leave it, copy_layer_from copies it, concat_rows joins it along the rows with
// every other dimension padded with zeros to the largest part's (a part without it gives zeros), clear() drops it,
// and a tensor without the cache's rows first is refused.
TEST(KVCache, RowStateFollowsItsRows) {
  const int64_t L = 2, H = 2, hd = 3;
  torch::manual_seed(4);
  KVCache a(L, 2, H, hd, torch::kFloat, torch::kCPU), b(L, 1, H, hd, torch::kFloat, torch::kCPU);
  const at::Tensor sa = torch::randn({2, 3, 5}), sb = torch::randn({1, 4, 2});
  for (int64_t l = 0; l < L; ++l) {
    a.append(l, torch::randn({2, H, 6, hd}), torch::randn({2, H, 6, hd}),
             torch::arange(6, torch::kLong).view({1, 6}).expand({2, 6}));
    b.append(l, torch::randn({1, H, 4, hd}), torch::randn({1, H, 4, hd}), torch::arange(4, torch::kLong).view({1, 4}));
  }
  a.set_row_state(1, {{"s", sa}});
  b.set_row_state(1, {{"s", sb}, {"t", torch::ones({1, 2})}});
  EXPECT_THROW(a.set_row_state(0, {{"s", torch::zeros({3, 5})}}), Error);  // 3 rows in a cache of 2
  a.keep(1, torch::tensor({0, 3}, torch::kLong).view({1, 1, 2}).expand({2, H, 2}).contiguous());
  a.advance(6);
  a.rewind({1, 0});
  ASSERT_EQ(a.row_state(1).size(), 1u);
  EXPECT_TRUE(torch::equal(a.row_state(1).at("s"), sa));
  EXPECT_TRUE(a.row_state(0).empty());
  const KVCache c = KVCache::concat_rows({&a, &b});
  const at::Tensor s = c.row_state(1).at("s"), t = c.row_state(1).at("t");
  ASSERT_EQ(s.sizes(), (std::vector<int64_t>{3, 4, 5}));
  EXPECT_TRUE(torch::equal(s.narrow(0, 0, 2).narrow(1, 0, 3), sa));
  EXPECT_EQ(s.narrow(0, 0, 2).narrow(1, 3, 1).abs().sum().item<double>(), 0.0);
  EXPECT_TRUE(torch::equal(s.narrow(0, 2, 1).narrow(2, 0, 2), sb));
  EXPECT_EQ(s.narrow(0, 2, 1).narrow(2, 2, 3).abs().sum().item<double>(), 0.0);
  EXPECT_TRUE(torch::equal(t, torch::tensor({0.0f, 0.0f, 0.0f, 0.0f, 1.0f, 1.0f}).view({3, 2})));  // a had no "t"
  EXPECT_TRUE(c.row_state(0).empty());
  KVCache d(L, 2, H, hd, torch::kFloat, torch::kCPU);
  d.copy_layer_from(a, 1);
  EXPECT_TRUE(torch::equal(d.row_state(1).at("s"), sa));
  const at::Tensor before = a.row_state(1).at("s").clone();
  d.row_state(1).at("s").add_(1.0);  // a writer of the copy's state leaves the original's alone
  EXPECT_TRUE(torch::equal(a.row_state(1).at("s"), before));
  d.clear();
  EXPECT_TRUE(d.row_state(1).empty());
}

// take_rows hands back each part of concat_rows as it was: entries, positions, payload, per-row state, next
// positions, byte counts and per-row peaks; the taken cache goes on appending and evicting as the part would.
TEST(KVCache, TakeRowsUndoesConcatRows) {
  const int64_t L = 2, H = 2, hd = 3;
  torch::manual_seed(5);
  KVCache a(L, 2, H, hd, torch::kFloat, torch::kCPU), b(L, 1, H, hd, torch::kFloat, torch::kCPU);
  a.add_payload("w", torch::kFloat, 7.0);
  for (int64_t l = 0; l < L; ++l) {
    a.append(l, torch::randn({2, H, 6, hd}), torch::randn({2, H, 6, hd}),
             torch::arange(6, torch::kLong).view({1, 6}).expand({2, 6}), {0, 2});  // row 1 left-padded by 2
    a.set_payload_tail(l, "w", torch::randn({2, H, 6}), {0, 2});
    b.append(l, torch::randn({1, H, 4, hd}), torch::randn({1, H, 4, hd}), torch::arange(4, torch::kLong).view({1, 4}));
  }
  a.advance({6, 4});
  b.advance(4);
  // Ragged eviction in layer 1 of a: its heads hold 3, 1, 2 and 4 entries.
  RaggedIndices r;
  r.indices = torch::tensor({0, 2, 5, 4, 1, 3, 0, 1, 2, 3}, torch::kLong);
  r.offsets = torch::tensor({0, 3, 4, 6, 10}, torch::kLong);
  a.keep(1, r);
  a.set_row_state(1, {{"s", torch::randn({2, 3, 5})}});
  const KVCache c = KVCache::concat_rows({&a, &b});
  for (const auto& [part, first] : std::vector<std::pair<const KVCache*, int64_t>>{{&a, 0}, {&b, 2}}) {
    const KVCache t = c.take_rows(first, part->batch());
    ASSERT_EQ(t.batch(), part->batch());
    for (int64_t l = 0; l < L; ++l) {
      EXPECT_EQ(t.lengths(l), part->lengths(l)) << l;
      const KVLayerView x = t.layer(l), y = part->layer(l);
      ASSERT_EQ(x.valid.defined(), y.valid.defined()) << l;
      // What a view holds past a head's entries is no entry's: compared on the entries only.
      const at::Tensor pad = y.valid.defined() ? y.valid.logical_not() : torch::zeros_like(y.pos, torch::kBool);
      const auto same = [&](const at::Tensor& u, const at::Tensor& w) {
        const at::Tensor m = u.dim() == 4 ? pad.unsqueeze(-1) : pad;
        return torch::equal(u.masked_fill(m, 0), w.masked_fill(m, 0));
      };
      EXPECT_TRUE(same(x.pos, y.pos)) << l;
      EXPECT_TRUE(same(x.k, y.k)) << l;
      EXPECT_TRUE(same(x.v, y.v)) << l;
      ASSERT_TRUE(t.has_payload("w"));
      if (part == &a) EXPECT_TRUE(same(x.payload.at("w"), y.payload.at("w"))) << l;
      else EXPECT_TRUE(same(x.payload.at("w"), torch::full_like(x.payload.at("w"), 7.0))) << l;  // b's: the fill
    }
    EXPECT_EQ(t.next_positions(), part->next_positions());
    EXPECT_EQ(t.bytes(), part->bytes());
    for (int64_t row = 0; row < part->batch(); ++row) {
      EXPECT_EQ(t.row_bytes(row), part->row_bytes(row));
      EXPECT_EQ(t.row_peak_bytes(row), part->row_peak_bytes(row));
    }
  }
  KVCache ta = c.take_rows(0, 2);
  const at::Tensor s = ta.row_state(1).at("s");
  ASSERT_EQ(s.sizes(), (std::vector<int64_t>{2, 3, 5}));
  EXPECT_TRUE(torch::equal(s, a.row_state(1).at("s")));
  s.add_(1.0);  // its own copy
  EXPECT_FALSE(torch::equal(c.row_state(1).at("s").narrow(0, 0, 2), s));
  // The taken rows go on as the part does: the same append and the same keep give the same layer.
  KVCache a2 = KVCache::concat_rows({&a});
  const at::Tensor k = torch::randn({2, H, 1, hd}), v = torch::randn({2, H, 1, hd});
  const at::Tensor p = torch::tensor({6, 4}, torch::kLong).view({2, 1});
  for (KVCache* x : {&ta, &a2}) {
    x->append(1, k, v, p);
    x->keep(1, torch::tensor({0, 1}, torch::kLong).view({1, 1, 2}).expand({2, H, 2}).contiguous());
  }
  EXPECT_TRUE(torch::equal(ta.layer(1).k, a2.layer(1).k));  // every head holds 2: no padding
  EXPECT_TRUE(torch::equal(ta.layer(1).pos, a2.layer(1).pos));
  EXPECT_THROW(c.take_rows(2, 2), Error);  // rows 2..3 of a batch of 3
  EXPECT_THROW(c.take_rows(0, 0), Error);
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

// ---- Randomized replay against a naive reference --------------------------------------------------------------

namespace {

// The naive model of the cache: per (layer, head row r = b * H_kv + h), its entries in order, each with its
// payload: a float32 column "score" set at append time or for a whole layer, and a float64 column "late" added
// halfway through (every entry, old or new, holds its fill value).
constexpr double kScoreFill = -1.0, kLateFill = 7.0;
struct RefEntry {
  int64_t pos;
  std::vector<double> k, v;  // (hd) each
  double score = kScoreFill;  // the payload column "score" (float32)
};

struct RefCache {
  int64_t L, B, H, hd;
  std::vector<std::vector<std::vector<RefEntry>>> e;  // [layer][row][entry]
  std::vector<int64_t> next, peak;                    // [B]
  bool late = false;                                  // the "late" column exists
  RefCache(int64_t L_, int64_t B_, int64_t H_, int64_t hd_) : L(L_), B(B_), H(H_), hd(hd_) { clear(); }
  void clear() {
    e.assign(L, std::vector<std::vector<RefEntry>>(B * H));
    next.assign(B, 0);
    peak.assign(B, 0);
  }
  int64_t row_entries(int64_t b) const {
    int64_t n = 0;
    for (int64_t l = 0; l < L; ++l)
      for (int64_t h = 0; h < H; ++h) n += static_cast<int64_t>(e[l][b * H + h].size());
    return n;
  }
};

// Compares every layer, count, byte figure and position of `c` with the reference; returns false on the
// first difference (after recording a gtest failure that names it).
bool matches(const KVCache& c, const RefCache& ref, const std::string& what) {
  const int64_t B = ref.B, H = ref.H, hd = ref.hd, bpe = c.bytes_per_entry();
  int64_t total = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = ref.row_entries(b);
    total += n;
    if (c.row_bytes(b) != n * bpe || c.next_position(b) != ref.next[b] || c.row_peak_bytes(b) != ref.peak[b] * bpe) {
      ADD_FAILURE() << what << ": row " << b << " bytes " << c.row_bytes(b) << " vs " << n * bpe << ", next "
                    << c.next_position(b) << " vs " << ref.next[b] << ", peak " << c.row_peak_bytes(b) << " vs "
                    << ref.peak[b] * bpe;
      return false;
    }
  }
  if (c.next_positions() != ref.next || c.bytes() != total * bpe || c.allocated_bytes() < total * (bpe + 8)) {
    ADD_FAILURE() << what << ": bytes " << c.bytes() << " vs " << total * bpe << ", allocated " << c.allocated_bytes();
    return false;
  }
  for (int64_t l = 0; l < ref.L; ++l) {
    const auto& rows = ref.e[l];
    int64_t n = 0;
    bool ragged = false;
    for (const auto& r : rows) n = std::max<int64_t>(n, static_cast<int64_t>(r.size()));
    std::vector<int64_t> lens;
    for (const auto& r : rows) {
      lens.push_back(static_cast<int64_t>(r.size()));
      ragged = ragged || static_cast<int64_t>(r.size()) != n;
    }
    // Expected padded tensors: padding is zero, position -1.
    std::vector<double> ek(B * H * n * hd, 0.0), ev(B * H * n * hd, 0.0);
    std::vector<int64_t> ep(B * H * n, -1);
    std::vector<uint8_t> evalid(B * H * n, 0);
    std::vector<double> es(B * H * n, kScoreFill);
    for (int64_t r = 0; r < B * H; ++r)
      for (size_t j = 0; j < rows[r].size(); ++j) {
        es[r * n + j] = rows[r][j].score;
        ep[r * n + j] = rows[r][j].pos;
        evalid[r * n + j] = 1;
        for (int64_t d = 0; d < hd; ++d) {
          ek[(r * n + j) * hd + d] = rows[r][j].k[d];
          ev[(r * n + j) * hd + d] = rows[r][j].v[d];
        }
      }
    const KVLayerView view = c.layer(l);
    bool ok = c.lengths(l) == lens && c.max_length(l) == n && view.n == n && view.valid.defined() == ragged;
    ok = ok && view.k.sizes() == at::IntArrayRef({B, H, n, hd}) && view.pos.sizes() == at::IntArrayRef({B, H, n});
    if (ok) {
      auto dbl = torch::TensorOptions().dtype(torch::kDouble);
      ok = torch::equal(view.k.to(torch::kCPU).to(torch::kDouble), torch::from_blob(ek.data(), {B, H, n, hd}, dbl)) &&
           torch::equal(view.v.to(torch::kCPU).to(torch::kDouble), torch::from_blob(ev.data(), {B, H, n, hd}, dbl)) &&
           torch::equal(view.pos.to(torch::kCPU), torch::from_blob(ep.data(), {B, H, n}, torch::kLong));
      if (ok && ragged)
        ok = torch::equal(view.valid.to(torch::kCPU),
                          torch::from_blob(evalid.data(), {B, H, n}, torch::kUInt8).to(torch::kBool));
      // The payload columns, padded like the positions (padding holds the fill value).
      ok = ok && view.payload.size() == (ref.late ? 2u : 1u) &&
           torch::equal(view.payload.at("score").to(torch::kCPU).to(torch::kDouble), torch::from_blob(es.data(), {B, H, n}, dbl));
      if (ok && ref.late)
        ok = torch::equal(view.payload.at("late").to(torch::kCPU), torch::full({B, H, n}, kLateFill, dbl));
      // A positions-only read: the same positions and validity, no keys or values.
      const KVLayerView pv = c.layer(l, LayerRead::Positions);
      ok = ok && !pv.k.defined() && !pv.v.defined() && pv.payload.empty() && torch::equal(pv.pos, view.pos) &&
           pv.valid.defined() == ragged && (!ragged || torch::equal(pv.valid, view.valid)) &&
           torch::equal(c.positions(l), view.pos);
    }
    if (!ok) {
      ADD_FAILURE() << what << ": layer " << l << " differs from the reference (n " << view.n << " vs " << n << ")";
      return false;
    }
  }
  return true;
}

void replay_against_reference(c10::ScalarType dtype, c10::Device device, int64_t ops, uint64_t seed) {
  const int64_t L = 2, B = 3, H = 2, hd = 3;
  KVCache c(L, B, H, hd, dtype, device);
  c.add_payload("score", torch::kFloat, kScoreFill);
  RefCache ref(L, B, H, hd);
  std::mt19937_64 rng(seed);
  torch::manual_seed(static_cast<uint64_t>(seed));
  auto uni = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  // Sorted random subset of `keep` indices out of [0, n).
  auto subset = [&](int64_t n, int64_t keep) {
    std::vector<int64_t> all(n);
    std::iota(all.begin(), all.end(), 0);
    std::shuffle(all.begin(), all.end(), rng);
    all.resize(keep);
    std::sort(all.begin(), all.end());
    return all;
  };
  auto dev = torch::TensorOptions().device(device);
  for (int64_t op = 0; op < ops; ++op) {
    if (op == ops / 2) {
      c.add_payload("late", torch::kDouble, kLateFill);
      ref.late = true;
    }
    const int64_t kind = uni(0, 99);
    std::string what;
    if (kind < 55) {
      // Append to every layer (as a forward does), t = 1 or a chunk, with or without left padding.
      const int64_t t = uni(0, 1) ? 1 : uni(2, 6);
      std::vector<int64_t> lead;
      if (uni(0, 2) == 0)
        for (int64_t b = 0; b < B; ++b) lead.push_back(uni(0, t));
      const bool per_head_pos = uni(0, 3) == 0;
      what = "op " + std::to_string(op) + " append t=" + std::to_string(t) + (lead.empty() ? "" : " padded");
      for (int64_t l = 0; l < L; ++l) {
        at::Tensor k = torch::randn({B, H, t, hd}).to(dtype), v = torch::randn({B, H, t, hd}).to(dtype);
        at::Tensor kd = k.to(torch::kDouble), vd = v.to(torch::kDouble);  // exact copies for the reference
        at::Tensor pos = torch::empty({B, H, t}, torch::kLong);          // (B, H_kv, t)
        for (int64_t b = 0; b < B; ++b)
          for (int64_t h = 0; h < H; ++h)
            for (int64_t j = 0; j < t; ++j) {
              const int64_t lb = lead.empty() ? 0 : lead[b];
              // Padding slots get garbage positions: they must not be stored.
              pos[b][h][j] = j < lb ? -77 : ref.next[b] + (j - lb) + (per_head_pos ? 1000 * h : 0);
            }
        at::Tensor p = per_head_pos ? pos : pos.select(1, 0).contiguous();  // (B, H_kv, t) or (B, t)
        if (lead.empty() && uni(0, 1))
          c.append(l, k.to(device), v.to(device), p.to(device));
        else
          c.append(l, k.to(device), v.to(device), p.to(device), lead);
        // Half the appends also write the new entries' scores, as a scorer's on_append does.
        const bool scored = uni(0, 1) == 1;
        const at::Tensor sc = torch::randn({B, H, t});  // (B, H_kv, t) float32
        if (scored) c.set_payload_tail(l, "score", sc.to(device), lead);
        for (int64_t b = 0; b < B; ++b) {
          const int64_t lb = lead.empty() ? 0 : lead[b];
          for (int64_t h = 0; h < H; ++h)
            for (int64_t j = lb; j < t; ++j) {
              RefEntry e{pos[b][h][j].item<int64_t>(), {}, {}, scored ? sc[b][h][j].item<double>() : kScoreFill};
              for (int64_t d = 0; d < hd; ++d) {
                e.k.push_back(kd[b][h][j][d].item<double>());
                e.v.push_back(vd[b][h][j][d].item<double>());
              }
              ref.e[l][b * H + h].push_back(std::move(e));
            }
        }
        for (int64_t b = 0; b < B; ++b) ref.peak[b] = std::max(ref.peak[b], ref.row_entries(b));
      }
      std::vector<int64_t> adv(B);
      for (int64_t b = 0; b < B; ++b) adv[b] = t - (lead.empty() ? 0 : lead[b]);
      if (lead.empty() && uni(0, 1)) {
        c.advance(t);
      } else {
        c.advance(adv);
      }
      for (int64_t b = 0; b < B; ++b) ref.next[b] += adv[b];
    } else if (kind < 62) {
      // New scores for every entry of one layer (padded view order; padding values are ignored).
      const int64_t l = uni(0, L - 1);
      const int64_t n = c.max_length(l);
      const at::Tensor sc = torch::randn({B, H, n});  // (B, H_kv, n)
      c.set_payload(l, "score", sc.to(device));
      for (int64_t r = 0; r < B * H; ++r)
        for (size_t j = 0; j < ref.e[l][r].size(); ++j) ref.e[l][r][j].score = sc[r / H][r % H][j].item<double>();
      what = "op " + std::to_string(op) + " set_payload";
    } else if (kind < 72) {
      // Ragged keep on one layer: each head keeps its own random subset.
      const int64_t l = uni(0, L - 1);
      std::vector<int64_t> idx, off{0};
      for (int64_t r = 0; r < B * H; ++r) {
        auto& row = ref.e[l][r];
        const int64_t n = static_cast<int64_t>(row.size());
        std::vector<int64_t> s = subset(n, uni(0, n));
        std::vector<RefEntry> kept;
        for (int64_t i : s) kept.push_back(row[i]);
        row = kept;
        idx.insert(idx.end(), s.begin(), s.end());
        off.push_back(static_cast<int64_t>(idx.size()));
      }
      RaggedIndices rg{torch::tensor(idx, torch::kLong).to(device), torch::tensor(off, torch::kLong)};
      c.keep(l, rg);
      what = "op " + std::to_string(op) + " ragged keep";
    } else if (kind < 80) {
      // Uniform keep on one layer: every head keeps n_keep <= its count.
      const int64_t l = uni(0, L - 1);
      int64_t mn = std::numeric_limits<int64_t>::max();
      for (const auto& row : ref.e[l]) mn = std::min<int64_t>(mn, static_cast<int64_t>(row.size()));
      const int64_t n_keep = uni(0, mn);
      at::Tensor idx = torch::empty({B, H, n_keep}, torch::kLong);
      for (int64_t r = 0; r < B * H; ++r) {
        auto& row = ref.e[l][r];
        std::vector<int64_t> s = subset(static_cast<int64_t>(row.size()), n_keep);
        std::vector<RefEntry> kept;
        for (int64_t j = 0; j < n_keep; ++j) {
          idx[r / H][r % H][j] = s[j];
          kept.push_back(row[s[j]]);
        }
        row = kept;
      }
      c.keep(l, idx.to(device));
      what = "op " + std::to_string(op) + " uniform keep " + std::to_string(n_keep);
    } else if (kind < 97) {
      // Rewind each row by up to what all its heads hold.
      std::vector<int64_t> back(B);
      for (int64_t b = 0; b < B; ++b) {
        int64_t mn = ref.next[b];
        for (int64_t l = 0; l < L; ++l)
          for (int64_t h = 0; h < H; ++h) mn = std::min<int64_t>(mn, static_cast<int64_t>(ref.e[l][b * H + h].size()));
        back[b] = uni(0, std::min<int64_t>(mn, 4));
        for (int64_t l = 0; l < L; ++l)
          for (int64_t h = 0; h < H; ++h) ref.e[l][b * H + h].resize(ref.e[l][b * H + h].size() - back[b]);
        ref.next[b] -= back[b];
      }
      c.rewind(back);
      what = "op " + std::to_string(op) + " rewind";
    } else {
      c.clear();
      ref.clear();
      what = "op " + std::to_string(op) + " clear";
    }
    if (!matches(c, ref, what)) return;
  }
  // Rewinding more than a head holds is refused.
  std::vector<int64_t> too_far(B, 0);
  too_far[0] = ref.next[0] + 1;
  EXPECT_THROW(c.rewind(too_far), Error);
  (void)dev;
}

}  // namespace

TEST(KVCache, RandomOpsMatchNaiveReference) {
  replay_against_reference(torch::kFloat, torch::kCPU, 200, 11);
  replay_against_reference(torch::kBFloat16, torch::kCPU, 80, 12);
  replay_against_reference(torch::kDouble, torch::kCPU, 80, 13);
  if (torch::cuda::is_available()) {
    replay_against_reference(torch::kFloat, torch::kCUDA, 200, 14);
    replay_against_reference(torch::kBFloat16, torch::kCUDA, 80, 15);
  }
}

TEST(KVCache, PlainAppendsAreZeroCopyViews) {
  const int64_t L = 1, B = 2, H = 3, hd = 4;
  KVCache c(L, B, H, hd, torch::kFloat, torch::kCPU);
  torch::manual_seed(3);
  at::Tensor k = torch::randn({B, H, 20, hd}), v = torch::randn({B, H, 20, hd});
  c.append(0, k, v, torch::arange(20, torch::kLong).view({1, 20}).expand({B, 20}));
  c.append(0, k.narrow(2, 0, 1), v.narrow(2, 0, 1), torch::full({B, 1}, 20, torch::kLong));  // a decode step
  const KVLayerView view = c.layer(0);
  EXPECT_FALSE(view.valid.defined());
  EXPECT_TRUE(torch::equal(view.k.narrow(2, 0, 20), k));
  // The view's data lies inside the cache's own buffer: the same address every call, and a write through it
  // is seen by the next layer() call.
  EXPECT_EQ(c.layer(0).k.data_ptr(), view.k.data_ptr());
  EXPECT_EQ(c.layer(0).v.data_ptr(), view.v.data_ptr());
  EXPECT_FALSE(view.k.is_contiguous());  // a narrow of the (B, H_kv, cap, hd) storage (cap > n: growth slack)
  view.k.fill_(7.0f);
  EXPECT_TRUE(c.layer(0).k.eq(7.0f).all().item<bool>());
  // A uniform keep stays zero-copy (exactly sized: then the view is the whole buffer).
  c.keep(0, torch::arange(5, torch::kLong).view({1, 1, 5}).expand({B, H, 5}).contiguous());
  EXPECT_EQ(c.layer(0).k.data_ptr(), c.layer(0).k.data_ptr());
  EXPECT_EQ(c.allocated_bytes(), B * H * 5 * (c.bytes_per_entry() + 8));
  // A ragged keep makes layer() a transient padded copy: writing to it leaves the cache alone.
  RaggedIndices rg{torch::tensor({0, 1, 2, 0, 0, 1, 2, 3, 4, 4}, torch::kLong),
                   torch::tensor({0, 3, 4, 4, 8, 9, 10}, torch::kLong)};
  c.keep(0, rg);
  EXPECT_EQ(c.allocated_bytes(), 10 * (c.bytes_per_entry() + 8));
  KVLayerView r1 = c.layer(0);
  ASSERT_TRUE(r1.valid.defined());
  EXPECT_NE(r1.k.data_ptr(), c.layer(0).k.data_ptr());
  r1.k.fill_(-3.0f);
  EXPECT_TRUE(c.layer(0).k.eq(7.0f).logical_or(c.layer(0).valid.logical_not().unsqueeze(-1)).all().item<bool>());
  EXPECT_TRUE(c.layer(0).k.masked_select(c.layer(0).valid.logical_not().unsqueeze(-1)).eq(0).all().item<bool>());
}

// After a ragged keep, the first append that must grow gives every head the largest capacity when that adds at most
// an eighth to the layer: layer() is then a view of the storage again (no gather per read), with `valid` marking
// each head's own entries. Counts far apart keep their own capacities (and a gathered layer()).
TEST(KVCache, GrowingAppendsAfterARaggedKeepBecomeZeroCopy) {
  const int64_t B = 2, H = 2, hd = 4, n = 200;
  torch::manual_seed(5);
  at::Tensor k = torch::randn({B, H, n, hd}), v = torch::randn({B, H, n, hd});
  at::Tensor pos = torch::arange(n, torch::kLong).view({1, n}).expand({B, n});
  at::Tensor k1 = torch::randn({B, H, 1, hd}), v1 = torch::randn({B, H, 1, hd});
  for (const std::vector<int64_t>& counts : {std::vector<int64_t>{100, 104, 108, 112}, std::vector<int64_t>{10, 190, 20, 30}}) {
    KVCache c(1, B, H, hd, torch::kFloat, torch::kCPU);
    c.append(0, k, v, pos);
    std::vector<int64_t> idx, off{0};
    for (int64_t x : counts) {
      for (int64_t j = 0; j < x; ++j) idx.push_back(n - x + j);  // each head keeps its last x entries
      off.push_back(off.back() + x);
    }
    c.keep(0, RaggedIndices{torch::tensor(idx, torch::kLong), torch::tensor(off, torch::kLong)});
    c.append(0, k1, v1, torch::full({B, 1}, n, torch::kLong));  // no room after an exact keep: grows
    const KVLayerView view = c.layer(0);
    ASSERT_TRUE(view.valid.defined());
    for (int64_t r = 0; r < B * H; ++r) {
      const int64_t b = r / H, h = r % H, x = counts[r];
      EXPECT_EQ(c.length(0, b, h), x + 1);
      EXPECT_TRUE(torch::equal(view.k[b][h].narrow(0, 0, x), k[b][h].narrow(0, n - x, x)));
      EXPECT_TRUE(torch::equal(view.k[b][h][x], k1[b][h][0]));
      EXPECT_TRUE(torch::equal(view.pos[b][h].narrow(0, 0, x + 1), torch::arange(n - x, n + 1, torch::kLong)));
      EXPECT_EQ(view.valid[b][h].sum().item<int64_t>(), x + 1);
      EXPECT_TRUE(view.k[b][h].narrow(0, x + 1, view.n - x - 1).eq(0).all().item<bool>());  // padding is zero
    }
    const bool close = counts[0] == 100;
    // cap = need + max(16, need / 8) per head: 117 + 121 + 125 + 129 = 492 slots, 4 x 129 = 516 <= 492 + 61; far
    // apart: 27 + 214 + 37 + 47 = 325, 4 x 214 = 856 > 325 + 40.
    const int64_t slots = close ? 4 * 129 : (11 + 16) + (191 + 23) + (21 + 16) + (31 + 16);
    EXPECT_EQ(c.allocated_bytes(), slots * (c.bytes_per_entry() + 8)) << counts[1];
    EXPECT_EQ(c.layer(0).k.data_ptr() == view.k.data_ptr(), close) << counts[1];  // zero-copy only when regular
  }
}

// A keep whose heads' counts differ by little (rows of a batch at one ratio) pads every segment to the largest
// count: the layer is regular at once, layer() a view of the storage (no gather per read), the padding zero with
// positions -1 and the payload's fill, and the storage within 1/64 of the kept entries. Counts far apart keep
// exact segments.
TEST(KVCache, KeepWithCloseCountsIsRegular) {
  const int64_t B = 2, H = 2, hd = 4, n = 200;
  torch::manual_seed(6);
  const at::Tensor k = torch::randn({B, H, n, hd}), v = torch::randn({B, H, n, hd});
  const at::Tensor pos = torch::arange(n, torch::kLong).view({1, n}).expand({B, n});
  for (const std::vector<int64_t>& counts : {std::vector<int64_t>{128, 129, 130, 130}, std::vector<int64_t>{100, 130, 120, 130}}) {
    KVCache c(1, B, H, hd, torch::kFloat, torch::kCPU);
    c.add_payload("score", torch::kFloat, -7.0);
    c.append(0, k, v, pos);
    std::vector<int64_t> idx, off{0};
    for (int64_t x : counts) {
      for (int64_t j = 0; j < x; ++j) idx.push_back(2 * j % n + (2 * j >= n));  // every other entry, then the rest
      std::sort(idx.end() - x, idx.end());
      off.push_back(off.back() + x);
    }
    c.keep(0, RaggedIndices{torch::tensor(idx, torch::kLong), torch::tensor(off, torch::kLong)});
    const KVLayerView view = c.layer(0);
    const bool close = counts[0] == 128;  // 4 x 130 = 520 <= 517 + 8; far apart: 4 x 130 = 520 > 480 + 7
    EXPECT_EQ(c.layer(0).k.data_ptr() == view.k.data_ptr(), close) << counts[0];
    EXPECT_EQ(c.allocated_bytes(), (close ? 4 * 130 : 480) * (c.bytes_per_entry() + 8 + 4)) << counts[0];
    ASSERT_TRUE(view.valid.defined());
    EXPECT_EQ(view.n, 130);
    for (int64_t r = 0; r < B * H; ++r) {
      const int64_t b = r / H, h = r % H, x = counts[r];
      const at::Tensor want = torch::tensor(std::vector<int64_t>(idx.begin() + off[r], idx.begin() + off[r + 1]), torch::kLong);
      EXPECT_EQ(c.length(0, b, h), x);
      EXPECT_TRUE(torch::equal(view.k[b][h].narrow(0, 0, x), k[b][h].index_select(0, want)));
      EXPECT_TRUE(torch::equal(view.v[b][h].narrow(0, 0, x), v[b][h].index_select(0, want)));
      EXPECT_TRUE(torch::equal(view.pos[b][h].narrow(0, 0, x), want));
      EXPECT_TRUE(view.k[b][h].narrow(0, x, view.n - x).eq(0).all().item<bool>());
      EXPECT_TRUE(view.pos[b][h].narrow(0, x, view.n - x).eq(-1).all().item<bool>());
      EXPECT_TRUE(view.payload.at("score")[b][h].narrow(0, x, view.n - x).eq(-7.0).all().item<bool>());
    }
    EXPECT_EQ(c.bytes(), std::accumulate(counts.begin(), counts.end(), int64_t{0}) * c.bytes_per_entry());
  }
}

// A lead of B * H_kv counts pads each head on its own: head r stores its last t - lead[r] entries (positions
// given per head), after what it held; a row's heads then no longer count as aligned. raise_peaks only raises.
TEST(KVCache, PerHeadLeadAppendsEachHeadsOwnTail) {
  KVCache cache(1, 2, 2, 4, torch::kFloat, torch::kCPU);
  const at::Tensor k0 = torch::randn({2, 2, 2, 4}), v0 = torch::randn({2, 2, 2, 4});
  cache.append(0, k0, v0, torch::tensor({0, 1, 0, 1}, torch::kLong).view({2, 2}));
  const at::Tensor k = torch::randn({2, 2, 3, 4}), v = torch::randn({2, 2, 3, 4});
  const at::Tensor pos = torch::tensor({5, 6, 7, 15, 16, 17, 25, 26, 27, 35, 36, 37}, torch::kLong).view({2, 2, 3});
  const std::vector<int64_t> lead = {0, 1, 3, 2};
  cache.append(0, k, v, pos, lead);
  EXPECT_EQ(cache.lengths(0), (std::vector<int64_t>{5, 4, 2, 3}));
  EXPECT_FALSE(cache.heads_aligned(0));
  const KVLayerView kv = cache.layer(0);
  for (int64_t r = 0; r < 4; ++r) {
    const int64_t b = r / 2, h = r % 2, gain = 3 - lead[r];
    for (int64_t j = 0; j < gain; ++j) {
      EXPECT_EQ(kv.pos[b][h][2 + j].item<int64_t>(), pos[b][h][lead[r] + j].item<int64_t>()) << "head " << r;
      EXPECT_TRUE(torch::equal(kv.k[b][h][2 + j], k[b][h][lead[r] + j])) << "head " << r;
      EXPECT_TRUE(torch::equal(kv.v[b][h][2 + j], v[b][h][lead[r] + j])) << "head " << r;
    }
  }
  EXPECT_THROW(cache.append(0, k, v, pos, std::vector<int64_t>{0, 1, 2}), Error);  // neither B nor B * H_kv
  // A payload column written for the same per-head tails: head r's last 3 - lead[r] entries get its values from
  // lead[r] on; the entries before them keep the fill.
  cache.add_payload("score", torch::kFloat, -1.0);
  const at::Tensor vals = torch::arange(12, torch::kFloat).view({2, 2, 3});
  cache.set_payload_tail(0, "score", vals, lead);
  const at::Tensor col = cache.layer(0).payload.at("score");  // (2, 2, 5)
  for (int64_t r = 0; r < 4; ++r) {
    const int64_t b = r / 2, h = r % 2, gain = 3 - lead[r];
    for (int64_t j = 0; j < 2; ++j) EXPECT_EQ(col[b][h][j].item<float>(), -1.0f) << "head " << r;
    for (int64_t j = 0; j < gain; ++j)
      EXPECT_EQ(col[b][h][2 + j].item<float>(), vals[b][h][lead[r] + j].item<float>()) << "head " << r << " entry " << j;
  }
  EXPECT_THROW(cache.set_payload_tail(0, "score", vals, std::vector<int64_t>{0, 1, 2}), Error);
  const int64_t peak0 = cache.row_peak_bytes(0), total = cache.peak_bytes();
  cache.raise_peaks({peak0 - 1, peak0 + 7}, total - 1);
  EXPECT_EQ(cache.row_peak_bytes(0), peak0);
  EXPECT_EQ(cache.row_peak_bytes(1), peak0 + 7);
  EXPECT_EQ(cache.peak_bytes(), total);
}
