// Heuristic scorers (docs/methods/README.md). Each class lives in its own gates/<name>.cpp. Where kvpress 0.5.5
// implements the method, its defaults are ours, so the same model, prompt and ratio keep the same indices.
//
// Conventions shared by all of them:
//   - score(view) returns (B, H_kv, n) float32, higher = keep; invalid (padding) entries get -inf;
//   - scores of query heads are reduced over the GQA group with GroupReduce (mean, kvpress's default);
//   - window-based scorers keep their observation window by giving it max(score) + 1 (as kvpress does);
//   - they take the rows of a batch together (RowBatching::Together) unless they say otherwise.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "gates/scorer.h"
#include "gates/selector.h"
#include "kernels/window_scores.h"

namespace kvd {

enum class GroupReduce { Mean, Max };

// (B, H, m) per query head -> (B, H_kv, m).
at::Tensor reduce_group(const at::Tensor& per_query_head, int64_t num_kv_heads, GroupReduce reduce);

// Softmax attention of query rows to the cached entries, per query head, float32:
//   q (B, H, w, hd) post-RoPE, q_pos (B, w); k (B, H_kv, n, hd), k_pos (B, H_kv, n), valid (B, H_kv, n) or
//   undefined. Key j is visible to row i iff k_pos_j <= q_pos_i (and valid). Returns (B, H, w, n).
at::Tensor window_attention(const at::Tensor& q, const at::Tensor& q_pos, const at::Tensor& k, const at::Tensor& k_pos,
                            const at::Tensor& valid);

// Column statistics of window attention over all rows of in.q: Σ_i A_ij (and Σ_i A_ij² with SumAndSquares), or
// max_i A_ij · row_weight_i (Max; MaxAndPlain adds max_i A_ij), (B, H, n) float32 each (float64 for a float64 q on the reference path). With path
// Fused, the fused kernel (kernels/window_scores.h) where it applies (CUDA, bf16, head dim 64 / 128): no (w, n)
// tensor at all. Else the attention by blocks of row_block rows (never w × n at once for large w); a row that sees
// nothing adds 0.
WindowColumns window_columns(const WindowScoresInput& in, WindowMoments moments, KernelPath path,
                             int64_t row_block = 256);

// The valid entries of a view before its observation window (positions < each row's first window position):
// (B, H_kv, n) bool. The window's own entries are the rest of the valid ones.
at::Tensor window_prefix(const LayerView& view);

// s (B, H, ..., n) per query head (or per KV head) with every entry outside mask (B, H_kv, n) set to 0.
at::Tensor zero_outside(const at::Tensor& s, const at::Tensor& mask);

// 1 + each row's largest score inside mask (scores >= 0; 1 when the mask is empty): (B, 1, 1). What window-based
// scorers give their window, per row as if each row were scored alone.
at::Tensor row_top(const at::Tensor& s, const at::Tensor& mask);

// s_j = uniform(0, 1), from a generator seeded once (same seed -> same scores).
class RandomScorer : public Scorer {
 public:
  explicit RandomScorer(uint64_t seed = 0);
  std::string name() const override { return "random"; }
  ScorerNeeds needs() const override { return rows_together(); }
  at::Tensor score(const LayerView& view) override;

 private:
  uint64_t seed_;
  int64_t calls_ = 0;
};

// s_j = -||k_j||_2.
class KNormScorer : public Scorer {
 public:
  std::string name() const override { return "knorm"; }
  ScorerNeeds needs() const override { return rows_together(); }
  at::Tensor score(const LayerView& view) override;
};

// Sinks first, then recency: the n_sink oldest positions outrank everything, then newer beats older. A top-k
// of any size therefore keeps the sinks plus the most recent tokens (kvpress's StreamingLLMPress set).
class StreamingLLMScorer : public Scorer {
 public:
  explicit StreamingLLMScorer(int64_t n_sink = 4) : n_sink_(n_sink) {}
  std::string name() const override { return "streaming_llm"; }
  // Fixed-shape: reads positions and next_position_column alone.
  ScorerNeeds needs() const override { return rows_together(FixedShape::Yes); }
  at::Tensor score(const LayerView& view) override;

 private:
  int64_t n_sink_;
};

enum class H2ONorm {
  Sum,               // H2O: s_j = Σ_{i >= j} A_ij
  PerObservingQuery  // kvpress ObservedAttention: s_j = Σ_i A_ij / (number of rows that see j)
};

// Accumulated attention from every prefill row (the chunk's rows; computed in row blocks).
class H2OScorer : public Scorer {
 public:
  explicit H2OScorer(H2ONorm norm = H2ONorm::Sum, GroupReduce reduce = GroupReduce::Mean)
      : norm_(norm), reduce_(reduce) {}
  std::string name() const override { return norm_ == H2ONorm::Sum ? "h2o" : "observed_attention"; }
  ScorerNeeds needs() const override;
  at::Tensor score(const LayerView& view) override;

 private:
  H2ONorm norm_;
  GroupReduce reduce_;
};

// SnapKV: mean window attention over the last w rows, avg-pooled (kernel k, zero padding counted), reduced over
// the group; the window itself gets max + 1. kvpress: w = 64, k = 5, mean.
struct SnapKVOptions {
  int64_t window = 64;
  int64_t kernel = 5;
  GroupReduce reduce = GroupReduce::Mean;
};
class SnapKVScorer : public Scorer {
 public:
  explicit SnapKVScorer(SnapKVOptions opt = {}) : opt_(opt) {}
  std::string name() const override { return "snapkv"; }
  ScorerNeeds needs() const override;
  at::Tensor score(const LayerView& view) override;
  const SnapKVOptions& options() const { return opt_; }

 private:
  SnapKVOptions opt_;
};

// TOVA: attention of the last row, averaged over every query head; one score for all KV heads; the last
// token gets max + 1.
class TOVAScorer : public Scorer {
 public:
  std::string name() const override { return "tova"; }
  ScorerNeeds needs() const override;
  at::Tensor score(const LayerView& view) override;
};

// KeyDiff: s_j = -cos(k_j, mean_m k_m / ||k_m||).
class KeyDiffScorer : public Scorer {
 public:
  std::string name() const override { return "keydiff"; }
  ScorerNeeds needs() const override { return rows_together(); }
  at::Tensor score(const LayerView& view) override;
};

// Expected Attention (kvpress ExpectedAttentionPress defaults: 512 future positions, 4 sinks, covariance and
// value norm on, epsilon 0; docs/methods/expected_attention.md suggests epsilon 1e-2).
struct ExpectedAttentionOptions {
  int64_t n_future = 512;
  int64_t n_sink = 4;
  double epsilon = 0.0;
};
class ExpectedAttentionScorer : public Scorer {
 public:
  explicit ExpectedAttentionScorer(ExpectedAttentionOptions opt = {}) : opt_(opt) {}
  std::string name() const override { return "expected_attention"; }
  ScorerNeeds needs() const override;
  at::Tensor score(const LayerView& view) override;

 private:
  // (B, 1, hd, hd) on the keys' device: the average RoPE rotation of each row's next n_future positions. It depends
  // on the rows' next positions only, so the layers of one prefill share it (kept from one call to the next).
  at::Tensor rotation(const LayerView& view, int64_t hd);
  ExpectedAttentionOptions opt_;
  const Model* rot_model_ = nullptr;
  std::vector<int64_t> rot_next_;
  at::Tensor rot_;
};

// CriticalKV on top of a base scorer: s'_j = (s_j + 1e-4) · ||W_O^(h) v_j||_1 (summed over the group's
// query heads). The two-stage selection (top half of n_kept by s, the rest by s') is expressed in the
// score: tokens of the first stage get max(s') + 1 + s.
class CriticalKVScorer : public Scorer {
 public:
  // base_sharing: whether the base's scores are the same at every budget (then score_budgets scores it once).
  CriticalKVScorer(std::shared_ptr<Scorer> base, double ratio, ScoreSharing base_sharing)
      : base_(std::move(base)), ratio_(ratio), base_sharing_(base_sharing) {}
  std::string name() const override { return "criticalkv_" + base_->name(); }
  ScorerNeeds needs() const override {
    ScorerNeeds n = base_->needs();
    n.fixed_shape = FixedShape::No;  // each row's first stage is cut on the host
    return n;
  }
  void on_append(const PrefillLayerObservation& obs, KVCache& cache) override { base_->on_append(obs, cache); }
  std::vector<PayloadColumn> payload_columns() const override { return base_->payload_columns(); }
  std::vector<at::Tensor> entry_payload(int64_t layer, const at::Tensor& hidden, const EntryContext& ctx) override {
    return base_->entry_payload(layer, hidden, ctx);
  }
  void reserve_row_state(int64_t layer, RowState& state, int64_t batch, int64_t positions) override {
    base_->reserve_row_state(layer, state, batch, positions);
  }
  at::Tensor score(const LayerView& view) override;
  // The base's scores (its own score_budgets) and the value norm once for every budget.
  std::vector<at::Tensor> score_budgets(const LayerView& view, const std::vector<Scorer*>& peers) override;

 private:
  // The scores at this ratio from the base's scores s (B, H_kv, n) and the value norm (B, H_kv, n).
  at::Tensor finish(const LayerView& view, at::Tensor s, const at::Tensor& norm) const;
  std::shared_ptr<Scorer> base_;
  double ratio_;
  ScoreSharing base_sharing_;
};

// ||W_O^(h) v_j||_1 per query head h of the group, averaged over the group: (B, H_kv, n) float32 (CriticalKV's
// value term; needs view.model and view.values).
at::Tensor projected_value_l1(const LayerView& view);

// DefensiveKV, as its authors' code computes it (FFY0/DefensiveKV, efficient_defensivekv_press.py; docs/methods/
// defensivekv.md): per query head and window row, the prefix attention is avg-pooled (kernel k) and rescaled to
// the row's mass; s_j = max over the group and the window, then max(s_j, mean_m s_m); then CriticalKV's value
// term as a share, s_j · ν_h,j / Σ_h' ν_h',j with ν = ||W_O v_j||_1 averaged over the group; then CriticalKV's
// first stage: per KV head, the entries of highest mean window attention, in order, until their normalized
// mass reaches 0.9 − b (b: the mean attention mass on the prefix's last w positions), at most
// `stage1_cap(n − w)` of them, get the layer's maximum score; the window gets that maximum too. Its budgets are
// AdaKV's without a floor (method "defensivekv"), or global across layers ("layer_defensivekv").
struct DefensiveKVOptions {
  int64_t window = 32;
  int64_t kernel = 5;
  double stage1_mass = 0.9;
  // The budget the method runs at: the first stage takes at most int(m (1 − r) − w) entries per head, m = n − w
  // the prefix length, as the authors' code computes it (a token budget N: N − w; a threshold: no cap).
  Budget budget = Budget::ratio(0.5);
  int64_t stage1_cap(int64_t n) const;
};
class DefensiveKVScorer : public Scorer {
 public:
  explicit DefensiveKVScorer(DefensiveKVOptions opt = {}) : opt_(opt) {}
  std::string name() const override { return "defensivekv"; }
  ScorerNeeds needs() const override;
  at::Tensor score(const LayerView& view) override;
  // One scoring for every budget: only the first stage's cap differs.
  std::vector<at::Tensor> score_budgets(const LayerView& view, const std::vector<Scorer*>& peers) override;

 private:
  struct Shared {       // what every budget shares
    at::Tensor s;       // (B, H_kv, n) the scores before the first stage
    at::Tensor prefix;  // (B, H_kv, n) bool: each row's entries before its window
    at::Tensor m;       // (B, H_kv, 1) int64: the prefix's length
    at::Tensor top;     // (B, 1, 1): each row's maximum score
    at::Tensor idx;     // (1, 1, n) int64: 0 .. n - 1
    at::Tensor order;   // (B, H_kv, n) int64: entries by mean window attention, descending (stable)
    at::Tensor reach;   // (B, H_kv, 1) int64: how many of them reach the first stage's mass, before the cap
  };
  Shared shared(const LayerView& view) const;
  at::Tensor finish(const Shared& r) const;
  DefensiveKVOptions opt_;
};

// CAKE (docs/methods/cake.md): the indicator I_j = mean_i A_ij + γ · Var_i A_ij over the last w window rows i
// (Var with Bessel's correction, as torch.var), avg-pooled (kernel k, zero padding counted), mean over the
// GQA group; the window itself gets max + 1 (as SnapKV). With every score it also computes the layer's
// preference P = H^(1/τ1) · V^(1/τ2) per batch row (returned by layer_preference()), where, over the query
// heads h, window rows i and prefix columns j (the window's own columns excluded):
//   H = −Σ_{h,i,j} A_hij · log(A_hij + 1e-10)   (the dispersion of window→prefix attention)
//   V = Σ_{h,j} Var_i A_hij                       (its shift across the window rows).
// The budgets B_ℓ ∝ P_ℓ are Allocation::Cake's (selector.h).
struct CakeOptions {
  int64_t window = 32;
  int64_t kernel = 5;
  double gamma = 200.0;
  double tau1 = 1.6;
  double tau2 = 0.4;
};
// I from the window→prefix attention a (B, H, w, m): (B, H, m) before pooling and the group reduce.
at::Tensor cake_indicator(const at::Tensor& a, double gamma);
// P per batch row from a (B, H, w, m).
std::vector<double> cake_preference(const at::Tensor& a, double tau1, double tau2);
class CakeScorer : public Scorer {
 public:
  explicit CakeScorer(CakeOptions opt = {}) : opt_(opt) {}
  std::string name() const override { return "cake"; }
  ScorerNeeds needs() const override;
  at::Tensor score(const LayerView& view) override;
  std::vector<double> layer_preference() const override { return pref_; }
  const CakeOptions& options() const { return opt_; }

 private:
  CakeOptions opt_;
  std::vector<double> pref_;
};

}  // namespace kvd
