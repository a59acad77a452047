#include "gates/kvzap.h"

#include <cmath>
#include <limits>

#include <torch/torch.h>

#include "common/error.h"
#include "gates/components.h"
#include "gates/shared_owner.h"
#include "models/kv_cache.h"
#include "models/model.h"

namespace kvd {

KVzapImpl::KVzapImpl(const ModelConfig& cfg, KVzapOptions options)
    : opt_(options), d_model_(cfg.hidden_size), num_layers_(cfg.num_layers), num_kv_heads_(cfg.num_kv_heads) {
  KVD_CHECK(opt_.hidden > 0 && opt_.window >= 0 && opt_.budget > 0 && opt_.chunk_size > 0 && opt_.skip_sinks >= 0,
            "kvzap: hidden, budget and chunk_size must be > 0, window and skip_sinks >= 0");
  layers_ = register_module("layers", torch::nn::ModuleList());
  for (int64_t l = 0; l < num_layers_; ++l) {
    if (opt_.variant == KVzapVariant::Linear)
      layers_->push_back(torch::nn::Linear(d_model_, num_kv_heads_));
    else
      layers_->push_back(torch::nn::Sequential(torch::nn::Linear(d_model_, opt_.hidden), torch::nn::GELU(),
                                               torch::nn::Linear(opt_.hidden, num_kv_heads_)));
  }
}

at::Tensor KVzapImpl::predict(int64_t layer, const at::Tensor& x) const {
  KVD_CHECK(layer >= 0 && layer < num_layers_, "kvzap: layer ", layer, " outside [0, ", num_layers_, ")");
  KVD_CHECK(x.dim() == 3 && x.size(2) == d_model_, "kvzap: inputs must be (B, T, ", d_model_, "), got ", x.sizes());
  const at::Tensor xf = x.to(layers_->parameters().front().scalar_type());  // the parameters' dtype (float32)
  if (opt_.variant == KVzapVariant::Linear) return layers_->ptr<torch::nn::LinearImpl>(layer)->forward(xf);
  return layers_->ptr<torch::nn::SequentialImpl>(layer)->forward(xf);  // (B, T, H_kv)
}

std::vector<std::vector<std::pair<int64_t, int64_t>>> document_spans(const at::Tensor& doc_ids_in) {
  KVD_CHECK(doc_ids_in.dim() == 2, "document_spans: doc_ids must be (B, T), got ", doc_ids_in.sizes());
  const at::Tensor d = doc_ids_in.to(torch::kCPU, torch::kLong).contiguous();
  const int64_t B = d.size(0), T = d.size(1);
  const int64_t* p = d.data_ptr<int64_t>();
  std::vector<std::vector<std::pair<int64_t, int64_t>>> out(B);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T;) {
      const int64_t id = p[b * T + t];
      int64_t e = t + 1;
      while (e < T && p[b * T + e] == id) ++e;
      if (id >= 0) out[b].emplace_back(t, e);
      t = e;
    }
  return out;
}

KVzapTargets kvzap_targets(const Model& model, const std::vector<int64_t>& ids, const KVzipPrompts& prompts,
                           const KVzapOptions& options) {
  torch::NoGradGuard no_grad;
  const int64_t L = model.config().num_layers, T = static_cast<int64_t>(ids.size());
  KVD_CHECK(T > 0, "kvzap_targets: an empty document");
  KVzapTargets t;
  t.inputs.resize(L);
  KVCache cache = model.new_cache(1);
  const PrefillObserver keep_inputs = [&](const PrefillLayerObservation& o, KVCache&) { t.inputs[o.layer] = o.hidden; };
  model.prefill(torch::tensor(ids, torch::kLong).unsqueeze(0).to(model.device()), cache, LogitsMode::LastPosition,
                keep_inputs);
  KVzipOptions ko;
  ko.norm = KVzipNorm::Plus;
  ko.chunk_size = options.chunk_size;
  ko.n_sink = 0;  // the sinks are left out below instead of being scored max + 1
  const std::vector<at::Tensor> s = kvzip_scores(model, cache, {ids}, prompts, ko);  // [l] (1, H_kv, T)
  const double ninf = -std::numeric_limits<double>::infinity();
  for (int64_t l = 0; l < L; ++l) {
    at::Tensor ls = s[l].to(torch::kFloat).log().transpose(1, 2).contiguous();  // (1, T, H_kv); 0 -> -inf
    if (options.skip_sinks > 0) ls.narrow(1, 0, std::min(options.skip_sinks, T)).fill_(ninf);
    t.log_scores.push_back(ls);
  }
  return t;
}

ComponentLoss KVzapImpl::loss(const Model& model, const TrainBatch& batch, const LossOptions& options) {
  KVD_CHECK(model.config().num_layers == num_layers_ && model.config().hidden_size == d_model_ &&
                model.config().num_kv_heads == num_kv_heads_,
            "kvzap: built for a model with ", num_layers_, " layers, hidden size ", d_model_, " and ", num_kv_heads_,
            " KV heads; this model has ", model.config().num_layers, ", ", model.config().hidden_size, " and ",
            model.config().num_kv_heads);
  KVD_CHECK(!options.model_dir.empty(), "kvzap: its KVzip+ targets need the model's tokenizer and chat template; "
            "pass the model directory (LossOptions::model_dir, the run config's model.dir)");
  if (prompts_dir_ != options.model_dir) {
    prompts_ = kvzip_prompts(options.model_dir);
    prompts_dir_ = options.model_dir;
  }
  const at::Tensor ids = batch.ids.to(torch::kCPU, torch::kLong).contiguous();  // (B, T)
  const auto spans = document_spans(batch.doc_ids);
  at::Tensor sum;
  int64_t count = 0, tokens = 0;
  double target_sum = 0;
  for (int64_t b = 0; b < ids.size(0); ++b)
    for (const auto& [s, e] : spans[b]) {
      if (e - s <= opt_.skip_sinks) continue;
      const int64_t* p = ids[b].data_ptr<int64_t>();
      const KVzapTargets t = kvzap_targets(model, std::vector<int64_t>(p + s, p + e), prompts_, opt_);
      for (int64_t l = 0; l < num_layers_; ++l) {
        const at::Tensor pred = predict(l, t.inputs[l]);                 // (1, T, H_kv) in the graph
        const at::Tensor tgt = t.log_scores[l].to(pred.device());        // (1, T, H_kv)
        const at::Tensor use = torch::isfinite(tgt);
        const at::Tensor diff = torch::where(use, pred - tgt.nan_to_num(0.0, 0.0, 0.0), torch::zeros_like(pred));
        const at::Tensor sq = diff.pow(2).sum();
        sum = sum.defined() ? sum + sq : sq;
        count += use.sum().item<int64_t>();
        target_sum += torch::where(use, tgt, torch::zeros_like(tgt)).sum().item<double>();
      }
      tokens += e - s;
    }
  KVD_CHECK(count > 0, "kvzap: the micro-batch holds no document longer than component.skip_sinks (",
            opt_.skip_sinks, ") tokens; nothing to regress on");
  ComponentLoss out;
  out.terms.emplace_back("mse", sum / static_cast<double>(count));
  out.tokens = tokens;
  out.metrics.emplace_back("target_mean", target_sum / static_cast<double>(count));
  return out;
}

namespace {

constexpr const char* kColumn = "kvzap";

// The predicted log-score is written into the cache's payload when a token is appended; the last `window`
// positions score +inf (never evicted), as kvpress's DMSPress protects its sliding window.
class KVzapScorer : public Scorer {
 public:
  KVzapScorer(std::shared_ptr<KVzapImpl> owner, KVzapImpl* kz) : owner_(std::move(owner)), kz_(kz) {}
  std::string name() const override { return "kvzap"; }
  // Fixed-shape: reads the payload column, positions and next_position_column alone.
  ScorerNeeds needs() const override { return rows_together(FixedShape::Yes); }
  std::vector<PayloadColumn> payload_columns() const override { return {{kColumn, torch::kFloat, 0.0}}; }
  std::vector<at::Tensor> entry_payload(int64_t layer, const at::Tensor& hidden, const EntryContext& /*ctx*/) override {
    torch::NoGradGuard no_grad;
    return {kz_->predict(layer, hidden).transpose(1, 2)};  // (B, t, H_kv) -> (B, H_kv, t)
  }
  at::Tensor score(const LayerView& view) override {
    torch::NoGradGuard no_grad;
    at::Tensor s;  // (B, H_kv, n)
    auto it = view.payload.find(kColumn);
    if (it != view.payload.end()) {
      s = it->second.to(torch::kFloat);
    } else {
      KVD_CHECK(view.hidden.defined() && view.hidden.dim() == 3, "kvzap scorer: the cache holds no scores (payload '",
                kColumn, "') and LayerView.hidden is empty; drive prefill / decode through the scorer's on_append");
      s = kz_->predict(view.layer, view.hidden).transpose(1, 2);
    }
    const at::Tensor pos = view.positions.to(s.device());
    if (kz_->options().window > 0)
      s = s.masked_fill(pos.ge(view.next_position_column(pos.device()) - kz_->options().window),
                        std::numeric_limits<float>::infinity());
    if (view.valid.defined()) s = s.masked_fill(view.valid.to(s.device()).logical_not(), -std::numeric_limits<float>::infinity());
    return s;
  }

 private:
  std::shared_ptr<KVzapImpl> owner_;
  KVzapImpl* kz_;
};

const char* variant_name(KVzapVariant v) { return v == KVzapVariant::Linear ? "linear" : "mlp"; }

KVzapOptions resolve_options(const nlohmann::json& o) {
  KVzapOptions k;
  const std::string v = o.at("variant").get<std::string>();
  KVD_CHECK(v == "mlp" || v == "linear", "config key 'component.variant': '", v,
            "' is not a KVzap variant; use mlp (Linear-GELU-Linear) or linear");
  k.variant = v == "linear" ? KVzapVariant::Linear : KVzapVariant::Mlp;
  k.hidden = o.at("hidden").get<int64_t>();
  KVD_CHECK(k.hidden > 0, "config key 'component.hidden': must be > 0, got ", k.hidden);
  k.window = o.at("window").get<int64_t>();
  KVD_CHECK(k.window >= 0, "config key 'component.window': must be >= 0, got ", k.window);
  k.budget = o.at("budget").get<int64_t>();
  KVD_CHECK(k.budget > 0, "config key 'component.budget': must be > 0, got ", k.budget);
  k.chunk_size = o.at("chunk_size").get<int64_t>();
  KVD_CHECK(k.chunk_size > 0, "config key 'component.chunk_size': must be > 0, got ", k.chunk_size);
  k.skip_sinks = o.at("skip_sinks").get<int64_t>();
  KVD_CHECK(k.skip_sinks >= 0, "config key 'component.skip_sinks': must be >= 0, got ", k.skip_sinks);
  return k;
}

}  // namespace

std::unique_ptr<Scorer> KVzapImpl::make_scorer() { return std::make_unique<KVzapScorer>(shared_owner(this), this); }

nlohmann::json KVzapImpl::manifest() const {
  return nlohmann::json{
      {"kind", kind()},
      {"num_layers", num_layers_},
      {"hidden_size", d_model_},
      {"num_kv_heads", num_kv_heads_},
      {"variant", variant_name(opt_.variant)},
      {"input", "attention input after the layer's input RMSNorm"},
      {"output", opt_.variant == KVzapVariant::Linear ? "W x + b, one log-score per KV head"
                                                       : "W2 gelu(W1 x + b1) + b2, one log-score per KV head"},
      {"score", "kvzap_log_score"},
      {"score_formula", "predicted log KVzip+ score; the last `window` positions +inf (never evicted)"},
      {"score_timing", "on_append"},
      {"higher_keeps", true},
      {"options",
       {{"variant", variant_name(opt_.variant)},
        {"hidden", opt_.hidden},
        {"window", opt_.window},
        {"budget", opt_.budget},
        {"chunk_size", opt_.chunk_size},
        {"skip_sinks", opt_.skip_sinks}}},
      {"foreign_layout", foreign_layout()},
  };
}

nlohmann::json KVzapImpl::foreign_layout() const {
  nlohmann::json hidden = opt_.variant == KVzapVariant::Linear ? nlohmann::json(nullptr) : nlohmann::json(opt_.hidden);
  return nlohmann::json{
      {"dir", "kvpress"},
      {"tensor_file", "model.safetensors"},
      {"config",
       {{"model_type", "kvzap"},
        {"architectures", {"KVzapModel"}},
        {"input_dim", d_model_},
        {"output_dim", num_kv_heads_},
        {"hidden_dim", hidden},
        {"n_modules", num_layers_}}},
  };
}

ComponentSpec kvzap_spec() {
  ComponentSpec s;
  s.kind = "kvzap";
  s.doc = "KVzap: per layer a linear map or MLP from the attention input to log KVzip+ scores per KV head "
          "(arXiv 2601.07891; kvpress KVzapModel layout)";
  s.options = {
      {"component.variant", ValueType::String, "mlp", "mlp (Linear-GELU-Linear, kvpress's default) or linear"},
      {"component.hidden", ValueType::Int, "512", "MLP width"},
      {"component.window", ValueType::Int, "128", "recent positions never evicted at inference"},
      {"component.budget", ValueType::Int, "128", "KV entries per head of the held-out check"},
      {"component.chunk_size", ValueType::Int, "2048", "KVzip+ targets: context tokens reconstructed per pass"},
      {"component.skip_sinks", ValueType::Int, "4", "KVzip+ targets: first positions left out of the regression"},
  };
  s.losses = {
      {"loss.mse", ValueType::Float, "1.0", "weight of the squared error to log KVzip+"},
  };
  s.check = [](const nlohmann::json& o) { resolve_options(o); };
  s.make = [](const ModelConfig& cfg, const nlohmann::json& o) -> std::shared_ptr<Component> {
    return KVzap(cfg, resolve_options(o)).ptr();
  };
  s.options_from_manifest = [](const nlohmann::json& m) {
    KVD_CHECK(m.value("score", std::string()) == "kvzap_log_score", "the manifest's score is '",
              m.value("score", std::string("missing")), "', not kvzap_log_score; export the bundle again");
    return m.at("options");
  };
  return s;
}

}  // namespace kvd
