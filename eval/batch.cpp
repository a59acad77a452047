#include "eval/run_parts.h"

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
#include "models/chat_template.h"
#include "models/config.h"
#include "models/device.h"
#include "models/generate.h"
#include "models/kv_cache.h"
#include "models/model.h"
#include "models/profile.h"
#include "models/tokenizer.h"
namespace kvd {
namespace evalrun {

using nlohmann::json;

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// --- methods ----------------------------------------------------------------------------------------------

MethodContext method_context(const Model& model, const std::string& model_dir, const EvalOptions& opt) {
  MethodContext ctx;
  ctx.model = &model;
  ctx.model_dir = model_dir;
  ctx.seed = opt.seed;
  ctx.learned_mode = opt.learned_mode;
  ctx.continuous_chunk = opt.continuous_chunk;
  ctx.kernels = opt.kernels;
  const BaseModelInfo base = base_model_info(model_dir);
  ctx.load_bundle = [&model, base](const std::string& dir) { return load_component(dir, model, base); };
  return ctx;
}

// --- prompts ----------------------------------------------------------------------------------------------


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

std::vector<KVCache> compress_batch(const Model& model, const std::vector<const Prepared*>& rows,
                                   const std::vector<ResolvedMethod*>& ms, std::vector<double>& prefill_s, size_t join) {
  KVD_CHECK(!ms.empty(), "eval: internal error, no method to run");
  const int64_t B = static_cast<int64_t>(rows.size());
  std::vector<std::vector<int64_t>> spans;
  for (const Prepared* p : rows) spans.push_back(p->span);
  std::vector<KVCache> caches;
  for (size_t i = 0; i < ms.size(); ++i) caches.push_back(model.new_cache(B));
  auto t0 = Clock::now();
  if (ms.size() > 1 && !shares_prefill_with(*ms[0], *ms[1])) {
    // Budgets of one method that cannot share a prefill: each prefilled on its own, or `join` of them at a time as
    // the rows of one batch (their caches may still decode as one batch).
    prefill_s.assign(ms.size(), 0.0);
    for (const ResolvedMethod* m : ms)
      KVD_CHECK(join <= 1 || joins_prefill_with(*ms[0], *m), "eval: internal error, budgets that cannot join a "
                "prefill were joined");
    for (size_t r0 = 0; r0 < ms.size();) {
      const size_t r1 = std::min(ms.size(), r0 + std::max<size_t>(join, 1)), n = r1 - r0;
      KVD_CHECK(ms[r0]->name == ms[0]->name, "eval: internal error, methods that cannot share a prefill were grouped");
      auto ti = Clock::now();
      if (n == 1) {
        compress_prefill(model, caches[r0], spans, ms[r0]->method, ms[r0]->compress);
      } else {
        // Row i * B + b: prompt b at budget r0 + i, scored by budget r0's scorer (it never reads the budget).
        std::vector<std::vector<int64_t>> spans_n;
        Method m = ms[r0]->method;
        for (size_t i = r0; i < r1; ++i) {
          spans_n.insert(spans_n.end(), spans.begin(), spans.end());
          m.selector.row_budgets.insert(m.selector.row_budgets.end(), static_cast<size_t>(B), ms[i]->method.selector.budget);
        }
        KVCache all = model.new_cache(static_cast<int64_t>(n) * B);
        compress_prefill(model, all, spans_n, m, ms[r0]->compress);
        for (size_t i = r0; i < r1; ++i) caches[i] = all.take_rows(static_cast<int64_t>(i - r0) * B, B);
      }
      sync_stream(model.device());
      for (size_t i = r0; i < r1; ++i) prefill_s[i] = seconds_since(ti) / static_cast<double>(n);
      r0 = r1;
    }
    return caches;
  }
  if (ms.size() > 1) {
    std::vector<KVCache*> ptrs;
    std::vector<Method*> methods;
    for (size_t i = 0; i < ms.size(); ++i) {
      KVD_CHECK(shares_prefill_with(*ms[0], *ms[i]), "eval: internal error, methods that cannot share a prefill were grouped");
      ptrs.push_back(&caches[i]);
      methods.push_back(&ms[i]->method);
    }
    compress_prefill_many(model, ptrs, spans, methods, ms[0]->compress);
  } else if (ms[0]->full) {
    std::vector<int64_t> lead;
    at::Tensor ids = left_pad(spans, 0, lead);  // (B, T)
    model.prefill(ids, caches[0], LogitsMode::LastPosition, {}, lead);
  } else {
    compress_prefill(model, caches[0], spans, ms[0]->method, ms[0]->compress);
  }
  sync_stream(model.device());  // the timing waits for this thread's stream only (eval --workers)
  prefill_s.assign(ms.size(), seconds_since(t0));
  return caches;
}

FullReference repeat_rows(const FullReference& ref, int64_t n) {
  FullReference out;
  for (int64_t i = 0; i < n; ++i) {
    out.answer.insert(out.answer.end(), ref.answer.begin(), ref.answer.end());
    out.logp.insert(out.logp.end(), ref.logp.begin(), ref.logp.end());
  }
  for (const at::Tensor& r : ref.rank) out.rank.push_back(r.defined() ? r.repeat({n, 1, 1}) : r);  // (n * B, H_kv, N)
  return out;
}

std::vector<RowResult> finish_batch(const Model& model, const std::vector<const Prepared*>& rows, ResolvedMethod& m,
                                    KVCache& cache, FullReference& ref, DecodePath decode, double& decode_s,
                                    DecodePath& decode_path) {
  const ModelConfig& cfg = model.config();
  const int64_t B = static_cast<int64_t>(rows.size()), L = cfg.num_layers, Hkv = cfg.num_kv_heads;
  std::vector<std::vector<int64_t>> spans, rests;
  std::vector<int64_t> max_new;
  int64_t span_max = 0;
  for (const Prepared* p : rows) {
    spans.push_back(p->span);
    rests.push_back(p->rest);
    max_new.push_back(p->max_new);
    span_max = std::max(span_max, static_cast<int64_t>(p->span.size()));
  }
  std::vector<RowResult> out(B);
  ProfileLap lap(model.device(), "eval ");

  // The kept context positions per (row, layer, KV head), as the cache holds them after compression: (B, H_kv, n)
  // positions, which of them are real, and each head's count. Read back only for the hit rate (step 4).
  std::vector<at::Tensor> kept_pos(L), kept_valid(L);
  std::vector<std::vector<int64_t>> kept_len(L);
  for (int64_t l = 0; l < L; ++l) {
    const KVLayerView kv = cache.layer(l, LayerRead::Positions);  // no K / V copy of a ragged layer
    kept_pos[l] = kv.pos.clone();                                                          // (B, H_kv, n)
    kept_valid[l] = kv.valid.defined() ? kv.valid.clone() : at::Tensor();                  // (B, H_kv, n)
    kept_len[l] = cache.lengths(l);                                                        // [B * H_kv]
  }
  for (int64_t b = 0; b < B; ++b) {
    const int64_t span = static_cast<int64_t>(spans[b].size());
    out[b].kept_bytes = cache.row_bytes(b);
    out[b].full_bytes = span * L * Hkv * cache.bytes_per_entry();
    out[b].kept_fraction = static_cast<double>(out[b].kept_bytes) / static_cast<double>(out[b].full_bytes);
  }
  lap("kept sets");

  // 2. The answer.
  auto t1 = Clock::now();
  const std::vector<int64_t> before = cache.next_positions();
  GenerateOptions g;
  g.mode = SamplingMode::Greedy;
  g.max_new_tokens_per_row = max_new;
  g.decode = decode;
  std::unique_ptr<DecodeEvictor> evictor;
  if (m.decode) {
    DecodeTrigger trig;
    trig.interval = m.decode->interval;
    DecodeEvictionOptions eo;
    eo.scorer = m.method.scorer;
    eo.kernels = m.compress.kernels;
    evictor = std::make_unique<DecodeEvictor>(model, m.decode->policy, trig, eo);
    g.decode_observer = evictor->observer();
    // The fixed-shape paths (CUDA graphs) where the policy has that form; the cache path otherwise.
    g.static_evictor = evictor->static_evictor();
    if (!g.static_evictor) g.decode = DecodePath::Cache;
    // The rest of the prompt is appended before decoding: the scorer rates those entries too.
    g.prefill_observer = [&m](const PrefillLayerObservation& obs, KVCache& c) { m.method.scorer->on_append(obs, c); };
  }
  BatchGenerateResult gen = generate_batch(model, rests, cache, g);
  decode_path = gen.decode;
  sync_stream(model.device());  // the timing waits for this thread's stream only (eval --workers)
  decode_s = seconds_since(t1);
  lap("answer");
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
    ref.rank.assign(L, at::Tensor());
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
    // 4. (reference side) the attention of the answer's queries to the compressed span, mean over the answer's
    // rows and the GQA group, ranked per (row, KV head): stable, so ties go to the lower position. Every row at
    // once: the rows that are not the answer's (padding, the rest of the prompt) are moved to position -1, where
    // they see nothing and add 0.
    const int64_t Tx = ids.size(1);
    std::vector<int64_t> first_answer(B), n_answer(B), span_len(B);
    for (int64_t b = 0; b < B; ++b) {
      first_answer[b] = lead[b] + static_cast<int64_t>(rests[b].size());
      n_answer[b] = static_cast<int64_t>(ref.answer[b].size());
      span_len[b] = static_cast<int64_t>(spans[b].size());
    }
    const auto lopt = torch::TensorOptions().dtype(torch::kLong).device(model.device());
    const at::Tensor r0 = host_ints(first_answer, model.device()).view({B, 1});  // (B, 1)
    const at::Tensor nr = host_ints(n_answer, model.device()).view({B, 1});      // (B, 1)
    const at::Tensor row = torch::arange(Tx, lopt).view({1, Tx});                                      // (1, Tx)
    const at::Tensor answer_rows = row.ge(r0).logical_and(row.lt(r0 + nr));                           // (B, Tx)
    const at::Tensor in_span = torch::arange(span_max, lopt).view({1, 1, span_max})
                                   .lt(host_ints(span_len, model.device()).view({B, 1, 1}))
                                   .logical_and(nr.view({B, 1, 1}).gt(0));  // (B, 1, N): a row without answer ranks nothing
    observer = [&, answer_rows, nr, in_span](const PrefillLayerObservation& obs, KVCache& c) {
      const KVLayerView kv = c.layer(obs.layer);
      const at::Tensor qp = obs.query_positions.masked_fill(answer_rows.logical_not(), -1);  // (B, Tx)
      const at::Tensor a = window_columns({obs.queries, qp, kv.k, kv.pos, kv.valid}, WindowMoments::Sum,
                                          m.compress.kernels)
                               .sum;  // (B, H, n)
      const at::Tensor per_kv = reduce_group(a / nr.clamp_min(1).view({B, 1, 1}).to(a.scalar_type()), Hkv,
                                             GroupReduce::Mean);  // (B, H_kv, n)
      at::Tensor att = at::constant_pad_nd(per_kv, {0, std::max<int64_t>(0, span_max - per_kv.size(2))})
                           .narrow(2, 0, span_max)
                           .masked_fill(in_span.logical_not(), -1.0f);  // (B, H_kv, N)
      at::Tensor order = std::get<1>(att.sort(/*stable=*/true, 2, /*descending=*/true));  // (B, H_kv, N)
      ref.rank[obs.layer] = torch::empty_like(order).scatter_(
          2, order, torch::arange(span_max, order.options()).view({1, 1, span_max}).expand_as(order));  // (B, H_kv, N)
    };
  }
  at::Tensor logits = model.prefill(ids, cache, LogitsMode::AllPositions, observer, lead);  // (B, Tx, V)
  lap("teacher-forced forward");
  // Per row: the KL and the answer's mean NLL stay on the device until one read-back for the batch.
  std::vector<at::Tensor> kl(B), nll(B);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t nx = static_cast<int64_t>(xs[b].size()), nrest = static_cast<int64_t>(rests[b].size());
    if (nx < 2) continue;
    at::Tensor lp = torch::log_softmax(logits[b].narrow(0, lead[b], nx - 1), -1);  // (nx - 1, V)
    if (m.full) ref.logp[b] = lp;
    at::Tensor rp = ref.logp[b];                                                   // (nx - 1, V)
    kl[b] = (rp.exp() * (rp - lp)).sum(-1).mean();                                 // ()
    // Perplexity of the full cache's answer: positions nrest - 1 .. nx - 2 predict the answer's tokens.
    const int64_t na = nx - nrest;
    if (na > 0) {
      at::Tensor tgt = torch::tensor(std::vector<int64_t>(xs[b].begin() + nrest, xs[b].end()), torch::kLong)
                           .to(lp.device());                                      // (na)
      nll[b] = -lp.narrow(0, nrest - 1, na).gather(1, tgt.view({na, 1})).mean();  // ()
    }
  }
  {
    std::vector<at::Tensor> all;
    for (int64_t b = 0; b < B; ++b) {
      all.push_back(kl[b].defined() ? kl[b].to(torch::kDouble) : torch::zeros({}, logits.options().dtype(torch::kDouble)));
      all.push_back(nll[b].defined() ? nll[b].to(torch::kDouble) : torch::zeros({}, logits.options().dtype(torch::kDouble)));
    }
    const at::Tensor host = torch::stack(all).to(torch::kCPU).contiguous();  // (2 B) float64
    const double* h = host.data_ptr<double>();
    for (int64_t b = 0; b < B; ++b) {
      if (kl[b].defined()) out[b].kl = h[2 * b];
      if (nll[b].defined()) out[b].ppl = std::exp(h[2 * b + 1]);
    }
  }
  lap("kl + ppl");

  // 4. The critical-KV hit rate: per (row, layer, KV head), the share of the k kept entries that lie among the
  // k entries the full cache's answer attends to most; the mean over heads that keep something. A row whose
  // reference answer is empty has none (0).
  std::vector<at::Tensor> hits(L);
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor& p = kept_pos[l];                                                        // (B, H_kv, n)
    at::Tensor k = host_ints(kept_len[l], p.device()).view({B, Hkv, 1});  // (B, H_kv, 1)
    at::Tensor r = ref.rank[l].gather(2, p.clamp(0, span_max - 1));                          // (B, H_kv, n)
    at::Tensor hit = r.lt(k).logical_and(p.ge(0)).logical_and(p.lt(span_max));                // (B, H_kv, n)
    if (kept_valid[l].defined()) hit = hit.logical_and(kept_valid[l]);
    hits[l] = hit.sum(2);                                                                     // (B, H_kv)
  }
  at::Tensor h = torch::stack(hits).to(torch::kCPU).contiguous();  // (L, B, H_kv) int64
  const int64_t* hp = h.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    double sum = 0;
    int64_t cnt = 0;
    if (!ref.answer[b].empty())
      for (int64_t l = 0; l < L; ++l)
        for (int64_t hh = 0; hh < Hkv; ++hh) {
          const int64_t k = kept_len[l][b * Hkv + hh];
          if (k == 0) continue;
          sum += static_cast<double>(hp[(l * B + b) * Hkv + hh]) / static_cast<double>(k);
          ++cnt;
        }
    out[b].hit_rate = cnt > 0 ? sum / static_cast<double>(cnt) : 0.0;
  }
  lap("hit rate");
  return out;
}

}  // namespace evalrun
}  // namespace kvd
