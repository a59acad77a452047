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
#include "gates/component.h"
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

// A packed training batch of 2 rows of T tokens (T >= 8): row 0 holds two documents (the second from T/2 − 3),
// row 1 one document then 5 padding positions (doc id −1); labels are the next token within a document.
inline TrainBatch packed_batch(int64_t vocab, int64_t T, uint64_t seed) {
  torch::manual_seed(seed);
  TrainBatch tb;
  tb.ids = torch::randint(vocab, {2, T}, torch::kLong);
  tb.doc_ids = torch::zeros({2, T}, torch::kLong);
  tb.positions = torch::arange(T, torch::kLong).repeat({2, 1});
  const int64_t cut = T / 2 - 3, pad = T - 5;
  tb.doc_ids[0].narrow(0, cut, T - cut).fill_(1);
  tb.positions[0].narrow(0, cut, T - cut).copy_(torch::arange(T - cut, torch::kLong));
  tb.doc_ids[1].narrow(0, pad, T - pad).fill_(-1);
  tb.positions[1].narrow(0, pad, T - pad).fill_(0);
  tb.labels = torch::full({2, T}, -100, torch::kLong);
  for (int64_t b = 0; b < 2; ++b)
    for (int64_t t = 0; t + 1 < T; ++t)
      if (tb.doc_ids[b][t].item<int64_t>() >= 0 && tb.doc_ids[b][t].item<int64_t>() == tb.doc_ids[b][t + 1].item<int64_t>())
        tb.labels[b][t] = tb.ids[b][t + 1];
  return tb;
}

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
