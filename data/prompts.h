// Prompt sets: the JSONL file `kvdistill prepare responses` reads, and a deterministic generator of one from a
// text corpus (`kvdistill prepare prompts`).
//
// Prompts JSONL, one prompt per non-empty line:
//   {"prompt": "..."}                                   a single user turn
//   {"messages": [{"role": "...", "content": "..."}, ...]}  a chat; generation continues after the last turn
// plus an optional "id" (a string is kept as is, any other JSON value as its JSON text; absent: the line
// number). A malformed line throws "<file>:<line>: ...".
//
// Generated prompt sets (make_prompt_set): the corpus documents (data/text_input.h) are cut into passages
// at paragraph breaks, each passage gathering whole paragraphs until it reaches passage_tokens tokens
// (words when no tokenizer is given); a paragraph longer than that is cut at a word boundary. `count`
// passages are drawn without replacement by a seeded shuffle (data/random.h), each wrapped in an instruction
// drawn by the same generator, and written as {"id": "p<k>", "prompt": "<instruction>\n\n<passage>"}. The
// same inputs and options give a byte-identical file.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "models/chat_template.h"

namespace kvd {

class Tokenizer;

struct PromptRecord {
  std::vector<ChatMessage> messages;  // {"prompt": p} becomes one user message
  std::string id;
  int64_t line = 0;  // 1-based line in the file
};

// Reads every prompt of a prompts JSONL file (at least one). Throws kvd::Error naming the file (missing,
// unreadable, empty) or the line.
std::vector<PromptRecord> read_prompts(const std::string& path);

// The instructions a generated prompt may start with.
const std::vector<std::string>& prompt_instructions();

struct PromptSetOptions {
  std::vector<std::string> inputs;  // text / Markdown / reST / JSONL files or directories
  std::string out;                  // the .jsonl to write (atomically)
  int64_t count = 1000;
  uint64_t seed = 0;
  int64_t passage_tokens = 200;
  std::string model_dir;            // optional: measure passages in this model's tokens (else in words)
};

struct PromptSetStats {
  int64_t prompts = 0;
  int64_t passages = 0;  // candidate passages in the corpus
};

PromptSetStats make_prompt_set(const PromptSetOptions& opt);

}  // namespace kvd
