// Query rows (docs/methods/judgeq_lookaheadkv.md): n trained rows appended after the prompt, whose attention to
// the prompt ranks its KV entries once prefill is over; the rows' own K/V are never stored. One component, two
// presets:
//   judgeq     Judge-Q (arXiv 2509.10798): only the n row embeddings train
//   lookahead  LookaheadKV (arXiv 2603.10899): the rows plus LoRA on q, k, v, o, gate, up, down, active on the
//              rows alone (the prompt's rows stay the base model's, bit for bit)
// Loss: KL on attention renormalized over the prompt (LookaheadKV's, the default for both: it evaluated better
// than Judge-Q's MSE on raw attention), or MSE.
// Score of prompt entry j, per layer and KV head: s_j = mean over the rows i and the group's query heads of
// softmax(q_i·Kᵀ/√d)_j, optionally pooled over neighbouring entries; the selector keeps the top-k per head.
//
// Training target: the frozen model's own response Y to the prompt X (a `prepare responses` file; a document
// of packed text without context-only tokens is split in half). t_j = mean over the response rows and the
// group's query heads of their attention to prompt entry j. The efficient recipe (response_attention_targets
// and row_attention): X is prefilled once without gradients into a KVCache; Y is run after it, also without
// gradients, and t is summed from Y's queries against the cached keys by blocks of response rows (never
// |Y| × |X| per head at once); the cache is rewound to X and only the n rows run with gradients, as a short
// chunk at positions |X| .. |X|+n−1 against the cached K/V (Model::forward_extra).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/pimpl.h>

#include "gates/component.h"
#include "models/config.h"

namespace kvd {

class KVCache;

enum class QueryRowsLoss {
  Mse,  // Σ_j (s_j − t_j)² on raw attention (Judge-Q)
  Kl    // KL(t̂ ‖ ŝ) with s, t renormalized over the prompt's entries (LookaheadKV)
};
enum class ScorePooling { None, Mean, Max };  // over `pool_kernel` neighbouring entries (zero padding counted)

// LoRA target projections, as a bit set.
enum LoraTarget : uint32_t { kLoraQ = 1, kLoraK = 2, kLoraV = 4, kLoraO = 8, kLoraGate = 16, kLoraUp = 32, kLoraDown = 64 };
constexpr uint32_t kLoraAll = 127;
// "none" -> 0; "all" -> kLoraAll; "q,k,v,o,gate,up,down" (any subset, any order). Throws naming `key`.
uint32_t parse_lora_targets(const std::string& s, const std::string& key);
std::string lora_targets_name(uint32_t targets);  // "none" or the comma list in the order above

struct QueryRowsOptions {
  int64_t rows = 32;            // n
  uint32_t lora_targets = kLoraAll;
  int64_t lora_rank = 8;
  double lora_alpha = 32.0;     // LoRA scale = alpha / rank
  QueryRowsLoss loss = QueryRowsLoss::Kl;
  ScorePooling pooling = ScorePooling::Mean;
  int64_t pool_kernel = 7;      // odd
  int64_t max_response = 512;   // response rows of a sample that make its target (the first ones)
  int64_t target_block = 128;   // response rows per block when the target is summed
  int64_t budget = 128;         // KV entries per head of the trainer's held-out check
  double init_std = 0.02;       // rows ~ N(0, init_std); LoRA a ~ N(0, 1/in), b = 0 (the rows start plain)
};

// One layer's LoRA: parameters "<t>_a" (r, in) and "<t>_b" (out, r) for each target t in q, k, v, o, gate,
// up, down.
struct QueryRowsLoraImpl : torch::nn::Module {
  QueryRowsLoraImpl(const ModelConfig& cfg, uint32_t targets, int64_t rank, double scale);
  LayerLora lora() const;  // the deltas (a, b, scale) of the targets, the others undefined
  std::vector<std::pair<uint32_t, std::pair<at::Tensor, at::Tensor>>> deltas;  // (target, (a, b))
  double scale = 1.0;
};
TORCH_MODULE(QueryRowsLora);

class QueryRowsImpl : public Component {
 public:
  QueryRowsImpl(const ModelConfig& cfg, QueryRowsOptions options = {});

  std::string kind() const override { return "query_rows"; }
  const QueryRowsOptions& options() const { return opt_; }
  // "judgeq" without LoRA, "lookahead" with.
  std::string variant() const { return opt_.lora_targets == 0 ? "judgeq" : "lookahead"; }
  at::Tensor rows() const { return rows_; }  // (n, d) float32 parameter

  // The mods that append the rows (and their LoRA) after the cache's entries of every batch row, at positions
  // cache.next_position(b) + i.
  AttentionMods row_mods(const KVCache& cache);
  // The rows' mean attention per KV head onto every entry of `cache` (Model::forward_extra, in the graph when
  // grad mode is on): [layer] (B, H_kv, n_cache) float32 (float64 for a float64 model); the cache is unchanged.
  std::vector<at::Tensor> row_attention(const Model& model, const KVCache& cache);

  // The objective on one micro-batch: {"attention", mean over the batch's samples of the options().loss
  // between the rows' attention and the response's}. Samples without a prompt or a response are skipped.
  ComponentLoss loss(const Model& model, const TrainBatch& batch, const LossOptions& options) override;
  int64_t budget() const override { return opt_.budget; }
  // ScoreTiming::AfterForward: prepare() runs the rows against the prefilled cache, score() reads their pooled
  // attention of the layer (higher = keep).
  std::unique_ptr<Scorer> make_scorer() override;
  nlohmann::json manifest() const override;

 private:
  QueryRowsOptions opt_;
  int64_t d_model_ = 0, num_layers_ = 0, num_kv_heads_ = 0;
  at::Tensor rows_;  // (n, d)
  torch::nn::ModuleList layers_{nullptr};  // [layer] QueryRowsLora, empty without LoRA targets
};
TORCH_MODULE(QueryRows);

// ---- the pieces of the objective (free functions, so tests and bench/ can check them one by one) ----------

// One sample of a batch: row b, tokens [start, start + prompt) the prompt, then `response` response tokens.
struct PromptResponseSpan {
  int64_t row = 0, start = 0, prompt = 0, response = 0;
};
// The samples of a packed batch: each document (a run of equal doc_ids >= 0) whose first training target comes
// after its first token is split there (context-only tokens = the prompt, as a `prepare responses` file marks
// them); a document whose tokens are all targets is split in half. response is capped at max_response.
std::vector<PromptResponseSpan> prompt_response_spans(const TrainBatch& batch, int64_t max_response);

// Runs `response` (1, R) int64 after the prompt held in `cache` (batch 1, the prompt only, no grad needed) and
// returns the response rows' mean attention per KV head onto the prompt's entries: [layer] (1, H_kv, N) in
// float32 (float64 for a float64 model), N the prompt entries. Sums by blocks of `block` response rows; the
// cache is rewound to the prompt afterwards. Runs under no-grad.
std::vector<at::Tensor> response_attention_targets(const Model& model, KVCache& cache, const at::Tensor& response,
                                                   int64_t block);
// The loss between predicted and target attention, [layer] (B, H_kv, N) each: mean over layers, batch rows and
// heads of Σ_j (s − t)² (Mse) or KL(t̂ ‖ ŝ) (Kl). Returns a () tensor in the graph of `pred`.
at::Tensor query_rows_objective(const std::vector<at::Tensor>& pred, const std::vector<at::Tensor>& target,
                                QueryRowsLoss loss);

// The same two quantities by whole-sequence forwards (Model::forward_train), the plain way: the prompt and
// response in one forward with statistics over the response rows, and the prompt with the rows appended as
// extra rows (their LoRA on those rows). References for tests and bench/; (1, N) prompt, (1, R) response.
std::vector<at::Tensor> naive_response_targets(const Model& model, const at::Tensor& prompt, const at::Tensor& response);
std::vector<at::Tensor> naive_row_attention(const Model& model, QueryRowsImpl& rows, const at::Tensor& prompt);

// Neighbour pooling of scores (B, H_kv, n) along the last dim; kernel 1 or ScorePooling::None: unchanged.
at::Tensor pool_scores(const at::Tensor& s, ScorePooling pooling, int64_t kernel);

// The registry entry (gates/components.h): kind "query_rows", options component.preset (judgeq | lookahead),
// rows, lora_rank, lora_alpha, lora_targets, loss, pooling, pool_kernel, max_response, target_block, budget,
// init_std; loss term attention (1.0).
struct ComponentSpec;
ComponentSpec query_rows_spec();

}  // namespace kvd
