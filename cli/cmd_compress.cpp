// kvdistill compress --model DIR --prompt-file F --method NAME (--ratio R | --budget-tokens N | --threshold S)
//                    --out kept.json
//                    [--chunk-size N] [--device cpu|cuda]
// Prefills the prompt, compresses the KV cache with one method (once after prefill, or after every prefill
// chunk of N tokens with --chunk-size), and writes the kept positions per layer and KV head (ascending) plus
// the byte counts:
//   {"method", "ratio" | "budget_tokens" | "threshold", "chunk_size", "tokens", "layers": [[[pos, ...] per KV head] per layer],
//    "bytes": {...}}
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <cmath>
#include <fstream>
#include <iostream>
#include <iterator>

#include <torch/torch.h>

#include "cli/commands.h"
#include "cli/common.h"
#include "common/error.h"
#include "common/fs.h"
#include "export/gate_bundle.h"
#include "gates/registry.h"
#include "gates/compress.h"
#include "models/kv_cache.h"
#include "models/model.h"
#include "models/tokenizer.h"

namespace kvd::cli {
namespace {

struct CompressArgs {
  std::string model, prompt_file, method, out, device = "cpu";
  std::string kernels = "fused";
  double ratio = 0.5;
  int64_t budget_tokens = 0;  // tokens per KV head instead of --ratio (when use_tokens)
  bool use_tokens = false;
  double threshold = 0.0;     // keep entries scoring >= this instead (when use_threshold)
  bool use_threshold = false;
  int64_t chunk_size = 0;
  uint64_t seed = 0;
};

int run(const CompressArgs& a) {
  // Validate the cheap arguments before loading anything.
  KVD_CHECK(a.use_tokens || a.use_threshold || (std::isfinite(a.ratio) && a.ratio >= 0.0 && a.ratio < 1.0),
            "--ratio must lie in [0, 1) (the fraction of tokens removed, as in kvpress), got ", a.ratio);
  const Budget budget = a.use_threshold ? Budget::threshold(a.threshold)
                        : a.use_tokens  ? Budget{BudgetKind::TokensPerHead, static_cast<double>(a.budget_tokens)}
                                        : Budget::ratio(a.ratio);
  MethodContext ctx;
  ctx.seed = a.seed;
  ctx.model_dir = a.model;
  ctx.learned_mode = LearnedMode::Once;  // compress: the prompt, compressed once (or per --chunk-size)
  const bool learned = a.method.find(':') != std::string::npos || a.method == "gate-untrained";
  if (!learned) resolve_method(a.method, budget, ctx);
  KVD_CHECK(a.chunk_size >= 0, "--chunk-size must be >= 0 (0: compress once after the whole prefill), got ",
            a.chunk_size);
  std::ifstream in(a.prompt_file, std::ios::binary);
  KVD_CHECK(in.good(), "--prompt-file ", a.prompt_file, ": cannot be read");
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const c10::Device device = parse_device(a.device);
  const Tokenizer tok = Tokenizer::from_file(a.model);
  const std::vector<int32_t> ids32 = tok.encode(text);
  KVD_CHECK(!ids32.empty(), "--prompt-file ", a.prompt_file, ": encodes to no tokens");
  Model model = Model::load(a.model, device);
  ctx.model = &model;
  const BaseModelInfo base = base_model_info(a.model);
  ctx.load_bundle = [&](const std::string& dir) { return load_component(dir, model, base); };
  ResolvedMethod rm = resolve_method(a.method, budget, ctx);
  KVD_CHECK(!rm.full && !rm.decode, "--method ", a.method, ": compress runs prefill methods; ", a.method,
            rm.full ? " keeps everything" : " evicts while decoding (use it with kvdistill eval)");
  Method& method = rm.method;
  const std::vector<std::vector<int64_t>> prompts{std::vector<int64_t>(ids32.begin(), ids32.end())};
  KVCache cache = model.new_cache(1);
  CompressOptions copts;
  copts.chunk_size = a.chunk_size;
  copts.kernels = a.kernels == "reference" ? KernelPath::Reference : KernelPath::Fused;
  const CompressStats st = compress_prefill(model, cache, prompts, method, copts);

  nlohmann::json layers = nlohmann::json::array();
  for (int64_t l = 0; l < cache.num_layers(); ++l) {
    const KVLayerView v = cache.layer(l);
    at::Tensor pos = v.pos.to(torch::kCPU);  // (1, H_kv, n)
    nlohmann::json heads = nlohmann::json::array();
    for (int64_t h = 0; h < cache.num_kv_heads(); ++h) {
      const int64_t len = cache.length(l, 0, h);
      at::Tensor p = std::get<0>(pos[0][h].narrow(0, 0, len).sort());  // (len) ascending
      heads.push_back(std::vector<int64_t>(p.data_ptr<int64_t>(), p.data_ptr<int64_t>() + len));
    }
    layers.push_back(heads);
  }
  nlohmann::json j = {{"method", a.method},
                      {"chunk_size", a.chunk_size},
                      {"tokens", st.tokens},
                      {"layers", layers},
                      {"bytes",
                       {{"full", st.full_bytes},
                        {"kept", st.kept_bytes},
                        {"peak", st.peak_bytes},
                        {"allocated", st.allocated_bytes},
                        {"per_entry", cache.bytes_per_entry()}}}};
  if (a.use_threshold)
    j["threshold"] = a.threshold;
  else if (a.use_tokens)
    j["budget_tokens"] = a.budget_tokens;
  else
    j["ratio"] = a.ratio;
  write_file_atomic(a.out, j.dump() + "\n");
  std::cerr << a.method << (a.use_threshold ? " threshold=" + std::to_string(a.threshold)
                            : a.use_tokens  ? " tokens/head=" + std::to_string(a.budget_tokens)
                                            : " r=" + std::to_string(a.ratio))
            << ": " << st.tokens << " tokens, kept " << st.kept_bytes << " of "
            << st.full_bytes << " KV bytes (" << (100.0 * st.kept_bytes / std::max<int64_t>(1, st.full_bytes))
            << "%), peak " << st.peak_bytes << ", allocated " << st.allocated_bytes << "\n";
  return 0;
}

Registration reg([](CLI::App& root) {
  auto a = std::make_shared<CompressArgs>();
  CLI::App* sub = root.add_subcommand("compress", "Compress a prompt's KV cache with one method; dump the kept positions");
  sub->add_option("--model", a->model, "Model directory")->required();
  sub->add_option("--prompt-file", a->prompt_file, "Text file with the prompt (encoded as is, no chat template)")
      ->required();
  sub->add_option("--method", a->method,
                  "snapkv, tova, knorm, ... (adakv_<m>, criticalkv_<m>, global_<m>), gate:<bundle dir>")
      ->required();
  CLI::Option* ratio =
      sub->add_option("--ratio", a->ratio, "Fraction of tokens removed, in [0, 1) (kvpress compression_ratio)");
  CLI::Option* tokens =
      sub->add_option("--budget-tokens", a->budget_tokens, "Entries kept per KV head (instead of --ratio)");
  CLI::Option* threshold = sub->add_option(
      "--threshold", a->threshold,
      "Keep every entry whose score is >= S, each head its own count (e.g. attngate:<dir> --threshold 0.5: its flags)");
  ratio->excludes(tokens)->excludes(threshold);
  tokens->excludes(ratio)->excludes(threshold);
  threshold->excludes(ratio)->excludes(tokens);
  sub->add_option("--kernels", a->kernels,
                  "Scoring on CUDA: fused (the fused kernels where they apply) or reference (LibTorch ops; what CPU "
                  "runs use)")
      ->check(CLI::IsMember({"fused", "reference"}))
      ->capture_default_str();
  sub->add_option("--chunk-size", a->chunk_size,
                  "0: compress once after prefill; N > 0: prefill N tokens at a time and compress after each chunk "
                  "(budget applied to the tokens so far)")
      ->capture_default_str();
  sub->add_option("--out", a->out, "Output JSON")->required();
  sub->add_option("--seed", a->seed, "Seed of the random method")->capture_default_str();
  sub->add_option("--device", a->device, "cpu | cuda | cuda:N")->capture_default_str();
  on_run(sub, [a, ratio, tokens, threshold] {
    KVD_CHECK(ratio->count() + tokens->count() + threshold->count() == 1,
              "compress: give exactly one of --ratio R, --budget-tokens N or --threshold S");
    a->use_tokens = tokens->count() > 0;
    a->use_threshold = threshold->count() > 0;
    return run(*a);
  });
});

}  // namespace
}  // namespace kvd::cli
