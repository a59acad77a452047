#include "gates/retention_gate.h"

#include <limits>

#include <torch/torch.h>

#include "common/error.h"
#include "export/gate_bundle.h"
#include "losses/capacity.h"

namespace kvd {

RetentionGateLayerImpl::RetentionGateLayerImpl(int64_t d_model, int64_t hidden, int64_t num_kv_heads) {
  w1 = register_module("w1", torch::nn::Linear(torch::nn::LinearOptions(d_model, hidden).bias(true)));
  w2 = register_module("w2", torch::nn::Linear(torch::nn::LinearOptions(hidden, num_kv_heads).bias(false)));
  bias = register_parameter("bias", torch::zeros({num_kv_heads}));
}

at::Tensor RetentionGateLayerImpl::forward(const at::Tensor& x) {  // (..., d)
  const c10::ScalarType dt = c10::promoteTypes(w1->weight.scalar_type(), torch::kFloat);
  at::Tensor h = torch::silu(w1->forward(x.to(w1->weight.device(), dt)));  // (..., hidden)
  at::Tensor z = w2->forward(h) + bias;                                   // (..., H_kv)
  return torch::log_sigmoid(z);                                           // (..., H_kv)
}

RetentionGateImpl::RetentionGateImpl(const ModelConfig& cfg, RetentionGateOptions options)
    : opt_(options), d_model_(cfg.hidden_size), num_kv_heads_(cfg.num_kv_heads) {
  KVD_CHECK(cfg.num_layers > 0 && cfg.hidden_size > 0 && cfg.num_kv_heads > 0,
            "RetentionGate: the model config has no layers / hidden size / KV heads");
  KVD_CHECK(opt_.hidden > 0, "RetentionGate: hidden width must be positive, got ", opt_.hidden);
  KVD_CHECK(opt_.budget > 0, "RetentionGate: budget M must be positive, got ", opt_.budget);
  KVD_CHECK(cfg.activation == Activation::SiLU, "RetentionGate: only SiLU models are supported");
  layers_ = register_module("layers", torch::nn::ModuleList());
  torch::NoGradGuard no_grad;
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    RetentionGateLayer layer(d_model_, opt_.hidden, num_kv_heads_);
    layer->w1->weight.normal_(0.0, opt_.init_std);
    layer->w1->bias.zero_();
    layer->w2->weight.normal_(0.0, opt_.init_std);
    layer->bias.fill_(opt_.bias_init);
    layers_->push_back(layer);
  }
}

at::Tensor RetentionGateImpl::log_beta(int64_t layer, const at::Tensor& hidden) {
  KVD_CHECK(layer >= 0 && layer < num_layers(), "RetentionGate: layer ", layer, " out of range [0, ", num_layers(), ")");
  KVD_CHECK(hidden.size(-1) == d_model_, "RetentionGate: hidden size ", hidden.size(-1), ", expected ", d_model_);
  return layers_->ptr<RetentionGateLayerImpl>(layer)->forward(hidden);  // (..., H_kv)
}

void RetentionGateImpl::clear_recorded() {
  recorded_.clear();
  recorded_docs_ = at::Tensor();
}

AttentionMods RetentionGateImpl::attention_mods(const TrainBatch& batch) {
  clear_recorded();
  recorded_.resize(num_layers());
  recorded_docs_ = batch.doc_ids;
  AttentionMods mods;
  mods.layer_hook = [this](const LayerInput& in) {
    at::Tensor lb = log_beta(in.layer, in.hidden);           // (B, S, H_kv)
    recorded_[in.layer] = lb.narrow(1, 0, in.seq_len);       // (B, T, H_kv)
    LayerMods m;
    m.key_rate = lb.transpose(1, 2);                         // (B, H_kv, S)
    return m;
  };
  return mods;
}

std::vector<LossTerm> RetentionGateImpl::regularizers() {
  std::vector<at::Tensor> per_layer;  // [layer] (B, H_kv, T)
  for (const at::Tensor& lb : recorded_) {
    KVD_CHECK(lb.defined(), "RetentionGate::regularizers: no recorded log beta; run a forward with attention_mods first");
    per_layer.push_back(lb.transpose(1, 2));
  }
  KVD_CHECK(!per_layer.empty(), "RetentionGate::regularizers: no recorded log beta; run a forward with attention_mods first");
  at::Tensor x = torch::cat(per_layer, 1);  // (B, L*H_kv, T)
  at::Tensor docs = recorded_docs_.defined() ? recorded_docs_.to(x.device()) : at::Tensor();
  return {{"capacity", capacity_loss(x, docs, static_cast<double>(opt_.budget), CapacityImpl::Tiled,
                                     opt_.capacity_block)}};
}

at::Tensor retention_score(const at::Tensor& log_beta, const at::Tensor& positions, int64_t next_position) {
  KVD_CHECK(log_beta.sizes() == positions.sizes(), "retention_score: log_beta ", log_beta.sizes(),
            " and positions ", positions.sizes(), " must match");
  at::Tensor age = (next_position + 1 - positions).to(torch::kFloat);  // (B, H_kv, n)
  return log_beta.to(torch::kFloat) * age;                             // (B, H_kv, n)
}

namespace {

class RetentionScorer : public Scorer {
 public:
  RetentionScorer(std::shared_ptr<RetentionGateImpl> owner, RetentionGateImpl* gate)
      : owner_(std::move(owner)), gate_(gate) {}
  std::string name() const override { return "retention_gate"; }
  ScorerNeeds needs() const override {
    ScorerNeeds n;
    n.hidden = true;
    return n;
  }
  at::Tensor score(const LayerView& view) override {
    KVD_CHECK(view.hidden.defined(), "retention_gate scorer: LayerView.hidden is required (needs().hidden)");
    KVD_CHECK(view.positions.defined() && view.positions.dim() == 3,
              "retention_gate scorer: LayerView.positions must be (B, H_kv, n)");
    torch::NoGradGuard no_grad;
    at::Tensor lb;  // (B, H_kv, n)
    if (view.hidden.dim() == 3) {
      lb = gate_->log_beta(view.layer, view.hidden).transpose(1, 2);  // (B, n, H_kv) -> (B, H_kv, n)
    } else {
      KVD_CHECK(view.hidden.dim() == 4, "retention_gate scorer: hidden must be (B, n, d) or (B, H_kv, n, d), got ",
                view.hidden.sizes());
      at::Tensor all = gate_->log_beta(view.layer, view.hidden);  // (B, H_kv, n, H_kv): every head's gate per head
      lb = all.diagonal(0, 1, 3).permute({0, 2, 1});              // (B, n, H_kv) -> (B, H_kv, n)
    }
    at::Tensor s = retention_score(lb, view.positions.to(lb.device()), view.next_position);  // (B, H_kv, n)
    if (view.valid.defined()) s = s.masked_fill(view.valid.to(s.device()).logical_not(), -std::numeric_limits<float>::infinity());
    return s;
  }

 private:
  std::shared_ptr<RetentionGateImpl> owner_;  // keeps the parameters alive when the gate is shared-owned
  RetentionGateImpl* gate_;
};

}  // namespace

std::unique_ptr<Scorer> RetentionGateImpl::make_scorer() {
  std::shared_ptr<RetentionGateImpl> owner;
  try {
    owner = std::dynamic_pointer_cast<RetentionGateImpl>(shared_from_this());
  } catch (const std::bad_weak_ptr&) {
    // Not shared-owned (a plain object): the caller keeps it alive.
  }
  return std::make_unique<RetentionScorer>(owner, this);
}

nlohmann::json RetentionGateImpl::manifest() const {
  return nlohmann::json{
      {"kind", kind()},
      {"num_layers", static_cast<int64_t>(layers_->size())},
      {"hidden_size", d_model_},
      {"num_kv_heads", num_kv_heads_},
      {"gate_hidden", opt_.hidden},
      {"activation", "silu"},
      {"bias_init", opt_.bias_init},
      {"budget", opt_.budget},
      {"input", "attention input after the layer's input RMSNorm"},
      {"output", "log_beta = log_sigmoid(w2 . silu(w1 . x + b1) + bias), per KV head"},
      {"score", "log_beta"},
      {"score_formula", "log_beta_i * (t + 1 - pos_i)"},
      {"higher_keeps", true},
  };
}

RetentionGate load_retention_gate(const ModelConfig& cfg, const std::string& model_dir, const std::string& bundle_dir,
                                  c10::Device device, uint64_t seed) {
  RetentionGateOptions opt;
  if (!bundle_dir.empty()) {
    const nlohmann::json m = read_gate_manifest(bundle_dir);
    opt.hidden = m.value("gate_hidden", opt.hidden);
    opt.budget = m.value("budget", opt.budget);
  }
  torch::manual_seed(seed);  // the untrained gate's random init, reproducible
  RetentionGate gate(cfg, opt);
  gate->to(device);
  if (!bundle_dir.empty()) load_gate_bundle(bundle_dir, *gate, base_model_info(model_dir));
  return gate;
}

}  // namespace kvd
