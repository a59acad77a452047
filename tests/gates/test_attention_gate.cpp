// Attention-Gate (issue 13): the gate's attention block against a naive float64 reference (values and
// gradients); the straight-through flags against their hand-derived gradient; the flags' log-mask in the
// decoder against a naive pair-bias reference that removes flagged-out keys for later queries; the objective's
// terms; training reaching its target kept fraction; the scorer's flags at inference (chunked, batched with
// padding) equal the training flags; a threshold gives a ragged cache whose bytes are the kept entries; bad
// options and bundles of another kind or model get one clear error.
#include <gtest/gtest.h>
#include <cmath>
#include <fstream>
#include <functional>
#include <map>
#include <numeric>
#include <memory>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "common/error.h"
#include "common/fs.h"
#include "export/gate_bundle.h"
#include "gates/attention_gate.h"
#include "gates/components.h"
#include "gates/compress.h"
#include "gates/registry.h"
#include "gates/gate_test_utils.h"
#include "gates/retention_gate.h"
#include "models/kv_cache.h"
#include "models/model.h"

using namespace kvd;
using namespace kvd::test;

namespace {

std::shared_ptr<AttentionGateImpl> make_gate(const Model& model, uint64_t seed, nlohmann::json opts = nlohmann::json::object()) {
  torch::manual_seed(seed);
  auto g = std::dynamic_pointer_cast<AttentionGateImpl>(make_component("attention_gate", model.config(), opts));
  EXPECT_TRUE(g != nullptr);
  g->to(model.device(), model.dtype() == torch::kDouble ? torch::kDouble : torch::kFloat);
  return g;
}

// Makes the gate's flags mixed (some kept, some evicted) by spreading its output.
void spread_gate(AttentionGateImpl& g, double weight_std, double bias) {
  torch::NoGradGuard ng;
  for (int64_t l = 0; l < g.num_layers(); ++l) {
    auto L = g.layer(l);
    for (auto* lin : {&L->wq, &L->wk, &L->wv}) (*lin)->weight.normal_(0.0, 0.3);
    L->wo->weight.normal_(0.0, weight_std);
    L->wo->bias.fill_(bias);
  }
}

// Layer 0's attention input (B, T, d) in the batch's forward: the embeddings after the input norm, which no
// eviction changes, so layer 0's flags can be recomputed from the gate alone.
at::Tensor layer0_input(const Model& model, const TrainBatch& tb) {
  at::Tensor hidden0;
  AttentionMods grab;
  grab.layer_hook = [&](const LayerInput& in) {
    if (in.layer == 0) hidden0 = in.hidden.detach();
    return LayerMods();
  };
  torch::NoGradGuard ng;
  model.forward_train(tb.ids, tb.positions, grab, tb.doc_ids);
  return hidden0;
}

// The gate block written out naively in float64: per row, per head, an explicit softmax over the visible keys.
at::Tensor naive_gate_logits(AttentionGateLayerImpl& L, const at::Tensor& x, const at::Tensor& doc) {
  const int64_t B = x.size(0), S = x.size(1), g = L.heads, dg = L.head_dim;
  at::Tensor xd = x.to(torch::kDouble);
  at::Tensor q = torch::matmul(xd, L.wq->weight.to(torch::kDouble).t()), k = torch::matmul(xd, L.wk->weight.to(torch::kDouble).t()),
             v = torch::matmul(xd, L.wv->weight.to(torch::kDouble).t());  // (B, S, g·dg)
  std::vector<at::Tensor> rows;
  for (int64_t b = 0; b < B; ++b) {
    std::vector<at::Tensor> per_t;
    for (int64_t i = 0; i < S; ++i) {
      std::vector<at::Tensor> heads;
      for (int64_t h = 0; h < g; ++h) {
        std::vector<int64_t> vis;
        for (int64_t j = 0; j <= i; ++j) {
          const int64_t di = doc[b][i].item<int64_t>(), dj = doc[b][j].item<int64_t>();
          if (j == i || (di >= 0 && di == dj)) vis.push_back(j);
        }
        at::Tensor qi = q[b][i].narrow(0, h * dg, dg);
        at::Tensor kv = k[b].index_select(0, torch::tensor(vis)).narrow(1, h * dg, dg);  // (n, dg)
        at::Tensor vv = v[b].index_select(0, torch::tensor(vis)).narrow(1, h * dg, dg);
        at::Tensor p = torch::softmax(torch::matmul(kv, qi) / std::sqrt(static_cast<double>(dg)), 0);  // (n)
        heads.push_back(torch::matmul(p, vv));  // (dg)
      }
      per_t.push_back(torch::cat(heads));  // (g·dg)
    }
    rows.push_back(torch::stack(per_t));  // (S, g·dg)
  }
  at::Tensor o = torch::stack(rows);  // (B, S, g·dg)
  return torch::matmul(o, L.wo->weight.to(torch::kDouble).t()) + L.wo->bias.to(torch::kDouble);  // (B, S, H_kv)
}

TEST(AttentionGate, BlockMatchesNaiveReferenceValueAndGradient) {
  const Model& model = tiny_model("llama3", torch::kFloat);
  auto gate = make_gate(model, 1);
  spread_gate(*gate, 1.0, 0.0);
  const TrainBatch tb = packed_batch(model.config().vocab_size, 20, 2);
  torch::manual_seed(3);
  at::Tensor x = torch::randn({2, 20, model.config().hidden_size});
  const at::Tensor allowed = causal_document_mask(tb.doc_ids, 2, 20, torch::kCPU);
  at::Tensor got = gate->logits(1, x, allowed);  // (2, 20, H_kv) float32, SDPA
  auto L = gate->layer(1);
  at::Tensor ref = naive_gate_logits(*L, x, tb.doc_ids);
  const double diff = max_abs_diff(got, ref), scale = ref.abs().max().item<double>();
  std::cout << "gate block vs naive float64: max-abs-diff " << diff << " (max |z| " << scale << ")\n";
  EXPECT_LE(diff, 1e-5 * std::max(1.0, scale));
  EXPECT_GT(ref.std().item<double>(), 0.1);  // not a constant output
  // Gradients of a weighted sum, float32 SDPA vs the float64 naive loops.
  torch::manual_seed(4);
  at::Tensor w = torch::randn(got.sizes());
  gate->zero_grad();
  (got * w).sum().backward();
  std::map<std::string, at::Tensor> g32;
  for (auto& p : L->named_parameters()) g32[p.key()] = p.value().grad().clone();
  gate->zero_grad();
  (naive_gate_logits(*L, x, tb.doc_ids) * w.to(torch::kDouble)).sum().backward();
  for (auto& p : L->named_parameters()) {
    const double d = max_abs_diff(g32[p.key()], p.value().grad());
    const double scale = p.value().grad().abs().max().item<double>();
    EXPECT_LE(d, 1e-4 * std::max(1.0, scale)) << p.key();
    EXPECT_GT(scale, 0.0) << p.key();
  }
}

TEST(AttentionGate, StraightThroughFlagsValueAndGradient) {
  torch::manual_seed(5);
  at::Tensor s = torch::rand({2, 12, 3}, torch::kDouble).requires_grad_(true);  // (B, S, H_kv)
  at::Tensor pos = torch::arange(12, torch::kLong).repeat({2, 1});
  const double tau = 0.4, eps = 1e-6;
  at::Tensor f = straight_through_flags(s, pos, tau, 2);
  at::Tensor hard = s.detach().ge(tau).to(torch::kDouble);
  hard.narrow(1, 0, 2).fill_(1.0);  // sinks
  EXPECT_TRUE(torch::equal(f.detach(), hard));
  at::Tensor w = torch::randn(s.sizes(), torch::kDouble);
  (torch::log(f + eps) * w).sum().backward();
  // Hand-derived: d/ds log(f_hard + s − sg(s) + ε) = 1 / (f_hard + ε); sinks: 0.
  at::Tensor expect = w / (hard + eps);
  expect.narrow(1, 0, 2).zero_();
  EXPECT_LE(max_abs_diff(s.grad(), expect) / expect.abs().max().item<double>(), 1e-12);
}

TEST(AttentionGate, LogMaskEqualsRemovingFlaggedKeysForLaterQueries) {
  for (const std::string fam : {"llama3", "qwen3"}) {
    const Model& model = tiny_model(fam, torch::kDouble);
    const int64_t Hkv = model.config().num_kv_heads, T = 22;
    const TrainBatch tb = packed_batch(model.config().vocab_size, T, 6);
    torch::manual_seed(7);
    std::vector<at::Tensor> flags;  // [layer] (B, T, H_kv) 0/1, sinks kept
    for (int64_t l = 0; l < model.config().num_layers; ++l) {
      at::Tensor f = torch::rand({2, T, Hkv}, torch::kDouble).ge(0.5).to(torch::kDouble);
      flags.push_back(torch::where(tb.positions.lt(2).unsqueeze(-1), torch::ones_like(f), f));
    }
    const double eps = 1e-9;
    AttentionMods gated;
    gated.layer_hook = [&](const LayerInput& in) {
      LayerMods m;
      m.key_log_mask = torch::log(flags[in.layer] + eps).transpose(1, 2);  // (B, H_kv, T)
      return m;
    };
    // The naive reference: a pair bias that hides key j from every later query when its flag is 0.
    AttentionMods removed;
    int64_t layer = 0;
    removed.layer_hook = [&](const LayerInput& in) {
      layer = in.layer;
      LayerMods m;
      m.pair_bias = [&, l = in.layer](const PairBiasQuery& q) {
        const int64_t B = q.q_rows.size(0), Sq = q.q_rows.size(1), S = q.k_pos.size(1);
        at::Tensor bias = torch::zeros({B, Hkv, Sq, S}, torch::kDouble);
        for (int64_t b = 0; b < B; ++b)
          for (int64_t h = 0; h < Hkv; ++h)
            for (int64_t i = 0; i < Sq; ++i)
              for (int64_t j = 0; j < S; ++j)
                if (j != q.q_rows[b][i].item<int64_t>() && flags[l][b][j][h].item<double>() == 0.0) bias[b][h][i][j] = -1e9;
        return bias;
      };
      return m;
    };
    at::Tensor a = model.forward_train(tb.ids, tb.positions, gated, tb.doc_ids).hidden;
    at::Tensor r = model.forward_train(tb.ids, tb.positions, removed, tb.doc_ids).hidden;
    at::Tensor full = model.forward_train(tb.ids, tb.positions, {}, tb.doc_ids).hidden;
    at::Tensor valid = tb.doc_ids.ge(0).unsqueeze(-1);
    const double diff = max_abs_diff(a * valid, r * valid);
    std::cout << fam << ": log(f + eps) mask vs removed keys (naive pair bias), max-abs-diff " << diff << "\n";
    EXPECT_LE(diff, 1e-6) << fam;
    EXPECT_GT(max_abs_diff(a * valid, full * valid), 1e-2) << fam;  // the flags change the output
  }
}

TEST(AttentionGate, ObjectiveTermsAndKeptFraction) {
  const Model& model = tiny_model("llama3", torch::kFloat);
  auto gate = make_gate(model, 8, {{"target", 0.3}, {"sinks", 2}, {"keep_scope", "batch"}});
  spread_gate(*gate, 1.0, 0.5);
  const TrainBatch tb = packed_batch(model.config().vocab_size, 24, 9);
  ComponentLoss l = gate->loss(model, tb, LossOptions{});
  std::map<std::string, double> v;
  for (auto& [k, t] : l.terms) v[k] = t.item<double>();
  ASSERT_EQ(l.terms.size(), 3u);
  EXPECT_GT(v["kl"], 0.0);
  // The kept fraction, recomputed from the flags of the same forward's first layer (layer 0 sees the
  // unmodified embeddings, so its flags are recomputable from the gate alone).
  const at::Tensor allowed = causal_document_mask(tb.doc_ids, 2, 24, torch::kCPU);
  ASSERT_EQ(l.metrics.size(), 4u);
  EXPECT_EQ(l.metrics[0].first, "kept");
  EXPECT_EQ(l.metrics[1].first, "keep_target");
  EXPECT_EQ(l.metrics[2].first, "kept_row_std");
  EXPECT_EQ(l.metrics[3].first, "keep_multiplier");
  EXPECT_EQ(l.stats.size(), static_cast<size_t>(model.config().num_layers));
  const std::vector<at::Tensor> keep = gate->keep_fractions();
  const at::Tensor hidden0 = layer0_input(model, tb);
  torch::NoGradGuard ng;
  at::Tensor s0 = torch::sigmoid(gate->logits(0, hidden0, allowed));              // (2, 24, H_kv)
  at::Tensor f0 = s0.ge(0.5) | tb.positions.lt(2).unsqueeze(-1);                 // kept
  at::Tensor valid = tb.doc_ids.ge(0).unsqueeze(-1).expand_as(f0);
  const double kept0 = (f0 & valid).sum().item<double>() / valid.sum().item<double>();
  EXPECT_NEAR(keep[0].item<double>(), kept0, 1e-6);
  EXPECT_GT(kept0, 0.05);
  EXPECT_LT(kept0, 0.95);
  double hinge = 0;  // the multipliers start at 0: the dual penalty is the hinge alone
  for (const at::Tensor& k : keep) hinge += std::max(0.0, k.item<double>() - 0.3);
  EXPECT_NEAR(v["keep"], hinge / static_cast<double>(keep.size()), 1e-6);
  // One ascent step on these kept fractions: μ_ℓ = max(0, 0.1 · (keep_ℓ − 0.3)), and then the penalty adds
  // μ_ℓ · (keep_ℓ − β).
  gate->end_step(0, l.stats);
  for (size_t i = 0; i < keep.size(); ++i)
    EXPECT_NEAR(gate->multipliers()[static_cast<int64_t>(i)].item<double>(),
                std::max(0.0, 0.1 * (l.stats[i] - 0.3)), 1e-6);
  double mean = 0;
  for (const at::Tensor& k : keep) mean += k.item<double>() / static_cast<double>(keep.size());
  EXPECT_NEAR(l.metrics[0].second, mean, 1e-6);
}

// keep_scope sequence: the hinge on each row's kept fraction, averaged over rows, so a row
// that keeps little no longer hides one that keeps much; the dual term stays on the layer's mean.
TEST(AttentionGate, SequenceScopeHingesEachRow) {
  const Model& model = tiny_model("llama3", torch::kFloat);
  auto gate = make_gate(model, 8, {{"target", 0.3}, {"sinks", 2}, {"keep_penalty", "hinge"}, {"keep_scope", "sequence"}});
  ASSERT_EQ(gate->options().scope, KeepScope::Sequence);
  spread_gate(*gate, 1.0, 0.5);
  const TrainBatch tb = packed_batch(model.config().vocab_size, 24, 9);
  ComponentLoss l = gate->loss(model, tb, LossOptions{});
  const at::Tensor rows = gate->row_keep_fractions();  // (L, 2)
  ASSERT_EQ(rows.sizes(), (std::vector<int64_t>{model.config().num_layers, 2}));
  // Layer 0's rows, recomputed from the gate alone (its input is the embeddings, unaffected by eviction).
  const at::Tensor hidden0 = layer0_input(model, tb);
  torch::NoGradGuard ng;
  const at::Tensor allowed = causal_document_mask(tb.doc_ids, 2, 24, torch::kCPU);
  at::Tensor f0 = torch::sigmoid(gate->logits(0, hidden0, allowed)).ge(0.5) | tb.positions.lt(2).unsqueeze(-1);
  at::Tensor valid = tb.doc_ids.ge(0).unsqueeze(-1).expand_as(f0);
  for (int64_t b = 0; b < 2; ++b) {
    const double r = (f0[b] & valid[b]).sum().item<double>() / valid[b].sum().item<double>();
    EXPECT_NEAR(rows[0][b].item<double>(), r, 1e-6) << b;
  }
  // The rows must differ for the test to tell the scopes apart: mean of hinges != hinge of the mean.
  double per_row = 0, of_mean = 0;
  for (int64_t i = 0; i < rows.size(0); ++i) {
    const double a = rows[i][0].item<double>(), c = rows[i][1].item<double>();
    per_row += 0.5 * (std::max(0.0, a - 0.3) + std::max(0.0, c - 0.3));
  }
  for (const at::Tensor& k : gate->keep_fractions()) of_mean += std::max(0.0, k.item<double>() - 0.3);
  const double L = static_cast<double>(rows.size(0));
  EXPECT_NEAR(l.terms[2].second.item<double>(), per_row / L, 1e-6);
  EXPECT_GT(std::abs(per_row - of_mean) / L, 1e-3) << "the rows keep alike: the test cannot tell the scopes apart";
  // kept_row_std: the population std over rows of each row's mean over layers.
  const at::Tensor m = rows.mean(0);
  EXPECT_NEAR(l.metrics[2].second, (m[0] - m[1]).abs().item<double>() / 2.0, 1e-6);
  EXPECT_THROW(make_gate(model, 8, {{"keep_scope", "doc"}}), std::exception);
}

// dual keeps μ ≥ 0 (an inequality: a layer below β is left there); dual_equality lets μ turn negative, which
// pulls a layer below β back up.
TEST(AttentionGate, DualEqualityMultiplierTurnsNegativeBelowTheTarget) {
  const Model& model = tiny_model("llama3", torch::kFloat);
  for (const char* pen : {"dual", "dual_equality"}) {
    auto gate = make_gate(model, 8, {{"target", 0.95}, {"sinks", 2}, {"keep_penalty", pen}});
    spread_gate(*gate, 1.0, 0.5);
    const TrainBatch tb = packed_batch(model.config().vocab_size, 24, 9);
    ComponentLoss l = gate->loss(model, tb, LossOptions{});
    gate->end_step(0, l.stats);
    gate->end_step(1, l.stats);
    for (size_t i = 0; i < l.stats.size(); ++i) {
      ASSERT_LT(l.stats[i], 0.95) << "layer " << i << " keeps more than the target: the test needs it below";
      const double mu = gate->multipliers()[static_cast<int64_t>(i)].item<double>();
      EXPECT_NEAR(mu, std::string(pen) == "dual" ? 0.0 : 2 * 0.1 * (l.stats[i] - 0.95), 1e-6) << pen << " layer " << i;
    }
    // The next loss carries μ_ℓ · (keep_ℓ − β): positive for dual_equality below the target (it pushes up).
    ComponentLoss l2 = gate->loss(model, tb, LossOptions{});
    double expect = 0;
    for (size_t i = 0; i < l.stats.size(); ++i) {
      const double mu = gate->multipliers()[static_cast<int64_t>(i)].item<double>();
      expect += (std::max(0.0, l.stats[i] - 0.95) + mu * (l.stats[i] - 0.95)) / static_cast<double>(l.stats.size());
    }
    EXPECT_NEAR(l2.terms[2].second.item<double>(), expect, 1e-6) << pen;
  }
}

// keep_unit cache holds the cache's kept fraction, the mean over layers, at β: the hinge and the dual term act on
// that mean, and every multiplier is raised by the mean's excess, so the layers may split the budget unevenly.
TEST(AttentionGate, CacheUnitHoldsTheMeanOverLayers) {
  const Model& model = tiny_model("llama3", torch::kFloat);
  const TrainBatch tb = packed_batch(model.config().vocab_size, 24, 9);
  auto uneven = [](AttentionGateImpl& g) {  // mixed flags, and the last layer keeps less than the first
    spread_gate(g, 1.0, 0.5);
    torch::NoGradGuard ng;
    g.layer(g.num_layers() - 1)->wo->bias.fill_(-0.5);
  };
  auto per_layer = make_gate(model, 8, {{"sinks", 2}});
  uneven(*per_layer);
  const std::vector<double> stats = per_layer->loss(model, tb, LossOptions{}).stats;
  ASSERT_GE(stats.size(), 2u);
  const double lo = *std::min_element(stats.begin(), stats.end()), hi = *std::max_element(stats.begin(), stats.end());
  ASSERT_GT(hi - lo, 0.02) << "the test needs layers that keep different fractions";
  double mean = 0;
  for (double x : stats) mean += x / static_cast<double>(stats.size());
  // β between the layers' fractions and just under their mean: the mean's hinge differs from the layers' mean hinge.
  const double beta = mean - 0.25 * (mean - lo);
  double layer_hinge = 0;
  for (double x : stats) layer_hinge += std::max(0.0, x - beta) / static_cast<double>(stats.size());
  ASSERT_GT(layer_hinge - (mean - beta), 1e-4);

  auto gate = make_gate(model, 8, {{"sinks", 2}, {"target", beta}, {"keep_unit", "cache"}});
  uneven(*gate);
  ASSERT_EQ(gate->options().unit, KeepUnit::Cache);
  ComponentLoss l = gate->loss(model, tb, LossOptions{});
  ASSERT_EQ(l.stats.size(), stats.size());  // the layers' own fractions still go to the ascent and the log
  for (size_t i = 0; i < stats.size(); ++i) EXPECT_NEAR(l.stats[i], stats[i], 1e-6) << "layer " << i;
  EXPECT_NEAR(l.metrics[0].second, mean, 1e-6);
  EXPECT_NEAR(l.terms[2].second.item<double>(), mean - beta, 1e-6);  // μ = 0: the hinge of the mean alone
  gate->end_step(0, l.stats);
  for (int64_t i = 0; i < static_cast<int64_t>(stats.size()); ++i)
    EXPECT_NEAR(gate->multipliers()[i].item<double>(), 0.1 * (mean - beta), 1e-6) << "layer " << i;
  ComponentLoss l2 = gate->loss(model, tb, LossOptions{});
  EXPECT_NEAR(l2.terms[2].second.item<double>(), (mean - beta) * (1.0 + 0.1 * (mean - beta)), 1e-6);
  EXPECT_THROW(make_gate(model, 8, {{"keep_unit", "head"}}), std::exception);
}

TEST(AttentionGate, ScheduleFallsFromOneToTheTarget) {
  const Model& model = tiny_model("llama3", torch::kFloat);
  auto gate = make_gate(model, 10, {{"target", 0.25}, {"schedule_steps", 100}});
  EXPECT_DOUBLE_EQ(gate->target_at(0), 1.0);
  EXPECT_DOUBLE_EQ(gate->target_at(50), 0.625);
  EXPECT_DOUBLE_EQ(gate->target_at(100), 0.25);
  EXPECT_DOUBLE_EQ(gate->target_at(1000), 0.25);
}

// The kept fraction a threshold at tau keeps at inference (chunked prefill through the registry), over
// held-out sequences.
double inference_kept_fraction(const Model& model, std::shared_ptr<AttentionGateImpl> gate, const std::vector<std::vector<int64_t>>& seqs,
                               int64_t chunk) {
  MethodContext ctx;
  ctx.model = &model;
  ctx.continuous_chunk = chunk;
  ctx.load_bundle = [&](const std::string&) { return std::static_pointer_cast<Component>(gate); };
  ResolvedMethod r = resolve_method("attngate:x", Budget::threshold(gate->options().tau), ctx);
  torch::NoGradGuard ng;
  int64_t kept = 0, full = 0;
  for (const auto& s : seqs) {
    KVCache c = model.new_cache(1);
    const CompressStats st = compress_prefill(model, c, {s}, r.method, r.compress);
    kept += st.kept_bytes;
    full += st.full_bytes;
  }
  return static_cast<double>(kept) / static_cast<double>(full);
}

// The toy setting: random tokens on the random 2-layer model, trained with the default objective (KL + 10 ·
// the dual keep penalty, multipliers raised with dual_lr 0.1) under a cosine learning rate. Measured: the mean
// kept fraction of the last 20 training steps, and the held-out kept fraction at inference (16 unseen
// sequences, the threshold at tau, one token per chunk: each entry is evicted right after its own row, as in
// training).
TEST(AttentionGate, TrainingReachesItsTargetKeptFraction) {
  const Model& model = tiny_model("llama3", torch::kFloat);
  const int64_t V = model.config().vocab_size, T = 64, steps = 200;
  std::vector<std::vector<int64_t>> heldout;
  torch::manual_seed(100);
  for (int i = 0; i < 16; ++i) {
    at::Tensor t = torch::randint(V, {T}, torch::kLong);
    heldout.emplace_back(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + T);
  }
  for (const char* unit : {"layer", "cache"})
  for (double target : {0.5, 0.25}) {
    auto gate = make_gate(model, 11, {{"target", target}, {"schedule_steps", 40}, {"keep_unit", unit}});
    ASSERT_EQ(gate->options().penalty, KeepPenalty::Dual);
    torch::optim::AdamW opt(gate->parameters(), torch::optim::AdamWOptions(0.01).weight_decay(0.0));
    double kept_tail = 0;
    for (int64_t step = 0; step < steps; ++step) {
      torch::manual_seed(1000 + step);
      TrainBatch tb;
      tb.ids = torch::randint(V, {4, T}, torch::kLong);
      tb.positions = torch::arange(T, torch::kLong).repeat({4, 1});
      tb.doc_ids = torch::zeros({4, T}, torch::kLong);
      tb.labels = torch::cat({tb.ids.narrow(1, 1, T - 1), torch::full({4, 1}, -100, torch::kLong)}, 1);
      LossOptions lo;
      lo.step = step;
      ComponentLoss l = gate->loss(model, tb, lo);
      ASSERT_EQ(l.terms[2].first, "keep");
      at::Tensor total = l.terms[0].second + 10.0 * l.terms[2].second;  // the default weights: kl 1, keep 10
      const double lr = 0.001 + 0.009 * 0.5 * (1.0 + std::cos(M_PI * static_cast<double>(step) / static_cast<double>(steps)));
      for (auto& g : opt.param_groups()) static_cast<torch::optim::AdamWOptions&>(g.options()).lr(lr);
      opt.zero_grad();
      total.backward();
      opt.step();
      gate->end_step(step, l.stats);
      if (step >= steps - 20) kept_tail += l.metrics[0].second / 20.0;
    }
    const double inf = inference_kept_fraction(model, gate, heldout, 1);
    std::cout << "keep_unit " << unit << ", target " << target << ": kept over the last 20 steps " << kept_tail
              << ", held-out at inference " << inf << ", multipliers " << gate->multipliers() << "\n";
    EXPECT_NEAR(kept_tail, target, 0.03) << unit << " " << target;
    EXPECT_NEAR(inf, target, 0.03) << unit << " " << target;
  }
}

// Component::calibrate shifts each layer's output biases (keep_unit layer) or all layers' by one offset
// (keep_unit cache) so that, on the calibration sequences, a fraction β of the entries pass s ≥ τ. Checked
// independently: the objective's own kept fractions on the same batches (each layer, or their mean), the
// inference path at the threshold τ on the same sequences, and unseen sequences of the same distribution.
TEST(AttentionGate, CalibrationHoldsEachUnitAtTheTarget) {
  const Model& model = tiny_model("llama3", torch::kFloat);
  const int64_t V = model.config().vocab_size, T = 48;
  auto random_batch = [&](uint64_t seed) {
    torch::manual_seed(seed);
    TrainBatch tb;
    tb.ids = torch::randint(V, {4, T}, torch::kLong);
    tb.positions = torch::arange(T, torch::kLong).repeat({4, 1});
    tb.doc_ids = torch::zeros({4, T}, torch::kLong);
    tb.labels = torch::full({4, T}, -100, torch::kLong);
    return tb;
  };
  auto rows = [](const std::vector<TrainBatch>& bs) {
    std::vector<std::vector<int64_t>> out;
    for (const TrainBatch& b : bs)
      for (int64_t r = 0; r < b.ids.size(0); ++r) out.emplace_back(b.ids[r].data_ptr<int64_t>(), b.ids[r].data_ptr<int64_t>() + T);
    return out;
  };
  const std::vector<TrainBatch> calib = {random_batch(40), random_batch(41), random_batch(42)};
  const std::vector<TrainBatch> unseen = {random_batch(50), random_batch(51)};
  // Each layer's kept fraction over `bs` by the objective's own measure (equal valid counts per batch).
  auto layer_kept = [&](AttentionGateImpl& g, const std::vector<TrainBatch>& bs) {
    std::vector<double> k(g.num_layers(), 0.0);
    torch::NoGradGuard ng;
    for (const TrainBatch& b : bs) {
      const std::vector<double> st = g.loss(model, b, LossOptions{}).stats;
      for (size_t l = 0; l < k.size(); ++l) k[l] += st[l] / static_cast<double>(bs.size());
    }
    return k;
  };
  auto mean = [](const std::vector<double>& x) { return std::accumulate(x.begin(), x.end(), 0.0) / x.size(); };
  const double beta = 0.3;
  for (const char* unit : {"layer", "cache"}) {
    auto gate = make_gate(model, 16, {{"sinks", 2}, {"target", beta}, {"keep_unit", unit}});
    spread_gate(*gate, 1.0, 1.0);  // mixed flags, most kept
    {
      torch::NoGradGuard ng;
      gate->layer(0)->wo->bias.fill_(6.0);  // the layers keep different fractions
    }
    const std::vector<double> before = layer_kept(*gate, calib);
    ASSERT_GT(mean(before) - beta, 0.2) << "the test needs a gate that keeps far more than the target";
    const nlohmann::json r = gate->calibrate(model, calib, LossOptions{});
    const std::vector<double> after = layer_kept(*gate, calib);
    std::cout << "keep_unit " << unit << ": kept " << mean(before) << " -> " << mean(after) << " (layers "
              << after[0] << ", " << after.back() << "), " << r["passes"].size() << " passes; " << r.dump() << "\n";
    EXPECT_NEAR(r["kept_before"].get<double>(), mean(before), 1e-6);  // float32 sums
    EXPECT_NEAR(r["kept_after"].get<double>(), mean(after), 1e-6);
    // The biases kept are those of the pass that came closest to β.
    double closest = 1.0;
    for (const auto& p : r["passes"]) closest = std::min(closest, p["kept_max_error"].get<double>());
    EXPECT_EQ(r["passes"][r["kept_pass"].get<size_t>()]["kept_max_error"].get<double>(), closest);
    // 3 batches × 4 rows × 46 decided tokens × H_kv heads per layer: one entry is well under the tolerance.
    if (std::string(unit) == "layer") {
      for (size_t l = 0; l < after.size(); ++l) EXPECT_NEAR(after[l], beta, 0.002) << "layer " << l;
    } else {
      EXPECT_NEAR(mean(after), beta, 0.002);
      EXPECT_GT(std::abs(after[0] - after.back()), 0.02) << "one offset for all layers keeps their split";
    }
    EXPECT_NEAR(inference_kept_fraction(model, gate, rows(calib), 1), beta, 0.002) << unit;
    const double held = inference_kept_fraction(model, gate, rows(unseen), 1);
    std::cout << "  unseen sequences at inference: " << held << "\n";
    EXPECT_NEAR(held, beta, 0.05) << unit;
  }
}

// Layer 0's input does not depend on eviction, so the scorer's flags there (computed on append, chunk by
// chunk, batched with left padding) must equal the training forward's.
TEST(AttentionGate, ScorerFlagsEqualTrainingFlagsChunkedAndBatched) {
  const Model& model = tiny_model("qwen3", torch::kFloat);
  auto gate = make_gate(model, 12, {{"sinks", 0}});
  spread_gate(*gate, 1.0, 0.0);
  const int64_t V = model.config().vocab_size;
  torch::manual_seed(13);
  at::Tensor a = torch::randint(V, {30}, torch::kLong), b = torch::randint(V, {19}, torch::kLong);
  std::vector<std::vector<int64_t>> prompts = {std::vector<int64_t>(a.data_ptr<int64_t>(), a.data_ptr<int64_t>() + 30),
                                               std::vector<int64_t>(b.data_ptr<int64_t>(), b.data_ptr<int64_t>() + 19)};
  torch::NoGradGuard ng;
  // Training-side s of layer 0 for each prompt alone.
  std::vector<at::Tensor> want;
  for (const auto& p : prompts) {
    const int64_t n = static_cast<int64_t>(p.size());
    at::Tensor ids = torch::tensor(p).unsqueeze(0), pos = torch::arange(n, torch::kLong).unsqueeze(0);
    at::Tensor h0;
    AttentionMods grab;
    grab.layer_hook = [&](const LayerInput& in) {
      if (in.layer == 0) h0 = in.hidden;
      return LayerMods();
    };
    model.forward_train(ids, pos, grab);
    want.push_back(torch::sigmoid(gate->logits(0, h0, causal_document_mask(at::Tensor(), 1, n, torch::kCPU)))[0].t());  // (H_kv, n)
  }
  // Inference: a ratio-0 method (keeps everything) in chunks of 7, both prompts in one batch.
  Method m;
  m.name = "attngate";
  m.scorer = gate->make_scorer();
  m.selector.budget = Budget::ratio(0.0);
  KVCache c = model.new_cache(2);
  CompressOptions co;
  co.chunk_size = 7;
  compress_prefill(model, c, prompts, m, co);
  const KVLayerView v = c.layer(0);
  for (int64_t r = 0; r < 2; ++r) {
    const int64_t n = static_cast<int64_t>(prompts[r].size());
    at::Tensor got = v.payload.at("attention_gate_keep")[r].narrow(1, 0, n);  // (H_kv, n)
    const double d = max_abs_diff(got, want[r]);
    std::cout << "row " << r << ": scorer flags vs training, max-abs-diff " << d << "\n";
    EXPECT_LE(d, 2e-5) << r;
  }
}

TEST(AttentionGate, ThresholdGivesARaggedCacheOfExactlyTheKeptBytes) {
  const Model& model = tiny_model("llama3", torch::kFloat);
  auto gate = make_gate(model, 14, {{"sinks", 3}});
  spread_gate(*gate, 1.5, 0.0);
  torch::manual_seed(15);
  at::Tensor t = torch::randint(model.config().vocab_size, {40}, torch::kLong);
  const std::vector<int64_t> prompt(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + 40);
  torch::NoGradGuard ng;
  Method m;
  m.name = "attngate";
  m.scorer = gate->make_scorer();
  m.selector.budget = Budget::threshold(0.5);
  KVCache c = model.new_cache(1);
  const CompressStats st = compress_prefill(model, c, {prompt}, m);
  // Layer 0: kept = sinks ∪ {s ≥ 0.5}, from the gate alone.
  at::Tensor h0;
  AttentionMods grab;
  grab.layer_hook = [&](const LayerInput& in) {
    if (in.layer == 0) h0 = in.hidden;
    return LayerMods();
  };
  model.forward_train(t.unsqueeze(0), torch::arange(40, torch::kLong).unsqueeze(0), grab);
  at::Tensor s0 = torch::sigmoid(gate->logits(0, h0, causal_document_mask(at::Tensor(), 1, 40, torch::kCPU)))[0];  // (40, H_kv)
  int64_t entries = 0;
  std::vector<int64_t> counts;
  for (int64_t l = 0; l < model.config().num_layers; ++l)
    for (int64_t h = 0; h < model.config().num_kv_heads; ++h) {
      counts.push_back(c.length(l, 0, h));
      entries += c.length(l, 0, h);
    }
  for (int64_t h = 0; h < model.config().num_kv_heads; ++h) {
    at::Tensor keep = s0.select(1, h).ge(0.5);
    keep.narrow(0, 0, 3).fill_(true);
    at::Tensor want = torch::nonzero(keep).flatten();
    at::Tensor got = std::get<0>(c.layer(0).pos[0][h].narrow(0, 0, c.length(0, 0, h)).sort());
    EXPECT_TRUE(torch::equal(got, want)) << "head " << h << ": " << got << " vs " << want;
  }
  EXPECT_NE(*std::min_element(counts.begin(), counts.end()), *std::max_element(counts.begin(), counts.end()))
      << "heads keep different counts";
  EXPECT_EQ(st.kept_bytes, entries * c.bytes_per_entry());
  EXPECT_LT(st.kept_bytes, st.full_bytes);
  EXPECT_EQ(c.bytes(), st.kept_bytes);
}

TEST(AttentionGate, BundleRoundTripsAndResolvesUnderItsAlias) {
  const Model& model = tiny_model("llama3", torch::kFloat);
  auto gate = make_gate(model, 16, {{"target", 0.25}, {"heads", 3}, {"head_dim", 8}});
  TempDir dir;
  const BaseModelInfo base{"tiny-llama3", "aaaa"};
  save_gate_bundle(dir.path, *gate, base);
  const nlohmann::json m = read_gate_manifest(dir.path);
  EXPECT_EQ(m.at("kind"), "attention_gate");
  EXPECT_EQ(m.at("score"), "keep_probability");
  EXPECT_EQ(m.at("options").at("heads"), 3);
  std::shared_ptr<Component> back = load_component(dir.path, model, base);
  ASSERT_EQ(back->kind(), "attention_gate");
  auto params = gate->named_parameters(), got = back->named_parameters();
  ASSERT_EQ(params.size(), got.size());
  for (const auto& p : params) EXPECT_TRUE(p.value().equal(got[p.key()])) << p.key();
  MethodContext ctx;
  ctx.model = &model;
  ctx.load_bundle = [&](const std::string& d) { return load_component(d, model, base); };
  for (const std::string& name : {"gate:" + dir.path, "attention_gate:" + dir.path, "attngate:" + dir.path,
                                  "adakv_attngate:" + dir.path}) {
    EXPECT_TRUE(is_bundle_method(name)) << name;
    ResolvedMethod r = resolve_method(name, Budget::ratio(0.5), ctx);
    EXPECT_EQ(r.component->kind(), "attention_gate") << name;
    EXPECT_TRUE(r.decode.has_value()) << name;  // continuous: held at its budget while decoding
  }
  // A threshold evicts per chunk and holds no count while decoding.
  ResolvedMethod r = resolve_method("attngate:" + dir.path, Budget::threshold(0.5), ctx);
  EXPECT_FALSE(r.decode.has_value());
  EXPECT_GT(r.compress.chunk_size, 0);
  EXPECT_NE(known_methods().find("attention_gate (alias attngate)"), std::string::npos) << known_methods();
}

TEST(AttentionGate, BadInputGetsOneClearError) {
  const Model& model = tiny_model("llama3", torch::kFloat);
  const ModelConfig& cfg = model.config();
  auto has = [](const std::string& msg, const std::string& part) { return msg.find(part) != std::string::npos; };
  for (double bad : {0.0, -0.1, 1.5}) {
    const std::string e = error_of([&] { make_component("attngate", cfg, {{"target", bad}}); });
    EXPECT_TRUE(has(e, "component.target") && has(e, "(0, 1]")) << e;
  }
  EXPECT_TRUE(error_of([&] { make_component("attention_gate", cfg, {{"target", 1.0}}); }).empty());
  std::string e = error_of([&] { make_component("attention_gate", cfg, {{"tau", 1.0}}); });
  EXPECT_TRUE(has(e, "component.tau")) << e;
  e = error_of([&] { make_component("attention_gate", cfg, {{"heads", 0}}); });
  EXPECT_TRUE(has(e, "component.heads")) << e;

  // attngate:<dir> on a bundle of another kind.
  torch::manual_seed(17);
  auto rg = make_component("retention_gate", cfg);
  TempDir dir;
  const BaseModelInfo base{"model-a", "1111111111111111"};
  save_gate_bundle(dir.path, *rg, base);
  MethodContext ctx;
  ctx.model = &model;
  ctx.load_bundle = [&](const std::string& d) { return load_component(d, model, base); };
  e = error_of([&] { resolve_method("attngate:" + dir.path, Budget::ratio(0.5), ctx); });
  EXPECT_TRUE(has(e, "holds a 'retention_gate' component, not a 'attention_gate'")) << e;
  // A bundle trained for another model.
  auto gate = make_gate(model, 18);
  TempDir dir2;
  save_gate_bundle(dir2.path, *gate, base);
  e = error_of([&] { load_component(dir2.path, model, BaseModelInfo{"model-b", "2222222222222222"}); });
  EXPECT_TRUE(has(e, "trained for model 'model-a'") && has(e, "model-b")) << e;
  const Model& other = tiny_model("qwen3", torch::kFloat);
  e = error_of([&] { load_component(dir2.path, other, base); });
  if (other.config().num_kv_heads != cfg.num_kv_heads || other.config().hidden_size != cfg.hidden_size ||
      other.config().num_layers != cfg.num_layers)
    EXPECT_FALSE(e.empty());
}

}  // namespace
