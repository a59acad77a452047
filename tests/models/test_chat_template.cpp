// Chat templates vs jinja2 (transformers' renderer), golden files from tests/oracles/tokenizer_golden.py.
#include "models/chat_template.h"

#include <gtest/gtest.h>

#include <ctime>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/fs.h"
#include "test_paths.h"

namespace kvd {
namespace {

using json = nlohmann::json;

const std::string kDir = std::string(KVD_TESTDATA) + "/tokenizer_golden/chat";

const json& golden() {
  static const json g = json::parse(read_file(kDir + "/golden.json"));
  return g;
}

std::vector<ChatMessage> conversation(size_t i) {
  std::vector<ChatMessage> out;
  for (const json& m : golden()["conversations"][i]) out.push_back({m["role"], m["content"]});
  return out;
}

const json& entry(const std::string& name) {
  for (const json& t : golden()["templates"])
    if (t["name"] == name) return t;
  throw std::runtime_error("no golden template " + name);
}

// Today as strftime("%d %b %Y") in the C locale (what the oracle's strftime_now gave on its day).
std::string today() {
  const std::time_t now = std::time(nullptr);
  char buf[64];
  std::strftime(buf, sizeof buf, "%d %b %Y", std::localtime(&now));
  return buf;
}

std::string replace_all(std::string s, const std::string& from, const std::string& to) {
  for (size_t p = s.find(from); p != std::string::npos; p = s.find(from, p + to.size())) s.replace(p, from.size(), to);
  return s;
}

TEST(ChatTemplateGolden, RendersEqualJinjaByteForByte) {
  size_t checked = 0;
  const std::string oracle_day = "Today Date: " + golden()["today"].get<std::string>() + "\n";
  for (const json& t : golden()["templates"]) {
    const std::string name = t["name"];
    const ChatTemplate ct = ChatTemplate::from_file(t["config"].get<std::string>());
    for (const json& r : t["renders"]) {
      const size_t i = r["conversation"];
      const auto add = r["add_generation_prompt"].get<bool>() ? AddGenerationPrompt::Yes : AddGenerationPrompt::No;
      std::string want = r["text"];
      if (name == "llama3.2") want = replace_all(want, oracle_day, "Today Date: " + today() + "\n");
      EXPECT_EQ(ct.render(conversation(i), add), want)
          << name << ", conversation " << i << ", add_generation_prompt " << r["add_generation_prompt"];
      ++checked;
    }
  }
  EXPECT_GE(checked, 6u * 2 * golden()["conversations"].size());
}

TEST(ChatTemplateGolden, DetectsFormatAndDefaultSystem) {
  const ChatTemplate smol = ChatTemplate::from_file(entry("smollm2_gguf")["config"].get<std::string>());
  EXPECT_EQ(smol.format(), ChatFormat::ChatML);
  EXPECT_EQ(smol.default_system(),
            std::optional<std::string>("You are a helpful AI assistant named SmolLM, trained by Hugging Face"));
  EXPECT_EQ(smol.end_of_turn(), "<|im_end|>");
  EXPECT_EQ(smol.bos_token(), "<|im_start|>");
  EXPECT_EQ(smol.eos_token(), "<|im_end|>");

  const ChatTemplate qwen25 = ChatTemplate::from_file(entry("qwen2.5")["config"].get<std::string>());
  EXPECT_EQ(qwen25.default_system(),
            std::optional<std::string>("You are Qwen, created by Alibaba Cloud. You are a helpful assistant."));
  EXPECT_EQ(qwen25.bos_token(), "");

  const ChatTemplate qwen3 = ChatTemplate::from_file(entry("qwen3")["config"].get<std::string>());
  EXPECT_FALSE(qwen3.default_system().has_value());
  EXPECT_EQ(qwen3.eos_token(), "<|im_end|>");  // given as {"content": ...}

  const ChatTemplate llama31 = ChatTemplate::from_file(entry("llama3.1")["config"].get<std::string>());
  EXPECT_EQ(llama31.format(), ChatFormat::Llama3);
  EXPECT_EQ(llama31.render({{"user", "Hi"}}, AddGenerationPrompt::No),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December "
            "2023\nToday Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>");

  const ChatTemplate llama = ChatTemplate::from_file(entry("llama3")["config"].get<std::string>());
  EXPECT_EQ(llama.format(), ChatFormat::Llama3);
  EXPECT_EQ(llama.end_of_turn(), "<|eot_id|>");
  EXPECT_EQ(llama.render({{"user", "Hi"}}, AddGenerationPrompt::Yes),
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
}

TEST(ChatTemplateGolden, ModelDirectoryConfig) {
  if (!std::filesystem::exists(std::string(KVD_MODEL_DIR) + "/tokenizer_config.json"))
    GTEST_SKIP() << KVD_MODEL_DIR << " has no tokenizer_config.json yet (run `kvdistill convert`)";
  const ChatTemplate ct = ChatTemplate::from_file(KVD_MODEL_DIR);
  EXPECT_EQ(ct.format(), ChatFormat::ChatML);
  EXPECT_EQ(ct.render({{"user", "Hi"}}, AddGenerationPrompt::Yes),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
}

class ChatTemplateErrors : public ::testing::Test {
 protected:
  void expect_error(const std::string& tpl, const std::string& what) {
    try {
      ChatTemplate::from_template(tpl, "<s>", "</s>", "ctx.json");
      ADD_FAILURE() << "no error for template " << tpl;
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("ctx.json"), std::string::npos) << msg;
      EXPECT_NE(msg.find(what), std::string::npos) << msg;
    }
  }
};

TEST_F(ChatTemplateErrors, UnrecognizedTemplatesSuggestRawPrompts) {
  // Mistral / Llama-2 style.
  expect_error("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
               "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}"
               "{% endif %}{% endfor %}",
               "--no-chat");
  expect_error("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}",
               "generation prompt");
  // A Llama-3.1-like template without its "Today Date: " line.
  expect_error("{{- bos_token }}{%- if not date_string is defined %}{%- set date_string = \"26 Jul 2024\" %}"
               "{%- endif %}{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}"
               "{{- \"Cutting Knowledge Date: December 2023\\n\" }}{{- \"<|eot_id|>\" }}"
               "{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
               "'<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
               "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
               "{%- endif %}",
               "Llama-3.1+");
  expect_error("{{ 'unterminated }}", "unterminated");
  expect_error("{% for m in messages ", "unclosed");
}

TEST(ChatTemplateUsage, BadMessagesAndConfigs) {
  const ChatTemplate ct = ChatTemplate::from_file(entry("smollm2_gguf")["config"].get<std::string>());
  EXPECT_THROW(ct.render({}, AddGenerationPrompt::Yes), Error);
  EXPECT_THROW(ct.render({{"tool", "x"}}, AddGenerationPrompt::Yes), Error);

  const auto dir = std::filesystem::temp_directory_path() / ("kvd_chat_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const std::string p = (dir / "tokenizer_config.json").string();
  std::ofstream(p) << R"({"bos_token": "<s>", "eos_token": "</s>"})";
  try {
    ChatTemplate::from_file(dir.string());
    ADD_FAILURE() << "config without chat_template loaded";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("--no-chat"), std::string::npos) << e.what();
  }
  std::ofstream(p) << R"({"chat_template": "{{ x )";
  EXPECT_THROW(ChatTemplate::from_file(p), Error);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace kvd
