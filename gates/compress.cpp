#include "gates/compress.h"

#include <algorithm>
#include <sstream>

#include <torch/torch.h>

#include "common/error.h"
#include "gates/heuristics.h"
#include "models/kv_cache.h"
#include "models/model.h"

namespace kvd {
namespace {

const std::vector<std::string> kBase = {"random",    "knorm", "streaming_llm", "h2o",     "observed_attention",
                                        "snapkv",    "pyramidkv", "tova",      "keydiff", "expected_attention",
                                        "defensivekv", "layer_defensivekv"};

std::unique_ptr<Scorer> make_base(const std::string& name, uint64_t seed) {
  if (name == "random") return std::make_unique<RandomScorer>(seed);
  if (name == "knorm") return std::make_unique<KNormScorer>();
  if (name == "streaming_llm") return std::make_unique<StreamingLLMScorer>();
  if (name == "h2o") return std::make_unique<H2OScorer>(H2ONorm::Sum);
  if (name == "observed_attention") return std::make_unique<H2OScorer>(H2ONorm::PerObservingQuery);
  if (name == "snapkv" || name == "pyramidkv") return std::make_unique<SnapKVScorer>();
  if (name == "tova") return std::make_unique<TOVAScorer>();
  if (name == "keydiff") return std::make_unique<KeyDiffScorer>();
  if (name == "expected_attention") return std::make_unique<ExpectedAttentionScorer>();
  if (name == "defensivekv" || name == "layer_defensivekv") return std::make_unique<DefensiveKVScorer>();
  return nullptr;
}

std::string known_list() {
  std::ostringstream os;
  for (size_t i = 0; i < kBase.size(); ++i) os << (i ? ", " : "") << kBase[i];
  os << " (prefixes: adakv_, criticalkv_, global_)";
  return os.str();
}

bool starts_with(const std::string& s, const std::string& p) { return s.rfind(p, 0) == 0; }

}  // namespace

std::vector<std::string> method_names() { return kBase; }

Method make_method(const std::string& name, double ratio, uint64_t seed) {
  KVD_CHECK(ratio >= 0.0 && ratio < 1.0, "--ratio must lie in [0, 1) (the fraction of tokens removed, as in kvpress), got ",
            ratio);
  Method m;
  m.name = name;
  m.selector.budget = Budget::ratio(ratio);
  std::string base = name;
  bool critical = false;
  for (;;) {
    if (starts_with(base, "adakv_")) {
      m.selector.allocation = Allocation::AdaKV;
      base = base.substr(6);
    } else if (starts_with(base, "global_")) {
      m.selector.allocation = Allocation::Global;
      base = base.substr(7);
    } else if (starts_with(base, "criticalkv_")) {
      critical = true;
      base = base.substr(11);
    } else {
      break;
    }
  }
  m.scorer = make_base(base, seed);
  KVD_CHECK(m.scorer != nullptr, "unknown method '", name, "'; known: ", known_list());
  if (base == "pyramidkv") {
    KVD_CHECK(m.selector.allocation == Allocation::Uniform, "pyramidkv sets its own layer budgets; it takes no prefix");
    m.selector.allocation = Allocation::Pyramid;
    m.selector.pyramid_window = static_cast<SnapKVScorer*>(m.scorer.get())->options().window;
  }
  if (base == "defensivekv" || base == "layer_defensivekv") {
    KVD_CHECK(m.selector.allocation == Allocation::Uniform, base, " sets its own budgets; it takes no prefix");
    m.selector.allocation = base == "defensivekv" ? Allocation::AdaKV : Allocation::Global;
  }
  if (critical) m.scorer = std::make_unique<CriticalKVScorer>(std::move(m.scorer), ratio);
  return m;
}

CompressStats compress_prefill(const Model& model, KVCache& cache, const at::Tensor& ids, Method& method) {
  KVD_CHECK(ids.dim() == 2 && ids.size(0) == 1, "compress_prefill: ids must be (1, T), got ", ids.sizes());
  KVD_CHECK(cache.max_length(0) == 0, "compress_prefill: the cache must be empty");
  const int64_t L = model.config().num_layers, T = ids.size(1);
  const ScorerNeeds needs = method.scorer->needs();
  const bool global = method.selector.allocation == Allocation::Global;
  std::vector<at::Tensor> all_scores(L);  // [layer] (B, H_kv, n), global allocation only

  PrefillObserver observer = [&](const PrefillLayerObservation& obs, KVCache& c) {
    const KVLayerView kv = c.layer(obs.layer);
    LayerView view;
    view.layer = obs.layer;
    view.model = &model;
    view.keys = kv.k;         // (B, H_kv, n, hd)
    view.values = kv.v;       // (B, H_kv, n, hd)
    view.positions = kv.pos;  // (B, H_kv, n)
    view.valid = kv.valid;    // (B, H_kv, n) or undefined
    const int64_t Tc = obs.queries.size(2);
    view.next_position = obs.query_positions[0][Tc - 1].item<int64_t>() + 1;
    if (needs.hidden) view.hidden = obs.hidden;  // (B, T, d)
    if (needs.window > 0) {
      const int64_t w = std::min(needs.window, Tc);
      view.window_queries = obs.queries.narrow(2, Tc - w, w);           // (B, H, w, hd)
      view.window_positions = obs.query_positions.narrow(1, Tc - w, w);  // (B, w)
    }
    if (needs.queries_pre_rope) view.queries_pre_rope = obs.queries_pre_rope;  // (B, H, T, hd)
    at::Tensor s = method.scorer->score(view);  // (B, H_kv, n)
    if (kv.valid.defined()) s = s.masked_fill(kv.valid.logical_not(), -std::numeric_limits<float>::infinity());
    if (global) {
      all_scores[obs.layer] = s;
      return;
    }
    c.keep(obs.layer, select_layer(s, obs.layer, L, method.selector));
  };

  CompressStats st;
  st.tokens = T;
  st.full_bytes = T * cache.num_kv_heads() * cache.batch() * L * cache.bytes_per_entry();
  model.prefill(ids, cache, LogitsMode::LastPosition, observer);
  if (global) {
    std::vector<RaggedIndices> keep = select_all(all_scores, method.selector);
    for (int64_t l = 0; l < L; ++l) cache.keep(l, keep[l]);
  }
  st.kept_bytes = cache.bytes();
  st.peak_bytes = cache.peak_bytes();
  st.allocated_bytes = cache.allocated_bytes();
  return st;
}

}  // namespace kvd
