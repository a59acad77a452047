#include "eval/runner.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <map>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "common/error.h"
#include "common/fs.h"
#include "eval/tasks_io.h"
#include "export/gate_bundle.h"
#include "gates/compress.h"
#include "gates/decode_eviction.h"
#include "gates/heuristics.h"
#include "gates/retention_gate.h"
#include "models/chat_template.h"
#include "models/config.h"
#include "models/generate.h"
#include "models/kv_cache.h"
#include "models/model.h"
#include "models/tokenizer.h"

namespace kvd {
namespace {

using Clock = std::chrono::steady_clock;
using nlohmann::json;

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// --- methods ----------------------------------------------------------------------------------------------

bool is_gate(const std::string& name) { return name.rfind("gate:", 0) == 0; }

// A method of the comparison: the full cache, a compression method of gates/compress.h, a TRIM-KV gate
// bundle ("gate:<dir>", scored by the retention score and kept per head to the budget), or a decode-time
// method that compresses the prompt once and then holds every head at that size while the answer is
// generated (gates/decode_eviction.h):
//   h2o_decode     H2O at prefill, then each step evicts the lowest accumulated attention outside the
//                  recent half
//   tova_decode    TOVA at prefill, then each step evicts the current query's lowest-attention entry
//   lazy_eviction  H2O at prefill, then LazyEviction every 16 steps (idle time beyond the entry's maximum
//                  recurrence interval first)
struct DecodeMethod {
  const char* name;
  const char* prefill;
  DecodePolicy policy;
  int64_t interval;
};
const DecodeMethod kDecodeMethods[] = {{"h2o_decode", "h2o", DecodePolicy::H2O, 1},
                                       {"tova_decode", "tova", DecodePolicy::TOVA, 1},
                                       {"lazy_eviction", "h2o", DecodePolicy::LazyEviction, 16}};

struct EvalMethod {
  std::string name;
  bool full = false;
  Method method;
  RetentionGate gate{nullptr};  // keeps a gate alive next to its scorer
  const DecodeMethod* decode = nullptr;
};

EvalMethod make_eval_method(const std::string& name, const Budget& budget, const ModelConfig& cfg,
                            const std::string& model_dir, c10::Device device, uint64_t seed) {
  EvalMethod m;
  m.name = name;
  if (name == "full") {
    m.full = true;
    return m;
  }
  for (const DecodeMethod& d : kDecodeMethods)
    if (name == d.name) {
      m.method = make_method(d.prefill, budget, seed);
      m.method.name = name;
      m.decode = &d;
      return m;
    }
  if (!is_gate(name)) {
    try {
      m.method = make_method(name, budget, seed);
    } catch (const Error& e) {
      // Name the decode-time methods too.
      std::string msg = e.what();
      if (msg.find("unknown method") != std::string::npos)
        KVD_FAIL(msg, "; decode-time: h2o_decode, tova_decode, lazy_eviction; learned: gate:<bundle dir>");
      throw;
    }
    return m;
  }
  m.gate = load_retention_gate(cfg, model_dir, name.substr(5), device, seed);  // refuses another model's bundle
  m.method.name = name;
  m.method.scorer = m.gate->make_scorer();
  m.method.selector.budget = budget;
  return m;
}

std::string display_name(const std::string& name) {
  if (!is_gate(name)) return name;
  std::string dir = name.substr(5);
  while (!dir.empty() && dir.back() == '/') dir.pop_back();
  std::filesystem::path p(dir);
  // Trainer outputs end in <run>/bundle: name the run.
  if (p.filename() == "bundle" && p.has_parent_path()) p = p.parent_path();
  return "trimkv(" + p.filename().string() + ")";
}

// --- prompts ----------------------------------------------------------------------------------------------

struct Prepared {
  const EvalSample* sample = nullptr;
  std::vector<int64_t> span;  // compressed: the chat prompt up to the end of the context (+ question if Aware)
  std::vector<int64_t> rest;  // appended uncompressed, then the answer is generated
  int64_t max_new = 0;
};

std::vector<int64_t> to64(const std::vector<int32_t>& v) { return std::vector<int64_t>(v.begin(), v.end()); }

Prepared prepare(const EvalSample& s, const Tokenizer& tok, const ChatTemplate& chat, QueryMode query,
                 int64_t default_max_new) {
  const std::string text =
      chat.render({{"user", s.context + "\n\n" + s.question}}, AddGenerationPrompt::Yes) + s.answer_prefix;
  const size_t at = text.find(s.context);
  KVD_CHECK(at != std::string::npos, "sample ", s.id, ": the context is not in the rendered prompt");
  const size_t cut = at + s.context.size();
  Prepared p;
  p.sample = &s;
  p.span = to64(tok.encode(text.substr(0, cut)));
  p.rest = to64(tok.encode(text.substr(cut)));
  if (query == QueryMode::Aware) {
    // Everything but the last prompt token is compressed; generation starts from that token.
    p.span.insert(p.span.end(), p.rest.begin(), p.rest.end() - 1);
    p.rest.erase(p.rest.begin(), p.rest.end() - 1);
  }
  KVD_CHECK(!p.rest.empty() && !p.span.empty(), "sample ", s.id, ": empty prompt part");
  p.max_new = s.max_new_tokens > 0 ? s.max_new_tokens : default_max_new;
  return p;
}

// --- the per-batch run ----------------------------------------------------------------------------------

// What the full cache gives a batch: its answers, the log-probs over the teacher-forced positions and the
// attention its answer pays to the compressed span.
struct FullReference {
  std::vector<std::vector<int64_t>> answer;          // [row]
  std::vector<at::Tensor> logp;                      // [row] (|X| - 1, V) float32, on the model's device
  std::vector<std::vector<at::Tensor>> attention;    // [row][layer] (H_kv, |span|) float32 on the CPU
};

void sync(c10::Device d) {
  if (d.is_cuda()) torch::cuda::synchronize();
}

// Stable top-k of a row (ties to the lower index), as a membership mask.
std::vector<char> topk_members(const at::Tensor& row, int64_t k) {  // (n) float32 CPU
  const int64_t n = row.size(0);
  std::vector<char> in(n, 0);
  if (k <= 0) return in;
  at::Tensor order = std::get<1>(row.sort(/*stable=*/true, 0, /*descending=*/true));  // (n)
  const int64_t* o = order.data_ptr<int64_t>();
  for (int64_t i = 0; i < std::min(k, n); ++i) in[o[i]] = 1;
  return in;
}

struct RowResult {
  std::vector<int64_t> tokens;
  double score = 0, kl = 0, ppl = 0, hit_rate = 0, kept_fraction = 0;
  int64_t kept_bytes = 0, full_bytes = 0, peak_bytes = 0;
};

// Runs one method over a batch. With method.full, fills `ref`; otherwise reads it.
std::vector<RowResult> run_batch(const Model& model, const std::vector<const Prepared*>& rows, EvalMethod& m,
                                 FullReference& ref, double& prefill_s, double& decode_s) {
  const ModelConfig& cfg = model.config();
  const int64_t B = static_cast<int64_t>(rows.size()), L = cfg.num_layers, Hkv = cfg.num_kv_heads;
  std::vector<std::vector<int64_t>> spans, rests;
  std::vector<int64_t> max_new;
  for (const Prepared* p : rows) {
    spans.push_back(p->span);
    rests.push_back(p->rest);
    max_new.push_back(p->max_new);
  }
  KVCache cache = model.new_cache(B);
  std::vector<RowResult> out(B);

  // 1. The compressed span.
  auto t0 = Clock::now();
  if (m.full) {
    std::vector<int64_t> lead;
    at::Tensor ids = left_pad(spans, 0, lead);  // (B, T)
    model.prefill(ids, cache, LogitsMode::LastPosition, {}, lead);
  } else {
    compress_prefill(model, cache, spans, m.method);
  }
  sync(model.device());
  prefill_s = seconds_since(t0);
  // Kept context positions per (row, layer, KV head).
  std::vector<std::vector<std::vector<std::vector<int64_t>>>> kept(B, std::vector<std::vector<std::vector<int64_t>>>(L));
  for (int64_t l = 0; l < L; ++l) {
    at::Tensor pos = cache.layer(l).pos.to(torch::kCPU).contiguous();  // (B, H_kv, n)
    const int64_t n = pos.size(2);
    const int64_t* pp = pos.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < Hkv; ++h) {
        const int64_t len = cache.length(l, b, h);
        const int64_t* row = pp + (b * Hkv + h) * n;
        std::vector<int64_t> v(row, row + len);
        std::sort(v.begin(), v.end());
        kept[b][l].push_back(std::move(v));
      }
  }
  for (int64_t b = 0; b < B; ++b) {
    const int64_t span = static_cast<int64_t>(spans[b].size());
    out[b].kept_bytes = cache.row_bytes(b);
    out[b].full_bytes = span * L * Hkv * cache.bytes_per_entry();
    out[b].kept_fraction = static_cast<double>(out[b].kept_bytes) / static_cast<double>(out[b].full_bytes);
  }

  // 2. The answer.
  auto t1 = Clock::now();
  const std::vector<int64_t> before = cache.next_positions();
  GenerateOptions g;
  g.mode = SamplingMode::Greedy;
  g.max_new_tokens_per_row = max_new;
  std::unique_ptr<DecodeEvictor> evictor;
  if (m.decode) {
    DecodeTrigger trig;
    trig.interval = m.decode->interval;
    evictor = std::make_unique<DecodeEvictor>(model, m.decode->policy, trig);
    g.decode_observer = evictor->observer();
  }
  BatchGenerateResult gen = generate_batch(model, rests, cache, g);
  sync(model.device());
  decode_s = seconds_since(t1);
  std::vector<int64_t> stored(B);
  for (int64_t b = 0; b < B; ++b) {
    out[b].tokens = gen.tokens[b];
    out[b].peak_bytes = cache.row_peak_bytes(b);
    stored[b] = cache.next_position(b) - before[b];
  }
  cache.rewind(stored);
  if (m.full) {
    ref = FullReference();
    ref.answer = gen.tokens;
    ref.logp.resize(B);
    ref.attention.assign(B, std::vector<at::Tensor>(L));
  }

  // 3. Teacher-forced rest + the full cache's answer.
  std::vector<std::vector<int64_t>> xs(B);
  for (int64_t b = 0; b < B; ++b) {
    xs[b] = rests[b];
    xs[b].insert(xs[b].end(), ref.answer[b].begin(), ref.answer[b].end());
  }
  std::vector<int64_t> lead;
  at::Tensor ids = left_pad(xs, 0, lead);  // (B, Tx)
  PrefillObserver observer;
  if (m.full) {
    // 4. (reference side) the attention of the answer's queries to the compressed span.
    observer = [&](const PrefillLayerObservation& obs, KVCache& c) {
      const KVLayerView kv = c.layer(obs.layer);
      for (int64_t b = 0; b < B; ++b) {
        const int64_t nr = static_cast<int64_t>(ref.answer[b].size());
        const int64_t span = static_cast<int64_t>(spans[b].size());
        if (nr == 0) continue;
        const int64_t r0 = lead[b] + static_cast<int64_t>(rests[b].size());
        at::Tensor q = obs.queries.narrow(0, b, 1).narrow(2, r0, nr);          // (1, H, nr, hd)
        at::Tensor qp = obs.query_positions.narrow(0, b, 1).narrow(1, r0, nr);  // (1, nr)
        at::Tensor valid = kv.valid.defined() ? kv.valid.narrow(0, b, 1) : at::Tensor();
        at::Tensor a = window_attention(q, qp, kv.k.narrow(0, b, 1), kv.pos.narrow(0, b, 1), valid);  // (1, H, nr, n)
        at::Tensor per_kv = reduce_group(a.mean(2), Hkv, GroupReduce::Mean);  // (1, H_kv, n)
        ref.attention[b][obs.layer] = per_kv[0].narrow(1, 0, span).to(torch::kCPU, torch::kFloat).contiguous();
      }
    };
  }
  at::Tensor logits = model.prefill(ids, cache, LogitsMode::AllPositions, observer, lead);  // (B, Tx, V)
  for (int64_t b = 0; b < B; ++b) {
    const int64_t nx = static_cast<int64_t>(xs[b].size()), nrest = static_cast<int64_t>(rests[b].size());
    if (nx < 2) continue;
    at::Tensor lp = torch::log_softmax(logits[b].narrow(0, lead[b], nx - 1), -1);  // (nx - 1, V)
    if (m.full) ref.logp[b] = lp;
    at::Tensor rp = ref.logp[b];                                                   // (nx - 1, V)
    out[b].kl = (rp.exp() * (rp - lp)).sum(-1).mean().item<double>();
    // Perplexity of the full cache's answer: positions nrest - 1 .. nx - 2 predict the answer's tokens.
    const int64_t na = nx - nrest;
    if (na > 0) {
      at::Tensor tgt = torch::tensor(std::vector<int64_t>(xs[b].begin() + nrest, xs[b].end()), torch::kLong)
                           .to(lp.device());                                      // (na)
      at::Tensor nll = -lp.narrow(0, nrest - 1, na).gather(1, tgt.view({na, 1}));  // (na, 1)
      out[b].ppl = std::exp(nll.mean().item<double>());
    }
  }

  // 4. The critical-KV hit rate.
  for (int64_t b = 0; b < B; ++b) {
    double sum = 0;
    int64_t cnt = 0;
    for (int64_t l = 0; l < L; ++l) {
      const at::Tensor& att = ref.attention[b][l];  // (H_kv, span)
      if (!att.defined()) continue;
      for (int64_t h = 0; h < Hkv; ++h) {
        const std::vector<int64_t>& k = kept[b][l][h];
        if (k.empty()) continue;
        const std::vector<char> top = topk_members(att[h], static_cast<int64_t>(k.size()));
        int64_t hits = 0;
        for (int64_t p : k) hits += (p >= 0 && p < static_cast<int64_t>(top.size()) && top[p]) ? 1 : 0;
        sum += static_cast<double>(hits) / static_cast<double>(k.size());
        ++cnt;
      }
    }
    out[b].hit_rate = cnt > 0 ? sum / static_cast<double>(cnt) : 0.0;
  }
  return out;
}

// --- result files -------------------------------------------------------------------------------------------

std::string key_of(const std::string& method, const std::string& budget, const std::string& id) {
  return method + "\x1f" + budget + "\x1f" + id;
}

// Reads results.jsonl; a torn last line (a crash mid-write) is cut off so appends stay line-aligned.
std::vector<json> read_results(const std::string& path) {
  std::vector<json> out;
  if (!std::filesystem::exists(path)) return out;
  const std::string text = read_file(path);
  size_t good = 0, start = 0;
  while (start < text.size()) {
    const size_t nl = text.find('\n', start);
    if (nl == std::string::npos) break;
    const std::string line = text.substr(start, nl - start);
    if (!line.empty()) {
      try {
        out.push_back(json::parse(line));
      } catch (const json::exception&) {
        KVD_FAIL(path, ": line ", out.size() + 1, " is not valid JSON; remove it (or the file) and rerun");
      }
    }
    start = nl + 1;
    good = start;
  }
  if (good < text.size()) {
    std::cerr << "[eval] " << path << ": dropping a torn last line (" << text.size() - good << " bytes)\n";
    std::filesystem::resize_file(path, good);
  }
  return out;
}

// Appends lines and fsyncs, so what is reported done survives a crash.
void append_lines(const std::string& path, const std::vector<json>& lines) {
  if (lines.empty()) return;
  std::string buf;
  for (const json& j : lines) buf += j.dump() + "\n";
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  KVD_CHECK(fd >= 0, path, ": cannot be opened for appending");
  size_t off = 0;
  while (off < buf.size()) {
    const ssize_t w = ::write(fd, buf.data() + off, buf.size() - off);
    if (w < 0) {
      ::close(fd);
      KVD_FAIL(path, ": write failed (disk full?)");
    }
    off += static_cast<size_t>(w);
  }
  ::fsync(fd);
  ::close(fd);
}

std::string fmt(double v, int prec) {
  std::ostringstream os;
  os << std::fixed << std::setprecision(prec) << v;
  return os.str();
}

// Length bucket of a sample: the nearest power of two ("2K", "4K", "512").
int64_t length_bucket(int64_t len) {
  if (len <= 0) return 0;
  return int64_t{1} << static_cast<int64_t>(std::llround(std::log2(static_cast<double>(len))));
}
std::string bucket_label(int64_t b) { return b >= 1024 && b % 1024 == 0 ? std::to_string(b / 1024) + "K" : std::to_string(b); }

}  // namespace

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
  KVD_CHECK(opt.max_new_tokens > 0, "--max-new-tokens ", opt.max_new_tokens, ": must be positive");
  const ModelConfig cfg = load_config(opt.model_dir);
  const c10::Device cpu(c10::kCPU);
  for (const std::string& name : opt.methods)
    for (const Budget& b : opt.budgets) make_eval_method(name, b, cfg, opt.model_dir, cpu, opt.seed);
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
  std::filesystem::create_directories(opt.out_dir);
  const std::string results_path = opt.out_dir + "/results.jsonl";
  const std::string run_path = opt.out_dir + "/run.json";

  // Settings that change what a result means; a rerun into the same directory must match them.
  const json settings = {{"model", std::filesystem::path(opt.model_dir).filename().string()},
                         {"model_config_sha256", base_model_info(opt.model_dir).config_sha256},
                         {"tasks", opt.tasks},
                         {"tasks_sha256", sha256_hex(read_file(opt.tasks))},
                         {"query", opt.query == QueryMode::Aware ? "aware" : "agnostic"},
                         {"max_new_tokens", opt.max_new_tokens},
                         {"seed", opt.seed}};
  if (std::filesystem::exists(run_path)) {
    const json old = json::parse(read_file(run_path));
    for (auto it = settings.begin(); it != settings.end(); ++it)
      KVD_CHECK(old.contains(it.key()) && old[it.key()] == it.value(), "--out ", opt.out_dir,
                " holds results made with another ", it.key(), " (", old.value(it.key(), json()).dump(), " vs ",
                it.value().dump(), "); use a new --out directory");
  } else {
    write_file_atomic(run_path, settings.dump(2) + "\n");
  }

  std::set<std::string> done;
  for (const json& r : read_results(results_path))
    done.insert(key_of(r.at("method").get<std::string>(), r.at("budget").get<std::string>(), r.at("id").get<std::string>()));

  const std::vector<EvalSample> samples = read_eval_tasks(opt.tasks);
  c10::Device device(opt.device);
  KVD_CHECK(!device.is_cuda() || torch::cuda::is_available(), "--device ", opt.device,
            ": CUDA is not available here; use --device cpu");
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
  const auto t_start = Clock::now();
  int64_t computed = 0;
  for (size_t i0 = 0; i0 < order.size(); i0 += static_cast<size_t>(opt.batch)) {
    const size_t i1 = std::min(order.size(), i0 + static_cast<size_t>(opt.batch));
    std::vector<const Prepared*> rows(order.begin() + i0, order.begin() + i1);
    std::vector<const Config*> need;
    for (const Config& c : configs)
      for (const Prepared* p : rows)
        if (!done.count(key_of(c.method, c.budget, p->sample->id))) {
          need.push_back(&c);
          break;
        }
    if (need.empty()) continue;
    FullReference ref;
    bool have_ref = false;
    for (const Config& c : configs) {
      const bool needed = std::find(need.begin(), need.end(), &c) != need.end();
      if (!needed && c.method != "full") continue;  // the full cache always runs: it is the reference
      EvalMethod m = make_eval_method(c.method, c.b, model.config(), opt.model_dir, model.device(), opt.seed);
      KVD_CHECK(m.full || have_ref, "eval: internal error, no full-cache reference");
      double prefill_s = 0, decode_s = 0;
      std::vector<RowResult> res = run_batch(model, rows, m, ref, prefill_s, decode_s);
      if (m.full) have_ref = true;
      std::vector<json> lines;
      for (size_t r = 0; r < rows.size(); ++r) {
        const EvalSample& s = *rows[r]->sample;
        if (done.count(key_of(c.method, c.budget, s.id))) continue;
        std::vector<int32_t> toks;
        for (int64_t t : res[r].tokens)
          if (std::find(model.config().eos_token_ids.begin(), model.config().eos_token_ids.end(), t) ==
              model.config().eos_token_ids.end())
            toks.push_back(static_cast<int32_t>(t));
        const std::string output = tok.decode(toks, SkipSpecial::Yes);
        json j = {{"id", s.id},
                  {"task", s.task},
                  {"length", s.length},
                  {"method", c.method},
                  {"label", display_name(c.method)},
                  {"budget", c.budget},
                  {"span_tokens", rows[r]->span.size()},
                  {"output", output},
                  {"score", string_match(output, s.answers, match_rule_for(s.task))},
                  {"kl", res[r].kl},
                  {"ppl", res[r].ppl},
                  {"hit_rate", res[r].hit_rate},
                  {"kept_fraction", res[r].kept_fraction},
                  {"kv_bytes_full", res[r].full_bytes},
                  {"kv_bytes_kept", res[r].kept_bytes},
                  {"peak_kv_bytes", res[r].peak_bytes},
                  {"prefill_s", prefill_s / static_cast<double>(rows.size())},
                  {"decode_s", decode_s / static_cast<double>(rows.size())},
                  {"batch", rows.size()}};
        if (c.b.kind == BudgetKind::Ratio && c.method != "full") j["ratio"] = c.b.value;
        if (c.b.kind == BudgetKind::TokensPerHead && c.method != "full") j["budget_tokens"] = static_cast<int64_t>(c.b.value);
        lines.push_back(std::move(j));
        done.insert(key_of(c.method, c.budget, s.id));
      }
      append_lines(results_path, lines);
      computed += static_cast<int64_t>(lines.size());
      if (!lines.empty()) {
        const double el = seconds_since(t_start);
        const double eta = computed > 0 ? el / static_cast<double>(computed) * static_cast<double>(todo - computed) : 0;
        std::cerr << "[eval] " << computed << "/" << todo << " results | " << display_name(c.method) << " "
                  << c.budget << " | samples " << i1 << "/" << order.size() << " | " << fmt(el, 0) << " s, ETA "
                  << fmt(eta, 0) << " s\n";
      }
    }
  }
  write_eval_reports(opt.out_dir);
}

// --- reports ----------------------------------------------------------------------------------------------

void write_eval_reports(const std::string& out_dir) {
  const std::vector<json> rows = read_results(out_dir + "/results.jsonl");
  KVD_CHECK(!rows.empty(), out_dir, "/results.jsonl: no results yet");
  json settings = json::object();
  if (std::filesystem::exists(out_dir + "/run.json")) settings = json::parse(read_file(out_dir + "/run.json"));

  struct Acc {
    int64_t n = 0;
    double score = 0, kl = 0, log_ppl = 0, hit = 0, kept = 0, peak = 0, prefill = 0, decode = 0;
    void add(const json& r) {
      ++n;
      score += r.at("score").get<double>();
      kl += r.at("kl").get<double>();
      log_ppl += std::log(std::max(1e-30, r.at("ppl").get<double>()));
      hit += r.at("hit_rate").get<double>();
      kept += r.at("kept_fraction").get<double>();
      peak += static_cast<double>(r.at("peak_kv_bytes").get<int64_t>());
      prefill += r.at("prefill_s").get<double>();
      decode += r.at("decode_s").get<double>();
    }
    json to_json() const {
      const double d = static_cast<double>(std::max<int64_t>(1, n));
      return {{"n", n},           {"accuracy", 100.0 * score / d}, {"kl", kl / d},
              {"ppl", std::exp(log_ppl / d)}, {"hit_rate", hit / d}, {"kept_fraction", kept / d},
              {"peak_kv_bytes", peak / d}, {"prefill_s", prefill / d}, {"decode_s", decode / d}};
    }
  };
  // (method, budget) in first-seen order; per task and length bucket inside.
  std::vector<std::pair<std::string, std::string>> cfgs;
  std::map<std::pair<std::string, std::string>, std::string> labels;
  std::map<std::pair<std::string, std::string>, std::map<std::pair<std::string, int64_t>, Acc>> per;
  std::set<std::pair<std::string, int64_t>> cells;
  for (const json& r : rows) {
    const auto k = std::make_pair(r.at("method").get<std::string>(), r.at("budget").get<std::string>());
    if (!per.count(k)) cfgs.push_back(k);
    labels[k] = r.value("label", k.first);
    const auto cell = std::make_pair(r.at("task").get<std::string>(), length_bucket(r.at("length").get<int64_t>()));
    per[k][cell].add(r);
    cells.insert(cell);
  }
  // Overall numbers weight every (task, length) cell equally.
  auto overall = [&](const std::map<std::pair<std::string, int64_t>, Acc>& m) {
    json o = json::object();
    const char* keys[] = {"accuracy", "kl", "hit_rate", "kept_fraction", "peak_kv_bytes", "prefill_s", "decode_s"};
    double log_ppl = 0;
    int64_t n = 0;
    for (const char* key : keys) o[key] = 0.0;
    for (const auto& [cell, acc] : m) {
      const json a = acc.to_json();
      for (const char* key : keys) o[key] = o[key].get<double>() + a[key].get<double>() / static_cast<double>(m.size());
      log_ppl += std::log(a["ppl"].get<double>()) / static_cast<double>(m.size());
      n += acc.n;
    }
    o["ppl"] = std::exp(log_ppl);
    o["n"] = n;
    return o;
  };
  json out = {{"settings", settings}, {"configs", json::array()}};
  std::ostringstream csv;
  csv << "method,label,budget,task,length,n,accuracy,kl,ppl,hit_rate,kept_fraction,peak_kv_bytes,prefill_s,decode_s\n";
  for (const auto& k : cfgs) {
    json c = {{"method", k.first}, {"label", labels[k]}, {"budget", k.second}, {"overall", overall(per[k])},
              {"per_task", json::array()}};
    for (const auto& [cell, acc] : per[k]) {
      json a = acc.to_json();
      a["task"] = cell.first;
      a["length"] = cell.second;
      c["per_task"].push_back(a);
      csv << k.first << "," << labels[k] << "," << k.second << "," << cell.first << "," << cell.second << "," << acc.n
          << "," << fmt(a["accuracy"].get<double>(), 2) << "," << fmt(a["kl"].get<double>(), 5) << ","
          << fmt(a["ppl"].get<double>(), 4) << "," << fmt(a["hit_rate"].get<double>(), 4) << ","
          << fmt(a["kept_fraction"].get<double>(), 4) << "," << fmt(a["peak_kv_bytes"].get<double>(), 0) << ","
          << fmt(a["prefill_s"].get<double>(), 4) << "," << fmt(a["decode_s"].get<double>(), 4) << "\n";
    }
    out["configs"].push_back(c);
  }
  write_file_atomic(out_dir + "/results.json", out.dump(2) + "\n");
  write_file_atomic(out_dir + "/results.csv", csv.str());

  // Markdown: one table per metric (methods x budgets), then accuracy per task for each budget.
  std::vector<std::string> budgets, methods;
  for (const auto& k : cfgs) {
    if (k.first != "full" && std::find(budgets.begin(), budgets.end(), k.second) == budgets.end()) budgets.push_back(k.second);
    if (std::find(methods.begin(), methods.end(), k.first) == methods.end()) methods.push_back(k.first);
  }
  auto label_of = [&](const std::string& m) {
    for (const auto& [k, v] : labels)
      if (k.first == m) return v;
    return m;
  };
  auto find = [&](const std::string& m, const std::string& b) -> const json* {
    for (const json& c : out["configs"])
      if (c["method"] == m && c["budget"] == b) return &c;
    return nullptr;
  };
  std::ostringstream md;
  md << "# kvdistill eval\n\n";
  if (!settings.empty())
    md << "Model " << settings.value("model", std::string()) << ", tasks `" << settings.value("tasks", std::string())
       << "`, query-" << settings.value("query", std::string()) << ". Accuracy: RULER string match, every (task, "
       << "length) cell weighted equally. KL(full || method) over the teacher-forced question and full-cache "
       << "answer; hit rate: kept context entries among the top-k by the full answer's attention.\n\n";
  struct Metric {
    const char* key;
    const char* title;
    int prec;
    double scale;
  };
  const Metric metrics[] = {{"accuracy", "Accuracy (%)", 1, 1.0},
                            {"kl", "KL(full || method), nats per token", 4, 1.0},
                            {"hit_rate", "Critical-KV hit rate", 3, 1.0},
                            {"kept_fraction", "Kept fraction of the KV entries", 3, 1.0},
                            {"peak_kv_bytes", "Peak KV MiB per sample", 2, 1.0 / (1024.0 * 1024.0)}};
  const json* full = find("full", "none");
  for (const Metric& mt : metrics) {
    md << "## " << mt.title << "\n\n| method |";
    for (const std::string& b : budgets) md << " " << b << " |";
    md << "\n|---|";
    for (size_t i = 0; i < budgets.size(); ++i) md << "---:|";
    md << "\n";
    if (full) {
      md << "| full cache |";
      for (size_t i = 0; i < budgets.size(); ++i)
        md << " " << fmt((*full)["overall"][mt.key].get<double>() * mt.scale, mt.prec) << " |";
      md << "\n";
    }
    for (const std::string& m : methods) {
      if (m == "full") continue;
      md << "| " << label_of(m) << " |";
      for (const std::string& b : budgets) {
        const json* c = find(m, b);
        md << " " << (c ? fmt((*c)["overall"][mt.key].get<double>() * mt.scale, mt.prec) : std::string("-")) << " |";
      }
      md << "\n";
    }
    md << "\n";
  }
  // Per task: one table per budget (and the full cache's).
  std::vector<std::pair<std::string, int64_t>> cell_list(cells.begin(), cells.end());
  auto per_task_table = [&](const std::string& title, const std::vector<std::pair<std::string, std::string>>& rows_) {
    md << "## " << title << "\n\n| method |";
    for (const auto& c : cell_list) md << " " << c.first << " " << bucket_label(c.second) << " |";
    md << "\n|---|";
    for (size_t i = 0; i < cell_list.size(); ++i) md << "---:|";
    md << "\n";
    for (const auto& [m, b] : rows_) {
      md << "| " << (m == "full" ? std::string("full cache") : label_of(m)) << " |";
      for (const auto& cell : cell_list) {
        auto it = per[{m, b}].find(cell);
        md << " " << (it == per[{m, b}].end() ? std::string("-") : fmt(it->second.to_json()["accuracy"].get<double>(), 1)) << " |";
      }
      md << "\n";
    }
    md << "\n";
  };
  for (const std::string& b : budgets) {
    std::vector<std::pair<std::string, std::string>> rs;
    if (full) rs.push_back({"full", "none"});
    for (const std::string& m : methods)
      if (m != "full" && per.count({m, b})) rs.push_back({m, b});
    per_task_table("Accuracy (%) per task, " + b, rs);
  }
  if (budgets.empty() && full) per_task_table("Accuracy (%) per task, full cache", {{"full", "none"}});
  write_file_atomic(out_dir + "/results.md", md.str());
}

}  // namespace kvd
