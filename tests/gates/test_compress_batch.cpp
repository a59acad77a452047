// Batched compression on SmolLM2: each prompt of a left-padded batch keeps exactly the positions it keeps alone,
// whether its scorer takes the rows together (RowBatching::Together: one view of rows of different lengths) or
// one at a time; CAKE's cascade ends at the budgets of its final layer preferences and keeps each
// layer's top entries by its indicator; the per-prefill-chunk trigger matches an independent chunk loop.
//
// Tolerance policy: kept sets are compared exactly (every (layer, head) position list). The batched and the
// single-row prefills run the same per-row arithmetic on slices, but the matmuls of a (3, T) batch may round
// differently from (1, T); a flipped near-tie would show up here as one swapped position, and we would then
// relax that method alone (none needed it when this was written).
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "common/error.h"
#include "gates/component.h"
#include "gates/compress.h"
#include "gates/registry.h"
#include "gates/heuristics.h"
#include "gates/selector.h"
#include "models/kv_cache.h"
#include "models/model.h"
#include "models/tokenizer.h"
#include "test_paths.h"

using namespace kvd;

namespace {

using Kept = std::vector<std::vector<std::vector<int64_t>>>;  // [layer][head] sorted positions

bool have_model() { return std::filesystem::exists(std::string(KVD_MODEL_DIR) + "/config.json"); }

const Model& model() {
  static Model m = Model::load(KVD_MODEL_DIR, torch::kCPU);
  return m;
}

std::vector<int64_t> encode(const std::string& text) {
  static Tokenizer tok = Tokenizer::from_file(KVD_MODEL_DIR);
  std::vector<int32_t> ids = tok.encode(text);
  return std::vector<int64_t>(ids.begin(), ids.end());
}

std::string story(int lines, int salt) {
  std::string s;
  for (int i = 0; i < lines; ++i)
    s += "Entry " + std::to_string(i + salt) + ": the ferry to " + std::string(1, char('A' + (i * 7 + salt) % 26)) +
         " left at " + std::to_string(6 + (i + salt) % 12) + " with " + std::to_string(3 * i + salt) + " cars. ";
  return s;
}

// Three prompts of different lengths (about 100, 170 and 250 tokens).
const std::vector<std::vector<int64_t>>& prompts() {
  static std::vector<std::vector<int64_t>> p = {encode(story(5, 1)), encode(story(12, 4)), encode(story(8, 9))};
  return p;
}

Kept kept_of(const KVCache& c, int64_t b) {
  Kept out(c.num_layers());
  for (int64_t l = 0; l < c.num_layers(); ++l) {
    at::Tensor pos = c.layer(l).pos.to(torch::kCPU);  // (B, H_kv, n)
    for (int64_t h = 0; h < c.num_kv_heads(); ++h) {
      const int64_t len = c.length(l, b, h);
      at::Tensor p = std::get<0>(pos[b][h].narrow(0, 0, len).sort()).contiguous();  // (len)
      out[l].push_back(std::vector<int64_t>(p.data_ptr<int64_t>(), p.data_ptr<int64_t>() + len));
    }
  }
  return out;
}

Kept compress_one(const std::string& method, const std::vector<int64_t>& prompt, double ratio,
                  CompressOptions opts = {}) {
  Method m = make_method(method, ratio);
  KVCache c = model().new_cache(1);
  compress_prefill(model(), c, std::vector<std::vector<int64_t>>{prompt}, m, opts);
  return kept_of(c, 0);
}

void expect_same(const Kept& a, const Kept& b, const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t l = 0; l < a.size(); ++l)
    for (size_t h = 0; h < a[l].size(); ++h) ASSERT_EQ(a[l][h], b[l][h]) << what << " layer " << l << " head " << h;
}

}  // namespace

class CompressBatch : public ::testing::TestWithParam<std::string> {};

TEST_P(CompressBatch, EachRowKeepsWhatItKeepsAlone) {
  if (!have_model()) GTEST_SKIP() << "no SmolLM2 model";
  const std::string method = GetParam();
  const double ratio = 0.5;
  const auto& p = prompts();
  Method m = make_method(method, ratio);
  KVCache batch = model().new_cache(3);
  const CompressStats st = compress_prefill(model(), batch, p, m);
  ASSERT_EQ(st.rows.size(), 3u);
  const int64_t L = batch.num_layers(), H = batch.num_kv_heads(), bpe = batch.bytes_per_entry();
  for (int64_t b = 0; b < 3; ++b) {
    const Kept alone = compress_one(method, p[b], ratio);
    const Kept got = kept_of(batch, b);
    expect_same(got, alone, method + " row " + std::to_string(b));
    // Per-row stats: tokens, full and kept bytes from the kept lists.
    int64_t entries = 0;
    for (const auto& layer : got)
      for (const auto& head : layer) entries += static_cast<int64_t>(head.size());
    const RowCompressStats& r = st.rows[b];
    EXPECT_EQ(r.tokens, static_cast<int64_t>(p[b].size()));
    EXPECT_EQ(r.full_bytes, r.tokens * L * H * bpe);
    EXPECT_EQ(r.kept_bytes, entries * bpe);
    EXPECT_DOUBLE_EQ(r.kept_fraction, static_cast<double>(entries) / static_cast<double>(r.tokens * L * H));
    EXPECT_GE(r.peak_bytes, r.kept_bytes);
  }
}

INSTANTIATE_TEST_SUITE_P(Methods, CompressBatch,
                         ::testing::Values("snapkv", "adakv_snapkv", "pyramidkv", "tova", "knorm", "keydiff",
                                           "streaming_llm", "expected_attention", "observed_attention", "h2o", "cake",
                                           "global_snapkv", "defensivekv", "layer_defensivekv",
                                           "criticalkv_snapkv"));

TEST(CompressChunked, BatchedChunksMatchEachRowAlone) {
  if (!have_model()) GTEST_SKIP() << "no SmolLM2 model";
  const auto& p = prompts();
  CompressOptions o;
  // Ratio 0.25 and chunks of 90 keep every row's cache above SnapKV's 64-entry window after each chunk.
  o.chunk_size = 90;
  Method m = make_method("snapkv", 0.25);
  KVCache batch = model().new_cache(3);
  compress_prefill(model(), batch, p, m, o);
  for (int64_t b = 0; b < 3; ++b)
    expect_same(kept_of(batch, b), compress_one("snapkv", p[b], 0.25, o), "row " + std::to_string(b));
}

// A scorer as it is, but handed one row at a time (RowBatching::OneAtATime): the chunked prefill's per-row path.
class OneRowAtATime : public Scorer {
 public:
  explicit OneRowAtATime(std::shared_ptr<Scorer> s) : s_(std::move(s)) {}
  std::string name() const override { return s_->name(); }
  ScorerNeeds needs() const override {
    ScorerNeeds n = s_->needs();
    n.rows = RowBatching::OneAtATime;
    return n;
  }
  void on_append(const PrefillLayerObservation& obs, KVCache& cache) override { s_->on_append(obs, cache); }
  std::vector<PayloadColumn> payload_columns() const override { return s_->payload_columns(); }
  std::vector<at::Tensor> entry_payload(int64_t l, const at::Tensor& h, const EntryContext& c) override {
    return s_->entry_payload(l, h, c);
  }
  void reserve_row_state(int64_t l, RowState& st, int64_t b, int64_t n) override { s_->reserve_row_state(l, st, b, n); }
  at::Tensor score(const LayerView& view) override { return s_->score(view); }

 private:
  std::shared_ptr<Scorer> s_;
};

// A continuous learned part prefills in chunks (40 tokens here, so the three prompts end in different chunks and
// the shorter rows get all-padding chunks). Its scorers read their per-entry payload alone (the Attention-Gate's is
// written by its own block over every earlier token), so every row of a chunk is scored in one view
// (RowBatching::Together): each row keeps exactly what the rows handed one at a time keep, and what it keeps
// alone, under a uniform and an AdaKV budget.
TEST(CompressChunked, PayloadScorersTakeEveryRowOfAChunkTogether) {
  if (!have_model()) GTEST_SKIP() << "no SmolLM2 model";
  MethodContext ctx;
  ctx.model = &model();
  ctx.model_dir = KVD_MODEL_DIR;
  ctx.continuous_chunk = 40;
  const auto& p = prompts();
  for (const std::string name :
       {"untrained:retention_gate", "untrained:kvzap", "untrained:dms", "untrained:attention_gate"})
    for (const auto& [alloc, ratio] : {std::pair{Allocation::Uniform, 0.8}, std::pair{Allocation::AdaKV, 0.5}}) {
        const std::string what = name + (alloc == Allocation::AdaKV ? " adakv " : " uniform ") + std::to_string(ratio);
        SCOPED_TRACE(what);
        ResolvedMethod m = resolve_method(name, Budget::ratio(ratio), ctx);
        m.method.selector.allocation = alloc;
        ASSERT_EQ(m.compress.chunk_size, 40);
        ASSERT_EQ(m.method.scorer->needs().rows, RowBatching::Together);
        Method one = m.method;
        one.scorer = std::make_shared<OneRowAtATime>(m.method.scorer);
        KVCache together = model().new_cache(3), rows = model().new_cache(3);
        compress_prefill(model(), together, p, m.method, m.compress);
        compress_prefill(model(), rows, p, one, m.compress);
        for (int64_t b = 0; b < 3; ++b) {
          const Kept got = kept_of(together, b);
          expect_same(got, kept_of(rows, b), what + " row " + std::to_string(b) + ", rows one at a time");
          KVCache alone = model().new_cache(1);
          compress_prefill(model(), alone, std::vector<std::vector<int64_t>>{p[b]}, one, m.compress);
          expect_same(got, kept_of(alone, 0), what + " row " + std::to_string(b) + ", alone");
          // The budget held: n_kept of the whole prompt per head (uniform), per row in all (AdaKV).
          const int64_t n_kept = Budget::ratio(ratio).n_kept(static_cast<int64_t>(p[b].size()));
          for (const auto& layer : got) {
            int64_t held = 0;
            for (const auto& head : layer) {
              if (alloc == Allocation::Uniform) ASSERT_EQ(static_cast<int64_t>(head.size()), n_kept);
              held += static_cast<int64_t>(head.size());
            }
            ASSERT_EQ(held, n_kept * static_cast<int64_t>(layer.size()));
          }
        }
      }
}

// After every chunk each head holds n_kept(tokens so far): compressing the prompt's first c·k tokens with
// chunks of c ends at n_kept(c·k) per head, and the kept positions match an independent chunk loop (plain
// Model::prefill + an observer doing its own top-k of -||k|| per head).
TEST(CompressChunked, KNormChunksMatchAnIndependentLoop) {
  if (!have_model()) GTEST_SKIP() << "no SmolLM2 model";
  const std::vector<int64_t>& prompt = prompts()[2];
  const int64_t T = static_cast<int64_t>(prompt.size()), c = 70;
  const double ratio = 0.6;
  for (int64_t t : {2 * c, T}) {
    const std::vector<int64_t> prefix(prompt.begin(), prompt.begin() + t);
    CompressOptions o;
    o.chunk_size = c;
    const Kept got = compress_one("knorm", prefix, ratio, o);
    // Reference loop.
    KVCache ref = model().new_cache(1);
    int64_t seen = 0;
    PrefillObserver obs = [&](const PrefillLayerObservation& ob, KVCache& cache) {
      const KVLayerView v = cache.layer(ob.layer);
      const int64_t keep = std::max<int64_t>(1, static_cast<int64_t>(static_cast<double>(seen) * (1.0 - ratio)));
      at::Tensor s = -torch::linalg_vector_norm(v.k.to(torch::kFloat), 2, {-1}, false, c10::nullopt);  // (1, H_kv, n)
      // Stable descending order: among equal norms (repeated tokens at layer 0) the older token wins.
      at::Tensor order = std::get<1>(s.sort(/*stable=*/true, /*dim=*/-1, /*descending=*/true));  // (1, H_kv, n)
      at::Tensor idx = std::get<0>(order.narrow(-1, 0, keep).sort(-1));                         // (1, H_kv, keep)
      cache.keep(ob.layer, idx);
    };
    for (int64_t s0 = 0; s0 < t; s0 += c) {
      const int64_t s1 = std::min(s0 + c, t);
      seen = s1;
      at::Tensor ids = torch::tensor(std::vector<int64_t>(prefix.begin() + s0, prefix.begin() + s1), torch::kLong).view({1, -1});
      model().prefill(ids, ref, LogitsMode::LastPosition, obs);
    }
    const int64_t n_kept = std::max<int64_t>(1, static_cast<int64_t>(static_cast<double>(t) * (1.0 - ratio)));
    for (const auto& layer : got)
      for (const auto& head : layer) ASSERT_EQ(static_cast<int64_t>(head.size()), n_kept) << "after " << t << " tokens";
    expect_same(got, kept_of(ref, 0), "knorm chunked, " + std::to_string(t) + " tokens");
  }
}

TEST(CompressChunked, OneChunkCoveringThePromptIsTheUnchunkedResult) {
  if (!have_model()) GTEST_SKIP() << "no SmolLM2 model";
  const std::vector<int64_t>& prompt = prompts()[1];
  const int64_t T = static_cast<int64_t>(prompt.size());
  const Kept once = compress_one("snapkv", prompt, 0.5);
  for (int64_t c : {T, T + 50}) {
    CompressOptions o;
    o.chunk_size = c;
    expect_same(compress_one("snapkv", prompt, 0.5, o), once, "chunk " + std::to_string(c));
  }
  // A real chunking (3 chunks) changes the result but keeps n_kept(T) per head.
  CompressOptions o;
  o.chunk_size = 70;
  const Kept chunked = compress_one("snapkv", prompt, 0.5, o);
  bool differs = false;
  for (size_t l = 0; l < chunked.size(); ++l)
    for (size_t h = 0; h < chunked[l].size(); ++h) {
      EXPECT_EQ(chunked[l][h].size(), once[l][h].size());
      differs = differs || chunked[l][h] != once[l][h];
    }
  EXPECT_TRUE(differs);
  EXPECT_THROW(compress_one("snapkv", prompt, 0.5, CompressOptions{32}), Error);  // shorter than the window
}

// CAKE's cascade on SmolLM2: the final counts are cake_layer_budgets of the layer preferences of an
// uncompressed prefill (compression during prefill does not change later layers' inputs), they sum to
// L · n_kept(T) within rounding, each layer keeps its top entries by the CAKE indicator, and the peak stays under
// L · n_kept(T) entries per head plus one layer's full prompt.
TEST(CompressCake, CascadeEndsAtTheFinalBudgets) {
  if (!have_model()) GTEST_SKIP() << "no SmolLM2 model";
  const std::vector<int64_t>& prompt = prompts()[2];
  const int64_t T = static_cast<int64_t>(prompt.size());
  const double ratio = 0.75;
  const int64_t L = model().config().num_layers, H = model().config().num_kv_heads;
  // Reference: preferences and indicator scores of every layer, uncompressed.
  std::vector<double> pref(L);
  std::vector<at::Tensor> scores(L);  // [layer] (1, H_kv, T)
  CakeScorer scorer;
  KVCache full = model().new_cache(1);
  PrefillObserver obs = [&](const PrefillLayerObservation& ob, KVCache& cache) {
    const KVLayerView v = cache.layer(ob.layer);
    LayerView view;
    view.layer = ob.layer;
    view.keys = v.k;
    view.values = v.v;
    view.positions = v.pos;
    view.window_queries = ob.queries.narrow(2, T - 32, 32);
    view.window_positions = ob.query_positions.narrow(1, T - 32, 32);
    scores[ob.layer] = scorer.score(view);
    pref[ob.layer] = scorer.layer_preference().at(0);
  };
  model().prefill(torch::tensor(prompt, torch::kLong).view({1, -1}), full, LogitsMode::LastPosition, obs);
  const int64_t per_head = Budget::ratio(ratio).n_kept(T);
  const std::vector<int64_t> budgets = cake_layer_budgets(pref, L * per_head, T);
  int64_t sum = 0;
  for (int64_t b : budgets) sum += b;
  EXPECT_LE(sum, L * per_head);  // each budget rounded down: at most L entries per head short
  EXPECT_GT(sum, L * per_head - L);
  EXPECT_GT(*std::max_element(budgets.begin(), budgets.end()), *std::min_element(budgets.begin(), budgets.end()));

  Method m = make_method("cake", ratio);
  KVCache cache = model().new_cache(1);
  const CompressStats st = compress_prefill(model(), cache, std::vector<std::vector<int64_t>>{prompt}, m);
  const Kept got = kept_of(cache, 0);
  for (int64_t l = 0; l < L; ++l) {
    // Stable top-k (ties, e.g. the window's max + 1, to the lower index).
    at::Tensor order = std::get<1>(scores[l].sort(/*stable=*/true, /*dim=*/-1, /*descending=*/true));  // (1, H_kv, T)
    at::Tensor top = std::get<0>(order.narrow(-1, 0, budgets[l]).sort(-1));                          // (1, H_kv, B_l)
    for (int64_t h = 0; h < H; ++h) {
      ASSERT_EQ(static_cast<int64_t>(got[l][h].size()), budgets[l]) << "layer " << l;
      at::Tensor t = top[0][h].contiguous();
      // Positions are 0..T-1 in a fresh prefill, so indices are positions.
      EXPECT_EQ(got[l][h], std::vector<int64_t>(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + budgets[l])) << "layer " << l;
    }
  }
  EXPECT_LE(st.peak_bytes, (L * per_head + T) * H * cache.bytes_per_entry());
}

// Resolves `name` at `ratio`, compresses the prompts with it alone and expects `got` (the same method compressed
// from a shared prefill) to hold the same: next positions, kept sets per row, bytes and peaks, and the same keys.
namespace {
void expect_as_alone(const KVCache& got, const std::string& name, double ratio, const MethodContext& ctx) {
  SCOPED_TRACE(name + " at " + std::to_string(ratio));
  const int64_t B = static_cast<int64_t>(prompts().size());
  ResolvedMethod alone = resolve_method(name, Budget::ratio(ratio), ctx);
  KVCache c = model().new_cache(B);
  compress_prefill(model(), c, prompts(), alone.method, alone.compress);
  EXPECT_EQ(got.next_positions(), c.next_positions());
  EXPECT_EQ(got.peak_bytes(), c.peak_bytes());
  for (int64_t b = 0; b < B; ++b) {
    EXPECT_EQ(kept_of(got, b), kept_of(c, b)) << "row " << b;
    EXPECT_EQ(got.row_bytes(b), c.row_bytes(b));
    EXPECT_EQ(got.row_peak_bytes(b), c.row_peak_bytes(b));
  }
  // The copied entries are the same keys, bit for bit.
  for (int64_t l = 0; l < c.num_layers(); l += 7) EXPECT_TRUE(torch::equal(got.layer(l).k, c.layer(l).k)) << "layer " << l;
}

// The prompts compressed by every method of ms from one prefill (compress_prefill_many): one cache each.
std::vector<KVCache> compress_shared(std::vector<ResolvedMethod>& ms) {
  std::vector<KVCache> caches;
  std::vector<Method*> methods;
  for (ResolvedMethod& m : ms) {
    caches.push_back(model().new_cache(static_cast<int64_t>(prompts().size())));
    methods.push_back(&m.method);
  }
  std::vector<KVCache*> ptrs;
  for (KVCache& c : caches) ptrs.push_back(&c);
  compress_prefill_many(model(), ptrs, prompts(), methods);
  return caches;
}
}  // namespace

// One prefill compressed at several budgets (compress_prefill_many, the eval's --share-prefill budgets) gives
// every budget exactly what its own compress_prefill gives: the kept sets of every row, the bytes and the peaks,
// across allocations (uniform, AdaKV, global, pyramid, CAKE), scorers that run after the forward (KVzip, query
// rows: every budget's peak holds the whole prompt, as it does alone), a learned part whose scores live in the
// cache's payload (an untrained retention gate, once mode), and scorers whose scores depend on the budget or on
// their own state (DefensiveKV, CriticalKV, random), each budget then scored by its own scorer.
TEST(CompressMany, EveryBudgetKeepsWhatItKeepsAlone) {
  if (!have_model()) GTEST_SKIP() << "no model at " << KVD_MODEL_DIR;
  MethodContext ctx;
  ctx.model = &model();
  ctx.model_dir = KVD_MODEL_DIR;
  ctx.learned_mode = LearnedMode::Once;
  const std::vector<double> ratios = {0.25, 0.6, 0.875};
  for (const std::string name : {"snapkv", "adakv_snapkv", "global_snapkv", "pyramidkv", "cake", "expected_attention",
                                 "kvzip", "untrained:query_rows", "untrained:retention_gate", "defensivekv",
                                 "layer_defensivekv", "criticalkv_snapkv", "random"}) {
    SCOPED_TRACE(name);
    std::vector<ResolvedMethod> ms;
    for (double r : ratios) ms.push_back(resolve_method(name, Budget::ratio(r), ctx));
    for (const ResolvedMethod& m : ms) ASSERT_TRUE(shares_prefill(m));
    std::vector<KVCache> caches = compress_shared(ms);
    for (size_t i = 0; i < ratios.size(); ++i) expect_as_alone(caches[i], name, ratios[i], ctx);
  }
}

// Several methods compressed from one prefill (the eval's --share-prefill methods): each scoring unit (a method's
// budgets) scores its own whole copy of every layer through a view built for its own needs (windows of different
// sizes, hidden states, pre-RoPE queries, rows one by one or together), and every cache keeps exactly what its own
// compress_prefill keeps. Scorers that run after the forward (KVzip, KVzip+, query rows) share a prefill with each
// other (KVzip and KVzip+ from one reconstruction pass, Scorer::prepare_peers), not with per-layer scorers.
TEST(CompressMany, MethodsSharingOnePrefillKeepWhatEachKeepsAlone) {
  if (!have_model()) GTEST_SKIP() << "no model at " << KVD_MODEL_DIR;
  MethodContext ctx;
  ctx.model = &model();
  ctx.model_dir = KVD_MODEL_DIR;
  const int64_t B = static_cast<int64_t>(prompts().size());
  const std::vector<std::pair<std::string, double>> configs = {
      {"snapkv", 0.25},      {"snapkv", 0.75},        {"tova", 0.5},        {"defensivekv", 0.25}, {"defensivekv", 0.75},
      {"knorm", 0.5},        {"adakv_snapkv", 0.5},   {"pyramidkv", 0.6},   {"expected_attention", 0.5},
      {"keydiff", 0.5},      {"streaming_llm", 0.5},  {"criticalkv_snapkv", 0.5}, {"h2o", 0.4}};
  std::vector<ResolvedMethod> ms;
  for (const auto& [name, r] : configs) ms.push_back(resolve_method(name, Budget::ratio(r), ctx));
  for (const ResolvedMethod& m : ms) ASSERT_TRUE(shares_prefill_with(ms[0], m)) << m.name;
  std::vector<KVCache> caches = compress_shared(ms);
  for (size_t i = 0; i < configs.size(); ++i) expect_as_alone(caches[i], configs[i].first, configs[i].second, ctx);
  // KVzip scores after the whole forward (its repeat pass reads the cache): with other methods that do, not with a
  // per-layer one.
  MethodContext once = ctx;
  once.learned_mode = LearnedMode::Once;  // the query rows act once after the prefill
  // The query rows first: the driver asks each scorer not yet prepared in turn (Scorer::prepare_peers), so KVzip
  // then prepares KVzip+ with it.
  const std::vector<std::pair<std::string, double>> after = {
      {"untrained:query_rows", 0.5}, {"kvzip", 0.25}, {"kvzip", 0.75}, {"kvzip_plus", 0.5}, {"kvzip_plus", 0.875}};
  std::vector<ResolvedMethod> am;
  for (const auto& [name, r] : after) am.push_back(resolve_method(name, Budget::ratio(r), once));
  for (const ResolvedMethod& m : am) ASSERT_TRUE(shares_prefill_with(am[0], m)) << m.name;
  std::vector<KVCache> ac = compress_shared(am);
  for (size_t i = 0; i < after.size(); ++i) expect_as_alone(ac[i], after[i].first, after[i].second, once);
  ResolvedMethod kvzip = resolve_method("kvzip", Budget::ratio(0.5), ctx);
  ResolvedMethod snap = resolve_method("snapkv", Budget::ratio(0.5), ctx);
  EXPECT_TRUE(shares_prefill(kvzip));
  EXPECT_FALSE(shares_prefill_with(snap, kvzip));
  EXPECT_FALSE(shares_prefill_with(kvzip, snap));
  EXPECT_FALSE(shares_prefill_with(snap, resolve_method("tova_decode", Budget::ratio(0.5), ctx)));  // evicts while decoding
  KVCache c1 = model().new_cache(B), c2 = model().new_cache(B);
  try {
    compress_prefill_many(model(), {&c1, &c2}, prompts(), {&snap.method, &kvzip.method});
    ADD_FAILURE() << "kvzip shared a prefill with snapkv";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("score at different times"), std::string::npos) << e.what();
  }
}

// Scorer::score_budgets (one layer scored for several budgets of one method, computing the shared part once) gives
// each budget exactly its own score(), bit for bit, for the scorers that override it (DefensiveKV, its layer-wide
// variant, CriticalKV over a shared and over a per-budget base); a peer of another method is refused.
TEST(CompressMany, ScoreBudgetsIsEachBudgetScoredAlone) {
  if (!have_model()) GTEST_SKIP() << "no SmolLM2 model";
  const std::vector<int64_t>& prompt = prompts()[1];
  const int64_t T = static_cast<int64_t>(prompt.size());
  std::vector<LayerView> views;  // layers 0, 10, 20 as the prefill's observer sees them
  KVCache full = model().new_cache(1);
  PrefillObserver obs = [&](const PrefillLayerObservation& ob, KVCache& cache) {
    if (ob.layer % 10 != 0) return;
    LayerView view = layer_view(cache.layer(ob.layer), ob.layer, model(), {T});
    view.window_queries = ob.queries.clone();            // (1, H, T, hd): every row, cut to each scorer's window
    view.window_positions = ob.query_positions.clone();  // (1, T)
    view.keys = view.keys.clone();
    view.values = view.values.clone();
    view.positions = view.positions.clone();
    views.push_back(view);
  };
  model().prefill(torch::tensor(prompt, torch::kLong).view({1, -1}), full, LogitsMode::LastPosition, obs);
  ASSERT_EQ(views.size(), 3u);
  MethodContext ctx;
  ctx.model = &model();
  for (const std::string name : {"defensivekv", "layer_defensivekv", "criticalkv_snapkv", "criticalkv_defensivekv"}) {
    SCOPED_TRACE(name);
    std::vector<Method> ms;
    for (double r : {0.25, 0.6, 0.875}) ms.push_back(resolve_method(name, Budget::ratio(r), ctx).method);
    std::vector<Scorer*> peers;
    for (Method& m : ms) peers.push_back(m.scorer.get());
    const int64_t w = peers[0]->needs().window;
    for (LayerView v : views) {
      v.window_queries = v.window_queries.narrow(2, T - w, w);      // (1, H, w, hd)
      v.window_positions = v.window_positions.narrow(1, T - w, w);  // (1, w)
      const std::vector<at::Tensor> all = peers[0]->score_budgets(v, peers);
      ASSERT_EQ(all.size(), peers.size());
      for (size_t t = 0; t < peers.size(); ++t)
        EXPECT_TRUE(torch::equal(all[t], peers[t]->score(v))) << "layer " << v.layer << " budget " << t;
      EXPECT_FALSE(torch::equal(all[0], all[2])) << "layer " << v.layer;  // the scores do differ by budget
    }
  }
  Method d = resolve_method("defensivekv", Budget::ratio(0.5), ctx).method;
  Method s = resolve_method("snapkv", Budget::ratio(0.5), ctx).method;
  LayerView v = views[0];
  v.window_queries = v.window_queries.narrow(2, T - 32, 32);      // (1, H, 32, hd): DefensiveKV's window
  v.window_positions = v.window_positions.narrow(1, T - 32, 32);  // (1, 32)
  try {
    d.scorer->score_budgets(v, {d.scorer.get(), s.scorer.get()});
    ADD_FAILURE() << "a snapkv peer was taken";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("got snapkv"), std::string::npos) << e.what();
  }
}

TEST(CompressMany, WhoSharesAPrefill) {
  MethodContext ctx;
  // The full cache compresses nothing; a chunked prefill's later chunks see the earlier evictions.
  EXPECT_FALSE(shares_prefill(resolve_method("full", Budget::ratio(0.5), ctx)));
  ResolvedMethod chunked = resolve_method("snapkv", Budget::ratio(0.5), ctx);
  chunked.compress.chunk_size = 64;
  EXPECT_FALSE(shares_prefill(chunked));
  // Eviction while decoding too: every budget's scorer observes the prefill.
  for (const std::string name : {"snapkv", "defensivekv", "random", "criticalkv_snapkv", "h2o_decode", "tova_decode",
                                 "lazy_eviction", "streaming_llm_decode"})
    EXPECT_TRUE(shares_prefill(resolve_method(name, Budget::ratio(0.5), ctx))) << name;
  // Scored once only where the scores do not depend on the budget.
  EXPECT_EQ(resolve_method("snapkv", Budget::ratio(0.5), ctx).method.sharing, ScoreSharing::AcrossBudgets);
  EXPECT_EQ(resolve_method("defensivekv", Budget::ratio(0.5), ctx).method.sharing, ScoreSharing::PerBudget);
}

// A continuous learned part's budgets as the rows of one chunked prefill (the eval's joined prefill,
// SelectorOptions::row_budgets): the prompts repeated once per budget, each row held at its own budget, scored by the
// first budget's scorer. Each budget's rows, taken out (KVCache::take_rows), hold exactly what that budget's own
// prefill holds: next positions, kept sets, bytes, per-row peaks and the keys. Parts whose scores live in the cache's
// payload (TRIM-KV's gate, KVzap, DMS) and one whose state is per row (the Attention-Gate), under the uniform, AdaKV
// and pyramid allocations and with token budgets.
// An untrained retention gate starts at beta ~ 1 (its bias at 18), where every score is a near-tie that the rounding
// of a differently padded batch may flip mid-prefill; the gate's own bias at 2 spreads its scores as a trained gate's
// are. Each budget's resolved copy gets the same change.
ResolvedMethod resolve_spread(const std::string& name, const Budget& b, const MethodContext& ctx) {
  ResolvedMethod r = resolve_method(name, b, ctx);
  if (r.component && r.component->kind() == "retention_gate") {
    torch::NoGradGuard no_grad;
    int64_t set = 0;
    for (auto& p : r.component->named_parameters())
      if (p.key().size() >= 4 && p.key().substr(p.key().size() - 4) == "bias" && p.key().find("w1") == std::string::npos &&
          p.key().find("w2") == std::string::npos)
        p.value().fill_(2.0), ++set;
    EXPECT_EQ(set, model().config().num_layers) << "the gate's per-layer output biases";
  }
  return r;
}

TEST(CompressJoined, BudgetsAsRowsOfOneBatchKeepWhatEachKeepsAlone) {
  if (!have_model()) GTEST_SKIP() << "no model at " << KVD_MODEL_DIR;
  MethodContext ctx;
  ctx.model = &model();
  ctx.continuous_chunk = 48;  // several chunks per prompt (about 100 to 250 tokens)
  const int64_t B = static_cast<int64_t>(prompts().size());
  struct Case {
    std::string name;
    std::vector<Budget> budgets;
  };
  const std::vector<Budget> ratios = {Budget::ratio(0.25), Budget::ratio(0.6), Budget::ratio(0.875)};
  for (const Case& c : std::vector<Case>{{"untrained:retention_gate", ratios},
                                         {"untrained:kvzap", ratios},
                                         {"untrained:dms", ratios},
                                         {"untrained:attention_gate", ratios},
                                         {"adakv_untrained:retention_gate", ratios},
                                         {"pyramid_untrained:retention_gate", ratios},
                                         {"untrained:retention_gate", {Budget::tokens(40), Budget::tokens(90)}}}) {
    SCOPED_TRACE(c.name);
    std::vector<ResolvedMethod> ms;
    for (const Budget& b : c.budgets) ms.push_back(resolve_spread(c.name, b, ctx));
    ASSERT_GT(ms[0].compress.chunk_size, 0);
    for (const ResolvedMethod& m : ms) ASSERT_TRUE(joins_prefill_with(ms[0], m));
    Method joined = ms[0].method;
    std::vector<std::vector<int64_t>> rows;
    for (const ResolvedMethod& m : ms) {
      rows.insert(rows.end(), prompts().begin(), prompts().end());
      joined.selector.row_budgets.insert(joined.selector.row_budgets.end(), B, m.method.selector.budget);
    }
    KVCache all = model().new_cache(static_cast<int64_t>(rows.size()));
    compress_prefill(model(), all, rows, joined, ms[0].compress);
    for (size_t i = 0; i < ms.size(); ++i) {
      SCOPED_TRACE("budget " + std::to_string(i));
      const KVCache got = all.take_rows(static_cast<int64_t>(i) * B, B);
      ResolvedMethod alone = resolve_spread(c.name, c.budgets[i], ctx);
      KVCache want = model().new_cache(B);
      compress_prefill(model(), want, prompts(), alone.method, alone.compress);
      EXPECT_EQ(got.next_positions(), want.next_positions());
      for (int64_t b = 0; b < B; ++b) {
        EXPECT_EQ(kept_of(got, b), kept_of(want, b)) << "row " << b;
        EXPECT_EQ(got.row_bytes(b), want.row_bytes(b));
        EXPECT_EQ(got.row_peak_bytes(b), want.row_peak_bytes(b));
      }
      EXPECT_GE(got.peak_bytes(), want.peak_bytes());  // the rows' peaks summed: a bound
      for (int64_t l = 0; l < want.num_layers(); l += 7) {  // the keys of the entries (a view's padding is no entry's)
        const KVLayerView x = got.layer(l), y = want.layer(l);
        const at::Tensor pad = y.valid.defined() ? y.valid.logical_not().unsqueeze(-1) : torch::zeros({1}, torch::kBool);
        // Rows padded to other budgets' longer heads round differently (seen: 6e-4 in keys of magnitude ~10).
        EXPECT_TRUE(torch::allclose(x.k.masked_fill(pad, 0), y.k.masked_fill(pad, 0), 1e-3, 1e-3)) << "layer " << l;
      }
    }
  }
}

// Who joins a prefill: the budgets of one continuous learned part; not a heuristic (its scorer may read the budget),
// not a once-mode part (it shares one prefill instead), not a threshold, not another method.
TEST(CompressJoined, WhoJoinsAPrefill) {
  if (!have_model()) GTEST_SKIP() << "no model at " << KVD_MODEL_DIR;
  MethodContext ctx;
  ctx.model = &model();
  const auto at = [&](const std::string& name, const Budget& b) { return resolve_method(name, b, ctx); };
  const ResolvedMethod gate = at("untrained:retention_gate", Budget::ratio(0.5));
  EXPECT_TRUE(joins_prefill_with(gate, at("untrained:retention_gate", Budget::ratio(0.75))));
  EXPECT_FALSE(joins_prefill_with(gate, at("untrained:retention_gate", Budget::tokens(64))));  // another kind
  EXPECT_FALSE(joins_prefill_with(gate, at("untrained:retention_gate", Budget::threshold(0.5))));
  EXPECT_FALSE(joins_prefill_with(gate, at("untrained:kvzap", Budget::ratio(0.75))));
  EXPECT_FALSE(joins_prefill_with(gate, at("adakv_untrained:retention_gate", Budget::ratio(0.75))));
  ResolvedMethod snap = at("snapkv", Budget::ratio(0.5));
  snap.compress.chunk_size = 64;
  EXPECT_FALSE(joins_prefill_with(snap, snap));
  ctx.learned_mode = LearnedMode::Once;
  const ResolvedMethod once = at("untrained:retention_gate", Budget::ratio(0.5));
  EXPECT_FALSE(joins_prefill_with(once, once));  // it shares one unchunked prefill instead
  // Row budgets of mixed kinds, or of the wrong count, are refused.
  Method m = gate.method;
  m.selector.row_budgets = {Budget::ratio(0.5), Budget::tokens(8), Budget::ratio(0.5)};
  KVCache c = model().new_cache(3);
  EXPECT_THROW(compress_prefill(model(), c, prompts(), m, gate.compress), Error);
  m.selector.row_budgets = {Budget::ratio(0.5)};
  KVCache d = model().new_cache(3);
  EXPECT_THROW(compress_prefill(model(), d, prompts(), m, gate.compress), Error);
}
