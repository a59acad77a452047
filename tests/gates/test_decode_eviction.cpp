// Decode-time eviction (gates/decode_eviction.h): H2O and TOVA decode against naive references (explicit
// softmax of each step's query over the kept entries, selection by plain sorting), LazyEviction's state and
// ranking on hand-built attention rows, the every-N-steps trigger (head lengths, peak bytes, ragged prefill
// budgets), batch-row independence, and the fixed-shape form (static_evictor) against the cache path.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <tuple>
#include <vector>

#include <torch/torch.h>

#include "gates/attention_gate.h"
#include "gates/compress.h"
#include "gates/registry.h"
#include "gates/decode_eviction.h"
#include "gates/dms.h"
#include "gates/heuristics.h"
#include "gates/kvzap.h"
#include "gates/retention_gate.h"
#include "models/config.h"
#include "models/kv_cache.h"
#include "models/model.h"
#include "models/generate.h"
#include "models/static_decode.h"
#include "models/weights.h"

using namespace kvd;

namespace {

// A tiny random Llama-style decoder with GQA (4 query heads over 2 KV heads), weights scaled so attention is
// far from uniform.
Model tiny_model(c10::ScalarType dtype, uint64_t seed = 7, c10::Device device = torch::kCPU) {
  ModelConfig cfg;
  cfg.family = Family::Llama;
  cfg.architecture = "LlamaForCausalLM";
  cfg.model_type = "llama";
  cfg.hidden_size = 32;
  cfg.intermediate_size = 48;
  cfg.num_layers = 2;
  cfg.num_heads = 4;
  cfg.num_kv_heads = 2;
  cfg.head_dim = 8;
  cfg.vocab_size = 61;
  cfg.max_position_embeddings = 512;
  cfg.rms_norm_eps = 1e-6;
  torch::manual_seed(seed);
  auto o = torch::TensorOptions().dtype(dtype).device(device);  // Model takes its weights where they are
  const int64_t d = cfg.hidden_size, H = cfg.num_heads, Hkv = cfg.num_kv_heads, hd = cfg.head_dim,
                f = cfg.intermediate_size;
  auto rn = [&](int64_t a, int64_t b, double s) { return torch::randn({a, b}, o) * s; };
  DecoderWeights w;
  w.embed = rn(cfg.vocab_size, d, 1.0);
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    LayerWeights lw;
    lw.input_norm = torch::ones({d}, o);
    lw.q_proj = rn(H * hd, d, 0.6);
    lw.k_proj = rn(Hkv * hd, d, 0.6);
    lw.v_proj = rn(Hkv * hd, d, 0.3);
    lw.o_proj = rn(d, H * hd, 0.3);
    lw.post_norm = torch::ones({d}, o);
    lw.gate_proj = rn(f, d, 0.3);
    lw.up_proj = rn(f, d, 0.3);
    lw.down_proj = rn(d, f, 0.3);
    w.layers.push_back(lw);
  }
  w.final_norm = torch::ones({d}, o);
  w.lm_head = rn(cfg.vocab_size, d, 0.5);
  return Model(cfg, std::move(w), dtype, device);
}

const Model& model64() {
  static Model m = tiny_model(torch::kDouble);
  return m;
}

at::Tensor prompt_ids(int64_t B, int64_t T, uint64_t seed) {
  torch::manual_seed(seed);
  return torch::randint(61, {B, T}, torch::kLong);
}

std::vector<int64_t> head_positions(const KVCache& cache, int64_t l, int64_t b, int64_t h) {
  at::Tensor p = cache.positions(l)[b][h].narrow(0, 0, cache.length(l, b, h)).to(torch::kCPU).contiguous();
  return std::vector<int64_t>(p.data_ptr<int64_t>(), p.data_ptr<int64_t>() + p.numel());
}

// Greedy decode of `steps` steps after the prompt, every layer of every step through `observer`.
std::vector<at::Tensor> decode_loop(const Model& m, KVCache& cache, const at::Tensor& prompt, int64_t steps,
                                    const PrefillObserver& observer) {
  at::Tensor logits = m.prefill(prompt, cache);  // (B, V)
  std::vector<at::Tensor> toks;
  for (int64_t s = 0; s < steps; ++s) {
    at::Tensor ids = logits.argmax(-1).view({-1, 1});  // (B, 1)
    toks.push_back(ids);
    logits = m.prefill(ids, cache, LogitsMode::LastPosition, observer);
  }
  return toks;
}

// Naive attention of query head hq of row b to the entries of KV head h, by explicit softmax (float64).
std::vector<double> naive_attention(const at::Tensor& q, const KVCache& cache, int64_t l, int64_t b, int64_t hq,
                                    int64_t h) {
  at::Tensor qd = q.to(torch::kDouble).contiguous();                     // (B, H, 1, hd)
  at::Tensor kd = cache.layer(l).k.to(torch::kDouble).contiguous();      // (B, H_kv, n, hd)
  auto qa = qd.accessor<double, 4>();
  auto ka = kd.accessor<double, 4>();
  const int64_t n = cache.length(l, b, h), hd = qd.size(3);
  std::vector<double> logit(n), p(n);
  double mx = -1e300, z = 0;
  for (int64_t j = 0; j < n; ++j) {
    double dot = 0;
    for (int64_t e = 0; e < hd; ++e) dot += qa[b][hq][0][e] * ka[b][h][j][e];
    logit[j] = dot / std::sqrt(static_cast<double>(hd));
    mx = std::max(mx, logit[j]);
  }
  for (int64_t j = 0; j < n; ++j) z += (p[j] = std::exp(logit[j] - mx));
  for (double& x : p) x /= z;
  return p;
}

enum class RefPolicy { H2O, TOVA, Lazy };

// One cached entry of the reference: H2O's accumulated score, LazyEviction's step counters and attention.
struct RefEntry {
  double score = 0;
  int64_t born = 0, last = 0, mri = 0;
  double attn = 0;
};

// Runs `steps` decode steps with the evictor and a naive reference side by side; after every step (every
// layer) the cache's positions must equal the reference's kept set.
void check_against_reference(RefPolicy pol, int64_t T, int64_t interval, int64_t steps) {
  const Model& m = model64();
  const ModelConfig& c = m.config();
  const int64_t B = 1, Hkv = c.num_kv_heads, G = c.group_size(), n0 = 10;
  const DecodePolicy dp = pol == RefPolicy::H2O    ? DecodePolicy::H2O
                         : pol == RefPolicy::TOVA ? DecodePolicy::TOVA
                                                  : DecodePolicy::LazyEviction;
  DecodeEvictor ev(m, dp, {interval, T});
  PrefillObserver inner = ev.observer();
  // reference: [layer][head] position -> entry state (TOVA uses the kept set only)
  std::vector<std::vector<std::map<int64_t, RefEntry>>> ref(c.num_layers, std::vector<std::map<int64_t, RefEntry>>(Hkv));
  for (auto& layer : ref)
    for (auto& head : layer)
      for (int64_t p = 0; p < n0; ++p) head[p] = RefEntry{};
  std::vector<int64_t> step_of(c.num_layers, 0);
  int64_t checks = 0, evicted = 0;
  PrefillObserver obs_fn = [&](const PrefillLayerObservation& obs, KVCache& cache) {
    const int64_t l = obs.layer, step = ++step_of[l];
    const int64_t qpos = obs.query_positions[0][0].item<int64_t>();
    std::vector<double> tova;  // TOVA: attention averaged over all query heads, by entry index
    for (int64_t h = 0; h < Hkv; ++h) {
      auto& R = ref[l][h];
      R[qpos] = RefEntry{0.0, step, step, 0, 0.0};  // the entry this step appended
      std::vector<int64_t> have = head_positions(cache, l, 0, h);
      std::vector<int64_t> want;
      for (auto& kv : R) want.push_back(kv.first);
      ASSERT_EQ(have, want) << "layer " << l << " head " << h << " step " << step << " before eviction";
      std::vector<double> mean(have.size(), 0.0);
      for (int64_t g = 0; g < G; ++g) {
        std::vector<double> p = naive_attention(obs.queries, cache, l, 0, h * G + g, h);
        for (size_t j = 0; j < p.size(); ++j) mean[j] += p[j] / G;
      }
      if (pol == RefPolicy::H2O) {
        for (size_t j = 0; j < have.size(); ++j) R[have[j]].score += mean[j];
      } else if (pol == RefPolicy::Lazy) {
        for (size_t j = 0; j < have.size(); ++j) {
          RefEntry& e = R[have[j]];
          if (mean[j] > 1.0 / have.size()) {
            e.mri = std::max(e.mri, step - e.last);
            e.last = step;
          }
          e.attn = mean[j];
        }
      } else {
        if (tova.empty()) tova.assign(have.size(), 0.0);
        for (size_t j = 0; j < have.size(); ++j) tova[j] += mean[j] / Hkv;
      }
    }
    if (step % interval == 0) {
      for (int64_t h = 0; h < Hkv; ++h) {
        auto& R = ref[l][h];
        if (static_cast<int64_t>(R.size()) <= T) continue;
        std::vector<std::pair<double, int64_t>> cand;  // (score, position) of evictable entries, lowest first
        std::vector<std::tuple<int, int64_t, double, int64_t>> lazy;  // (not over, -(idle - MRI), attn, position)
        const int64_t n = R.size();
        if (pol == RefPolicy::H2O) {
          int64_t idx = 0;
          for (auto& kv : R) {
            if (idx < n - T / 2) cand.push_back({kv.second.score, kv.first});  // the last T/2 are protected
            ++idx;
          }
        } else if (pol == RefPolicy::Lazy) {
          for (auto& kv : R) {
            const RefEntry& e = kv.second;
            if (e.born > step - interval) continue;  // appended within the current window: protected
            const int64_t over = (step - e.last) - e.mri;
            lazy.emplace_back(over > 0 ? 0 : 1, over > 0 ? -over : 0, e.attn, kv.first);
          }
          std::sort(lazy.begin(), lazy.end());
          for (auto& t : lazy) cand.push_back({static_cast<double>(cand.size()), std::get<3>(t)});
        } else {
          int64_t idx = 0;
          for (auto& kv : R) cand.push_back({tova[idx++], kv.first});
        }
        std::sort(cand.begin(), cand.end());
        for (int64_t e = 0; e < n - T; ++e) R.erase(cand[e].second);
        evicted += n - T;
      }
    }
    inner(obs, cache);
    for (int64_t h = 0; h < Hkv; ++h) {
      std::vector<int64_t> want;
      for (auto& kv : ref[l][h]) want.push_back(kv.first);
      ASSERT_EQ(head_positions(cache, l, 0, h), want) << "layer " << l << " head " << h << " step " << step;
      ++checks;
    }
  };
  KVCache cache = m.new_cache(B);
  decode_loop(m, cache, prompt_ids(B, n0, 3), steps, obs_fn);
  EXPECT_EQ(checks, steps * c.num_layers * Hkv);
  EXPECT_EQ(ev.stats().steps, steps);
  EXPECT_EQ(ev.stats().evictions, evicted);
  EXPECT_GT(evicted, 0);
}

}  // namespace

TEST(DecodeEviction, H2OMatchesNaiveReferenceEveryStep) { check_against_reference(RefPolicy::H2O, 6, 1, 14); }
TEST(DecodeEviction, H2OMatchesNaiveReferenceEveryThirdStep) { check_against_reference(RefPolicy::H2O, 7, 3, 14); }
TEST(DecodeEviction, TOVAMatchesNaiveReferenceEveryStep) { check_against_reference(RefPolicy::TOVA, 6, 1, 14); }
TEST(DecodeEviction, TOVAMatchesNaiveReferenceEveryThirdStep) { check_against_reference(RefPolicy::TOVA, 5, 3, 14); }
TEST(DecodeEviction, LazyMatchesNaiveReferenceEveryStep) { check_against_reference(RefPolicy::Lazy, 6, 1, 14); }
TEST(DecodeEviction, LazyMatchesNaiveReferenceEveryFourthStep) { check_against_reference(RefPolicy::Lazy, 6, 4, 17); }

// H2O's initial scores decide the first evictions: with a huge score on position 1 it must survive, with a
// very negative one it must go first.
TEST(DecodeEviction, H2OInitialScores) {
  const Model& m = model64();
  for (double boost : {1e6, -1e6}) {
    DecodeEvictor ev(m, DecodePolicy::H2O, {1, 6});
    for (int64_t l = 0; l < m.config().num_layers; ++l) {
      at::Tensor s = torch::zeros({1, m.config().num_kv_heads, 10}, torch::kDouble);
      s.select(2, 1).fill_(boost);
      ev.set_initial_scores(l, s);
    }
    KVCache cache = m.new_cache(1);
    decode_loop(m, cache, prompt_ids(1, 10, 3), 6, ev.observer());
    for (int64_t l = 0; l < m.config().num_layers; ++l)
      for (int64_t h = 0; h < m.config().num_kv_heads; ++h) {
        std::vector<int64_t> p = head_positions(cache, l, 0, h);
        EXPECT_EQ(std::count(p.begin(), p.end(), 1), boost > 0 ? 1 : 0) << "boost " << boost;
      }
  }
}

// LazyEviction on hand-built attention rows (6 entries present before decoding, default threshold 1/6).
TEST(DecodeEviction, LazyEvictionStateAndOrderByHand) {
  const std::vector<std::vector<double>> rows = {
      {0.40, 0.05, 0.05, 0.10, 0.10, 0.30},  // step 1: e0, e5 important
      {0.05, 0.40, 0.05, 0.10, 0.10, 0.30},  // step 2: e1, e5
      {0.05, 0.05, 0.50, 0.10, 0.10, 0.20},  // step 3: e2, e5
      {0.50, 0.05, 0.05, 0.10, 0.10, 0.20},  // step 4: e0 (gap 3), e5
      {0.10, 0.10, 0.10, 0.10, 0.50, 0.10},  // step 5: e4 (gap 5)
      {0.14, 0.15, 0.16, 0.40, 0.05, 0.10},  // step 6: e3 (gap 6); 0.16 < 1/6
  };
  LazyEvictionState st = lazy_eviction_fresh(1, 1, 6, 0, torch::kCPU);
  for (size_t s = 0; s < rows.size(); ++s)
    lazy_eviction_update(st, torch::tensor(rows[s], torch::kDouble).view({1, 1, 6}), at::Tensor(),
                         static_cast<int64_t>(s) + 1, 0.0);
  auto vec = [](const at::Tensor& t) {
    at::Tensor c = t.reshape({-1}).to(torch::kLong).contiguous();
    return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
  };
  EXPECT_EQ(vec(st.last), (std::vector<int64_t>{4, 2, 3, 6, 5, 4}));
  EXPECT_EQ(vec(st.mri), (std::vector<int64_t>{3, 2, 3, 6, 5, 1}));
  // At step 6, idle - MRI: e1 4-2 = 2, e5 2-1 = 1 (both over their MRI); e0 2-3, e2 3-3, e3 0-6, e4 1-5 not.
  // Over-MRI first by (idle - MRI) descending: e1, e5 (e5's lower attention does not matter); then the rest
  // by lower attention: e4 (.05), e0 (.14), e2 (.16), e3 (.40).
  at::Tensor keep = lazy_eviction_keep_scores(st, at::Tensor(), 6, 1);  // (1, 1, 6)
  at::Tensor order = std::get<1>(keep.view({6}).sort(/*stable=*/true, 0, /*descending=*/false));
  EXPECT_EQ(vec(order), (std::vector<int64_t>{1, 5, 4, 0, 2, 3}));
  // A threshold of 0.35 makes only e0 (steps 1, 4: MRI 3), e1 (2), e2 (3), e4 (5), e3 (6) important.
  LazyEvictionState st2 = lazy_eviction_fresh(1, 1, 6, 0, torch::kCPU);
  for (size_t s = 0; s < rows.size(); ++s)
    lazy_eviction_update(st2, torch::tensor(rows[s], torch::kDouble).view({1, 1, 6}), at::Tensor(),
                         static_cast<int64_t>(s) + 1, 0.35);
  EXPECT_EQ(vec(st2.last), (std::vector<int64_t>{4, 2, 3, 6, 5, 0}));
  EXPECT_EQ(vec(st2.mri), (std::vector<int64_t>{3, 2, 3, 6, 5, 0}));
  // Window protection: entries born after step - window are never evicted; invalid entries always go.
  st.born = torch::tensor(std::vector<int64_t>{0, 5, 0, 0, 4, 0}).view({1, 1, 6});
  at::Tensor valid = torch::tensor(std::vector<int64_t>{1, 1, 1, 1, 1, 0}).view({1, 1, 6}).to(torch::kBool);
  at::Tensor k2 = lazy_eviction_keep_scores(st, valid, 6, 2);  // protects born > 4: e1
  EXPECT_TRUE(std::isinf(k2[0][0][1].item<double>()) && k2[0][0][1].item<double>() > 0);
  EXPECT_FALSE(std::isinf(k2[0][0][4].item<double>()));
  EXPECT_TRUE(std::isinf(k2[0][0][5].item<double>()) && k2[0][0][5].item<double>() < 0);
}

// With interval N and target T, every head holds exactly T entries after each trigger and grows by one in
// between; no head ever exceeds T + N entries, nor the cache's peak (T + N) entries per head.
TEST(DecodeEviction, TriggerKeepsTargetAndBoundsPeak) {
  const Model& m = tiny_model(torch::kFloat);
  const ModelConfig& c = m.config();
  const int64_t n0 = 8, N = 3, steps = 11;
  for (int64_t T : {int64_t{0}, int64_t{5}}) {
    for (DecodePolicy pol : {DecodePolicy::H2O, DecodePolicy::TOVA, DecodePolicy::LazyEviction, DecodePolicy::Scorer}) {
      DecodeEvictionOptions opt;
      opt.scorer = std::make_shared<SnapKVScorer>(SnapKVOptions{2, 3, GroupReduce::Mean});
      DecodeEvictor ev(m, pol, {N, T}, opt);
      const int64_t target = T > 0 ? T : n0;
      PrefillObserver inner = ev.observer();
      std::vector<int64_t> step_of(c.num_layers, 0), prev(c.num_layers, n0);
      int64_t max_len = 0, max_bytes = 0;
      PrefillObserver obs_fn = [&](const PrefillLayerObservation& obs, KVCache& cache) {
        const int64_t l = obs.layer, step = ++step_of[l];
        if (step > N) max_bytes = std::max(max_bytes, cache.bytes());  // every layer has been evicted once
        inner(obs, cache);
        for (int64_t h = 0; h < c.num_kv_heads; ++h) {
          const int64_t len = cache.length(l, 0, h);
          if (step % N == 0)
            EXPECT_EQ(len, std::min(target, prev[l] + 1)) << "layer " << l << " step " << step;
          else
            EXPECT_EQ(len, prev[l] + 1) << "layer " << l << " step " << step;
          if (step >= N) max_len = std::max(max_len, len);
          if (h == c.num_kv_heads - 1) prev[l] = len;
        }
      };
      KVCache cache = m.new_cache(1);
      decode_loop(m, cache, prompt_ids(1, n0, 5), steps, obs_fn);
      EXPECT_LE(max_len, target + N - 1);
      const int64_t bound = c.num_layers * c.num_kv_heads * (target + N) * cache.bytes_per_entry();
      EXPECT_LE(max_bytes, bound);
      EXPECT_GT(max_bytes, bound - c.num_layers * c.num_kv_heads * cache.bytes_per_entry());  // reached: T + N - 1
      // Keeping the prefill's budget (T = 0), the cache's own peak stays within (T + N) entries per head.
      if (T == 0) EXPECT_LE(cache.peak_bytes(), bound);
      EXPECT_EQ(ev.targets(0), std::vector<int64_t>(c.num_kv_heads, target));
      EXPECT_EQ(ev.stats().triggers, (steps / N) * c.num_layers);
      // Final length: after the last trigger (step 9) the heads grew by steps - 9.
      EXPECT_EQ(cache.length(1, 0, 1), target + steps % N);
    }
  }
}

// target 0 keeps what a ragged (AdaKV) prefill compression left, per head.
TEST(DecodeEviction, TargetZeroKeepsRaggedPrefillBudgets) {
  const Model& m = tiny_model(torch::kFloat);
  const ModelConfig& c = m.config();
  Method method = make_method("adakv_knorm", 0.5);
  KVCache cache = m.new_cache(1);
  compress_prefill(m, cache, prompt_ids(1, 16, 9), method);
  std::vector<std::vector<int64_t>> budget(c.num_layers);
  bool ragged = false;
  for (int64_t l = 0; l < c.num_layers; ++l) {
    budget[l] = cache.lengths(l);
    ragged = ragged || *std::min_element(budget[l].begin(), budget[l].end()) !=
                           *std::max_element(budget[l].begin(), budget[l].end());
  }
  ASSERT_TRUE(ragged) << "the AdaKV prefill should leave heads of different lengths";
  DecodeEvictor ev(m, DecodePolicy::H2O, {2, 0});
  at::Tensor ids = torch::full({1, 1}, 3, torch::kLong);
  for (int64_t s = 1; s <= 6; ++s) {
    m.prefill(ids, cache, LogitsMode::LastPosition, ev.observer());
    for (int64_t l = 0; l < c.num_layers; ++l)
      for (int64_t r = 0; r < c.num_kv_heads; ++r) EXPECT_EQ(cache.lengths(l)[r], budget[l][r] + s % 2);
  }
  for (int64_t l = 0; l < c.num_layers; ++l) EXPECT_EQ(ev.targets(l), budget[l]);
}

// Two batch rows of different prompt lengths (left-padded through Model::prefill's `lead`) evict exactly as
// each row alone; a row that finished (its later steps are padding, as in generate_batch) is left alone and
// does not disturb the other.
TEST(DecodeEviction, BatchRowsEvictAsAlone) {
  const Model& m = model64();
  const ModelConfig& c = m.config();
  const int64_t steps = 8;
  torch::manual_seed(11);
  auto toks = [](int64_t n) {
    at::Tensor t = torch::randint(61, {n}, torch::kLong);
    return std::vector<int64_t>(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + n);
  };
  const std::vector<int64_t> p0 = toks(9), p1 = toks(6);
  using Trace = std::vector<std::vector<std::vector<std::vector<int64_t>>>>;  // [step][layer][head] positions
  struct Out {
    std::vector<Trace> pos;                   // [row]
    std::vector<std::vector<int64_t>> token;  // [row][step]
  };
  for (DecodePolicy pol : {DecodePolicy::H2O, DecodePolicy::TOVA, DecodePolicy::LazyEviction, DecodePolicy::Scorer}) {
    // finish: from this step on, row 1's steps are padding (-1: never)
    auto run = [&](const std::vector<std::vector<int64_t>>& rows, int64_t finish) {
      const int64_t B = rows.size();
      DecodeEvictionOptions opt;
      opt.scorer = std::make_shared<KNormScorer>();
      DecodeEvictor ev(m, pol, {2, 6}, opt);
      PrefillObserver inner = ev.observer();
      Out out;
      out.pos.assign(B, {});
      out.token.assign(B, {});
      PrefillObserver f = [&](const PrefillLayerObservation& obs, KVCache& cache) {
        inner(obs, cache);
        for (int64_t b = 0; b < B; ++b) {
          if (obs.layer == 0) out.pos[b].emplace_back();
          out.pos[b].back().emplace_back();
          for (int64_t h = 0; h < c.num_kv_heads; ++h)
            out.pos[b].back().back().push_back(head_positions(cache, obs.layer, b, h));
        }
      };
      std::vector<int64_t> lead;
      at::Tensor ids = left_pad(rows, 0, lead);  // (B, T)
      KVCache cache = m.new_cache(B);
      at::Tensor logits = m.prefill(ids, cache, LogitsMode::LastPosition, {}, lead);  // (B, V)
      for (int64_t s = 0; s < steps; ++s) {
        at::Tensor next = logits.argmax(-1).view({B, 1});  // (B, 1)
        for (int64_t b = 0; b < B; ++b) out.token[b].push_back(next[b][0].item<int64_t>());
        std::vector<int64_t> step_lead(B, 0);
        if (finish >= 0 && s >= finish) step_lead[1] = 1;
        logits = m.prefill(next, cache, LogitsMode::LastPosition, f, step_lead);
      }
      return out;
    };
    const Out both = run({p0, p1}, -1), a0 = run({p0}, -1), a1 = run({p1}, -1);
    EXPECT_EQ(both.pos[0], a0.pos[0]) << "policy " << static_cast<int>(pol);
    EXPECT_EQ(both.pos[1], a1.pos[0]) << "policy " << static_cast<int>(pol);
    EXPECT_EQ(both.token[0], a0.token[0]);
    EXPECT_EQ(both.token[1], a1.token[0]);
    EXPECT_NE(both.pos[0], both.pos[1]);  // the rows differ, so the check above can fail
    // Row 1 finishes after 3 steps: row 0 is unaffected, row 1 gains no entry (and loses none at triggers,
    // since it already holds at most its target).
    const Out fin = run({p0, p1}, 3);
    EXPECT_EQ(fin.pos[0], a0.pos[0]) << "policy " << static_cast<int>(pol);
    for (int64_t s = 3; s < steps; ++s)
      for (int64_t l = 0; l < c.num_layers; ++l)
        for (int64_t h = 0; h < c.num_kv_heads; ++h) {
          const std::vector<int64_t>& p = fin.pos[1][s][l][h];
          EXPECT_LE(static_cast<int64_t>(p.size()), 7);
          EXPECT_LE(*std::max_element(p.begin(), p.end()), 6 + 3 - 1) << "a padding step stored an entry";
        }
  }
}

// TRIM-KV as its paper runs it: log beta written when each token is appended (every prefill chunk, every decode
// step), and each (layer, KV head) holding more than M entries evicting its lowest log beta_i (t + 1 - pos_i).
// The batched, left-padded run (compress_prefill in chunks with the final budget, then the decode evictor with
// the gate's scorer) keeps exactly the entries of a naive per-row reference: plain lists of (position,
// log beta) per head, sorted by score, driving KVCache::keep itself.
TEST(DecodeEviction, RetentionGateKeepsWhatANaiveReferenceKeeps) {
  const Model& model = model64();
  const ModelConfig& cfg = model.config();
  RetentionGateOptions go;
  go.hidden = 16;
  go.bias_init = 0.5;
  go.init_std = 0.4;  // retentions far apart, so the ranking has no near-ties
  torch::manual_seed(11);
  RetentionGate gate(cfg, go);
  gate->to(torch::kDouble);
  const int64_t L = cfg.num_layers, Hkv = cfg.num_kv_heads;
  for (const auto& [M, chunk] : std::vector<std::pair<int64_t, int64_t>>{{5, 4}, {9, 6}, {13, 5}}) {
    const std::vector<int64_t> lens = {17, 11};  // two rows, the second left-padded by 6
    const int64_t B = 2, steps = 7;
    std::vector<std::vector<int64_t>> prompts(B);
    torch::manual_seed(100 + M);
    for (int64_t b = 0; b < B; ++b) {
      at::Tensor p = torch::randint(61, {lens[b]}, torch::kLong);
      prompts[b].assign(p.data_ptr<int64_t>(), p.data_ptr<int64_t>() + lens[b]);
    }
    at::Tensor next = torch::randint(61, {steps, B}, torch::kLong);  // teacher-forced decode tokens

    // Batched: chunked prefill at the final budget, then decode-time eviction holding M per head.
    KVCache cache = model.new_cache(B);
    Method method;
    method.scorer = gate->make_scorer();
    method.selector.budget = Budget::tokens(M);
    CompressOptions co;
    co.chunk_size = chunk;
    co.chunk_budget = ChunkBudget::Final;
    compress_prefill(model, cache, prompts, method, co);
    DecodeTrigger trig;
    trig.target = M;
    DecodeEvictionOptions eo;
    eo.scorer = method.scorer;
    DecodeEvictor ev(model, DecodePolicy::Scorer, trig, eo);
    auto kept = [&](KVCache& c, int64_t b, int64_t l, int64_t h) {
      const int64_t len = c.length(l, b, h);
      at::Tensor pos = c.layer(l).pos[b][h].narrow(0, 0, len).to(torch::kCPU);
      return std::set<int64_t>(pos.data_ptr<int64_t>(), pos.data_ptr<int64_t>() + len);
    };
    std::vector<std::vector<std::vector<std::set<int64_t>>>> got(steps + 1, std::vector<std::vector<std::set<int64_t>>>(B, std::vector<std::set<int64_t>>(L * Hkv)));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t l = 0; l < L; ++l)
        for (int64_t h = 0; h < Hkv; ++h) got[0][b][l * Hkv + h] = kept(cache, b, l, h);
    for (int64_t s = 0; s < steps; ++s) {
      model.decode(next[s].view({B, 1}), cache, ev.observer());
      for (int64_t b = 0; b < B; ++b)
        for (int64_t l = 0; l < L; ++l)
          for (int64_t h = 0; h < Hkv; ++h) got[s + 1][b][l * Hkv + h] = kept(cache, b, l, h);
    }

    // Naive, one row at a time.
    for (int64_t b = 0; b < B; ++b) {
      struct Entry {
        int64_t pos;
        double lb;
      };
      std::vector<std::vector<Entry>> lists(L * Hkv);  // [l * H_kv + h], in cache order
      KVCache c = model.new_cache(1);
      PrefillObserver naive = [&](const PrefillLayerObservation& obs, KVCache& cc) {
        const int64_t l = obs.layer, t = obs.queries.size(2);
        at::Tensor lb = gate->log_beta(l, obs.hidden)[0].to(torch::kCPU);  // (t, H_kv)
        const int64_t next_pos = obs.query_positions[0][t - 1].item<int64_t>() + 1;
        at::Tensor idx = torch::empty({1, Hkv, M}, torch::kLong);
        bool evict = false;
        for (int64_t h = 0; h < Hkv; ++h) {
          auto& list = lists[l * Hkv + h];
          for (int64_t j = 0; j < t; ++j)
            list.push_back({obs.query_positions[0][j].item<int64_t>(), lb[j][h].item<double>()});
          if (static_cast<int64_t>(list.size()) <= M) continue;
          evict = true;
          std::vector<int64_t> order(list.size());
          for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
          auto score = [&](int64_t i) { return list[i].lb * static_cast<double>(next_pos + 1 - list[i].pos); };
          std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return score(x) > score(y); });
          order.resize(M);
          std::sort(order.begin(), order.end());
          std::vector<Entry> kept_list;
          for (int64_t i = 0; i < M; ++i) {
            idx[0][h][i] = order[i];
            kept_list.push_back(list[order[i]]);
          }
          list = kept_list;
        }
        if (evict) cc.keep(l, idx);
      };
      for (int64_t c0 = 0; c0 < lens[b]; c0 += chunk) {
        const int64_t n = std::min(chunk, lens[b] - c0);
        model.prefill(torch::tensor(std::vector<int64_t>(prompts[b].begin() + c0, prompts[b].begin() + c0 + n)).view({1, n}),
                      c, LogitsMode::LastPosition, naive);
      }
      for (int64_t s = 0; s <= steps; ++s) {
        if (s > 0) model.decode(next[s - 1][b].view({1, 1}), c, naive);
        for (int64_t l = 0; l < L; ++l)
          for (int64_t h = 0; h < Hkv; ++h) {
            std::set<int64_t> want;
            for (const Entry& e : lists[l * Hkv + h]) want.insert(e.pos);
            EXPECT_EQ(got[s][b][l * Hkv + h], want) << "M " << M << " chunk " << chunk << " row " << b << " step " << s
                                                      << " layer " << l << " head " << h;
            EXPECT_LE(static_cast<int64_t>(want.size()), M);
          }
      }
    }
  }
}

namespace {

// What generate_batch leaves: the tokens, and per (layer, row, head) the kept positions and K / V.
struct DecodeOutcome {
  BatchGenerateResult gen;
  std::vector<std::vector<std::vector<int64_t>>> pos;  // [layer][row * H_kv + h]
  std::vector<at::Tensor> k, v;                          // [layer] (B, H_kv, n, hd)
  std::vector<std::map<std::string, at::Tensor>> payload;  // [layer] name -> (B, H_kv, n), invalid entries 0
  int64_t bytes = 0, peak = 0;
  std::vector<int64_t> row_peak;
};

// A batch of 3 left-padded prompts compressed per head (AdaKV + KNorm at 0.5: ragged heads), then a question
// appended and answered greedily with `policy` evicting at `trigger`, on `path`. With a `scorer`, it replaces
// KNorm in the prompt's compression and StreamingLLM in decoding, and rates the question's entries too (on_append).
DecodeOutcome decode_with_eviction(const Model& m, DecodePolicy policy, DecodeTrigger trigger, DecodePath path,
                                   bool init_scores, const std::optional<std::vector<int64_t>>& eos,
                                   const std::shared_ptr<Scorer>& scorer = nullptr) {
  const c10::Device dev = m.device();
  const ModelConfig& c = m.config();
  torch::manual_seed(23);
  std::vector<std::vector<int64_t>> spans, rests;
  for (int64_t n : {int64_t{14}, int64_t{9}, int64_t{17}}) {
    at::Tensor t = torch::randint(3, 61, {n + 3}, torch::kLong);
    std::vector<int64_t> all(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + n + 3);
    spans.emplace_back(all.begin(), all.begin() + n);
    rests.emplace_back(all.begin() + n, all.end());
  }
  KVCache cache = m.new_cache(3);
  Method method = make_method("adakv_knorm", 0.5);
  if (scorer) method.scorer = scorer;
  compress_prefill(m, cache, spans, method);
  DecodeEvictionOptions opt;
  opt.scorer = scorer ? scorer : std::make_shared<StreamingLLMScorer>(2);
  DecodeEvictor ev(m, policy, trigger, opt);
  if (init_scores)
    for (int64_t l = 0; l < c.num_layers; ++l)
      ev.set_initial_scores(l, torch::rand({3, c.num_kv_heads, cache.max_length(l) + 3}, torch::kDouble).to(dev));
  GenerateOptions g;
  g.max_new_tokens_per_row = {7, 3, 9};
  g.eos_ids = eos;
  g.decode = path;
  g.decode_observer = ev.observer();
  g.static_evictor = ev.static_evictor();
  if (scorer) g.prefill_observer = [&](const PrefillLayerObservation& obs, KVCache& c) { scorer->on_append(obs, c); };
  DecodeOutcome out;
  out.gen = generate_batch(m, rests, cache, g);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    out.pos.emplace_back();
    for (int64_t b = 0; b < 3; ++b)
      for (int64_t h = 0; h < c.num_kv_heads; ++h) out.pos.back().push_back(head_positions(cache, l, b, h));
    const KVLayerView kv = cache.layer(l);
    out.k.push_back(kv.k.clone());
    out.v.push_back(kv.v.clone());
    out.payload.emplace_back();
    for (const auto& [name, col] : kv.payload)
      out.payload.back()[name] = kv.valid.defined() ? col.masked_fill(kv.valid.logical_not(), 0) : col.clone();
  }
  out.bytes = cache.bytes();
  out.peak = cache.peak_bytes();
  for (int64_t b = 0; b < 3; ++b) out.row_peak.push_back(cache.row_peak_bytes(b));
  return out;
}

}  // namespace

// The fixed-shape form of every policy (H2O with and without initial scores, TOVA, LazyEviction, StreamingLLM as a
// FixedShape scorer), at every step down to the prompt's counts (one eviction per step) and at longer intervals or
// explicit targets (several per trigger, finished rows included), leaves exactly what the cache path leaves: the
// same tokens, kept positions per head (rows ragged per head, stopping at different steps on limits and on an eos
// token), K / V, bytes and peaks.
TEST(DecodeEviction, FixedShapeEqualsCachePath) {
  const Model& m = model64();
  struct Case {
    DecodePolicy policy;
    DecodeTrigger trigger;
    bool init;
  };
  const std::vector<Case> cases = {
      {DecodePolicy::H2O, {1, 0}, false},          {DecodePolicy::H2O, {1, 0}, true},
      {DecodePolicy::TOVA, {1, 0}, false},         {DecodePolicy::Scorer, {1, 0}, false},
      {DecodePolicy::LazyEviction, {4, 0}, false}, {DecodePolicy::LazyEviction, {1, 0}, false},
      {DecodePolicy::TOVA, {3, 0}, false},         {DecodePolicy::H2O, {2, 5}, true},
      {DecodePolicy::Scorer, {2, 4}, false}};
  for (const Case& cs : cases) {
    const std::string name = "policy " + std::to_string(static_cast<int>(cs.policy)) + " every " +
                             std::to_string(cs.trigger.interval) + " to " + std::to_string(cs.trigger.target) +
                             (cs.init ? " init" : "");
    const DecodeOutcome plain =
        decode_with_eviction(m, cs.policy, cs.trigger, DecodePath::Cache, cs.init, std::vector<int64_t>{});
    ASSERT_GE(plain.gen.tokens[2].size(), 4u);
    // An eos that stops row 2 early (its fourth token), so rows stop on eos as well as on their limits.
    for (const std::optional<std::vector<int64_t>>& eos :
         {std::optional<std::vector<int64_t>>(std::vector<int64_t>{}),
          std::optional<std::vector<int64_t>>(std::vector<int64_t>{plain.gen.tokens[2][3]})}) {
      const DecodeOutcome a = decode_with_eviction(m, cs.policy, cs.trigger, DecodePath::Cache, cs.init, eos);
      const DecodeOutcome b = decode_with_eviction(m, cs.policy, cs.trigger, DecodePath::Static, cs.init, eos);
      const std::string what = name + (eos->empty() ? "" : " eos");
      EXPECT_EQ(a.gen.decode, DecodePath::Cache);
      EXPECT_EQ(b.gen.decode, DecodePath::Static) << what;
      EXPECT_EQ(a.gen.tokens, b.gen.tokens) << what;
      EXPECT_EQ(a.gen.stop, b.gen.stop) << what;
      EXPECT_EQ(a.pos, b.pos) << what;
      for (size_t l = 0; l < a.k.size(); ++l) {
        ASSERT_EQ(a.k[l].sizes(), b.k[l].sizes()) << what;
        EXPECT_TRUE(torch::allclose(a.k[l], b.k[l], 0, 1e-12)) << what << " layer " << l;
        EXPECT_TRUE(torch::allclose(a.v[l], b.v[l], 0, 1e-12)) << what << " layer " << l;
      }
      EXPECT_EQ(a.bytes, b.bytes) << what;
      EXPECT_EQ(a.peak, b.peak) << what;
      EXPECT_EQ(a.row_peak, b.row_peak) << what;
    }
    // The check can fail: decoding evicted prompt entries, so positions differ from a decode that does not evict.
    bool evicted = false;
    for (const auto& layer : plain.pos)
      for (const auto& head : layer)
        for (size_t j = 1; j < head.size(); ++j) evicted = evicted || head[j] != head[j - 1] + 1;
    EXPECT_TRUE(evicted) << name;
  }
}

// The learned scorers whose per-entry state is a function of each token's attention input (TRIM-KV's log β, KVzap's
// predicted score, DMS's keep probability) or of it and the row's earlier tokens (the Attention-Gate) decode in
// fixed-shape steps: the state computes each step's value into its payload slots, and the decoded cache equals the
// cache path's, payload columns included (every decoded entry's value was written: none is 0).
TEST(DecodeEviction, PayloadScorersDecodeInFixedShapeSteps) {
  const Model& m = model64();
  const ModelConfig& cfg = m.config();
  torch::manual_seed(5);
  RetentionGateOptions go;
  go.hidden = 16;
  go.bias_init = 0.5;
  go.init_std = 0.4;
  RetentionGate gate(cfg, go);
  KVzapOptions zo;
  zo.hidden = 16;
  zo.window = 2;
  KVzap kvzap(cfg, zo);
  DMSOptions dmo;
  dmo.window = 2;
  dmo.bias_init = 0.0;
  dmo.init_std = 0.5;
  DMS dms(cfg, dmo);
  // The Attention-Gate's values also depend on every earlier token (its block attends over them): its keys and
  // values by position are per-row state in the cache, sized for every step before the first fixed-shape step.
  AttentionGateOptions ao;
  ao.init_std = 0.3;
  ao.bias_init = 0.5;
  ao.sinks = 1;  // (4 sinks would be all that a target of 4 keeps)
  AttentionGate ag(cfg, ao);
  gate->to(torch::kDouble);
  const std::vector<std::pair<std::string, std::shared_ptr<Scorer>>> scorers = {
      {"log_beta", std::shared_ptr<Scorer>(gate->make_scorer())},
      {"kvzap", std::shared_ptr<Scorer>(kvzap->make_scorer())},
      {"dms_keep", std::shared_ptr<Scorer>(dms->make_scorer())},
      {"attention_gate_keep", std::shared_ptr<Scorer>(ag->make_scorer())}};
  for (const auto& [column, scorer] : scorers) {
    EXPECT_EQ(scorer->needs().fixed_shape, FixedShape::Yes) << column;
    for (const DecodeTrigger trig : {DecodeTrigger{1, 0}, DecodeTrigger{2, 4}}) {
      const std::string what = column + " every " + std::to_string(trig.interval) + " to " + std::to_string(trig.target);
      const DecodeOutcome a = decode_with_eviction(m, DecodePolicy::Scorer, trig, DecodePath::Cache, false, {}, scorer);
      const DecodeOutcome b = decode_with_eviction(m, DecodePolicy::Scorer, trig, DecodePath::Static, false, {}, scorer);
      EXPECT_EQ(b.gen.decode, DecodePath::Static) << what;
      EXPECT_EQ(a.gen.tokens, b.gen.tokens) << what;
      EXPECT_EQ(a.pos, b.pos) << what;
      bool evicted_decoded = false;  // a decoded entry was evicted: the scorer ranked decode-time values
      for (size_t l = 0; l < a.k.size(); ++l) {
        ASSERT_EQ(a.k[l].sizes(), b.k[l].sizes()) << what;
        EXPECT_TRUE(torch::allclose(a.k[l], b.k[l], 0, 1e-12)) << what << " layer " << l;
        ASSERT_TRUE(a.payload[l].count(column) && b.payload[l].count(column)) << what;
        const at::Tensor pa = a.payload[l].at(column), pb = b.payload[l].at(column);
        EXPECT_TRUE(torch::equal(pa, pb)) << what << " layer " << l;
        // Every held entry carries its own value, the decoded ones included (the fill is 0).
        const at::Tensor rows = pb.reshape({-1, pb.size(2)});  // (B * H_kv, n)
        for (int64_t r = 0; r < rows.size(0); ++r) {
          const std::vector<int64_t>& held = a.pos[l][r];
          for (size_t j = 0; j < held.size(); ++j)
            EXPECT_NE(rows[r][static_cast<int64_t>(j)].item<double>(), 0.0)
                << what << " layer " << l << " head row " << r << " entry " << j;
          // The row's decoded tokens sit at positions >= its prompt (span + question of 3): a gap among those held
          // is a decoded entry evicted.
          const int64_t first = std::vector<int64_t>{17, 12, 20}[r / cfg.num_kv_heads];
          int64_t count = 0, top = first - 1;
          for (int64_t p : held)
            if (p >= first) ++count, top = std::max(top, p);
          evicted_decoded = evicted_decoded || count < top - first + 1;
        }
      }
      EXPECT_TRUE(evicted_decoded) << what;
      EXPECT_EQ(a.bytes, b.bytes) << what;
      EXPECT_EQ(a.peak, b.peak) << what;
      EXPECT_EQ(a.row_peak, b.row_peak) << what;
    }
  }
}

// On a GPU, the CUDA graph's replays evict exactly as the eager fixed-shape steps.
TEST(DecodeEviction, FixedShapeGraphReplaysTheEagerSteps) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  const Model m = tiny_model(torch::kFloat, 7, torch::kCUDA);
  for (const auto& [pol, trig] : std::vector<std::pair<DecodePolicy, DecodeTrigger>>{
           {DecodePolicy::H2O, {1, 0}}, {DecodePolicy::TOVA, {1, 0}}, {DecodePolicy::Scorer, {1, 0}},
           {DecodePolicy::LazyEviction, {4, 0}}, {DecodePolicy::H2O, {2, 5}}}) {
    const bool init = pol == DecodePolicy::H2O;
    const DecodeOutcome a = decode_with_eviction(m, pol, trig, DecodePath::Static, init, std::nullopt);
    const DecodeOutcome b = decode_with_eviction(m, pol, trig, DecodePath::Graph, init, std::nullopt);
    EXPECT_EQ(b.gen.decode, DecodePath::Graph);
    EXPECT_EQ(a.gen.tokens, b.gen.tokens) << "policy " << static_cast<int>(pol);
    EXPECT_EQ(a.pos, b.pos) << "policy " << static_cast<int>(pol);
    for (size_t l = 0; l < a.k.size(); ++l) EXPECT_TRUE(torch::equal(a.k[l], b.k[l])) << "layer " << l;
    EXPECT_EQ(a.row_peak, b.row_peak);
  }
  // The Attention-Gate: the replays write its per-row state (keys and values by position) in place.
  AttentionGateOptions ao;
  ao.init_std = 0.3;
  ao.bias_init = 0.5;
  AttentionGate ag(m.config(), ao);
  ag->to(torch::kCUDA);
  const std::shared_ptr<Scorer> sc(ag->make_scorer());
  const DecodeOutcome a = decode_with_eviction(m, DecodePolicy::Scorer, {1, 0}, DecodePath::Static, false, {}, sc);
  const DecodeOutcome b = decode_with_eviction(m, DecodePolicy::Scorer, {1, 0}, DecodePath::Graph, false, {}, sc);
  EXPECT_EQ(b.gen.decode, DecodePath::Graph);
  EXPECT_EQ(a.gen.tokens, b.gen.tokens);
  EXPECT_EQ(a.pos, b.pos);
  for (size_t l = 0; l < a.k.size(); ++l)
    EXPECT_TRUE(torch::equal(a.payload[l].at("attention_gate_keep"), b.payload[l].at("attention_gate_keep")))
        << "layer " << l;
}

// Every policy has a fixed-shape form, except a scorer that is not FixedShape::Yes or reads decode queries (a
// window); those keep the cache path, and asking for the static path without a form is refused.
TEST(DecodeEviction, FixedShapeFormOnlyWhereItApplies) {
  const Model& m = model64();
  DecodeEvictionOptions knorm, snap, streaming;
  knorm.scorer = std::make_shared<KNormScorer>();
  snap.scorer = std::make_shared<SnapKVScorer>(SnapKVOptions{2, 3, GroupReduce::Mean});
  streaming.scorer = std::make_shared<StreamingLLMScorer>(2);
  EXPECT_TRUE(static_cast<bool>(DecodeEvictor(m, DecodePolicy::TOVA, {1, 0}).static_evictor()));
  EXPECT_TRUE(static_cast<bool>(DecodeEvictor(m, DecodePolicy::TOVA, {2, 0}).static_evictor()));
  EXPECT_TRUE(static_cast<bool>(DecodeEvictor(m, DecodePolicy::H2O, {1, 5}).static_evictor()));
  EXPECT_TRUE(static_cast<bool>(DecodeEvictor(m, DecodePolicy::LazyEviction, {16, 0}).static_evictor()));
  EXPECT_TRUE(static_cast<bool>(DecodeEvictor(m, DecodePolicy::Scorer, {3, 0}, streaming).static_evictor()));
  EXPECT_FALSE(static_cast<bool>(DecodeEvictor(m, DecodePolicy::Scorer, {1, 0}, knorm).static_evictor()));
  EXPECT_FALSE(static_cast<bool>(DecodeEvictor(m, DecodePolicy::Scorer, {1, 0}, snap).static_evictor()));
  DecodeEvictor ev(m, DecodePolicy::Scorer, {1, 0}, knorm);
  GenerateOptions g;
  g.max_new_tokens = 3;
  g.decode_observer = ev.observer();
  g.static_evictor = ev.static_evictor();
  g.decode = DecodePath::Static;
  EXPECT_THROW(generate_batch(m, {{3, 4, 5}}, g), std::exception);
  g.decode = DecodePath::Auto;  // the CPU: Auto is the cache path
  EXPECT_EQ(generate_batch(m, {{3, 4, 5}}, g).decode, DecodePath::Cache);
}
