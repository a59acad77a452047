#include "data/text_input.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <filesystem>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/json_error.h"

namespace kvd {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

std::string lower_extension(const fs::path& p) {
  std::string e = p.extension().string();
  std::transform(e.begin(), e.end(), e.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return e;
}

bool ingestible(const std::string& ext) {
  return ext == ".txt" || ext == ".md" || ext == ".markdown" || ext == ".rst" || ext == ".jsonl";
}

// Length of the valid UTF-8 sequence starting at s[i], or -(length of its maximal invalid subpart)
// (Unicode 15, table 3-7 "well-formed UTF-8 byte sequences").
int utf8_step(const std::string& s, size_t i) {
  const auto b = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char c = b(i);
  if (c < 0x80) return 1;
  int len = 0;
  unsigned char lo = 0x80, hi = 0xBF;
  if (c >= 0xC2 && c <= 0xDF) len = 2;
  else if (c == 0xE0) len = 3, lo = 0xA0;
  else if (c >= 0xE1 && c <= 0xEC) len = 3;
  else if (c == 0xED) len = 3, hi = 0x9F;
  else if (c >= 0xEE && c <= 0xEF) len = 3;
  else if (c == 0xF0) len = 4, lo = 0x90;
  else if (c >= 0xF1 && c <= 0xF3) len = 4;
  else if (c == 0xF4) len = 4, hi = 0x8F;
  else return -1;
  for (int k = 1; k < len; ++k) {
    if (i + k >= s.size()) return -k;
    const unsigned char x = b(i + k);
    const unsigned char l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
    if (x < l || x > h) return -k;
  }
  return len;
}

}  // namespace

size_t find_invalid_utf8(const std::string& s) {
  for (size_t i = 0; i < s.size();) {
    const int n = utf8_step(s, i);
    if (n < 0) return i;
    i += static_cast<size_t>(n);
  }
  return std::string::npos;
}

std::string replace_invalid_utf8(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    const int n = utf8_step(s, i);
    if (n > 0) {
      out.append(s, i, static_cast<size_t>(n));
      i += static_cast<size_t>(n);
    } else {
      out += "\xEF\xBF\xBD";
      i += static_cast<size_t>(-n);
    }
  }
  return out;
}

std::vector<InputFile> list_inputs(const std::vector<std::string>& inputs) {
  KVD_CHECK(!inputs.empty(), "no input given; pass files or directories with --input");
  std::vector<InputFile> files;
  for (const std::string& in : inputs) {
    std::error_code ec;
    const fs::file_status st = fs::status(in, ec);
    KVD_CHECK(fs::exists(st), in, ": no such file or directory");
    if (fs::is_directory(st)) {
      std::vector<fs::path> found;
      for (fs::recursive_directory_iterator it(in, fs::directory_options::skip_permission_denied, ec), end;
           !ec && it != end; it.increment(ec)) {
        if (it->is_regular_file(ec) && ingestible(lower_extension(it->path()))) found.push_back(it->path());
      }
      KVD_CHECK(!ec, in, ": cannot walk the directory (", ec.message(), ")");
      KVD_CHECK(!found.empty(), in, ": no .txt, .md, .rst or .jsonl file under this directory");
      std::sort(found.begin(), found.end());
      for (const fs::path& p : found)
        files.push_back({p.string(), lower_extension(p) == ".jsonl" ? InputKind::Jsonl : InputKind::Text,
                         static_cast<uint64_t>(fs::file_size(p, ec))});
    } else {
      KVD_CHECK(fs::is_regular_file(st), in, ": not a regular file or directory");
      files.push_back({in, lower_extension(in) == ".jsonl" ? InputKind::Jsonl : InputKind::Text,
                       static_cast<uint64_t>(fs::file_size(in, ec))});
    }
  }
  return files;
}

DocumentReader::DocumentReader(std::vector<InputFile> files, DocumentOptions opt)
    : files_(std::move(files)), opt_(std::move(opt)) {
  KVD_CHECK(opt_.max_doc_bytes >= 16, "max_doc_bytes must be at least 16");
  for (const InputFile& f : files_) total_bytes_ += f.bytes;
}

bool DocumentReader::open_next_file() {
  if (file_index_ >= files_.size()) return false;
  const InputFile& f = files_[file_index_];
  in_ = std::make_unique<std::ifstream>(f.path, std::ios::binary);
  KVD_CHECK(in_->good(), f.path, ": cannot open (", std::strerror(errno), ")");
  pending_.clear();
  pending_offset_ = 0;
  eof_ = false;
  line_ = 0;
  return true;
}

bool DocumentReader::next(Document& doc) {
  for (;;) {
    if (!in_) {
      if (!open_next_file()) return false;
    }
    const bool got = files_[file_index_].kind == InputKind::Jsonl ? next_jsonl(doc) : next_text(doc);
    if (got) return true;
    in_.reset();
    ++file_index_;
  }
}

void DocumentReader::check_utf8(std::string& text, const std::string& where, uint64_t base_offset) {
  const size_t bad = find_invalid_utf8(text);
  if (bad == std::string::npos) return;
  KVD_CHECK(opt_.invalid_utf8 == InvalidUtf8::Replace, where, ": invalid UTF-8 at byte ", base_offset + bad,
            "; convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8) or pass --invalid-utf8 replace");
  text = replace_invalid_utf8(text);
}

bool DocumentReader::next_text(Document& doc) {
  const InputFile& f = files_[file_index_];
  const size_t max = static_cast<size_t>(opt_.max_doc_bytes);
  // Fill pending_ to max + 1 bytes (or to the end of the file): enough to know whether to cut.
  while (!eof_ && pending_.size() <= max) {
    const size_t old = pending_.size();
    const size_t want = std::max<size_t>(max + 1 - old, 1 << 16);
    pending_.resize(old + want);
    in_->read(pending_.data() + old, static_cast<std::streamsize>(want));
    const size_t got = static_cast<size_t>(in_->gcount());
    pending_.resize(old + got);
    KVD_CHECK(!in_->bad(), f.path, ": read error (", std::strerror(errno), ")");
    if (got < want) eof_ = true;
    bytes_read_ += got;
    if (pending_offset_ == 0 && old == 0 && pending_.compare(0, 3, "\xEF\xBB\xBF") == 0) {
      pending_.erase(0, 3);
      pending_offset_ = 3;
    }
  }
  while (!pending_.empty()) {
    size_t cut = pending_.size();
    if (cut > max) {
      // Prefer a paragraph break, then a line break, then a character boundary, at or before max.
      const size_t para = pending_.rfind("\n\n", max - 2);
      if (para != std::string::npos && para > 0) {
        cut = para + 2;
      } else {
        const size_t nl = pending_.rfind('\n', max - 1);
        if (nl != std::string::npos && nl > 0) {
          cut = nl + 1;
        } else {
          cut = max;
          while (cut > 1 && (static_cast<unsigned char>(pending_[cut]) & 0xC0) == 0x80) --cut;
        }
      }
    }
    doc.text.assign(pending_, 0, cut);
    pending_.erase(0, cut);
    const uint64_t offset = pending_offset_;
    pending_offset_ += cut;
    doc.source = f.path;
    check_utf8(doc.text, f.path, offset);
    const bool blank = std::all_of(doc.text.begin(), doc.text.end(),
                                   [](unsigned char c) { return std::isspace(c) != 0; });
    if (!blank) return true;
    if (pending_.size() <= max && !eof_) return next_text(doc);  // refill, then continue
  }
  return false;
}

bool DocumentReader::next_jsonl(Document& doc) {
  const InputFile& f = files_[file_index_];
  std::string line;
  while (std::getline(*in_, line)) {
    ++line_;
    bytes_read_ += line.size() + (in_->eof() ? 0 : 1);  // the last line may lack its newline
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (std::all_of(line.begin(), line.end(), [](unsigned char c) { return std::isspace(c) != 0; })) continue;
    const std::string where = f.path + ":" + std::to_string(line_);
    if (opt_.invalid_utf8 == InvalidUtf8::Replace) line = replace_invalid_utf8(line);
    json j = parse_jsonl_line(line, where);
    KVD_CHECK(j.is_object(), where, ": expected a JSON object with \"text\" or \"messages\", found ", j.type_name());
    doc.source = where;
    if (j.contains("text")) {
      KVD_CHECK(j["text"].is_string(), where, ": \"text\" must be a string, found ", j["text"].type_name());
      doc.text = j["text"].get<std::string>();
    } else if (j.contains("messages")) {
      const json& m = j["messages"];
      KVD_CHECK(m.is_array() && !m.empty(), where, ": \"messages\" must be a non-empty list of {role, content}");
      std::vector<ChatMessage> msgs;
      for (size_t k = 0; k < m.size(); ++k) {
        const json& e = m[k];
        KVD_CHECK(e.is_object() && e.contains("role") && e["role"].is_string() && e.contains("content") &&
                      e["content"].is_string(),
                  where, ": messages[", k, "] must be an object with string \"role\" and \"content\"");
        msgs.push_back({e["role"].get<std::string>(), e["content"].get<std::string>()});
      }
      KVD_CHECK(static_cast<bool>(opt_.chat), where,
                ": chat messages need the model's chat template, and none was given");
      doc.text = opt_.chat(msgs, where);
    } else {
      KVD_FAIL(where, ": expected a \"text\" string or a \"messages\" list in the object");
    }
    if (!doc.text.empty()) return true;
  }
  KVD_CHECK(!in_->bad(), f.path, ": read error (", std::strerror(errno), ")");
  return false;
}

nlohmann::json parse_jsonl_line(const std::string& line, const std::string& where) {
  const size_t deep = json_too_deep_at(line);
  KVD_CHECK(deep == std::string::npos, where, ": malformed JSON (nested deeper than ", kMaxJsonDepth,
            " levels at column ", deep + 1, "); each line must be one JSON object");
  try {
    return nlohmann::json::parse(line);
  } catch (const nlohmann::json::parse_error& e) {
    std::string what = e.what();
    const size_t p = what.find("] ");
    if (p != std::string::npos) what = what.substr(p + 2);
    const size_t l1 = what.find("at line 1, column ");  // the line is the JSONL line: keep the column
    if (l1 != std::string::npos) what.replace(l1, 18, "at column ");
    KVD_FAIL(where, ": malformed JSON (", what, "); each line must be one JSON object");
  }
}

}  // namespace kvd
