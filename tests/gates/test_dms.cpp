// DMS-style learned eviction (issue 14): the probe's shapes and names; the delayed-eviction pair bias (0 for keys
// a query sees within the window, log(1 − α + ε) beyond) against a loop, and the per-key log-mask with a delay that
// the component trains with (which the fused kernel runs) against that pair bias and against a loop; the gradient of the whole objective
// (distillation KL + the one-sided compression penalty, through the Gumbel-sigmoid and the biased attention)
// against finite differences in float64; the rising target; the delay window never evicts an entry younger than
// the window, in a chunked prefill at threshold 0.5 and at every decode step; bundles round-trip; bad options
// get one clear error.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "export/gate_bundle.h"
#include "gates/components.h"
#include "gates/compress.h"
#include "gates/decode_eviction.h"
#include "gates/dms.h"
#include "gates/gate_test_utils.h"
#include "gates/registry.h"
#include "kernels/retention_attention.h"
#include "models/kv_cache.h"
#include "models/model.h"

using namespace kvd;
using namespace kvd::test;

namespace {

std::shared_ptr<DMSImpl> make_dms(const ModelConfig& cfg, const nlohmann::json& options, uint64_t seed = 0) {
  torch::manual_seed(seed);
  auto c = std::dynamic_pointer_cast<DMSImpl>(make_component("dms", cfg, options));
  EXPECT_TRUE(c != nullptr);
  return c;
}

std::vector<int64_t> head_positions(const KVCache& c, int64_t l, int64_t h) {
  const int64_t n = c.length(l, 0, h);
  at::Tensor p = std::get<0>(c.layer(l).pos[0][h].narrow(0, 0, n).sort());
  return std::vector<int64_t>(p.data_ptr<int64_t>(), p.data_ptr<int64_t>() + n);
}

}  // namespace

TEST(DMS, ProbeShapesNamesAndOptions) {
  const ModelConfig& cfg = tiny_model("llama3", torch::kFloat).config();
  auto d = make_dms(cfg, {{"bias_init", -3.0}});
  std::map<std::string, std::vector<int64_t>> got, want;
  for (const auto& p : d->named_parameters()) got[p.key()] = p.value().sizes().vec();
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    want["layers." + std::to_string(l) + ".weight"] = {cfg.num_kv_heads, cfg.hidden_size};
    want["layers." + std::to_string(l) + ".bias"] = {cfg.num_kv_heads};
  }
  EXPECT_EQ(got, want);
  const at::Tensor z = d->logits(1, torch::zeros({2, 5, cfg.hidden_size}));
  EXPECT_EQ(z.sizes(), (std::vector<int64_t>{2, 5, cfg.num_kv_heads}));
  EXPECT_NEAR(z.mean().item<double>(), -3.0, 1e-6);  // x = 0: the bias alone
  auto r = make_dms(cfg, {{"target", 0.8}, {"ramp_steps", 100}});
  EXPECT_DOUBLE_EQ(r->target_at(0), 0.0);
  EXPECT_DOUBLE_EQ(r->target_at(50), 0.4);
  EXPECT_DOUBLE_EQ(r->target_at(100), 0.8);
  EXPECT_DOUBLE_EQ(r->target_at(1000), 0.8);
  EXPECT_NE(error_of([&] { make_dms(cfg, {{"target", 1.0}}); }).find("component.target"), std::string::npos);
  EXPECT_NE(error_of([&] { make_dms(cfg, {{"window", -1}}); }).find("component.window"), std::string::npos);
  EXPECT_NE(error_of([&] { make_dms(cfg, {{"temperature", 0.0}}); }).find("component.temperature"), std::string::npos);
  // The held-out check's budget must exceed the delay window, or it would keep exactly the window.
  EXPECT_NE(error_of([&] { make_dms(cfg, {{"budget", 128}, {"window", 128}}); }).find("component.budget"), std::string::npos);
}

// The delayed bias against a loop: 0 where pos_q − pos_k <= window, log(1 − α_k + ε) beyond.
TEST(DMS, PairBiasIsDelayedByTheWindow) {
  torch::manual_seed(1);
  const int64_t B = 2, Hkv = 3, S = 11, w = 3;
  const at::Tensor alpha = torch::rand({B, Hkv, S}, torch::kDouble);
  PairBiasQuery q;
  q.k_pos = torch::arange(S, torch::kLong).repeat({B, 1});
  q.k_pos[1].narrow(0, 6, 5).copy_(torch::arange(5, torch::kLong));  // row 1: a second document at 6
  q.q_rows = torch::tensor({1, 4, 5, 9, 10}, torch::kLong).repeat({B, 1});
  q.q_pos = q.k_pos.gather(1, q.q_rows);
  const at::Tensor bias = dms_pair_bias(alpha, q, w, 1e-6);  // (B, H_kv, 5, S)
  ASSERT_EQ(bias.sizes(), (std::vector<int64_t>{B, Hkv, 5, S}));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hkv; ++h)
      for (int64_t i = 0; i < 5; ++i)
        for (int64_t j = 0; j < S; ++j) {
          const int64_t d = q.q_pos[b][i].item<int64_t>() - q.k_pos[b][j].item<int64_t>();
          const double want = d > w ? std::log(1.0 - alpha[b][h][j].item<double>() + 1e-6) : 0.0;
          EXPECT_DOUBLE_EQ(bias[b][h][i][j].item<double>(), want) << b << " " << h << " " << i << " " << j;
        }
}

// The component's attention mods (a per-key log-mask delayed by the window, which the fused kernel runs) give the
// student exactly what the pair bias of the previous test gives, at windows 0, 2 and 5, over packed documents.
TEST(DMS, DelayedLogMaskEqualsThePairBias) {
  const Model& model = tiny_model("llama3", torch::kDouble);
  const TrainBatch tb = packed_batch(model.config().vocab_size, 14, 3);
  for (int64_t w : {0, 2, 5}) {
    auto d = make_dms(model.config(), {{"window", w}, {"bias_init", 0.0}, {"init_std", 0.5}}, 3);
    d->to(torch::kDouble);
    torch::NoGradGuard ng;
    const AttentionMods mods = d->attention_mods(tb, DMSNoise::None);
    AttentionMods pair;
    pair.layer_hook = [&](const LayerInput& in) {
      const at::Tensor a = torch::sigmoid(d->logits(in.layer, in.hidden)).transpose(1, 2);  // (B, H_kv, T)
      LayerMods m;
      m.pair_bias = [a, w](const PairBiasQuery& q) { return dms_pair_bias(a, q, w, 1e-6); };
      return m;
    };
    // The rows that hold documents (the padding rows all sit at position 0, where window 0's `j != i` and the pair
    // bias's `p - k > 0` differ; nothing reads them).
    const at::Tensor docs = tb.doc_ids.ge(0);  // (B, T)
    const at::Tensor h = model.forward_train(tb.ids, tb.positions, mods, tb.doc_ids).hidden.index({docs});
    const at::Tensor want = model.forward_train(tb.ids, tb.positions, pair, tb.doc_ids).hidden.index({docs});
    const at::Tensor plain = model.forward_train(tb.ids, tb.positions, AttentionMods(), tb.doc_ids).hidden.index({docs});
    EXPECT_LT(max_abs_diff(h, want), 1e-12) << "window " << w;
    EXPECT_GT(max_abs_diff(h, plain), 1e-3) << "window " << w << ": the bias changes the student";
  }
}

// The fused kernel's reference (retention_attention_reference, which the emulated kernel is checked against) with
// mask_delay, against a loop: the log-mask applies where pos_i - pos_j > delay, within a document, causally.
TEST(DMS, RetentionAttentionReferenceDelaysTheLogMask) {
  torch::manual_seed(4);
  const int64_t S = 12, D = 4, H = 2, w = 2;
  const at::Tensor q = torch::randn({1, H, S, D}, torch::kDouble), k = torch::randn({1, 1, S, D}, torch::kDouble),
                   v = torch::randn({1, 1, S, D}, torch::kDouble);
  const at::Tensor lm = torch::log(torch::rand({1, 1, S}, torch::kDouble));
  const at::Tensor doc = torch::tensor({0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1}, torch::kLong).view({1, S});
  const at::Tensor pos = torch::tensor({0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4}, torch::kLong).view({1, S});
  const at::Tensor out = retention_attention_reference(q, k, v, pos, doc, {}, lm, std::nullopt, 0.5, torch::kDouble, w);
  double worst = 0;
  for (int64_t h = 0; h < H; ++h)
    for (int64_t i = 0; i < S; ++i) {
      std::vector<double> logit(S, -std::numeric_limits<double>::infinity());
      for (int64_t j = 0; j <= i; ++j) {
        if (doc[0][j].item<int64_t>() != doc[0][i].item<int64_t>()) continue;
        const int64_t age = pos[0][i].item<int64_t>() - pos[0][j].item<int64_t>();
        logit[j] = 0.5 * (q[0][h][i] * k[0][0][j]).sum().item<double>() + (age > w ? lm[0][0][j].item<double>() : 0.0);
      }
      double mx = -std::numeric_limits<double>::infinity(), z = 0;
      for (double x : logit) mx = std::max(mx, x);
      for (double x : logit) z += std::exp(x - mx);
      for (int64_t c = 0; c < D; ++c) {
        double o = 0;
        for (int64_t j = 0; j < S; ++j) o += std::exp(logit[j] - mx) / z * v[0][0][j][c].item<double>();
        worst = std::max(worst, std::abs(o - out[0][h][i][c].item<double>()));
      }
    }
  EXPECT_LT(worst, 1e-12);
}

// d/dθ of the student's output under the delayed-eviction bias plus the compression penalty, in float64: autograd
// against central differences, the Gumbel noise drawn from the same seed in every evaluation. (The component's
// loss() reports its KL / CE in float32, the trainer's precision; the KL itself is shared with the other parts
// and checked in tests/train.)
TEST(DMS, GradientMatchesFiniteDifferences) {
  const Model& model = tiny_model("llama3", torch::kDouble);
  auto d = make_dms(model.config(), {{"target", 0.9}, {"ramp_steps", 0}, {"window", 2}, {"bias_init", 0.0},
                                     {"init_std", 0.3}}, 2);
  d->to(torch::kDouble);
  const TrainBatch tb = packed_batch(model.config().vocab_size, 14, 3);
  torch::manual_seed(5);
  const at::Tensor R = torch::randn({2, 14, model.config().hidden_size}, torch::kDouble);
  auto total = [&] {
    torch::manual_seed(11);  // the same noise
    const AttentionMods mods = d->attention_mods(tb, DMSNoise::Gumbel);
    const at::Tensor h = model.forward_train(tb.ids, tb.positions, mods, tb.doc_ids).hidden;  // (B, T, d)
    return (h * R).sum() + torch::relu(0.9 - d->evicted_fraction());
  };
  for (auto& p : d->parameters()) p.mutable_grad() = at::Tensor();
  total().backward();
  {
    torch::NoGradGuard ng;
    torch::manual_seed(11);
    const AttentionMods biased = d->attention_mods(tb, DMSNoise::Gumbel);
    const at::Tensor hb = model.forward_train(tb.ids, tb.positions, biased, tb.doc_ids).hidden;
    const at::Tensor h0 = model.forward_train(tb.ids, tb.positions, AttentionMods(), tb.doc_ids).hidden;
    EXPECT_GT(max_abs_diff(hb, h0), 1e-3) << "the bias changes the student";
    EXPECT_LT(d->evicted_fraction().item<double>(), 0.9) << "the compression penalty is active";
  }
  int checked = 0;
  for (const auto& item : d->named_parameters()) {
    at::Tensor p = item.value();
    const at::Tensor g = p.grad().clone();
    torch::NoGradGuard ng;
    at::Tensor flat = p.view({-1});
    for (int64_t i = 0; i < std::min<int64_t>(flat.numel(), 4); ++i) {
      const double keep = flat[i].item<double>(), eps = 1e-6;
      flat[i].fill_(keep + eps);
      const double up = total().item<double>();
      flat[i].fill_(keep - eps);
      const double down = total().item<double>();
      flat[i].fill_(keep);
      const double fd = (up - down) / (2 * eps);
      EXPECT_NEAR(g.view({-1})[i].item<double>(), fd, 1e-7 + 1e-5 * std::abs(fd)) << item.key() << "[" << i << "]";
      EXPECT_GT(std::abs(fd), 1e-6) << item.key() << "[" << i << "]: a gradient that is there";
      ++checked;
    }
  }
  EXPECT_GE(checked, 8);
}

// Activation checkpointing of the student's layers (train.activation_checkpointing: layers) gives the probe the
// gradients of the plain forward: the delayed log-mask is a tensor input of each checkpointed layer.
TEST(DMS, CheckpointedLayersGiveThePlainGradients) {
  const Model& model = tiny_model("llama3", torch::kDouble);
  auto d = make_dms(model.config(), {{"window", 2}, {"bias_init", 0.0}, {"init_std", 0.3}}, 6);
  d->to(torch::kDouble);
  const TrainBatch tb = packed_batch(model.config().vocab_size, 14, 3);
  torch::manual_seed(7);
  const at::Tensor R = torch::randn({2, 14, model.config().hidden_size}, torch::kDouble);
  auto grads = [&](ActivationCheckpointing c) {
    for (auto& p : d->parameters()) p.mutable_grad() = at::Tensor();
    torch::manual_seed(11);  // the same Gumbel noise
    const AttentionMods mods = d->attention_mods(tb, DMSNoise::Gumbel);
    (model.forward_train(tb.ids, tb.positions, mods, tb.doc_ids, c).hidden * R).sum().backward();
    std::vector<at::Tensor> g;
    for (auto& p : d->parameters()) g.push_back(p.grad().clone());
    return g;
  };
  const std::vector<at::Tensor> plain = grads(ActivationCheckpointing::None), ckpt = grads(ActivationCheckpointing::Layers);
  ASSERT_EQ(plain.size(), ckpt.size());
  for (size_t i = 0; i < plain.size(); ++i) {
    EXPECT_GT(plain[i].abs().max().item<double>(), 1e-8) << i;
    EXPECT_LT(max_abs_diff(plain[i], ckpt[i]), 1e-12) << i;
  }
}

// The component's loss: terms kl, ce, compression (= max(0, ρ − mean α̃)) and its metrics.
TEST(DMS, LossTermsAndMetrics) {
  const Model& model = tiny_model("llama3", torch::kFloat);
  auto d = make_dms(model.config(), {{"target", 0.6}, {"ramp_steps", 10}, {"window", 2}, {"bias_init", -1.0}}, 3);
  const TrainBatch tb = packed_batch(model.config().vocab_size, 14, 4);
  LossOptions lo;
  lo.step = 5;
  torch::manual_seed(9);
  const ComponentLoss l = d->loss(model, tb, lo);
  ASSERT_EQ(l.terms.size(), 3u);
  EXPECT_EQ(l.terms[0].first, "kl");
  EXPECT_EQ(l.terms[1].first, "ce");
  EXPECT_EQ(l.terms[2].first, "compression");
  std::map<std::string, double> m(l.metrics.begin(), l.metrics.end());
  EXPECT_DOUBLE_EQ(m.at("evict_target"), 0.3);
  EXPECT_NEAR(l.terms[2].second.item<double>(), std::max(0.0, 0.3 - m.at("evicted")), 1e-6);
  EXPECT_GT(m.at("evicted"), 0.05);  // sigmoid(-1) ≈ 0.27 with noise
  EXPECT_GE(m.at("evicted_hard"), 0.0);
  EXPECT_GT(l.terms[0].second.item<double>(), 0.0);
  EXPECT_EQ(l.tokens, (4 - 1) + (10 - 1) + (9 - 1));  // label-valid: row 0 documents of 4 and 10, row 1 of 9
}

// A probe that wants everything evicted (α ≈ 1): a chunked prefill at threshold 0.5 keeps exactly the window,
// and decoding under a token budget never evicts an entry the next `window` queries may still see.
TEST(DMS, DelayWindowNeverEvictsYoungEntries) {
  const Model& model = tiny_model("llama3", torch::kFloat);
  const ModelConfig& cfg = model.config();
  const int64_t w = 6;
  auto d = make_dms(cfg, {{"window", w}, {"bias_init", 20.0}, {"init_std", 0.0}});
  MethodContext ctx;
  ctx.model = &model;
  ctx.learned_mode = LearnedMode::Continuous;
  ctx.continuous_chunk = 5;
  ctx.load_bundle = [&](const std::string&) { return std::static_pointer_cast<Component>(d); };
  torch::manual_seed(4);
  at::Tensor ids = torch::randint(cfg.vocab_size, {1, 23}, torch::kLong);
  {
    ResolvedMethod rm = resolve_method("dms:unused", Budget::threshold(0.5), ctx);
    ASSERT_EQ(rm.compress.chunk_size, 5);
    KVCache cache = model.new_cache(1);
    compress_prefill(model, cache, {std::vector<int64_t>(ids.data_ptr<int64_t>(), ids.data_ptr<int64_t>() + 23)},
                     rm.method, rm.compress);
    std::vector<int64_t> want;
    for (int64_t j = 23 - w; j < 23; ++j) want.push_back(j);
    for (int64_t l = 0; l < cfg.num_layers; ++l)
      for (int64_t h = 0; h < cfg.num_kv_heads; ++h) EXPECT_EQ(head_positions(cache, l, h), want) << l << " " << h;
  }
  // Decoding: prefill compressed to 10 entries per head, then every step evicts down to 10 (the scorer's own
  // decode schedule in the continuous mode).
  ResolvedMethod rm = resolve_method("dms:unused", Budget::tokens(10), ctx);
  ASSERT_TRUE(rm.decode.has_value());
  KVCache cache = model.new_cache(1);
  compress_prefill(model, cache, {std::vector<int64_t>(ids.data_ptr<int64_t>(), ids.data_ptr<int64_t>() + 23)},
                   rm.method, rm.compress);
  DecodeEvictionOptions eo;
  eo.scorer = rm.method.scorer;
  DecodeEvictor ev(model, DecodePolicy::Scorer, DecodeTrigger{1, 10}, eo);
  for (int64_t step = 0; step < 9; ++step) {
    model.decode(torch::randint(cfg.vocab_size, {1, 1}, torch::kLong), cache, ev.observer());
    const int64_t next = cache.next_position(0);
    for (int64_t l = 0; l < cfg.num_layers; ++l)
      for (int64_t h = 0; h < cfg.num_kv_heads; ++h) {
        const std::vector<int64_t> pos = head_positions(cache, l, h);
        EXPECT_EQ(static_cast<int64_t>(pos.size()), 10);
        for (int64_t j = next - w; j < next; ++j)
          EXPECT_TRUE(std::find(pos.begin(), pos.end(), j) != pos.end())
              << "step " << step << " layer " << l << " head " << h << ": position " << j << " (younger than the window) evicted";
      }
  }
}

TEST(DMS, BundleRoundTrip) {
  const Model& model = tiny_model("llama3", torch::kFloat);
  auto d = make_dms(model.config(), {{"window", 7}, {"init_std", 0.5}}, 6);
  TempDir dir;
  const BaseModelInfo base{"tiny", "abcd"};
  save_gate_bundle(dir.path + "/b", *d, base);
  auto back = std::dynamic_pointer_cast<DMSImpl>(load_component(dir.path + "/b", model, base));
  ASSERT_TRUE(back != nullptr);
  EXPECT_EQ(back->options().window, 7);
  const at::Tensor x = torch::randn({1, 4, model.config().hidden_size});
  for (int64_t l = 0; l < model.config().num_layers; ++l) EXPECT_TRUE(back->logits(l, x).equal(d->logits(l, x)));
  EXPECT_NE(error_of([&] { load_component(dir.path + "/b", model, BaseModelInfo{"other", "ffff"}); }).find("other"),
            std::string::npos);
}
