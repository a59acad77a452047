// Training checkpoints (train/checkpoint.h): atomic directory writes, keep-last-K, exact round trips of
// parameters and AdamW state, and refusal of another component's or model's checkpoint.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <string>

#include <torch/torch.h>

#include "common/error.h"
#include "common/fs.h"
#include "train/checkpoint.h"

namespace kvd {
namespace {

struct TempDir {
  std::string path;
  TempDir() {
    char tmpl[] = "/tmp/kvd_ckpt_XXXXXX";
    path = ::mkdtemp(tmpl);
  }
  ~TempDir() { remove_tree(path); }
};

bool exists(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0;
}

const CheckpointIdentity kId{"retention_gate", "tiny", "abc123"};

CheckpointMeta meta_at(int64_t step) {
  CheckpointMeta m;
  m.step = step;
  m.cursor = {{"epoch", 0}, {"step", step}};
  m.config = {{"train.steps", 10}};
  m.identity = kId;
  return m;
}

// A module and an AdamW that has taken `steps` steps.
struct Trained {
  torch::nn::Linear lin{nullptr};
  std::unique_ptr<torch::optim::AdamW> opt;
  explicit Trained(int steps, uint64_t seed = 0) {
    torch::manual_seed(seed);
    lin = torch::nn::Linear(5, 3);
    opt = std::make_unique<torch::optim::AdamW>(lin->parameters(), torch::optim::AdamWOptions(0.01));
    for (int i = 0; i < steps; ++i) step();
  }
  void step() {
    opt->zero_grad();
    lin->forward(torch::ones({2, 5})).pow(2).sum().backward();
    opt->step();
  }
};

TEST(Checkpoint, SaveLoadIsExactAndContinuesBitwise) {
  TempDir t;
  Trained a(3);
  const std::string dir = save_training_checkpoint(t.path, meta_at(3), *a.lin, *a.opt, 2);
  EXPECT_EQ(dir, t.path + "/step_00000003");
  EXPECT_EQ(latest_checkpoint(t.path), dir);

  Trained b(0, /*seed=*/7);  // other initial weights, fresh optimizer
  const CheckpointMeta m = read_checkpoint_meta(dir, kId);
  EXPECT_EQ(m.step, 3);
  EXPECT_EQ(m.cursor["step"], 3);
  load_training_state(dir, *b.lin, *b.opt);
  EXPECT_TRUE(torch::equal(a.lin->weight, b.lin->weight));
  // Two more steps from the restored state equal two more uninterrupted steps, bitwise (AdamW moments and
  // step counts were restored).
  a.step(); a.step();
  b.step(); b.step();
  EXPECT_TRUE(torch::equal(a.lin->weight, b.lin->weight));
  EXPECT_TRUE(torch::equal(a.lin->bias, b.lin->bias));
}

TEST(Checkpoint, FailedWriteLeavesThePreviousOneIntact) {
  TempDir t;
  Trained a(1);
  const std::string first = save_training_checkpoint(t.path, meta_at(1), *a.lin, *a.opt, 3);
  // A save that dies half-way (after writing a file): nothing of it is visible.
  EXPECT_THROW(save_checkpoint_dir(t.path, checkpoint_name(2),
                                   [](const std::string& tmp) {
                                     write_file_atomic(tmp + "/weights.safetensors", std::string("partial"));
                                     throw Error("disk full");
                                   },
                                   3),
               Error);
  EXPECT_EQ(latest_checkpoint(t.path), first);
  EXPECT_FALSE(exists(t.path + "/step_00000002"));
  // A process killed mid-write leaves a .tmp.* directory (and possibly a step dir without state.json): both
  // are ignored by loading, and the temporary is cleaned by the next save.
  ASSERT_EQ(::mkdir((t.path + "/.tmp.step_00000002.99999").c_str(), 0755), 0);
  write_file_atomic(t.path + "/.tmp.step_00000002.99999/weights.safetensors", std::string("partial"));
  ASSERT_EQ(::mkdir((t.path + "/step_00000005").c_str(), 0755), 0);  // no state.json: incomplete
  EXPECT_EQ(latest_checkpoint(t.path), first);
  Trained b(0);
  load_training_state(latest_checkpoint(t.path), *b.lin, *b.opt);
  EXPECT_TRUE(torch::equal(a.lin->weight, b.lin->weight));
  save_training_checkpoint(t.path, meta_at(2), *a.lin, *a.opt, 3);
  EXPECT_FALSE(exists(t.path + "/.tmp.step_00000002.99999"));
  EXPECT_EQ(latest_checkpoint(t.path), t.path + "/step_00000002");
}

TEST(Checkpoint, KeepsTheLastK) {
  TempDir t;
  Trained a(1);
  for (int s = 1; s <= 5; ++s) save_training_checkpoint(t.path, meta_at(s), *a.lin, *a.opt, 2);
  const auto all = list_checkpoints(t.path);
  ASSERT_EQ(all.size(), 2u);
  EXPECT_EQ(all[0], t.path + "/step_00000004");
  EXPECT_EQ(all[1], t.path + "/step_00000005");
}

TEST(Checkpoint, AnotherComponentOrModelRefusesToLoad) {
  TempDir t;
  Trained a(1);
  const std::string dir = save_training_checkpoint(t.path, meta_at(1), *a.lin, *a.opt, 2);
  try {
    read_checkpoint_meta(dir, {"soft_queries", "tiny", "abc123"});
    FAIL();
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("component 'retention_gate'"), std::string::npos) << m;
    EXPECT_NE(m.find("soft_queries"), std::string::npos) << m;
  }
  try {
    read_checkpoint_meta(dir, {"retention_gate", "other-model", "ffff00"});
    FAIL();
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("model 'tiny'"), std::string::npos) << m;
    EXPECT_NE(m.find("other-model"), std::string::npos) << m;
  }
  // Another shape of the component (e.g. another component.hidden) is refused by name as well.
  torch::nn::Linear other(4, 3);
  torch::optim::AdamW opt(other->parameters(), torch::optim::AdamWOptions(0.01));
  EXPECT_THROW(load_training_state(dir, *other, opt), Error);
  EXPECT_THROW(read_checkpoint_meta(t.path + "/nothing", kId), Error);
}

}  // namespace
}  // namespace kvd
