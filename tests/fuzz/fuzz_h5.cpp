// Fuzz target: a packed_text HDF5 dataset (root attributes, CSR offsets, declared sizes) built from the
// input by h5_recipe.h and read through PackedTextReader, every sequence of both splits.
#include "data/packed_text.h"
#include "tests/fuzz/fuzz_common.h"
#include "tests/fuzz/h5_recipe.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string path = kvd::fuzz::scratch_path("data.h5");
  kvd::fuzz::h5recipe::build(kvd::fuzz::h5recipe::decode(data, size), path);
  kvd::fuzz::expect_clean([&] {
    const kvd::PackedTextReader r = kvd::PackedTextReader::open(path);
    for (kvd::Split s : {kvd::Split::Train, kvd::Split::Val}) {
      const kvd::PackedSplitReader sr = r.split(s);
      for (int64_t i = 0; i < sr.size() && i < 256; ++i) {
        const kvd::PackedSequence q = sr.get(i);
        if (static_cast<int64_t>(q.tokens.size()) != sr.length(i) || q.positions.size() != q.tokens.size()) std::abort();
        if (static_cast<int64_t>(q.tokens.size()) > r.info().seq_len) std::abort();
      }
    }
  });
  return 0;
}
