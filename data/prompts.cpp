#include "data/prompts.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <optional>
#include <sstream>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/fs.h"
#include "data/random.h"
#include "data/text_input.h"
#include "models/tokenizer.h"

namespace kvd {

using json = nlohmann::json;

namespace {

bool blank(const std::string& s) {
  return std::all_of(s.begin(), s.end(), [](unsigned char c) { return std::isspace(c) != 0; });
}

std::vector<std::string> split_words(const std::string& s) {
  std::vector<std::string> w;
  std::istringstream is(s);
  std::string t;
  while (is >> t) w.push_back(t);
  return w;
}

std::string join(const std::vector<std::string>& w, size_t n) {
  std::string s;
  for (size_t i = 0; i < n && i < w.size(); ++i) s += (i ? " " : "") + w[i];
  return s;
}

}  // namespace

std::vector<PromptRecord> read_prompts(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  KVD_CHECK(in.good(), path, ": cannot open the prompts file (", std::strerror(errno), ")");
  std::vector<PromptRecord> out;
  std::string line;
  int64_t n = 0;
  while (std::getline(in, line)) {
    ++n;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (blank(line)) continue;
    const std::string where = path + ":" + std::to_string(n);
    KVD_CHECK(find_invalid_utf8(line) == std::string::npos, where, ": invalid UTF-8; convert the file to UTF-8");
    json j = parse_jsonl_line(line, where);
    KVD_CHECK(j.is_object(), where, ": expected a JSON object with \"prompt\" or \"messages\", found ", j.type_name());
    PromptRecord r;
    r.line = n;
    if (j.contains("prompt")) {
      KVD_CHECK(j["prompt"].is_string(), where, ": \"prompt\" must be a string, found ", j["prompt"].type_name());
      r.messages.push_back({"user", j["prompt"].get<std::string>()});
    } else if (j.contains("messages")) {
      const json& m = j["messages"];
      KVD_CHECK(m.is_array() && !m.empty(), where, ": \"messages\" must be a non-empty list of {role, content}");
      for (size_t k = 0; k < m.size(); ++k) {
        const json& e = m[k];
        KVD_CHECK(e.is_object() && e.contains("role") && e["role"].is_string() && e.contains("content") &&
                      e["content"].is_string(),
                  where, ": messages[", k, "] must be an object with string \"role\" and \"content\"");
        r.messages.push_back({e["role"].get<std::string>(), e["content"].get<std::string>()});
      }
    } else {
      KVD_FAIL(where, ": expected a \"prompt\" string or a \"messages\" list in the object");
    }
    if (j.contains("id"))
      r.id = j["id"].is_string() ? j["id"].get<std::string>() : j["id"].dump();
    else
      r.id = std::to_string(n);
    out.push_back(std::move(r));
  }
  KVD_CHECK(!in.bad(), path, ": read error (", std::strerror(errno), ")");
  KVD_CHECK(!out.empty(), path, ": no prompts in the file; write one {\"prompt\": ...} object per line");
  return out;
}

const std::vector<std::string>& prompt_instructions() {
  static const std::vector<std::string> v = {
      "Summarize the following passage in a few sentences:",
      "Explain what this passage is about to a beginner:",
      "List the key points of this text:",
      "Write three questions a reader could answer from this text:",
      "Rewrite the following passage in plain, simple language:",
      "What is the main idea of this passage? Answer briefly:",
      "Give a one-paragraph explanation of the following text, as if teaching a class:",
      "Identify the most important terms in this passage and define each one:",
  };
  return v;
}

PromptSetStats make_prompt_set(const PromptSetOptions& opt) {
  KVD_CHECK(opt.count > 0, "--count ", opt.count, ": must be positive");
  KVD_CHECK(opt.passage_tokens >= 8, "--passage-tokens ", opt.passage_tokens, ": must be at least 8");
  std::optional<Tokenizer> tok;
  if (!opt.model_dir.empty()) tok = Tokenizer::from_file(opt.model_dir);

  // Candidate passages: whole paragraphs gathered until passage_tokens words (a model token is at most a
  // word in ordinary text, so the passage is then trimmed to passage_tokens tokens below).
  const size_t want_words = static_cast<size_t>(opt.passage_tokens);
  std::vector<std::string> passages;
  DocumentOptions dopt;
  dopt.invalid_utf8 = InvalidUtf8::Replace;
  dopt.chat = [](const std::vector<ChatMessage>& msgs, const std::string&) {
    std::string s;
    for (const ChatMessage& m : msgs) s += (s.empty() ? "" : "\n\n") + m.content;
    return s;
  };
  DocumentReader reader(list_inputs(opt.inputs), dopt);
  Document doc;
  while (reader.next(doc)) {
    std::vector<std::string> words;
    size_t start = 0;
    auto flush = [&](bool last) {
      if (words.size() >= want_words || (last && words.size() >= want_words / 2)) passages.push_back(join(words, want_words));
      words.clear();
    };
    while (start < doc.text.size()) {
      size_t end = doc.text.find("\n\n", start);
      if (end == std::string::npos) end = doc.text.size();
      for (std::string& w : split_words(doc.text.substr(start, end - start))) words.push_back(std::move(w));
      if (words.size() >= want_words) flush(false);
      start = end + 2;
    }
    flush(true);
  }
  KVD_CHECK(static_cast<int64_t>(passages.size()) >= opt.count, "the inputs give ", passages.size(), " passages of ",
            opt.passage_tokens, " words, fewer than --count ", opt.count,
            "; add text, or lower --count or --passage-tokens");

  Rng rng(opt.seed, 0x70726f6d707473ull);  // "prompts"
  std::vector<int64_t> order(passages.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  rng.shuffle(order);
  std::string out;
  for (int64_t k = 0; k < opt.count; ++k) {
    std::string passage = passages[static_cast<size_t>(order[static_cast<size_t>(k)])];
    if (tok) {  // the longest word prefix of at most passage_tokens tokens (binary search on the word count)
      const std::vector<std::string> w = split_words(passage);
      size_t lo = 1, hi = w.size();
      while (lo < hi) {
        const size_t mid = (lo + hi + 1) / 2;
        if (static_cast<int64_t>(tok->encode(join(w, mid)).size()) <= opt.passage_tokens) lo = mid;
        else hi = mid - 1;
      }
      passage = join(w, lo);
    }
    const std::string& instr = rng.pick(prompt_instructions());
    json j = {{"id", "p" + std::to_string(k)}, {"prompt", instr + "\n\n" + passage}};
    out += j.dump() + "\n";
  }
  write_file_atomic(opt.out, out);
  return {opt.count, static_cast<int64_t>(passages.size())};
}

}  // namespace kvd
