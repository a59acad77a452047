// Chat templates: turning {role, content} messages into the prompt text a chat model was trained on.
//
// Full Jinja is out of scope. The template text of tokenizer_config.json is recognized as one of the
// formats below and rendered natively, byte for byte as transformers' apply_chat_template would:
//   ChatML   templates containing <|im_start|> (SmolLM2, Qwen2 / Qwen2.5, Qwen3):
//              <|im_start|>{role}\n{content}<|im_end|>\n ... [<|im_start|>assistant\n]
//            plus the template's default system message when the first message is not "system"
//            (extracted from the template text: SmolLM2 and Qwen2.5 have one), and Qwen3's handling of
//            <think> blocks in assistant messages (templates that use reasoning_content).
//   Llama3   the Llama-3 header format:
//              {bos}<|start_header_id|>{role}<|end_header_id|>\n\n{content|trim}<|eot_id|> ...
//            and, for Llama-3.1 / 3.2 / 3.3 templates, their system block
//              <|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n
//              Today Date: {date}\n\n{system message|trim}<|eot_id|>
//            where {date} is the template's fixed date_string ("26 Jul 2024") or, for templates that
//            call strftime_now (3.2), today's local date as "%d %b %Y", as transformers renders it.
// Anything else is rejected when loading, with a message suggesting raw prompts (--no-chat).
// Tools, multimodal content and template kwargs (enable_thinking, date_string) are not supported.
#pragma once

#include <optional>
#include <string>
#include <vector>

namespace kvd {

enum class AddGenerationPrompt { No, Yes };
enum class ChatFormat { ChatML, Llama3 };

struct ChatMessage {
  std::string role;  // "system", "user" or "assistant"
  std::string content;
};

class ChatTemplate {
 public:
  // Reads chat_template, bos_token and eos_token (a string, {"content": ...} or null) from a
  // tokenizer_config.json, or from <dir>/tokenizer_config.json when `path` is a directory.
  static ChatTemplate from_file(const std::string& path);
  // From the template text itself (e.g. GGUF's tokenizer.chat_template); `context` names it in errors.
  static ChatTemplate from_template(const std::string& jinja, const std::string& bos_token,
                                    const std::string& eos_token, const std::string& context);

  // The prompt text of `messages` (at least one). With AddGenerationPrompt::Yes it ends with the
  // assistant header, ready for generation. Throws kvd::Error for roles other than
  // system / user / assistant.
  std::string render(const std::vector<ChatMessage>& messages, AddGenerationPrompt add) const;

  ChatFormat format() const { return format_; }
  // The system message the template injects when the conversation has none (ChatML only).
  const std::optional<std::string>& default_system() const { return default_system_; }
  const std::string& bos_token() const { return bos_; }
  const std::string& eos_token() const { return eos_; }
  // The text that closes a turn ("<|im_end|>" or "<|eot_id|>"): a stop string for generation.
  const std::string& end_of_turn() const { return end_of_turn_; }

 private:
  ChatFormat format_ = ChatFormat::ChatML;
  std::string bos_, eos_, end_of_turn_;
  std::optional<std::string> default_system_;
  std::string generation_prompt_;
  bool bos_first_ = false;       // templates starting with {{ bos_token }} (or Llama-3.0's first message)
  bool llama_system_block_ = false;     // Llama-3.1+: the dated system block
  std::string knowledge_cutoff_;        // Llama-3.1+: "Cutting Knowledge Date: December 2023\n"
  std::optional<std::string> fixed_date_;  // Llama-3.1+: the template's date_string; none: today
  bool qwen3_thinking_ = false;  // Qwen3: <think> blocks in assistant turns after the last query
  std::string context_;
};

}  // namespace kvd
