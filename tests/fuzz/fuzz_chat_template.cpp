// Fuzz target: a tokenizer_config.json (chat_template, bos_token, eos_token), then a conversation
// rendered with the template it yields. After a "\n@@\n" line, the rest is the user message.
#include "models/chat_template.h"
#include "tests/fuzz/fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string path = kvd::fuzz::scratch_path("tokenizer_config.json");
  const auto parts = kvd::fuzz::split2(data, size);
  const std::string_view file = parts.first, message = parts.second;
  kvd::fuzz::write_bytes(path, file);
  kvd::fuzz::expect_clean([&] {
    const kvd::ChatTemplate t = kvd::ChatTemplate::from_file(path);
    std::vector<kvd::ChatMessage> msgs = {{"user", std::string(message)}};
    (void)t.render(msgs, kvd::AddGenerationPrompt::Yes);
    msgs.insert(msgs.begin(), {"system", "Be brief."});
    msgs.push_back({"assistant", std::string(message)});
    (void)t.render(msgs, kvd::AddGenerationPrompt::No);
  });
  return 0;
}
