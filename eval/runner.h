// The evaluation harness behind `kvdistill eval`: every method at every budget on every sample of a task
// file, against the full cache, with real per-head eviction and real memory.
//
// Per batch of samples (left-padded rows; every number is per sample and equals a batch-1 run):
//   1. the compressed span (the chat prompt up to the end of the context; with QueryMode::Aware also the
//      question) is prefilled and compressed by the method (or kept whole: "full");
//   2. the rest of the prompt (question, end of turn, answer prefix) is appended uncompressed and the answer
//      is generated greedily: accuracy by RULER string match (eval/tasks_io.h);
//   3. that generation is rolled back (KVCache::rewind) and the rest of the prompt plus the full cache's
//      answer is teacher-forced: the KL(full || method) of the next-token distributions over those positions
//      and the perplexity of the full cache's answer under the method's cache;
//   4. the critical-KV hit rate: per layer and KV head, the share of the kept context entries that are among
//      the top-k (k = entries kept) by the attention the full cache's answer pays to the context (mean over
//      the answer's queries and the GQA group), averaged over layers and heads.
// Kept fraction = kept context entries / (layers x KV heads x context tokens); peak KV bytes = the sample's
// peak K+V bytes through compression and generation (KVCache::row_peak_bytes).
//
// Output (out_dir): results.jsonl (one line per sample x method x budget, appended and fsync'ed as each
// batch finishes, so a crash loses at most the batch in flight; a rerun skips what is there), run.json (the
// settings; a rerun with other settings is refused), and, rebuilt at the end from results.jsonl,
// results.json (aggregates), results.csv and results.md.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "gates/registry.h"
#include "gates/selector.h"
#include "models/generate.h"

namespace kvd {

enum class QueryMode {
  Agnostic,  // the question is not in the compressed span (kvpress's protocol)
  Aware      // the question is compressed together with the context
};

// Which configurations are compressed from one prefill (gates/registry.h: shares_prefill, shares_prefill_with).
enum class SharePrefill {
  PerConfig,      // every (method, budget) prefills the batch itself
  AcrossBudgets,  // one prefill per method where shares_prefill allows (default); scored once where the scores do
                  // not depend on the budget, else by each budget's scorer
  AcrossMethods   // AcrossBudgets, and consecutive methods that score each layer as it runs and do not evict while
                  // decoding share one prefill too, up to EvalOptions::share_prefill_bytes of compressed caches
};

// Whether the budgets of a continuous learned part (a chunked prefill each) that decode together are prefilled
// together too, as the rows of one batch, each row held at its own budget (joins_prefill_with; docs/decode.md). Every
// record is the same either way (up to rounding). The joint prefill attends over the longest budget's heads for every
// row: on the CPU, where the time is arithmetic, that cost 15% more prefill time (4 budgets, 2026-12-07); on a GPU a
// chunk of a small model is launch-bound, and a joint prefill launches once for all the budgets.
enum class JoinPrefill {
  Auto,  // on CUDA (the default)
  Yes,
  No
};

struct EvalOptions {
  std::string model_dir, tasks, out_dir, device = "cpu";
  std::vector<std::string> methods;  // compression methods and gate:<bundle dir>; "full" always runs
  std::vector<Budget> budgets;       // ratios or tokens per head
  int64_t batch = 1;         // samples per batch at most
  int64_t batch_tokens = 0;  // > 0: and at most this many span tokens per batch (rows x its longest span)
  QueryMode query = QueryMode::Agnostic;
  int64_t max_new_tokens = 32;  // for samples without their own
  uint64_t seed = 0;
  // Learned parts: Continuous (default; TRIM-KV holds every head at its budget through a chunked prefill and
  // while decoding) or Once (compress the prompt once after prefill).
  LearnedMode learned_mode = LearnedMode::Continuous;
  int64_t continuous_chunk = 128;  // prefill chunk of the continuous mode
  SharePrefill share_prefill = SharePrefill::AcrossBudgets;
  JoinPrefill join_prefill = JoinPrefill::Auto;  // not with SharePrefill::PerConfig
  // SharePrefill::AcrossMethods: another method joins a prefill while the caches it keeps alive until they decode
  // (estimated from the budgets: a ratio r keeps 1 − r of the batch's full cache) stay within this many bytes.
  int64_t share_prefill_bytes = int64_t{8} << 30;
  // The answer's decode steps (models/generate.h): auto = CUDA graphs on CUDA, the cache path elsewhere.
  DecodePath decode = DecodePath::Auto;
  // The budgets compressed from one prefill are decoded (answer, teacher-forced pass, hit rate) as one batch of
  // up to this many rows (their caches side by side, KVCache::concat_rows) and decode_logits_bytes of float32
  // teacher-forced logits (rows x (rest + answer) x vocabulary); 0 rows: each budget alone. Every record is what a
  // batch-1 run gives either way; a small step is launch-bound, so more rows per step cost little.
  int64_t decode_rows = 256;
  int64_t decode_logits_bytes = int64_t{2} << 30;
  // Scoring on CUDA: the scorers' fused kernels where they apply (window attention: kernels/window_scores.h), or
  // the LibTorch reference everywhere (what CPU runs use either way).
  KernelPath kernels = KernelPath::Fused;
  // Batches run at once, each by a worker thread on a CUDA stream of its own (1: the calling thread, in order),
  // so that other workers' kernels may fill the idle time a launch-bound batch leaves on the device; every record
  // is the same. The memory caps above (share_prefill_bytes, decode_logits_bytes) hold per worker. Results are
  // appended in the order batches finish. On an H100 two workers took 19% less time than one, with identical
  // records: at 8K the device is busy most of the time anyway (docs/decode.md).
  int64_t workers = 1;
  // Shard {k, n}: only the samples at positions k, k + n, k + 2n, ... of the task file (one of n jobs).
  std::pair<int64_t, int64_t> shard = {0, 1};
};

// Checks methods, budgets and the task file (clear errors) before loading the model.
void validate_eval(const EvalOptions& opt);
// Runs whatever is not in out_dir/results.jsonl yet, then writes the reports.
void run_eval(const EvalOptions& opt);
// Rebuilds results.json / results.csv / results.md from out_dir/results.jsonl.
void write_eval_reports(const std::string& out_dir);

// "ratio=0.5" / "tokens=128" / "threshold=..": the budget's key in the result files.
std::string budget_key(const Budget& b);

}  // namespace kvd
