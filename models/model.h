// Model: the frozen decoder. One implementation for Llama (incl. llama3 / linear RoPE scaling), Mistral
// (sliding window), Qwen2 (q/k/v bias) and Qwen3 (q/k RMSNorm), driven by ModelConfig flags; GQA; tied
// embeddings.
//
// Two entry points:
//   forward_train  whole sequences (packed or not) with AttentionMods hooks, autograd-friendly: gradients
//                  flow into the tensors the mods supply (the weights themselves never require grad).
//   prefill/decode inference against a KVCache (no grad); positions come from the cache, RoPE is applied
//                  before append, and attention reads the stored positions (so it stays correct after
//                  eviction).
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include "models/activation_checkpointing.h"
#include "models/attention_mods.h"
#include "models/config.h"
#include "models/weights.h"

namespace kvd {

class KVCache;
struct KVLayerView;
struct StaticDecodeState;

struct ForwardOutput {
  at::Tensor hidden;                        // (B, S, d) after the final RMSNorm; S = T + extra rows
  std::vector<at::Tensor> attention_stats;  // [layer] (B, H, S) float32 (float64 model: float64);
                                            // undefined where not requested
};

enum class LogitsMode { LastPosition, AllPositions };

struct ExtraRowsOutput {
  at::Tensor hidden;                           // (B, n, d) the extra rows after the final RMSNorm
  std::vector<at::Tensor> attention_to_cache;  // [layer] (B, H, n_cache): the extra rows' mean softmax attention
                                               // per query head to each entry of cache.layer(layer) (its padded
                                               // order; invalid entries 0), float32 (float64 for a float64 model);
                                               // undefined under ExtraAttention::Fused
};

// What prefill shows an observer for one layer, right after the layer's attention ran and its K/V entries
// of this chunk were appended to the cache (so the observer may score and evict that layer's entries, as
// kvpress does from its attention hook). Nothing here holds T×T attention.
struct PrefillLayerObservation {
  int64_t layer = 0;
  at::Tensor hidden;            // (B, T, d) the attention input (after the input RMSNorm) of this chunk's rows
  at::Tensor queries_pre_rope;  // (B, H, T, hd) queries before RoPE (after q_norm for Qwen3)
  at::Tensor queries;           // (B, H, T, hd) post-RoPE queries
  at::Tensor query_positions;   // (B, T) int64 positions of this chunk's rows (-1 on padding rows)
  std::vector<int64_t> lead;    // [B] leading padding rows of each batch row (empty: none); rows
                                // [0, lead[b]) of hidden / queries are padding, never stored in the cache
  at::Tensor ids;               // (B, T) this chunk's token ids, int64 or int32 (padding rows included)
};
using PrefillObserver = std::function<void(const PrefillLayerObservation&, KVCache&)>;

// What forward_extra shows an observer for one layer, right after the extra rows' attention ran: their own
// projections, which are never stored, next to the cache's entries of that layer (unchanged).
struct ExtraRowsLayerObservation {
  int64_t layer = 0;
  at::Tensor hidden;     // (B, n, d) the rows' attention input (after the input RMSNorm)
  at::Tensor queries;    // (B, H, n, hd) post-RoPE
  at::Tensor keys;       // (B, H_kv, n, hd) the rows' own post-RoPE keys
  at::Tensor values;     // (B, H_kv, n, hd)
  at::Tensor positions;  // (B, n) int64
};
using ExtraRowsObserver = std::function<void(const ExtraRowsLayerObservation&, const KVLayerView& cached)>;

class Model {
 public:
  // Reads <model_dir>/config.json and its safetensors. dtype defaults to float32 on CPU, bfloat16 on CUDA.
  static Model load(const std::string& model_dir, c10::Device device,
                    std::optional<c10::ScalarType> dtype = std::nullopt);
  Model(ModelConfig cfg, DecoderWeights weights, c10::ScalarType dtype, c10::Device device);

  const ModelConfig& config() const { return cfg_; }
  const DecoderWeights& weights() const { return w_; }
  c10::ScalarType dtype() const { return dtype_; }
  c10::Device device() const { return device_; }

  // Training / scoring forward over whole sequences.
  //   ids        (B, T) int64 token ids
  //   positions  (B, T) int64 RoPE positions (reset per document when packed; see document_positions)
  //   doc_ids    (B, T) int64 or undefined: attention is causal and never crosses documents
  // Returns the final hidden states (B, T + n_extra, d) in the model dtype plus the requested statistics.
  // Layers whose mods leave attention alone run SDPA (one document), or on CUDA with mods.kernels = Fused flash
  // attention's variable-length form over packed documents (without grad mode: the teacher) or the fused kernel
  // of kernels/retention_attention.h; a layer with a bias / log-mask runs that kernel too where it applies, else
  // (and always with a pair bias) an explicit grouped softmax that holds (B, H, S, S) float32 scores.
  // For a teacher pass, wrap the call in torch::NoGradGuard.
  // checkpointing = Layers (and grad mode on): each decoder layer runs in a custom autograd function that keeps
  // only the layer's input and the tensors its mods supply; the backward runs the layer again (under the
  // forward's autocast state) and backpropagates through it. Gradients are those of the plain forward. The
  // layer_hook still runs once per layer, in the forward, in the graph (so what a component records there,
  // e.g. log beta for a regularizer, keeps its gradient); pair_bias closures run again in the backward and
  // must capture only leaf tensors (parameters), whose .grad then accumulates there. The Model must outlive
  // the backward.
  ForwardOutput forward_train(const at::Tensor& ids, const at::Tensor& positions,
                              const AttentionMods& mods = AttentionMods(),
                              const at::Tensor& doc_ids = at::Tensor(),
                              ActivationCheckpointing checkpointing = ActivationCheckpointing::None) const;
  // lm_head: (..., d) -> (..., V) in the model dtype. Apply to blocks of rows to bound memory.
  at::Tensor logits(const at::Tensor& hidden) const;
  // Input embeddings of ids: (B, T) -> (B, T, d), model dtype, no grad.
  at::Tensor embed(const at::Tensor& ids) const;

  // A cache sized for this model (its dtype and device).
  KVCache new_cache(int64_t batch) const;
  // Runs ids (B, T), appending their K/V to the cache (which may already hold earlier tokens: chunked
  // prefill). Row b's real tokens get positions cache.next_position(b), +1, ...
  // lead (optional, [B]): row b's first lead[b] tokens are left padding: they are neither stored nor attended
  // to, and their logits are meaningless. Rows of one batch may so hold prompts of different lengths.
  // Returns float32 logits (B, V) for the last position, or (B, T, V) with LogitsMode::AllPositions.
  // observer (optional) is called once per layer (see PrefillLayerObservation).
  at::Tensor prefill(const at::Tensor& ids, KVCache& cache, LogitsMode mode = LogitsMode::LastPosition,
                     const PrefillObserver& observer = PrefillObserver(),
                     const std::vector<int64_t>& lead = {}) const;
  // n extra rows (soft / lookahead query tokens, mods.extra) run after the cache's entries, for scoring them:
  // each extra row attends to every cached entry (by stored position; invalid entries never) and causally to
  // the extra rows before it. Their K/V are never stored, so the cache is left exactly as it was (the prompt's
  // logits and KV are those of a prefill without extra rows). mods.layer_hook is called once per layer with
  // the rows' normed input (LayerInput::seq_len = 0) and may return LayerMods::lora, applied to every extra
  // row; its other fields are refused. Runs with autograd when grad mode is on (gradients reach the
  // embeddings and the LoRA tensors), so a query-row method can train or score through the same layers.
  // observer (optional) is called once per layer with the rows' projections and the layer's cached entries, for
  // statistics other than the mean attention (KVzip's maximum over a chosen subset of keys).
  ExtraRowsOutput forward_extra(const KVCache& cache, const AttentionMods& mods,
                                const ExtraRowsObserver& observer = ExtraRowsObserver()) const;

  // One step: ids (B, 1) -> float32 logits (B, V). observer as in prefill.
  at::Tensor decode(const at::Tensor& ids, KVCache& cache, const PrefillObserver& observer = PrefillObserver()) const;
  // One greedy step over a fixed-shape state (models/static_decode.h): the step's K/V go to slot len[s] of each
  // (row, KV head) segment, each query attends over its head's own entries (kernels/decode_attention.h), and the
  // argmax becomes the next step's input token (also written to s.history). Fixed shapes and no host
  // synchronization, so that a CUDA graph can capture it. Rows never stop: the caller drops a finished row's tokens.
  void decode_static(StaticDecodeState& s) const;

 private:
  at::Tensor rope_cos_sin(const at::Tensor& positions) const;  // (B, S) -> (2, B, 1, S, hd) in dtype

  ModelConfig cfg_;
  DecoderWeights w_;
  c10::ScalarType dtype_;
  c10::Device device_;
  at::Tensor inv_freq_;  // (hd / 2) float64 on device, scaling applied
};

// Positions that restart at 0 wherever the document id changes along T: (B, T) -> (B, T) int64.
at::Tensor document_positions(const at::Tensor& doc_ids);
// 0 .. T-1 for every row: (B, T) int64 on `device`.
at::Tensor sequential_positions(int64_t batch, int64_t T, c10::Device device);
// The RoPE inverse frequencies of a config (hd / 2), float64 on CPU, with linear / llama3 scaling applied.
at::Tensor rope_inv_freq(const ModelConfig& cfg);

}  // namespace kvd
