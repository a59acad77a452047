// kvdistill heldout: the held-out eviction checks of eval/heldout.h as a command, to compare methods at one
// budget on the same validation text, e.g. a trained TRIM-KV gate against StreamingLLM and the untrained gate:
//   kvdistill heldout --model DIR --data val.h5 --budget 128 \
//       --scorers streaming_llm,gate-untrained,gate:runs/trimkv-smollm2/bundle [--mode both] [--device cuda]
// and, with --generate N, the generation-time fidelity of decode-time eviction (the gate against
// streaming_llm_decode, h2o_decode, tova_decode, lazy_eviction):
//   kvdistill heldout ... --generate 128 --prompt 1024 --scorers gate:DIR,streaming_llm_decode,h2o_decode
// Prints one line per method and mode, and optionally writes them as JSON.
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
#include "eval/heldout.h"
#include "export/gate_bundle.h"
#include "gates/registry.h"
#include "models/model.h"
#include "models/tokenizer.h"

namespace kvd::cli {
namespace {

struct HeldoutArgs {
  std::string model, data, scorers = "streaming_llm", device = "cpu", out, mode = "continuous";
  int64_t budget = 128, chunk = 128, sequences = 4, generate = 0, prompt = 1024;
  uint64_t seed = 0;
};

int run(const HeldoutArgs& a) {
  KVD_CHECK(a.budget > 0, "--budget ", a.budget, ": must be positive");
  KVD_CHECK(a.chunk > 0, "--chunk ", a.chunk, ": must be positive");
  KVD_CHECK(a.sequences > 0, "--sequences ", a.sequences, ": must be positive");
  KVD_CHECK(a.generate >= 0 && a.prompt > 0, "--generate must be >= 0 and --prompt > 0");
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

  std::vector<HeldoutMode> modes;
  if (a.mode == "continuous" || a.mode == "both") modes.push_back(HeldoutMode::Continuous);
  if (a.mode == "once" || a.mode == "both") modes.push_back(HeldoutMode::Once);
  MethodContext ctx;
  ctx.model = &model;
  ctx.model_dir = a.model;
  ctx.seed = a.seed;
  const BaseModelInfo base = base_model_info(a.model);
  ctx.load_bundle = [&](const std::string& dir) { return load_component(dir, model, base); };

  nlohmann::json results = nlohmann::json::array();
  std::stringstream specs(a.scorers);
  for (std::string spec; std::getline(specs, spec, ',');) {
    ResolvedMethod m = resolve_method(spec, Budget::tokens(a.budget), ctx);
    KVD_CHECK(!m.full, "--scorers: 'full' is the reference of the check, not a scorer");
    if (a.generate > 0) {
      FidelityOptions fo;
      fo.budget = a.budget;
      fo.prompt = a.prompt;
      fo.new_tokens = a.generate;
      Stopwatch sw;
      const FidelityResult r = generation_fidelity(model, seqs, m, fo);
      std::printf("%s: generation: kl %.5f nats/token, token match %.4f over %lld generated tokens; evicted cache "
                  "peak %.2f MB (%.1f s)\n",
                  spec.c_str(), r.kl, r.match, static_cast<long long>(r.tokens), r.peak_cache_bytes / 1e6, sw.seconds());
      std::fflush(stdout);
      results.push_back({{"scorer", spec}, {"check", "generation"}, {"budget", a.budget}, {"prompt", a.prompt},
                         {"kl", r.kl}, {"match", r.match}, {"tokens", r.tokens}, {"peak_cache_bytes", r.peak_cache_bytes}});
      continue;
    }
    for (HeldoutMode mode : modes) {
      HeldoutOptions ho;
      ho.budget = a.budget;
      ho.chunk = a.chunk;
      ho.mode = mode;
      Stopwatch sw;
      const HeldoutResult r = heldout_kl(model, seqs, *m.method.scorer, ho);
      std::printf("%s (%s): kl %.5f nats/token over %lld tokens; evicted cache peak %.2f MB vs full %.2f MB (%.1f s)\n",
                  spec.c_str(), heldout_mode_name(mode), r.kl, static_cast<long long>(r.tokens),
                  r.peak_cache_bytes / 1e6, r.full_cache_bytes / 1e6, sw.seconds());
      std::fflush(stdout);
      results.push_back({{"scorer", spec}, {"check", "prefill"}, {"mode", heldout_mode_name(mode)}, {"budget", a.budget},
                         {"kl", r.kl}, {"tokens", r.tokens}, {"peak_cache_bytes", r.peak_cache_bytes},
                         {"full_cache_bytes", r.full_cache_bytes}});
    }
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
  sub->add_option("--scorers", a->scorers,
                  "Comma-separated methods: streaming_llm, knorm, ..., gate-untrained, gate:<bundle dir>; with "
                  "--generate also streaming_llm_decode, h2o_decode, tova_decode, lazy_eviction")
      ->capture_default_str();
  sub->add_option("--mode", a->mode,
                  "continuous (evict after every chunk), once (compress the first chunk once), or both")
      ->check(CLI::IsMember({"continuous", "once", "both"}))
      ->capture_default_str();
  sub->add_option("--generate", a->generate,
                  "N > 0: the generation-time check instead (N greedy tokens of the full cache after --prompt "
                  "tokens, teacher-forced through the evicted cache)")
      ->capture_default_str();
  sub->add_option("--prompt", a->prompt, "Prompt tokens of the generation-time check")->capture_default_str();
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
