// Rank discovery and the bucketed gradient all-reduce helper (train/distributed.h). The real Gloo path
// runs in tests/python/test_train_distributed.py (two processes).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <map>
#include <string>

#include "common/error.h"
#include "train/distributed.h"

namespace kvd {
namespace {

EnvFn env_of(const std::map<std::string, std::string>& m) {
  return [m](const char* n) -> const char* {
    auto it = m.find(n);
    return it == m.end() ? nullptr : it->second.c_str();
  };
}

TEST(Ranks, TorchrunEnvFirst) {
  RankInfo r = discover_ranks(env_of({{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "1"}, {"MASTER_ADDR", "10.0.0.1"},
                                      {"MASTER_PORT", "1234"}, {"SLURM_PROCID", "5"}, {"SLURM_NTASKS", "8"},
                                      {"TORCHELASTIC_USE_AGENT_STORE", "True"}}));
  EXPECT_EQ(r.source, LaunchSource::Torchrun);
  EXPECT_EQ(r.rank, 1);
  EXPECT_EQ(r.world_size, 2);
  EXPECT_EQ(r.local_rank, 1);
  EXPECT_EQ(r.master_addr, "10.0.0.1");
  EXPECT_EQ(r.master_port, 1234);
  EXPECT_TRUE(r.agent_store);
}

TEST(Ranks, SlurmWithScontrolHostnames) {
  std::string asked;
  RankInfo r = discover_ranks(env_of({{"SLURM_PROCID", "3"}, {"SLURM_NTASKS", "4"}, {"SLURM_LOCALID", "1"},
                                      {"SLURM_JOB_NODELIST", "node[07-08]"}}),
                              [&](const std::string& nl) {
                                asked = nl;
                                return std::vector<std::string>{"node07", "node08"};
                              });
  EXPECT_EQ(r.source, LaunchSource::Slurm);
  EXPECT_EQ(r.rank, 3);
  EXPECT_EQ(r.world_size, 4);
  EXPECT_EQ(r.local_rank, 1);
  EXPECT_EQ(asked, "node[07-08]");
  EXPECT_EQ(r.master_addr, "node07");
  EXPECT_EQ(r.master_port, 29500);
  EXPECT_FALSE(r.agent_store);
}

TEST(Ranks, SingleProcessFallbackAndBadValues) {
  RankInfo r = discover_ranks(env_of({}));
  EXPECT_EQ(r.source, LaunchSource::Single);
  EXPECT_EQ(r.world_size, 1);
  EXPECT_THROW(discover_ranks(env_of({{"RANK", "2"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "1"}})), Error);
  try {
    discover_ranks(env_of({{"RANK", "x"}, {"WORLD_SIZE", "2"}}));
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("RANK"), std::string::npos) << e.what();
  }
  try {
    discover_ranks(env_of({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_PORT", "29500"}}));
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("MASTER_ADDR"), std::string::npos) << e.what();
  }
}

TEST(BucketedAllreduce, SumsScalesAndCopiesBackPerBucket) {
  torch::manual_seed(0);
  // Awkward sizes; 4-byte floats: 19 + 111 + 1 + 989 + 7 elements.
  std::vector<at::Tensor> grads = {torch::randn({19}), torch::randn({3, 37}), torch::randn({1}), torch::randn({989}),
                                   torch::randn({7})};
  std::vector<at::Tensor> before;
  for (auto& g : grads) before.push_back(g.clone());
  // A fake 3-rank world whose other ranks hold 2x and 4x this rank's values: sum = 7x, average = 7/3 x.
  std::vector<int64_t> bucket_numel;
  const int64_t n = bucketed_allreduce(grads, 600 /* bytes = 150 floats */, [&](at::Tensor& flat) {
    bucket_numel.push_back(flat.numel());
    flat.mul_(7.0);
  }, 1.0 / 3.0);
  // Buckets of <= 150 floats: [19, 111, 1] (131), [989] (larger than a bucket: alone), [7].
  EXPECT_EQ(n, 3);
  EXPECT_EQ(bucket_numel, (std::vector<int64_t>{131, 989, 7}));
  for (size_t i = 0; i < grads.size(); ++i) {
    EXPECT_EQ(grads[i].sizes(), before[i].sizes());
    EXPECT_TRUE(torch::allclose(grads[i], before[i] * 7.0 / 3.0, 1e-6, 1e-7)) << i;
  }
  // Scale 1 and a bucket per tensor: values unchanged by an identity sum, bitwise.
  std::vector<at::Tensor> same = {before[0].clone(), before[1].clone()};
  EXPECT_EQ(bucketed_allreduce(same, 4, [](at::Tensor&) {}, 1.0), 2);
  EXPECT_TRUE(torch::equal(same[0], before[0]));
  EXPECT_TRUE(torch::equal(same[1], before[1]));
}

TEST(BucketedAllreduce, SingleProcessDistributedIsANoOp) {
  auto d = Distributed::init(RankInfo{}, CollectiveBackend::None, c10::Device(c10::kCPU), std::chrono::seconds(1));
  EXPECT_EQ(d->world_size(), 1);
  at::Tensor p = torch::ones({3}, torch::requires_grad());
  d->average_grads_({p}, 1024);  // no grad yet: zeros
  EXPECT_TRUE(torch::equal(p.grad(), torch::zeros({3})));
  EXPECT_DOUBLE_EQ(d->sum(2.5), 2.5);
}

}  // namespace
}  // namespace kvd
