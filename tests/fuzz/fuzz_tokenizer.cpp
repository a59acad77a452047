// Fuzz target: tokenizer.json, and the tokenizer at work. The first byte picks the mode:
//   even: the rest is a tokenizer.json; if it loads, it encodes and decodes a fixed text;
//   odd:  the rest is arbitrary bytes, encoded with a valid tokenizer (byte 0 bit 1 picks the GPT-2 style
//         or the Qwen2 style one of seeds.h), the ids decoded in one piece and streamed, and the bytes
//         also read as ids (in and out of range) to decode.
#include "models/tokenizer.h"
#include "tests/fuzz/fuzz_common.h"
#include "tests/fuzz/seeds.h"

namespace {

void exercise(const kvd::Tokenizer& t, std::string_view text) {
  kvd::fuzz::expect_clean([&] {
    const std::vector<int32_t> ids = t.encode(text, kvd::AddSpecial::Yes);
    const std::string back = t.decode(ids);
    kvd::Detokenizer d(t);
    std::string streamed;
    for (int32_t id : ids) streamed += d.push(id);
    streamed += d.flush();
    if (streamed != back) std::abort();
  });
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const std::string_view rest(reinterpret_cast<const char*>(data) + 1, size - 1);
  if (data[0] % 2 == 0) {
    kvd::fuzz::expect_clean([&] {
      const kvd::Tokenizer t = kvd::Tokenizer::from_json(rest, "fuzz/tokenizer.json");
      if (t.vocab_size() < 0) std::abort();
      exercise(t, "Hello world, 123 <|im_end|> caf\xc3\xa9  \xe4\xb8\xad\xe6\x96\x87!");
      exercise(t, std::string(rest.substr(0, 64)));
    });
    return 0;
  }
  static const kvd::Tokenizer gpt2 = kvd::Tokenizer::from_json(kvd::fuzz::seeds::tokenizer_json(0), "gpt2-style");
  static const kvd::Tokenizer qwen = kvd::Tokenizer::from_json(kvd::fuzz::seeds::tokenizer_json(1), "qwen2-style");
  const kvd::Tokenizer& t = (data[0] & 2) ? qwen : gpt2;
  exercise(t, rest);
  std::vector<int32_t> ids;
  for (size_t i = 0; i + 1 < rest.size(); i += 2)
    ids.push_back(int32_t{static_cast<uint8_t>(rest[i])} + int32_t{static_cast<int8_t>(rest[i + 1])} * 256);
  kvd::fuzz::expect_clean([&] { (void)t.decode(ids, kvd::SkipSpecial::Yes); });
  kvd::fuzz::expect_clean([&] {
    kvd::Detokenizer d(t, kvd::SkipSpecial::No);
    for (int32_t id : ids) (void)d.push(id);
    (void)d.flush();
  });
  return 0;
}
