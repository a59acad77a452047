// kvdistill generate --model DIR --prompt TEXT [--chat] [--max-new-tokens N] [--device cpu|cuda]
// Streams the generated text to stdout; a timing summary goes to stderr.
#include <CLI/CLI.hpp>

#include <cstdio>
#include <iostream>

#include "cli/commands.h"
#include "cli/common.h"
#include "common/error.h"
#include "models/chat_template.h"
#include "models/generate.h"
#include "models/model.h"
#include "models/tokenizer.h"

namespace kvd::cli {
namespace {

struct GenerateArgs {
  std::string model, prompt, system, device = "cpu";
  bool chat = false;
  int64_t max_new_tokens = 128;
  double temperature = 0.0, top_p = 1.0;
  uint64_t seed = 0;
};

int run(const GenerateArgs& a) {
  KVD_CHECK(a.max_new_tokens > 0, "--max-new-tokens ", a.max_new_tokens, ": must be positive");
  KVD_CHECK(a.temperature >= 0, "--temperature ", a.temperature, ": must be >= 0 (0 = greedy)");
  KVD_CHECK(a.top_p > 0 && a.top_p <= 1, "--top-p ", a.top_p, ": must be in (0, 1]");
  KVD_CHECK(a.system.empty() || a.chat, "--system needs --chat");
  const c10::Device device = parse_device(a.device);
  const Tokenizer tok = Tokenizer::from_file(a.model);

  std::string text = a.prompt;
  if (a.chat) {
    const ChatTemplate chat = ChatTemplate::from_file(a.model);
    std::vector<ChatMessage> messages;
    if (!a.system.empty()) messages.push_back({"system", a.system});
    messages.push_back({"user", a.prompt});
    text = chat.render(messages, AddGenerationPrompt::Yes);
  }
  const std::vector<int32_t> ids32 = tok.encode(text);
  KVD_CHECK(!ids32.empty(), "--prompt: encodes to no tokens");
  Model model = Model::load(a.model, device);

  GenerateOptions opts;
  opts.mode = a.temperature > 0 ? SamplingMode::Sample : SamplingMode::Greedy;
  opts.temperature = a.temperature > 0 ? a.temperature : 1.0;
  opts.top_p = a.top_p;
  opts.seed = a.seed;
  opts.max_new_tokens = a.max_new_tokens;
  Detokenizer detok(tok, SkipSpecial::Yes);
  opts.on_token = [&](int64_t t) {
    std::fputs(detok.push(static_cast<int32_t>(t)).c_str(), stdout);
    std::fflush(stdout);
  };
  const GenerateResult r = generate(model, std::vector<int64_t>(ids32.begin(), ids32.end()), opts);
  std::fputs(detok.flush().c_str(), stdout);
  std::fputs("\n", stdout);
  const int64_t steps = static_cast<int64_t>(r.tokens.size()) - 1;
  std::fprintf(stderr, "[generate] %lld prompt tokens, %zu new (%s); prefill %.0f tok/s, decode %.1f tok/s; peak KV %.2f MB\n",
               static_cast<long long>(r.prompt_tokens), r.tokens.size(), r.stop == StopReason::Eos ? "eos" : "max tokens",
               r.prompt_tokens / std::max(r.prefill_seconds, 1e-9),
               steps > 0 ? steps / std::max(r.decode_seconds, 1e-9) : 0.0, r.peak_kv_bytes / 1e6);
  return 0;
}

Registration reg([](CLI::App& root) {
  auto a = std::make_shared<GenerateArgs>();
  CLI::App* sub = root.add_subcommand("generate", "Generate text from a prompt (greedy, or sampled with --temperature)");
  sub->add_option("--model", a->model, "Model directory")->required();
  sub->add_option("--prompt", a->prompt, "Prompt text")->required();
  sub->add_flag("--chat", a->chat, "Wrap the prompt in the model's chat template (tokenizer_config.json)");
  sub->add_option("--system", a->system, "System message for --chat (default: the template's own)");
  sub->add_option("--max-new-tokens", a->max_new_tokens, "Stop after this many new tokens")->capture_default_str();
  sub->add_option("--temperature", a->temperature, "0 = greedy; > 0 samples")->capture_default_str();
  sub->add_option("--top-p", a->top_p, "Nucleus sampling mass (with --temperature)")->capture_default_str();
  sub->add_option("--seed", a->seed, "Sampling seed")->capture_default_str();
  sub->add_option("--device", a->device, "cpu | cuda | cuda:N")->capture_default_str();
  on_run(sub, [a] { return run(*a); });
});

}  // namespace
}  // namespace kvd::cli
