// KVzip (arXiv 2505.23416; docs/methods/kvzip_kvzap.md): query-agnostic scores from context reconstruction.
// After the prompt is prefilled, the model is asked to repeat it: for each chunk of the context (chunk_size
// tokens), a "repeat" sequence = instruction + the chat template's assistant header + the chunk's tokens runs
// after the cache (Model::forward_extra: its K/V are never stored), and each cached entry j of the chunk gets
//   s_j = max over the repeat rows i and the query heads of its KV group of softmax_i(j),
// the softmax taken over the sinks, the chunk's entries and the repeat rows themselves (causally), as kvpress
// 0.5.5's KVzipPress computes it. KVzip+ (KVzipNorm::Plus) scales each term by ||W_O v_j|| / ||h_i||, h_i the
// repeat row's attention input: the KVzap regression target.
// A prompt that starts with the chat template's user-turn prefix has that prefix skipped (its entries, sinks
// aside, score 0), as kvpress does for its chat-formatted contexts; other prompts are repeated from token 0.
// The first n_sink positions score max(s) + 1 over the row's layers and heads (never evicted).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "models/kernel_path.h"

namespace kvd {

class Model;
class KVCache;
class Scorer;

enum class KVzipNorm {
  None,  // KVzip: the maximum attention
  Plus   // KVzip+: attention · ||W_O v_j|| / ||h_i||
};

struct KVzipOptions {
  int64_t n_sink = 4;
  int64_t chunk_size = 2048;  // context tokens reconstructed per pass
  int64_t prev_postfix = 8;   // tokens of the previous chunk quoted in a later chunk's instruction
  KVzipNorm norm = KVzipNorm::None;
  KernelPath kernels = KernelPath::Fused;  // the window-scores kernel (column maximum) where it applies
};

// The token ids the reconstruction pass is made of, from the model's tokenizer and chat template.
struct KVzipPrompts {
  std::vector<int64_t> first;   // "\n\nRepeat the previous context exactly."
  std::vector<int64_t> next;    // "\n\nRepeat the part of the previous context exactly, starting with"
  std::vector<int64_t> suffix;  // the template's text from the end of a user turn to the assistant header ("\n"
                                // without a template)
  std::vector<int64_t> prefix;  // the template's text before a user turn's content (empty without a template)
};
// Reads tokenizer.json and tokenizer_config.json of `model_dir` (a model without a chat template: suffix "\n").
KVzipPrompts kvzip_prompts(const std::string& model_dir);

// The scores of every entry of `cache` (batch B, each row's entries by position 0 .. N_b − 1 before any
// eviction of the context being scored): context[b] holds row b's N_b token ids. Returns [layer]
// (B, H_kv, n_l) float32 (float64 for a float64 model) in the cache's padded order (invalid entries 0).
// The cache is left unchanged. Rows of different lengths run together, each padded at its end.
std::vector<at::Tensor> kvzip_scores(const Model& model, const KVCache& cache,
                                     const std::vector<std::vector<int64_t>>& context, const KVzipPrompts& prompts,
                                     const KVzipOptions& options);

// The scores under several norms from one reconstruction pass (options.norm ignored): [norm k][layer], each equal to
// kvzip_scores with options.norm = norms[k] (KVzip and KVzip+ differ only in how the pass's attention is weighted).
std::vector<std::vector<at::Tensor>> kvzip_scores_norms(const Model& model, const KVCache& cache,
                                                        const std::vector<std::vector<int64_t>>& context,
                                                        const KVzipPrompts& prompts, const KVzipOptions& options,
                                                        const std::vector<KVzipNorm>& norms);

// The scorer: ScoreTiming::AfterForward; it records each row's token ids as they are appended (on_append) and
// runs kvzip_scores in prepare(). KVzip and KVzip+ scorers of one prefill with the same prompts and options
// otherwise are prepared from one reconstruction pass (Scorer::prepare_peers).
std::unique_ptr<Scorer> make_kvzip_scorer(KVzipPrompts prompts, KVzipOptions options);

}  // namespace kvd
