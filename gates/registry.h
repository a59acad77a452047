// The method registry: every name `compress`, `eval` and `heldout` accept resolves here, in one table:
//   full                          the full cache (no eviction)
//   <heuristic>                   random, knorm, streaming_llm, h2o, observed_attention, snapkv, pyramidkv, tova,
//                                 keydiff, expected_attention, defensivekv, layer_defensivekv, cake, kvzip,
//                                 kvzip_plus (KVzip needs MethodContext::model_dir; one budget across layers unless
//                                 prefixed)
//   adakv_ / criticalkv_ / global_ prefixes on a heuristic: head-adaptive budgets, value-norm re-weighting, one
//                                 budget across layers (e.g. adakv_snapkv)
//   h2o_decode, tova_decode, lazy_eviction, streaming_llm_decode
//                                 compress the prompt, then evict while decoding (gates/decode_eviction.h)
//   gate:<bundle dir>             a trained learned part; the bundle's manifest names its kind
//   <kind>:<bundle dir>           the same, insisting on the kind (e.g. retention_gate:<dir>; a kind's alias too:
//                                 attngate:<dir>)
//   <variant>:<bundle dir>        the same, insisting on a kind's named variant (judgeq:<dir>, lookahead:<dir>:
//                                 query_rows bundles of that variant; ComponentSpec::variants)
//   untrained:<kind>              a fresh, untrained component of that kind (a baseline; seeded)
//   gate-untrained                = untrained:retention_gate
//   adakv_ / global_ / pyramid_   prefixes on a learned name: its scores under that budget allocation
//                                 (e.g. adakv_gate:<dir>; pyramid_ needs --ratio)
// Learned parts run in LearnedMode::Continuous unless asked otherwise: a component whose scores are written
// when tokens are appended (TRIM-KV) keeps every head at its budget through a chunked prefill and while
// decoding, as its paper runs it; LearnedMode::Once compresses the prompt once after prefill. A component
// whose scorer needs the whole forward first (ScoreTiming::AfterForward: Judge-Q / LookaheadKV query rows)
// compresses the prompt once after prefill in both modes. A threshold budget (BudgetKind::Threshold) in the continuous
// mode evicts what scores below it after every prefill chunk and nothing while decoding (it holds no count).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "gates/compress.h"
#include "gates/decode_eviction.h"
#include "gates/selector.h"

namespace kvd {

class Component;
class Model;

enum class LearnedMode {
  Continuous,  // evict after every prefill chunk and every decode step, each head held at its budget
  Once         // compress the prompt once after prefill; no eviction while decoding
};

// Decode-time eviction of a method: the policy and how often it fires (gates/decode_eviction.h).
struct DecodeSchedule {
  DecodePolicy policy = DecodePolicy::Scorer;
  int64_t interval = 1;
};

struct MethodContext {
  const Model* model = nullptr;  // the frozen model (a learned part is built for its config and device)
  uint64_t seed = 0;             // random / untrained components
  std::string model_dir;         // the model's directory: KVzip's repeat prompt needs its tokenizer and chat template
  // Loads a bundle for `model` (export/bundle.h: load_component). Needed for gate:<dir> names.
  std::function<std::shared_ptr<Component>(const std::string& bundle_dir)> load_bundle;
  LearnedMode learned_mode = LearnedMode::Continuous;
  int64_t continuous_chunk = 128;  // prefill chunk of LearnedMode::Continuous
  KernelPath kernels = KernelPath::Fused;  // the scorers' fused kernels where they apply (CompressOptions::kernels)
};

struct ResolvedMethod {
  std::string name;                      // as given
  std::string label;                     // for reports (a bundle directory becomes "<kind>(<run name>)")
  bool full = false;                     // the full cache
  Method method;                         // scorer + selector (not for full)
  std::shared_ptr<Component> component;  // a learned part, kept alive with its scorer
  CompressOptions compress;              // how the prompt's prefill is chunked and budgeted
  std::optional<DecodeSchedule> decode;  // eviction while decoding (none: the cache grows)
};

// Resolves `name` at `budget`. Throws a clear error for an unknown name (listing the known ones and the
// forms above), a budget the method cannot take, or a bundle of another model or of an unknown kind.
ResolvedMethod resolve_method(const std::string& name, const Budget& budget, const MethodContext& ctx);
// True when one unchunked prefill can compress for m at several budgets (compress_prefill_many): either its scores
// do not depend on the budget (scored once) or it scores each layer right after it ran (each budget's scorer scores
// that layer itself). Every budget's scorer observes the prefill, so a method that goes on evicting while decoding
// shares it too (each row's decode evictor holds the row at the count its budget kept).
bool shares_prefill(const ResolvedMethod& m);
// True when b can be compressed from the prefill a is compressed from (compress_prefill_many): b is another budget
// of a's method, or another method that scores at a's time (both right after each layer ran, or both once the
// forward ended: Scorer::prepare_peers), neither evicts while decoding (their answers then decode alike, and may
// decode as one batch), and both prefill alike (unchunked, the same kernels).
bool shares_prefill_with(const ResolvedMethod& a, const ResolvedMethod& b);
// True when b's budget can run as further rows of a's chunked prefill (eval's joined prefill: the budgets of a
// continuous learned part prefilled as rows of one batch, each row held at its own budget, SelectorOptions::row_budgets):
// b is another budget of a's method (which shares no prefill: shares_prefill), a learned part (its scorer never reads
// the budget, so a's scorer scores b's rows as b's own would) whose state is all in the cache (FixedShape::Yes: the
// rows decode with a's scorer too), prefilled and allocated alike, with ratio or token budgets of one kind.
bool joins_prefill_with(const ResolvedMethod& a, const ResolvedMethod& b);
// The heuristic prefill methods only (no decode-time, learned or full names): a scorer plus a selector.
// model_dir: the model's directory, for scorers that read its tokenizer (kvzip, kvzip_plus).
Method make_method(const std::string& name, const Budget& budget, uint64_t seed = 0, const std::string& model_dir = "");
Method make_method(const std::string& name, double ratio, uint64_t seed = 0);  // Budget::ratio(ratio)
// The base heuristic names (without prefixes).
std::vector<std::string> method_names();
// True for names that need MethodContext::load_bundle (gate:<dir>, <kind>:<dir>).
bool is_bundle_method(const std::string& name);
// One line listing every accepted form, for errors and --help.
std::string known_methods();

}  // namespace kvd
