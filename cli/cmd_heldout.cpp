// kvdistill heldout: the held-out eviction check of train/heldout.h as a command, to compare scorers at one
// budget on the same validation text — e.g. a trained TRIM-KV gate against StreamingLLM (4 sinks + recent)
// and against the untrained gate:
//   kvdistill heldout --model DIR --data val.h5 --budget 128 \
//       --scorers streaming_llm,gate-untrained,gate:runs/trimkv-smollm2/bundle [--device cuda]
// Prints one line per scorer, "<scorer>: kl <nats/token> ...", and optionally writes them as JSON.
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <cstdio>
#include <iostream>
#include <memory>
#include <sstream>

#include "cli/commands.h"
#include "cli/common.h"
#include "common/error.h"
#include "common/fs.h"
#include "data/packed_text.h"
#include "export/gate_bundle.h"
#include "gates/heuristics.h"
#include "gates/retention_gate.h"
#include "models/model.h"
#include "models/tokenizer.h"
#include "train/heldout.h"

namespace kvd::cli {
namespace {

struct HeldoutArgs {
  std::string model, data, scorers = "streaming_llm", device = "cpu", out;
  int64_t budget = 128, chunk = 128, sequences = 4;
  uint64_t seed = 0;
};

// "streaming_llm" | "gate-untrained" | "gate:<bundle dir>"; the gate is kept alive next to its scorer.
struct NamedScorer {
  std::string name;
  RetentionGate gate{nullptr};
  std::unique_ptr<Scorer> scorer;
};

NamedScorer make(const std::string& spec, const Model& model, const std::string& model_dir, uint64_t seed) {
  NamedScorer s{spec, RetentionGate{nullptr}, nullptr};
  if (spec == "streaming_llm") {
    s.scorer = std::make_unique<StreamingLLMScorer>(4);
  } else if (spec == "gate-untrained" || spec.rfind("gate:", 0) == 0) {
    s.gate = load_retention_gate(model.config(), model_dir, spec == "gate-untrained" ? "" : spec.substr(5),
                                 model.device(), seed);
    s.scorer = s.gate->make_scorer();
  } else {
    KVD_FAIL("--scorers: unknown scorer '", spec, "' (streaming_llm, gate-untrained, gate:<bundle dir>)");
  }
  return s;
}

int run(const HeldoutArgs& a) {
  KVD_CHECK(a.budget > 0, "--budget ", a.budget, ": must be positive");
  KVD_CHECK(a.chunk > 0, "--chunk ", a.chunk, ": must be positive");
  KVD_CHECK(a.sequences > 0, "--sequences ", a.sequences, ": must be positive");
  const c10::Device device = parse_device(a.device);
  const Tokenizer tok = Tokenizer::from_file(a.model);
  const PackedTextReader data = PackedTextReader::open(a.data, tok);
  Model model = Model::load(a.model, device);
  const PackedSplitReader val = data.split(Split::Val);
  KVD_CHECK(val.size() > 0, a.data, ": no validation sequences (prepare text with --val-fraction > 0)");

  torch::NoGradGuard no_grad;
  std::vector<at::Tensor> seqs;  // [i] (1, L) int64
  for (int64_t i = 0; i < std::min<int64_t>(val.size(), a.sequences); ++i)
    seqs.push_back(torch::tensor(val.get(i).tokens, torch::kInt32).to(torch::kInt64).unsqueeze(0).to(device));
  int64_t tokens = 0;
  for (const auto& s : seqs) tokens += s.size(1);
  std::fprintf(stderr, "heldout: %zu validation sequences (%lld tokens) from %s, budget %lld per (layer, KV head)\n",
               seqs.size(), static_cast<long long>(tokens), a.data.c_str(), static_cast<long long>(a.budget));

  nlohmann::json results = nlohmann::json::array();
  std::stringstream specs(a.scorers);
  for (std::string spec; std::getline(specs, spec, ',');) {
    NamedScorer s = make(spec, model, a.model, a.seed);
    HeldoutOptions ho;
    ho.budget = a.budget;
    ho.chunk = a.chunk;
    Stopwatch sw;
    const HeldoutResult r = heldout_kl(model, seqs, *s.scorer, ho);
    std::printf("%s: kl %.5f nats/token over %lld tokens; evicted cache peak %.2f MB vs full %.2f MB (%.1f s)\n",
                spec.c_str(), r.kl, static_cast<long long>(r.tokens), r.peak_cache_bytes / 1e6,
                r.full_cache_bytes / 1e6, sw.seconds());
    std::fflush(stdout);
    results.push_back({{"scorer", spec}, {"budget", a.budget}, {"kl", r.kl}, {"tokens", r.tokens},
                       {"peak_cache_bytes", r.peak_cache_bytes}, {"full_cache_bytes", r.full_cache_bytes}});
  }
  if (!a.out.empty()) write_file_atomic(a.out, results.dump(2) + "\n");
  return 0;
}

Registration reg([](CLI::App& root) {
  auto a = std::make_shared<HeldoutArgs>();
  CLI::App* sub = root.add_subcommand(
      "heldout", "KL to the full cache when the KV cache is evicted to a budget by each scorer, on validation text");
  sub->add_option("--model", a->model, "Model directory")->required();
  sub->add_option("--data", a->data, "Packed text .h5 (kvdistill prepare text); its val split is used")->required();
  sub->add_option("--scorers", a->scorers, "Comma-separated: streaming_llm, gate-untrained, gate:<bundle dir>")
      ->capture_default_str();
  sub->add_option("--budget", a->budget, "M: KV entries kept per (layer, KV head)")->capture_default_str();
  sub->add_option("--chunk", a->chunk, "Prefill chunk; eviction runs after each")->capture_default_str();
  sub->add_option("--sequences", a->sequences, "Validation sequences to use")->capture_default_str();
  sub->add_option("--seed", a->seed, "Seed of the untrained gate's initialization")->capture_default_str();
  sub->add_option("--device", a->device, "cpu | cuda | cuda:N")->capture_default_str();
  sub->add_option("--out", a->out, "Also write the results as JSON here");
  on_run(sub, [a] { return run(*a); });
});

}  // namespace
}  // namespace kvd::cli
