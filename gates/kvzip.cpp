#include "gates/kvzip.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "common/error.h"
#include "gates/heuristics.h"
#include "gates/prepared_scores.h"
#include "gates/scorer.h"
#include "models/chat_template.h"
#include "models/device.h"
#include "models/kv_cache.h"
#include "models/model.h"
#include "models/tokenizer.h"

namespace kvd {
namespace {

std::vector<int64_t> encode64(const Tokenizer& tok, const std::string& text) {
  const std::vector<int32_t> v = tok.encode(text);
  return std::vector<int64_t>(v.begin(), v.end());
}

bool has_chat_template(const std::string& model_dir) {
  const std::filesystem::path p = std::filesystem::path(model_dir) / "tokenizer_config.json";
  std::ifstream in(p);
  if (!in.good()) return false;
  const nlohmann::json cfg = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  return cfg.is_object() && cfg.contains("chat_template") && !cfg["chat_template"].is_null();
}

// One reconstruction pass of row b: context positions [start, end) and the repeat sequence's ids.
struct RowPass {
  int64_t start = 0, end = 0;
  std::vector<int64_t> ids;
};

// Row b's passes: the context after the template prefix (when the row starts with it), cut into chunks.
std::vector<RowPass> row_passes(const std::vector<int64_t>& ctx, const KVzipPrompts& pr, const KVzipOptions& opt) {
  const int64_t N = static_cast<int64_t>(ctx.size()), P0 = static_cast<int64_t>(pr.prefix.size());
  const int64_t P = P0 > 0 && N >= P0 && std::equal(pr.prefix.begin(), pr.prefix.end(), ctx.begin()) ? P0 : 0;
  std::vector<RowPass> out;
  for (int64_t s = P; s < N; s += opt.chunk_size) {
    RowPass r;
    r.start = s;
    r.end = std::min(N, s + opt.chunk_size);
    if (s == P) {
      r.ids = pr.first;
    } else {
      r.ids = pr.next;
      const int64_t q = std::max(s - opt.prev_postfix, s - opt.chunk_size);  // the previous chunk's last tokens
      r.ids.insert(r.ids.end(), ctx.begin() + q, ctx.begin() + s);
    }
    r.ids.insert(r.ids.end(), pr.suffix.begin(), pr.suffix.end());
    r.ids.insert(r.ids.end(), ctx.begin() + r.start, ctx.begin() + r.end);
    out.push_back(std::move(r));
  }
  return out;
}

}  // namespace

KVzipPrompts kvzip_prompts(const std::string& model_dir) {
  const Tokenizer tok = Tokenizer::from_file(model_dir);
  KVzipPrompts p;
  p.first = encode64(tok, "\n\nRepeat the previous context exactly.");
  p.next = encode64(tok, "\n\nRepeat the part of the previous context exactly, starting with");
  if (!has_chat_template(model_dir)) {
    p.suffix = encode64(tok, "\n");
    return p;
  }
  // The template around a user turn: render one with a marked content and cut the text at the marks.
  const ChatTemplate chat = ChatTemplate::from_file(model_dir);
  const std::string dummy = "dummy context", sep = "\n" + std::string(dummy.size(), '#');
  const std::string text = chat.render({{"user", dummy + sep}}, AddGenerationPrompt::Yes);
  const size_t at_sep = text.find(sep), at_dummy = text.find(dummy);
  KVD_CHECK(at_sep != std::string::npos && at_dummy != std::string::npos && at_dummy < at_sep, model_dir,
            ": the chat template does not render a user turn's content verbatim; KVzip cannot find its prefix");
  p.prefix = encode64(tok, text.substr(0, at_dummy));
  p.suffix = encode64(tok, text.substr(at_sep + sep.size()));
  return p;
}

std::vector<at::Tensor> kvzip_scores(const Model& model, const KVCache& cache,
                                     const std::vector<std::vector<int64_t>>& context, const KVzipPrompts& prompts,
                                     const KVzipOptions& opt) {
  return kvzip_scores_norms(model, cache, context, prompts, opt, {opt.norm})[0];
}

std::vector<std::vector<at::Tensor>> kvzip_scores_norms(const Model& model, const KVCache& cache,
                                                        const std::vector<std::vector<int64_t>>& context,
                                                        const KVzipPrompts& prompts, const KVzipOptions& opt,
                                                        const std::vector<KVzipNorm>& norms) {
  torch::NoGradGuard no_grad;
  const ModelConfig& c = model.config();
  const int64_t B = cache.batch(), L = c.num_layers, H = c.num_heads, Hkv = c.num_kv_heads, G = H / Hkv,
                hd = c.head_dim;
  KVD_CHECK(static_cast<int64_t>(context.size()) == B, "kvzip: ", context.size(), " contexts for a cache of batch ", B);
  KVD_CHECK(opt.chunk_size > 0 && opt.n_sink >= 0 && opt.prev_postfix >= 0,
            "kvzip: chunk_size must be > 0, n_sink and prev_postfix >= 0");
  KVD_CHECK(!norms.empty(), "kvzip: no norm to score with");
  const size_t NN = norms.size();
  const bool plus = std::find(norms.begin(), norms.end(), KVzipNorm::Plus) != norms.end();
  const bool plain = std::find(norms.begin(), norms.end(), KVzipNorm::None) != norms.end();
  const c10::ScalarType acc = model.dtype() == torch::kDouble ? torch::kDouble : torch::kFloat;

  std::vector<std::vector<RowPass>> passes(B);
  size_t n_pass = 0;
  for (int64_t b = 0; b < B; ++b) {
    KVD_CHECK(static_cast<int64_t>(context[b].size()) == cache.next_position(b), "kvzip: row ", b, " has ",
              context[b].size(), " context tokens but its cache is at position ", cache.next_position(b));
    passes[b] = row_passes(context[b], prompts, opt);
    n_pass = std::max(n_pass, passes[b].size());
  }
  std::vector<std::vector<at::Tensor>> out(NN, std::vector<at::Tensor>(L));  // [norm][layer]
  for (int64_t l = 0; l < L; ++l) {
    const KVLayerView kv = cache.layer(l);
    for (size_t k = 0; k < NN; ++k) out[k][l] = torch::zeros({B, Hkv, kv.n}, kv.k.options().dtype(acc));  // (B, H_kv, n_l)
  }
  // KVzip+: ||W_O,h v||² = vᵀ (W_O,hᵀ W_O,h) v for query head h, with the (hd, hd) Gram matrix of its slice.
  std::vector<at::Tensor> gram(L);
  if (plus)
    for (int64_t l = 0; l < L; ++l) {
      const at::Tensor wo = model.weights().layers[l].o_proj.to(acc).view({c.hidden_size, Hkv, G, hd});  // (d, H_kv, G, hd)
      gram[l] = torch::einsum("dhgi,dhgj->hgij", {wo, wo});  // (H_kv, G, hd, hd)
    }

  for (size_t pi = 0; pi < n_pass; ++pi) {
    // Pass pi of every row at once, each row's repeat sequence padded at its end.
    int64_t m = 1;
    for (int64_t b = 0; b < B; ++b)
      if (pi < passes[b].size()) m = std::max<int64_t>(m, passes[b][pi].ids.size());
    at::Tensor ids = torch::zeros({B, m}, torch::kLong);  // (B, m)
    std::vector<int64_t> len(B, 0);
    for (int64_t b = 0; b < B; ++b)
      if (pi < passes[b].size()) {
        const std::vector<int64_t>& r = passes[b][pi].ids;
        len[b] = static_cast<int64_t>(r.size());
        ids[b].narrow(0, 0, len[b]).copy_(torch::tensor(r, torch::kLong));
      }
    const at::Tensor start = torch::tensor(cache.next_positions(), torch::kLong).view({B, 1});
    AttentionMods mods;
    mods.extra.embeddings = model.embed(ids.to(model.device()));                                     // (B, m, d)
    mods.extra.positions = (start + torch::arange(m, torch::kLong).view({1, m})).to(model.device());  // (B, m)
    mods.extra.attention = ExtraAttention::Fused;  // the observer computes its own restricted softmax
    mods.extra.placement = ExtraPlacement::AfterCache;  // from each row's next position on

    // Per row of this pass: its chunk [rs, re), its sinks (positions < sk) and its real repeat rows (< len).
    std::vector<int64_t> rs(B, 0), re(B, 0), sk(B, 0);
    for (int64_t b = 0; b < B; ++b)
      if (pi < passes[b].size()) {
        rs[b] = passes[b][pi].start;
        re[b] = passes[b][pi].end;
        sk[b] = std::min(opt.n_sink, rs[b]);
      }
    const c10::Device dev = model.device();
    const at::Tensor rs_d = host_ints(rs, dev).view({B, 1, 1}), re_d = host_ints(re, dev).view({B, 1, 1}),
                     sk_d = host_ints(sk, dev).view({B, 1, 1});                               // (B, 1, 1)
    const at::Tensor real = torch::arange(m, torch::TensorOptions().dtype(torch::kLong).device(dev)).view({1, m})
                                .lt(host_ints(len, dev).view({B, 1}));  // (B, m) the rows of the pass
    const at::Tensor qpos = mods.extra.positions.masked_fill(real.logical_not(), -1);  // (B, m); padding sees nothing
    int64_t lo = INT64_MAX, hi = 0, sinks = 0, n_live = 0;  // the union of the pass's chunks and sinks
    for (int64_t b = 0; b < B; ++b)
      if (pi < passes[b].size()) {
        lo = std::min(lo, rs[b]);
        hi = std::max(hi, re[b]);
        sinks = std::max(sinks, sk[b]);
        ++n_live;
      }

    // Every row at once: the repeat rows attend (one softmax) over the sinks, the chunk's entries and their own
    // rows causally, which are the cache's entries selected by position plus the rows' own keys at their
    // positions; the column maximum over the rows (KVzip+: each row's P / ||h_i||) comes from the window-scores
    // kernel without a (rows, entries) tensor in global memory.
    const ExtraRowsObserver observer = [&](const ExtraRowsLayerObservation& obs, const KVLayerView& kv) {
      const int64_t l = obs.layer, nc = kv.n;
      at::Tensor chunk = kv.pos.ge(rs_d).logical_and(kv.pos.lt(re_d));  // (B, H_kv, nc)
      at::Tensor seen = chunk.logical_or(kv.pos.lt(sk_d));              // (B, H_kv, nc)
      if (kv.valid.defined()) {
        chunk = chunk.logical_and(kv.valid);
        seen = seen.logical_and(kv.valid);
      }
      // While every row holds its context in position order (what a prefill leaves: entry j is position j), the
      // pass reads only the entries [0, S) (the sinks) and [lo, hi) (the rows' chunks); otherwise all of them.
      std::vector<std::pair<int64_t, int64_t>> ranges{{0, nc}};
      const std::vector<int64_t>& lens = cache.lengths(l);
      bool in_order = true;
      for (int64_t r = 0; r < B * Hkv && in_order; ++r) in_order = lens[r] == cache.next_position(r / Hkv);
      if (in_order && n_live > 0) {
        ranges.clear();
        if (sinks > 0) ranges.emplace_back(0, sinks);
        if (hi > std::max(lo, sinks)) ranges.emplace_back(std::max(lo, sinks), hi);
      }
      auto pick = [&](const at::Tensor& t) {  // (B, H_kv, nc, ...) -> the ranges' entries, in order
        std::vector<at::Tensor> parts;
        for (const auto& [a, e] : ranges) parts.push_back(t.narrow(2, a, e - a));
        return parts.size() == 1 ? parts[0] : torch::cat(parts, 2);
      };
      WindowScoresInput in;
      in.q = obs.queries;                                                                   // (B, H, m, hd)
      in.q_pos = qpos;                                                                      // (B, m)
      in.k = torch::cat({pick(kv.k), obs.keys.to(kv.k.scalar_type())}, 2);                 // (B, H_kv, n' + m, hd)
      in.k_pos = torch::cat({pick(kv.pos), mods.extra.positions.unsqueeze(1).expand({B, Hkv, m})}, 2);  // (B, H_kv, n' + m)
      in.valid = torch::cat({pick(seen), real.unsqueeze(1).expand({B, Hkv, m})}, 2);                   // (B, H_kv, n' + m)
      if (plus) in.row_weight = obs.hidden.to(acc).norm(2, -1).clamp_min(1e-30).reciprocal();  // (B, m)
      const int64_t np = in.k.size(2) - m;  // the cache entries the pass read
      // One kernel for every norm: KVzip+'s weighted maximum in `max`, KVzip's plain one in `max_plain` when both.
      const WindowColumns wc =
          window_columns(in, plus && plain ? WindowMoments::MaxAndPlain : WindowMoments::Max, opt.kernels);
      at::Tensor vnorm;  // (B, H_kv, G, n') ||W_O v_j|| per query head, for the entries read only
      if (plus) {
        const at::Tensor v = pick(kv.v).to(acc);  // (B, H_kv, n', hd)
        vnorm = torch::einsum("bhti,hgij,bhtj->bhgt", {v, gram[l], v}).clamp_min(0).sqrt();
      }
      for (size_t k = 0; k < NN; ++k) {
        const bool is_plus = norms[k] == KVzipNorm::Plus;
        const at::Tensor& mx = !is_plus && plus ? wc.max_plain : wc.max;  // (B, H, n' + m)
        at::Tensor cols = mx.narrow(2, 0, np).to(acc).view({B, Hkv, G, np});  // (B, H_kv, G, n')
        if (is_plus) cols = cols * vnorm;
        const at::Tensor s = cols.amax(2);                       // (B, H_kv, n')
        at::Tensor p = torch::zeros({B, Hkv, nc}, s.options());  // (B, H_kv, nc)
        int64_t off = 0;
        for (const auto& [a, e] : ranges) {
          p.narrow(2, a, e - a).copy_(s.narrow(2, off, e - a));
          off += e - a;
        }
        out[k][l] = torch::where(chunk, p, out[k][l]);  // (B, H_kv, nc)
      }
    };
    model.forward_extra(cache, mods, observer);
  }
  // Sinks outrank everything of their row: every row at once, one view of each layer.
  if (opt.n_sink > 0)
    for (std::vector<at::Tensor>& o : out) {
      std::vector<at::Tensor> row_max;  // [layer] (B)
      for (int64_t l = 0; l < L; ++l) row_max.push_back(o[l].flatten(1).amax(1));
      const at::Tensor above = (std::get<0>(torch::stack(row_max).max(0)) + 1.0).view({B, 1, 1});  // (B, 1, 1)
      for (int64_t l = 0; l < L; ++l) {
        const KVLayerView kv = cache.layer(l);
        at::Tensor sinks = kv.pos.lt(opt.n_sink);  // (B, H_kv, nc)
        if (kv.valid.defined()) sinks = sinks.logical_and(kv.valid);
        o[l] = torch::where(sinks, above, o[l]);
      }
    }
  return out;
}

namespace {

class KVzipScorer : public Scorer {
 public:
  KVzipScorer(KVzipPrompts prompts, KVzipOptions opt) : prompts_(std::move(prompts)), opt_(opt) {}
  std::string name() const override { return opt_.norm == KVzipNorm::Plus ? "kvzip_plus" : "kvzip"; }
  ScorerNeeds needs() const override {
    ScorerNeeds n;
    n.timing = ScoreTiming::AfterForward;
    n.rows = RowBatching::Together;
    return n;
  }
  // Records the tokens behind each position, in order: a row that starts again at position 0 is a new prompt.
  void on_append(const PrefillLayerObservation& obs, KVCache& cache) override {
    if (obs.layer != 0) return;
    KVD_CHECK(obs.ids.defined(), "kvzip: the prefill did not pass its token ids (PrefillLayerObservation::ids)");
    const at::Tensor ids = obs.ids.to(torch::kCPU, torch::kLong).contiguous();             // (B, T)
    const at::Tensor pos = obs.query_positions.to(torch::kCPU, torch::kLong).contiguous();  // (B, T)
    const int64_t B = ids.size(0), T = ids.size(1);
    const int64_t* idp = ids.data_ptr<int64_t>();
    const int64_t* pp = pos.data_ptr<int64_t>();
    ids_.resize(cache.batch());
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t) {
        const int64_t p = pp[b * T + t];
        if (p < 0) continue;  // left padding
        std::vector<int64_t>& row = ids_[b];
        if (p == 0) row.clear();
        KVD_CHECK(p == static_cast<int64_t>(row.size()), "kvzip: row ", b, " appended position ", p, " after ", row.size(),
                  " recorded tokens; drive every prefill and decode step of the cache through the scorer's on_append");
        row.push_back(idp[b * T + t]);
      }
  }
  void prepare(const Model& model, const KVCache& cache) override { prepare_peers(model, cache, {this}); }
  // This scorer and the KVzip / KVzip+ peers with its prompts and pass options, from one reconstruction pass (every
  // peer recorded the same prefill's tokens); other peers are left to prepare themselves.
  std::vector<Scorer*> prepare_peers(const Model& model, const KVCache& cache, const std::vector<Scorer*>& peers) override {
    std::vector<KVzipScorer*> same{this};
    std::vector<KVzipNorm> norms{opt_.norm};
    for (Scorer* p : peers) {
      auto* z = dynamic_cast<KVzipScorer*>(p);
      if (!z || z == this || !shares_pass_with(*z)) continue;
      same.push_back(z);
      if (std::find(norms.begin(), norms.end(), z->opt_.norm) == norms.end()) norms.push_back(z->opt_.norm);
    }
    KVD_CHECK(static_cast<int64_t>(ids_.size()) == cache.batch(), "kvzip: the cache's tokens were not recorded; drive its "
              "prefill through compress_prefill (the scorer's on_append)");
    const std::vector<std::vector<at::Tensor>> all = kvzip_scores_norms(model, cache, ids_, prompts_, opt_, norms);
    std::vector<Scorer*> done;
    for (KVzipScorer* z : same) {
      KVD_CHECK(z->ids_ == ids_, "kvzip: peers sharing a prefill recorded different tokens");
      const size_t k = static_cast<size_t>(std::find(norms.begin(), norms.end(), z->opt_.norm) - norms.begin());
      z->scores_.set(cache, all[k]);
      done.push_back(z);
    }
    return done;
  }
  at::Tensor score(const LayerView& view) override { return scores_.get(view); }

 private:
  bool shares_pass_with(const KVzipScorer& o) const {
    return o.prompts_.first == prompts_.first && o.prompts_.next == prompts_.next && o.prompts_.suffix == prompts_.suffix &&
           o.prompts_.prefix == prompts_.prefix && o.opt_.n_sink == opt_.n_sink && o.opt_.chunk_size == opt_.chunk_size &&
           o.opt_.prev_postfix == opt_.prev_postfix && o.opt_.kernels == opt_.kernels;
  }

  KVzipPrompts prompts_;
  KVzipOptions opt_;
  std::vector<std::vector<int64_t>> ids_;  // [row] the token at each position so far
  PreparedScores scores_{"kvzip scorer"};
};

}  // namespace

std::unique_ptr<Scorer> make_kvzip_scorer(KVzipPrompts prompts, KVzipOptions options) {
  return std::make_unique<KVzipScorer>(std::move(prompts), options);
}

}  // namespace kvd
