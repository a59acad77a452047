// The LibTorch view of a training batch (data/batch_tensors.h): shapes, dtypes, values, and the
// segment-causal attention mask (no attention across packed documents or to padding).
#include "data/batch_tensors.h"

#include <gtest/gtest.h>

namespace kvd {
namespace {

TEST(BatchTensors, CopiesAndMasks) {
  Batch b;
  b.rows = 2;
  b.cols = 4;
  b.indices = {7, 3};
  b.tokens = {10, 11, 12, 13, 20, 21, 0, 0};
  b.positions = {0, 1, 0, 1, 0, 1, 0, 0};
  b.segments = {0, 0, 1, 1, 0, 0, -1, -1};
  b.lengths = {4, 2};
  const BatchTensors t = to_tensors(b);
  EXPECT_EQ(t.tokens.sizes(), (std::vector<int64_t>{2, 4}));
  EXPECT_EQ(t.tokens.dtype(), torch::kInt64);
  EXPECT_EQ(t.segments.dtype(), torch::kInt32);
  EXPECT_EQ(t.tokens[1][1].item<int64_t>(), 21);
  EXPECT_EQ(t.positions[0][3].item<int64_t>(), 1);
  EXPECT_EQ(t.indices[0].item<int64_t>(), 7);
  EXPECT_EQ(t.lengths[1].item<int64_t>(), 2);

  const torch::Tensor m = segment_causal_mask(t.segments);
  EXPECT_EQ(m.sizes(), (std::vector<int64_t>{2, 4, 4}));
  const torch::Tensor want0 = torch::tensor({1, 0, 0, 0,  //
                                             1, 1, 0, 0,  //
                                             0, 0, 1, 0,  //
                                             0, 0, 1, 1})
                                  .reshape({4, 4})
                                  .to(torch::kBool);
  EXPECT_TRUE(torch::equal(m[0], want0));
  const torch::Tensor want1 = torch::tensor({1, 0, 0, 0,  //
                                             1, 1, 0, 0,  //
                                             0, 0, 0, 0,  //
                                             0, 0, 0, 0})
                                  .reshape({4, 4})
                                  .to(torch::kBool);
  EXPECT_TRUE(torch::equal(m[1], want1));
}

}  // namespace
}  // namespace kvd
