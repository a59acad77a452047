// kvdistill eval --model DIR --tasks FILE.jsonl --methods m1,m2,... (--ratios 0.5,0.75,0.875 |
//   --budget-tokens 64,128,256 | --thresholds 0.5) --out DIR [--batch B] [--query-aware] [--device cuda]
// Every method at every budget on every sample, against the full cache (eval/runner.h); resumable.
#include <CLI/CLI.hpp>

#include <cmath>
#include <iostream>
#include <sstream>

#include "cli/commands.h"
#include "cli/common.h"
#include "common/error.h"
#include "eval/runner.h"

namespace kvd::cli {
namespace {

struct EvalArgs {
  std::string model, tasks, methods, ratios, budget_tokens, thresholds, out, device = "cpu";
  int64_t batch = 1, batch_tokens = 0, max_new_tokens = 32;
  bool query_aware = false, report_only = false;
  std::string learned_mode = "continuous";
  std::string share_prefill = "budgets";
  std::string join_prefill = "auto";
  double share_prefill_gib = 8.0;
  std::string decode = "auto";
  std::string kernels = "fused";
  std::string shard;
  int64_t continuous_chunk = 128;
  int64_t decode_rows = 256;
  double decode_logits_gib = 2.0;
  int64_t workers = 1;
  uint64_t seed = 0;
};

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ','))
    if (!item.empty()) out.push_back(item);
  return out;
}

int run(const EvalArgs& a) {
  if (a.report_only) {
    write_eval_reports(a.out);
    std::cerr << "wrote " << a.out << "/results.{json,csv,md}\n";
    return 0;
  }
  EvalOptions o;
  o.model_dir = a.model;
  o.tasks = a.tasks;
  o.out_dir = a.out;
  o.device = a.device;
  o.batch = a.batch;
  o.batch_tokens = a.batch_tokens;
  o.max_new_tokens = a.max_new_tokens;
  o.seed = a.seed;
  o.query = a.query_aware ? QueryMode::Aware : QueryMode::Agnostic;
  o.methods = split(a.methods);
  o.learned_mode = a.learned_mode == "once" ? LearnedMode::Once : LearnedMode::Continuous;
  KVD_CHECK(a.continuous_chunk > 0, "--continuous-chunk ", a.continuous_chunk, ": must be positive");
  o.continuous_chunk = a.continuous_chunk;
  o.share_prefill_bytes = static_cast<int64_t>(a.share_prefill_gib * 1073741824.0);
  o.share_prefill = a.share_prefill == "none"      ? SharePrefill::PerConfig
                    : a.share_prefill == "methods" ? SharePrefill::AcrossMethods
                                                   : SharePrefill::AcrossBudgets;
  o.join_prefill = a.join_prefill == "yes" ? JoinPrefill::Yes : a.join_prefill == "no" ? JoinPrefill::No : JoinPrefill::Auto;
  o.decode = parse_decode_path(a.decode);
  KVD_CHECK(a.decode_rows >= 0, "--decode-rows ", a.decode_rows, ": must be >= 0 (0 decodes every budget alone)");
  o.decode_rows = a.decode_rows;
  o.decode_logits_bytes = static_cast<int64_t>(a.decode_logits_gib * 1073741824.0);
  o.workers = a.workers;
  o.kernels = a.kernels == "reference" ? KernelPath::Reference : KernelPath::Fused;
  if (!a.shard.empty()) {
    const size_t slash = a.shard.find('/');
    int64_t k = -1, n = 0;
    try {
      size_t u1 = 0, u2 = 0;
      KVD_CHECK(slash != std::string::npos, "");
      k = std::stoll(a.shard.substr(0, slash), &u1);
      n = std::stoll(a.shard.substr(slash + 1), &u2);
      KVD_CHECK(u1 == slash && u2 == a.shard.size() - slash - 1, "");
    } catch (...) {
      KVD_FAIL("--shard '", a.shard, "': expected K/N, e.g. 0/4 (the samples at lines K, K + N, K + 2N, ...)");
    }
    KVD_CHECK(n > 0 && k >= 0 && k < n, "--shard ", a.shard, ": K must be in [0, N) and N positive");
    o.shard = {k, n};
  }
  KVD_CHECK((!a.ratios.empty()) + (!a.budget_tokens.empty()) + (!a.thresholds.empty()) == 1,
            "give exactly one of --ratios, --budget-tokens and --thresholds");
  for (const std::string& r : split(a.ratios)) {
    double v = 0;
    try {
      size_t used = 0;
      v = std::stod(r, &used);
      KVD_CHECK(used == r.size(), "");
    } catch (...) {
      KVD_FAIL("--ratios: '", r, "' is not a number");
    }
    KVD_CHECK(v >= 0.0 && v < 1.0, "--ratios: ", r, " is outside [0, 1) (the fraction of KV entries removed)");
    o.budgets.push_back(Budget::ratio(v));
  }
  for (const std::string& t : split(a.budget_tokens)) {
    int64_t v = 0;
    try {
      size_t used = 0;
      v = std::stoll(t, &used);
      KVD_CHECK(used == t.size(), "");
    } catch (...) {
      KVD_FAIL("--budget-tokens: '", t, "' is not an integer");
    }
    KVD_CHECK(v > 0, "--budget-tokens: ", t, " must be positive (KV entries kept per head)");
    o.budgets.push_back(Budget::tokens(v));
  }
  for (const std::string& t : split(a.thresholds)) {
    double v = 0;
    try {
      size_t used = 0;
      v = std::stod(t, &used);
      KVD_CHECK(used == t.size() && std::isfinite(v), "");
    } catch (...) {
      KVD_FAIL("--thresholds: '", t, "' is not a finite number");
    }
    o.budgets.push_back(Budget::threshold(v));
  }
  parse_device(a.device);  // a clear error for a bad device before anything runs
  run_eval(o);
  std::cerr << "wrote " << a.out << "/results.{jsonl,json,csv,md}; plot: python scripts/plot_results.py " << a.out
            << "\n";
  return 0;
}

Registration reg([](CLI::App& root) {
  auto a = std::make_shared<EvalArgs>();
  CLI::App* sub = root.add_subcommand(
      "eval", "Compare KV compression methods against the full cache on a task file (accuracy, KL, memory)");
  sub->add_option("--model", a->model, "Model directory")->required();
  sub->add_option("--tasks", a->tasks, "Task JSONL (kvdistill prepare tasks, or LongBench / RULER shaped)");
  sub->add_option("--methods", a->methods,
                  "Comma-separated: snapkv, tova, ..., adakv_<m>, global_<m>, h2o_decode, ..., gate:<bundle dir> "
                  "(full always runs)");
  sub->add_option("--ratios", a->ratios, "Comma-separated compression ratios in [0, 1) (fraction removed)");
  sub->add_option("--budget-tokens", a->budget_tokens, "Comma-separated KV entries kept per head");
  sub->add_option("--thresholds", a->thresholds,
                  "Comma-separated score thresholds: keep entries scoring >= each (e.g. attngate:<dir> at 0.5: its flags)");
  sub->add_option("--out", a->out, "Output directory (results.jsonl is appended; reruns skip what is done)")
      ->required();
  sub->add_option("--batch", a->batch, "Samples per batch (at most)")->capture_default_str();
  sub->add_option("--batch-tokens", a->batch_tokens,
                  "Also at most this many prompt tokens per batch, counting each row at the batch's longest prompt "
                  "(e.g. --batch 64 --batch-tokens 131072: 64 rows at 2K, 32 at 4K, 16 at 8K); 0: no limit")
      ->capture_default_str();
  sub->add_option("--shard", a->shard,
                  "K/N: only the task file's samples at lines K, K + N, K + 2N, ... (N processes or jobs, one shard "
                  "each, with their own --out; scripts/paired_bootstrap.py reads the directories as one)");
  sub->add_flag("--query-aware", a->query_aware, "Compress the question together with the context");
  sub->add_option("--max-new-tokens", a->max_new_tokens, "Answer length for samples that set none")
      ->capture_default_str();
  sub->add_option("--seed", a->seed, "Seed of the random method")->capture_default_str();
  sub->add_option("--device", a->device, "cpu | cuda | cuda:N")->capture_default_str();
  sub->add_option("--learned-mode", a->learned_mode,
                  "Learned parts: continuous (evict after every prefill chunk and decode step, as TRIM-KV runs) or "
                  "once (compress the prompt once after prefill)")
      ->check(CLI::IsMember({"continuous", "once"}))
      ->capture_default_str();
  sub->add_option("--continuous-chunk", a->continuous_chunk, "Prefill chunk of the continuous mode")
      ->capture_default_str();
  sub->add_option("--share-prefill", a->share_prefill,
                  "budgets: a method's budgets share one prefill per batch, scored once where its scores do not depend "
                  "on the budget, else by each budget (same results, faster); methods: "
                  "consecutive methods that score each layer as it runs and do not evict while decoding share one "
                  "prefill too (same results; the caches wait to decode: see --share-prefill-gib); none: every "
                  "(method, budget) prefills itself")
      ->check(CLI::IsMember({"budgets", "methods", "none"}))
      ->capture_default_str();
  sub->add_option("--share-prefill-gib", a->share_prefill_gib,
                  "With --share-prefill methods: another method joins a prefill while the compressed caches it holds "
                  "until they decode stay within this many GiB (estimated: a ratio r keeps 1 - r of the batch's full "
                  "cache)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  sub->add_option("--join-prefill", a->join_prefill,
                  "A continuous learned part's budgets that decode together (--decode-rows) prefill as the rows of "
                  "one batch, each row held at its own budget (same results): yes, no, or auto (on CUDA, where a "
                  "small model's chunks are launch-bound; on the CPU it cost 15% more prefill time). Not with "
                  "--share-prefill none")
      ->check(CLI::IsMember({"auto", "yes", "no"}))
      ->capture_default_str();
  sub->add_option("--decode", a->decode,
                  "The answer's decode steps: graph (a fixed-shape copy of the compressed cache, each step replayed "
                  "from a CUDA graph; CUDA only), static (the same without the graph), cache (step by step on the "
                  "cache), auto (graph on CUDA, cache elsewhere). Methods that evict while decoding use cache")
      ->check(CLI::IsMember({"auto", "graph", "static", "cache"}))
      ->capture_default_str();
  sub->add_option("--decode-rows", a->decode_rows,
                  "The budgets of one prefill (--share-prefill budgets or methods), and those of a continuous "
                  "learned part (each prefilled on its own, or together: --join-prefill), decode "
                  "their answers and teacher-forced passes as one "
                  "batch of up to this many rows and --decode-logits-gib of teacher-forced logits (same results per "
                  "sample, fewer small steps); 0: each budget alone")
      ->capture_default_str();
  sub->add_option("--decode-logits-gib", a->decode_logits_gib,
                  "The float32 teacher-forced logits budgets decoded together may hold (rows x (rest + answer) x "
                  "vocabulary); larger: fewer, larger decode batches, more device memory")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  sub->add_option("--workers", a->workers,
                  "Batches run at once, each by a thread on a CUDA stream of its own (same records; the memory caps "
                  "hold per worker; 2 took 19% less time than 1 on an H100, docs/decode.md)")
      ->capture_default_str();
  sub->add_option("--kernels", a->kernels,
                  "Scoring on CUDA: fused (the fused kernels where they apply: window attention for SnapKV, "
                  "PyramidKV, TOVA, H2O and the hit-rate oracle) or reference (LibTorch ops; what CPU runs use)")
      ->check(CLI::IsMember({"fused", "reference"}))
      ->capture_default_str();
  sub->add_flag("--report-only", a->report_only, "Only rebuild results.{json,csv,md} from --out/results.jsonl");
  on_run(sub, [a] {
    if (!a->report_only) {
      KVD_CHECK(!a->tasks.empty(), "--tasks is required");
      KVD_CHECK(!a->methods.empty(), "--methods is required");
    }
    return run(*a);
  });
});

}  // namespace
}  // namespace kvd::cli
