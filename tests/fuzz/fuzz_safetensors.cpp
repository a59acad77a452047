// Fuzz target: a .safetensors file (8-byte header length, JSON header, tensor offsets). Every tensor
// the reader accepts is read end to end, so an offset past the mapping shows up.
#include "models/safetensors.h"
#include "tests/fuzz/fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string path = kvd::fuzz::scratch_path("model.safetensors");
  kvd::fuzz::write_bytes(path, data, size);
  kvd::fuzz::expect_clean([&] {
    kvd::SafetensorsFile f(path);
    unsigned sum = 0;
    for (const kvd::TensorView& t : f.tensors()) {
      if (t.numel() * static_cast<int64_t>(kvd::dtype_size(t.dtype)) != static_cast<int64_t>(t.nbytes)) std::abort();
      for (size_t i = 0; i < t.nbytes; ++i) sum += t.data[i];
      if (f.find(t.name) != &t) std::abort();
    }
    for (const auto& [k, v] : f.metadata()) sum += static_cast<unsigned>(k.size() + v.size());
    volatile unsigned sink = sum;
    (void)sink;
  });
  return 0;
}
