// The shared defences of every reader and writer (docs/reliability.md): JSON nesting and type errors as one
// error naming the file, the tokenizer's id table bounded by its token count, pre-tokenizer regexes that
// cannot cut a UTF-8 character, and a full disk reported as such with the old file left intact.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <string>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/fs.h"
#include "common/json_error.h"
#include "models/tokenizer.h"

namespace kvd {
namespace {

namespace fs = std::filesystem;

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(JsonLimits, NestingIsCountedOutsideStringsOnly) {
  EXPECT_EQ(json_too_deep_at("[[1]]", 2), std::string::npos);
  EXPECT_EQ(json_too_deep_at("[[[1]]]", 2), 2u);
  EXPECT_EQ(json_too_deep_at(R"({"a": "[[[[[[", "b": "\"[[[["})", 1), std::string::npos);
  EXPECT_EQ(json_too_deep_at(R"({"a": {"b": 1}})", 1), 6u);
}

TEST(JsonLimits, DeepNestingIsOneErrorNamingTheFile) {
  const std::string deep = std::string(20000, '[') + std::string(20000, ']');
  const std::string msg = error_of([&] { parse_json(deep, "/x/config.json", "not valid JSON"); });
  EXPECT_NE(msg.find("/x/config.json: not valid JSON (nested deeper than 64 levels at byte 64)"), std::string::npos)
      << msg;
  // A real file's depth passes.
  EXPECT_EQ(parse_json(R"({"a": [[{"b": [1, 2]}]]})", "ok.json")["a"][0][0]["b"][1], 2);
}

TEST(JsonLimits, SyntaxAndTypeErrorsNameTheFile) {
  std::string msg = error_of([] { parse_json("{\"a\": \xff}", "/d/t.json"); });
  EXPECT_EQ(msg.rfind("/d/t.json: malformed JSON (parse error at line 1, column 7: syntax error", 0), 0u) << msg;
  EXPECT_EQ(msg.find("[json.exception"), std::string::npos) << msg;
  const nlohmann::json j = nlohmann::json::parse(R"({"n": "5"})");
  msg = error_of([&] { with_json_context("/d/m.json", "malformed manifest", [&] { return j.at("n").get<int>(); }); });
  EXPECT_EQ(msg.rfind("/d/m.json: malformed manifest (type must be number, but is string)", 0), 0u) << msg;
}

TEST(TokenizerLimits, AnIdFromTheFileCannotSizeAHugeTable) {
  // 48 bytes that used to make the loader allocate 2^30 strings (32 GiB).
  const std::string text = R"({"model":{"vocab":{"a":1073741823},"merges":[]}})";
  const std::string msg = error_of([&] { Tokenizer::from_json(text, "tiny/tokenizer.json"); });
  EXPECT_NE(msg.find("tiny/tokenizer.json: token id 1073741823 is far beyond the 1 tokens"), std::string::npos) << msg;
  // Dense ids (and a few holes) are fine.
  EXPECT_EQ(Tokenizer::from_json(R"({"model":{"vocab":{"a":0,"b":5},"merges":[]}})", "ok").vocab_size(), 6);
}

TEST(TokenizerLimits, ARegexThatCutsUtf8CharactersIsRefused) {
  auto with_split = [](const std::string& regex) {
    return R"({"model":{"vocab":{"a":0},"merges":[]},"decoder":{"type":"ByteLevel"},"pre_tokenizer":{"type":"Split",)"
           R"("pattern":{"Regex":")" + regex + R"("},"behavior":"Isolated","invert":false}})";
  };
  // \C (one byte in UTF mode) is refused when compiling; so is \K in a lookaround (a match ending before it
  // starts). Whatever else a pattern does, a piece boundary inside a character is an error naming the file
  // (Regex::find_all), and the decoder of a piece never reads past its end.
  for (const char* re : {"\\\\C", "(?=.\\\\K)"}) {
    const std::string msg = error_of([&] { Tokenizer::from_json(with_split(re), "c/tokenizer.json"); });
    EXPECT_NE(msg.find("c/tokenizer.json: cannot compile regex"), std::string::npos) << re << ": " << msg;
  }
  const Tokenizer t = Tokenizer::from_json(with_split("."), "dot/tokenizer.json");
  EXPECT_EQ(t.encode("a\xc3\xa9" "a"), (std::vector<int32_t>{0, 0}));  // whole characters; unknown ones dropped
}

TEST(DiskFull, TheAtomicWriterSaysSoAndLeavesTheOldFile) {
  const fs::path dir = fs::temp_directory_path() / ("kvd_disk_full_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const std::string path = (dir / "state.json").string();
  write_file_atomic(path, std::string("old"));
  ::setenv("KVD_TEST_DISK_FULL", "state.json", 1);
  const std::string msg = error_of([&] { write_file_atomic(path, std::string(100000, 'x')); });
  ::unsetenv("KVD_TEST_DISK_FULL");
  EXPECT_NE(msg.find(path + ": no space left on device (the disk holding " + dir.string() + " is full)"),
            std::string::npos)
      << msg;
  EXPECT_EQ(read_file(path), "old");
  EXPECT_EQ(std::distance(fs::directory_iterator(dir), fs::directory_iterator()), 1);  // no temporary left
  write_file_atomic(path, std::string("new"));  // space freed
  EXPECT_EQ(read_file(path), "new");
  fs::remove_all(dir);
}

}  // namespace
}  // namespace kvd
