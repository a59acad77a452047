// KVzap (issue 14): parameters named and shaped as kvpress's KVzapModel (linear and MLP); the gradient of the MSE
// objective against finite differences in float64; the targets are log KVzip+ with the sinks left out, and the
// component's loss is the MSE of predict() against them (SmolLM2); a few optimizer steps on those pairs lower it;
// the scorer writes its scores at append (through chunked prefill too), protects the last `window`
// positions, and a threshold keeps exactly what scores at least τ; bundles hold the kvpress layout and round-trip.
// Parity of the kept sets with kvpress's presses on our weights: tests/python/test_kvpress_kvzap.py.
#include <gtest/gtest.h>

#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "export/gate_bundle.h"
#include "gates/components.h"
#include "gates/compress.h"
#include "gates/gate_test_utils.h"
#include "gates/kvzap.h"
#include "gates/registry.h"
#include "models/kv_cache.h"
#include "models/model.h"
#include "models/safetensors.h"
#include "models/tokenizer.h"
#include "models/weights.h"
#include "test_paths.h"

using namespace kvd;
using namespace kvd::test;

namespace {

std::shared_ptr<KVzapImpl> make_kvzap(const ModelConfig& cfg, const nlohmann::json& options, uint64_t seed = 0) {
  torch::manual_seed(seed);
  auto c = std::dynamic_pointer_cast<KVzapImpl>(make_component("kvzap", cfg, options));
  EXPECT_TRUE(c != nullptr);
  return c;
}

std::vector<int64_t> random_tokens(int64_t vocab, int64_t n, uint64_t seed) {
  torch::manual_seed(seed);
  at::Tensor t = torch::randint(vocab, {n}, torch::kLong);
  return std::vector<int64_t>(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + n);
}

bool smollm_present() { return std::ifstream(std::string(KVD_MODEL_DIR) + "/tokenizer.json").good(); }

}  // namespace

TEST(KVzap, ParametersFollowKvpressLayout) {
  const ModelConfig& cfg = tiny_model("llama3", torch::kFloat).config();
  const int64_t d = cfg.hidden_size, H = cfg.num_kv_heads;
  auto mlp = make_kvzap(cfg, {{"variant", "mlp"}, {"hidden", 24}});
  std::map<std::string, std::vector<int64_t>> want;
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    const std::string p = "layers." + std::to_string(l);
    want[p + ".0.weight"] = {24, d};
    want[p + ".0.bias"] = {24};
    want[p + ".2.weight"] = {H, 24};
    want[p + ".2.bias"] = {H};
  }
  std::map<std::string, std::vector<int64_t>> got;
  for (const auto& p : mlp->named_parameters()) got[p.key()] = p.value().sizes().vec();
  EXPECT_EQ(got, want);
  auto lin = make_kvzap(cfg, {{"variant", "linear"}});
  got.clear();
  want.clear();
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    want["layers." + std::to_string(l) + ".weight"] = {H, d};
    want["layers." + std::to_string(l) + ".bias"] = {H};
  }
  for (const auto& p : lin->named_parameters()) got[p.key()] = p.value().sizes().vec();
  EXPECT_EQ(got, want);
  // predict = W2 gelu(W1 x + b1) + b2 by hand (erf GELU, as torch.nn.GELU()).
  const at::Tensor x = torch::randn({2, 5, d});
  const auto w = mlp->named_parameters();
  const at::Tensor h = torch::matmul(x, w["layers.1.0.weight"].t()) + w["layers.1.0.bias"];
  const at::Tensor g = 0.5 * h * (1 + torch::erf(h / std::sqrt(2.0)));
  EXPECT_LT(max_abs_diff(mlp->predict(1, x), torch::matmul(g, w["layers.1.2.weight"].t()) + w["layers.1.2.bias"]), 1e-5);
  EXPECT_NE(error_of([&] { make_kvzap(cfg, {{"variant", "deep"}}); }).find("component.variant"), std::string::npos);
  EXPECT_NE(error_of([&] { make_kvzap(cfg, {{"window", -1}}); }).find("component.window"), std::string::npos);
}

// d/dθ of the masked MSE, autograd against central differences, in float64.
TEST(KVzap, GradientMatchesFiniteDifferences) {
  const ModelConfig& cfg = tiny_model("llama3", torch::kDouble).config();
  for (const char* variant : {"mlp", "linear"}) {
    auto kz = make_kvzap(cfg, {{"variant", variant}, {"hidden", 8}}, 3);
    kz->to(torch::kDouble);
    torch::manual_seed(4);
    const at::Tensor x = torch::randn({1, 7, cfg.hidden_size}, torch::kDouble);
    at::Tensor tgt = torch::randn({1, 7, cfg.num_kv_heads}, torch::kDouble);
    tgt[0][0].fill_(-std::numeric_limits<double>::infinity());  // left out, as a sink
    auto mse = [&] {
      const at::Tensor pred = kz->predict(1, x);
      const at::Tensor use = torch::isfinite(tgt);
      return torch::where(use, pred - tgt.nan_to_num(0, 0, 0), torch::zeros_like(pred)).pow(2).sum() / use.sum();
    };
    for (auto& p : kz->parameters()) p.mutable_grad() = at::Tensor();
    mse().backward();
    for (const auto& item : kz->named_parameters()) {
      if (item.key().rfind("layers.1.", 0) != 0) continue;
      at::Tensor p = item.value();
      const at::Tensor grad = p.grad().clone();
      torch::NoGradGuard ng;
      at::Tensor flat = p.view({-1});
      for (int64_t i = 0; i < std::min<int64_t>(flat.numel(), 6); ++i) {
        const double keep = flat[i].item<double>(), eps = 1e-6;
        flat[i].fill_(keep + eps);
        const double up = mse().item<double>();
        flat[i].fill_(keep - eps);
        const double down = mse().item<double>();
        flat[i].fill_(keep);
        EXPECT_NEAR(grad.view({-1})[i].item<double>(), (up - down) / (2 * eps), 1e-7) << variant << " " << item.key();
      }
    }
  }
}

// On SmolLM2: the targets are log KVzip+ (kvzip_scores with KVzipNorm::Plus), sinks left out; the loss is the MSE
// of predict() on them; 40 Adam steps on one document's pairs cut it by more than half.
TEST(KVzap, TargetsLossAndTraining) {
  if (!smollm_present()) GTEST_SKIP() << "no SmolLM2 at " << KVD_MODEL_DIR;
  const std::string dir = KVD_MODEL_DIR;
  const Model model = Model::load(dir, torch::kCPU);
  const ModelConfig& cfg = model.config();
  const Tokenizer tok = Tokenizer::from_file(dir);
  const std::vector<int32_t> t32 = tok.encode(
      "The archive kept three ledgers: one for grain, one for salt, and one for the letters that came by river. "
      "Each spring the clerk copied the totals into a fresh book and burned nothing.");
  const std::vector<int64_t> ids(t32.begin(), t32.end());
  const int64_t T = static_cast<int64_t>(ids.size());
  const KVzipPrompts pr = kvzip_prompts(dir);
  auto kz = make_kvzap(cfg, {{"hidden", 16}});
  const KVzapTargets t = kvzap_targets(model, ids, pr, kz->options());
  ASSERT_EQ(t.inputs.size(), size_t(cfg.num_layers));
  KVCache cache = model.new_cache(1);
  model.prefill(torch::tensor(ids).unsqueeze(0), cache);
  KVzipOptions ko;
  ko.norm = KVzipNorm::Plus;
  ko.n_sink = 0;
  const std::vector<at::Tensor> plus = kvzip_scores(model, cache, {ids}, pr, ko);
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    const at::Tensor ls = t.log_scores[l][0];  // (T, H_kv)
    EXPECT_TRUE(torch::isinf(ls.narrow(0, 0, 4)).all().item<bool>());
    EXPECT_LT(max_abs_diff(ls.narrow(0, 4, T - 4), plus[l][0].t().log().narrow(0, 4, T - 4)), 1e-5) << l;
    EXPECT_EQ(t.inputs[l].sizes(), (std::vector<int64_t>{1, T, cfg.hidden_size}));
  }
  // The component's loss over a one-document batch is the MSE of predict() on those pairs.
  TrainBatch b;
  b.ids = torch::tensor(ids).unsqueeze(0);
  b.positions = torch::arange(T).unsqueeze(0);
  b.doc_ids = torch::zeros({1, T}, torch::kLong);
  b.labels = torch::full({1, T}, -100, torch::kLong);
  LossOptions lo;
  EXPECT_NE(error_of([&] { kz->loss(model, b, lo); }).find("model directory"), std::string::npos);
  lo.model_dir = dir;
  auto manual = [&] {
    at::Tensor sum = torch::zeros({});
    int64_t n = 0;
    for (int64_t l = 0; l < cfg.num_layers; ++l) {
      const at::Tensor use = torch::isfinite(t.log_scores[l]);
      sum = sum + torch::where(use, kz->predict(l, t.inputs[l]) - t.log_scores[l].nan_to_num(0, 0, 0),
                               torch::zeros({1}))
                      .pow(2)
                      .sum();
      n += use.sum().item<int64_t>();
    }
    return sum / static_cast<double>(n);
  };
  const ComponentLoss cl = kz->loss(model, b, lo);
  ASSERT_EQ(cl.terms.size(), 1u);
  EXPECT_EQ(cl.terms[0].first, "mse");
  EXPECT_NEAR(cl.terms[0].second.item<double>(), manual().item<double>(), 1e-4 * manual().item<double>());
  EXPECT_EQ(cl.tokens, T);
  torch::optim::Adam opt(kz->parameters(), torch::optim::AdamOptions(3e-3));
  const double before = manual().item<double>();
  for (int i = 0; i < 40; ++i) {
    opt.zero_grad();
    manual().backward();
    opt.step();
  }
  EXPECT_LT(manual().item<double>(), 0.5 * before);
}

// The scorer: scores written at append (a chunked prefill scores layer 0 as one prefill does), the last `window`
// positions +inf, and a threshold keeps exactly the entries scoring >= τ plus the window.
TEST(KVzap, ScorerThresholdWindowAndChunks) {
  const Model& model = tiny_model("llama3", torch::kFloat);
  const ModelConfig& cfg = model.config();
  auto kz = make_kvzap(cfg, {{"hidden", 8}, {"window", 5}}, 1);
  const std::vector<int64_t> ids = random_tokens(cfg.vocab_size, 40, 9);
  KVCache ref = model.new_cache(1);
  std::vector<at::Tensor> inputs(cfg.num_layers);
  model.prefill(torch::tensor(ids).unsqueeze(0), ref, LogitsMode::LastPosition,
                [&](const PrefillLayerObservation& o, KVCache&) { inputs[o.layer] = o.hidden; });
  const double tau = 0.0;
  for (int64_t chunk : {0, 7}) {
    ResolvedMethod rm;
    MethodContext ctx;
    ctx.model = &model;
    ctx.learned_mode = LearnedMode::Once;
    ctx.load_bundle = [&](const std::string&) { return std::static_pointer_cast<Component>(kz); };
    rm = resolve_method("kvzap:unused", Budget::threshold(tau), ctx);
    KVCache cache = model.new_cache(1);
    CompressOptions co;
    co.chunk_size = chunk;
    compress_prefill(model, cache, {ids}, rm.method, co);
    // Chunked: layer 0 sees the same inputs as one prefill (its scores are written at append); deeper layers'
    // inputs change once layer 0 evicted after the first chunk, so only the window is checked there.
    for (int64_t l = 0; l < cfg.num_layers; ++l) {
      if (chunk > 0 && l > 0) {
        for (int64_t h = 0; h < cfg.num_kv_heads; ++h)
          for (int64_t j = 35; j < 40; ++j)
            EXPECT_TRUE(cache.layer(l).pos[0][h].narrow(0, 0, cache.length(l, 0, h)).eq(j).any().item<bool>());
        continue;
      }
      const at::Tensor pred = kz->predict(l, inputs[l])[0].detach();  // (T, H_kv)
      for (int64_t h = 0; h < cfg.num_kv_heads; ++h) {
        std::vector<int64_t> want;
        for (int64_t j = 0; j < 40; ++j)
          if (j >= 40 - 5 || pred[j][h].item<double>() >= tau) want.push_back(j);
        const int64_t n = cache.length(l, 0, h);
        at::Tensor pos = std::get<0>(cache.layer(l).pos[0][h].narrow(0, 0, n).sort());
        EXPECT_EQ(std::vector<int64_t>(pos.data_ptr<int64_t>(), pos.data_ptr<int64_t>() + n), want)
            << "chunk " << chunk << " layer " << l << " head " << h;
      }
    }
  }
}

// A bundle holds our tensors, the manifest and the kvpress layout (config.json + model.safetensors under the
// parameters' own names); it loads back equal, and refuses another model.
TEST(KVzap, BundleRoundTripAndKvpressLayout) {
  const Model& model = tiny_model("llama3", torch::kFloat);
  const ModelConfig& cfg = model.config();
  auto kz = make_kvzap(cfg, {{"hidden", 8}}, 5);
  TempDir dir;
  const BaseModelInfo base{"tiny", "abcd"};
  save_gate_bundle(dir.path + "/b", *kz, base);
  std::ifstream cin(dir.path + "/b/kvpress/config.json");
  const nlohmann::json kc = nlohmann::json::parse(cin);
  EXPECT_EQ(kc.at("model_type"), "kvzap");
  EXPECT_EQ(kc.at("input_dim"), cfg.hidden_size);
  EXPECT_EQ(kc.at("output_dim"), cfg.num_kv_heads);
  EXPECT_EQ(kc.at("hidden_dim"), 8);
  EXPECT_EQ(kc.at("n_modules"), cfg.num_layers);
  const SafetensorsFile raw(dir.path + "/b/kvpress/model.safetensors");
  EXPECT_EQ(raw.tensors().size(), kz->named_parameters().size());
  EXPECT_EQ(raw.metadata().at("format"), "pt");
  for (const auto& p : kz->named_parameters())
    EXPECT_TRUE(view_to_tensor(raw.at(p.key())).to(torch::kFloat).equal(p.value().detach())) << p.key();
  std::shared_ptr<Component> back = load_component(dir.path + "/b", model, base);
  ASSERT_EQ(back->kind(), "kvzap");
  auto b2 = std::dynamic_pointer_cast<KVzapImpl>(back);
  const at::Tensor x = torch::randn({1, 3, cfg.hidden_size});
  for (int64_t l = 0; l < cfg.num_layers; ++l) EXPECT_TRUE(b2->predict(l, x).equal(kz->predict(l, x)));
  EXPECT_NE(error_of([&] { load_component(dir.path + "/b", model, BaseModelInfo{"other", "ffff"}); }).find("other"),
            std::string::npos);
}
