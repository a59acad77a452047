// Eval task files (DESIGN.md, "Formats"): JSONL, one sample per line,
//   {"id", "context", "question", "answers": [..], "task", "length"}
// the LongBench / RULER shape that `kvdistill prepare tasks` writes and users bring. Optional fields:
//   "answer_prefix"   text the assistant's answer starts with (RULER-style; part of the prompt)
//   "max_new_tokens"  the answer's generation budget for this sample
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace kvd {

struct EvalSample {
  std::string id, context, question, task, answer_prefix;
  std::vector<std::string> answers;
  int64_t length = 0;          // the file's "length" (context tokens, as the generator counted them)
  int64_t max_new_tokens = 0;  // 0: the harness default
  int64_t line = 0;            // 1-based line in the file, for messages
};

// Reads every sample; a missing file, malformed JSON, a missing / mistyped required field or a duplicate
// id is one error naming the file and line.
std::vector<EvalSample> read_eval_tasks(const std::string& path);

// RULER's string-match conventions: "all" (the fraction of the answers found in the output; needle,
// variable-tracking and word-extraction tasks) or "part" (1 if any answer is found; QA).
enum class MatchRule { All, Part };
MatchRule match_rule_for(const std::string& task);  // Part for tasks named "qa*", All otherwise
// Case-insensitive substring match of each answer in `output`; a score in [0, 1].
double string_match(const std::string& output, const std::vector<std::string>& answers, MatchRule rule);

}  // namespace kvd
