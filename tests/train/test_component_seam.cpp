// The component seam is real: a learned part defined in this file alone (a linear probe from each layer's
// attention input to per-KV-head scores, trained by MSE to the frozen model's key norms) registers itself,
// trains through `kvdistill train`'s code path (train()), is exported as a bundle by the trainer, loads back
// through load_component, resolves as `gate:<bundle>` in the method registry and evaluates: its prefill
// compression keeps exactly the top-k of its own scores, and the held-out check runs on it. Nothing outside
// this file knows the probe.
#include <gtest/gtest.h>
#include <unistd.h>

#include <fstream>
#include <string>

#include <torch/torch.h>

#include "common/error.h"
#include "common/fs.h"
#include "data/prepare_text.h"
#include "eval/heldout.h"
#include "export/gate_bundle.h"
#include "gates/component.h"
#include "gates/components.h"
#include "gates/registry.h"
#include "models/kv_cache.h"
#include "models/model.h"
#include "test_paths.h"
#include "train/config.h"
#include "train/trainer.h"

namespace kvd {
namespace {

constexpr const char* kKind = "test_key_norm_probe";

// Key norms of the frozen model: layer `l`'s attention input h (B, T, d) -> (B, T, H_kv) float32.
at::Tensor key_norms(const Model& model, int64_t l, const at::Tensor& h) {
  const ModelConfig& c = model.config();
  at::Tensor k = at::linear(h, model.weights().layers[l].k_proj);  // (B, T, H_kv * hd)
  return k.view({h.size(0), h.size(1), c.num_kv_heads, c.head_dim}).to(torch::kFloat).norm(2, -1);
}

class ProbeImpl : public Component {
 public:
  ProbeImpl(const ModelConfig& cfg, double init_std) : hkv_(cfg.num_kv_heads) {
    layers_ = register_module("layers", torch::nn::ModuleList());
    torch::NoGradGuard ng;
    for (int64_t l = 0; l < cfg.num_layers; ++l) {
      torch::nn::Linear lin(cfg.hidden_size, cfg.num_kv_heads);
      lin->weight.normal_(0.0, init_std);
      lin->bias.zero_();
      layers_->push_back(lin);
    }
  }
  std::string kind() const override { return kKind; }
  at::Tensor predict(int64_t l, const at::Tensor& h) {  // (B, T, d) -> (B, T, H_kv)
    return layers_->ptr<torch::nn::LinearImpl>(l)->forward(h.to(torch::kFloat));
  }
  ComponentLoss loss(const Model& model, const TrainBatch& batch, const LossOptions&) override {
    std::vector<at::Tensor> hs(model.config().num_layers);
    AttentionMods capture;
    capture.layer_hook = [&](const LayerInput& in) {
      hs[in.layer] = in.hidden.detach();
      return LayerMods();
    };
    {
      torch::NoGradGuard ng;
      model.forward_train(batch.ids, batch.positions, capture, batch.doc_ids);
    }
    at::Tensor mse = torch::zeros({});
    for (size_t l = 0; l < hs.size(); ++l)
      mse = mse + torch::mse_loss(predict(static_cast<int64_t>(l), hs[l]), key_norms(model, l, hs[l]));
    ComponentLoss out;
    out.terms = {{"mse", mse / static_cast<double>(hs.size())}};
    out.tokens = batch.ids.numel();
    return out;
  }
  std::unique_ptr<Scorer> make_scorer() override;
  nlohmann::json manifest() const override {
    return {{"num_kv_heads", hkv_}, {"score", "predicted key norm"}, {"higher_keeps", true}, {"options", nlohmann::json::object()}};
  }

 private:
  int64_t hkv_;
  torch::nn::ModuleList layers_{nullptr};
};

// Scores written at append time into the payload column "probe", read back at scoring time.
class ProbeScorer : public Scorer {
 public:
  explicit ProbeScorer(ProbeImpl* p) : p_(p) {}
  std::string name() const override { return kKind; }
  void on_append(const PrefillLayerObservation& obs, KVCache& cache) override {
    torch::NoGradGuard ng;
    cache.add_payload("probe");
    cache.set_payload_tail(obs.layer, "probe", p_->predict(obs.layer, obs.hidden).transpose(1, 2), obs.lead);
  }
  at::Tensor score(const LayerView& view) override { return view.payload.at("probe"); }

 private:
  ProbeImpl* p_;
};

std::unique_ptr<Scorer> ProbeImpl::make_scorer() { return std::make_unique<ProbeScorer>(this); }

void register_probe() {
  if (find_component(kKind)) return;
  ComponentSpec s;
  s.kind = kKind;
  s.doc = "test: linear probe of key norms";
  s.options = {{"component.init_std", ValueType::Float, "0.01", "init std of the probe weights"}};
  s.losses = {{"loss.mse", ValueType::Float, "1.0", "weight of the probe's MSE"}};
  s.make = [](const ModelConfig& cfg, const nlohmann::json& o) -> std::shared_ptr<Component> {
    return std::make_shared<ProbeImpl>(cfg, o.at("init_std").get<double>());
  };
  register_component(s);
}

struct TempDir {
  std::string path;
  TempDir() {
    char tmpl[] = "/tmp/kvd_seam_XXXXXX";
    path = ::mkdtemp(tmpl);
  }
  ~TempDir() { remove_tree(path); }
};

bool model_present() { return std::ifstream(std::string(KVD_MODEL_DIR) + "/config.json").good(); }

TEST(ComponentSeam, ATestComponentTrainsExportsLoadsAndEvaluates) {
  if (!model_present()) GTEST_SKIP() << "the default model is missing: run scripts/bootstrap.sh";
  register_probe();
  TempDir t;
  PrepareTextOptions po;
  po.model_dir = KVD_MODEL_DIR;
  po.inputs = {std::string(KVD_SOURCE_DIR) + "/data/samples/prose.txt"};
  po.out = t.path + "/data.h5";
  po.seq_len = 64;
  po.val_fraction = 0.2;
  po.progress = Progress::Never;
  prepare_text(po);

  const std::string yaml = std::string("model: {dir: ") + KVD_MODEL_DIR + ", dtype: float32}\n" +
                           "data: {train: " + po.out + ", prefetch: 0}\n" + "component: {kind: " + kKind +
                           ", init_std: 0.02}\n" + "loss: {mse: 1.0}\n" + "train: {steps: 6, lr: 0.05, min_lr: 0.05, " +
                           "warmup: 0, device: cpu, progress: never, save_every: 0, eval_every: 0, out_dir: " + t.path +
                           "/run}\n";
  const RunConfig cfg = resolve_config(yaml, "seam.yaml", {});
  EXPECT_EQ(cfg.component_kind, kKind);
  EXPECT_DOUBLE_EQ(cfg.component.at("init_std").get<double>(), 0.02);
  EXPECT_DOUBLE_EQ(cfg.loss_weight("mse"), 1.0);
  // The probe's keys are checked like any other: an option it does not declare is refused by name.
  try {
    resolve_config(yaml, "seam.yaml", {"component.budget=3"});
    ADD_FAILURE() << "component.budget is not an option of the probe";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("component.budget"), std::string::npos) << e.what();
  }

  const TrainResult tr = train(cfg, ResumeRequest{ResumeMode::None, ""});
  EXPECT_EQ(tr.steps_done, 6);
  // It learned: the MSE of the last step is below the first one's.
  std::ifstream metrics(t.path + "/run/metrics.jsonl");
  std::vector<double> mse;
  for (std::string line; std::getline(metrics, line);) {
    const nlohmann::json j = nlohmann::json::parse(line);
    if (j.contains("mse")) mse.push_back(j.at("mse").get<double>());
  }
  ASSERT_EQ(mse.size(), 6u);
  EXPECT_LT(mse.back(), 0.5 * mse.front());

  // The trainer's bundle loads back through the registry, with the trained weights.
  const Model model = Model::load(KVD_MODEL_DIR, c10::Device(c10::kCPU));
  const BaseModelInfo base = base_model_info(KVD_MODEL_DIR);
  const std::string bundle = t.path + "/run/bundle";
  std::shared_ptr<Component> c = load_component(bundle, model, base);
  ASSERT_EQ(c->kind(), kKind);
  auto* probe = dynamic_cast<ProbeImpl*>(c.get());
  ASSERT_NE(probe, nullptr);

  // As a method of the registry: `gate:<bundle>` compresses a prompt to the top 16 of its scores per head.
  MethodContext ctx;
  ctx.model = &model;
  ctx.learned_mode = LearnedMode::Once;
  ctx.load_bundle = [&](const std::string& dir) { return load_component(dir, model, base); };
  ResolvedMethod m = resolve_method("gate:" + bundle, Budget::tokens(16), ctx);
  EXPECT_EQ(m.label, std::string(kKind) + "(run)");
  torch::manual_seed(3);
  const at::Tensor ids = torch::randint(100, 5000, {1, 48}, torch::kLong);  // (1, 48)
  KVCache cache = model.new_cache(1);
  compress_prefill(model, cache, ids, m.method);
  // Reference: the probe's scores of every prompt token from one forward, top 16 (ties: the older token).
  std::vector<at::Tensor> hs(model.config().num_layers);
  AttentionMods capture;
  capture.layer_hook = [&](const LayerInput& in) {
    hs[in.layer] = in.hidden;
    return LayerMods();
  };
  torch::NoGradGuard ng;
  model.forward_train(ids, sequential_positions(1, 48, model.device()), capture);
  for (int64_t l = 0; l < model.config().num_layers; ++l) {
    at::Tensor s = probe->predict(l, hs[l])[0].transpose(0, 1);  // (H_kv, 48)
    at::Tensor want = std::get<0>(std::get<1>(s.sort(true, -1, true)).narrow(-1, 0, 16).sort(-1));  // (H_kv, 16)
    at::Tensor got = std::get<0>(cache.layer(l).pos[0].sort(-1));                                   // (H_kv, 16)
    EXPECT_TRUE(torch::equal(got, want)) << "layer " << l;
  }
  // And the held-out check runs on it (a budget larger than the sequence keeps everything: KL 0).
  const ResolvedMethod m2 = resolve_method("gate:" + bundle, Budget::tokens(16), ctx);
  HeldoutOptions ho;
  ho.budget = 1000;
  ho.chunk = 16;
  EXPECT_LT(heldout_kl(model, ids, *m2.method.scorer, ho).kl, 1e-9);
  ho.budget = 8;
  EXPECT_GT(heldout_kl(model, ids, *m2.method.scorer, ho).kl, 1e-4);
}

TEST(ComponentSeam, BadKindsAndBundlesGetOneClearLine) {
  try {
    resolve_config("model: {dir: x}\ndata: {train: y}\ncomponent: {kind: nosuch}\n", "bad.yaml", {});
    ADD_FAILURE();
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("unknown component kind 'nosuch'"), std::string::npos) << m;
    EXPECT_NE(m.find("retention_gate"), std::string::npos) << m;
  }
  if (!model_present()) GTEST_SKIP() << "the default model is missing";
  TempDir t;
  write_file_atomic(t.path + "/kvdistill.json", R"({"format_version": 1, "kind": "warp_drive"})");
  const Model model = Model::load(KVD_MODEL_DIR, c10::Device(c10::kCPU));
  try {
    load_component(t.path, model, base_model_info(KVD_MODEL_DIR));
    ADD_FAILURE();
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("'warp_drive'"), std::string::npos) << m;
    EXPECT_NE(m.find("known kinds"), std::string::npos) << m;
  }
  MethodContext ctx;
  ctx.model = &model;
  try {
    resolve_method("snapkvv", Budget::ratio(0.5), ctx);
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("unknown method 'snapkvv'"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace kvd
