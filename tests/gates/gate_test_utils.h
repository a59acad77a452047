// Helpers shared by the learned-part tests of tests/gates: the oracle's tiny models (loaded once per family and
// dtype), a float64 max-abs difference, a temporary directory and the message of a kvd::Error.
#pragma once

#include <unistd.h>

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>

#include <torch/torch.h>

#include "common/error.h"
#include "common/fs.h"
#include "models/model.h"
#include "test_paths.h"

namespace kvd::test {

// build/testdata/decoder_golden/<family>: a 2-layer random model of the family (tests/oracles/decoder_golden.py).
inline const Model& tiny_model(const std::string& family, c10::ScalarType dtype) {
  static std::map<std::pair<std::string, int>, std::unique_ptr<Model>> cache;
  auto key = std::make_pair(family, static_cast<int>(dtype));
  auto it = cache.find(key);
  if (it == cache.end())
    it = cache
             .emplace(key, std::make_unique<Model>(Model::load(std::string(KVD_TESTDATA) + "/decoder_golden/" + family,
                                                               torch::kCPU, dtype)))
             .first;
  return *it->second;
}

inline double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(torch::kDouble) - b.to(torch::kDouble)).abs().max().item<double>();
}

// A fresh directory under /tmp, removed with everything in it when the object goes.
struct TempDir {
  std::string path;
  TempDir() {
    char tmpl[] = "/tmp/kvd_test_XXXXXX";
    path = ::mkdtemp(tmpl);
  }
  ~TempDir() { remove_tree(path); }
};

// The message of the kvd::Error that f throws, or "" when it throws none.
inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace kvd::test
