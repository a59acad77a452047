// Fuzz target: a Hugging Face config.json, resolved into a ModelConfig and printed back.
#include <nlohmann/json.hpp>

#include "models/config.h"
#include "tests/fuzz/fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string path = kvd::fuzz::scratch_path("config.json");
  kvd::fuzz::write_bytes(path, data, size);
  kvd::fuzz::expect_clean([&] {
    const kvd::ModelConfig c = kvd::load_config(path);
    (void)c.to_json().dump();
  });
  return 0;
}
