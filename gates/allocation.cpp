#include "gates/allocation.h"

#include <torch/torch.h>

#include "common/error.h"
#include "models/kv_cache.h"

namespace kvd {

std::vector<int64_t> row_lengths(const KVCache& c, int64_t layer, int64_t b) {
  const auto& len = c.lengths(layer);
  const int64_t H = c.num_kv_heads();
  return std::vector<int64_t>(len.begin() + b * H, len.begin() + (b + 1) * H);
}

namespace {

// Uniform, Pyramid, AdaKV: each layer on its own, as soon as it is scored.
class PerLayer : public LayerAllocation {
 public:
  PerLayer(const SelectorOptions& o, int64_t L) : opt_(o), L_(L) {}
  RaggedIndices row_scored(int64_t l, int64_t, const at::Tensor& s, const at::Tensor& valid, int64_t tokens,
                           const std::vector<double>&) override {
    return select_layer(s, l, L_, opt_, tokens, valid);
  }

 private:
  SelectorOptions opt_;
  int64_t L_;
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
        for (int64_t l = 0; l < L_; ++l) keep[l][b] = ragged_keep_all(row_lengths(cache, l, b));
        continue;
      }
      bool ragged = false;
      for (const at::Tensor& v : valid_[b]) ragged = ragged || v.defined();
      std::vector<RaggedIndices> r = select_all(scores_[b], opt_, tokens[b], ragged ? valid_[b] : std::vector<at::Tensor>{});
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
class Cake : public LayerAllocation {
 public:
  Cake(const SelectorOptions& o, int64_t L, int64_t B) : opt_(o), L_(L), rows_(B) {
    for (Row& r : rows_) {
      r.pref.assign(L, 0.0);
      r.scores.assign(L, at::Tensor());
      r.count.assign(L, 0);
    }
  }
  bool chunkable() const override { return false; }
  RaggedIndices row_scored(int64_t l, int64_t b, const at::Tensor& s, const at::Tensor&, int64_t,
                           const std::vector<double>& pref) override {
    KVD_CHECK(pref.size() == 1, "the cake allocation needs a scorer with a layer preference");
    Row& r = rows_[b];
    r.pref[l] = pref[0];
    r.scores[l] = s;
    r.count[l] = s.size(2);
    return RaggedIndices();  // the cascade in layer_done decides
  }
  void layer_done(int64_t l, KVCache& c, const std::vector<int64_t>& tokens) override {
    const int64_t B = static_cast<int64_t>(rows_.size()), Hkv = c.num_kv_heads();
    std::vector<std::vector<RaggedIndices>> cut(l + 1, std::vector<RaggedIndices>(B));  // [layer][row]
    std::vector<bool> changed(l + 1, false);
    for (int64_t b = 0; b < B; ++b) {
      Row& r = rows_[b];
      const Budget& bud = opt_.budget;
      const int64_t per_head = bud.kind == BudgetKind::Ratio && bud.value == 0.0 ? tokens[b] : bud.n_kept(tokens[b]);
      const std::vector<int64_t> budgets =
          cake_layer_budgets(std::vector<double>(r.pref.begin(), r.pref.begin() + l + 1), L_ * per_head, tokens[b]);
      for (int64_t i = 0; i <= l; ++i) {
        const int64_t k = std::min(budgets[i], r.count[i]);
        if (k == r.count[i]) {
          cut[i][b] = ragged_keep_all(row_lengths(c, i, b));
          continue;
        }
        at::Tensor mask = topk_mask(r.scores[i], k);  // (1, H_kv, count)
        cut[i][b] = ragged_from_mask(mask);
        r.scores[i] = r.scores[i].masked_select(mask).view({1, Hkv, k});  // (1, H_kv, k)
        r.count[i] = k;
        changed[i] = true;
      }
    }
    for (int64_t i = 0; i <= l; ++i)
      if (changed[i]) c.keep(i, concat_ragged(cut[i]));
  }

 private:
  // Per batch row: each layer's preference and the scores of the entries it still holds (compacted with them,
  // so a later cut uses the scores the entries were kept with).
  struct Row {
    std::vector<double> pref;        // [layer]
    std::vector<at::Tensor> scores;  // [layer] (1, H_kv, count)
    std::vector<int64_t> count;      // [layer] entries per head
  };
  SelectorOptions opt_;
  int64_t L_;
  std::vector<Row> rows_;
};

}  // namespace

std::unique_ptr<LayerAllocation> make_allocation(const SelectorOptions& o, int64_t L, int64_t B) {
  switch (o.allocation) {
    case Allocation::Global: return std::make_unique<Global>(o, L, B);
    case Allocation::Cake: return std::make_unique<Cake>(o, L, B);
    default: return std::make_unique<PerLayer>(o, L);
  }
}

}  // namespace kvd
