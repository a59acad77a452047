// Chat templates (see chat_template.h). The Jinja text is not executed: it is scanned for the string
// literals that make up a known format (the generation prompt, a default system message), and the
// format is rendered natively.
#include "models/chat_template.h"

#include <cstdio>
#include <ctime>
#include <filesystem>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/fs.h"
#include "common/json_error.h"

namespace kvd {
namespace {

using json = nlohmann::json;

constexpr const char* kNoChatHint = "; use raw prompts instead (--no-chat)";

// A piece of template text that ends up in the output verbatim: a string literal inside a {{ }} or
// {% %} tag (unescaped), or raw text between tags.
struct Literal {
  std::string value;
  size_t pos;  // offset in the template
  bool raw;
};

// Python / Jinja string-literal escapes.
std::string unescape(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '\\' || i + 1 == s.size()) {
      out += s[i];
      continue;
    }
    const char e = s[++i];
    switch (e) {
      case 'n': out += '\n'; break;
      case 't': out += '\t'; break;
      case 'r': out += '\r'; break;
      case '\\': out += '\\'; break;
      case '\'': out += '\''; break;
      case '"': out += '"'; break;
      case '\n': break;  // line continuation
      default:
        out += '\\';
        out += e;
    }
  }
  return out;
}

// Splits a Jinja template into raw text and tags, collecting the literals. Throws on an unclosed tag.
std::vector<Literal> scan_literals(const std::string& t, const std::string& context) {
  std::vector<Literal> lits;
  size_t i = 0;
  while (i < t.size()) {
    const size_t open = t.find('{', i);
    size_t tag = std::string::npos;
    for (size_t k = open; k != std::string::npos && k + 1 < t.size(); k = t.find('{', k + 1)) {
      if (t[k + 1] == '{' || t[k + 1] == '%' || t[k + 1] == '#') {
        tag = k;
        break;
      }
    }
    const size_t raw_end = tag == std::string::npos ? t.size() : tag;
    if (raw_end > i) lits.push_back({t.substr(i, raw_end - i), i, true});
    if (tag == std::string::npos) break;
    const char kind = t[tag + 1];
    const std::string close = kind == '{' ? "}}" : kind == '%' ? "%}" : "#}";
    size_t k = tag + 2;
    bool closed = false;
    while (k < t.size()) {
      if (kind != '#' && (t[k] == '\'' || t[k] == '"')) {
        const char q = t[k];
        size_t e = k + 1;
        while (e < t.size() && t[e] != q) e += t[e] == '\\' ? 2 : 1;
        KVD_CHECK(e < t.size(), context, ": chat template: unterminated string at offset ", k);
        lits.push_back({unescape(t.substr(k + 1, e - k - 1)), k, false});
        k = e + 1;
        continue;
      }
      if (t.compare(k, 2, close) == 0) {
        closed = true;
        k += 2;
        break;
      }
      ++k;
    }
    KVD_CHECK(closed, context, ": chat template: unclosed '{", kind, "' at offset ", tag);
    i = k;
  }
  return lits;
}

bool contains(const std::string& s, const char* what) { return s.find(what) != std::string::npos; }
bool starts_with(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }
bool ends_with(const std::string& s, const std::string& p) {
  return s.size() >= p.size() && s.compare(s.size() - p.size(), p.size(), p) == 0;
}

// The first literal after an occurrence of `add_generation_prompt` that starts with `prefix`.
std::optional<std::string> generation_prompt(const std::string& t, const std::vector<Literal>& lits,
                                             const std::string& prefix) {
  for (size_t p = t.find("add_generation_prompt"); p != std::string::npos;
       p = t.find("add_generation_prompt", p + 1)) {
    for (const Literal& l : lits) {
      if (l.pos < p || l.raw) continue;
      if (starts_with(l.value, prefix)) return l.value;
      break;  // only the first literal after the condition
    }
  }
  return std::nullopt;
}

// Python's str.isspace() for one code point of UTF-8 text starting at s[i]; sets `len`.
bool py_space_at(const std::string& s, size_t i, size_t& len) {
  const auto b = static_cast<unsigned char>(s[i]);
  if (b < 0x80) {
    len = 1;
    return (b >= 0x09 && b <= 0x0D) || (b >= 0x1C && b <= 0x20);
  }
  static const char* const kSpaces[] = {"\xC2\x85",     "\xC2\xA0",     "\xE1\x9A\x80", "\xE2\x80\x80",
                                        "\xE2\x80\x81", "\xE2\x80\x82", "\xE2\x80\x83", "\xE2\x80\x84",
                                        "\xE2\x80\x85", "\xE2\x80\x86", "\xE2\x80\x87", "\xE2\x80\x88",
                                        "\xE2\x80\x89", "\xE2\x80\x8A", "\xE2\x80\xA8", "\xE2\x80\xA9",
                                        "\xE2\x80\xAF", "\xE2\x81\x9F", "\xE3\x80\x80"};
  for (const char* sp : kSpaces) {
    const size_t n = std::char_traits<char>::length(sp);
    if (s.compare(i, n, sp) == 0) {
      len = n;
      return true;
    }
  }
  len = b < 0xE0 ? 2 : b < 0xF0 ? 3 : 4;
  return false;
}

// Jinja's |trim: Python's str.strip().
std::string py_strip(const std::string& s) {
  size_t a = 0;
  size_t len = 0;
  while (a < s.size() && py_space_at(s, a, len)) a += len;
  size_t b = a;  // end of the last non-space code point
  for (size_t i = a; i < s.size(); i += len) {
    if (!py_space_at(s, i, len)) b = i + len;
  }
  return s.substr(a, b - a);
}

std::string lstrip_nl(const std::string& s) {
  const size_t a = s.find_first_not_of('\n');
  return a == std::string::npos ? std::string() : s.substr(a);
}
std::string rstrip_nl(const std::string& s) {
  const size_t b = s.find_last_not_of('\n');
  return b == std::string::npos ? std::string() : s.substr(0, b + 1);
}

// Python's s.split(sep)[0] and s.split(sep)[-1].
std::string before_first(const std::string& s, const std::string& sep) { return s.substr(0, s.find(sep)); }
std::string after_last(const std::string& s, const std::string& sep) {
  const size_t p = s.rfind(sep);
  return p == std::string::npos ? s : s.substr(p + sep.size());
}

// Today's local date as transformers' strftime_now("%d %b %Y") gives it, e.g. "05 Mar 2026".
std::string today_string() {
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  localtime_r(&now, &tm);
  static const char* const kMonths[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                        "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
  char buf[32];
  std::snprintf(buf, sizeof buf, "%02d %s %04d", tm.tm_mday, kMonths[tm.tm_mon], tm.tm_year + 1900);
  return buf;
}

// A token field of tokenizer_config.json: "x", {"content": "x", ...} or null.
std::string token_string(const json& cfg, const char* key, const std::string& path) {
  const auto it = cfg.find(key);
  if (it == cfg.end() || it->is_null()) return {};
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object() && it->contains("content") && (*it)["content"].is_string())
    return (*it)["content"].get<std::string>();
  KVD_FAIL(path, ": ", key, " must be a string, {\"content\": ...} or null");
}

}  // namespace

ChatTemplate ChatTemplate::from_file(const std::string& path_or_dir) {
  std::string path = path_or_dir;
  if (std::filesystem::is_directory(path))
    path = (std::filesystem::path(path) / "tokenizer_config.json").string();
  const json cfg = parse_json(read_file(path), path, "malformed JSON");
  KVD_CHECK(cfg.is_object(), path, ": expected a JSON object");
  const auto it = cfg.find("chat_template");
  KVD_CHECK(it != cfg.end() && !it->is_null(), path, ": no chat_template", kNoChatHint);
  std::string text;
  if (it->is_string()) {
    text = it->get<std::string>();
  } else if (it->is_array()) {  // named templates: [{"name": "default", "template": "..."}, ...]
    for (const json& e : *it) {
      if (e.is_object() && e.contains("name") && e["name"] == "default" && e.contains("template") &&
          e["template"].is_string())
        text = e["template"].get<std::string>();
    }
    KVD_CHECK(!text.empty(), path, ": chat_template has no template named 'default'", kNoChatHint);
  } else {
    KVD_FAIL(path, ": chat_template must be a string or a list of named templates");
  }
  return from_template(text, token_string(cfg, "bos_token", path), token_string(cfg, "eos_token", path),
                       path);
}

ChatTemplate ChatTemplate::from_template(const std::string& t, const std::string& bos_token,
                                         const std::string& eos_token, const std::string& context) {
  ChatTemplate ct;
  ct.bos_ = bos_token;
  ct.eos_ = eos_token;
  ct.context_ = context;
  const std::vector<Literal> lits = scan_literals(t, context);

  if (contains(t, "<|im_start|>")) {
    ct.format_ = ChatFormat::ChatML;
    ct.end_of_turn_ = "<|im_end|>";
    KVD_CHECK(contains(t, "<|im_end|>"), context, ": ChatML chat template without <|im_end|>", kNoChatHint);
    const auto gp = generation_prompt(t, lits, "<|im_start|>assistant");
    KVD_CHECK(gp.has_value(), context,
              ": ChatML chat template: no '<|im_start|>assistant' generation prompt found", kNoChatHint);
    ct.generation_prompt_ = *gp;
    const std::string head = "<|im_start|>system\n", tail = "<|im_end|>\n";
    for (const Literal& l : lits) {
      if (l.value.size() > head.size() + tail.size() && starts_with(l.value, head) && ends_with(l.value, tail)) {
        const std::string body = l.value.substr(head.size(), l.value.size() - head.size() - tail.size());
        if (!contains(body, "<|im_start|>") && !contains(body, "<|im_end|>")) {
          ct.default_system_ = body;
          break;
        }
      }
    }
    ct.qwen3_thinking_ = contains(t, "reasoning_content") && contains(t, "</think>");
    if (contains(t, "bos_token")) {
      // Only a leading {{ bos_token }} is understood.
      size_t p = t.find_first_not_of(" \t\r\n");
      const std::string start = p == std::string::npos ? "" : t.substr(p, t.find("}}", p) - p + 2);
      std::string inner;
      for (const char c : start) if (c != ' ' && c != '-') inner += c;
      KVD_CHECK(inner == "{{bos_token}}" && t.find("bos_token", t.find("bos_token") + 1) == std::string::npos,
                context, ": ChatML chat template uses bos_token in an unsupported way", kNoChatHint);
      ct.bos_first_ = true;
    }
    return ct;
  }

  if (contains(t, "<|start_header_id|>") && contains(t, "<|eot_id|>")) {
    KVD_CHECK(contains(t, "| trim") || contains(t, "|trim"), context,
              ": unrecognized Llama-3 chat template (expected message['content'] | trim)", kNoChatHint);
    ct.format_ = ChatFormat::Llama3;
    ct.end_of_turn_ = "<|eot_id|>";
    const auto gp = generation_prompt(t, lits, "<|start_header_id|>assistant");
    KVD_CHECK(gp.has_value(), context, ": Llama-3 chat template: no assistant generation prompt found",
              kNoChatHint);
    ct.generation_prompt_ = *gp;
    ct.bos_first_ = contains(t, "bos_token");
    if (contains(t, "Cutting Knowledge Date")) {
      // Llama-3.1+: a system block with the knowledge cutoff and a date.
      bool header = false, today = false;
      for (const Literal& l : lits) {
        header = header || l.value == "<|start_header_id|>system<|end_header_id|>\n\n";
        today = today || l.value == "Today Date: ";
        if (starts_with(l.value, "Cutting Knowledge Date:") && ct.knowledge_cutoff_.empty())
          ct.knowledge_cutoff_ = l.value;
      }
      KVD_CHECK(header && today && ends_with(ct.knowledge_cutoff_, "\n"), context,
                ": unrecognized Llama-3.1+ chat template (system block)", kNoChatHint);
      if (!contains(t, "strftime_now")) {
        const size_t p = t.find("set date_string");
        for (const Literal& l : lits) {
          if (p != std::string::npos && l.pos > p && !l.raw) {
            ct.fixed_date_ = l.value;
            break;
          }
        }
        KVD_CHECK(ct.fixed_date_.has_value(), context,
                  ": Llama-3.1+ chat template without strftime_now or a date_string default", kNoChatHint);
      }
      ct.llama_system_block_ = true;
    }
    return ct;
  }

  KVD_FAIL(context, ": unrecognized chat template (kvdistill renders ChatML <|im_start|> and Llama-3 "
           "header templates, not arbitrary Jinja)", kNoChatHint);
}

std::string ChatTemplate::render(const std::vector<ChatMessage>& messages, AddGenerationPrompt add) const {
  KVD_CHECK(!messages.empty(), context_, ": render: no messages");
  for (const ChatMessage& m : messages) {
    KVD_CHECK(m.role == "system" || m.role == "user" || m.role == "assistant", context_,
              ": render: unsupported role '", m.role, "' (system, user or assistant)");
  }
  std::string out;
  if (bos_first_) out += bos_;

  if (format_ == ChatFormat::Llama3) {
    size_t first = 0;
    if (llama_system_block_) {
      std::string system;
      if (messages.front().role == "system") system = py_strip(messages.front().content), first = 1;
      out += "<|start_header_id|>system<|end_header_id|>\n\n" + knowledge_cutoff_ + "Today Date: " +
             (fixed_date_ ? *fixed_date_ : today_string()) + "\n\n" + system + "<|eot_id|>";
    }
    for (size_t i = first; i < messages.size(); ++i) {
      const ChatMessage& m = messages[i];
      out += "<|start_header_id|>" + m.role + "<|end_header_id|>\n\n" + py_strip(m.content) + "<|eot_id|>";
    }
  } else {
    if (default_system_ && messages.front().role != "system")
      out += "<|im_start|>system\n" + *default_system_ + "<|im_end|>\n";
    // Qwen3: the last user message; assistant turns after it keep their <think> block.
    size_t last_query = messages.size() - 1;
    for (size_t i = messages.size(); i-- > 0;) {
      const std::string& c = messages[i].content;
      if (messages[i].role == "user" &&
          !(starts_with(c, "<tool_response>") && ends_with(c, "</tool_response>"))) {
        last_query = i;
        break;
      }
    }
    for (size_t i = 0; i < messages.size(); ++i) {
      const ChatMessage& m = messages[i];
      if (!qwen3_thinking_ || m.role != "assistant") {
        out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
        continue;
      }
      std::string content = m.content, reasoning;
      if (contains(content, "</think>")) {
        reasoning = lstrip_nl(after_last(rstrip_nl(before_first(m.content, "</think>")), "<think>"));
        content = lstrip_nl(after_last(m.content, "</think>"));
      }
      out += "<|im_start|>assistant\n";
      if (i > last_query && (i + 1 == messages.size() || !reasoning.empty())) {
        out += "<think>\n" + lstrip_nl(rstrip_nl(reasoning)) + "\n</think>\n\n" + lstrip_nl(content);
      } else {
        out += content;
      }
      out += "<|im_end|>\n";
    }
  }
  if (add == AddGenerationPrompt::Yes) out += generation_prompt_;
  return out;
}

}  // namespace kvd
