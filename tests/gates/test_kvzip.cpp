// KVzip (issue 14): the reconstruction scores of kvzip_scores (the repeat sequence run by Model::forward_extra,
// batched over rows and chunks) equal a reference built another way: the repeat sequence prefilled into a copy
// of the cache and the restricted softmax written out row by row, in float64, for KVzip and KVzip+, with the
// template prefix skipped, several chunks and sinks. The cache is left unchanged; batch rows of different
// lengths score as they do alone; KVzip's and KVzip+'s scores from one shared pass equal their own passes'; the
// method resolves through the registry and compresses SmolLM2 to the budget; kvpress parity of the kept sets is in tests/python/test_kvpress_kvzip.py.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "gates/compress.h"
#include "gates/gate_test_utils.h"
#include "gates/kvzip.h"
#include "gates/registry.h"
#include "gates/scorer.h"
#include "models/kv_cache.h"
#include "models/model.h"
#include "models/tokenizer.h"
#include "test_paths.h"

using namespace kvd;
using namespace kvd::test;

namespace {

std::vector<int64_t> random_tokens(int64_t vocab, int64_t n, uint64_t seed) {
  torch::manual_seed(seed);
  at::Tensor t = torch::randint(12, vocab, {n}, torch::kLong);  // ids >= 12: never one of the prompt ids below
  return std::vector<int64_t>(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + n);
}

// a and b prefilled as one batch, b (the shorter) left-padded to a's length.
KVCache prefill_two_rows(const Model& model, const std::vector<int64_t>& a, const std::vector<int64_t>& b,
                         const PrefillObserver& observer = {}) {
  const int64_t T = static_cast<int64_t>(a.size()), nb = static_cast<int64_t>(b.size());
  at::Tensor ids = torch::zeros({2, T}, torch::kLong);  // (2, T)
  ids[0].copy_(torch::tensor(a, torch::kLong));
  ids[1].narrow(0, T - nb, nb).copy_(torch::tensor(b, torch::kLong));
  KVCache cache = model.new_cache(2);
  model.prefill(ids, cache, LogitsMode::LastPosition, observer, {0, T - nb});
  return cache;
}

KVzipPrompts toy_prompts() {
  KVzipPrompts p;
  p.first = {5, 6, 7};
  p.next = {8, 9};
  p.suffix = {10, 11};
  p.prefix = {1, 2, 3, 4, 1, 2};
  return p;
}

// The reference: per chunk, the repeat sequence is prefilled after a fresh prefill of the context, and each
// chunk entry's score is the maximum over the group's query heads and the repeat rows of the softmax over the
// allowed keys (sinks, the chunk, the repeat rows up to the row), listed explicitly.
// evict: context positions removed from every layer and head before scoring (all of them past the sinks and
// before the first chunk, so every scored position keeps its score's meaning); out[l] is (H_kv, N) by position.
std::vector<at::Tensor> reference_scores(const Model& model, const std::vector<int64_t>& ctx, const KVzipPrompts& pr,
                                         const KVzipOptions& opt, const std::vector<int64_t>& evict = {}) {
  const ModelConfig& c = model.config();
  const int64_t N = static_cast<int64_t>(ctx.size()), L = c.num_layers, H = c.num_heads, Hkv = c.num_kv_heads,
                G = H / Hkv, hd = c.head_dim;
  std::vector<at::Tensor> out(L);
  for (int64_t l = 0; l < L; ++l) out[l] = torch::zeros({Hkv, N}, torch::kDouble);
  const bool has_prefix =
      N >= static_cast<int64_t>(pr.prefix.size()) && std::equal(pr.prefix.begin(), pr.prefix.end(), ctx.begin());
  const int64_t P = has_prefix ? static_cast<int64_t>(pr.prefix.size()) : 0;
  for (int64_t s = P; s < N; s += opt.chunk_size) {
    const int64_t e = std::min(N, s + opt.chunk_size);
    std::vector<int64_t> rep = s == P ? pr.first : pr.next;
    if (s != P) rep.insert(rep.end(), ctx.begin() + std::max(s - opt.prev_postfix, s - opt.chunk_size), ctx.begin() + s);
    rep.insert(rep.end(), pr.suffix.begin(), pr.suffix.end());
    rep.insert(rep.end(), ctx.begin() + s, ctx.begin() + e);
    const int64_t m = static_cast<int64_t>(rep.size());
    KVCache cache = model.new_cache(1);
    model.prefill(torch::tensor(ctx, torch::kLong).unsqueeze(0), cache);
    const int64_t E = static_cast<int64_t>(evict.size());
    if (E > 0) {
      std::vector<int64_t> kept;
      for (int64_t j = 0; j < N; ++j)
        if (std::find(evict.begin(), evict.end(), j) == evict.end()) kept.push_back(j);
      for (int64_t l = 0; l < L; ++l)
        cache.keep(l, torch::tensor(kept, torch::kLong).view({1, 1, N - E}).expand({1, Hkv, N - E}).contiguous());
    }
    // Entry of context position j (j < s_first or in a chunk; the evicted positions lie between).
    auto entry = [&](int64_t j) { return j < opt.n_sink ? j : j - E; };
    PrefillObserver obs = [&](const PrefillLayerObservation& o, KVCache& kc) {
      const KVLayerView kv = kc.layer(o.layer);  // N - E + m entries
      const at::Tensor wo = model.weights().layers[o.layer].o_proj.to(torch::kDouble);  // (d, H·hd)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t g = h / G;
        const at::Tensor k = kv.k[0][g].to(torch::kDouble);  // (N + m, hd)
        const at::Tensor v = kv.v[0][g].to(torch::kDouble);  // (N + m, hd)
        for (int64_t i = 0; i < m; ++i) {
          std::vector<int64_t> keys;
          for (int64_t j = 0; j < std::min(opt.n_sink, s); ++j) keys.push_back(entry(j));
          for (int64_t j = s; j < e; ++j) keys.push_back(entry(j));
          for (int64_t j = 0; j <= i; ++j) keys.push_back(N - E + j);
          const at::Tensor idx = torch::tensor(keys, torch::kLong);
          const at::Tensor q = o.queries[0][h][i].to(torch::kDouble);                            // (hd)
          const at::Tensor p = torch::softmax(k.index_select(0, idx).matmul(q) / std::sqrt(double(hd)), 0);  // (|keys|)
          for (size_t a = 0; a < keys.size(); ++a) {
            const int64_t j = keys[a] >= std::min(opt.n_sink, s) ? keys[a] + E : keys[a];  // back to a position
            if (j < s || j >= e) continue;
            double val = p[a].item<double>();
            if (opt.norm == KVzipNorm::Plus) {
              const double wov = wo.narrow(1, h * hd, hd).matmul(v[entry(j)]).norm().item<double>();
              val *= wov / o.hidden[0][i].to(torch::kDouble).norm().item<double>();
            }
            at::Tensor cell = out[o.layer][g][j];
            if (val > cell.item<double>()) cell.fill_(val);
          }
        }
      }
    };
    model.prefill(torch::tensor(rep, torch::kLong).unsqueeze(0), cache, LogitsMode::LastPosition, obs);
  }
  double top = 0;
  for (int64_t l = 0; l < L; ++l) top = std::max(top, out[l].max().item<double>());
  for (int64_t l = 0; l < L; ++l) out[l].narrow(1, 0, std::min(opt.n_sink, N)).fill_(top + 1.0);
  return out;
}

std::vector<at::Tensor> ours_single(const Model& model, const std::vector<int64_t>& ctx, const KVzipPrompts& pr,
                                    const KVzipOptions& opt) {
  KVCache cache = model.new_cache(1);
  model.prefill(torch::tensor(ctx, torch::kLong).unsqueeze(0), cache);
  return kvzip_scores(model, cache, {ctx}, pr, opt);
}

void expect_matches_reference(const std::string& family, KVzipNorm norm, bool with_prefix) {
  const Model& model = tiny_model(family, torch::kDouble);
  KVzipPrompts pr = toy_prompts();
  std::vector<int64_t> ctx = random_tokens(model.config().vocab_size, 41, 7);
  if (with_prefix) ctx.insert(ctx.begin(), pr.prefix.begin(), pr.prefix.end());
  KVzipOptions opt;
  opt.n_sink = 3;
  opt.chunk_size = 13;  // 4 chunks, the last one short
  opt.prev_postfix = 4;
  opt.norm = norm;
  const std::vector<at::Tensor> ref = reference_scores(model, ctx, pr, opt);
  const std::vector<at::Tensor> ours = ours_single(model, ctx, pr, opt);
  ASSERT_EQ(ours.size(), ref.size());
  for (size_t l = 0; l < ref.size(); ++l) {
    ASSERT_EQ(ours[l].sizes(), (std::vector<int64_t>{1, model.config().num_kv_heads, int64_t(ctx.size())}));
    EXPECT_LT(max_abs_diff(ours[l][0], ref[l]), 1e-12) << family << " layer " << l;
    if (with_prefix)  // the prefix past the sinks is never reconstructed: 0
      EXPECT_EQ(ours[l][0].narrow(1, opt.n_sink, pr.prefix.size() - opt.n_sink).abs().max().item<double>(), 0.0);
    EXPECT_GT(ours[l][0].narrow(1, with_prefix ? pr.prefix.size() : 0, 41).min().item<double>(), 0.0);
  }
}

}  // namespace

// A cache that already lost entries (a chunked prefill's earlier compression) scores through the general path,
// which masks keys by stored position: here two prefix positions are gone from every layer and head.
TEST(KVzip, ScoresACacheWithEvictionsByPosition) {
  for (KVzipNorm norm : {KVzipNorm::None, KVzipNorm::Plus}) {
    const Model& model = tiny_model("llama3", torch::kDouble);
    const KVzipPrompts pr = toy_prompts();
    std::vector<int64_t> ctx = random_tokens(model.config().vocab_size, 41, 7);
    ctx.insert(ctx.begin(), pr.prefix.begin(), pr.prefix.end());
    const int64_t N = static_cast<int64_t>(ctx.size()), Hkv = model.config().num_kv_heads;
    KVzipOptions opt;
    opt.n_sink = 3;
    opt.chunk_size = 13;
    opt.prev_postfix = 4;
    opt.norm = norm;
    const std::vector<int64_t> evict = {4, 5};
    const std::vector<at::Tensor> ref = reference_scores(model, ctx, pr, opt, evict);
    KVCache cache = model.new_cache(1);
    model.prefill(torch::tensor(ctx, torch::kLong).unsqueeze(0), cache);
    std::vector<int64_t> kept;
    for (int64_t j = 0; j < N; ++j)
      if (j != 4 && j != 5) kept.push_back(j);
    for (int64_t l = 0; l < cache.num_layers(); ++l)
      cache.keep(l, torch::tensor(kept, torch::kLong).view({1, 1, N - 2}).expand({1, Hkv, N - 2}).contiguous());
    const std::vector<at::Tensor> ours = kvzip_scores(model, cache, {ctx}, pr, opt);
    const int64_t P = static_cast<int64_t>(pr.prefix.size());
    for (size_t l = 0; l < ref.size(); ++l)  // the chunks' positions P .. N - 1 are entries P - 2 .. N - 3
      EXPECT_LT(max_abs_diff(ours[l][0].narrow(1, P - 2, N - P), ref[l].narrow(1, P, N - P)), 1e-12) << "layer " << l;
  }
}

TEST(KVzip, MatchesReferenceWithPrefixAndChunks) { expect_matches_reference("llama3", KVzipNorm::None, true); }
TEST(KVzip, MatchesReferenceWithoutPrefix) { expect_matches_reference("qwen2", KVzipNorm::None, false); }
TEST(KVzip, PlusMatchesReference) { expect_matches_reference("llama3", KVzipNorm::Plus, true); }
TEST(KVzip, MatchesReferenceQwen3) { expect_matches_reference("qwen3", KVzipNorm::Plus, false); }

// The scores leave the cache as it was, and rows of a left-padded batch score as they do alone.
TEST(KVzip, BatchRowsScoreAsAloneAndCacheUnchanged) {
  const Model& model = tiny_model("llama3", torch::kDouble);
  const KVzipPrompts pr = toy_prompts();
  std::vector<int64_t> a = random_tokens(model.config().vocab_size, 30, 1);
  a.insert(a.begin(), pr.prefix.begin(), pr.prefix.end());
  const std::vector<int64_t> b = random_tokens(model.config().vocab_size, 17, 2);
  KVzipOptions opt;
  opt.chunk_size = 11;
  KVCache cache = prefill_two_rows(model, a, b);
  std::vector<at::Tensor> before;
  for (int64_t l = 0; l < cache.num_layers(); ++l) {
    const KVLayerView v = cache.layer(l);
    before.push_back(torch::cat({v.k.flatten(), v.v.flatten(), v.pos.flatten().to(torch::kDouble)}));
  }
  const std::vector<at::Tensor> both = kvzip_scores(model, cache, {a, b}, pr, opt);
  for (int64_t l = 0; l < cache.num_layers(); ++l) {
    const KVLayerView v = cache.layer(l);
    EXPECT_TRUE(torch::cat({v.k.flatten(), v.v.flatten(), v.pos.flatten().to(torch::kDouble)}).equal(before[l]));
  }
  const std::vector<at::Tensor> sa = ours_single(model, a, pr, opt), sb = ours_single(model, b, pr, opt);
  for (int64_t l = 0; l < cache.num_layers(); ++l) {
    EXPECT_LT(max_abs_diff(both[l][0], sa[l][0]), 1e-12);
    EXPECT_LT(max_abs_diff(both[l][1].narrow(1, 0, 17), sb[l][0]), 1e-12);  // row 1 holds its 17 entries first
    EXPECT_EQ(cache.length(l, 1, 0), 17);
  }
  EXPECT_NE(error_of([&] { kvzip_scores(model, cache, {a}, pr, opt); }).find("1 contexts for a cache of batch 2"),
            std::string::npos);
  EXPECT_NE(error_of([&] { kvzip_scores(model, cache, {a, a}, pr, opt); }).find("context tokens but its cache"),
            std::string::npos);
}

// KVzip and KVzip+ from one reconstruction pass (kvzip_scores_norms, what Scorer::prepare_peers runs for both
// methods of one prefill): each norm's scores equal its own pass's bit for bit, in either order, for a batch of
// two rows of different lengths in float32 (the eval's dtype on the CPU path); a KVzip scorer prepares the KVzip+
// scorer of its pass options with itself (Scorer::prepare_peers), not one chunked differently.
TEST(KVzip, BothNormsFromOnePassEqualTheirOwnPasses) {
  const Model& model = tiny_model("llama3", torch::kFloat);
  const KVzipPrompts pr = toy_prompts();
  std::vector<int64_t> a = random_tokens(model.config().vocab_size, 40, 3);
  a.insert(a.begin(), pr.prefix.begin(), pr.prefix.end());
  const std::vector<int64_t> b = random_tokens(model.config().vocab_size, 23, 4);
  KVCache cache = prefill_two_rows(model, a, b);
  KVzipOptions opt;
  opt.chunk_size = 16;
  opt.n_sink = 2;
  std::vector<at::Tensor> own[2];
  for (KVzipNorm norm : {KVzipNorm::None, KVzipNorm::Plus}) {
    opt.norm = norm;
    own[norm == KVzipNorm::Plus] = kvzip_scores(model, cache, {a, b}, pr, opt);
  }
  for (const std::vector<KVzipNorm>& order : {std::vector<KVzipNorm>{KVzipNorm::None, KVzipNorm::Plus},
                                              std::vector<KVzipNorm>{KVzipNorm::Plus, KVzipNorm::None}}) {
    const std::vector<std::vector<at::Tensor>> both = kvzip_scores_norms(model, cache, {a, b}, pr, opt, order);
    ASSERT_EQ(both.size(), 2u);
    for (size_t k = 0; k < 2; ++k)
      for (int64_t l = 0; l < cache.num_layers(); ++l)
        EXPECT_TRUE(torch::equal(both[k][l], own[order[k] == KVzipNorm::Plus][l])) << "norm " << k << " layer " << l;
  }
  // The two norms rank differently (the test would not tell them apart otherwise).
  EXPECT_FALSE(torch::equal(own[0][0], own[1][0]));

  // Scorer::prepare_peers: a KVzip scorer prepares itself and the KVzip+ scorer of the same pass options, not the
  // one chunked differently; each then scores as after its own prepare().
  KVzipOptions plain = opt, plus = opt, other = opt;
  plain.norm = KVzipNorm::None;
  plus.norm = KVzipNorm::Plus;
  other.chunk_size = 7;
  std::vector<std::unique_ptr<Scorer>> sc;
  for (const KVzipOptions& o : {plain, plus, other, plus}) sc.push_back(make_kvzip_scorer(pr, o));
  KVCache c2 = prefill_two_rows(model, a, b, [&](const PrefillLayerObservation& o, KVCache& kc) {
    for (auto& s : sc) s->on_append(o, kc);
  });
  const std::vector<Scorer*> done = sc[1]->prepare_peers(model, c2, {sc[2].get(), sc[0].get(), sc[1].get()});
  EXPECT_EQ(done, (std::vector<Scorer*>{sc[1].get(), sc[0].get()}));
  sc[3]->prepare(model, c2);  // KVzip+ alone
  for (int64_t l = 0; l < c2.num_layers(); ++l) {
    const LayerView view = layer_view(c2.layer(l), l, model, c2.next_positions());
    EXPECT_TRUE(torch::equal(sc[1]->score(view), sc[3]->score(view))) << "layer " << l;
    const at::Tensor s0 = sc[0]->score(view), ref0 = own[0][l].to(torch::kFloat);  // KVzip from the shared pass
    EXPECT_TRUE(torch::equal(s0.masked_fill(s0.isinf(), 0), ref0.masked_fill(s0.isinf(), 0))) << "layer " << l;
  }
}

// Through the registry: kvzip needs the model directory; on SmolLM2 its prompts are the chat template's, and a
// compression keeps L · H_kv · n_kept entries pooled over layers, the sinks always among them.
TEST(KVzip, RegistryAndSmolLM2Compression) {
  EXPECT_NE(error_of([] { make_method("kvzip", Budget::ratio(0.5)); }).find("needs the model's tokenizer"),
            std::string::npos);
  const std::string dir = KVD_MODEL_DIR;
  if (!std::ifstream(dir + "/tokenizer.json").good()) GTEST_SKIP() << "no SmolLM2 at " << dir;
  const KVzipPrompts pr = kvzip_prompts(dir);
  const Tokenizer tok = Tokenizer::from_file(dir);
  auto text = [&](const std::vector<int64_t>& v) { return tok.decode(std::vector<int32_t>(v.begin(), v.end())); };
  EXPECT_EQ(text(pr.first), "\n\nRepeat the previous context exactly.");
  EXPECT_EQ(text(pr.suffix), "<|im_end|>\n<|im_start|>assistant\n");
  EXPECT_EQ(text(pr.prefix).rfind("<|im_start|>system\n", 0), 0u) << text(pr.prefix);
  EXPECT_EQ(text(pr.prefix).substr(text(pr.prefix).size() - 17), "<|im_start|>user\n");

  const Model model = Model::load(dir, torch::kCPU);
  Method m = make_method("kvzip", Budget::ratio(0.75), 0, dir);
  EXPECT_EQ(m.selector.allocation, Allocation::Global);
  EXPECT_EQ(make_method("adakv_kvzip", Budget::ratio(0.75), 0, dir).selector.allocation, Allocation::AdaKV);
  std::vector<int64_t> ids = pr.prefix;
  const std::vector<int32_t> body = tok.encode(
      "The lighthouse keeper wrote down every ship that passed: the Aurora at dawn, the Meridian at noon, and a "
      "fishing boat with a red sail just before the storm. By evening the log held eleven names.");
  ids.insert(ids.end(), body.begin(), body.end());
  const int64_t N = static_cast<int64_t>(ids.size());
  KVCache cache = model.new_cache(1);
  compress_prefill(model, cache, torch::tensor(ids, torch::kLong).unsqueeze(0), m);
  const ModelConfig& c = model.config();
  int64_t kept = 0;
  for (int64_t l = 0; l < c.num_layers; ++l)
    for (int64_t h = 0; h < c.num_kv_heads; ++h) {
      kept += cache.length(l, 0, h);
      const at::Tensor pos = cache.layer(l).pos[0][h].narrow(0, 0, cache.length(l, 0, h));
      for (int64_t j = 0; j < 4; ++j) EXPECT_TRUE(pos.eq(j).any().item<bool>()) << "sink " << j << " layer " << l;
    }
  EXPECT_EQ(kept, c.num_layers * c.num_kv_heads * Budget::ratio(0.75).n_kept(N));
}
