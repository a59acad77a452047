// Document ingestion (data/text_input.h): directory walks, text cutting, JSONL text and chat lines,
// malformed JSONL with its line number, UTF-8 handling.
#include "data/text_input.h"

#include <gtest/gtest.h>

#include "data/data_fixtures.h"
#include "common/error.h"

namespace kvd {
namespace {

using testing::ScratchDir;
using testing::write_text;

std::vector<Document> read_all(const std::vector<std::string>& inputs, DocumentOptions opt = {}) {
  DocumentReader r(list_inputs(inputs), std::move(opt));
  std::vector<Document> docs;
  Document d;
  while (r.next(d)) docs.push_back(d);
  EXPECT_EQ(r.bytes_read(), r.total_bytes());
  return docs;
}

std::string error_of(const std::vector<std::string>& inputs, DocumentOptions opt = {}) {
  try {
    read_all(inputs, std::move(opt));
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(TextInput, DirectoryWalkIsRecursiveSortedAndFiltered) {
  ScratchDir dir("ti_walk");
  write_text(dir / "b/z.txt", "zz");
  write_text(dir / "b/a.md", "aa");
  write_text(dir / "a.rst", "rr");
  write_text(dir / "c.jsonl", "{\"text\": \"jj\"}\n");
  write_text(dir / "skip.py", "print()");
  write_text(dir / "UPPER.TXT", "up");
  const auto files = list_inputs({dir.path.string()});
  std::vector<std::string> names;
  for (const auto& f : files) names.push_back(std::filesystem::path(f.path).lexically_relative(dir.path).string());
  EXPECT_EQ(names, (std::vector<std::string>{"UPPER.TXT", "a.rst", "b/a.md", "b/z.txt", "c.jsonl"}));
  EXPECT_EQ(files.back().kind, InputKind::Jsonl);
  EXPECT_EQ(files.front().kind, InputKind::Text);
  // An explicit file of any extension is read as text.
  EXPECT_EQ(list_inputs({dir / "skip.py"}).front().kind, InputKind::Text);
  const auto docs = read_all({dir.path.string()});
  ASSERT_EQ(docs.size(), 5u);
  EXPECT_EQ(docs[0].text, "up");
  EXPECT_EQ(docs[4].text, "jj");
  EXPECT_EQ(docs[4].source, dir / "c.jsonl" + std::string(":1"));

  EXPECT_NE(error_of({dir / "nope"}).find("nope: no such file or directory"), std::string::npos);
  std::filesystem::create_directories(dir / "empty");
  EXPECT_NE(error_of({dir / "empty"}).find("no .txt, .md, .rst or .jsonl file"), std::string::npos);
}

TEST(TextInput, LargeTextFilesAreCutAtParagraphsThenLinesThenCharacters) {
  ScratchDir dir("ti_cut");
  std::string text = "\xEF\xBB\xBF";  // BOM, dropped
  std::string expect_all;
  for (int p = 0; p < 40; ++p) {
    std::string para = "Paragraph " + std::to_string(p) + " says something.\nSecond line.\n\n";
    text += para;
    expect_all += para;
  }
  write_text(dir / "big.txt", text);
  DocumentOptions opt;
  opt.max_doc_bytes = 200;
  const auto docs = read_all({dir / "big.txt"}, opt);
  std::string joined;
  for (const auto& d : docs) {
    EXPECT_LE(d.text.size(), 200u);
    EXPECT_EQ(d.text.substr(d.text.size() - 2), "\n\n") << "not cut at a paragraph: " << d.text;
    joined += d.text;
  }
  EXPECT_GT(docs.size(), 5u);
  EXPECT_EQ(joined, expect_all);

  // No blank line: cut after a newline. No newline at all: at a UTF-8 character boundary.
  std::string lines, chars;
  for (int i = 0; i < 30; ++i) lines += "line number " + std::to_string(i) + "\n";
  for (int i = 0; i < 200; ++i) chars += "é";  // 2 bytes each
  write_text(dir / "lines.txt", lines);
  write_text(dir / "chars.txt", chars);
  opt.max_doc_bytes = 51;
  joined.clear();
  for (const auto& d : read_all({dir / "lines.txt"}, opt)) {
    EXPECT_EQ(d.text.back(), '\n');
    joined += d.text;
  }
  EXPECT_EQ(joined, lines);
  joined.clear();
  for (const auto& d : read_all({dir / "chars.txt"}, opt)) {
    EXPECT_EQ(d.text.size(), 50u) << "cut inside a character";
    joined += d.text;
  }
  EXPECT_EQ(joined, chars);
}

TEST(TextInput, JsonlTextAndChatLines) {
  ScratchDir dir("ti_jsonl");
  write_text(dir / "d.jsonl",
             "{\"text\": \"first\"}\n"
             "\n"
             "   \r\n"
             "{\"text\": \"\"}\n"
             "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}]}\r\n"
             "{\"text\": \"last\", \"id\": 3}");
  DocumentOptions opt;
  opt.chat = [](const std::vector<ChatMessage>& m, const std::string&) {
    std::string s;
    for (const auto& x : m) s += "[" + x.role + "]" + x.content;
    return s;
  };
  const auto docs = read_all({dir / "d.jsonl"}, opt);
  ASSERT_EQ(docs.size(), 3u);
  EXPECT_EQ(docs[0].text, "first");
  EXPECT_EQ(docs[1].text, "[user]hi[assistant]yo");
  EXPECT_EQ(docs[1].source, dir / "d.jsonl" + std::string(":5"));
  EXPECT_EQ(docs[2].text, "last");
  // Chat lines need a renderer.
  EXPECT_NE(error_of({dir / "d.jsonl"}).find("d.jsonl:5: chat messages need"), std::string::npos);
}

TEST(TextInput, MalformedJsonlNamesFileAndLine) {
  ScratchDir dir("ti_bad");
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"{\"text\": \"ok\"}\n{\"text\": \"unterminated}\n", ":2: malformed JSON"},
      {"{\"text\": \"ok\"}\n\n[1, 2]\n", ":3: expected a JSON object"},
      {"{\"text\": 5}\n", ":1: \"text\" must be a string"},
      {"{\"body\": \"x\"}\n", ":1: expected a \"text\" string or a \"messages\" list"},
      {"{\"messages\": [{\"role\": \"user\"}]}\n", ":1: messages[0] must be an object"},
      {"{\"messages\": []}\n", ":1: \"messages\" must be a non-empty list"},
  };
  int i = 0;
  for (const auto& [body, needle] : cases) {
    const std::string path = dir / ("bad" + std::to_string(i++) + ".jsonl");
    write_text(path, body);
    const std::string msg = error_of({path});
    EXPECT_NE(msg.find(path + needle), std::string::npos) << "'" << needle << "' not in: " << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  }
}

TEST(TextInput, InvalidUtf8FailsWithOffsetOrIsReplaced) {
  ScratchDir dir("ti_utf8");
  write_text(dir / "latin1.txt", "caf\xE9 au lait");
  const std::string msg = error_of({dir / "latin1.txt"});
  EXPECT_NE(msg.find("latin1.txt: invalid UTF-8 at byte 3"), std::string::npos) << msg;
  EXPECT_NE(msg.find("--invalid-utf8 replace"), std::string::npos) << msg;
  DocumentOptions opt;
  opt.invalid_utf8 = InvalidUtf8::Replace;
  EXPECT_EQ(read_all({dir / "latin1.txt"}, opt).at(0).text, "caf\xEF\xBF\xBD au lait");
  // Maximal subparts: an over-long lead, a truncated 3-byte sequence, a surrogate, a stray continuation.
  EXPECT_EQ(replace_invalid_utf8("a\xC0\xAF" "b\xE2\x82" "c\xED\xA0\x80" "d\x80"),
            "a\xEF\xBF\xBD\xEF\xBF\xBD" "b\xEF\xBF\xBD" "c\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD" "d\xEF\xBF\xBD");
  EXPECT_EQ(find_invalid_utf8("ok \xF0\x9F\x98\x80 \xE2\x82\xAC"), std::string::npos);
}

}  // namespace
}  // namespace kvd
