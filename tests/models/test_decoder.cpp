// The frozen decoder against transformers (tests/oracles/decoder_golden.py) and against a naive float64
// reference decoder written below, which also serves AttentionMods (bias, log-mask, extra rows, LoRA,
// statistics, gradients).
#include <gtest/gtest.h>

#include <dirent.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <memory>

#include "common/error.h"
#include "models/generate.h"
#include "models/kv_cache.h"
#include "models/model.h"
#include "models/safetensors.h"
#include "models/weights.h"
#include "test_paths.h"

namespace fs = std::filesystem;
using namespace kvd;

namespace {

const std::vector<std::string> kFamilies = {"llama3", "llama_linear_tied", "mistral", "qwen2", "qwen3"};

std::string model_dir(const std::string& name) { return std::string(KVD_TESTDATA) + "/decoder_golden/" + name; }

struct Golden {
  std::map<std::string, at::Tensor> t;
  explicit Golden(const std::string& name) {
    SafetensorsFile f(model_dir(name) + "/golden.safetensors");
    for (const TensorView& v : f.tensors()) t[v.name] = view_to_tensor(v);
  }
  const at::Tensor& operator[](const std::string& k) const { return t.at(k); }
};

const Model& cpu_model(const std::string& name, c10::ScalarType dtype = torch::kFloat) {
  static std::map<std::pair<std::string, int>, std::unique_ptr<Model>> cache;
  auto key = std::make_pair(name, static_cast<int>(dtype));
  auto it = cache.find(key);
  if (it == cache.end())
    it = cache.emplace(key, std::make_unique<Model>(Model::load(model_dir(name), torch::kCPU, dtype))).first;
  return *it->second;
}

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(torch::kCPU, torch::kDouble) - b.to(torch::kCPU, torch::kDouble)).abs().max().item<double>();
}

// ---------------------------------------------------------------------------------------------------------
// Naive float64 reference decoder. Masks are built element by element with loops; everything else is plain
// dense double arithmetic, one query head at a time, so it shares no code path with models/model.cpp
// except the RoPE frequencies (rope_inv_freq, itself checked against transformers by the golden tests).
struct RefLora {  // per projection name -> (a, b, scale)
  std::map<std::string, std::tuple<at::Tensor, at::Tensor, double>> p;
};
struct RefMods {
  std::vector<at::Tensor> key_rate;  // [layer] (B, H_kv, S) or undefined
  std::vector<at::Tensor> log_mask;  // [layer] (B, H_kv, S) or undefined
  std::vector<RefLora> lora;         // [layer]
  at::Tensor lora_rows;              // (B, S) double 0/1, or undefined: rows [T, S)
  at::Tensor extra_emb;              // (B, n, d)
  at::Tensor extra_pos;              // (B, n)
  at::Tensor stat_rows;              // (B, nr) int64
};
struct RefOut {
  at::Tensor hidden;              // (B, S, d) double
  std::vector<at::Tensor> stats;  // [layer] (B, H, S) double mean over stat rows
};

at::Tensor D(const at::Tensor& t) { return t.to(torch::kCPU, torch::kDouble); }

at::Tensor ref_rms(const at::Tensor& x, const at::Tensor& w, double eps) {
  return x / torch::sqrt(x.pow(2).mean(-1, true) + eps) * D(w);
}

at::Tensor ref_rope(const at::Tensor& x, const at::Tensor& pos, const at::Tensor& inv) {  // (B,S,hd), (B,S)
  const int64_t half = x.size(-1) / 2;
  at::Tensor ang = D(pos).unsqueeze(-1) * inv;  // (B, S, half)
  at::Tensor c = ang.cos(), s = ang.sin();
  at::Tensor x1 = x.narrow(-1, 0, half), x2 = x.narrow(-1, half, half);
  return torch::cat({x1 * c - x2 * s, x2 * c + x1 * s}, -1);
}

RefOut reference_forward(const Model& model, const at::Tensor& ids, const at::Tensor& pos_in, const at::Tensor& doc_in,
                         const RefMods& mods) {
  const ModelConfig& c = model.config();
  const DecoderWeights& w = model.weights();
  const int64_t B = ids.size(0), T = ids.size(1), d = c.hidden_size, H = c.num_heads, Hkv = c.num_kv_heads,
                hd = c.head_dim, G = H / Hkv;
  at::Tensor x = D(w.embed).index_select(0, ids.reshape({-1})).view({B, T, d});
  at::Tensor pos = pos_in.to(torch::kLong), doc = doc_in.defined() ? doc_in.to(torch::kLong) : torch::zeros_like(pos);
  int64_t n = 0;
  if (mods.extra_emb.defined()) {
    n = mods.extra_emb.size(1);
    x = torch::cat({x, D(mods.extra_emb)}, 1);
    pos = torch::cat({pos, mods.extra_pos.to(torch::kLong)}, 1);
    doc = torch::cat({doc, doc.narrow(1, T - 1, 1).expand({B, n})}, 1);
  }
  const int64_t S = T + n;
  // Visibility, age and diagonal, element by element.
  at::Tensor vis = torch::zeros({B, S, S}, torch::kBool), age = torch::zeros({B, S, S}, torch::kDouble);
  auto va = vis.accessor<bool, 3>();
  auto aa = age.accessor<double, 3>();
  auto pa = pos.accessor<int64_t, 2>();
  auto da = doc.accessor<int64_t, 2>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < S; ++i)
      for (int64_t j = 0; j <= i; ++j) {
        bool ok = da[b][i] == da[b][j];
        if (c.sliding_window) ok = ok && (pa[b][i] - pa[b][j] < *c.sliding_window);
        va[b][i][j] = ok;
        aa[b][i][j] = static_cast<double>(pa[b][i] - pa[b][j]);
      }
  at::Tensor offdiag = 1 - torch::eye(S, torch::kDouble);  // (S, S)
  at::Tensor rows = mods.lora_rows.defined()
                        ? D(mods.lora_rows).unsqueeze(-1)
                        : torch::cat({torch::zeros({B, T, 1}, torch::kDouble), torch::ones({B, n, 1}, torch::kDouble)}, 1);
  const at::Tensor inv = rope_inv_freq(c);  // (hd/2) double

  RefOut out;
  out.stats.resize(c.num_layers);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const LayerWeights& lw = w.layers[l];
    const RefLora* lora = l < static_cast<int64_t>(mods.lora.size()) ? &mods.lora[l] : nullptr;
    auto proj = [&](const at::Tensor& in, const at::Tensor& W, const at::Tensor& bias, const std::string& name) {
      at::Tensor y = torch::matmul(in, D(W).t());
      if (bias.defined()) y = y + D(bias);
      if (lora && lora->p.count(name)) {
        auto& [a, bb, s] = lora->p.at(name);
        y = y + rows * s * torch::matmul(torch::matmul(in, D(a).t()), D(bb).t());
      }
      return y;
    };
    at::Tensor h = ref_rms(x, lw.input_norm, c.rms_norm_eps);
    at::Tensor q = proj(h, lw.q_proj, lw.q_bias, "q"), k = proj(h, lw.k_proj, lw.k_bias, "k"),
               v = proj(h, lw.v_proj, lw.v_bias, "v");
    std::vector<at::Tensor> heads;
    at::Tensor stat;
    if (mods.stat_rows.defined()) stat = torch::zeros({B, H, S}, torch::kDouble);
    for (int64_t hh = 0; hh < H; ++hh) {
      const int64_t g = hh / G;
      at::Tensor qh = q.narrow(-1, hh * hd, hd), kh = k.narrow(-1, g * hd, hd), vh = v.narrow(-1, g * hd, hd);
      if (c.qk_norm) {
        qh = ref_rms(qh, lw.q_norm, c.rms_norm_eps);
        kh = ref_rms(kh, lw.k_norm, c.rms_norm_eps);
      }
      qh = ref_rope(qh, pos, inv);
      kh = ref_rope(kh, pos, inv);
      at::Tensor sc = torch::matmul(qh, kh.transpose(1, 2)) / std::sqrt(static_cast<double>(hd));  // (B, S, S)
      if (l < static_cast<int64_t>(mods.key_rate.size()) && mods.key_rate[l].defined())
        sc = sc + age * D(mods.key_rate[l]).select(1, g).unsqueeze(1);
      if (l < static_cast<int64_t>(mods.log_mask.size()) && mods.log_mask[l].defined())
        sc = sc + offdiag * D(mods.log_mask[l]).select(1, g).unsqueeze(1);
      sc = sc.masked_fill(vis.logical_not(), -std::numeric_limits<double>::infinity());
      at::Tensor p = torch::softmax(sc, -1);  // (B, S, S)
      heads.push_back(torch::matmul(p, vh));
      if (stat.defined()) {
        for (int64_t b = 0; b < B; ++b) {
          at::Tensor pr = p[b].index_select(0, mods.stat_rows[b]);  // (nr, S)
          stat.select(0, b).select(0, hh).copy_(pr.mean(0));
        }
      }
    }
    out.stats[l] = stat;
    at::Tensor o = torch::cat(heads, -1);  // (B, S, H*hd)
    x = x + proj(o, lw.o_proj, lw.o_bias, "o");
    at::Tensor h2 = ref_rms(x, lw.post_norm, c.rms_norm_eps);
    at::Tensor gt = proj(h2, lw.gate_proj, {}, "gate"), up = proj(h2, lw.up_proj, {}, "up");
    x = x + proj(gt * torch::sigmoid(gt) * up, lw.down_proj, {}, "down");
  }
  out.hidden = ref_rms(x, w.final_norm, c.rms_norm_eps);
  return out;
}

}  // namespace

// --- golden: transformers ------------------------------------------------------------------------------------

class DecoderGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(DecoderGolden, ConfigExercisesTheFamilyFeature) {
  const ModelConfig& c = cpu_model(GetParam()).config();
  const std::string& f = GetParam();
  if (f == "llama3") {
    EXPECT_EQ(c.rope_scaling, RopeScaling::Llama3);
    EXPECT_EQ(c.rope_original_max_position, 64);
  }
  if (f == "llama_linear_tied") {
    EXPECT_EQ(c.rope_scaling, RopeScaling::Linear);
    EXPECT_TRUE(c.tie_word_embeddings);
    EXPECT_EQ(cpu_model(f).weights().lm_head.data_ptr(), cpu_model(f).weights().embed.data_ptr());
  }
  if (f == "mistral") EXPECT_EQ(c.sliding_window.value_or(0), 8);
  if (f == "qwen2") EXPECT_TRUE(c.attention_bias);
  if (f == "qwen3") EXPECT_TRUE(c.qk_norm);
  EXPECT_EQ(c.num_kv_heads * 2, c.num_heads);  // GQA
}

TEST_P(DecoderGolden, LogitsMatchTransformers) {
  const Model& m = cpu_model(GetParam());
  Golden g(GetParam());
  const at::Tensor& ids = g["input_ids"];  // (2, 40)
  ForwardOutput out = m.forward_train(ids, sequential_positions(ids.size(0), ids.size(1), torch::kCPU));
  const double diff = max_abs_diff(m.logits(out.hidden), g["logits"]);
  std::cout << GetParam() << ": forward_train logits max-abs-diff vs transformers " << diff << "\n";
  EXPECT_LE(diff, 1e-4);
  // prefill with all positions takes the cached path (SDPA over the cache).
  KVCache cache = m.new_cache(ids.size(0));
  at::Tensor all = m.prefill(ids, cache, LogitsMode::AllPositions);  // (2, 40, V)
  EXPECT_LE(max_abs_diff(all, g["logits"]), 1e-4);
  EXPECT_EQ(cache.next_position(), ids.size(1));
}

TEST_P(DecoderGolden, PrefillThenDecodeMatchesFullForward) {
  const Model& m = cpu_model(GetParam());
  Golden g(GetParam());
  const at::Tensor& ids = g["input_ids"];  // (2, 40)
  const at::Tensor& ref = g["logits"];     // (2, 40, V)
  const int64_t T = ids.size(1);
  // (a) prefill 17, then decode one by one. (b) chunked prefill 10 + 11 (+ decode), so chunks attend to a
  // non-empty cache (and, for mistral, cross the sliding window).
  for (std::vector<int64_t> chunks : {std::vector<int64_t>{17}, std::vector<int64_t>{10, 11}}) {
    KVCache cache = m.new_cache(ids.size(0));
    int64_t t = 0;
    double worst = 0;
    for (int64_t n : chunks) {
      at::Tensor lg = m.prefill(ids.narrow(1, t, n), cache);  // (2, V)
      t += n;
      worst = std::max(worst, max_abs_diff(lg, ref.select(1, t - 1)));
    }
    for (; t < T; ++t) {
      at::Tensor lg = m.decode(ids.narrow(1, t, 1), cache);  // (2, V)
      worst = std::max(worst, max_abs_diff(lg, ref.select(1, t)));
    }
    std::cout << GetParam() << ": prefill " << chunks.size() << " chunk(s) + decode, max-abs-diff " << worst << "\n";
    EXPECT_LE(worst, 1e-4);
    EXPECT_EQ(cache.max_length(0), T);
    EXPECT_EQ(cache.bytes(), m.config().num_layers * ids.size(0) * m.config().num_kv_heads * T * cache.bytes_per_entry());
  }
}

// Rows of different lengths in one batch (left padding, never stored): every row's logits equal the
// transformers logits of that row alone, through a padded first chunk, a padded second chunk over a
// non-empty cache (as the eval appends a question after a context), and decode steps where a finished row
// is padding.
TEST_P(DecoderGolden, LeftPaddedRowsMatchTransformersRowByRow) {
  const Model& m = cpu_model(GetParam());
  Golden g(GetParam());
  const at::Tensor& ids = g["input_ids"];  // (2, 40)
  const at::Tensor& ref = g["logits"];     // (2, 40, V)
  struct Row {
    int64_t src, first, second, total;  // golden row; tokens of chunk 1, chunk 2; tokens fed in all
  };
  const std::vector<Row> rows = {{0, 17, 5, 40}, {1, 9, 12, 30}, {0, 13, 1, 26}};
  const int64_t B = static_cast<int64_t>(rows.size());
  auto tokens = [&](const Row& r, int64_t from, int64_t n) {
    at::Tensor t = ids[r.src].narrow(0, from, n).contiguous();
    return std::vector<int64_t>(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + n);
  };
  KVCache cache = m.new_cache(B);
  double worst = 0;
  std::vector<int64_t> fed(B, 0);
  for (int chunk = 0; chunk < 2; ++chunk) {
    std::vector<std::vector<int64_t>> part;
    for (int64_t b = 0; b < B; ++b) part.push_back(tokens(rows[b], fed[b], chunk == 0 ? rows[b].first : rows[b].second));
    std::vector<int64_t> lead;
    at::Tensor x = left_pad(part, 0, lead);                                   // (B, T)
    at::Tensor lg = m.prefill(x, cache, LogitsMode::AllPositions, {}, lead);  // (B, T, V)
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n = static_cast<int64_t>(part[b].size());
      worst = std::max(worst, max_abs_diff(lg[b].narrow(0, lead[b], n), ref[rows[b].src].narrow(0, fed[b], n)));
      fed[b] += n;
      EXPECT_EQ(cache.next_position(b), fed[b]);
      EXPECT_EQ(cache.length(0, b, 0), fed[b]);  // padding is never stored
    }
  }
  while (true) {
    std::vector<int64_t> step(B, 0), pad(B, 0);
    bool any = false;
    for (int64_t b = 0; b < B; ++b) {
      if (fed[b] < rows[b].total) {
        step[b] = ids[rows[b].src][fed[b]].item<int64_t>();
        any = true;
      } else {
        pad[b] = 1;  // finished: this step is padding for it
      }
    }
    if (!any) break;
    at::Tensor lg = m.prefill(torch::tensor(step, torch::kLong).view({B, 1}), cache, LogitsMode::LastPosition, {}, pad);
    for (int64_t b = 0; b < B; ++b) {
      if (pad[b]) continue;
      worst = std::max(worst, max_abs_diff(lg[b], ref[rows[b].src][fed[b]]));
      ++fed[b];
    }
  }
  std::cout << GetParam() << ": left-padded batch of 3, max-abs-diff vs transformers " << worst << "\n";
  EXPECT_LE(worst, 1e-4);
  for (int64_t b = 0; b < B; ++b) {
    EXPECT_EQ(cache.length(m.config().num_layers - 1, b, 0), rows[b].total);
    EXPECT_EQ(cache.row_bytes(b), m.config().num_layers * m.config().num_kv_heads * rows[b].total * cache.bytes_per_entry());
  }
}

// generate_batch on rows of different lengths gives every row the tokens generate() gives it alone.
TEST_P(DecoderGolden, BatchedGenerationEqualsRowByRow) {
  const Model& m = cpu_model(GetParam());
  Golden g(GetParam());
  const at::Tensor& ids = g["input_ids"];  // (2, 40)
  std::vector<std::vector<int64_t>> prompts;
  for (auto [src, n] : std::vector<std::pair<int64_t, int64_t>>{{0, 12}, {1, 31}, {1, 5}}) {
    at::Tensor t = ids[src].narrow(0, 0, n).contiguous();
    prompts.emplace_back(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + n);
  }
  GenerateOptions opt;
  opt.eos_ids = std::vector<int64_t>{};
  opt.max_new_tokens_per_row = {6, 9, 3};
  BatchGenerateResult batch = generate_batch(m, prompts, opt);
  for (size_t b = 0; b < prompts.size(); ++b) {
    GenerateOptions one = opt;
    one.max_new_tokens_per_row.clear();
    one.max_new_tokens = opt.max_new_tokens_per_row[b];
    EXPECT_EQ(batch.tokens[b], generate(m, prompts[b], one).tokens) << "row " << b;
  }
  EXPECT_EQ(batch.decode_steps, 8);
}

TEST_P(DecoderGolden, GreedyGenerationMatchesTransformers) {
  const Model& m = cpu_model(GetParam());
  Golden g(GetParam());
  at::Tensor p = g["gen_prompt"].flatten(), want = g["gen_tokens"].flatten();
  std::vector<int64_t> prompt(p.data_ptr<int64_t>(), p.data_ptr<int64_t>() + p.numel());
  std::vector<int64_t> expected(want.data_ptr<int64_t>(), want.data_ptr<int64_t>() + want.numel());
  GenerateOptions opt;
  opt.max_new_tokens = static_cast<int64_t>(expected.size());
  opt.eos_ids = std::vector<int64_t>{};  // the oracle generated without eos
  std::vector<int64_t> streamed;
  opt.on_token = [&](int64_t t) { streamed.push_back(t); };
  GenerateResult r = generate(m, prompt, opt);
  EXPECT_EQ(r.tokens, expected);
  EXPECT_EQ(streamed, expected);
  EXPECT_EQ(r.stop, StopReason::MaxNewTokens);
  EXPECT_EQ(r.prompt_tokens, static_cast<int64_t>(prompt.size()));
  EXPECT_GT(r.peak_kv_bytes, 0);
}

TEST_P(DecoderGolden, PackedDocumentsMatchSeparateRuns) {
  const Model& m = cpu_model(GetParam());
  Golden g(GetParam());
  at::Tensor pos = document_positions(g["packed_doc_ids"]);
  EXPECT_TRUE(torch::equal(pos, g["packed_positions"]));
  ForwardOutput out = m.forward_train(g["packed_ids"], pos, AttentionMods(), g["packed_doc_ids"]);
  const double diff = max_abs_diff(m.logits(out.hidden), g["packed_logits"]);
  std::cout << GetParam() << ": packed two documents, max-abs-diff vs separate runs " << diff << "\n";
  EXPECT_LE(diff, 1e-4);
  // Without doc ids the second document would see the first: the test can fail.
  ForwardOutput leak = m.forward_train(g["packed_ids"], pos);
  EXPECT_GT(max_abs_diff(m.logits(leak.hidden), g["packed_logits"]), 1e-2);
}

TEST_P(DecoderGolden, WeightsAreFrozen) {
  const DecoderWeights& w = cpu_model(GetParam()).weights();
  EXPECT_FALSE(w.embed.requires_grad());
  EXPECT_FALSE(w.lm_head.requires_grad());
  for (const LayerWeights& l : w.layers)
    for (const at::Tensor* t : {&l.q_proj, &l.k_proj, &l.v_proj, &l.o_proj, &l.gate_proj, &l.up_proj, &l.down_proj,
                                &l.input_norm, &l.post_norm, &l.q_bias, &l.q_norm})
      if (t->defined()) EXPECT_FALSE(t->requires_grad());
}

INSTANTIATE_TEST_SUITE_P(Families, DecoderGolden, ::testing::ValuesIn(kFamilies),
                         [](const auto& info) { return info.param; });

// --- the reference decoder itself agrees with transformers (so the mods tests below stand on it) -------------

TEST(DecoderReference, MatchesTransformers) {
  for (const std::string& f : kFamilies) {
    const Model& m = cpu_model(f);
    Golden g(f);
    const at::Tensor& ids = g["input_ids"];
    RefOut r = reference_forward(m, ids, sequential_positions(ids.size(0), ids.size(1), torch::kCPU), {}, {});
    at::Tensor lg = torch::matmul(r.hidden, D(m.weights().lm_head).t());
    EXPECT_LE(max_abs_diff(lg, g["logits"]), 1e-4) << f;
  }
}

// --- AttentionMods ---------------------------------------------------------------------------------------------

namespace {

struct Case {
  at::Tensor ids, pos, doc;  // (B, T)
};

Case random_case(int64_t B, int64_t T, int64_t vocab, bool packed, uint64_t seed) {
  torch::manual_seed(seed);
  Case c;
  c.ids = torch::randint(3, vocab, {B, T}, torch::kLong);
  if (packed) {
    c.doc = torch::zeros({B, T}, torch::kLong);
    c.doc.narrow(1, T / 3, T - T / 3).fill_(1);
    c.doc[B - 1].narrow(0, T - 5, 5).fill_(2);
    c.pos = document_positions(c.doc);
  } else {
    c.pos = sequential_positions(B, T, torch::kCPU);
  }
  return c;
}

}  // namespace

TEST(AttentionMods, NoOpModsGiveTheBaseOutput) {
  const Model& m = cpu_model("qwen2");
  Case c = random_case(2, 24, m.config().vocab_size, false, 1);
  at::Tensor base = m.forward_train(c.ids, c.pos).hidden;
  // A hook that returns nothing: the same fused path, bit for bit.
  AttentionMods empty;
  empty.layer_hook = [](const LayerInput&) { return LayerMods(); };
  EXPECT_TRUE(torch::equal(m.forward_train(c.ids, c.pos, empty).hidden, base));
  // Zero bias and zero log-mask: the explicit path, equal up to rounding.
  const int64_t Hkv = m.config().num_kv_heads;
  AttentionMods zero;
  zero.layer_hook = [&](const LayerInput& in) {
    LayerMods lm;
    lm.key_rate = torch::zeros({in.hidden.size(0), Hkv, in.hidden.size(1)});
    lm.key_log_mask = torch::zeros({in.hidden.size(0), Hkv, in.hidden.size(1)});
    return lm;
  };
  const double diff = max_abs_diff(m.forward_train(c.ids, c.pos, zero).hidden, base);
  std::cout << "zero bias + zero log-mask vs no mods: max-abs-diff " << diff << "\n";
  EXPECT_LE(diff, 1e-5);
}

TEST(AttentionMods, BiasAndLogMaskMatchReference) {
  // Packed documents, GQA, and for mistral a sliding window under the bias.
  for (const std::string f : {"llama3", "mistral", "qwen3"}) {
    const Model& m = cpu_model(f);
    const ModelConfig& cfg = m.config();
    Case c = random_case(2, 30, cfg.vocab_size, true, 2);
    torch::manual_seed(3);
    RefMods rm;
    for (int64_t l = 0; l < cfg.num_layers; ++l) {
      rm.key_rate.push_back(-0.3 * torch::softplus(torch::randn({2, cfg.num_kv_heads, 30})));  // log beta < 0
      rm.log_mask.push_back(torch::log_sigmoid(2.0 * torch::randn({2, cfg.num_kv_heads, 30})));
    }
    AttentionMods mods;
    std::vector<int64_t> seen_layers;
    mods.layer_hook = [&](const LayerInput& in) {
      seen_layers.push_back(in.layer);
      EXPECT_EQ(in.hidden.sizes(), (std::vector<int64_t>{2, 30, cfg.hidden_size}));
      EXPECT_EQ(in.seq_len, 30);
      LayerMods lm;
      lm.key_rate = rm.key_rate[in.layer];
      lm.key_log_mask = rm.log_mask[in.layer];
      return lm;
    };
    at::Tensor got = m.forward_train(c.ids, c.pos, mods, c.doc).hidden;
    RefOut ref = reference_forward(m, c.ids, c.pos, c.doc, rm);
    const double diff = max_abs_diff(got, ref.hidden);
    std::cout << f << ": bias + log-mask (packed) vs float64 reference, max-abs-diff " << diff << "\n";
    EXPECT_LE(diff, 1e-4) << f;
    EXPECT_EQ(seen_layers, (std::vector<int64_t>{0, 1}));
    // The mods matter (the comparison can fail).
    EXPECT_GT(max_abs_diff(got, m.forward_train(c.ids, c.pos, {}, c.doc).hidden), 1e-2);
  }
}

TEST(AttentionMods, PairBiasEqualsKeyRate) {
  const Model& m = cpu_model("llama3");
  Case c = random_case(2, 20, m.config().vocab_size, false, 4);
  at::Tensor rate = -0.2 * torch::rand({2, m.config().num_kv_heads, 20});
  AttentionMods a, b;
  a.layer_hook = [&](const LayerInput&) {
    LayerMods lm;
    lm.key_rate = rate;
    return lm;
  };
  b.layer_hook = [&](const LayerInput&) {
    LayerMods lm;
    lm.pair_bias = [&](const PairBiasQuery& q) {
      at::Tensor age = (q.q_pos.unsqueeze(-1) - q.k_pos.unsqueeze(1)).to(torch::kFloat);  // (B, Sq, S)
      return age.unsqueeze(1) * rate.unsqueeze(2);                                      // (B, H_kv, Sq, S)
    };
    return lm;
  };
  EXPECT_LE(max_abs_diff(m.forward_train(c.ids, c.pos, a).hidden, m.forward_train(c.ids, c.pos, b).hidden), 1e-5);
}

TEST(AttentionMods, ExtraRowsLeaveSequenceRowsAndMatchReference) {
  const Model& m = cpu_model("qwen3");
  const ModelConfig& cfg = m.config();
  const int64_t B = 2, T = 20, n = 4;
  Case c = random_case(B, T, cfg.vocab_size, false, 5);
  torch::manual_seed(6);
  AttentionMods mods;
  mods.extra.embeddings = torch::randn({n, cfg.hidden_size});          // shared across the batch
  mods.extra.positions = torch::arange(T, T + n, torch::kLong);        // (n)
  at::Tensor base = m.forward_train(c.ids, c.pos).hidden;              // (B, T, d)
  at::Tensor got = m.forward_train(c.ids, c.pos, mods).hidden;         // (B, T + n, d)
  ASSERT_EQ(got.size(1), T + n);
  // float32: the extra rows change the GEMMs' shapes, so the sequence rows may differ by rounding (2.1e-6 on an
  // AMD EPYC); rows that saw the extras would differ by about the hidden states' size.
  const double seq_diff = max_abs_diff(got.narrow(1, 0, T), base);
  EXPECT_LE(seq_diff, 1e-5);
  RefMods rm;
  rm.extra_emb = mods.extra.embeddings.unsqueeze(0).expand({B, n, cfg.hidden_size});
  rm.extra_pos = mods.extra.positions.unsqueeze(0).expand({B, n});
  const double diff = max_abs_diff(got, reference_forward(m, c.ids, c.pos, {}, rm).hidden);
  std::cout << "extra rows: sequence rows vs no extras " << seq_diff << ", all rows vs reference " << diff << "\n";
  EXPECT_LE(diff, 1e-4);
}

TEST(AttentionMods, RowMaskedLoraLeavesOtherRowsAndMatchesReference) {
  const Model& m = cpu_model("qwen2");
  const ModelConfig& cfg = m.config();
  const int64_t B = 2, T = 18, n = 3, r = 4, d = cfg.hidden_size, ffn = cfg.intermediate_size;
  const int64_t qo = cfg.num_heads * cfg.head_dim, kvo = cfg.num_kv_heads * cfg.head_dim;
  Case c = random_case(B, T, cfg.vocab_size, false, 7);
  torch::manual_seed(8);
  std::map<std::string, std::pair<int64_t, int64_t>> dims = {{"q", {d, qo}},     {"k", {d, kvo}},  {"v", {d, kvo}},
                                                             {"o", {qo, d}},     {"gate", {d, ffn}}, {"up", {d, ffn}},
                                                             {"down", {ffn, d}}};
  std::vector<LayerLora> loras(cfg.num_layers);
  RefMods rm;
  rm.lora.resize(cfg.num_layers);
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    for (auto& [name, io] : dims) {
      LoraDelta dl{0.3 * torch::randn({r, io.first}), 0.3 * torch::randn({io.second, r}), 2.0};
      LayerLora& L = loras[l];
      LoraDelta* slot = name == "q" ? &L.q : name == "k" ? &L.k : name == "v" ? &L.v : name == "o" ? &L.o
                        : name == "gate" ? &L.gate : name == "up" ? &L.up : &L.down;
      *slot = dl;
      rm.lora[l].p[name] = {dl.a, dl.b, dl.scale};
    }
  }
  AttentionMods mods;
  mods.extra.embeddings = torch::randn({B, n, d});
  mods.extra.positions = torch::arange(T, T + n, torch::kLong).unsqueeze(0).expand({B, n});
  AttentionMods with_lora = mods;
  with_lora.layer_hook = [&](const LayerInput& in) {
    LayerMods lm;
    lm.lora = loras[in.layer];
    return lm;
  };
  at::Tensor plain = m.forward_train(c.ids, c.pos, mods).hidden;
  at::Tensor got = m.forward_train(c.ids, c.pos, with_lora).hidden;
  // LoRA on the extra rows only: the prompt rows are bit-identical, the extra rows differ.
  EXPECT_TRUE(torch::equal(got.narrow(1, 0, T), plain.narrow(1, 0, T)));
  EXPECT_GT(max_abs_diff(got.narrow(1, T, n), plain.narrow(1, T, n)), 1e-2);
  rm.extra_emb = mods.extra.embeddings;
  rm.extra_pos = mods.extra.positions;
  double diff = max_abs_diff(got, reference_forward(m, c.ids, c.pos, {}, rm).hidden);
  std::cout << "LoRA on extra rows vs reference: max-abs-diff " << diff << "\n";
  EXPECT_LE(diff, 1e-4);
  // An explicit row mask (some sequence rows and the last extra row).
  at::Tensor mask = torch::zeros({B, T + n});
  mask.narrow(1, 5, 3).fill_(1);
  mask.narrow(1, T + n - 1, 1).fill_(1);
  with_lora.lora_row_mask = mask;
  rm.lora_rows = mask;
  at::Tensor got2 = m.forward_train(c.ids, c.pos, with_lora).hidden;
  EXPECT_TRUE(torch::equal(got2.narrow(1, 0, 5), plain.narrow(1, 0, 5)));  // rows before the first LoRA row
  diff = max_abs_diff(got2, reference_forward(m, c.ids, c.pos, {}, rm).hidden);
  std::cout << "LoRA on masked rows vs reference: max-abs-diff " << diff << "\n";
  EXPECT_LE(diff, 1e-4);
}

TEST(AttentionMods, StatisticsMatchNaiveSoftmax) {
  for (const std::string f : {"mistral", "llama3"}) {
    const Model& m = cpu_model(f);
    const ModelConfig& cfg = m.config();
    const int64_t B = 2, T = 26, n = 3;
    Case c = random_case(B, T, cfg.vocab_size, f == "llama3", 9);
    torch::manual_seed(10);
    RefMods rm;
    rm.extra_emb = torch::randn({B, n, cfg.hidden_size});
    rm.extra_pos = torch::arange(T, T + n, torch::kLong).unsqueeze(0).expand({B, n});
    for (int64_t l = 0; l < cfg.num_layers; ++l)
      rm.key_rate.push_back(-0.1 * torch::rand({B, cfg.num_kv_heads, T + n}));
    rm.stat_rows = torch::tensor({{26, 27, 28, 3, 20}, {0, 27, 28, 25, 11}}, torch::kLong);  // (B, 5)
    AttentionMods mods;
    mods.extra.embeddings = rm.extra_emb;
    mods.extra.positions = rm.extra_pos;
    mods.layer_hook = [&](const LayerInput& in) {
      LayerMods lm;
      lm.key_rate = rm.key_rate[in.layer];
      return lm;
    };
    mods.stats.rows = rm.stat_rows;
    mods.stats.row_block = 2;  // three blocks
    ForwardOutput out = m.forward_train(c.ids, c.pos, mods, c.doc);
    RefOut ref = reference_forward(m, c.ids, c.pos, c.doc, rm);
    ASSERT_EQ(out.attention_stats.size(), static_cast<size_t>(cfg.num_layers));
    for (int64_t l = 0; l < cfg.num_layers; ++l) {
      ASSERT_TRUE(out.attention_stats[l].defined());
      EXPECT_EQ(out.attention_stats[l].sizes(), (std::vector<int64_t>{B, cfg.num_heads, T + n}));
      const double diff = max_abs_diff(out.attention_stats[l], ref.stats[l]);
      std::cout << f << ": attention statistics layer " << l << " vs naive softmax, max-abs-diff " << diff << "\n";
      EXPECT_LE(diff, 1e-5);
      // Each row's softmax sums to one.
      EXPECT_LE(max_abs_diff(out.attention_stats[l].sum(-1), torch::ones({B, cfg.num_heads})), 1e-5);
    }
    // Only the requested layers, and Sum = n_rows · Mean; without mods on the fused path as well.
    AttentionMods plain;
    plain.stats.rows = torch::tensor({5, 7}, torch::kLong);
    plain.stats.layers = {1};
    plain.stats.reduce = StatReduce::Sum;
    ForwardOutput o2 = m.forward_train(c.ids, c.pos, plain, c.doc);
    EXPECT_FALSE(o2.attention_stats[0].defined());
    RefMods rm2;
    rm2.stat_rows = torch::tensor({{5, 7}, {5, 7}}, torch::kLong);
    RefOut r2 = reference_forward(m, c.ids, c.pos, c.doc, rm2);
    EXPECT_LE(max_abs_diff(o2.attention_stats[1], 2.0 * r2.stats[1]), 1e-5);
  }
}

TEST(AttentionMods, GradientsFlowIntoModTensors) {
  // float32 model vs the float64 reference, both through autograd.
  const Model& m = cpu_model("llama3");
  const ModelConfig& cfg = m.config();
  const int64_t B = 1, T = 12, n = 2, r = 2, d = cfg.hidden_size;
  Case c = random_case(B, T, cfg.vocab_size, false, 11);
  torch::manual_seed(12);
  const int64_t S = T + n;
  at::Tensor rate = (-0.2 * torch::rand({B, cfg.num_kv_heads, S})).requires_grad_();
  at::Tensor lmask = torch::log_sigmoid(torch::randn({B, cfg.num_kv_heads, S})).detach().requires_grad_();
  at::Tensor emb = torch::randn({n, d}).requires_grad_();
  at::Tensor la = (0.3 * torch::randn({r, d})).requires_grad_();
  at::Tensor lb = (0.3 * torch::randn({cfg.num_heads * cfg.head_dim, r})).requires_grad_();
  at::Tensor weight = torch::randn({B, S, d});  // loss = <hidden, weight> + <stats, sw>
  at::Tensor sw = torch::randn({B, cfg.num_heads, S});

  AttentionMods mods;
  mods.extra.embeddings = emb;
  mods.extra.positions = torch::arange(T, S, torch::kLong);
  mods.layer_hook = [&](const LayerInput& in) {
    LayerMods lm;
    if (in.layer == 0) lm.key_rate = rate;
    if (in.layer == 1) lm.key_log_mask = lmask;
    lm.lora.q = LoraDelta{la, lb, 1.5};
    return lm;
  };
  mods.stats.rows = torch::arange(T, S, torch::kLong);
  mods.stats.layers = {1};
  ForwardOutput out = m.forward_train(c.ids, c.pos, mods);
  at::Tensor loss = (out.hidden * weight).sum() + (out.attention_stats[1] * sw).sum();
  loss.backward();
  for (const at::Tensor* t : {&rate, &lmask, &emb, &la, &lb}) {
    ASSERT_TRUE(t->grad().defined());
    EXPECT_GT(t->grad().abs().sum().item<double>(), 0.0);
  }
  EXPECT_FALSE(m.weights().layers[0].q_proj.grad().defined());

  // The same loss through the float64 reference.
  at::Tensor rate64 = D(rate).detach().requires_grad_(), lmask64 = D(lmask).detach().requires_grad_();
  at::Tensor emb64 = D(emb).detach().requires_grad_(), la64 = D(la).detach().requires_grad_(),
             lb64 = D(lb).detach().requires_grad_();
  RefMods rm;
  rm.key_rate = {rate64, at::Tensor()};
  rm.log_mask = {at::Tensor(), lmask64};
  rm.lora.resize(2);
  for (auto& L : rm.lora) L.p["q"] = {la64, lb64, 1.5};
  rm.extra_emb = emb64.unsqueeze(0);
  rm.extra_pos = torch::arange(T, S, torch::kLong).unsqueeze(0);
  rm.stat_rows = torch::arange(T, S, torch::kLong).unsqueeze(0);
  RefOut ref = reference_forward(m, c.ids, c.pos, {}, rm);
  at::Tensor loss64 = (ref.hidden * D(weight)).sum() + (ref.stats[1] * D(sw)).sum();
  loss64.backward();
  EXPECT_LE(std::abs(loss.item<double>() - loss64.item<double>()), 1e-3 * std::max(1.0, std::abs(loss64.item<double>())));
  auto rel = [](const at::Tensor& g32, const at::Tensor& g64) {
    return max_abs_diff(g32, g64) / std::max(1e-6, g64.abs().max().item<double>());
  };
  const std::vector<std::pair<std::string, std::pair<at::Tensor, at::Tensor>>> pairs = {
      {"key_rate", {rate.grad(), rate64.grad()}},   {"key_log_mask", {lmask.grad(), lmask64.grad()}},
      {"extra embeddings", {emb.grad(), emb64.grad()}}, {"lora a", {la.grad(), la64.grad()}},
      {"lora b", {lb.grad(), lb64.grad()}}};
  for (const auto& [name, g] : pairs) {
    const double e = rel(g.first, g.second);
    std::cout << "grad " << name << ": relative max-abs-diff vs float64 reference " << e << "\n";
    EXPECT_LE(e, 1e-3) << name;
  }
}

TEST(AttentionMods, KeyRateGradientMatchesFiniteDifferences) {
  // The library itself in float64: d loss / d key_rate by autograd vs central differences.
  const Model& m = cpu_model("mistral", torch::kDouble);
  const ModelConfig& cfg = m.config();
  Case c = random_case(1, 14, cfg.vocab_size, false, 13);
  torch::manual_seed(14);
  at::Tensor rate = (-0.3 * torch::rand({1, cfg.num_kv_heads, 14}, torch::kDouble)).requires_grad_();
  at::Tensor weight = torch::randn({1, 14, cfg.hidden_size}, torch::kDouble);
  auto loss_of = [&](const at::Tensor& r) {
    AttentionMods mods;
    mods.layer_hook = [&](const LayerInput&) {
      LayerMods lm;
      lm.key_rate = r;
      return lm;
    };
    return (m.forward_train(c.ids, c.pos, mods).hidden * weight).sum();
  };
  loss_of(rate).backward();
  at::Tensor g = rate.grad();
  const double eps = 1e-6;
  double worst = 0;
  for (auto [h, j] : {std::pair<int64_t, int64_t>{0, 2}, {1, 5}, {0, 9}, {1, 0}}) {
    at::Tensor rp = rate.detach().clone(), rn = rate.detach().clone();
    rp[0][h][j] += eps;
    rn[0][h][j] -= eps;
    const double fd = (loss_of(rp).item<double>() - loss_of(rn).item<double>()) / (2 * eps);
    const double an = g[0][h][j].item<double>();
    worst = std::max(worst, std::abs(fd - an) / std::max(1.0, std::abs(fd)));
  }
  std::cout << "key_rate gradient vs finite differences (float64): worst relative error " << worst << "\n";
  EXPECT_LE(worst, 1e-6);
}

// --- weights -------------------------------------------------------------------------------------------------

namespace {

// std::filesystem::remove_all must not be called here: libtorch.so (PyPI 2.11) exports its own copy of
// the std::filesystem functions, which executables linking it resolve first, and its remove_all segfaults.
void remove_flat_dir(const std::string& dir) {
  if (DIR* d = ::opendir(dir.c_str())) {
    while (dirent* e = ::readdir(d)) {
      std::string n = e->d_name;
      if (n != "." && n != "..") ::unlink((dir + "/" + n).c_str());
    }
    ::closedir(d);
  }
  ::rmdir(dir.c_str());
}

// Copies a golden model dir, rewriting model.safetensors through `edit` (which may drop / reshape / add).
std::string edited_copy(const std::string& name, const std::function<void(std::vector<TensorRef>&)>& edit) {
  std::string tmpl = (fs::temp_directory_path() / "kvd_test_decoder_XXXXXX").string();
  KVD_CHECK(::mkdtemp(tmpl.data()) != nullptr, "mkdtemp failed");
  const std::string dir = tmpl;
  {
    std::ifstream in(model_dir(name) + "/config.json", std::ios::binary);
    std::ofstream out(dir + "/config.json", std::ios::binary);
    out << in.rdbuf();
  }
  SafetensorsFile f(model_dir(name) + "/model.safetensors");
  std::vector<TensorRef> refs;
  for (const TensorView& v : f.tensors()) refs.push_back(TensorRef{v.name, v.dtype, v.shape, v.data});
  edit(refs);
  write_safetensors(dir + "/model.safetensors", refs);
  return dir;
}

std::string load_error(const std::string& dir) {
  try {
    Model::load(dir, torch::kCPU);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(Weights, MissingTensorIsAnErrorNamingIt) {
  std::string dir = edited_copy("qwen2", [](std::vector<TensorRef>& r) {
    r.erase(std::remove_if(r.begin(), r.end(), [](const TensorRef& t) { return t.name == "model.layers.1.mlp.up_proj.weight"; }),
            r.end());
  });
  std::string msg = load_error(dir);
  EXPECT_NE(msg.find("model.layers.1.mlp.up_proj.weight"), std::string::npos) << msg;
  EXPECT_NE(msg.find("[96, 64]"), std::string::npos) << msg;
  remove_flat_dir(dir);
}

TEST(Weights, MisShapedTensorIsAnErrorNamingIt) {
  std::string dir = edited_copy("qwen2", [](std::vector<TensorRef>& r) {
    for (TensorRef& t : r)
      if (t.name == "model.layers.0.self_attn.k_proj.weight") t.shape = {64, 32};
  });
  std::string msg = load_error(dir);
  EXPECT_NE(msg.find("model.layers.0.self_attn.k_proj.weight"), std::string::npos) << msg;
  EXPECT_NE(msg.find("expected shape [32, 64], found [64, 32]"), std::string::npos) << msg;
  remove_flat_dir(dir);
}

TEST(Weights, UnusedTensorIsAnError) {
  static const float zeros[64] = {};
  std::string dir = edited_copy("llama3", [](std::vector<TensorRef>& r) {
    r.push_back(TensorRef{"model.layers.0.self_attn.o_proj.bias", DType::F32, {64}, zeros});
  });
  std::string msg = load_error(dir);
  EXPECT_NE(msg.find("model.layers.0.self_attn.o_proj.bias"), std::string::npos) << msg;
  remove_flat_dir(dir);
}

TEST(Weights, HalfPrecisionSourcesConvert) {
  // A BF16 checkpoint loads into float32 with the BF16 values exactly.
  std::vector<std::vector<uint16_t>> store;
  std::string dir = edited_copy("llama3", [&](std::vector<TensorRef>& r) {
    store.reserve(r.size());
    for (TensorRef& t : r) {
      int64_t numel = 1;
      for (int64_t s : t.shape) numel *= s;
      at::Tensor src = torch::from_blob(const_cast<void*>(t.data), {numel}, torch::kFloat).to(torch::kBFloat16);
      store.emplace_back(numel);
      std::memcpy(store.back().data(), src.data_ptr(), numel * 2);
      t.dtype = DType::BF16;
      t.data = store.back().data();
    }
  });
  Model bf = Model::load(dir, torch::kCPU);
  EXPECT_EQ(bf.dtype(), torch::kFloat);
  at::Tensor want = cpu_model("llama3").weights().layers[1].down_proj.to(torch::kBFloat16).to(torch::kFloat);
  EXPECT_TRUE(torch::equal(bf.weights().layers[1].down_proj, want));
  remove_flat_dir(dir);
}

// --- generation ----------------------------------------------------------------------------------------------

TEST(Generate, SeededSamplingIsDeterministic) {
  const Model& m = cpu_model("llama3");
  std::vector<int64_t> prompt = {5, 17, 42, 99, 150};
  GenerateOptions o;
  o.mode = SamplingMode::Sample;
  o.temperature = 1.5;
  o.top_p = 0.95;
  o.max_new_tokens = 16;
  o.eos_ids = std::vector<int64_t>{};
  o.seed = 123;
  auto a = generate(m, prompt, o).tokens, b = generate(m, prompt, o).tokens;
  EXPECT_EQ(a, b);
  o.seed = 124;
  auto c = generate(m, prompt, o).tokens;
  EXPECT_NE(a, c);
  // A nucleus that holds only the most probable token is greedy decoding.
  o.top_p = 1e-9;
  GenerateOptions greedy;
  greedy.max_new_tokens = 16;
  greedy.eos_ids = std::vector<int64_t>{};
  EXPECT_EQ(generate(m, prompt, o).tokens, generate(m, prompt, greedy).tokens);
}

TEST(Generate, TopPRestrictsTheSupport) {
  // Logits with probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.7 may only give tokens 0 and 1.
  at::Tensor logits = torch::log(torch::tensor({0.5, 0.3, 0.15, 0.05}));
  GenerateOptions o;
  o.mode = SamplingMode::Sample;
  o.top_p = 0.7;
  o.seed = 7;
  Sampler s(o);
  std::vector<int> count(4, 0);
  for (int i = 0; i < 2000; ++i) ++count[s.next(logits)];
  EXPECT_EQ(count[2] + count[3], 0);
  EXPECT_NEAR(count[0] / 2000.0, 0.625, 0.05);  // 0.5 / 0.8 after renormalizing
  // top_p 1: the full distribution.
  o.top_p = 1.0;
  Sampler full(o);
  std::fill(count.begin(), count.end(), 0);
  for (int i = 0; i < 4000; ++i) ++count[full.next(logits)];
  EXPECT_NEAR(count[3] / 4000.0, 0.05, 0.02);
  o.temperature = 0;
  EXPECT_THROW(Sampler{o}, Error);
}

TEST(Generate, StopsOnEos) {
  const Model& m = cpu_model("mistral");
  Golden g("mistral");
  at::Tensor p = g["gen_prompt"].flatten(), want = g["gen_tokens"].flatten();
  std::vector<int64_t> prompt(p.data_ptr<int64_t>(), p.data_ptr<int64_t>() + p.numel());
  const int64_t stop_tok = want[4].item<int64_t>();
  int64_t first = 0;
  while (want[first].item<int64_t>() != stop_tok) ++first;
  GenerateOptions o;
  o.max_new_tokens = 12;
  o.eos_ids = std::vector<int64_t>{stop_tok, 100000};
  GenerateResult r = generate(m, prompt, o);
  EXPECT_EQ(r.stop, StopReason::Eos);
  ASSERT_EQ(static_cast<int64_t>(r.tokens.size()), first + 1);
  EXPECT_EQ(r.tokens.back(), stop_tok);
  o.max_new_tokens = 0;
  EXPECT_TRUE(generate(m, prompt, o).tokens.empty());
}

// --- GPU -----------------------------------------------------------------------------------------------------

TEST(DecoderCuda, Bf16MatchesFloat32AndDecodes) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  for (const std::string& f : kFamilies) {
    Golden g(f);
    const at::Tensor& ids = g["input_ids"];  // (2, 40)
    Model gpu = Model::load(model_dir(f), torch::Device(torch::kCUDA, 0));
    ASSERT_EQ(gpu.dtype(), torch::kBFloat16);
    at::Tensor lg = gpu.logits(gpu.forward_train(ids, sequential_positions(2, 40, torch::kCPU)).hidden).to(torch::kFloat);
    const at::Tensor& ref = g["logits"];
    // bf16 keeps 8 bits of mantissa: with logits of std ~5 after 2 layers, errors of a few 0.1 are expected.
    const double diff = max_abs_diff(lg, ref);
    const double scale = ref.abs().max().item<double>();
    const double agree = lg.to(torch::kCPU).argmax(-1).eq(ref.argmax(-1)).to(torch::kDouble).mean().item<double>();
    std::cout << f << ": bf16 CUDA vs fp32 transformers: max-abs-diff " << diff << " (max |logit| " << scale
              << "), argmax agreement " << agree << "\n";
    EXPECT_LE(diff, 0.05 * scale) << f;
    EXPECT_GE(agree, 0.9) << f;
    // prefill 17 + decode on the GPU equals the GPU's own full forward at bf16 tolerance.
    KVCache cache = gpu.new_cache(2);
    double worst = max_abs_diff(gpu.prefill(ids.narrow(1, 0, 17), cache), lg.select(1, 16));
    for (int64_t t = 17; t < 40; ++t)
      worst = std::max(worst, max_abs_diff(gpu.decode(ids.narrow(1, t, 1), cache), lg.select(1, t)));
    std::cout << f << ": bf16 CUDA prefill + decode vs bf16 forward: max-abs-diff " << worst << "\n";
    EXPECT_LE(worst, 0.05 * scale) << f;
    // fp32 on the GPU matches transformers closely.
    Model gpu32 = Model::load(model_dir(f), torch::Device(torch::kCUDA, 0), torch::kFloat);
    at::Tensor lg32 = gpu32.logits(gpu32.forward_train(ids, sequential_positions(2, 40, torch::kCPU)).hidden);
    const double d32 = max_abs_diff(lg32, ref);
    std::cout << f << ": fp32 CUDA vs transformers: max-abs-diff " << d32 << "\n";
    EXPECT_LE(d32, 1e-3) << f;
  }
}
