#include "eval/runner.h"
#include "eval/run_parts.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>

#include <ATen/record_function.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "common/error.h"
#include "common/fs.h"
#include "common/json_error.h"
#include "models/device.h"
#include "eval/tasks_io.h"
#include "export/gate_bundle.h"
#include "gates/compress.h"
#include "gates/decode_eviction.h"
#include "gates/components.h"
#include "gates/heuristics.h"
#include "models/chat_template.h"
#include "models/config.h"
#include "models/generate.h"
#include "models/kv_cache.h"
#include "models/model.h"
#include "models/tokenizer.h"
namespace kvd {

using nlohmann::json;
using namespace evalrun;

std::string budget_key(const Budget& b) {
  std::ostringstream os;
  switch (b.kind) {
    case BudgetKind::Ratio: os << "ratio=" << b.value; break;
    case BudgetKind::TokensPerHead: os << "tokens=" << static_cast<int64_t>(b.value); break;
    case BudgetKind::Threshold: os << "threshold=" << b.value; break;
  }
  return os.str();
}

void validate_eval(const EvalOptions& opt) {
  KVD_CHECK(!opt.methods.empty(), "--methods: give at least one method (e.g. streaming_llm,snapkv)");
  KVD_CHECK(!opt.budgets.empty(), "give --ratios or --budget-tokens");
  KVD_CHECK(opt.batch > 0, "--batch ", opt.batch, ": must be positive");
  KVD_CHECK(opt.batch_tokens >= 0, "--batch-tokens ", opt.batch_tokens, ": must be positive (or 0: no token limit)");
  KVD_CHECK(opt.max_new_tokens > 0, "--max-new-tokens ", opt.max_new_tokens, ": must be positive");
  KVD_CHECK(opt.workers > 0, "--workers ", opt.workers, ": must be positive (1 runs the batches one after another)");
  // Every name and budget resolves (bundles are loaded on the CPU and checked against the model) before the
  // model is loaded.
  const ModelConfig cfg = load_config(opt.model_dir);
  const BaseModelInfo base = base_model_info(opt.model_dir);
  MethodContext ctx;
  ctx.seed = opt.seed;
  ctx.model_dir = opt.model_dir;
  ctx.learned_mode = opt.learned_mode;
  ctx.continuous_chunk = opt.continuous_chunk;
  ctx.load_bundle = [&](const std::string& dir) { return load_component(dir, cfg, c10::Device(c10::kCPU), base); };
  for (const std::string& name : opt.methods) {
    if (name.rfind("untrained:", 0) == 0 || name == "gate-untrained") {
      component_spec(name == "gate-untrained" ? "retention_gate" : name.substr(10), "--methods " + name);
      continue;
    }
    for (const Budget& b : opt.budgets) resolve_method(name, b, ctx);
  }
  const std::vector<EvalSample> samples = read_eval_tasks(opt.tasks);
  for (const Budget& b : opt.budgets) {
    if (b.kind != BudgetKind::TokensPerHead) continue;
    for (const EvalSample& s : samples)
      KVD_CHECK(static_cast<double>(s.length) > b.value, "--budget-tokens ", static_cast<int64_t>(b.value),
                " is not smaller than the context of sample ", s.id, " (", opt.tasks, ":", s.line, ", ", s.length,
                " tokens): it would keep everything; use a smaller budget");
  }
}

void run_eval(const EvalOptions& opt) {
  validate_eval(opt);
  make_dirs(opt.out_dir);
  const std::string results_path = opt.out_dir + "/results.jsonl";
  const std::string run_path = opt.out_dir + "/run.json";

  // Settings that change what a result means; a rerun into the same directory must match them. The model and the
  // tasks are named by file name and content hash, never by a machine path (a results directory moves between
  // machines); the task file's name is informative only (its hash decides).
  const json settings = {{"model", std::filesystem::path(opt.model_dir).filename().string()},
                         {"model_config_sha256", base_model_info(opt.model_dir).config_sha256},
                         {"tasks", std::filesystem::path(opt.tasks).filename().string()},
                         {"tasks_sha256", sha256_hex(read_file(opt.tasks))},
                         {"query", opt.query == QueryMode::Aware ? "aware" : "agnostic"},
                         {"max_new_tokens", opt.max_new_tokens},
                         {"learned_mode", opt.learned_mode == LearnedMode::Continuous ? "continuous" : "once"},
                         {"seed", opt.seed}};
  if (std::filesystem::exists(run_path)) {
    const json old = parse_json(read_file(run_path), run_path, "not valid JSON", "; use a new --out directory");
    KVD_CHECK(old.is_object(), run_path, ": expected a JSON object; use a new --out directory");
    for (auto it = settings.begin(); it != settings.end(); ++it)
      KVD_CHECK(it.key() == "tasks" || (old.contains(it.key()) && old[it.key()] == it.value()), "--out ", opt.out_dir,
                " holds results made with another ", it.key(), " (", old.value(it.key(), json()).dump(), " vs ",
                it.value().dump(), "); use a new --out directory");
  } else {
    write_file_atomic(run_path, settings.dump(2) + "\n");
  }

  std::set<std::string> done;
  with_json_context(results_path, "unexpected record (remove the file, or use a new --out directory)", [&] {
    for (const json& r : read_results(results_path))
      done.insert(key_of(r.at("method").get<std::string>(), r.at("budget").get<std::string>(), r.at("id").get<std::string>()));
  });

  std::vector<EvalSample> samples = read_eval_tasks(opt.tasks);
  const auto [shard, shards] = opt.shard;
  KVD_CHECK(shards > 0 && shard >= 0 && shard < shards, "eval: shard ", shard, "/", shards, " is not in [0, N)");
  if (shards > 1) {
    std::vector<EvalSample> mine;
    for (size_t i = static_cast<size_t>(shard); i < samples.size(); i += static_cast<size_t>(shards))
      mine.push_back(std::move(samples[i]));
    samples = std::move(mine);
    std::cerr << "[eval] shard " << shard << "/" << shards << ": " << samples.size() << " samples of " << opt.tasks
              << "\n";
  }
  const c10::Device device = parse_device(opt.device);
  const Tokenizer tok = Tokenizer::from_file(opt.model_dir);
  const ChatTemplate chat = ChatTemplate::from_file(opt.model_dir);
  std::vector<Prepared> prepared;
  for (const EvalSample& s : samples) prepared.push_back(prepare(s, tok, chat, opt.query, opt.max_new_tokens));
  // Batches of similar lengths (little padding); the order is fixed by the file, so reruns batch alike.
  std::vector<const Prepared*> order;
  for (const Prepared& p : prepared) order.push_back(&p);
  std::stable_sort(order.begin(), order.end(),
                   [](const Prepared* a, const Prepared* b) { return a->span.size() < b->span.size(); });

  // Configurations: the full cache, then every method at every budget.
  struct Config {
    std::string method, budget;
    Budget b;
  };
  std::vector<Config> configs = {{"full", "none", Budget()}};
  for (const std::string& m : opt.methods)
    if (m != "full")
      for (const Budget& b : opt.budgets) configs.push_back({m, budget_key(b), b});

  int64_t todo = 0;
  for (const Config& c : configs)
    for (const Prepared* p : order) todo += done.count(key_of(c.method, c.budget, p->sample->id)) ? 0 : 1;
  std::cerr << "[eval] " << samples.size() << " samples x " << configs.size() << " configurations (full + "
            << opt.methods.size() << " methods x " << opt.budgets.size() << " budgets); " << todo
            << " results to compute, " << done.size() << " already in " << results_path << "\n";
  if (todo == 0) {
    write_eval_reports(opt.out_dir);
    return;
  }

  const Model model = Model::load(opt.model_dir, device);
  const MethodContext ctx = method_context(model, opt.model_dir, opt);
  const auto t_start = Clock::now();
  int64_t computed = 0;
  // Batches: consecutive samples (shortest first), at most opt.batch of them and, with opt.batch_tokens, at most
  // that many span tokens counting every row at the batch's longest span (its padded size).
  std::vector<std::pair<size_t, size_t>> batches;
  for (size_t i0 = 0; i0 < order.size();) {
    size_t i1 = i0 + 1;
    while (i1 < order.size() && i1 - i0 < static_cast<size_t>(opt.batch) &&
           (opt.batch_tokens == 0 ||
            static_cast<int64_t>(i1 - i0 + 1) * static_cast<int64_t>(order[i1]->span.size()) <= opt.batch_tokens))
      ++i1;
    batches.emplace_back(i0, i1);
    i0 = i1;
  }
  // One batch: its full-cache reference, then every configuration it still needs. Workers run batches at once;
  // mu guards what they share (done, computed, results.jsonl, the progress line).
  std::mutex mu;
  // A fault for tests of the out-of-memory path below (tests/python/test_eval_workers.py), which a CPU cannot reach:
  // KVD_TEST_OOM=K makes the batch that starts at sample K run out of device memory after it has written its first
  // configuration group, while it runs beside other workers; KVD_TEST_OOM=K:always also when it runs alone.
  enum class BatchRun { BesideOthers, Alone };
  struct { int64_t sample = -1; bool always = false; } oom_fault;
  if (const char* f = std::getenv("KVD_TEST_OOM")) {
    const std::string fs(f);
    oom_fault.always = fs.size() > 7 && fs.substr(fs.size() - 7) == ":always";
    try {
      oom_fault.sample = std::stoll(fs.substr(0, oom_fault.always ? fs.size() - 7 : fs.size()));
    } catch (const std::exception&) {
      KVD_FAIL("KVD_TEST_OOM=", fs, ": expected a sample index K or K:always");
    }
  }
  auto run_batch = [&](size_t i0, size_t i1, BatchRun how) {
    std::vector<const Prepared*> rows(order.begin() + i0, order.begin() + i1);
    std::vector<const Config*> need;
    {
      std::lock_guard<std::mutex> lock(mu);
      for (const Config& c : configs)
        for (const Prepared* p : rows)
          if (!done.count(key_of(c.method, c.budget, p->sample->id))) {
            need.push_back(&c);
            break;
          }
    }
    if (need.empty()) return;
    // The configurations this batch runs (the full cache always: it is the reference), in order; consecutive
    // budgets of one method that can share a prefill (shares_prefill) are compressed from one prefill.
    std::vector<const Config*> run;
    for (const Config& c : configs)
      if (c.method == "full" || std::find(need.begin(), need.end(), &c) != need.end()) run.push_back(&c);
    FullReference ref;
    bool have_ref = false;
    // The batch's full cache in bytes, and the share of it a budget keeps (what a shared prefill holds until the
    // budgets decode; a budget other than a ratio counts as the whole cache).
    int64_t longest = 0;
    for (const Prepared* p : rows) longest = std::max<int64_t>(longest, static_cast<int64_t>(p->span.size()));
    const ModelConfig& mc = model.config();
    const double full_bytes = static_cast<double>(rows.size()) * static_cast<double>(longest) *
                              static_cast<double>(mc.num_layers * mc.num_kv_heads * 2 * mc.head_dim) *
                              static_cast<double>(c10::elementSize(model.dtype()));
    auto kept_share = [](const Budget& b) { return b.kind == BudgetKind::Ratio ? 1.0 - b.value : 1.0; };
    for (size_t g0 = 0; g0 < run.size();) {
      std::vector<ResolvedMethod> group{resolve_method(run[g0]->method, run[g0]->b, ctx)};
      size_t g1 = g0 + 1;
      double held = full_bytes * kept_share(run[g0]->b);
      // shared: the group's budgets (and methods) are compressed from one prefill. Otherwise the budgets of a method
      // that compresses as the prompt streams in (a continuous learned part) are each prefilled on their own but
      // still decode as one batch where --decode-rows allows it (joined): only for a scorer whose state is all in
      // the cache (payload columns and per-row state, FixedShape::Yes), which the joined cache carries.
      const bool shared = opt.share_prefill != SharePrefill::PerConfig && shares_prefill(group[0]);
      const bool joined = !group[0].full && !shares_prefill(group[0]) && group[0].method.scorer &&
                          group[0].method.scorer->needs().fixed_shape == FixedShape::Yes &&
                          opt.decode_rows / static_cast<int64_t>(rows.size()) >= 2;
      if (shared || joined)
        for (; g1 < run.size(); ++g1) {
          const bool same = run[g1]->method == run[g0]->method;
          if (!same && (!shared || opt.share_prefill != SharePrefill::AcrossMethods ||
                        held + full_bytes * kept_share(run[g1]->b) > static_cast<double>(opt.share_prefill_bytes)))
            break;
          ResolvedMethod next = resolve_method(run[g1]->method, run[g1]->b, ctx);
          if (shared && !shares_prefill_with(group[0], next)) break;
          held += full_bytes * kept_share(run[g1]->b);
          group.push_back(std::move(next));
        }
      std::vector<ResolvedMethod*> ms;
      for (ResolvedMethod& m : group) ms.push_back(&m);
      KVD_CHECK(group[0].full || have_ref, "eval: internal error, no full-cache reference");
      // The group's budgets are finished in runs of consecutive budgets whose rows decode as one batch: at most
      // opt.decode_rows rows, and at most opt.decode_logits_bytes of float32 logits in the teacher-forced pass (rows
      // x (rest + answer) x vocabulary), which is what a run adds to the device memory of one budget alone.
      const int64_t B = static_cast<int64_t>(rows.size());
      int64_t tx = 1;
      for (const Prepared* p : rows) tx = std::max<int64_t>(tx, static_cast<int64_t>(p->rest.size()) + p->max_new);
      const int64_t logits_per_budget = B * tx * model.config().vocab_size * 4;
      // Decode-time eviction holds each row at the count its budget kept, so budgets decode together too.
      const size_t per_run = static_cast<size_t>(
          std::max<int64_t>(1, std::min(opt.decode_rows / B, opt.decode_logits_bytes / logits_per_budget)));
      // Budgets that decode together and join a prefill (joins_prefill_with) are also prefilled together, in the same
      // runs, where opt.join_prefill says so: one chunked prefill of the run's rows, each row held at its own budget.
      const bool join_prefill = joined && opt.share_prefill != SharePrefill::PerConfig &&
                                (opt.join_prefill == JoinPrefill::Yes ||
                                 (opt.join_prefill == JoinPrefill::Auto && model.device().is_cuda())) &&
                                std::all_of(group.begin(), group.end(),
                                            [&](const ResolvedMethod& x) { return joins_prefill_with(group[0], x); });
      const size_t join = join_prefill ? per_run : 0;
      std::vector<double> prefill_s;  // [group member]
      std::vector<KVCache> caches;
      {
        // A scope of KVD_TRACE's recording (models/profile.h): the device time of the group's prefill and scoring.
        const std::string scope =
            "eval compress " + group[0].label + (group.size() > 1 ? " +" + std::to_string(group.size() - 1) : "");
        RECORD_USER_SCOPE(scope.c_str());
        caches = compress_batch(model, rows, ms, prefill_s, join);
      }
      std::vector<std::vector<RowResult>> res(group.size());
      std::vector<double> decode_s(group.size(), 0.0);
      std::vector<DecodePath> decode_path(group.size(), DecodePath::Cache);
      std::vector<int64_t> decoded_with(group.size(), B);  // rows decoded together
      std::vector<int64_t> prefilled_with(group.size(), B);  // rows prefilled together (joined)
      for (size_t r0 = 0; r0 < group.size(); r0 += per_run) {
        const size_t r1 = std::min(group.size(), r0 + per_run), n = r1 - r0;
        double ds = 0;
        DecodePath dp = DecodePath::Cache;
        std::vector<RowResult> out;
        const std::string scope = "eval answer " + group[r0].label + (n > 1 ? " +" + std::to_string(n - 1) : "");
        RECORD_USER_SCOPE(scope.c_str());
        if (n == 1) {
          out = finish_batch(model, rows, group[r0], caches[r0], ref, opt.decode, ds, dp);
          caches[r0] = KVCache(model.config(), 1, caches[r0].dtype(), caches[r0].device());  // its memory back now
        } else {
          std::vector<const KVCache*> parts;
          for (size_t gi = r0; gi < r1; ++gi) parts.push_back(&caches[gi]);
          KVCache merged = KVCache::concat_rows(parts);
          for (size_t gi = r0; gi < r1; ++gi) caches[gi] = KVCache(model.config(), 1, merged.dtype(), merged.device());
          std::vector<const Prepared*> rows_n;
          for (size_t i = 0; i < n; ++i) rows_n.insert(rows_n.end(), rows.begin(), rows.end());
          FullReference ref_n = repeat_rows(ref, static_cast<int64_t>(n));
          out = finish_batch(model, rows_n, group[r0], merged, ref_n, opt.decode, ds, dp);
        }
        for (size_t gi = r0; gi < r1; ++gi) {
          res[gi].assign(out.begin() + static_cast<int64_t>(gi - r0) * B, out.begin() + static_cast<int64_t>(gi - r0 + 1) * B);
          decode_s[gi] = ds / static_cast<double>(n);
          decode_path[gi] = dp;
          decoded_with[gi] = static_cast<int64_t>(n) * B;
          if (join > 1) prefilled_with[gi] = static_cast<int64_t>(n) * B;
        }
        if (group[r0].full) have_ref = true;
      }
      for (size_t gi = 0; gi < group.size(); ++gi) {
        const Config& c = *run[g0 + gi];
        ResolvedMethod& m = group[gi];
        std::lock_guard<std::mutex> lock(mu);  // done, computed, results.jsonl and the progress line
        std::vector<json> lines;
        for (size_t r = 0; r < rows.size(); ++r) {
          const EvalSample& s = *rows[r]->sample;
          if (done.count(key_of(c.method, c.budget, s.id))) continue;
          const RowResult& rr = res[gi][r];
          std::vector<int32_t> toks;
          for (int64_t t : rr.tokens)
            if (std::find(model.config().eos_token_ids.begin(), model.config().eos_token_ids.end(), t) ==
                model.config().eos_token_ids.end())
              toks.push_back(static_cast<int32_t>(t));
          const std::string output = tok.decode(toks, SkipSpecial::Yes);
          json j = {{"id", s.id},
                    {"task", s.task},
                    {"length", s.length},
                    {"method", c.method},
                    {"label", m.label},
                    {"budget", c.budget},
                    {"span_tokens", rows[r]->span.size()},
                    {"output", output},
                    {"score", string_match(output, s.answers, match_rule_for(s.task))},
                    {"kl", rr.kl},
                    {"ppl", rr.ppl},
                    {"hit_rate", rr.hit_rate},
                    {"kept_fraction", rr.kept_fraction},
                    {"kv_bytes_full", rr.full_bytes},
                    {"kv_bytes_kept", rr.kept_bytes},
                    {"peak_kv_bytes", rr.peak_bytes},
                    {"prefill_s", prefill_s[gi] / static_cast<double>(rows.size())},
                    {"decode_s", decode_s[gi] / static_cast<double>(rows.size())},
                    {"decode", decode_path_name(decode_path[gi])},
                    {"batch", rows.size()}};
          // prefill_s of a shared prefill is the whole prefill's (every budget of the group reports it); prefill_s of
          // a joined prefill and decode_s of budgets decoded together are each budget's share of the joint run.
          if (group.size() > 1 && shared) j["prefill_shared_by"] = group.size();
          if (decoded_with[gi] > B) j["decode_rows"] = decoded_with[gi];
          if (prefilled_with[gi] > B) j["prefill_rows"] = prefilled_with[gi];
          if (opt.kernels == KernelPath::Reference) j["kernels"] = "reference";  // --kernels reference (fused: absent)
          if (c.b.kind == BudgetKind::Ratio && c.method != "full") j["ratio"] = c.b.value;
          if (c.b.kind == BudgetKind::TokensPerHead && c.method != "full") j["budget_tokens"] = static_cast<int64_t>(c.b.value);
          lines.push_back(std::move(j));
          done.insert(key_of(c.method, c.budget, s.id));
        }
        append_lines(results_path, lines);
        if (static_cast<int64_t>(i0) == oom_fault.sample && (how == BatchRun::BesideOthers || oom_fault.always))
          TORCH_CHECK_WITH(OutOfMemoryError, false, "KVD_TEST_OOM: samples ", i0, "..", i1, " (a test fault)");
        computed += static_cast<int64_t>(lines.size());
        if (!lines.empty()) {
          const double el = seconds_since(t_start);
          const double eta = computed > 0 ? el / static_cast<double>(computed) * static_cast<double>(todo - computed) : 0;
          std::cerr << "[eval] " << computed << "/" << todo << " results | " << m.label << " " << c.budget
                    << " | samples " << i1 << "/" << order.size() << " | " << fmt(el, 0) << " s, ETA " << fmt(eta, 0)
                    << " s\n";
        }
      }
      g0 = g1;
    }
  };
  // A batch on its own: out of device memory is an error that says which flags make batches smaller.
  auto run_alone = [&](size_t bi) {
    try {
      run_batch(batches[bi].first, batches[bi].second, BatchRun::Alone);
    } catch (const c10::OutOfMemoryError& e) {
      KVD_FAIL("eval: samples ", batches[bi].first, "..", batches[bi].second, " ran out of device memory alone (",
               e.what_without_backtrace(), "); lower --batch-tokens, --share-prefill-gib or --decode-logits-gib");
    }
  };
  const size_t workers = std::min<size_t>(static_cast<size_t>(opt.workers), batches.size());
  if (workers <= 1) {
    for (size_t bi = 0; bi < batches.size(); ++bi) run_alone(bi);
  } else {
    // Each worker takes the next batch and runs it on a CUDA stream of its own, so that one batch's kernels may fill
    // the gaps another leaves while its host thread launches them (9% on the H100 slice of 2026-12-06: at 8K the
    // device is busy anyway). The first error stops the others after their batch (what they finished is written)
    // and is rethrown.
    std::cerr << "[eval] " << workers << " workers: batches run at once"
              << (device.is_cuda() ? ", each on a CUDA stream of its own" : "") << "\n";
    if (device.is_cuda()) torch::cuda::synchronize();  // the weights are on the device before other streams read them
    // A batch that runs out of device memory while others run beside it is put off, and its worker stops (a graph
    // capture it was recording is ended first: StaticDecoder). Once the workers are done, the allocator's cached blocks (each
    // stream keeps its own) go back to the driver and what is left runs here, one batch after another: the put-off
    // batches from the configurations they had not written, then any no worker took. Out of memory alone is an error.
    std::atomic<size_t> next{0};
    std::atomic<bool> failed{false};
    std::exception_ptr error;
    std::vector<size_t> left;
    std::vector<std::thread> pool;
    for (size_t w = 0; w < workers; ++w)
      pool.emplace_back([&] {
        at::init_num_threads();  // the intra-op thread count set for the run (the same CPU splits, the same roundings)
        WorkerStream stream(device);
        for (size_t bi = next++; bi < batches.size() && !failed; bi = next++) {
          try {
            run_batch(batches[bi].first, batches[bi].second, BatchRun::BesideOthers);
          } catch (const c10::OutOfMemoryError&) {
            std::lock_guard<std::mutex> lock(mu);
            std::cerr << "[eval] samples " << batches[bi].first << ".." << batches[bi].second
                      << " ran out of device memory beside other workers; this worker stops, and they run again "
                         "alone at the end\n";
            left.push_back(bi);
            return;
          } catch (...) {
            std::lock_guard<std::mutex> lock(mu);
            if (!error) error = std::current_exception();
            failed = true;
          }
        }
      });
    for (std::thread& t : pool) t.join();
    if (error) std::rethrow_exception(error);
    for (size_t bi = next; bi < batches.size(); ++bi) left.push_back(bi);
    std::sort(left.begin(), left.end());
    if (!left.empty()) release_cached_memory(device);
    for (size_t bi : left) run_alone(bi);
  }
  write_eval_reports(opt.out_dir);
}

}  // namespace kvd
