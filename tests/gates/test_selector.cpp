// Selectors: budgets (kvpress ratio meaning), tie order, AdaKV floor, PyramidKV layer budgets, threshold,
// global allocation, and the TensorRT-LLM ragged layout.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include <torch/torch.h>

#include "common/error.h"
#include "gates/selector.h"

using namespace kvd;

TEST(Selector, RatioBudgetIsKvpressNKept) {
  EXPECT_EQ(Budget::ratio(0.5).n_kept(101), 50);   // floor(101 * 0.5)
  EXPECT_EQ(Budget::ratio(0.75).n_kept(10), 2);    // floor(2.5)
  EXPECT_EQ(Budget::ratio(0.99).n_kept(10), 1);    // clamped to >= 1
  EXPECT_EQ(Budget::tokens(64).n_kept(10), 10);    // clipped to n
  EXPECT_THROW(Budget::ratio(1.0), Error);
  EXPECT_THROW(Budget::ratio(-0.1), Error);
}

TEST(Selector, UniformTopKTiesGoToTheLowerIndex) {
  at::Tensor s = torch::tensor({1.f, 3.f, 3.f, 0.f, 3.f, 2.f}).view({1, 1, 6});  // (B, H_kv, n)
  SelectorOptions opt;
  opt.budget = Budget::tokens(2);
  RaggedIndices r = select_layer(s, 0, 1, opt);
  EXPECT_EQ(ragged_to_lists(r)[0], (std::vector<int64_t>{1, 2}));
}

// A k per batch row (CAKE's cascade cuts every row at once): each row equals topk_mask of that row alone, ties
// (many here: 4 distinct values) to the lower index, -inf padding last.
TEST(Selector, TopKMaskWithAKPerRow) {
  at::Tensor s = torch::randint(0, 4, {3, 2, 9}, at::detail::createCPUGenerator(5)).to(torch::kFloat);  // (B, H_kv, n)
  s[2].narrow(-1, 6, 3).fill_(-INFINITY);  // row 2 holds 6 entries
  const std::vector<int64_t> k = {0, 4, 6};
  const at::Tensor got = topk_mask(s, k);
  for (int64_t b = 0; b < 3; ++b)
    EXPECT_TRUE(torch::equal(got[b], topk_mask(s.narrow(0, b, 1), k[b])[0])) << "row " << b;
  EXPECT_EQ(got[2].narrow(-1, 6, 3).sum().item<int64_t>(), 0);  // the padding is never kept
  EXPECT_EQ(got.sum().item<int64_t>(), 2 * (0 + 4 + 6));
  EXPECT_THROW(topk_mask(s, std::vector<int64_t>{1, 2}), Error);  // one k per row
}

// rank_desc against a naive count: an entry's rank is the number of entries that beat it (higher, or equal at a
// lower index). Cutting the top k' and then ranking what is left keeps the same top k (what CAKE's cuts rely on).
TEST(Selector, RankDescIsTheStableDescendingRank) {
  torch::manual_seed(4);
  const at::Tensor s = torch::randint(0, 6, {2, 3, 17}).to(torch::kFloat);  // many ties
  const at::Tensor r = rank_desc(s);
  auto a = s.accessor<float, 3>();
  auto ra = r.accessor<int64_t, 3>();
  for (int64_t b = 0; b < 2; ++b)
    for (int64_t h = 0; h < 3; ++h)
      for (int64_t i = 0; i < 17; ++i) {
        int64_t beat = 0;
        for (int64_t j = 0; j < 17; ++j) beat += a[b][h][j] > a[b][h][i] || (a[b][h][j] == a[b][h][i] && j < i);
        ASSERT_EQ(ra[b][h][i], beat) << b << " " << h << " " << i;
      }
  for (int64_t k : {0, 3, 9, 17}) EXPECT_TRUE(torch::equal(topk_mask(s, k), r.lt(k))) << k;
}

// select_top_prefix (counts from the host) keeps what select_top keeps when each head's entries are a prefix of
// its scores (-inf past them), and refuses counts that are not the mask's.
TEST(Selector, TopKWithHostCountsEqualsTopK) {
  torch::manual_seed(5);
  const float ninf = -std::numeric_limits<float>::infinity();
  const int64_t B = 3, H = 2, n = 40;
  const at::Tensor len = torch::randint(0, n + 1, {B, H}, torch::kLong).contiguous();
  const std::vector<int64_t> lengths(len.data_ptr<int64_t>(), len.data_ptr<int64_t>() + B * H);
  const at::Tensor valid = torch::arange(n, torch::kLong).view({1, 1, n}).lt(len.unsqueeze(-1));  // (B, H, n)
  const at::Tensor s = (torch::round(torch::randn({B, H, n}) * 3.0) / 3.0).masked_fill(valid.logical_not(), ninf);
  for (const std::vector<int64_t>& k : {std::vector<int64_t>{0, 5, 100}, std::vector<int64_t>{7, 7, 7}}) {
    const RaggedIndices want = select_top(s, k, valid, KernelPath::Reference);
    const RaggedIndices got = select_top_prefix(s, k, lengths, KernelPath::Reference);
    EXPECT_TRUE(torch::equal(got.offsets, want.offsets));
    EXPECT_EQ(ragged_to_lists(got), ragged_to_lists(want));
  }
  std::vector<int64_t> wrong(B * H, 1);
  EXPECT_THROW(ragged_from_mask(valid, wrong), Error);
}

TEST(Selector, RaggedLayoutIsSortedIndicesPlusOffsets) {
  at::Tensor mask = torch::tensor({1, 0, 1, 0, 0, 0, 1, 1, 1}, torch::kBool).view({1, 3, 3});  // (B, H_kv, n)
  RaggedIndices r = ragged_from_mask(mask);
  EXPECT_TRUE(torch::equal(r.offsets, torch::tensor({0, 2, 2, 5}, torch::kLong)));
  EXPECT_TRUE(torch::equal(r.indices, torch::tensor({0, 2, 0, 1, 2}, torch::kLong)));
  EXPECT_EQ(r.count(1), 0);
}

TEST(Selector, AdaKVKeepsHTimesNKeptWithAFloorPerHead) {
  const int64_t H = 3, n = 100;
  // Head 0 outranks everyone; head 2 is the weakest.
  at::Tensor s = torch::rand({1, H, n}) + torch::tensor({2.f, 1.f, 0.f}).view({1, H, 1});  // (1, H, n)
  SelectorOptions opt;
  opt.allocation = Allocation::AdaKV;
  opt.budget = Budget::ratio(0.75);  // n_kept = 25, floor = 5
  auto lists = ragged_to_lists(select_layer(s, 0, 1, opt));
  EXPECT_EQ(lists[0].size() + lists[1].size() + lists[2].size(), static_cast<size_t>(H * 25));
  EXPECT_EQ(lists[0].size(), 65u);  // its floor of 5 + the 60 best of the rest (75 - 3 floors of 5)
  EXPECT_EQ(lists[1].size(), 5u);
  EXPECT_EQ(lists[2].size(), 5u);
}

TEST(Selector, PyramidBudgetsMatchKvpress) {
  // n = 1450, r = 0.1, w = 64, beta = 20: max_num clipped to n - w = 1386, min_num = 2 * 1305 - 1386 = 1224.
  EXPECT_EQ(pyramid_layer_budget(1450, 0.1, 64, 20, 0, 30), 1386);
  EXPECT_EQ(pyramid_layer_budget(1450, 0.1, 64, 20, 29, 30), 1224);
  EXPECT_EQ(pyramid_layer_budget(1450, 0.1, 64, 20, 1, 30), 1380);  // round(1386 - 162/29 = 1380.41)
  // n = 500, r = 0.5: max_num = 436, min_num = 64; layer 7: round(436 - 7 * 372 / 29 = 346.2).
  EXPECT_EQ(pyramid_layer_budget(500, 0.5, 64, 20, 7, 30), 346);
  // r = 0.75: min_num = 6.25 < w, so kvpress falls back to round(n (1 - r)) for every layer.
  EXPECT_EQ(pyramid_layer_budget(500, 0.75, 64, 20, 7, 30), 125);
}

TEST(Selector, ThresholdAndGlobal) {
  at::Tensor s0 = torch::tensor({0.1f, 0.9f, 0.5f, 0.7f}).view({1, 1, 4});
  at::Tensor s1 = torch::tensor({0.8f, 0.2f, 0.95f, 0.3f}).view({1, 1, 4});
  SelectorOptions th;
  th.budget = Budget::threshold(0.6);
  EXPECT_EQ(ragged_to_lists(select_layer(s0, 0, 2, th))[0], (std::vector<int64_t>{1, 3}));
  SelectorOptions g;
  g.allocation = Allocation::Global;
  g.budget = Budget::ratio(0.5);  // 2 per head on average: the top 4 of 8
  auto r = select_all({s0, s1}, g);
  EXPECT_EQ(ragged_to_lists(r[0])[0], (std::vector<int64_t>{1, 3}));
  EXPECT_EQ(ragged_to_lists(r[1])[0], (std::vector<int64_t>{0, 2}));
  EXPECT_THROW(select_layer(s0, 0, 2, g), Error);
}

TEST(Selector, TokensSoFarAndValidity) {
  // Chunked prefill: the budget applies to the tokens seen (10 at ratio 0.5 -> 5), not to the 7 entries held;
  // entries outside `valid` are never kept even when the budget exceeds the valid ones.
  at::Tensor s = torch::tensor({5.f, 1.f, 4.f, 2.f, 3.f, 0.f, 6.f, 9.f, 8.f, 7.f, -INFINITY, -INFINITY, -INFINITY,
                                -INFINITY})
                     .view({1, 2, 7});  // (B, H_kv, n)
  at::Tensor valid = torch::ones({1, 2, 7}, torch::kBool);
  valid[0][1].narrow(0, 3, 4).fill_(false);  // head 1 holds 3 entries
  SelectorOptions opt;
  opt.budget = Budget::ratio(0.5);
  auto lists = ragged_to_lists(select_layer(s, 0, 1, opt, 10, valid));
  EXPECT_EQ(lists[0], (std::vector<int64_t>{0, 2, 3, 4, 6}));
  EXPECT_EQ(lists[1], (std::vector<int64_t>{0, 1, 2}));
}

TEST(Selector, GlobalAcrossLayersOfDifferentLengths) {
  // Layer 0 holds 2 entries, layer 1 holds 4; tokens 4 at ratio 0.5: 2 layers * 1 head * 2 = 4 kept in all.
  std::vector<at::Tensor> s = {torch::tensor({0.5f, 0.9f}).view({1, 1, 2}),
                               torch::tensor({0.1f, 0.8f, 0.7f, 0.2f}).view({1, 1, 4})};
  SelectorOptions opt;
  opt.allocation = Allocation::Global;
  opt.budget = Budget::ratio(0.5);
  std::vector<RaggedIndices> r = select_all(s, opt, 4);
  // The top 4 pooled: 0.9, 0.8, 0.7, 0.5 (the shorter layer is padded with -inf, never kept).
  EXPECT_EQ(ragged_to_lists(r[0])[0], (std::vector<int64_t>{0, 1}));
  EXPECT_EQ(ragged_to_lists(r[1])[0], (std::vector<int64_t>{1, 2}));
  // tokens 6: 6 kept of the 6 held, the padding of layer 0 still excluded.
  r = select_all(s, opt, 6);
  EXPECT_EQ(r[0].count(0), 2);
  EXPECT_EQ(r[1].count(0), 4);
}

TEST(Selector, ConcatRaggedAndKeepAll) {
  RaggedIndices a = ragged_keep_all({2, 0});
  RaggedIndices b = ragged_from_mask(torch::tensor({0, 1, 1, 1, 0, 0}, torch::kBool).view({1, 2, 3}));
  RaggedIndices c = concat_ragged({a, b});
  EXPECT_EQ(ragged_to_lists(c), (std::vector<std::vector<int64_t>>{{0, 1}, {}, {1, 2}, {0}}));
  EXPECT_TRUE(torch::equal(c.offsets, torch::tensor({0, 2, 2, 4, 5}, torch::kLong)));
}

TEST(Selector, CakeLayerBudgetsAgainstANaiveSplit) {
  // Exact proportional shares.
  EXPECT_EQ(cake_layer_budgets({1, 2, 3, 4}, 100, 1000), (std::vector<int64_t>{10, 20, 30, 40}));
  // Rounded down: 10/3 each -> 3.
  EXPECT_EQ(cake_layer_budgets({1, 1, 1}, 10, 1000), (std::vector<int64_t>{3, 3, 3}));
  // Cap: layer 0 would get 25 > 12, so it holds 12 and the other two split 18.
  EXPECT_EQ(cake_layer_budgets({10, 1, 1}, 30, 12), (std::vector<int64_t>{12, 9, 9}));
  // Everything fits: every layer at its cap.
  EXPECT_EQ(cake_layer_budgets({1, 5}, 50, 20), (std::vector<int64_t>{20, 20}));
  // Naive reference on irregular preferences: floor(total p / Σp).
  const std::vector<double> p = {0.37, 2.9, 1.13, 0.02, 5.5};
  const int64_t total = 137;
  const std::vector<int64_t> got = cake_layer_budgets(p, total, 1000);
  double sp = 0;
  for (double x : p) sp += x;
  int64_t sum = 0;
  for (size_t i = 0; i < p.size(); ++i) {
    const double share = total * p[i] / sp;
    EXPECT_EQ(got[i], static_cast<int64_t>(std::floor(share)));
    sum += got[i];
  }
  EXPECT_LE(sum, total);
  EXPECT_GT(sum, total - static_cast<int64_t>(p.size()));
  // Cascade monotonicity: adding a layer never raises an earlier layer's budget.
  const std::vector<int64_t> first3 = cake_layer_budgets({p[0], p[1], p[2]}, total, 1000);
  for (size_t i = 0; i < 3; ++i) EXPECT_LE(got[i], first3[i]);
}

// select_top / select_threshold over a batch: each row with its own budget, padded past its entries, keeps what a
// hand-ranked list keeps (rows selected together, as compress_prefill does for a layer).
TEST(Selector, RowsSelectedTogetherKeepTheirOwnBudgets) {
  const float ninf = -INFINITY;
  at::Tensor s = torch::tensor({2.f, 5.f, 5.f, 1.f, 4.f,        // row 0: 5 entries
                                3.f, 0.f, 3.f, ninf, ninf})  // row 1: 3 entries, then padding
                     .view({2, 1, 5});                        // (B, H_kv, n)
  at::Tensor valid = torch::tensor({1, 1, 1, 1, 1, 1, 1, 1, 0, 0}, torch::kBool).view({2, 1, 5});
  const auto lists = ragged_to_lists(select_top(s, {3, 5}, valid, KernelPath::Reference));
  EXPECT_EQ(lists[0], (std::vector<int64_t>{1, 2, 4}));  // 5, 5, 4
  EXPECT_EQ(lists[1], (std::vector<int64_t>{0, 1, 2}));  // all 3 entries; the padding never
  const auto th = ragged_to_lists(select_threshold(s, 3.0, valid, KernelPath::Reference));
  EXPECT_EQ(th[0], (std::vector<int64_t>{1, 2, 4}));
  EXPECT_EQ(th[1], (std::vector<int64_t>{0, 2}));
  EXPECT_THROW(select_top(s, {3}, valid, KernelPath::Reference), Error);  // one budget per row
  SelectorOptions pyr;
  pyr.allocation = Allocation::Pyramid;
  pyr.budget = Budget::ratio(0.5);
  EXPECT_EQ(layer_keep_count(pyr, 1, 4, 1000), pyramid_layer_budget(1000, 0.5, 64, 20.0, 1, 4));
  pyr.allocation = Allocation::AdaKV;
  EXPECT_THROW(layer_keep_count(pyr, 1, 4, 1000), Error);  // no fixed count per head
}
