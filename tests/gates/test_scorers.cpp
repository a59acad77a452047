// Heuristic scorers on hand-made caches: formulas of docs/methods/ (the kvpress parity on SmolLM2 is
// tests/python/test_kvpress_parity.py).
#include <gtest/gtest.h>

#include <cmath>
#include <string>

#include <torch/torch.h>

#include "common/error.h"
#include "gates/compress.h"
#include "gates/registry.h"
#include "gates/heuristics.h"
#include "gates/selector.h"

using namespace kvd;

namespace {

LayerView make_view(int64_t B, int64_t Hkv, int64_t n, int64_t hd) {
  LayerView v;
  v.keys = torch::randn({B, Hkv, n, hd});    // (B, H_kv, n, hd)
  v.values = torch::randn({B, Hkv, n, hd});  // (B, H_kv, n, hd)
  v.positions = torch::arange(n, torch::kLong).view({1, 1, n}).expand({B, Hkv, n}).contiguous();  // (B, H_kv, n)
  v.next_positions.assign(B, n);
  return v;
}

std::vector<int64_t> kept(const at::Tensor& scores, int64_t k, int64_t head = 0) {
  SelectorOptions opt;
  opt.budget = Budget::tokens(k);
  return ragged_to_lists(select_layer(scores, 0, 1, opt))[head];
}

}  // namespace

TEST(Scorers, KNormIsMinusKeyNorm) {
  torch::manual_seed(1);
  LayerView v = make_view(1, 2, 7, 4);
  at::Tensor s = KNormScorer().score(v);  // (1, 2, 7)
  EXPECT_TRUE(torch::allclose(s, -v.keys.norm(2, -1)));
}

TEST(Scorers, StreamingLLMKeepsSinksAndTheMostRecent) {
  LayerView v = make_view(1, 1, 20, 4);
  at::Tensor s = StreamingLLMScorer(4).score(v);
  EXPECT_EQ(kept(s, 7), (std::vector<int64_t>{0, 1, 2, 3, 17, 18, 19}));
}

TEST(Scorers, KeyDiffRanksTheOddKeyFirst) {
  LayerView v = make_view(1, 1, 6, 3);
  v.keys = torch::tensor({1.f, 0.f, 0.f, 1.f, 0.1f, 0.f, 1.f, 0.f, 0.1f, 0.f, 0.f, -1.f, 1.f, 0.05f, 0.f, 0.9f, 0.f,
                          0.f})
               .view({1, 1, 6, 3});
  at::Tensor s = KeyDiffScorer().score(v);  // (1, 1, 6)
  EXPECT_EQ(kept(s, 1), (std::vector<int64_t>{3}));
}

TEST(Scorers, RandomIsSeeded) {
  LayerView v = make_view(1, 2, 9, 4);
  EXPECT_TRUE(torch::equal(RandomScorer(7).score(v), RandomScorer(7).score(v)));
  EXPECT_FALSE(torch::equal(RandomScorer(7).score(v), RandomScorer(8).score(v)));
}

TEST(Scorers, H2OSumsAndObservedAttentionNormalizes) {
  torch::manual_seed(2);
  const int64_t n = 6, hd = 4, H = 2;
  LayerView v = make_view(1, 1, n, hd);
  v.window_queries = torch::randn({1, H, n, hd});                     // (B, H, n, hd): every row
  v.window_positions = torch::arange(n, torch::kLong).view({1, n});  // (B, n)
  // Reference: explicit causal softmax, column sums, mean over the 2 query heads of the group.
  at::Tensor logits = torch::matmul(v.window_queries, v.keys.expand({1, H, n, hd}).transpose(2, 3)) / 2.0;  // (1, H, n, n)
  at::Tensor causal = torch::ones({n, n}, torch::kBool).tril();
  at::Tensor a = torch::softmax(logits.masked_fill(causal.logical_not(), -INFINITY), -1);  // (1, H, n, n)
  at::Tensor col = a.sum(2);                                                               // (1, H, n)
  EXPECT_TRUE(torch::allclose(H2OScorer(H2ONorm::Sum).score(v), col.mean(1, true), 1e-5, 1e-6));
  at::Tensor seen = torch::arange(n, 0, -1, torch::kFloat);  // n - j
  EXPECT_TRUE(torch::allclose(H2OScorer(H2ONorm::PerObservingQuery).score(v), (col / seen).mean(1, true), 1e-5, 1e-6));
}

TEST(Scorers, MethodNamesAndBadInput) {
  EXPECT_NO_THROW(make_method("adakv_snapkv", 0.5));
  EXPECT_NO_THROW(make_method("criticalkv_snapkv", 0.5));
  EXPECT_NO_THROW(make_method("global_knorm", 0.5));
  EXPECT_THROW(make_method("snapkvv", 0.5), Error);
  EXPECT_THROW(make_method("snapkv", 1.0), Error);
  EXPECT_THROW(make_method("adakv_pyramidkv", 0.5), Error);
}

TEST(Scorers, DefensiveKVMethodWiring) {
  // AdaKV budgets for defensivekv, global ones for layer_defensivekv (scores: tests/python/test_compress_methods.py).
  EXPECT_EQ(make_method("defensivekv", 0.5).selector.allocation, Allocation::AdaKV);
  EXPECT_EQ(make_method("layer_defensivekv", 0.5).selector.allocation, Allocation::Global);
  EXPECT_THROW(make_method("adakv_defensivekv", 0.5), Error);
}

TEST(Scorers, MethodBudgetsAndFlagErrors) {
  EXPECT_EQ(make_method("snapkv", Budget::tokens(64)).selector.budget.kind, BudgetKind::TokensPerHead);
  EXPECT_EQ(make_method("snapkv", Budget::threshold(0.1)).selector.budget.kind, BudgetKind::Threshold);
  auto message = [](auto&& f) {
    try {
      f();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_NE(message([] { make_method("snapkvv", 0.5); }).find("known: random"), std::string::npos);
  EXPECT_NE(message([] { make_method("snapkv", 1.0); }).find("--ratio"), std::string::npos);
  EXPECT_NE(message([] { make_method("snapkv", Budget{BudgetKind::TokensPerHead, 0.0}); }).find("--budget-tokens"),
            std::string::npos);
  EXPECT_NE(message([] { make_method("snapkv", Budget{BudgetKind::Ratio, -0.5}); }).find("--ratio"), std::string::npos);
  EXPECT_THROW(make_method("pyramidkv", Budget::tokens(10)), Error);  // pyramid budgets need a ratio
  EXPECT_EQ(make_method("cake", 0.5).selector.allocation, Allocation::Cake);
  EXPECT_THROW(make_method("adakv_cake", 0.5), Error);
  EXPECT_THROW(make_method("cake", Budget::threshold(0.5)), Error);
}

// CAKE on a hand-made window->prefix attention a (1, H = 2, w = 3, m = 4), against naive loops.
TEST(Scorers, CakeIndicatorAndPreferenceByHand) {
  const float A[2][3][4] = {{{0.5f, 0.2f, 0.2f, 0.1f}, {0.1f, 0.6f, 0.1f, 0.1f}, {0.3f, 0.3f, 0.2f, 0.1f}},
                            {{0.25f, 0.25f, 0.25f, 0.2f}, {0.7f, 0.1f, 0.05f, 0.05f}, {0.0f, 0.4f, 0.4f, 0.1f}}};
  at::Tensor a = torch::from_blob(const_cast<float*>(&A[0][0][0]), {1, 2, 3, 4}, torch::kFloat).clone();
  const double gamma = 200, tau1 = 1.6, tau2 = 0.4;
  at::Tensor ind = cake_indicator(a, gamma);  // (1, 2, 4)
  double ent = 0, var_sum = 0;
  for (int h = 0; h < 2; ++h)
    for (int j = 0; j < 4; ++j) {
      double mean = 0;
      for (int i = 0; i < 3; ++i) mean += A[h][i][j] / 3.0;
      double var = 0;
      for (int i = 0; i < 3; ++i) var += (A[h][i][j] - mean) * (A[h][i][j] - mean) / 2.0;  // Bessel
      for (int i = 0; i < 3; ++i) ent -= A[h][i][j] * std::log(A[h][i][j] + 1e-10);
      var_sum += var;
      EXPECT_NEAR(ind[0][h][j].item<double>(), mean + gamma * var, 1e-4) << h << " " << j;
    }
  const std::vector<double> p = cake_preference(a, tau1, tau2);
  ASSERT_EQ(p.size(), 1u);
  EXPECT_NEAR(p[0], std::pow(ent, 1 / tau1) * std::pow(var_sum, 1 / tau2), 1e-4 * p[0]);
}
