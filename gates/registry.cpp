#include "gates/registry.h"

#include <cmath>
#include <filesystem>
#include <sstream>

#include "common/error.h"
#include "gates/component.h"
#include "gates/components.h"
#include "gates/heuristics.h"
#include "gates/kvzip.h"
#include "models/model.h"

namespace kvd {
namespace {

bool starts_with(const std::string& s, const std::string& p) { return s.rfind(p, 0) == 0; }

// ---- the table ---------------------------------------------------------------------------------------------

// What a heuristic may be built from besides its name.
struct ScorerContext {
  uint64_t seed = 0;
  std::string model_dir;  // KVzip reads the model's tokenizer and chat template
  Budget budget;          // DefensiveKV caps its first stage by the budget
};

std::shared_ptr<Scorer> defensivekv(const ScorerContext& c) {
  DefensiveKVOptions o;
  o.budget = c.budget;
  return std::make_shared<DefensiveKVScorer>(o);
}

// KVzip's scorer: the reconstruction prompts come from the model directory.
std::shared_ptr<Scorer> kvzip(const ScorerContext& c, KVzipNorm norm) {
  KVD_CHECK(!c.model_dir.empty(), "kvzip needs the model's tokenizer and chat template for its repeat prompt: pass the "
            "model directory (MethodContext::model_dir)");
  KVzipOptions o;
  o.norm = norm;
  return std::shared_ptr<Scorer>(make_kvzip_scorer(kvzip_prompts(c.model_dir), o));
}

// Heuristic scorers by base name.
struct HeuristicEntry {
  const char* name;
  std::function<std::shared_ptr<Scorer>(const ScorerContext&)> make;
  ScoreSharing sharing = ScoreSharing::AcrossBudgets;
};
const std::vector<HeuristicEntry>& heuristics() {
  static const std::vector<HeuristicEntry> t = {
      {"random", [](const ScorerContext& c) { return std::make_shared<RandomScorer>(c.seed); }, ScoreSharing::PerBudget},
      {"knorm", [](const ScorerContext&) { return std::make_shared<KNormScorer>(); }},
      {"streaming_llm", [](const ScorerContext&) { return std::make_shared<StreamingLLMScorer>(); }},
      {"h2o", [](const ScorerContext&) { return std::make_shared<H2OScorer>(H2ONorm::Sum); }},
      {"observed_attention", [](const ScorerContext&) { return std::make_shared<H2OScorer>(H2ONorm::PerObservingQuery); }},
      {"snapkv", [](const ScorerContext&) { return std::make_shared<SnapKVScorer>(); }},
      {"pyramidkv", [](const ScorerContext&) { return std::make_shared<SnapKVScorer>(); }},
      {"tova", [](const ScorerContext&) { return std::make_shared<TOVAScorer>(); }},
      {"keydiff", [](const ScorerContext&) { return std::make_shared<KeyDiffScorer>(); }},
      {"expected_attention", [](const ScorerContext&) { return std::make_shared<ExpectedAttentionScorer>(); }},
      {"defensivekv", defensivekv, ScoreSharing::PerBudget},
      {"layer_defensivekv", defensivekv, ScoreSharing::PerBudget},
      {"cake", [](const ScorerContext&) { return std::make_shared<CakeScorer>(); }},
      {"kvzip", [](const ScorerContext& c) { return kvzip(c, KVzipNorm::None); }},
      {"kvzip_plus", [](const ScorerContext& c) { return kvzip(c, KVzipNorm::Plus); }},
  };
  return t;
}

// Decode-time methods: a prefill heuristic, then a policy while decoding.
struct DecodeEntry {
  const char* name;
  const char* prefill;
  DecodeSchedule schedule;
  const char* doc;
};
const std::vector<DecodeEntry>& decode_methods() {
  static const std::vector<DecodeEntry> t = {
      {"h2o_decode", "h2o", {DecodePolicy::H2O, 1}, "H2O, then each step evicts the lowest accumulated attention outside the recent half"},
      {"tova_decode", "tova", {DecodePolicy::TOVA, 1}, "TOVA, then each step evicts the current query's lowest-attention entry"},
      {"lazy_eviction", "h2o", {DecodePolicy::LazyEviction, 16}, "H2O, then LazyEviction every 16 steps"},
      {"streaming_llm_decode", "streaming_llm", {DecodePolicy::Scorer, 1}, "StreamingLLM sinks + recent window, held while decoding"},
  };
  return t;
}

void check_budget(const Budget& budget) {
  switch (budget.kind) {
    case BudgetKind::Ratio:
      KVD_CHECK(std::isfinite(budget.value) && budget.value >= 0.0 && budget.value < 1.0,
                "--ratio must lie in [0, 1) (the fraction of tokens removed, as in kvpress), got ", budget.value);
      break;
    case BudgetKind::TokensPerHead:
      KVD_CHECK(std::isfinite(budget.value) && budget.value >= 1.0 && budget.value == std::floor(budget.value),
                "--budget-tokens must be a positive whole number of tokens per KV head, got ", budget.value);
      break;
    case BudgetKind::Threshold:
      KVD_CHECK(std::isfinite(budget.value), "--threshold must be a finite score, got ", budget.value);
      break;
  }
}

// "<run>" for ".../<run>/bundle", else the directory's own name.
std::string bundle_label(const std::string& kind, const std::string& dir_in) {
  std::string dir = dir_in;
  while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
  std::filesystem::path p(dir);
  if (p.filename() == "bundle" && p.has_parent_path()) p = p.parent_path();
  return kind + "(" + p.filename().string() + ")";
}

// A learned part as a method at `budget`, in ctx.learned_mode.
ResolvedMethod learned(const std::string& name, std::shared_ptr<Component> c, const Budget& budget,
                       const MethodContext& ctx) {
  ResolvedMethod r;
  r.name = name;
  r.component = std::move(c);
  r.method.name = name;
  r.method.scorer = r.component->make_scorer();
  r.method.selector.budget = budget;
  // A scorer that rates a cache only after a whole forward (query rows appended to the prompt) acts once, after
  // prefill, in either mode: that is how its method is defined.
  if (ctx.learned_mode == LearnedMode::Continuous && r.method.scorer->needs().timing == ScoreTiming::PerLayer) {
    KVD_CHECK(ctx.continuous_chunk > 0, "the continuous mode's prefill chunk must be positive");
    r.compress.chunk_size = ctx.continuous_chunk;
    r.compress.chunk_budget = ChunkBudget::Final;
    // A threshold evicts what scores below it after every chunk; it holds no count for decoding to keep, so
    // the cache grows by the generated tokens.
    if (budget.kind != BudgetKind::Threshold) r.decode = DecodeSchedule{DecodePolicy::Scorer, 1};
  } else {
    r.method.sharing = ScoreSharing::AcrossBudgets;  // a component's scores never read the budget
  }
  return r;
}

}  // namespace

std::vector<std::string> method_names() {
  std::vector<std::string> out;
  for (const HeuristicEntry& h : heuristics()) out.push_back(h.name);
  return out;
}

std::string known_methods() {
  std::ostringstream os;
  for (const HeuristicEntry& h : heuristics()) os << h.name << ", ";
  os << "full; prefixes adakv_ / criticalkv_ / global_; decode-time: ";
  bool first = true;
  for (const DecodeEntry& d : decode_methods()) os << (first ? "" : ", ") << d.name, first = false;
  os << "; learned: gate:<bundle dir>, <kind>:<bundle dir>, <variant>:<bundle dir>, untrained:<kind>, each with an "
        "optional adakv_ / global_ / pyramid_ prefix (kinds: ";
  first = true;
  std::string variants;
  for (const std::string& k : component_kinds()) {
    os << (first ? "" : ", ") << k, first = false;
    const ComponentSpec& spec = component_spec(k, "known_methods");
    for (const std::string& a : spec.aliases) os << " (alias " << a << ")";
    for (const std::string& v : spec.variants) variants += (variants.empty() ? "" : ", ") + v;
  }
  os << (variants.empty() ? "" : "; variants: " + variants) << ")";
  return os.str();
}

bool is_bundle_method(const std::string& name_in) {
  std::string name = name_in;
  for (const char* p : {"adakv_", "global_", "pyramid_"})
    if (starts_with(name, p) && name.find(':') != std::string::npos) name = name.substr(std::string(p).size());
  if (starts_with(name, "gate:")) return true;
  const size_t colon = name.find(':');
  return colon != std::string::npos && name.substr(0, colon) != "untrained" &&
         (find_component(name.substr(0, colon)) || find_component_variant(name.substr(0, colon)));
}

Method make_method(const std::string& name, double ratio, uint64_t seed) {
  KVD_CHECK(std::isfinite(ratio) && ratio >= 0.0 && ratio < 1.0,
            "--ratio must lie in [0, 1) (the fraction of tokens removed, as in kvpress), got ", ratio);
  return make_method(name, Budget::ratio(ratio), seed);
}

Method make_method(const std::string& name, const Budget& budget, uint64_t seed, const std::string& model_dir) {
  check_budget(budget);
  Method m;
  m.name = name;
  m.selector.budget = budget;
  std::string base = name;
  bool critical = false;
  for (;;) {
    if (starts_with(base, "adakv_")) {
      m.selector.allocation = Allocation::AdaKV;
      base = base.substr(6);
    } else if (starts_with(base, "global_")) {
      m.selector.allocation = Allocation::Global;
      base = base.substr(7);
    } else if (starts_with(base, "criticalkv_")) {
      critical = true;
      base = base.substr(11);
    } else {
      break;
    }
  }
  for (const HeuristicEntry& h : heuristics())
    if (base == h.name) {
      m.scorer = h.make(ScorerContext{seed, model_dir, budget});
      m.sharing = h.sharing;
    }
  KVD_CHECK(m.scorer != nullptr, "--method: unknown method '", name, "'; known: ", known_methods());
  if (base == "pyramidkv") {
    KVD_CHECK(m.selector.allocation == Allocation::Uniform, "pyramidkv sets its own layer budgets; it takes no prefix");
    KVD_CHECK(budget.kind == BudgetKind::Ratio, "pyramidkv's layer budgets need --ratio");
    m.selector.allocation = Allocation::Pyramid;
    m.selector.pyramid_window = static_cast<SnapKVScorer*>(m.scorer.get())->options().window;
  }
  if (base == "defensivekv" || base == "layer_defensivekv") {
    KVD_CHECK(m.selector.allocation == Allocation::Uniform, base, " sets its own budgets; it takes no prefix");
    m.selector.allocation = base == "defensivekv" ? Allocation::AdaKV : Allocation::Global;
    m.selector.ada_alpha = 0.0;  // one top-k over the layer's heads, no per-head floor (the authors' code)
  }
  // KVzip ranks every layer and head together unless a prefix says otherwise (kvpress's default, layerwise=False).
  if ((base == "kvzip" || base == "kvzip_plus") && m.selector.allocation == Allocation::Uniform)
    m.selector.allocation = Allocation::Global;
  if (base == "cake") {
    KVD_CHECK(m.selector.allocation == Allocation::Uniform && !critical, "cake sets its own layer budgets; it takes no prefix");
    KVD_CHECK(budget.kind != BudgetKind::Threshold, "cake splits a token budget over layers: use --ratio or --budget-tokens");
    m.selector.allocation = Allocation::Cake;
  }
  if (critical) {
    KVD_CHECK(budget.kind == BudgetKind::Ratio, "criticalkv_ splits its budget by a ratio: use --ratio");
    m.scorer = std::make_shared<CriticalKVScorer>(m.scorer, budget.value, m.sharing);
    m.sharing = ScoreSharing::PerBudget;  // its first stage keeps a share of the budget
  }
  return m;
}

bool shares_prefill(const ResolvedMethod& m) {
  return !m.full && m.compress.chunk_size == 0 &&
         (m.method.sharing == ScoreSharing::AcrossBudgets || m.method.scorer->needs().timing == ScoreTiming::PerLayer);
}

bool shares_prefill_with(const ResolvedMethod& a, const ResolvedMethod& b) {
  if (!shares_prefill(a) || !shares_prefill(b)) return false;
  if (a.name == b.name) return true;
  // Methods of one timing: scored after each layer, or all prepared once the forward ended (Scorer::prepare_peers:
  // KVzip and KVzip+ then share their reconstruction pass).
  return !a.decode && !b.decode && a.method.scorer->needs().timing == b.method.scorer->needs().timing &&
         a.compress.chunk_budget == b.compress.chunk_budget && a.compress.kernels == b.compress.kernels;
}

bool joins_prefill_with(const ResolvedMethod& a, const ResolvedMethod& b) {
  if (a.full || b.full || a.name != b.name || !a.component || !b.component || shares_prefill(a)) return false;
  const Budget &ba = a.method.selector.budget, &bb = b.method.selector.budget;
  return a.method.scorer->needs().fixed_shape == FixedShape::Yes && ba.kind == bb.kind &&
         ba.kind != BudgetKind::Threshold && a.method.selector.allocation == b.method.selector.allocation &&
         a.compress.chunk_size == b.compress.chunk_size && a.compress.chunk_budget == b.compress.chunk_budget &&
         a.compress.kernels == b.compress.kernels && a.decode.has_value() == b.decode.has_value();
}

namespace {

ResolvedMethod resolve(const std::string& name, const Budget& budget, const MethodContext& ctx) {
  KVD_CHECK(!name.empty(), "--methods: an empty method name; known: ", known_methods());
  if (name == "full") {
    ResolvedMethod r;
    r.name = r.label = name;
    r.full = true;
    return r;
  }
  for (const DecodeEntry& d : decode_methods())
    if (name == d.name) {
      ResolvedMethod r;
      r.name = r.label = name;
      r.method = make_method(d.prefill, budget, ctx.seed, ctx.model_dir);
      r.method.name = name;
      r.decode = d.schedule;
      return r;
    }
  const size_t colon = name.find(':');
  if (colon == std::string::npos && name != "gate-untrained") {
    ResolvedMethod r;
    r.name = r.label = name;
    r.method = make_method(name, budget, ctx.seed, ctx.model_dir);
    return r;
  }
  check_budget(budget);
  // A budget allocation prefix on a learned name (adakv_gate:<dir>, pyramid_query_rows:<dir>, ...).
  Allocation alloc = Allocation::Uniform;
  std::string prefix, lname = name;
  for (const auto& [p, a] : std::vector<std::pair<std::string, Allocation>>{
           {"adakv_", Allocation::AdaKV}, {"global_", Allocation::Global}, {"pyramid_", Allocation::Pyramid}})
    if (colon != std::string::npos && starts_with(name, p)) {
      alloc = a;
      prefix = p;
      lname = name.substr(p.size());
    }
  if (alloc == Allocation::Pyramid)
    KVD_CHECK(budget.kind == BudgetKind::Ratio, name, ": the pyramid layer budgets need --ratio");
  const size_t lcolon = lname.find(':');
  const std::string head = lname == "gate-untrained" ? "untrained" : lname.substr(0, lcolon);
  const std::string arg = lname == "gate-untrained" ? "retention_gate" : lname.substr(lcolon + 1);
  auto with_alloc = [&](ResolvedMethod r) {
    r.method.selector.allocation = alloc;
    if (!prefix.empty()) r.label = prefix + r.label;
    return r;
  };
  if (head == "untrained") {
    component_spec(arg, name);
    KVD_CHECK(ctx.model != nullptr, name, ": an untrained component needs the model (MethodContext::model)");
    torch::manual_seed(ctx.seed);  // the untrained component's init, reproducible
    std::shared_ptr<Component> c = make_component(arg, ctx.model->config());
    c->to(ctx.model->device(), torch::kFloat32);
    ResolvedMethod r = learned(name, std::move(c), budget, ctx);
    r.label = lname;
    return with_alloc(std::move(r));
  }
  const ComponentSpec* variant_of = find_component(head) ? nullptr : find_component_variant(head);
  KVD_CHECK(head == "gate" || find_component(head) || variant_of, "unknown method '", name, "'; known: ", known_methods());
  KVD_CHECK(!arg.empty(), name, ": give the bundle directory after '", head, ":'");
  KVD_CHECK(bool(ctx.load_bundle), name, ": bundles cannot be loaded here (no MethodContext::load_bundle)");
  std::shared_ptr<Component> c = ctx.load_bundle(arg);
  if (variant_of) {
    const std::string v = c->manifest().value("variant", std::string());
    KVD_CHECK(c->kind() == variant_of->kind && v == head, name, ": the bundle in ", arg, " holds a '", c->kind(), "' component",
              v.empty() ? std::string() : " of variant '" + v + "'", ", not a '", variant_of->kind, "' of variant '", head,
              "'; use gate:", arg);
  } else {
    const std::string want = head == "gate" ? c->kind() : find_component(head)->kind;  // an alias names its kind
    KVD_CHECK(c->kind() == want, name, ": the bundle in ", arg, " holds a '", c->kind(), "' component, not a '", want,
              "'; use gate:", arg);
  }
  ResolvedMethod r = learned(name, std::move(c), budget, ctx);
  r.label = bundle_label(r.component->kind(), arg);
  return with_alloc(std::move(r));
}

}  // namespace

ResolvedMethod resolve_method(const std::string& name, const Budget& budget, const MethodContext& ctx) {
  ResolvedMethod r = resolve(name, budget, ctx);
  r.compress.kernels = ctx.kernels;
  return r;
}

}  // namespace kvd
