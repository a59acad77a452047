// Helpers shared by the data/ GoogleTests: a scratch directory and a tiny byte-level BPE tokenizer that
// needs no model download (256 byte tokens, a few merges, <|endoftext|>), so the data tests run on
// any machine.
#pragma once

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include <nlohmann/json.hpp>

namespace kvd::testing {

namespace fs = std::filesystem;

// A fresh directory under the system temp dir, removed at destruction.
struct ScratchDir {
  fs::path path;
  explicit ScratchDir(const std::string& name) {
    path = fs::temp_directory_path() / ("kvd_" + name + "_" + std::to_string(::getpid()));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~ScratchDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string operator/(const std::string& f) const { return (path / f).string(); }
};

inline void write_text(const std::string& path, const std::string& text) {
  fs::create_directories(fs::path(path).parent_path());
  std::ofstream(path, std::ios::binary) << text;
}

// GPT-2's byte -> printable code point map, as UTF-8.
inline std::string byte_token(int b) {
  int cp = b;
  const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
  if (!printable) {
    int n = 0;
    for (int x = 0; x < b; ++x) {
      const bool p = (x >= 33 && x <= 126) || (x >= 161 && x <= 172) || (x >= 174 && x <= 255);
      if (!p) ++n;
    }
    cp = 256 + n;
  }
  std::string s;
  if (cp < 0x80) {
    s += static_cast<char>(cp);
  } else {
    s += static_cast<char>(0xC0 | (cp >> 6));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  }
  return s;
}

// A model directory holding only tokenizer.json (+ a ChatML tokenizer_config.json). Ids: bytes 0..255,
// merges 256.., <|endoftext|> = 270, <|im_start|> = 271, <|im_end|> = 272.
inline std::string write_tiny_model(const std::string& dir, const std::string& salt = "") {
  using json = nlohmann::json;
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[byte_token(b)] = b;
  const std::vector<std::pair<std::string, std::string>> merges = {
      {"Ġ", "t"}, {"h", "e"}, {"Ġt", "he"}, {"i", "n"}, {"Ġ", "a"}, {"e", "r"}, {"o", "n"},
      {"Ġ", "s"}, {"r", "e"}, {"a", "t"}, {"e", "n"}, {"Ġ", "o"}, {"e", "s"}, {"Ġ", "w"}};
  json mlist = json::array();
  int id = 256;
  for (const auto& [a, b] : merges) {
    if (!vocab.contains(a + b)) vocab[a + b] = id++;
    mlist.push_back(a + " " + b);
  }
  auto added = [](int i, const std::string& c) {
    return json{{"id", i}, {"content", c}, {"single_word", false}, {"lstrip", false}, {"rstrip", false},
                {"normalized", false}, {"special", true}};
  };
  json tok = {
      {"version", "1.0"},
      {"truncation", nullptr},
      {"padding", nullptr},
      {"added_tokens", {added(270, "<|endoftext|>"), added(271, "<|im_start|>"), added(272, "<|im_end|>")}},
      {"normalizer", nullptr},
      {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}}},
      {"post_processor", nullptr},
      {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}}},
      {"model",
       {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"continuing_subword_prefix", nullptr},
        {"end_of_word_suffix", nullptr}, {"fuse_unk", false}, {"byte_fallback", false}, {"ignore_merges", false},
        {"vocab", vocab}, {"merges", mlist}}}};
  fs::create_directories(dir);
  write_text(dir + "/tokenizer.json", tok.dump() + salt);
  const std::string tmpl =
      "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
      "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
  json cfg = {{"chat_template", tmpl}, {"bos_token", "<|im_start|>"}, {"eos_token", "<|im_end|>"}};
  write_text(dir + "/tokenizer_config.json", cfg.dump());
  return dir;
}

}  // namespace kvd::testing
