// Synthetic long-context tasks in the style of RULER (Hsieh et al., 2024), written as the eval JSONL of
// DESIGN.md ("Formats"): one sample per line,
//   {"id": "niah_single-4096-0003", "context": "...", "question": "...", "answers": ["..."],
//    "task": "niah_single", "length": 4093}
// `length` is the number of model tokens of `context` (Tokenizer::encode without special tokens); it
// is within `tolerance` (default 2%) of the requested length, or generation fails.
//
// Two optional fields follow the six required ones (the eval reads them when present; this generator
// always writes them):
//   "answer_prefix"   text the assistant turn starts with (as RULER does), e.g. "The special magic number
//                     for <key> is:"; the eval's prompt is
//                     chat_template(user: context + "\n\n" + question, generation prompt) + answer_prefix
//   "max_new_tokens"  the answer's generation budget (greedy, stops at eos), sized to the answer list
// Scoring (RULER string match): the fraction of answers that occur in the output (qa: any of them).
//
// The tasks are sized so that a small model (SmolLM2-135M-Instruct) with a full cache solves them
// (docs/results/tasks-full-cache-smollm2.md): few distractors, short lists, a leading answer_prefix; the
// answer still depends on tokens placed at a random depth of the context, so cache eviction can hurt it.
//
// Tasks (answers always occur verbatim in the context, never in the question or the answer_prefix):
//   niah_single      one needle "The special magic number for <key> is: <7 digits>." in a corpus
//                    haystack; asks for the number
//   niah_multikey    two needles with different keys; asks for one key's number
//   niah_multivalue  two needles with the same key, "The first special magic number for <key> is: ..."
//                    and "The second ...", next to each other at one random depth; asks for both numbers
//   niah_multiquery  two needles with different keys and kinds of number ("The special magic number for
//                    <k1> is: ...", "The secret passcode for <k2> is: ..."); asks for both
//   vt               variable tracking: "The value 12345 is assigned to VAR ABCDE." then "The value of
//                    VAR ABCDE is assigned to VAR FGHIJ." (a chain of 2 variables) spread through the
//                    haystack; asks for every variable that holds the value
//   cwe              common-words extraction: a numbered list of quoted corpus words ('17. "word"') where
//                    one word fills about a third of the list and every other word occurs once; asks for it
//   fwe              frequent-words extraction: a text of quoted corpus words with Zipf(2) frequencies;
//                    asks for the most frequent
//   qa               a corpus paragraph placed at a random depth among other corpus paragraphs; the
//                    answer_prefix quotes the beginning of one of its sentences (which occurs once in the
//                    context) and the model continues it: the answer is the next word
//
// Haystacks come from the corpus (default .cache/corpus, from scripts/corpus.sh): prose paragraphs
// (markup-free, 200..3000 bytes, whitespace collapsed), of which a fixed subset (chosen by content
// hash, so independent of file order and of the seed) forms the pool. Each sample draws from its own
// random stream Rng(seed, task, length, index), so the same seed and corpus give a byte-identical file,
// and a subset of tasks or lengths gives the same samples as the full suite.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace kvd {

class Tokenizer;

struct TaskSample {
  std::string id, context, question;
  std::vector<std::string> answers;
  std::string task;
  int64_t length = 0;  // model tokens of context
  std::string answer_prefix;   // the assistant turn starts with it (JSONL "answer_prefix")
  int64_t max_new_tokens = 0;  // the answer's generation budget (JSONL "max_new_tokens")
};

// "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa".
const std::vector<std::string>& ruler_tasks();

// The corpus material tasks are built from.
class Haystack {
 public:
  // Reads `inputs` (files / directories, as `prepare text` does) and keeps up to `max_paragraphs` prose
  // paragraphs. Throws if fewer than 50 usable paragraphs are found.
  static Haystack from_inputs(const std::vector<std::string>& inputs, size_t max_paragraphs = 40000);
  // From paragraphs given directly (tests); each is whitespace-collapsed and kept if non-empty.
  static Haystack from_paragraphs(std::vector<std::string> paragraphs);

  const std::vector<std::string>& paragraphs() const { return paragraphs_; }
  // Distinct lower-case alphabetic words of 4..10 letters from the paragraphs, sorted.
  const std::vector<std::string>& words() const { return words_; }

 private:
  void index_words();
  std::vector<std::string> paragraphs_;
  std::vector<std::string> words_;
};

class TaskGenerator {
 public:
  TaskGenerator(const Tokenizer& tokenizer, const Haystack& haystack, double tolerance = 0.02);
  // Sample `index` of `task` at `length` tokens for `seed`. Throws kvd::Error for an unknown task or
  // if the length cannot be met within the tolerance (e.g. a length too small for the task).
  TaskSample make(const std::string& task, int64_t length, uint64_t seed, int64_t index) const;
  // Model tokens of a text.
  int64_t count(const std::string& text) const;

 private:
  const Tokenizer& tok_;
  const Haystack& hay_;
  double tol_;
};

struct TaskSuiteOptions {
  std::string model_dir;
  std::string suite = "ruler";
  std::vector<int64_t> lengths = {1024, 2048, 4096};
  int64_t samples = 10;  // per (task, length)
  uint64_t seed = 0;
  std::vector<std::string> corpus = {".cache/corpus"};
  std::vector<std::string> tasks;  // empty: all of ruler_tasks()
  std::string out;
  double tolerance = 0.02;
};

struct TaskSuiteStats {
  int64_t samples = 0;
  double max_rel_error = 0;  // max |length - target| / target
  double seconds = 0;
};

// "1024,2048,4k,128K" -> {1024, 2048, 4096, 131072}; throws on anything else.
std::vector<int64_t> parse_lengths(const std::string& s);
// Generates the suite and writes it atomically to opt.out (JSONL).
TaskSuiteStats write_task_suite(const TaskSuiteOptions& opt);

}  // namespace kvd
