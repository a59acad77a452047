// kvdistill perplexity --model DIR --text FILE [--ctx N]
// Tokenizes the file, cuts it into consecutive windows of N tokens, and scores every token after the first
// of each window given the tokens before it in that window. Last line: "perplexity: <value>".
#include <CLI/CLI.hpp>

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <iostream>

#include "cli/commands.h"
#include "cli/common.h"
#include "common/error.h"
#include "common/fs.h"
#include "models/model.h"
#include "models/tokenizer.h"

namespace kvd::cli {
namespace {

struct PerplexityArgs {
  std::string model, text, device = "cpu";
  int64_t ctx = 1024;
};

int run(const PerplexityArgs& a) {
  KVD_CHECK(a.ctx >= 2, "--ctx ", a.ctx, ": must be at least 2");
  const c10::Device device = parse_device(a.device);
  const Tokenizer tok = Tokenizer::from_file(a.model);
  Model model = Model::load(a.model, device);
  const std::string text = read_file(a.text);
  std::vector<int32_t> ids32 = tok.encode(text);
  KVD_CHECK(ids32.size() >= 2, a.text, ": fewer than 2 tokens; nothing to score");
  const std::vector<int64_t> ids(ids32.begin(), ids32.end());
  const int64_t n = static_cast<int64_t>(ids.size());
  const int64_t windows = (n + a.ctx - 1) / a.ctx;
  constexpr int64_t kRowBlock = 256;  // logits rows at a time: (256, V) float32 instead of (T, V)

  torch::NoGradGuard no_grad;
  Stopwatch sw;
  const bool live = ::isatty(STDERR_FILENO);  // one updating line on a terminal, a line per window otherwise
  double nll = 0;
  int64_t scored = 0;
  for (int64_t w = 0; w < windows; ++w) {
    const int64_t begin = w * a.ctx, T = std::min(a.ctx, n - begin);
    if (T < 2) break;
    at::Tensor x = torch::tensor(std::vector<int64_t>(ids.begin() + begin, ids.begin() + begin + T), torch::kInt64)
                       .view({1, T}).to(device);                                                  // (1, T)
    at::Tensor hidden = model.forward_train(x, sequential_positions(1, T, device)).hidden[0];  // (T, d)
    for (int64_t r = 0; r + 1 < T; r += kRowBlock) {
      const int64_t e = std::min(T - 1, r + kRowBlock);
      at::Tensor logp = torch::log_softmax(model.logits(hidden.slice(0, r, e)).to(torch::kFloat32), -1);  // (e-r, V)
      at::Tensor target = x[0].slice(0, r + 1, e + 1).unsqueeze(1);                                     // (e-r, 1)
      nll -= logp.gather(1, target).sum().item<double>();
    }
    scored += T - 1;
    std::fprintf(stderr, "%s[perplexity] window %lld/%lld, %lld tokens scored, %.0f tok/s, running ppl %.3f%s",
                 live ? "\r" : "", static_cast<long long>(w + 1), static_cast<long long>(windows), static_cast<long long>(scored),
                 scored / std::max(sw.seconds(), 1e-9), std::exp(nll / scored), live ? "" : "\n");
  }
  if (live) std::fprintf(stderr, "\n");
  std::printf("tokens: %lld\nwindows: %lld (ctx %lld)\nmean nll: %.5f\nperplexity: %.4f\n",
              static_cast<long long>(n), static_cast<long long>(windows), static_cast<long long>(a.ctx),
              nll / scored, std::exp(nll / scored));
  return 0;
}

Registration reg([](CLI::App& root) {
  auto a = std::make_shared<PerplexityArgs>();
  CLI::App* sub = root.add_subcommand("perplexity", "Perplexity of the model on a text file");
  sub->add_option("--model", a->model, "Model directory")->required();
  sub->add_option("--text", a->text, "UTF-8 text file")->required();
  sub->add_option("--ctx", a->ctx, "Tokens per window")->capture_default_str();
  sub->add_option("--device", a->device, "cpu | cuda | cuda:N")->capture_default_str();
  on_run(sub, [a] { return run(*a); });
});

}  // namespace
}  // namespace kvd::cli
