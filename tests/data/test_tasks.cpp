// The RULER-style task generator (data/tasks.h) on a synthetic corpus and the tiny test tokenizer:
// every task meets its length within 2%, answers occur in the context (and never in the question or the
// answer_prefix), samples are a pure function of (seed, task, length, index), and the suite file is
// byte-identical for one seed.
#include "data/tasks.h"

#include <gtest/gtest.h>

#include <map>

#include "data/data_fixtures.h"
#include "common/error.h"
#include "common/fs.h"
#include "data/random.h"
#include "models/tokenizer.h"

namespace kvd {
namespace {

using testing::ScratchDir;

// 300 paragraphs of made-up lower-case words in capitalized sentences.
std::vector<std::string> synthetic_paragraphs() {
  Rng rng(99);
  std::vector<std::string> vocab;
  for (int i = 0; i < 600; ++i) {
    std::string w;
    const int n = static_cast<int>(rng.range(4, 9));
    for (int k = 0; k < n; ++k) w += static_cast<char>('a' + rng.below(26));
    vocab.push_back(w);
  }
  std::vector<std::string> paras;
  for (int p = 0; p < 300; ++p) {
    std::string text;
    const int sentences = static_cast<int>(rng.range(2, 5));
    for (int s = 0; s < sentences; ++s) {
      const int n = static_cast<int>(rng.range(12, 25));
      for (int k = 0; k < n; ++k) {
        std::string w = rng.pick(vocab);
        if (k == 0) w[0] = static_cast<char>(w[0] - 'a' + 'A');
        text += (text.empty() ? "" : " ") + w;
      }
      text += ".";
    }
    paras.push_back(text);
  }
  return paras;
}

struct Fixture {
  ScratchDir dir{"tasks"};
  Tokenizer tok = Tokenizer::from_file(testing::write_tiny_model(dir / "model"));
  Haystack hay = Haystack::from_paragraphs(synthetic_paragraphs());
};

TEST(Tasks, EveryTaskMeetsItsLengthAndContainsItsAnswers) {
  Fixture f;
  const TaskGenerator gen(f.tok, f.hay);
  for (const std::string& task : ruler_tasks()) {
    for (int64_t length : {1000, 3000}) {
      for (int64_t i = 0; i < 3; ++i) {
        const TaskSample s = gen.make(task, length, 5, i);
        EXPECT_EQ(s.task, task);
        EXPECT_EQ(s.length, gen.count(s.context));
        EXPECT_LE(std::abs(s.length - length), length / 50) << s.id;
        EXPECT_FALSE(s.question.empty());
        ASSERT_FALSE(s.answers.empty()) << s.id;
        EXPECT_FALSE(s.answer_prefix.empty()) << s.id;
        EXPECT_GT(s.max_new_tokens, 0) << s.id;
        EXPECT_LE(s.max_new_tokens, 64) << s.id;
        for (const std::string& a : s.answers) {
          EXPECT_NE(s.context.find(a), std::string::npos) << s.id << ": " << a;
          // The prompt must not give the answer away.
          EXPECT_EQ(s.question.find(a), std::string::npos) << s.id << ": " << a;
          EXPECT_EQ(s.answer_prefix.find(a), std::string::npos) << s.id << ": " << a;
        }
      }
    }
  }
}

TEST(Tasks, SamplesArePureFunctionsOfSeedTaskLengthIndex) {
  Fixture f;
  const TaskGenerator gen(f.tok, f.hay);
  const TaskSample a = gen.make("niah_multikey", 800, 1, 2);
  const TaskSample b = gen.make("niah_multikey", 800, 1, 2);
  EXPECT_EQ(a.id, "niah_multikey-800-0002");
  EXPECT_EQ(a.context, b.context);
  EXPECT_EQ(a.answers, b.answers);
  EXPECT_NE(gen.make("niah_multikey", 800, 2, 2).context, a.context);
  EXPECT_NE(gen.make("niah_multikey", 800, 1, 3).context, a.context);
  // niah_multivalue: two numbers for one key, in order of appearance, each in its ordinal's needle.
  const TaskSample mv = gen.make("niah_multivalue", 800, 1, 0);
  ASSERT_EQ(mv.answers.size(), 2u);
  const size_t first = mv.context.find(" is: " + mv.answers[0] + ".");
  const size_t second = mv.context.find(" is: " + mv.answers[1] + ".");
  ASSERT_NE(first, std::string::npos);
  ASSERT_NE(second, std::string::npos);
  EXPECT_LT(first, second);
  const std::string head = "What are all the special magic numbers for ";
  ASSERT_EQ(mv.question.rfind(head, 0), 0u) << mv.question;
  const std::string key = mv.question.substr(head.size(), mv.question.find(" mentioned") - head.size());
  EXPECT_NE(mv.context.find("The first special magic number for " + key + " is: " + mv.answers[0] + "."), std::string::npos);
  EXPECT_NE(mv.context.find("The second special magic number for " + key + " is: " + mv.answers[1] + "."), std::string::npos);
  EXPECT_EQ(mv.answer_prefix, "The first special magic number for " + key + " is:");
}

// Each task's answer re-derived from the context by a naive reading, as a model would have to.
TEST(Tasks, AnswersFollowFromTheContext) {
  Fixture f;
  const TaskGenerator gen(f.tok, f.hay);
  for (int64_t i = 0; i < 3; ++i) {
    // vt: "The value V is assigned to VAR A." then "The value of VAR A is assigned to VAR B."
    const TaskSample vt = gen.make("vt", 1500, 7, i);
    ASSERT_EQ(vt.answers.size(), 2u);
    const size_t vat = vt.question.find("the value ");
    ASSERT_NE(vat, std::string::npos) << vt.question;
    const std::string value = vt.question.substr(vat + 10, 5);
    EXPECT_NE(vt.context.find("The value " + value + " is assigned to VAR " + vt.answers[0] + "."), std::string::npos);
    EXPECT_NE(vt.context.find("The value of VAR " + vt.answers[0] + " is assigned to VAR " + vt.answers[1] + "."),
              std::string::npos);
    // cwe: the answer is the most frequent list item, by a margin.
    const TaskSample cwe = gen.make("cwe", 1500, 7, i);
    ASSERT_EQ(cwe.answers.size(), 1u);
    std::map<std::string, int> counts;
    for (size_t p = cwe.context.find(". \""); p != std::string::npos; p = cwe.context.find(". \"", p + 1)) {
      const size_t end = cwe.context.find('"', p + 3);
      ++counts[cwe.context.substr(p + 3, end - p - 3)];
    }
    int runner_up = 0;
    for (const auto& [w, c] : counts)
      if (w != cwe.answers[0]) runner_up = std::max(runner_up, c);
    EXPECT_GT(counts[cwe.answers[0]], 4 * runner_up) << cwe.id;
    // qa: the answer_prefix quotes a sentence start found once in the context, followed by the answer.
    const TaskSample qa = gen.make("qa", 1500, 7, i);
    ASSERT_EQ(qa.answer_prefix[0], '"');
    const std::string start = qa.answer_prefix.substr(1);
    const size_t at = qa.context.find(start);
    ASSERT_NE(at, std::string::npos) << qa.id;
    EXPECT_EQ(qa.context.find(start, at + 1), std::string::npos) << qa.id;
    EXPECT_EQ(qa.context.compare(at + start.size(), qa.answers[0].size() + 1, " " + qa.answers[0]), 0) << qa.id;
  }
}

TEST(Tasks, BadRequestsAreClearErrors) {
  Fixture f;
  const TaskGenerator gen(f.tok, f.hay);
  EXPECT_THROW(gen.make("nope", 1000, 0, 0), Error);
  EXPECT_THROW(gen.make("qa", 10, 0, 0), Error);
  EXPECT_EQ(parse_lengths("1024,2k,4K"), (std::vector<int64_t>{1024, 2048, 4096}));
  EXPECT_THROW(parse_lengths("1024,,2048"), Error);
  EXPECT_THROW(parse_lengths("-5"), Error);
  EXPECT_THROW(parse_lengths(""), Error);
}

TEST(Tasks, SuiteFileIsByteIdenticalForOneSeed) {
  Fixture f;
  // A corpus directory for from_inputs: the synthetic paragraphs padded into prose-sized ones.
  std::string text;
  const auto paras = synthetic_paragraphs();
  for (size_t i = 0; i + 1 < paras.size(); i += 2) text += paras[i] + " " + paras[i + 1] + "\n\n";
  testing::write_text(f.dir / "corpus/c.txt", text);
  TaskSuiteOptions o;
  o.model_dir = f.dir / "model";
  o.lengths = {2500, 4000};
  o.samples = 2;
  o.seed = 11;
  o.corpus = {f.dir / "corpus"};
  o.out = f.dir / "a.jsonl";
  const TaskSuiteStats st = write_task_suite(o);
  EXPECT_EQ(st.samples, 8 * 2 * 2);
  EXPECT_LE(st.max_rel_error, 0.02);
  o.out = f.dir / "b.jsonl";
  write_task_suite(o);
  EXPECT_EQ(read_file(f.dir / "a.jsonl"), read_file(f.dir / "b.jsonl"));
  o.corpus = {f.dir / "missing"};
  o.out = f.dir / "c.jsonl";
  EXPECT_THROW(write_task_suite(o), Error);
  EXPECT_FALSE(std::filesystem::exists(f.dir / "c.jsonl"));
}

}  // namespace
}  // namespace kvd
