#include "gates/compress.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>

#include <torch/torch.h>

#include "common/error.h"
#include "gates/heuristics.h"
#include "models/generate.h"
#include "models/kv_cache.h"
#include "models/model.h"

namespace kvd {
namespace {

const std::vector<std::string> kBase = {"random",    "knorm", "streaming_llm", "h2o",     "observed_attention",
                                        "snapkv",    "pyramidkv", "tova",      "keydiff", "expected_attention",
                                        "defensivekv", "layer_defensivekv", "cake"};

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
  if (name == "cake") return std::make_unique<CakeScorer>();
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
  KVD_CHECK(std::isfinite(ratio) && ratio >= 0.0 && ratio < 1.0,
            "--ratio must lie in [0, 1) (the fraction of tokens removed, as in kvpress), got ", ratio);
  return make_method(name, Budget::ratio(ratio), seed);
}

Method make_method(const std::string& name, const Budget& budget, uint64_t seed) {
  switch (budget.kind) {
    case BudgetKind::Ratio:
      KVD_CHECK(std::isfinite(budget.value) && budget.value >= 0.0 && budget.value < 1.0,
                "--ratio must lie in [0, 1) (the fraction of tokens removed, as in kvpress), got ", budget.value);
      break;
    case BudgetKind::TokensPerHead:
      KVD_CHECK(std::isfinite(budget.value) && budget.value >= 1.0 && budget.value == std::floor(budget.value),
                "--budget-tokens must be a positive whole number of tokens per KV head, got ", budget.value);
      break;
    case BudgetKind::Threshold:
      KVD_CHECK(std::isfinite(budget.value), "--threshold must be a finite score, got ", budget.value);
      break;
  }
  Method m;
  m.name = name;
  m.selector.budget = budget;
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
  KVD_CHECK(m.scorer != nullptr, "--method: unknown method '", name, "'; known: ", known_list());
  if (base == "pyramidkv") {
    KVD_CHECK(m.selector.allocation == Allocation::Uniform, "pyramidkv sets its own layer budgets; it takes no prefix");
    KVD_CHECK(budget.kind == BudgetKind::Ratio, "pyramidkv's layer budgets need --ratio");
    m.selector.allocation = Allocation::Pyramid;
    m.selector.pyramid_window = static_cast<SnapKVScorer*>(m.scorer.get())->options().window;
  }
  if (base == "defensivekv" || base == "layer_defensivekv") {
    KVD_CHECK(m.selector.allocation == Allocation::Uniform, base, " sets its own budgets; it takes no prefix");
    m.selector.allocation = base == "defensivekv" ? Allocation::AdaKV : Allocation::Global;
  }
  if (base == "cake") {
    KVD_CHECK(m.selector.allocation == Allocation::Uniform && !critical, "cake sets its own layer budgets; it takes no prefix");
    KVD_CHECK(budget.kind != BudgetKind::Threshold, "cake splits a token budget over layers: use --ratio or --budget-tokens");
    m.selector.allocation = Allocation::Cake;
  }
  if (critical) {
    KVD_CHECK(budget.kind == BudgetKind::Ratio, "criticalkv_ splits its budget by a ratio: use --ratio");
    m.scorer = std::make_unique<CriticalKVScorer>(std::move(m.scorer), budget.value);
  }
  return m;
}

namespace {

// Per batch row state of CAKE's cascade: each layer's preference and the scores of the entries it still
// holds (compacted with them, so a later cut uses the scores the entries were kept with).
struct CakeRow {
  std::vector<double> pref;        // [layer]
  std::vector<at::Tensor> scores;  // [layer] (1, H_kv, count)
  std::vector<int64_t> count;      // [layer] entries per head
};

// Row b's lengths of one layer: [h].
std::vector<int64_t> row_lengths(const KVCache& c, int64_t layer, int64_t b) {
  const auto& len = c.lengths(layer);
  const int64_t H = c.num_kv_heads();
  return std::vector<int64_t>(len.begin() + b * H, len.begin() + (b + 1) * H);
}

}  // namespace

CompressStats compress_prefill(const Model& model, KVCache& cache, const at::Tensor& ids, Method& method) {
  KVD_CHECK(ids.dim() == 2 && ids.size(0) == 1, "compress_prefill: ids must be (1, T), got ", ids.sizes());
  at::Tensor c = ids.to(torch::kCPU).to(torch::kLong).contiguous();  // (1, T)
  std::vector<std::vector<int64_t>> prompts{std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.size(1))};
  return compress_prefill(model, cache, prompts, method);
}

CompressStats compress_prefill(const Model& model, KVCache& cache, const std::vector<std::vector<int64_t>>& prompts,
                               Method& method, const CompressOptions& opts) {
  const int64_t B = static_cast<int64_t>(prompts.size());
  KVD_CHECK(B > 0, "compress_prefill: no prompts");
  KVD_CHECK(cache.batch() == B, "compress_prefill: the cache has batch ", cache.batch(), " but there are ", B,
            " prompts; create it with model.new_cache(", B, ")");
  for (int64_t l = 0; l < cache.num_layers(); ++l)
    KVD_CHECK(cache.max_length(l) == 0, "compress_prefill: the cache must be empty");
  KVD_CHECK(opts.chunk_size >= 0, "--chunk-size must be >= 0 (0: compress once after the whole prefill), got ",
            opts.chunk_size);
  const int64_t L = model.config().num_layers, Hkv = cache.num_kv_heads();
  const ScorerNeeds needs = method.scorer->needs();
  const SelectorOptions& sel = method.selector;
  const bool global = sel.allocation == Allocation::Global;
  const bool cake = sel.allocation == Allocation::Cake;
  std::vector<int64_t> lens(B);
  int64_t T = 0;
  for (int64_t b = 0; b < B; ++b) {
    lens[b] = static_cast<int64_t>(prompts[b].size());
    KVD_CHECK(lens[b] > 0, "compress_prefill: prompt ", b, " is empty");
    T = std::max(T, lens[b]);
  }
  const int64_t chunk = opts.chunk_size > 0 ? opts.chunk_size : T;
  const int64_t n_chunks = (T + chunk - 1) / chunk;
  KVD_CHECK(!(cake && n_chunks > 1), "--chunk-size: cake's cascade runs once per prefill; use --chunk-size 0 or >= ",
            T);
  if (n_chunks > 1 && needs.window > 0 && needs.window != ScorerNeeds::kAllRows)
    KVD_CHECK(chunk >= needs.window, "--chunk-size ", chunk, " is shorter than ", method.scorer->name(),
              "'s observation window (", needs.window, " rows); use at least ", needs.window);

  std::vector<int64_t> seen(B, 0);                     // [row] tokens prefilled so far
  std::vector<int64_t> fresh(B, 0);                    // [row] tokens of the current chunk
  std::vector<std::vector<at::Tensor>> g_scores(B), g_valid(B);  // [row][layer], global allocation
  std::vector<CakeRow> cake_rows(cake ? B : 0);
  for (CakeRow& r : cake_rows) {
    r.pref.assign(L, 0.0);
    r.scores.assign(L, at::Tensor());
    r.count.assign(L, 0);
  }
  std::vector<int64_t> lead;  // [row] leading padding of the current chunk
  // Chunked prefill: each row's last `window` post-RoPE queries and positions of every layer, carried over so
  // that a chunk shorter than the window (the last one) still gets a full observation window.
  const bool carry = n_chunks > 1 && needs.window > 0 && needs.window != ScorerNeeds::kAllRows;
  std::vector<std::vector<at::Tensor>> win_q(B, std::vector<at::Tensor>(L)), win_p(B, std::vector<at::Tensor>(L));
  const float ninf = -std::numeric_limits<float>::infinity();

  PrefillObserver observer = [&](const PrefillLayerObservation& obs, KVCache& c) {
    const int64_t l = obs.layer;
    const KVLayerView kv = c.layer(l);
    const int64_t Tc = obs.queries.size(2);
    std::vector<RaggedIndices> parts(B);
    bool any = false;
    for (int64_t b = 0; b < B; ++b) {
      const std::vector<int64_t> rl = row_lengths(c, l, b);
      if (fresh[b] == 0) {  // an all-padding chunk for this row: nothing new to score
        parts[b] = ragged_keep_all(rl);
        continue;
      }
      const int64_t lb = lead.empty() ? 0 : lead[b], nq = Tc - lb;
      const int64_t nb = *std::max_element(rl.begin(), rl.end());
      const bool ragged = std::any_of(rl.begin(), rl.end(), [&](int64_t x) { return x != nb; });
      // Row b alone, as a batch-1 view: its entries and its non-padding rows.
      LayerView view;
      view.layer = l;
      view.model = &model;
      view.keys = kv.k.narrow(0, b, 1).narrow(2, 0, nb);         // (1, H_kv, n_b, hd)
      view.values = kv.v.narrow(0, b, 1).narrow(2, 0, nb);       // (1, H_kv, n_b, hd)
      view.positions = kv.pos.narrow(0, b, 1).narrow(2, 0, nb);  // (1, H_kv, n_b)
      if (ragged) view.valid = kv.valid.narrow(0, b, 1).narrow(2, 0, nb);  // (1, H_kv, n_b)
      at::Tensor qpos = obs.query_positions.narrow(0, b, 1);               // (1, Tc)
      view.next_position = qpos[0][Tc - 1].item<int64_t>() + 1;
      if (needs.hidden) view.hidden = obs.hidden.narrow(0, b, 1).narrow(1, lb, nq);  // (1, nq, d)
      if (needs.window > 0) {
        const int64_t w = std::min(needs.window, nq);
        view.window_queries = obs.queries.narrow(0, b, 1).narrow(2, Tc - w, w);  // (1, H, w, hd)
        view.window_positions = qpos.narrow(1, Tc - w, w);                       // (1, w)
        if (carry) {
          if (w < needs.window && win_q[b][l].defined()) {
            view.window_queries = torch::cat({win_q[b][l], view.window_queries}, 2);        // (1, H, w' + w, hd)
            view.window_positions = torch::cat({win_p[b][l], view.window_positions}, 1);  // (1, w' + w)
            const int64_t have = view.window_queries.size(2), keep = std::min(have, needs.window);
            view.window_queries = view.window_queries.narrow(2, have - keep, keep);
            view.window_positions = view.window_positions.narrow(1, have - keep, keep);
          }
          win_q[b][l] = view.window_queries.clone();
          win_p[b][l] = view.window_positions.clone();
        }
      }
      if (needs.queries_pre_rope) view.queries_pre_rope = obs.queries_pre_rope.narrow(0, b, 1).narrow(2, lb, nq);  // (1, H, nq, hd)
      at::Tensor s = method.scorer->score(view).to(torch::kFloat);  // (1, H_kv, n_b)
      if (ragged) s = s.masked_fill(view.valid.logical_not(), ninf);
      if (global) {
        g_scores[b][l] = s;
        g_valid[b][l] = view.valid;
        parts[b] = ragged_keep_all(rl);
        continue;
      }
      if (cake) {
        const std::vector<double> p = method.scorer->layer_preference();
        KVD_CHECK(p.size() == 1, "the cake allocation needs a scorer with a layer preference (", method.scorer->name(),
                  " has none)");
        CakeRow& cr = cake_rows[b];
        cr.pref[l] = p[0];
        cr.scores[l] = s;
        cr.count[l] = nb;
        parts[b] = ragged_keep_all(rl);  // replaced below by the cascade
        continue;
      }
      parts[b] = select_layer(s, l, L, sel, seen[b], view.valid);
      any = true;
    }
    if (cake) {
      // Cascade (CAKE paper's form): after layer l, the whole L·B per head is re-split over layers 0..l in
      // proportion to P (cake_layer_budgets, rounded down), and every layer already compacted is cut to its
      // new budget by the scores it was kept with. The water level only falls as layers join, so budgets only
      // shrink, the cache never holds more than L·B entries per head (plus layer l's full prompt while it is
      // being scored), and each layer ends with the top B_l of its own scores, B_l from the final P. (Re-
      // splitting (l+1)·B instead would let an earlier layer's budget grow back after it had evicted.)
      std::vector<std::vector<RaggedIndices>> cut(l + 1, std::vector<RaggedIndices>(B));  // [layer][row]
      std::vector<bool> changed(l + 1, false);
      for (int64_t b = 0; b < B; ++b) {
        CakeRow& cr = cake_rows[b];
        const Budget& bud = sel.budget;
        const int64_t per_head = bud.kind == BudgetKind::Ratio && bud.value == 0.0 ? seen[b] : bud.n_kept(seen[b]);
        const std::vector<int64_t> budgets =
            cake_layer_budgets(std::vector<double>(cr.pref.begin(), cr.pref.begin() + l + 1), L * per_head, seen[b]);
        for (int64_t i = 0; i <= l; ++i) {
          const int64_t k = std::min(budgets[i], cr.count[i]);
          if (k == cr.count[i]) {
            cut[i][b] = ragged_keep_all(row_lengths(c, i, b));
            continue;
          }
          at::Tensor mask = topk_mask(cr.scores[i], k);  // (1, H_kv, count)
          cut[i][b] = ragged_from_mask(mask);
          cr.scores[i] = cr.scores[i].masked_select(mask).view({1, Hkv, k});  // (1, H_kv, k)
          cr.count[i] = k;
          changed[i] = true;
        }
      }
      for (int64_t i = 0; i <= l; ++i)
        if (changed[i]) c.keep(i, concat_ragged(cut[i]));
      return;
    }
    if (any) c.keep(l, concat_ragged(parts));
  };

  if (global)
    for (int64_t b = 0; b < B; ++b) g_scores[b].assign(L, at::Tensor()), g_valid[b].assign(L, at::Tensor());
  for (int64_t ci = 0; ci < n_chunks; ++ci) {
    std::vector<std::vector<int64_t>> pieces(B);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t s0 = std::min(ci * chunk, lens[b]), s1 = std::min((ci + 1) * chunk, lens[b]);
      pieces[b].assign(prompts[b].begin() + s0, prompts[b].begin() + s1);
      fresh[b] = s1 - s0;
      seen[b] += fresh[b];
    }
    at::Tensor ids = left_pad(pieces, 0, lead);  // (B, Tc)
    if (std::all_of(lead.begin(), lead.end(), [](int64_t x) { return x == 0; })) lead.clear();
    model.prefill(ids, cache, LogitsMode::LastPosition, observer, lead);
    if (global) {
      // One budget across layers, per row: L · H_kv · n_kept(tokens so far) entries.
      std::vector<std::vector<RaggedIndices>> keep(L, std::vector<RaggedIndices>(B));  // [layer][row]
      for (int64_t b = 0; b < B; ++b) {
        if (fresh[b] == 0) {
          for (int64_t l = 0; l < L; ++l) keep[l][b] = ragged_keep_all(row_lengths(cache, l, b));
          continue;
        }
        bool ragged = false;
        for (const at::Tensor& v : g_valid[b]) ragged = ragged || v.defined();
        std::vector<RaggedIndices> r = select_all(g_scores[b], sel, seen[b], ragged ? g_valid[b] : std::vector<at::Tensor>{});
        for (int64_t l = 0; l < L; ++l) keep[l][b] = r[l];
      }
      for (int64_t l = 0; l < L; ++l) cache.keep(l, concat_ragged(keep[l]));
      for (auto& row : g_scores) row.assign(L, at::Tensor());
      for (auto& row : g_valid) row.assign(L, at::Tensor());
    }
  }

  CompressStats st;
  const int64_t bpe = cache.bytes_per_entry();
  for (int64_t b = 0; b < B; ++b) {
    RowCompressStats r;
    r.tokens = lens[b];
    r.full_bytes = lens[b] * Hkv * L * bpe;
    r.kept_bytes = cache.row_bytes(b);
    r.peak_bytes = cache.row_peak_bytes(b);
    r.kept_fraction = static_cast<double>(r.kept_bytes) / static_cast<double>(std::max<int64_t>(1, r.full_bytes));
    st.tokens += r.tokens;
    st.full_bytes += r.full_bytes;
    st.rows.push_back(r);
  }
  st.kept_bytes = cache.bytes();
  st.peak_bytes = cache.peak_bytes();
  st.allocated_bytes = cache.allocated_bytes();
  return st;
}

}  // namespace kvd
