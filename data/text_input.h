// Documents from text inputs, streamed: what `kvdistill prepare text` ingests.
//
// Inputs are files or directories. A directory is walked recursively (in sorted path order, so the
// document order is reproducible) for *.txt, *.md, *.markdown, *.rst and *.jsonl. A file named
// explicitly is read whatever its extension: *.jsonl as JSONL, anything else as text.
//
// What a document is:
//   text / Markdown / reST  the whole file; a file larger than max_doc_bytes is cut into several
//                           documents at paragraph breaks (a blank line), else at a line break, else
//                           at a UTF-8 character boundary, so memory stays bounded by max_doc_bytes
//                           whatever the file size. A leading UTF-8 byte order mark is dropped.
//   JSONL                   one document per non-empty line: {"text": "..."} or a chat
//                           {"messages": [{"role": "...", "content": "..."}, ...]}, the latter rendered
//                           by a ChatRender (the model's chat template). A malformed line throws
//                           "<file>:<line>: ..." naming the line.
// Empty documents are skipped. Text must be UTF-8 (InvalidUtf8::Fail reports the file and byte offset;
// InvalidUtf8::Replace substitutes U+FFFD for each maximal invalid subpart).
#pragma once

#include <cstdint>
#include <fstream>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "models/chat_template.h"

namespace kvd {

enum class InputKind { Text, Jsonl };
enum class InvalidUtf8 { Fail, Replace };

struct InputFile {
  std::string path;
  InputKind kind = InputKind::Text;
  uint64_t bytes = 0;  // file size
};

// The files behind `inputs` (files and directories), in document order. Throws kvd::Error for a
// missing input, or a directory holding no ingestible file.
std::vector<InputFile> list_inputs(const std::vector<std::string>& inputs);

// Turns a chat's messages into the document text (e.g. ChatTemplate::render without a generation
// prompt). `where` names the JSONL line for error messages.
using ChatRender = std::function<std::string(const std::vector<ChatMessage>& messages, const std::string& where)>;

struct DocumentOptions {
  uint64_t max_doc_bytes = 1 << 20;  // text files are cut into documents of at most this many bytes
  InvalidUtf8 invalid_utf8 = InvalidUtf8::Fail;
  ChatRender chat;  // required only if a JSONL line holds "messages"
};

struct Document {
  std::string text;    // UTF-8
  std::string source;  // "<file>" or "<file>:<line>", for messages
};

// Yields the documents of a list of files one at a time, holding at most one document (plus one read
// block) in memory.
class DocumentReader {
 public:
  DocumentReader(std::vector<InputFile> files, DocumentOptions opt);
  // The next non-empty document; false after the last one.
  bool next(Document& doc);
  // Bytes consumed from the input files so far.
  uint64_t bytes_read() const { return bytes_read_; }
  uint64_t total_bytes() const { return total_bytes_; }

 private:
  bool open_next_file();
  bool next_text(Document& doc);
  bool next_jsonl(Document& doc);
  void check_utf8(std::string& text, const std::string& where, uint64_t base_offset);

  std::vector<InputFile> files_;
  DocumentOptions opt_;
  size_t file_index_ = 0;
  std::unique_ptr<std::ifstream> in_;  // the file being read
  std::string pending_;                // text read but not yet returned (text files)
  uint64_t pending_offset_ = 0;        // file offset of pending_[0]
  bool eof_ = false;                   // the current text file has been read to its end
  int64_t line_ = 0;                   // current JSONL line number (1-based once reading)
  uint64_t bytes_read_ = 0, total_bytes_ = 0;
};

// Offset of the first byte of the first invalid UTF-8 sequence in `s`, or npos if it is valid.
size_t find_invalid_utf8(const std::string& s);
// One JSONL line as JSON; a parse error is one error naming `where` ("file:line") and the column.
nlohmann::json parse_jsonl_line(const std::string& line, const std::string& where);
// `s` with each maximal invalid UTF-8 subpart replaced by U+FFFD.
std::string replace_invalid_utf8(const std::string& s);

}  // namespace kvd
