#include "gates/compress.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include <torch/torch.h>

#include "common/error.h"
#include "gates/allocation.h"
#include "gates/heuristics.h"
#include "models/device.h"
#include "models/generate.h"
#include "models/kv_cache.h"
#include "models/model.h"
#include "models/profile.h"

namespace kvd {

CompressStats compress_prefill(const Model& model, KVCache& cache, const at::Tensor& ids, Method& method) {
  KVD_CHECK(ids.dim() == 2 && ids.size(0) == 1, "compress_prefill: ids must be (1, T), got ", ids.sizes());
  at::Tensor c = ids.to(torch::kCPU).to(torch::kLong).contiguous();  // (1, T)
  std::vector<std::vector<int64_t>> prompts{std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.size(1))};
  return compress_prefill(model, cache, prompts, method);
}

namespace {

// The stats of a compressed cache holding rows of lens[b] prompt tokens.
CompressStats cache_stats(const KVCache& cache, const std::vector<int64_t>& lens, int64_t L) {
  CompressStats st;
  const int64_t bpe = cache.bytes_per_entry(), Hkv = cache.num_kv_heads();
  for (size_t b = 0; b < lens.size(); ++b) {
    RowCompressStats r;
    r.tokens = lens[b];
    r.full_bytes = lens[b] * Hkv * L * bpe;
    r.kept_bytes = cache.row_bytes(static_cast<int64_t>(b));
    r.peak_bytes = cache.row_peak_bytes(static_cast<int64_t>(b));
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

// Who scores which caches of one prefill: caches [first, first + count), scored by its one scorer (the scores shared
// by those caches' budgets) or by one scorer per cache (each budget's own; Scorer::score_budgets computes what they
// share once). Every unit's scorer observes the same prefill through a view built for its own ScorerNeeds.
struct ScoringUnit {
  size_t first = 0, count = 0;
  std::vector<Scorer*> scorers;
};

// The prefill of compress_prefill and compress_prefill_many: prompts prefilled into *caches[0] and scored unit by
// unit: caches t > 0 receive a copy of each layer before any is compacted, and each unit scores its layer from its
// first cache's (still whole) copy and compresses its caches t under selectors[t]. Every scorer of `observers`
// (those, and each other budget's own) sees every appended layer (Scorer::on_append), so that each budget's scorer
// holds the prefill's state when it goes on to evict while decoding.
std::vector<CompressStats> compress_impl(const Model& model, const std::vector<KVCache*>& caches,
                                         const std::vector<std::vector<int64_t>>& prompts,
                                         const std::vector<ScoringUnit>& units, const std::vector<Scorer*>& observers,
                                         const std::vector<SelectorOptions>& selectors, const CompressOptions& opts) {
  const int64_t B = static_cast<int64_t>(prompts.size());
  const size_t NT = caches.size();
  KVD_CHECK(NT > 0 && NT == selectors.size(), "compress_prefill: one selector per cache");
  KVD_CHECK(!units.empty(), "compress_prefill: no scorer");
  size_t covered = 0;
  for (const ScoringUnit& u : units) {
    KVD_CHECK(u.first == covered && u.count > 0 && (u.scorers.size() == 1 || u.scorers.size() == u.count),
              "compress_prefill: internal error, scoring units must cover the caches in order with one scorer, or "
              "one per cache");
    covered += u.count;
  }
  KVD_CHECK(covered == NT, "compress_prefill: internal error, the scoring units cover ", covered, " of ", NT, " caches");
  Scorer& scorer = *units[0].scorers[0];
  KVD_CHECK(B > 0, "compress_prefill: no prompts");
  for (KVCache* c : caches) {
    KVD_CHECK(c->batch() == B, "compress_prefill: the cache has batch ", c->batch(), " but there are ", B,
              " prompts; create it with model.new_cache(", B, ")");
    for (int64_t l = 0; l < c->num_layers(); ++l)
      KVD_CHECK(c->max_length(l) == 0, "compress_prefill: the cache must be empty");
  }
  KVD_CHECK(opts.chunk_size >= 0, "--chunk-size must be >= 0 (0: compress once after the whole prefill), got ",
            opts.chunk_size);
  KVCache& cache = *caches[0];
  const int64_t L = model.config().num_layers;
  const ScorerNeeds needs = scorer.needs();  // unit 0's (the only unit of a chunked prefill)
  for (const ScoringUnit& u : units) {
    const ScorerNeeds un = u.scorers[0]->needs();
    for (const Scorer* s : u.scorers) {
      const ScorerNeeds n = s->needs();
      KVD_CHECK(n.hidden == un.hidden && n.window == un.window && n.queries_pre_rope == un.queries_pre_rope &&
                    n.timing == un.timing && (u.scorers.size() == 1 || n.timing == ScoreTiming::PerLayer),
                "compress_prefill_many: ", s->name(), " does not observe the prefill as ", u.scorers[0]->name(),
                " does (one scorer per cache must score each layer alike, right after it ran)");
    }
    KVD_CHECK(un.timing == needs.timing, "compress_prefill_many: ", u.scorers[0]->name(), " and ", scorer.name(),
              " score at different times (one after each layer, one after the whole forward); they cannot share a "
              "prefill");
  }
  std::vector<std::unique_ptr<LayerAllocation>> allocs;
  for (const SelectorOptions& sel : selectors) allocs.push_back(make_allocation(sel, L, B, opts.kernels));
  const std::unique_ptr<LayerAllocation>& alloc = allocs[0];
  std::vector<int64_t> lens(B);
  int64_t T = 0;
  for (int64_t b = 0; b < B; ++b) {
    lens[b] = static_cast<int64_t>(prompts[b].size());
    KVD_CHECK(lens[b] > 0, "compress_prefill: prompt ", b, " is empty");
    T = std::max(T, lens[b]);
  }
  const int64_t chunk = opts.chunk_size > 0 ? opts.chunk_size : T;
  const int64_t n_chunks = (T + chunk - 1) / chunk;
  KVD_CHECK(NT == 1 || n_chunks == 1, "compress_prefill_many: one prefill serves several budgets only unchunked");
  KVD_CHECK(alloc->chunkable() || n_chunks == 1, "--chunk-size: cake's cascade runs once per prefill; use --chunk-size 0 or >= ",
            T);
  if (n_chunks > 1 && needs.window > 0 && needs.window != ScorerNeeds::kAllRows)
    KVD_CHECK(chunk >= needs.window, "--chunk-size ", chunk, " is shorter than ", scorer.name(),
              "'s observation window (", needs.window, " rows); use at least ", needs.window);

  std::vector<int64_t> seen(B, 0);                     // [row] tokens prefilled so far
  std::vector<int64_t> fresh(B, 0);                    // [row] tokens of the current chunk
  std::vector<int64_t> lead;  // [row] leading padding of the current chunk
  // Chunked prefill: each row's last `window` post-RoPE queries and positions of every layer, carried over so
  // that a chunk shorter than the window (the last one) still gets a full observation window.
  const bool carry = n_chunks > 1 && needs.window > 0 && needs.window != ScorerNeeds::kAllRows;
  std::vector<std::vector<at::Tensor>> win_q(B, std::vector<at::Tensor>(L)), win_p(B, std::vector<at::Tensor>(L));
  const float ninf = -std::numeric_limits<float>::infinity();

  // The tokens a row's budget applies to after the current chunk (CompressOptions::chunk_budget).
  const std::vector<int64_t>& budget_tokens = opts.chunk_budget == ChunkBudget::Final ? lens : seen;  // [row]

  // Scores and compacts layer l of every row. obs: the layer's prefill observation (ScoreTiming::PerLayer), or
  // nullptr when the whole forward already ran (ScoreTiming::AfterForward: no queries or hidden states then).
  const bool after_forward = needs.timing == ScoreTiming::AfterForward;
  for (const ScoringUnit& u : units)  // every unit scores at unit 0's time (checked above)
    KVD_CHECK(!after_forward || (u.scorers[0]->needs().window == 0 && !u.scorers[0]->needs().hidden &&
                                 !u.scorers[0]->needs().queries_pre_rope),
              "compress_prefill: ", u.scorers[0]->name(),
              " scores after the forward, when no window queries or hidden states are left");
  // A scorer that takes rows together gets one view of every row when the prefill runs in one chunk (each layer's
  // entries are then this chunk's tokens) and every row holds its observation window. Observing every row, it gets
  // the padding rows too, at position -1: they see no entry. In a chunked prefill the entries are no longer the
  // chunk's tokens and each row carries its own window, so only a scorer that reads neither the chunk's rows
  // (hidden states, pre-RoPE queries) nor a window takes the rows together there: one launch chain per layer and
  // chunk, not one per row (TRIM-KV's gate, KVzap, DMS and the Attention-Gate read their payload). A row whose
  // prompt has ended is scored again then, at the same position and budget: it holds no more than its budget, so it
  // keeps every entry.
  auto together_for = [&](const ScorerNeeds& n) {
    if (n.rows != RowBatching::Together) return false;
    if (n_chunks > 1) return n.window == 0 && !n.hidden && !n.queries_pre_rope;
    return n.window == ScorerNeeds::kAllRows || *std::min_element(lens.begin(), lens.end()) >= n.window;
  };
  // One view of layer l for every row (RowBatching::Together), as a scorer with `needs` sees it: c's entries (a
  // whole copy of the layer), the positions of the prefill's cache; rows end at their own lengths, `valid` marks
  // them.
  auto batch_view = [&](int64_t l, KVCache& c, const PrefillLayerObservation* obs, const ScorerNeeds& needs) {
    const KVLayerView kv = c.layer(l);  // (B, H_kv, n, ...), n the longest head
    LayerView view = layer_view(kv, l, model, cache.next_positions(), opts.kernels);
    if (!obs) return view;
    const PrefillLayerObservation& o = *obs;
    const int64_t Tc = o.queries.size(2), n = kv.n;
    for (int64_t b = 0; b < B; ++b) view.next_positions[b] += fresh[b];  // advanced after the forward
    if (needs.window > 0) {
      const int64_t w = std::min(needs.window, Tc);
      view.window_queries = o.queries.narrow(2, Tc - w, w);              // (B, H, w, hd)
      view.window_positions = o.query_positions.narrow(1, Tc - w, w);  // (B, w)
    }
    if (needs.hidden || needs.queries_pre_rope) {
      // Row b's token j (entry j) is row lead_b + j of the left-padded chunk.
      at::Tensor idx;  // (B, n) int64, or undefined without padding
      if (!lead.empty()) {
        const at::Tensor lb = host_ints(lead, c.device()).view({B, 1});  // (B, 1)
        const at::Tensor j = torch::arange(n, lb.options()).view({1, n});                      // (1, n)
        idx = (j + lb).clamp_max(Tc - 1);
        view.query_valid = j.lt(Tc - lb);  // (B, n)
      }
      if (needs.hidden) {
        const at::Tensor& h = o.hidden;  // (B, Tc, d)
        view.hidden = idx.defined() ? h.gather(1, idx.unsqueeze(2).expand({B, n, h.size(2)})) : h;  // (B, n, d)
      }
      if (needs.queries_pre_rope) {
        const at::Tensor& q = o.queries_pre_rope;  // (B, H, Tc, hd)
        view.queries_pre_rope =
            idx.defined() ? q.gather(2, idx.view({B, 1, n, 1}).expand({B, q.size(1), n, q.size(3)})) : q;  // (B, H, n, hd)
      }
    }
    return view;
  };
  // A unit's scores of one view: the one shared scoring, or each budget's own from one call
  // (Scorer::score_budgets computes once what the budgets share).
  auto score_all = [&](const ScoringUnit& u, const LayerView& view) {
    Scorer& first = *u.scorers[0];
    if (u.scorers.size() == 1) return std::vector<at::Tensor>{first.score(view)};
    std::vector<at::Tensor> all = first.score_budgets(view, u.scorers);
    KVD_CHECK(all.size() == u.scorers.size(), first.name(), ": score_budgets returned ", all.size(), " scores for ",
              u.scorers.size(), " budgets");
    return all;
  };
  // Layer l of unit u's caches, scored from c (a whole copy of the layer: the prefill's cache itself for unit 0).
  auto score_unit = [&](const ScoringUnit& u, int64_t l, KVCache& c, const PrefillLayerObservation* obs) {
    ProfileLap lap(c.device(), "compress ");
    const ScorerNeeds needs = u.scorers[0]->needs();
    const size_t t0 = u.first, t1 = u.first + u.count;
    if (together_for(needs)) {
      const LayerView view = batch_view(l, c, obs, needs);
      at::Tensor s;  // (B, H_kv, n)
      std::vector<double> pref;
      std::vector<at::Tensor> scored;  // [scorer] (B, H_kv, n)
      for (size_t t = t0; t < t1; ++t) {
        if (t - t0 < u.scorers.size()) {  // the one shared scoring, or cache t's own
          if (t == t0) scored = score_all(u, view);
          s = scored[t - t0].to(torch::kFloat);
          if (view.valid.defined()) s = s.masked_fill(view.valid.logical_not(), ninf);
          pref = u.scorers[t - t0]->layer_preference();
          lap("score");
        }
        KVCache& ct = *caches[t];  // layer l whole until it is kept below
        std::vector<RaggedIndices> keep = allocs[t]->rows_scored(l, s, ct, budget_tokens, pref);
        lap("row selection");
        if (std::any_of(keep.begin(), keep.end(), [](const RaggedIndices& r) { return r.indices.defined(); })) {
          for (int64_t b = 0; b < B; ++b)
            if (!keep[b].indices.defined()) keep[b] = ragged_keep_all(row_lengths(ct, l, b), ct.device());
          ct.keep(l, concat_ragged(keep));
        }
        allocs[t]->layer_done(l, *caches[t], budget_tokens);
        lap("layer selection + keep");
      }
      return;
    }
    const KVLayerView kv = c.layer(l);
    const int64_t Tc = obs ? obs->queries.size(2) : 0;
    std::vector<std::vector<RaggedIndices>> parts(NT, std::vector<RaggedIndices>(B));  // [target][row]
    std::vector<char> any(NT, 0);
    for (int64_t b = 0; b < B; ++b) {
      const std::vector<int64_t> rl = row_lengths(c, l, b);
      if (fresh[b] == 0) {  // an all-padding chunk for this row: nothing new to score
        for (size_t t = t0; t < t1; ++t) parts[t][b] = ragged_keep_all(rl, c.device());
        continue;
      }
      const int64_t lb = lead.empty() || !obs ? 0 : lead[b], nq = Tc - lb;
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
      for (const auto& [name, col] : kv.payload) view.payload[name] = col.narrow(0, b, 1).narrow(2, 0, nb);  // (1, H_kv, n_b)
      view.batch_offset = b;
      view.kernels = opts.kernels;
      if (!obs) {
        view.next_positions = {cache.next_position(b)};
      } else {
        const PrefillLayerObservation& o = *obs;
        at::Tensor qpos = o.query_positions.narrow(0, b, 1);  // (1, Tc)
        view.next_positions = {cache.next_position(b) + fresh[b]};  // the row's last query + 1 (advanced after the forward)
        if (needs.hidden) view.hidden = o.hidden.narrow(0, b, 1).narrow(1, lb, nq);  // (1, nq, d)
        if (needs.window > 0) {
          const int64_t w = std::min(needs.window, nq);
          view.window_queries = o.queries.narrow(0, b, 1).narrow(2, Tc - w, w);  // (1, H, w, hd)
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
        if (needs.queries_pre_rope) view.queries_pre_rope = o.queries_pre_rope.narrow(0, b, 1).narrow(2, lb, nq);  // (1, H, nq, hd)
      }
      at::Tensor s;  // (1, H_kv, n_b)
      std::vector<double> pref;
      std::vector<at::Tensor> scored;  // [scorer] (1, H_kv, n_b)
      for (size_t t = t0; t < t1; ++t) {
        if (t - t0 < u.scorers.size()) {  // the one shared scoring, or cache t's own
          if (t == t0) scored = score_all(u, view);
          s = scored[t - t0].to(torch::kFloat);
          if (ragged) s = s.masked_fill(view.valid.logical_not(), ninf);
          pref = u.scorers[t - t0]->layer_preference();
          lap("score");
        }
        parts[t][b] = allocs[t]->row_scored(l, b, s, view.valid, budget_tokens[b], pref);
        lap("row selection");
        if (parts[t][b].indices.defined()) {
          any[t] = 1;
        } else {
          parts[t][b] = ragged_keep_all(rl, c.device());
        }
      }
    }
    for (size_t t = t0; t < t1; ++t) {
      if (any[t]) caches[t]->keep(l, concat_ragged(parts[t]));
      allocs[t]->layer_done(l, *caches[t], budget_tokens);
    }
    lap("layer selection + keep");
  };
  auto score_layer = [&](int64_t l, KVCache& c, const PrefillLayerObservation* obs) {
    {
      ProfileLap lap(c.device(), "compress ");
      for (size_t t = 1; t < NT; ++t) caches[t]->copy_layer_from(c, l);  // before c's layer is compacted
      lap("copy to other budgets");
    }
    // Each unit from its first cache's whole copy of the layer (unit 0: the prefill's cache itself).
    for (size_t u = 0; u < units.size(); ++u) score_unit(units[u], l, u == 0 ? c : *caches[units[u].first], obs);
  };
  PrefillObserver observer = [&](const PrefillLayerObservation& obs, KVCache& c) {
    for (Scorer* s : observers) s->on_append(obs, c);  // per-entry state of the new entries (e.g. TRIM-KV's log beta)
    if (!after_forward) score_layer(obs.layer, c, &obs);
  };

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
    if (after_forward) {  // every layer of this chunk is cached: the scorers run (e.g. their query rows), then score
      ProfileLap lap(cache.device(), "compress ");
      // Every unit's scorers, prepared together where they share work (KVzip, KVzip+): the first one left prepares
      // itself and whichever of the others it can, until none is left.
      std::vector<Scorer*> left;
      for (const ScoringUnit& u : units)
        for (Scorer* s : u.scorers)
          if (std::find(left.begin(), left.end(), s) == left.end()) left.push_back(s);
      while (!left.empty()) {
        const std::vector<Scorer*> done = left[0]->prepare_peers(model, cache, left);
        KVD_CHECK(std::find(done.begin(), done.end(), left[0]) != done.end(), left[0]->name(),
                  ": prepare_peers did not prepare the scorer it was called on");
        left.erase(std::remove_if(left.begin(), left.end(),
                                  [&](Scorer* s) { return std::find(done.begin(), done.end(), s) != done.end(); }),
                   left.end());
      }
      lap("prepare (after the forward)");
      // Alone, each budget would hold every layer whole before compacting any; the other budgets' caches receive a
      // layer only as it is scored, so their peaks are raised to what the prefill's cache holds now.
      std::vector<int64_t> whole_rows(static_cast<size_t>(B));
      for (int64_t b = 0; b < B; ++b) whole_rows[static_cast<size_t>(b)] = cache.row_bytes(b);
      const int64_t whole = cache.bytes();
      for (int64_t l = 0; l < L; ++l) score_layer(l, cache, nullptr);
      for (size_t t = 1; t < NT; ++t) caches[t]->raise_peaks(whole_rows, whole);
    }
    for (size_t t = 0; t < NT; ++t) allocs[t]->forward_done(*caches[t], fresh, budget_tokens);
  }
  for (size_t t = 1; t < NT; ++t) caches[t]->advance(cache.next_positions());  // they started empty, at position 0

  std::vector<CompressStats> out;
  for (KVCache* c : caches) out.push_back(cache_stats(*c, lens, L));
  return out;
}

}  // namespace

CompressStats compress_prefill(const Model& model, KVCache& cache, const std::vector<std::vector<int64_t>>& prompts,
                               Method& method, const CompressOptions& opts) {
  return compress_impl(model, {&cache}, prompts, {ScoringUnit{0, 1, {method.scorer.get()}}}, {method.scorer.get()},
                       {method.selector}, opts)[0];
}

std::vector<CompressStats> compress_prefill_many(const Model& model, const std::vector<KVCache*>& caches,
                                                 const std::vector<std::vector<int64_t>>& prompts,
                                                 const std::vector<Method*>& methods, const CompressOptions& opts) {
  KVD_CHECK(!methods.empty() && methods.size() == caches.size(), "compress_prefill_many: one method per cache");
  // One scoring unit per run of consecutive methods of one name (one method's budgets): scored once when all of
  // them share their scores, else each by its own scorer.
  std::vector<ScoringUnit> units;
  std::vector<Scorer*> observers;
  std::vector<SelectorOptions> selectors;
  for (size_t i0 = 0; i0 < methods.size();) {
    size_t i1 = i0 + 1;
    while (i1 < methods.size() && methods[i1]->name == methods[i0]->name) ++i1;
    const bool shared = std::all_of(methods.begin() + static_cast<int64_t>(i0), methods.begin() + static_cast<int64_t>(i1),
                                    [](const Method* m) { return m->sharing == ScoreSharing::AcrossBudgets; });
    ScoringUnit u{i0, i1 - i0, {}};
    for (size_t i = i0; i < i1; ++i)
      if (!shared || u.scorers.empty()) u.scorers.push_back(methods[i]->scorer.get());
    units.push_back(std::move(u));
    i0 = i1;
  }
  for (Method* m : methods) {
    if (std::find(observers.begin(), observers.end(), m->scorer.get()) == observers.end())
      observers.push_back(m->scorer.get());
    selectors.push_back(m->selector);
  }
  return compress_impl(model, caches, prompts, units, observers, selectors, opts);
}

}  // namespace kvd
