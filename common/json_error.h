// JSON from files for every reader: one parse with a nesting limit and one readable error line.
//
//   const json j = parse_json(text, path);                    // "<path>: malformed JSON (...)"
//   const json j = parse_json(text, path, "not valid JSON");  // a reader's own wording
//   with_json_context(path, "invalid tokenizer JSON", [&] { ... j.at("x").get<int>() ... });
//
// Why: nlohmann's parser is iterative, but copying, comparing or dump()ing a value recurses once per
// nesting level, as do our own walkers of nested structures, so a small file of "[[[[..." overflows the
// stack in whichever code touches it later. No format kvdistill reads nests deeper than a few levels;
// kMaxJsonDepth rejects such input at the parse, before anything else sees it. And a field of the wrong
// type makes nlohmann throw type_error / out_of_range without the file's name: with_json_context turns
// those into our one-line kvd::Error naming the file.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "common/error.h"

namespace kvd {

// Deepest nesting of arrays / objects any reader accepts (real files: under 10).
inline constexpr int kMaxJsonDepth = 64;

// The exception's text without its "[json.exception.parse_error.101] " tag, with bytes outside printable
// ASCII shown as '?' (the "last read" excerpt may hold invalid UTF-8 from the input).
inline std::string json_error_text(const nlohmann::json::exception& e) {
  std::string s = e.what();
  if (!s.empty() && s[0] == '[') {
    const size_t close = s.find("] ");
    if (close != std::string::npos) s = s.substr(close + 2);
  }
  for (char& ch : s) {
    if (static_cast<unsigned char>(ch) < 0x20 || static_cast<unsigned char>(ch) > 0x7e) ch = '?';
  }
  return s;
}

// The byte offset at which `text` first nests deeper than `max_depth` arrays / objects, or npos. Brackets
// inside strings do not count. A cheap linear scan, run before parsing.
inline size_t json_too_deep_at(std::string_view text, int max_depth = kMaxJsonDepth) {
  int depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\') {
        ++i;  // skip the escaped character
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > max_depth) return i;
    } else if (c == ']' || c == '}') {
      --depth;  // unbalanced input is the parser's to report
    }
  }
  return std::string_view::npos;
}

// Parses `text` (a whole file, or one JSONL line) named `context` in errors:
//   "<context>: <what> (syntax error while parsing value - ... at line 1, column 7)<hint>"
//   "<context>: <what> (nested deeper than 64 levels at byte 70)<hint>"
template <typename Json = nlohmann::json>
Json parse_json(std::string_view text, const std::string& context, const char* what = "malformed JSON",
                const char* hint = "") {
  const size_t deep = json_too_deep_at(text);
  KVD_CHECK(deep == std::string_view::npos, context, ": ", what, " (nested deeper than ", kMaxJsonDepth,
            " levels at byte ", deep, ")", hint);
  try {
    return Json::parse(text.begin(), text.end());
  } catch (const nlohmann::json::exception& e) {
    KVD_FAIL(context, ": ", what, " (", json_error_text(e), ")", hint);
  }
}

// Runs `f`, turning an nlohmann exception it lets escape (a field of the wrong type, a missing key read
// with at()) into "<context>: <what> (<json_error_text>)".
template <typename F>
auto with_json_context(const std::string& context, const char* what, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const nlohmann::json::exception& e) {
    KVD_FAIL(context, ": ", what, " (", json_error_text(e), ")");
  }
}

}  // namespace kvd
