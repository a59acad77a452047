#include "gates/allocation.h"

#include <algorithm>
#include <limits>

#include <torch/torch.h>

#include "common/error.h"
#include "models/device.h"
#include "models/kv_cache.h"

namespace kvd {

std::vector<int64_t> row_lengths(const KVCache& c, int64_t layer, int64_t b) {
  const auto& len = c.lengths(layer);
  const int64_t H = c.num_kv_heads();
  return std::vector<int64_t>(len.begin() + b * H, len.begin() + (b + 1) * H);
}

std::vector<RaggedIndices> LayerAllocation::rows_scored(int64_t l, const at::Tensor& s, const KVCache& cache,
                                                        const std::vector<int64_t>& tokens,
                                                        const std::vector<double>& pref) {
  const int64_t B = s.size(0);
  const KVLayerView kv = cache.layer(l);
  std::vector<RaggedIndices> out(B);
  for (int64_t b = 0; b < B; ++b) {
    const std::vector<int64_t> rl = row_lengths(cache, l, b);
    const int64_t nb = *std::max_element(rl.begin(), rl.end());
    const bool ragged = std::any_of(rl.begin(), rl.end(), [&](int64_t x) { return x != nb; });
    const at::Tensor valid = ragged ? kv.valid.narrow(0, b, 1).narrow(2, 0, nb) : at::Tensor();  // (1, H_kv, n_b)
    out[b] = row_scored(l, b, s.narrow(0, b, 1).narrow(2, 0, nb), valid, tokens[b],
                        pref.empty() ? std::vector<double>{} : std::vector<double>{pref[b]});
  }
  return out;
}

namespace {

// Uniform, Pyramid, AdaKV: each layer on its own, as soon as it is scored. The rows of a layer are staged as they
// are scored (or come scored together) and selected together when the layer is done: one selection and one
// read-back of the counts per layer, whatever the batch. Uniform, pyramid and threshold budgets rank each head on
// its own (select_top / select_threshold); AdaKV pools each row's heads (select_pooled).
class PerLayer : public LayerAllocation {
 public:
  PerLayer(const SelectorOptions& o, int64_t L, int64_t B, KernelPath k) : opt_(o), L_(L), kernels_(k), staged_(B) {}
  RaggedIndices row_scored(int64_t, int64_t b, const at::Tensor& s, const at::Tensor&, int64_t tokens,
                           const std::vector<double>&) override {
    staged_[b] = Staged{s, tokens};
    return RaggedIndices();  // selected with the layer's other rows in layer_done
  }
  std::vector<RaggedIndices> rows_scored(int64_t, const at::Tensor& s, const KVCache&,
                                         const std::vector<int64_t>& tokens, const std::vector<double>&) override {
    together_ = s;  // (B, H_kv, n), -inf past each head's entries already
    for (int64_t b = 0; b < s.size(0); ++b) staged_[b].tokens = tokens[b];
    return std::vector<RaggedIndices>(s.size(0));  // selected in layer_done
  }
  void layer_done(int64_t l, KVCache& cache, const std::vector<int64_t>&) override {
    if (!together_.defined() &&
        std::none_of(staged_.begin(), staged_.end(), [](const Staged& r) { return r.scores.defined(); }))
      return;
    const int64_t B = static_cast<int64_t>(staged_.size()), H = cache.num_kv_heads(), w = cache.max_length(l);
    const float inf = std::numeric_limits<float>::infinity();
    const auto fopt = torch::TensorOptions().dtype(torch::kFloat).device(cache.device());
    const at::Tensor len = host_ints(cache.lengths(l), cache.device()).view({B, H, 1});
    // Each head's entries, which are the valid ones of its row's view.
    const at::Tensor valid = torch::arange(w, len.options()).view({1, 1, w}).lt(len);  // (B, H_kv, w)
    const Budget& bud = opt_.budget;  // every row's budget is of its kind (make_allocation)
    const bool pooled = opt_.allocation == Allocation::AdaKV;
    // Row b's keep per head under its own budget, as select_layer counts it: AdaKV at most the row's longest head.
    auto count = [&](int64_t b, int64_t tokens) -> int64_t {
      if (bud.kind == BudgetKind::Threshold) return 0;
      if (!pooled) return layer_keep_count(opt_.for_row(b), l, L_, tokens);
      const std::vector<int64_t> rl = row_lengths(cache, l, b);
      return std::min(opt_.budget_of(b).n_kept(tokens), *std::max_element(rl.begin(), rl.end()));
    };
    bool keep_all = true;  // every row at ratio 0
    for (int64_t b = 0; b < B; ++b)
      keep_all = keep_all && opt_.budget_of(b).kind == BudgetKind::Ratio && opt_.budget_of(b).value == 0.0;
    std::vector<int64_t> k(B);
    at::Tensor S;  // (B, H_kv, w)
    if (together_.defined()) {  // every row scored at once
      S = at::constant_pad_nd(together_.to(torch::kFloat), {0, w - together_.size(2)}, -inf);
      for (int64_t b = 0; b < B; ++b) k[b] = count(b, staged_[b].tokens);
    } else {
      std::vector<at::Tensor> scores;
      for (int64_t b = 0; b < B; ++b) {
        const Staged& r = staged_[b];
        if (r.scores.defined()) {  // -inf past the row's entries
          scores.push_back(at::constant_pad_nd(r.scores.to(torch::kFloat), {0, w - r.scores.size(2)}, -inf));
          k[b] = count(b, r.tokens);
        } else {  // not scored in this chunk (it was all padding): the row keeps every entry
          scores.push_back(torch::full({1, H, w}, inf, fopt));
          k[b] = w;
        }
      }
      S = torch::cat(scores);
    }
    // The selections' indices come from this layer's own entries (valid), so keep need not check them on the device.
    const IndexCheck own = IndexCheck::ByConstruction;
    if (bud.kind == BudgetKind::Threshold) {
      cache.keep(l, select_threshold(S, bud.value, valid, kernels_), own);
    } else if (keep_all) {
      cache.keep(l, ragged_from_mask(valid, cache.lengths(l)), own);
    } else if (pooled) {
      std::vector<int64_t> floor(B);
      for (int64_t b = 0; b < B; ++b) floor[b] = adakv_floor(opt_, k[b]);
      cache.keep(l, select_pooled(S, k, floor, valid), own);
    } else {  // counts known on the host: min(k[b], each head's entries)
      cache.keep(l, select_top_prefix(S, k, cache.lengths(l), kernels_), own);
    }
    staged_.assign(B, Staged{});
    together_ = at::Tensor();
  }

 private:
  struct Staged {
    at::Tensor scores;  // (1, H_kv, n_b), or undefined: the row was not scored
    int64_t tokens = 0;
  };
  SelectorOptions opt_;
  int64_t L_;
  KernelPath kernels_;
  std::vector<Staged> staged_;  // [row] of the layer being scored
  at::Tensor together_;         // (B, H_kv, n): the layer's rows scored at once (rows_scored), or undefined
};

// One budget pooled over every layer of a row: L · H_kv · n_kept(tokens) entries, chosen after the forward.
class Global : public LayerAllocation {
 public:
  Global(const SelectorOptions& o, int64_t L, int64_t B)
      : opt_(o), L_(L), scores_(B, std::vector<at::Tensor>(L)), valid_(B, std::vector<at::Tensor>(L)) {}
  RaggedIndices row_scored(int64_t l, int64_t b, const at::Tensor& s, const at::Tensor& valid, int64_t,
                           const std::vector<double>&) override {
    scores_[b][l] = s;
    valid_[b][l] = valid;
    return RaggedIndices();  // the row stays whole until forward_done
  }
  void forward_done(KVCache& cache, const std::vector<int64_t>& fresh, const std::vector<int64_t>& tokens) override {
    const int64_t B = static_cast<int64_t>(scores_.size());
    std::vector<std::vector<RaggedIndices>> keep(L_, std::vector<RaggedIndices>(B));  // [layer][row]
    for (int64_t b = 0; b < B; ++b) {
      if (fresh[b] == 0) {
        for (int64_t l = 0; l < L_; ++l) keep[l][b] = ragged_keep_all(row_lengths(cache, l, b), cache.device());
        continue;
      }
      bool ragged = false;
      for (const at::Tensor& v : valid_[b]) ragged = ragged || v.defined();
      std::vector<RaggedIndices> r =
          select_all(scores_[b], opt_.for_row(b), tokens[b], ragged ? valid_[b] : std::vector<at::Tensor>{});
      for (int64_t l = 0; l < L_; ++l) keep[l][b] = r[l];
    }
    for (int64_t l = 0; l < L_; ++l) cache.keep(l, concat_ragged(keep[l]));
    for (auto& row : scores_) row.assign(L_, at::Tensor());
    for (auto& row : valid_) row.assign(L_, at::Tensor());
  }

 private:
  SelectorOptions opt_;
  int64_t L_;
  std::vector<std::vector<at::Tensor>> scores_, valid_;  // [row][layer]
};

// CAKE's cascade (the paper's form): after layer l, the whole L·B per head is re-split over layers 0..l in
// proportion to P (cake_layer_budgets, rounded down), and every layer already compacted is cut to its new
// budget by the scores it was kept with. The water level only falls as layers join, so budgets only shrink, the
// cache never holds more than L·B entries per head (plus layer l's full prompt while it is being scored), and
// each layer ends with the top B_l of its own scores, B_l from the final P. (Re-splitting (l+1)·B instead would
// let an earlier layer's budget grow back after it had evicted.)
//
// A cut to k keeps a head's top k by the layer's own scores; the top k of a top k' (k ≤ k') is the top k of the
// whole, so each layer's entries are ranked once, when it is scored, and every later cut keeps the entries ranked
// below its k. The counts are the host's, so a cut (up to L²/2 of them per prefill) reads nothing back: its keep
// indices are each kept entry's slot among those the layer holds now (a running count of the held entries).
class Cake : public LayerAllocation {
 public:
  Cake(const SelectorOptions& o, int64_t L, int64_t B)
      : opt_(o), L_(L), B_(B), pref_(B, std::vector<double>(L, 0.0)), staged_(L, std::vector<at::Tensor>(B)),
        rank_(L), held_(L), count_(L, std::vector<int64_t>(B, 0)) {}
  bool chunkable() const override { return false; }
  RaggedIndices row_scored(int64_t l, int64_t b, const at::Tensor& s, const at::Tensor&, int64_t,
                           const std::vector<double>& pref) override {
    KVD_CHECK(pref.size() == 1, "the cake allocation needs a scorer with a layer preference");
    pref_[b][l] = pref[0];
    staged_[l][b] = s;
    count_[l][b] = s.size(2);
    return RaggedIndices();  // the cascade in layer_done decides
  }
  std::vector<RaggedIndices> rows_scored(int64_t l, const at::Tensor& s, const KVCache& cache,
                                         const std::vector<int64_t>&, const std::vector<double>& pref) override {
    KVD_CHECK(static_cast<int64_t>(pref.size()) == B_, "the cake allocation needs a scorer with a layer preference per row");
    const int64_t H = cache.num_kv_heads();
    const std::vector<int64_t>& len = cache.lengths(l);
    for (int64_t b = 0; b < B_; ++b) {
      pref_[b][l] = pref[b];
      count_[l][b] = *std::max_element(len.begin() + b * H, len.begin() + (b + 1) * H);
    }
    together_ = s;  // (B, H_kv, n), -inf past each head's entries
    return std::vector<RaggedIndices>(B_);  // the cascade in layer_done decides
  }
  // Every row at once: one ranking per layer, and per cut one mask, one running count and one keep.
  void layer_done(int64_t l, KVCache& c, const std::vector<int64_t>& tokens) override {
    const float ninf = -std::numeric_limits<float>::infinity();
    const int64_t H = c.num_kv_heads();
    const int64_t w = *std::max_element(count_[l].begin(), count_[l].end());
    if (together_.defined()) {  // the rows scored together: -inf already past each head's entries
      rank_[l] = rank_desc(together_.narrow(2, 0, w));  // (B, H_kv, w): 0 = best, ties to the lower position
      together_ = at::Tensor();
    } else {  // Layer l's rows side by side, -inf past each row's entries (a stable descending ranking puts them
              // last). A row that was not scored (no tokens) holds nothing.
      std::vector<at::Tensor> rows;
      for (int64_t b = 0; b < B_; ++b)
        rows.push_back(staged_[l][b].defined()
                           ? at::constant_pad_nd(staged_[l][b].to(torch::kFloat), {0, w - count_[l][b]}, ninf)  // (1, H_kv, w)
                           : torch::full({1, H, w}, ninf, torch::TensorOptions().dtype(torch::kFloat).device(c.device())));
      rank_[l] = rank_desc(torch::cat(rows));  // (B, H_kv, w)
      staged_[l].assign(B_, at::Tensor());
    }
    held_[l] = rank_[l].lt(counts_on_device(count_[l], c.device()));  // (B, H_kv, w): the entries held now
    std::vector<std::vector<int64_t>> k(l + 1, std::vector<int64_t>(B_));  // [layer][row] the new counts
    for (int64_t b = 0; b < B_; ++b) {
      const Budget& bud = opt_.budget_of(b);
      const int64_t per_head = bud.kind == BudgetKind::Ratio && bud.value == 0.0 ? tokens[b] : bud.n_kept(tokens[b]);
      const std::vector<int64_t> budgets =
          cake_layer_budgets(std::vector<double>(pref_[b].begin(), pref_[b].begin() + l + 1), L_ * per_head, tokens[b]);
      for (int64_t i = 0; i <= l; ++i) k[i][b] = std::min(budgets[i], count_[i][b]);
    }
    for (int64_t i = 0; i <= l; ++i) {
      if (k[i] == count_[i]) continue;
      const at::Tensor next = rank_[i].lt(counts_on_device(k[i], c.device()));  // (B, H_kv, w) held after the cut
      const at::Tensor slot = held_[i].cumsum(-1).sub_(1);                       // (B, H_kv, w) each held entry's slot now
      RaggedIndices r;
      std::vector<int64_t> off(B_ * H + 1, 0);
      for (int64_t row = 0; row < B_ * H; ++row) off[row + 1] = off[row] + k[i][row / H];
      r.offsets = torch::tensor(off, torch::kLong);                              // (B·H_kv + 1), host
      // Row-major, so each head's kept entries in position order; the count is the host's, so nothing is read back.
      const at::Tensor flat = at::nonzero_static(next.reshape({-1}), off.back()).select(1, 0);  // (total) into (B·H_kv·w)
      r.indices = slot.reshape({-1}).index_select(0, flat);                                     // (total)
      c.keep(i, r, IndexCheck::ByConstruction);
      held_[i] = next;
      count_[i] = k[i];
    }
  }

 private:
  static at::Tensor counts_on_device(const std::vector<int64_t>& k, c10::Device d) {  // [row] -> (B, 1, 1)
    return host_ints(k, d).view({-1, 1, 1});
  }
  SelectorOptions opt_;
  int64_t L_, B_;
  std::vector<std::vector<double>> pref_;        // [row][layer] the layer preference
  std::vector<std::vector<at::Tensor>> staged_;  // [layer][row] (1, H_kv, n_b) until the layer is done
  at::Tensor together_;                          // (B, H_kv, n): the layer's rows scored at once, or undefined
  std::vector<at::Tensor> rank_;                 // [layer] (B, H_kv, w) each entry's rank in its head at scoring,
                                                 // in the layout the layer had then (padding ranks last)
  std::vector<at::Tensor> held_;                 // [layer] (B, H_kv, w) bool: in that layout, the entries held now
  std::vector<std::vector<int64_t>> count_;      // [layer][row] entries per head
};

}  // namespace

std::unique_ptr<LayerAllocation> make_allocation(const SelectorOptions& opt, int64_t L, int64_t B, KernelPath kernels) {
  SelectorOptions o = opt;
  if (!o.row_budgets.empty()) {
    KVD_CHECK(static_cast<int64_t>(o.row_budgets.size()) == B, "selector: ", o.row_budgets.size(),
              " row budgets for a batch of ", B, " rows; give one per row, or none");
    for (const Budget& b : o.row_budgets)
      KVD_CHECK(b.kind == o.row_budgets[0].kind && b.kind != BudgetKind::Threshold,
                "selector: the row budgets of one batch must be ratios or token counts, all of one kind (a threshold "
                "applies to the whole batch: give it as the budget)");
    o.budget = o.row_budgets[0];  // the kind every row shares
  }
  switch (o.allocation) {
    case Allocation::Global: return std::make_unique<Global>(o, L, B);  // ranks across layers: the reference path
    case Allocation::Cake: return std::make_unique<Cake>(o, L, B);      // re-cuts layers by the kept scores
    default: return std::make_unique<PerLayer>(o, L, B, kernels);
  }
}

}  // namespace kvd
