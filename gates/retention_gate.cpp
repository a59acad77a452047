#include "gates/retention_gate.h"

#include <limits>

#include <torch/torch.h>

#include "common/error.h"
#include "gates/components.h"
#include "gates/shared_owner.h"
#include "gates/distill_objective.h"
#include "kernels/soft_cache_size.h"
#include "losses/capacity.h"
#include "models/kv_cache.h"
#include "models/model.h"
#include "models/profile.h"

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

std::vector<LossTerm> RetentionGateImpl::regularizers(KernelPath kernels) {
  std::vector<at::Tensor> per_layer;  // [layer] (B, H_kv, T)
  for (const at::Tensor& lb : recorded_) {
    KVD_CHECK(lb.defined(), "RetentionGate::regularizers: no recorded log beta; run a forward with attention_mods first");
    per_layer.push_back(lb.transpose(1, 2));
  }
  KVD_CHECK(!per_layer.empty(), "RetentionGate::regularizers: no recorded log beta; run a forward with attention_mods first");
  at::Tensor x = torch::cat(per_layer, 1);  // (B, L*H_kv, T)
  at::Tensor docs = recorded_docs_.defined() ? recorded_docs_.to(x.device()) : at::Tensor();
  const CapacityImpl impl = kernels == KernelPath::Fused && x.is_cuda() && soft_cache_size_fused_available(x)
                                ? CapacityImpl::Fused
                                : CapacityImpl::Tiled;
  return {{"capacity", capacity_loss(x, docs, static_cast<double>(opt_.budget), impl, opt_.capacity_block)}};
}

ComponentLoss RetentionGateImpl::loss(const Model& model, const TrainBatch& batch, const LossOptions& options) {
  const AttentionMods mods = attention_mods(batch);
  DistillTerms d = distill_to_frozen(model, batch, mods, options);
  ComponentLoss out;
  out.terms = {{"kl", d.kl}, {"ce", d.ce}};
  ProfileLap lap(model.device(), "train ");
  for (LossTerm& t : regularizers(options.kernels)) out.terms.push_back(std::move(t));
  lap("capacity forward");
  out.tokens = d.tokens;
  return out;
}

at::Tensor retention_score(const at::Tensor& log_beta, const at::Tensor& positions, const at::Tensor& next_position) {
  KVD_CHECK(log_beta.sizes() == positions.sizes(), "retention_score: log_beta ", log_beta.sizes(),
            " and positions ", positions.sizes(), " must match");
  at::Tensor age = (next_position + 1 - positions).to(torch::kFloat);  // (B, H_kv, n)
  return log_beta.to(torch::kFloat) * age;                             // (B, H_kv, n)
}

namespace {

constexpr const char* kLogBeta = "log_beta";

// TRIM-KV at inference: log β is computed once, when a token is appended (on_append, every prefill chunk and
// decode step), and kept in the cache's payload column "log_beta"; the score log β_i · (t + 1 − pos_i)
// then decays as decoding goes on. A view without that column (a caller that drove no on_append) is scored
// from LayerView.hidden instead.
class RetentionScorer : public Scorer {
 public:
  RetentionScorer(std::shared_ptr<RetentionGateImpl> owner, RetentionGateImpl* gate)
      : owner_(std::move(owner)), gate_(gate) {}
  std::string name() const override { return "retention_gate"; }
  // Fixed-shape: reads the payload column, positions and next_position_column alone.
  ScorerNeeds needs() const override { return rows_together(FixedShape::Yes); }

  std::vector<PayloadColumn> payload_columns() const override { return {{kLogBeta, torch::kFloat, 0.0}}; }
  std::vector<at::Tensor> entry_payload(int64_t layer, const at::Tensor& hidden, const EntryContext& /*ctx*/) override {
    torch::NoGradGuard no_grad;
    return {gate_->log_beta(layer, hidden).transpose(1, 2)};  // (B, t, H_kv) -> (B, H_kv, t)
  }

  at::Tensor score(const LayerView& view) override {
    KVD_CHECK(view.positions.defined() && view.positions.dim() == 3,
              "retention_gate scorer: LayerView.positions must be (B, H_kv, n)");
    torch::NoGradGuard no_grad;
    at::Tensor lb;  // (B, H_kv, n)
    auto it = view.payload.find(kLogBeta);
    if (it != view.payload.end()) {
      lb = it->second;
    } else {
      KVD_CHECK(view.hidden.defined(), "retention_gate scorer: the cache holds no log beta (payload '", kLogBeta,
                "') and LayerView.hidden is empty; drive prefill / decode through the scorer's on_append");
      if (view.hidden.dim() == 3) {
        lb = gate_->log_beta(view.layer, view.hidden).transpose(1, 2);  // (B, n, H_kv) -> (B, H_kv, n)
      } else {
        KVD_CHECK(view.hidden.dim() == 4, "retention_gate scorer: hidden must be (B, n, d) or (B, H_kv, n, d), got ",
                  view.hidden.sizes());
        at::Tensor all = gate_->log_beta(view.layer, view.hidden);  // (B, H_kv, n, H_kv): every head's gate per head
        lb = all.diagonal(0, 1, 3).permute({0, 2, 1});              // (B, n, H_kv) -> (B, H_kv, n)
      }
    }
    at::Tensor s = retention_score(lb, view.positions.to(lb.device()),
                                   view.next_position_column(lb.device()));  // (B, H_kv, n)
    if (view.valid.defined()) s = s.masked_fill(view.valid.to(s.device()).logical_not(), -std::numeric_limits<float>::infinity());
    return s;
  }

 private:
  std::shared_ptr<RetentionGateImpl> owner_;  // keeps the parameters alive when the gate is shared-owned
  RetentionGateImpl* gate_;
};

}  // namespace

std::unique_ptr<Scorer> RetentionGateImpl::make_scorer() {
  return std::make_unique<RetentionScorer>(shared_owner(this), this);
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
      {"score_timing", "on_append"},
      {"higher_keeps", true},
      {"options", {{"budget", opt_.budget}, {"hidden", opt_.hidden}, {"bias_init", opt_.bias_init}}},
  };
}

ComponentSpec retention_gate_spec() {
  ComponentSpec s;
  s.kind = "retention_gate";
  s.doc = "TRIM-KV retention gate: per layer an MLP x -> log beta per KV head (arXiv 2512.03324)";
  s.options = {
      {"component.budget", ValueType::Int, "128", "M: KV entries kept per head (capacity loss, held-out check)"},
      {"component.hidden", ValueType::Int, "512", "retention gate MLP width"},
      {"component.bias_init", ValueType::Float, "18.0", "retention gate output bias at init (beta ~ 1)"},
  };
  s.losses = {
      {"loss.kl", ValueType::Float, "1.0", "weight of the forward KL(teacher || student)"},
      {"loss.ce", ValueType::Float, "0.0", "weight of the student's next-token cross-entropy"},
      {"loss.capacity", ValueType::Float, "1.0", "weight of the capacity regularizer (memory budget M)"},
  };
  s.check = [](const nlohmann::json& o) {
    // Bounded above too: a bundle's manifest sizes the parameters before any tensor is read.
    constexpr int64_t kMaxGateBudget = int64_t(1) << 24, kMaxGateHidden = int64_t(1) << 16;
    const int64_t budget = o.at("budget").get<int64_t>(), hidden = o.at("hidden").get<int64_t>();
    KVD_CHECK(budget > 0 && budget <= kMaxGateBudget, "config key 'component.budget': M must be in [1, ",
              kMaxGateBudget, "], got ", budget);
    KVD_CHECK(hidden > 0 && hidden <= kMaxGateHidden, "config key 'component.hidden': must be in [1, ",
              kMaxGateHidden, "], got ", hidden);
  };
  s.make = [](const ModelConfig& cfg, const nlohmann::json& o) -> std::shared_ptr<Component> {
    RetentionGateOptions opt;
    opt.budget = o.at("budget").get<int64_t>();
    opt.hidden = o.at("hidden").get<int64_t>();
    opt.bias_init = o.at("bias_init").get<double>();
    return RetentionGate(cfg, opt).ptr();
  };
  // Bundles written before manifests held "options" carry the width and budget at the top level.
  s.options_from_manifest = [](const nlohmann::json& m) {
    if (m.contains("options")) return m.at("options");
    nlohmann::json o = nlohmann::json::object();
    if (m.contains("gate_hidden")) o["hidden"] = m.at("gate_hidden");
    if (m.contains("budget")) o["budget"] = m.at("budget");
    if (m.contains("bias_init")) o["bias_init"] = m.at("bias_init");
    return o;
  };
  return s;
}

}  // namespace kvd
