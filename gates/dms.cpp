#include "gates/dms.h"

#include <cmath>
#include <limits>

#include <torch/torch.h>

#include "common/error.h"
#include "gates/components.h"
#include "gates/distill_objective.h"
#include "gates/shared_owner.h"
#include "models/kv_cache.h"
#include "models/model.h"

namespace kvd {

DMSImpl::DMSImpl(const ModelConfig& cfg, DMSOptions options)
    : opt_(options), d_model_(cfg.hidden_size), num_kv_heads_(cfg.num_kv_heads) {
  KVD_CHECK(opt_.target >= 0.0 && opt_.target < 1.0, "dms: target must lie in [0, 1), got ", opt_.target);
  KVD_CHECK(opt_.window >= 0 && opt_.ramp_steps >= 0 && opt_.temperature > 0 && opt_.budget > 0,
            "dms: window and ramp_steps must be >= 0, temperature and budget > 0");
  layers_ = register_module("layers", torch::nn::ModuleList());
  torch::NoGradGuard no_grad;
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    torch::nn::Linear probe(d_model_, num_kv_heads_);
    probe->weight.normal_(0.0, opt_.init_std);
    probe->bias.fill_(opt_.bias_init);
    layers_->push_back(probe);
  }
}

at::Tensor DMSImpl::logits(int64_t layer, const at::Tensor& x) const {
  KVD_CHECK(layer >= 0 && layer < static_cast<int64_t>(layers_->size()), "dms: layer ", layer, " out of range");
  KVD_CHECK(x.dim() == 3 && x.size(2) == d_model_, "dms: inputs must be (B, S, ", d_model_, "), got ", x.sizes());
  const auto probe = layers_->ptr<torch::nn::LinearImpl>(layer);
  return probe->forward(x.to(probe->weight.device(), probe->weight.scalar_type()));  // (B, S, H_kv)
}

double DMSImpl::target_at(int64_t step) const {
  if (opt_.ramp_steps <= 0) return opt_.target;
  return opt_.target * std::min(1.0, static_cast<double>(step) / static_cast<double>(opt_.ramp_steps));
}

at::Tensor dms_pair_bias(const at::Tensor& alpha, const PairBiasQuery& q, int64_t window, double eps) {
  const at::Tensor lm = torch::log(1.0 - alpha + eps).unsqueeze(2);                    // (B, H_kv, 1, S)
  const at::Tensor far = (q.q_pos.unsqueeze(-1) - q.k_pos.unsqueeze(1)).gt(window);     // (B, Sq, S)
  return torch::where(far.unsqueeze(1), lm, torch::zeros_like(lm));                   // (B, H_kv, Sq, S)
}

AttentionMods DMSImpl::attention_mods(const TrainBatch& batch, DMSNoise noise) {
  const int64_t L = static_cast<int64_t>(layers_->size()), B = batch.ids.size(0), T = batch.ids.size(1);
  const c10::Device dev = batch.ids.device();
  alpha_.assign(L, at::Tensor());
  hard_.assign(L, at::Tensor());
  valid_ = batch.doc_ids.defined() ? batch.doc_ids.to(dev).ge(0)
                                   : torch::ones({B, T}, torch::TensorOptions().dtype(torch::kBool).device(dev));
  AttentionMods mods;
  mods.layer_hook = [this, noise, T](const LayerInput& in) {
    KVD_CHECK(in.hidden.size(1) == T, "dms: extra rows are not supported (the probe rates sequence tokens)");
    const at::Tensor z = logits(in.layer, in.hidden);  // (B, T, H_kv)
    at::Tensor a;
    if (noise == DMSNoise::Gumbel) {
      const at::Tensor u = torch::rand_like(z).clamp(1e-6, 1.0 - 1e-6);
      a = torch::sigmoid((z + torch::log(u) - torch::log1p(-u)) / opt_.temperature);
    } else {
      a = torch::sigmoid(z);
    }
    alpha_[in.layer] = a;
    hard_[in.layer] = z.detach().ge(0);
    // The delayed-eviction bias log(1 − α̃_k + ε) for queries more than `window` positions after key k: a per-key
    // log-mask with a delay (dms_pair_bias is the same bias as a pair bias), which the fused attention kernel
    // computes without a (B, H_kv, S, S) tensor.
    LayerMods m;
    m.key_log_mask = torch::log(1.0 - a.transpose(1, 2) + opt_.eps);  // (B, H_kv, T)
    m.key_log_mask_delay = opt_.window;
    return m;
  };
  return mods;
}

at::Tensor DMSImpl::evicted_fraction() const {
  at::Tensor sum, n;
  for (const at::Tensor& a : alpha_) {
    KVD_CHECK(a.defined(), "dms: run a forward with attention_mods first");
    const at::Tensor w = valid_.to(a.device()).to(a.scalar_type()).unsqueeze(-1);  // (B, T, 1)
    const at::Tensor s = (a * w).sum();
    sum = sum.defined() ? sum + s : s;
    const at::Tensor c = w.sum() * static_cast<double>(a.size(-1));
    n = n.defined() ? n + c : c;
  }
  return sum / n.clamp_min(1.0);  // ()
}

ComponentLoss DMSImpl::loss(const Model& model, const TrainBatch& batch, const LossOptions& options) {
  KVD_CHECK(model.config().hidden_size == d_model_ && model.config().num_kv_heads == num_kv_heads_ &&
                model.config().num_layers == static_cast<int64_t>(layers_->size()),
            "dms: built for a model with ", layers_->size(), " layers, hidden size ", d_model_, " and ", num_kv_heads_,
            " KV heads; this model has ", model.config().num_layers, ", ", model.config().hidden_size, " and ",
            model.config().num_kv_heads);
  const AttentionMods mods = attention_mods(batch, DMSNoise::Gumbel);
  // The log-mask is an input of each layer (not a closure over α̃), so activation checkpointing keeps its gradient.
  DistillTerms d = distill_to_frozen(model, batch, mods, options);
  const at::Tensor evicted = evicted_fraction();
  const double rho = target_at(options.step);
  double hard = 0, count = 0;
  for (const at::Tensor& h : hard_) {
    const at::Tensor w = valid_.to(h.device()).unsqueeze(-1);
    hard += h.logical_and(w).sum().item<double>();
    count += w.sum().item<double>() * static_cast<double>(h.size(-1));
  }
  ComponentLoss out;
  out.terms = {{"kl", d.kl}, {"ce", d.ce}, {"compression", torch::relu(rho - evicted).to(torch::kFloat32)}};
  out.metrics = {{"evicted", evicted.item<double>()}, {"evicted_hard", hard / std::max(count, 1.0)}, {"evict_target", rho}};
  out.tokens = d.tokens;
  return out;
}

namespace {

constexpr const char* kKeep = "dms_keep";

class DMSScorer : public Scorer {
 public:
  DMSScorer(std::shared_ptr<DMSImpl> owner, DMSImpl* dms) : owner_(std::move(owner)), dms_(dms) {}
  std::string name() const override { return "dms"; }
  // Fixed-shape: reads the payload column, positions and next_position_column alone.
  ScorerNeeds needs() const override { return rows_together(FixedShape::Yes); }
  std::vector<PayloadColumn> payload_columns() const override { return {{kKeep, torch::kFloat, 0.0}}; }
  std::vector<at::Tensor> entry_payload(int64_t layer, const at::Tensor& hidden, const EntryContext& /*ctx*/) override {
    torch::NoGradGuard no_grad;
    return {torch::sigmoid(-dms_->logits(layer, hidden)).transpose(1, 2).to(torch::kFloat)};  // (B, H_kv, t)
  }
  at::Tensor score(const LayerView& view) override {
    torch::NoGradGuard no_grad;
    at::Tensor s;  // (B, H_kv, n)
    auto it = view.payload.find(kKeep);
    if (it != view.payload.end()) {
      s = it->second.to(torch::kFloat);
    } else {
      KVD_CHECK(view.hidden.defined() && view.hidden.dim() == 3, "dms scorer: the cache holds no decisions (payload '",
                kKeep, "') and LayerView.hidden is empty; drive prefill / decode through the scorer's on_append");
      s = torch::sigmoid(-dms_->logits(view.layer, view.hidden)).transpose(1, 2).to(torch::kFloat);
    }
    // The delay: entries the next `window` queries may still see are never evicted.
    const at::Tensor pos = view.positions.to(s.device());
    s = s.masked_fill(pos.ge(view.next_position_column(pos.device()) - dms_->options().window),
                      std::numeric_limits<float>::infinity());
    if (view.valid.defined()) s = s.masked_fill(view.valid.to(s.device()).logical_not(), -std::numeric_limits<float>::infinity());
    return s;
  }

 private:
  std::shared_ptr<DMSImpl> owner_;
  DMSImpl* dms_;
};

DMSOptions resolve_options(const nlohmann::json& o) {
  DMSOptions d;
  d.target = o.at("target").get<double>();
  KVD_CHECK(std::isfinite(d.target) && d.target >= 0.0 && d.target < 1.0,
            "config key 'component.target': the evicted fraction must lie in [0, 1), got ", d.target);
  d.ramp_steps = o.at("ramp_steps").get<int64_t>();
  KVD_CHECK(d.ramp_steps >= 0, "config key 'component.ramp_steps': must be >= 0, got ", d.ramp_steps);
  d.window = o.at("window").get<int64_t>();
  KVD_CHECK(d.window >= 0, "config key 'component.window': must be >= 0, got ", d.window);
  d.temperature = o.at("temperature").get<double>();
  KVD_CHECK(d.temperature > 0, "config key 'component.temperature': must be > 0, got ", d.temperature);
  d.bias_init = o.at("bias_init").get<double>();
  d.init_std = o.at("init_std").get<double>();
  d.budget = o.at("budget").get<int64_t>();
  KVD_CHECK(d.budget > 0, "config key 'component.budget': must be > 0, got ", d.budget);
  return d;
}

}  // namespace

std::unique_ptr<Scorer> DMSImpl::make_scorer() { return std::make_unique<DMSScorer>(shared_owner(this), this); }

nlohmann::json DMSImpl::manifest() const {
  return nlohmann::json{
      {"kind", kind()},
      {"num_layers", static_cast<int64_t>(layers_->size())},
      {"hidden_size", d_model_},
      {"num_kv_heads", num_kv_heads_},
      {"input", "attention input after the layer's input RMSNorm"},
      {"output", "z = W x + b per KV head; eviction probability sigmoid(z)"},
      {"score", "dms_keep_probability"},
      {"score_formula", "sigmoid(-z); +inf for positions >= next_position - window (the delay)"},
      {"score_timing", "on_append"},
      {"higher_keeps", true},
      {"window", opt_.window},
      {"options",
       {{"target", opt_.target},
        {"ramp_steps", opt_.ramp_steps},
        {"window", opt_.window},
        {"temperature", opt_.temperature},
        {"bias_init", opt_.bias_init},
        {"init_std", opt_.init_std},
        {"budget", opt_.budget}}},
  };
}

ComponentSpec dms_spec() {
  ComponentSpec s;
  s.kind = "dms";
  s.doc = "DMS-style learned eviction: per layer a probe x -> evict logit per KV head, delayed by a window, "
          "Gumbel-sigmoid in training, KL + a one-sided compression penalty with a rising target (arXiv 2506.05345)";
  s.options = {
      {"component.target", ValueType::Float, "0.5", "evicted fraction the compression penalty pushes toward, in [0, 1)"},
      {"component.ramp_steps", ValueType::Int, "500", "the target rises linearly from 0 over these steps"},
      {"component.window", ValueType::Int, "128", "delay: an entry stays visible to the next `window` queries"},
      {"component.temperature", ValueType::Float, "0.5", "Gumbel-sigmoid temperature in training"},
      {"component.bias_init", ValueType::Float, "-5.0", "probe bias at init (evict probability sigmoid(b))"},
      {"component.init_std", ValueType::Float, "0.02", "std of the probe weights at init"},
      {"component.budget", ValueType::Int, "512", "KV entries per head of the held-out check (more than the window)"},
  };
  s.losses = {
      {"loss.kl", ValueType::Float, "1.0", "weight of the forward KL(teacher || student)"},
      {"loss.ce", ValueType::Float, "0.0", "weight of the student's next-token cross-entropy"},
      {"loss.compression", ValueType::Float, "1.0", "weight of max(0, target(step) - mean evict probability)"},
  };
  s.check = [](const nlohmann::json& o) {
    const DMSOptions d = resolve_options(o);
    KVD_CHECK(d.budget > d.window, "config key 'component.budget': must exceed component.window (", d.window, "), got ",
              d.budget, ": at a budget <= the window the held-out check keeps exactly the delay window and cannot "
              "see the probe; use e.g. ", 4 * std::max<int64_t>(d.window, 32));
  };
  s.make = [](const ModelConfig& cfg, const nlohmann::json& o) -> std::shared_ptr<Component> {
    return DMS(cfg, resolve_options(o)).ptr();
  };
  s.options_from_manifest = [](const nlohmann::json& m) {
    KVD_CHECK(m.value("score", std::string()) == "dms_keep_probability", "the manifest's score is '",
              m.value("score", std::string("missing")), "', not dms_keep_probability; export the bundle again");
    // The budget is the trainer's held-out check only; bundles from before the budget > window rule still load.
    nlohmann::json o = m.at("options");
    if (o.contains("budget") && o.contains("window") && o["budget"].get<int64_t>() <= o["window"].get<int64_t>())
      o["budget"] = 4 * std::max<int64_t>(o["window"].get<int64_t>(), 32);
    return o;
  };
  return s;
}

}  // namespace kvd
