#include "train/trainer.h"

#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstdio>
#include <cmath>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>

#include <torch/torch.h>

#include "common/error.h"
#include "data/batch_tensors.h"
#include "data/loader.h"
#include "data/h5.h"
#include "data/packed_text.h"
#include "data/responses.h"
#include "export/gate_bundle.h"
#include "gates/component.h"
#include "gates/components.h"
#include "losses/distill.h"
#include "models/device.h"
#include "models/model.h"
#include "models/profile.h"
#include "models/tokenizer.h"
#include "train/batches.h"
#include "train/checkpoint.h"
#include "train/distributed.h"
#include "eval/heldout.h"
#include "train/metrics.h"

namespace kvd {

namespace {

// SIGTERM (timeout, SLURM's preemption, torchrun) and SIGINT (Ctrl-C) stop training at the end of the current
// step, after a checkpoint of it: nothing done is lost, and `--resume auto` continues. A second signal of the
// same kind acts as usual (the handler resets itself).
volatile std::sig_atomic_t g_stop_signal = 0;

extern "C" void on_stop_signal(int sig) { g_stop_signal = sig; }

class StopSignals {
 public:
  StopSignals() {
    g_stop_signal = 0;
    struct sigaction sa {};
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESETHAND;
    sigaction(SIGTERM, &sa, &old_term_);
    sigaction(SIGINT, &sa, &old_int_);
  }
  ~StopSignals() {
    sigaction(SIGTERM, &old_term_, nullptr);
    sigaction(SIGINT, &old_int_, nullptr);
  }
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;
  static int caught() { return static_cast<int>(g_stop_signal); }

 private:
  struct sigaction old_term_ {}, old_int_ {};
};

}  // namespace

ResumeRequest parse_resume(const std::string& s) {
  if (s == "auto") return {ResumeMode::Auto, ""};
  if (s == "none") return {ResumeMode::None, ""};
  KVD_CHECK(!s.empty(), "--resume takes auto, none or a checkpoint directory");
  return {ResumeMode::Path, s};
}

double lr_at(int64_t step, const RunConfig& c) {
  if (step < c.warmup) return c.lr * static_cast<double>(step + 1) / static_cast<double>(c.warmup);
  const int64_t decay = c.steps - 1 - c.warmup;  // steps from the end of warm-up to the last step
  if (decay <= 0) return c.lr;
  const double progress = std::min(1.0, static_cast<double>(step - c.warmup) / static_cast<double>(decay));
  return c.min_lr + 0.5 * (c.lr - c.min_lr) * (1.0 + std::cos(M_PI * progress));
}

PoisonHook poison_hook_from_env() {
  PoisonHook h;
  const char* v = std::getenv("KVD_TEST_POISON");
  if (!v || !*v) return h;
  const std::string s = v;
  const size_t at = s.find('@'), eq = s.find('=');
  KVD_CHECK(at != std::string::npos && at > 0, "KVD_TEST_POISON='", s,
            "' must look like <term|grad>@<step>[=nan|inf] or <sigterm|sigint>@<step>");
  h.what = s.substr(0, at);
  const bool sig = h.what == "sigterm" || h.what == "sigint";
  const std::string step = s.substr(at + 1, eq == std::string::npos ? std::string::npos : eq - at - 1);
  char* end = nullptr;
  h.step = std::strtoll(step.c_str(), &end, 10);
  KVD_CHECK(!step.empty() && *end == '\0' && h.step > 0, "KVD_TEST_POISON='", s, "': the step must be a positive integer");
  if (sig) {
    KVD_CHECK(eq == std::string::npos, "KVD_TEST_POISON='", s, "': a signal takes no value");
    return h;
  }
  const std::string kind = eq == std::string::npos ? "nan" : s.substr(eq + 1);
  KVD_CHECK(kind == "nan" || kind == "inf", "KVD_TEST_POISON='", s, "': the value must be nan or inf");
  h.value = kind == "nan" ? std::nan("") : INFINITY;
  return h;
}

namespace {

// The learned part named by component.kind (gates/components.h), its parameters fp32 on `device`. Seeded by
// the caller.
std::shared_ptr<Component> build_component(const RunConfig& c, const ModelConfig& mc, c10::Device device) {
  std::shared_ptr<Component> component = component_spec(c.component_kind, "config key 'component.kind'").make(mc, c.component);
  component->to(device, torch::kFloat32);
  return component;
}

// data.train / data.val opened as training sources, whichever format the file is (its kvdistill_format):
//   packed_text  the file's train and val splits as packed (every token a target);
//   responses    samples split by data/responses.h's split_of_prompt(train.seed, prompt, data.val_fraction)
//                and packed into data.seq_len sequences; only response tokens are targets.
struct TrainData {
  std::shared_ptr<const SequenceSource> train, val;
  std::string format;
  std::optional<PackedTextReader> packed;  // keeps a packed_text file open while its splits are read
};

TrainData open_train_data(const std::string& path, const char* key, const Tokenizer& tokenizer, const RunConfig& c) {
  std::string format = kPackedTextFormat;
  {
    const h5::File f = h5::File::open(path);
    if (f.has_attr("kvdistill_format")) format = f.attr_string("kvdistill_format");
  }
  TrainData d;
  d.format = format;
  if (format == kResponsesFormat) {
    const ResponsesReader r = ResponsesReader::open(path, tokenizer);
    const uint64_t seed = static_cast<uint64_t>(c.seed);
    d.train = std::make_shared<ResponsesSplit>(r, Split::Train, c.data_seq_len, seed, c.data_val_fraction);
    d.val = std::make_shared<ResponsesSplit>(r, Split::Val, c.data_seq_len, seed, c.data_val_fraction);
    return d;
  }
  KVD_CHECK(format == kPackedTextFormat, "config key '", key, "': ", path, " has kvdistill_format '", format,
            "'; training reads packed_text (`kvdistill prepare text`) or responses (`kvdistill prepare responses`)");
  d.packed = PackedTextReader::open(path, tokenizer);
  d.train = std::make_shared<PackedSource>(d.packed->split(Split::Train));
  d.val = std::make_shared<PackedSource>(d.packed->split(Split::Val));
  return d;
}

struct StepLosses {
  at::Tensor total;                                // () in the graph
  std::vector<std::pair<std::string, double>> terms;  // unweighted values and metrics, for the log
  int64_t tokens = 0;                              // label-valid tokens
  std::vector<double> stats;                       // ComponentLoss::stats
};

// The component's loss on one micro-batch, weighted by the run config's loss.<term> weights and summed in the
// order the component returns its terms.
LossOptions loss_options(const RunConfig& c, int64_t step) {
  LossOptions lo;
  lo.step = step;
  lo.block = c.loss_block;
  lo.checkpointing = c.activation_checkpointing;
  lo.kernels = c.kernels;
  lo.model_dir = c.model_dir;
  return lo;
}

StepLosses micro_step_loss(const Model& model, Component& component, const TrainBatch& tb, const RunConfig& c,
                           int64_t step) {
  ComponentLoss l = component.loss(model, tb, loss_options(c, step));
  KVD_CHECK(!l.terms.empty(), "component ", component.kind(), " returned no loss terms");
  StepLosses out;
  at::Tensor total;
  for (auto& [name, value] : l.terms) {
    const at::Tensor weighted = c.loss_weight(name) * value.to(torch::kFloat32);
    total = total.defined() ? total + weighted : weighted;
    out.terms.emplace_back(name, value.item<double>());
  }
  for (const auto& [name, value] : l.metrics) out.terms.emplace_back(name, value);  // logged, not weighted
  out.total = total;
  out.tokens = l.tokens;
  out.stats = std::move(l.stats);
  return out;
}

// "nan", "inf" or "-inf" (std::to_string may print "-nan").
std::string nonfinite_name(double v) { return std::isnan(v) ? "nan" : v > 0 ? "inf" : "-inf"; }

// True if every element of every tensor is finite.
bool all_finite(const std::vector<at::Tensor>& ts) {
  for (const at::Tensor& t : ts)
    if (t.defined() && !torch::isfinite(t).all().item<bool>()) return false;
  return true;
}

std::string fmt_terms(const std::vector<std::pair<std::string, double>>& terms) {
  std::ostringstream os;
  for (const auto& [k, v] : terms) os << " " << k << "=" << v;
  return os.str();
}

}  // namespace

TrainResult train(const RunConfig& c, const ResumeRequest& resume) {
  // ---- setup: ranks, device, rendezvous -----------------------------------------------------------------
  const RankInfo ranks = discover_ranks();
  const c10::Device device = parse_device(c.device, "train.device", ranks.local_rank);
  CollectiveBackend backend = CollectiveBackend::None;
  if (ranks.world_size > 1) {
    const std::string b = c.dist_backend == "auto" ? (device.is_cuda() ? "nccl" : "gloo") : c.dist_backend;
    backend = b == "nccl" ? CollectiveBackend::Nccl : CollectiveBackend::Gloo;
  }
  const bool main_rank = ranks.rank == 0;
  if (main_rank) std::cout << ranks.describe() << "; device " << device.str() << "\n" << std::flush;
  std::unique_ptr<Distributed> dist = Distributed::init(
      ranks, backend, device, std::chrono::milliseconds(static_cast<int64_t>(c.dist_timeout_s * 1000)));
  if (main_rank) std::cout << "resolved config:\n" << c.to_text() << std::flush;

  try {
    // ---- the frozen model, the data, the component, the optimizer --------------------------------------
    std::optional<c10::ScalarType> dtype;
    if (c.model_dtype == "float32") dtype = torch::kFloat32;
    if (c.model_dtype == "bfloat16") dtype = torch::kBFloat16;
    const Model model = Model::load(c.model_dir, device, dtype);  // bf16 on CUDA by default, fp32 on CPU
    const BaseModelInfo base = base_model_info(c.model_dir);
    const CheckpointIdentity identity{c.component_kind, base.model_id, base.config_sha256};

    const Tokenizer tokenizer = Tokenizer::from_file(c.model_dir);
    const TrainData data = open_train_data(c.data_train, "data.train", tokenizer, c);
    const SequenceSource& train_split = *data.train;
    torch::manual_seed(static_cast<uint64_t>(c.seed));
    if (device.is_cuda()) torch::cuda::manual_seed_all(static_cast<uint64_t>(c.seed));
    at::globalContext().setAllowTF32CuBLAS(c.float32_matmul == Float32Matmul::Tf32);  // CUDA only; CPU ignores it
    std::shared_ptr<Component> component = build_component(c, model.config(), device);
    // The held-out check's budget: train.eval_budget, else the one the component trains for.
    const int64_t eval_budget = c.eval_budget > 0 ? c.eval_budget : component->budget() > 0 ? component->budget() : 128;
    const char* budget_key = c.eval_budget > 0 ? "train.eval_budget" : "component.budget";
    // A budget (the component's own, or the held-out check's) must fit in a training sequence.
    if (component->budget() > 0 || (c.eval_every > 0 && c.eval_budget > 0))
      KVD_CHECK(eval_budget <= train_split.seq_len(), "config key '", budget_key, "': M=", eval_budget,
                " exceeds the sequence length ", train_split.seq_len(), " of data.train (", c.data_train, "); lower ",
                budget_key, " or ", data.format == kResponsesFormat ? "raise data.seq_len" : "prepare the data with a larger --seq-len");
    std::vector<at::Tensor> params = component->parameters();
    torch::optim::AdamW optimizer(params, torch::optim::AdamWOptions(c.lr)
                                              .betas({c.beta1, c.beta2})
                                              .eps(c.adam_eps)
                                              .weight_decay(c.weight_decay));

    SamplerOptions so;
    so.batch_size = c.batch_size;
    so.seed = static_cast<uint64_t>(c.seed);
    so.rank = ranks.rank;
    so.world_size = ranks.world_size;
    so.remainder = Remainder::DropTail;  // every rank takes the same number of full batches
    const ShardedSampler plan(train_split.size(), so);
    KVD_CHECK(plan.batches_per_epoch() > 0, "data.train (", c.data_train, ") has ", train_split.size(),
              " training sequences, fewer than one global batch of train.batch_size x world size = ",
              c.batch_size * ranks.world_size, "; add text or lower train.batch_size");

    // ---- resume ----------------------------------------------------------------------------------------
    const std::string ckpt_root = c.out_dir + "/checkpoints";
    std::string resume_dir;
    if (resume.mode == ResumeMode::Auto) resume_dir = latest_checkpoint(ckpt_root);
    if (resume.mode == ResumeMode::Path) resume_dir = resume.path;
    int64_t start_step = 0;
    Cursor cursor;
    if (!resume_dir.empty()) {
      const CheckpointMeta meta = read_checkpoint_meta(resume_dir, identity);
      load_training_state(resume_dir, *component, optimizer);
      start_step = meta.step;
      nlohmann::json cj = meta.cursor;
      cj["rank"] = ranks.rank;  // rank 0 saved it; every rank is at the same (epoch, step) of its shard
      cursor = cursor_from_json(cj, plan, resume_dir + " (resuming with another world size or batch size is not supported)");
      if (main_rank) std::cout << "resumed from " << resume_dir << " at step " << start_step << "\n";
    }
    dist->broadcast_(params);  // every rank starts from rank 0's parameters

    LoaderOptions lo;
    lo.sampler = so;
    lo.prefetch = static_cast<int>(c.data_prefetch);
    Loader loader(data.train, lo, cursor);

    std::unique_ptr<MetricsLog> metrics;
    if (main_rank) {
      make_dirs(c.out_dir);
      metrics = std::make_unique<MetricsLog>(c.out_dir + "/metrics.jsonl", start_step);
    }
    ProgressLine progress(start_step, c.steps, main_rank ? progress_mode(c.progress) : ProgressMode::Never);

    // The held-out check: KL(full cache || cache evicted to M per head by the component's scores) on val text.
    // (A responses file's val sequences are scored over all their tokens, prompts included.)
    std::optional<TrainData> val_data;
    if (main_rank && c.eval_every > 0 && !c.data_val.empty()) val_data = open_train_data(c.data_val, "data.val", tokenizer, c);
    auto heldout = [&](int64_t step) {
      if (!main_rank) return;
      const SequenceSource& val = *(val_data ? *val_data : data).val;
      std::vector<at::Tensor> seqs;         // [i] (1, L_i) for the eviction check
      std::vector<TrainBatch> val_batches;  // the same sequences for the component's own objective
      for (int64_t i = 0; i < std::min<int64_t>(val.size(), c.eval_batches * c.batch_size); ++i) {
        const Batch one = read_sequences(val, {i}, val.seq_len(), 0);
        val_batches.push_back(make_train_batch(one, device));
        seqs.push_back(val_batches.back().ids.narrow(1, 0, one.lengths[0]));  // (1, L)
      }
      if (seqs.empty()) {
        progress.message("held-out check skipped: no val sequences (prepare text with --val-fraction > 0, or for a responses file raise data.val_fraction)");
        return;
      }
      torch::NoGradGuard ng;
      std::unique_ptr<Scorer> scorer = component->make_scorer();
      HeldoutOptions ho;
      ho.budget = eval_budget;
      // A scorer that needs the whole forward first (query rows) compresses a prompt once; the others are held
      // at M after every chunk.
      if (scorer->needs().timing == ScoreTiming::AfterForward) ho.mode = HeldoutMode::Once;
      const HeldoutResult r = heldout_kl(model, seqs, *scorer, ho);
      std::ostringstream os;
      os << "held-out KL at step " << step << " (M=" << eval_budget << "): " << r.kl << " nats/token over " << r.tokens
         << " tokens";
      progress.message(os.str());
      nlohmann::ordered_json rec = {{"step", step}, {"heldout_kl", r.kl}, {"heldout_tokens", r.tokens}, {"budget", eval_budget}};
      // The component's own objective on the same sequences (its terms and metrics, e.g. the Attention-Gate's
      // kept fraction), as "val_<name>".
      std::map<std::string, double> val_terms;
      std::vector<std::string> val_order;
      for (const TrainBatch& tb : val_batches) {
        const StepLosses l = micro_step_loss(model, *component, tb, c, step);
        for (const auto& [k, v] : l.terms) {
          if (!val_terms.count(k)) val_order.push_back(k);
          val_terms[k] += v / static_cast<double>(val_batches.size());
        }
      }
      std::ostringstream vs;
      for (const std::string& k : val_order) {
        rec["val_" + k] = val_terms[k];
        vs << " " << k << "=" << val_terms[k];
      }
      if (!val_order.empty()) progress.message("held-out objective at step " + std::to_string(step) + ":" + vs.str());
      metrics->write(rec);
    };

    const int64_t bucket_bytes = static_cast<int64_t>(c.bucket_mb * 1048576.0);
    const PoisonHook poison = poison_hook_from_env();
    const auto named_params = component->named_parameters();
    TrainResult result;
    result.first_step = start_step;
    result.steps_done = start_step;  // a run resumed from its last checkpoint still writes the bundle
    std::string last_ckpt = resume_dir;
    if (c.eval_every > 0 && start_step == 0) heldout(0);

    // ---- the loop ----------------------------------------------------------------------------------------
    const StopSignals stop_signals;
    for (int64_t step = start_step; step < c.steps; ++step) {
      const auto t0 = std::chrono::steady_clock::now();
      const double lr = lr_at(step, c);
      for (auto& g : optimizer.param_groups()) static_cast<torch::optim::AdamWOptions&>(g.options()).lr(lr);
      optimizer.zero_grad();

      // Forward and backward over grad_accum micro-batches of this rank's shard.
      std::map<std::string, double> terms;
      std::vector<std::string> order;
      double loss = 0;
      int64_t tokens = 0;
      std::vector<double> stats;  // ComponentLoss::stats, averaged over the micro-batches
      for (int64_t micro = 0; micro < c.grad_accum; ++micro) {
        ProfileLap lap(device, "step ");
        const TrainBatch tb = make_train_batch(loader.next(), device);
        lap("batch");
        StepLosses l = micro_step_loss(model, *component, tb, c, step);
        if (poison.step == step + 1 && poison.what != "grad") {  // test hook: a poisoned loss term
          for (auto& [k, v] : l.terms)
            if (k == poison.what) v = poison.value, l.total = l.total + poison.value;
        }
        lap("loss forwards");
        (l.total / static_cast<double>(c.grad_accum)).backward();
        lap("backward");
        if (poison.step == step + 1 && micro == 0 && (poison.what == "sigterm" || poison.what == "sigint"))
          std::raise(poison.what == "sigterm" ? SIGTERM : SIGINT);  // test hook: a signal in mid-step
        if (poison.step == step + 1 && poison.what == "grad" && !params.empty())  // test hook: a poisoned gradient
          params[0].mutable_grad().fill_(poison.value);
        loss += l.total.item<double>() / static_cast<double>(c.grad_accum);
        for (auto& [k, v] : l.terms) {
          if (!terms.count(k)) order.push_back(k);
          terms[k] += v / static_cast<double>(c.grad_accum);
        }
        tokens += l.tokens;
        if (stats.empty()) stats.assign(l.stats.size(), 0.0);
        KVD_CHECK(stats.size() == l.stats.size(), "component ", component->kind(), " returned ", l.stats.size(),
                  " stats after ", stats.size(), " in the same step");
        for (size_t i = 0; i < stats.size(); ++i) stats[i] += l.stats[i] / static_cast<double>(c.grad_accum);
      }

      // Average gradients and the logged values over ranks.
      dist->average_grads_(params, bucket_bytes);
      const int64_t n_terms = static_cast<int64_t>(order.size()), n_stats = static_cast<int64_t>(stats.size());
      // loss, terms, tokens, stats, stop signal
      at::Tensor logged = torch::zeros({n_terms + 3 + n_stats}, torch::kFloat64);
      logged[0] = loss;
      logged[n_terms + 2 + n_stats] = static_cast<double>(StopSignals::caught());
      for (int64_t i = 0; i < n_terms; ++i) logged[i + 1] = terms[order[i]];
      logged[n_terms + 1] = static_cast<double>(tokens);
      for (int64_t i = 0; i < n_stats; ++i) logged[n_terms + 2 + i] = stats[i];
      if (backend == CollectiveBackend::Nccl) logged = logged.to(device);
      dist->sum_(logged, "loss values");
      logged = logged.cpu();
      const double W = ranks.world_size;
      loss = logged[0].item<double>() / W;
      std::vector<std::pair<std::string, double>> term_values;
      for (size_t i = 0; i < order.size(); ++i) term_values.emplace_back(order[i], logged[static_cast<int64_t>(i) + 1].item<double>() / W);
      const int64_t global_tokens = static_cast<int64_t>(logged[n_terms + 1].item<double>());
      for (int64_t i = 0; i < n_stats; ++i) stats[i] = logged[n_terms + 2 + i].item<double>() / W;
      // Every rank stops at the same step when any rank was signalled.
      const bool stop = logged[n_terms + 2 + n_stats].item<double>() > 0;

      // Clip, and refuse to step on a non-finite loss or gradient (the same decision on every rank: the
      // gradients and the loss were all-reduced).
      double grad_norm = 0;
      if (c.clip > 0) {
        grad_norm = torch::nn::utils::clip_grad_norm_(params, c.clip);
      } else {
        double sq = 0;
        for (const at::Tensor& p : params) sq += p.grad().to(torch::kFloat64).pow(2).sum().item<double>();
        grad_norm = std::sqrt(sq);
      }
      // Which value went bad, named: the first non-finite loss term, else the first parameter whose
      // gradient is non-finite.
      std::string nonfinite;
      for (const auto& [k, v] : term_values)
        if (nonfinite.empty() && !std::isfinite(v)) nonfinite = "loss term '" + k + "' is " + nonfinite_name(v);
      if (nonfinite.empty() && !std::isfinite(loss)) nonfinite = "the loss is " + nonfinite_name(loss);
      if (nonfinite.empty() && !std::isfinite(grad_norm)) {
        for (const auto& p : named_params)
          if (nonfinite.empty() && p.value().grad().defined() && !all_finite({p.value().grad()}))
            nonfinite = "the gradient of '" + p.key() + "' is not finite";
        if (nonfinite.empty()) nonfinite = "the gradient norm is " + nonfinite_name(grad_norm);
      }
      const int64_t done = step + 1;
      if (!nonfinite.empty() && c.on_nonfinite == NonFinite::Stop) {
        KVD_FAIL("step ", done, ": ", nonfinite, " (", fmt_terms(term_values), " ); nothing of this step was applied or saved",
                 last_ckpt.empty() ? std::string("") : "; the last good checkpoint is " + last_ckpt,
                 "; lower train.lr, raise train.warmup or check data.train (or set train.on_nonfinite=skip)");
      }
      if (!nonfinite.empty()) {  // NonFinite::Skip: parameters and optimizer state stay as they were
        optimizer.zero_grad();
        ++result.skipped_steps;
        progress.message("step " + std::to_string(done) + " skipped: " + nonfinite + " (train.on_nonfinite=skip)");
        if (main_rank) metrics->write({{"step", done}, {"skipped", nonfinite}});
      } else {
        ProfileLap lap(device, "step ");
        optimizer.step();
        component->end_step(step, stats);
        lap("optimizer");
      }
      const double step_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const double tok_s = global_tokens / std::max(step_s, 1e-9);
      result.steps_done = done;
      result.last_loss = loss;

      // ---- once in a while: log ---------------------------------------------------------------------
      if (main_rank && nonfinite.empty()) {
        nlohmann::ordered_json rec = {{"step", done}, {"loss", loss}};
        for (const auto& [k, v] : term_values) rec[k] = v;
        rec["lr"] = lr;
        rec["grad_norm"] = grad_norm;
        rec["tokens"] = global_tokens;
        rec["tokens_per_s"] = tok_s;
        rec["step_s"] = step_s;
        rec["rss_mb"] = rss_mib();
        rec["cuda_max_alloc_mb"] = cuda_max_allocated_mib();
        rec["world_size"] = ranks.world_size;
        metrics->write(rec);
        if (done % c.log_every == 0 || done == c.steps) {
          char extra[64];
          std::snprintf(extra, sizeof extra, "  lr %.2e  |g| %.3g", lr, grad_norm);
          progress.update(done, loss, tok_s, extra);
        }
      }

      // ---- after the last step: the component fits what it calibrates on training sequences (rank 0, which
      // writes the bundle), before the last held-out check and checkpoint, so both hold the fitted part ------
      if (main_rank && done == c.steps && c.calibration_sequences > 0) {
        const int64_t n = std::min<int64_t>(c.calibration_sequences, train_split.size());
        const std::vector<TrainBatch> calib = spread_batches(train_split, n, c.batch_size, device);
        const nlohmann::json cal = component->calibrate(model, calib, loss_options(c, step));
        if (!cal.is_null()) {
          progress.message("calibrated on " + std::to_string(n) + " training sequences: " + calibration_summary(cal));
          metrics->write({{"step", done}, {"calibration", cal}, {"calibration_sequences", n}});
        }
      }

      // ---- once in a while: held-out check -------------------------------------------------------------
      if (!stop && c.eval_every > 0 && (done % c.eval_every == 0 || done == c.steps)) heldout(done);

      // ---- once in a while: checkpoint (rank 0 writes; the loss was finite) -------------------------------
      if ((c.save_every > 0 && done % c.save_every == 0) || done == c.steps || stop) {
        if (main_rank) {
          // Never a poisoned checkpoint: a non-finite weight here would be a bug above, refused all the same.
          KVD_CHECK(all_finite(params), "step ", done, ": the component's weights are not finite; no checkpoint was "
                    "written", last_ckpt.empty() ? std::string("") : "; the last good checkpoint is " + last_ckpt);
          CheckpointMeta meta;
          meta.step = done;
          meta.cursor = cursor_to_json(loader.cursor(), plan);
          meta.config = c.values;
          meta.identity = identity;
          meta.world_size = ranks.world_size;
          try {
            last_ckpt = save_training_checkpoint(ckpt_root, meta, *component, optimizer, c.keep_last);
          } catch (const std::exception& e) {
            KVD_FAIL(e.what(), last_ckpt.empty() ? std::string("; no earlier checkpoint exists")
                                                 : "; the previous checkpoint " + last_ckpt +
                                                       " is intact and `--resume auto` continues from it");
          }
          result.last_checkpoint = last_ckpt;
          progress.message("saved " + last_ckpt);
        }
      }
      if (stop && done < c.steps) {
        result.stop_signal = StopSignals::caught() ? StopSignals::caught() : SIGTERM;  // SIGTERM: a peer's
        break;
      }
    }
    progress.finish();

    // ---- the trained part as a gate bundle ------------------------------------------------------------------
    if (main_rank && result.steps_done == c.steps) {
      KVD_CHECK(all_finite(params), "the component's weights are not finite; no gate bundle was written");
      save_gate_bundle(c.out_dir + "/bundle", *component, base);
      std::cout << "gate bundle: " << c.out_dir << "/bundle\n";
    }
    dist->barrier();
    return result;
  } catch (const std::exception& e) {
    // Tell the other ranks why, abort the process group, and keep it from being torn down normally (its
    // destructor may wait on peers that are gone): the caller exits.
    if (ranks.world_size > 1) {
      dist->fail(e.what());
      dist.release();
    }
    throw;
  }
}

}  // namespace kvd
