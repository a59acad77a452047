// The pieces of `kvdistill eval` (eval/runner.h), one file each:
//   eval/batch.cpp    the prompts of a sample and the per-batch run of one method (compression, answer,
//                     teacher-forced KL / perplexity, critical-KV hit rate)
//   eval/results.cpp  results.jsonl: keys, reading (torn lines dropped), fsync'ed appends
//   eval/report.cpp   results.json / .csv / .md from results.jsonl
//   eval/runner.cpp   the run: settings, what is done, batches x configurations
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <nlohmann/json.hpp>

#include "eval/runner.h"
#include "eval/tasks_io.h"
#include "gates/registry.h"

namespace kvd {

class ChatTemplate;
class KVCache;
class Model;
class Tokenizer;

namespace evalrun {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t);

// ---- batch.cpp ----

struct Prepared {
  const EvalSample* sample = nullptr;
  std::vector<int64_t> span;  // compressed: the chat prompt up to the end of the context (+ question if Aware)
  std::vector<int64_t> rest;  // appended uncompressed, then the answer is generated
  int64_t max_new = 0;
};
Prepared prepare(const EvalSample& s, const Tokenizer& tok, const ChatTemplate& chat, QueryMode query,
                 int64_t default_max_new);

// What the full cache gives a batch: its answers, the log-probs over the teacher-forced positions and, per layer,
// the rank of every span position in the attention its answer pays to the span.
struct FullReference {
  std::vector<std::vector<int64_t>> answer;  // [row]
  std::vector<at::Tensor> logp;              // [row] (|X| - 1, V) float32, on the model's device
  std::vector<at::Tensor> rank;              // [layer] (B, H_kv, N) int64 on the model's device, N the longest span:
                                             // 0 = most attended (mean over the answer's rows and the GQA group;
                                             // ties to the lower position); positions past a row's span rank last
};

// The reference for n copies of the batch's rows one after another (budgets decoded together).
FullReference repeat_rows(const FullReference& ref, int64_t n);

struct RowResult {
  std::vector<int64_t> tokens;
  double score = 0, kl = 0, ppl = 0, hit_rate = 0, kept_fraction = 0;
  int64_t kept_bytes = 0, full_bytes = 0, peak_bytes = 0;
};

// Step 1 of a batch: every row's span compressed by each method of ms into a cache of its own. Methods that share a
// prefill (shares_prefill_with ms[0]: one name at several budgets, or methods scoring alike) are compressed from one
// prefill, scored once or by each budget's scorer (compress_prefill_many); otherwise (budgets of one method that
// compresses as the prompt streams in, e.g. a continuous learned part) each is prefilled on its own, or, with
// join > 1 and budgets that join a prefill (joins_prefill_with ms[0]), `join` budgets at a time as rows of one batch
// (the rows repeated per budget, each held at its own budget), each budget's cache then taken from its rows.
// prefill_s[i]: the seconds ms[i]'s prefill took (a shared prefill's whole time for each; a joined prefill's share).
std::vector<KVCache> compress_batch(const Model& model, const std::vector<const Prepared*>& rows,
                                   const std::vector<ResolvedMethod*>& ms, std::vector<double>& prefill_s,
                                   size_t join = 0);
// Steps 2-4 on one compressed cache: the answer, the teacher-forced KL / perplexity and the critical-KV hit
// rate. With m.full, fills `ref`; otherwise reads it.
// decode: how the answer is decoded (a method that evicts while decoding takes the cache path unless its policy has
// a fixed-shape form, DecodeEvictor::static_evictor); the path taken is returned in decode_path.
std::vector<RowResult> finish_batch(const Model& model, const std::vector<const Prepared*>& rows, ResolvedMethod& m,
                                    KVCache& cache, FullReference& ref, DecodePath decode, double& decode_s,
                                    DecodePath& decode_path);

// What resolves method names for this run: the registry (gates/registry.h), with bundles loaded for `model`.
MethodContext method_context(const Model& model, const std::string& model_dir, const EvalOptions& opt);

// ---- results.cpp ----

std::string key_of(const std::string& method, const std::string& budget, const std::string& id);
// Reads results.jsonl; a torn last line (a crash mid-write) is cut off so appends stay line-aligned.
std::vector<nlohmann::json> read_results(const std::string& path);
// Appends lines and fsyncs, so what is reported done survives a crash.
void append_lines(const std::string& path, const std::vector<nlohmann::json>& lines);
std::string fmt(double v, int prec);
// Length bucket of a sample: the nearest power of two ("2K", "4K", "512").
int64_t length_bucket(int64_t len);
std::string bucket_label(int64_t b);

}  // namespace evalrun
}  // namespace kvd
