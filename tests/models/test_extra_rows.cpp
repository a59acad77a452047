// Extra rows at inference (Model::forward_extra): soft / lookahead query rows run after a prefilled cache,
// the way a query-row method scores a prompt at eval time. Checked on the tiny random models of every family
// (tests/oracles/decoder_golden.py) against the training forward (Model::forward_train with the same extra rows
// and row-masked LoRA): the prompt's logits and KV stay bit-identical, the rows' attention to the prompt equals
// the training forward's statistics, their hidden states and their gradients agree; computing the attention one
// batch row at a time (ExtraRows::prob_bytes) changes nothing.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include <torch/torch.h>

#include "common/error.h"
#include "models/kv_cache.h"
#include "models/model.h"
#include "test_paths.h"

using namespace kvd;

namespace {

Model load(const std::string& family) {
  return Model::load(std::string(KVD_TESTDATA) + "/decoder_golden/" + family, torch::kCPU, torch::kFloat);
}

// LoRA on all seven projections of every layer, with leaves that require grad.
struct Lora {
  std::vector<LayerLora> layers;
  std::vector<at::Tensor> leaves;
  Lora(const ModelConfig& c, int64_t r, uint64_t seed) {
    torch::manual_seed(seed);
    const int64_t d = c.hidden_size, q = c.num_heads * c.head_dim, kv = c.num_kv_heads * c.head_dim,
                  f = c.intermediate_size;
    auto delta = [&](int64_t in, int64_t out) {
      LoraDelta x;
      x.a = (torch::randn({r, in}) * 0.2).requires_grad_();
      x.b = (torch::randn({out, r}) * 0.2).requires_grad_();
      x.scale = 2.0;
      leaves.push_back(x.a);
      leaves.push_back(x.b);
      return x;
    };
    for (int64_t l = 0; l < c.num_layers; ++l) {
      LayerLora ll;
      ll.q = delta(d, q);
      ll.k = delta(d, kv);
      ll.v = delta(d, kv);
      ll.o = delta(q, d);
      ll.gate = delta(d, f);
      ll.up = delta(d, f);
      ll.down = delta(f, d);
      layers.push_back(ll);
    }
  }
  std::function<LayerMods(const LayerInput&)> hook() const {
    return [this](const LayerInput& in) {
      LayerMods m;
      m.lora = layers[in.layer];
      return m;
    };
  }
};

class ExtraRows : public ::testing::TestWithParam<std::string> {};

TEST_P(ExtraRows, PromptUntouchedAndAttentionEqualsTrainingStatistics) {
  const Model model = load(GetParam());
  const ModelConfig& cfg = model.config();
  const int64_t B = 2, T = 13, n = 4;
  torch::manual_seed(5);
  const at::Tensor ids = torch::randint(cfg.vocab_size, {B, T}, torch::kLong);  // (B, T)
  const Lora lora(cfg, 3, 9);
  at::Tensor emb = (torch::randn({B, n, cfg.hidden_size}) * 0.5).requires_grad_();  // (B, n, d)

  // Prefill alone, and prefill followed by the extra rows: the prompt's logits and KV are bit-identical.
  KVCache plain = model.new_cache(B), cache = model.new_cache(B);
  at::Tensor lp, lc;
  {
    torch::NoGradGuard ng;
    lp = model.prefill(ids, plain, LogitsMode::AllPositions);
    lc = model.prefill(ids, cache, LogitsMode::AllPositions);
  }
  AttentionMods mods;
  mods.extra.embeddings = emb;
  mods.extra.positions = torch::arange(T, T + n, torch::kLong);
  mods.layer_hook = lora.hook();
  const ExtraRowsOutput ex = model.forward_extra(cache, mods);
  EXPECT_TRUE(torch::equal(lp, lc));
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    EXPECT_TRUE(torch::equal(plain.layer(l).k, cache.layer(l).k)) << "layer " << l;
    EXPECT_TRUE(torch::equal(plain.layer(l).v, cache.layer(l).v)) << "layer " << l;
    EXPECT_TRUE(torch::equal(plain.layer(l).pos, cache.layer(l).pos)) << "layer " << l;
  }
  EXPECT_EQ(cache.next_position(0), T);

  // The training forward over the prompt plus the same rows (LoRA on the extra rows only), with statistics of
  // the extra rows: the same attention to the prompt, the same hidden states.
  AttentionMods tm = mods;
  tm.stats.rows = torch::arange(T, T + n, torch::kLong);
  tm.stats.row_block = 3;
  const ForwardOutput tr = model.forward_train(ids, sequential_positions(B, T, model.device()), tm);
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    at::Tensor want = tr.attention_stats[l].narrow(2, 0, T);  // (B, H, T)
    const double err = (ex.attention_to_cache[l] - want).abs().max().item<double>();
    EXPECT_LE(err, 1e-5) << "layer " << l;
  }
  EXPECT_LE((ex.hidden - tr.hidden.narrow(1, T, n)).abs().max().item<double>(), 1e-5);

  // One batch row at a time (a probability budget below one row's): the same attention and hidden states.
  AttentionMods one = mods;
  one.extra.prob_bytes = 1;
  const ExtraRowsOutput ex1 = model.forward_extra(cache, one);
  EXPECT_TRUE(torch::equal(ex1.hidden, ex.hidden));
  for (int64_t l = 0; l < cfg.num_layers; ++l)
    EXPECT_TRUE(torch::equal(ex1.attention_to_cache[l], ex.attention_to_cache[l])) << "layer " << l;

  // Gradients through the extra rows (embeddings and LoRA) agree with the training forward's.
  const at::Tensor w = torch::randn({B, n, cfg.hidden_size});
  auto grads = [&](const at::Tensor& h) {
    std::vector<at::Tensor> in = lora.leaves;
    in.push_back(emb);
    return torch::autograd::grad({(h * w).sum()}, in);
  };
  const std::vector<at::Tensor> g1 = grads(ex.hidden), g2 = grads(tr.hidden.narrow(1, T, n));
  for (size_t i = 0; i < g1.size(); ++i) {
    const double scale = std::max(1.0, g2[i].abs().max().item<double>());
    EXPECT_LE((g1[i] - g2[i]).abs().max().item<double>(), 1e-4 * scale) << "input " << i;
  }
}

// ExtraAttention::Fused (SDPA under the visibility mask, no probabilities) gives the hidden states of the explicit
// path: on a whole cache (one mask per row) and after per-head eviction in odd layers (a mask per head there),
// in one block of rows and one row at a time.
TEST_P(ExtraRows, FusedAttentionMatchesProbabilities) {
  const Model model = load(GetParam());
  const ModelConfig& cfg = model.config();
  const int64_t B = 2, T = 15, n = 5;
  torch::manual_seed(6);
  const at::Tensor ids = torch::randint(cfg.vocab_size, {B, T}, torch::kLong);  // (B, T)
  torch::NoGradGuard ng;
  KVCache cache = model.new_cache(B);
  model.prefill(ids, cache);
  AttentionMods mods;
  mods.extra.embeddings = torch::randn({B, n, cfg.hidden_size}) * 0.5;  // (B, n, d)
  mods.extra.positions = torch::arange(T, T + n, torch::kLong);
  for (int evicted = 0; evicted < 2; ++evicted) {
    if (evicted == 1)
      for (int64_t l = 1; l < cfg.num_layers; l += 2) {
        // Each head keeps its own 9 of 15 entries, in order.
        const at::Tensor keep = std::get<0>(torch::rand({B, cfg.num_kv_heads, T}).argsort(/*dim=*/int64_t{-1}, /*descending=*/false).narrow(-1, 0, 9).sort(-1));
        cache.keep(l, keep);
        if (cfg.num_kv_heads > 1) EXPECT_FALSE(cache.heads_aligned(l));
      }
    const ExtraRowsOutput ref = model.forward_extra(cache, mods);
    for (int64_t block : {int64_t{1} << 30, int64_t{1}}) {
      AttentionMods f = mods;
      f.extra.attention = ExtraAttention::Fused;
      f.extra.prob_bytes = block;
      const ExtraRowsOutput got = model.forward_extra(cache, f);
      EXPECT_LE((got.hidden - ref.hidden).abs().max().item<double>(), 1e-5) << "evicted " << evicted << ", block " << block;
      for (const at::Tensor& a : got.attention_to_cache) EXPECT_FALSE(a.defined());
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Families, ExtraRows, ::testing::Values("llama3", "mistral", "qwen2", "qwen3"));

TEST(ExtraRowsErrors, BadInputGetsClearErrors) {
  const Model model = load("llama3");
  KVCache cache = model.new_cache(1);
  {
    torch::NoGradGuard ng;
    model.prefill(torch::randint(10, {1, 5}, torch::kLong), cache);
  }
  AttentionMods none;
  EXPECT_THROW(model.forward_extra(cache, none), Error);
  AttentionMods bad;
  bad.extra.embeddings = torch::randn({2, model.config().hidden_size + 1});
  bad.extra.positions = torch::arange(5, 7, torch::kLong);
  EXPECT_THROW(model.forward_extra(cache, bad), Error);
}

}  // namespace
