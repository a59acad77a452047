// Fuzz target: a GGUF file (header, metadata, tensor infos, data ranges), then what kvdistill does with
// it: dequantizes every tensor (every ggml type it supports) and builds the Hugging Face config,
// tokenizer and tokenizer_config from the metadata (`kvdistill convert`).
#include <nlohmann/json.hpp>

#include "models/convert.h"
#include "models/gguf.h"
#include "tests/fuzz/fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string path = kvd::fuzz::scratch_path("model.gguf");
  kvd::fuzz::write_bytes(path, data, size);
  kvd::fuzz::expect_clean([&] {
    kvd::GgufFile f(path);
    for (const auto& kv : f.metadata()) {
      const kvd::GgufValue& v = kv.second;
      kvd::fuzz::expect_clean([&] { (void)v.as_int(); });
      kvd::fuzz::expect_clean([&] { (void)v.as_double(); });
      kvd::fuzz::expect_clean([&] { (void)v.as_ints(); });
      kvd::fuzz::expect_clean([&] { (void)v.as_strings(); });
    }
    for (const kvd::GgufTensor& t : f.tensors()) {
      if (t.numel() > (1 << 20)) continue;  // the file is small; a big count was rejected or is virtual
      kvd::fuzz::expect_clean([&] {
        const std::vector<float> out = f.dequantize(t);
        if (static_cast<int64_t>(out.size()) != t.numel()) std::abort();
      });
    }
    kvd::fuzz::expect_clean([&] { (void)kvd::hf_config_from_gguf(f); });
    kvd::fuzz::expect_clean([&] { (void)kvd::hf_tokenizer_from_gguf(f); });
    kvd::fuzz::expect_clean([&] { (void)kvd::hf_tokenizer_config_from_gguf(f); });
    kvd::fuzz::expect_clean([&] { (void)kvd::hf_generation_config_from_gguf(f); });
  });
  return 0;
}
