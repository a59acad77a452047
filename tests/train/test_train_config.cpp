// Run configs (train/config.h) and the learning-rate schedule (train/trainer.h).
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "common/error.h"
#include "train/config.h"
#include "train/trainer.h"
#include "test_paths.h"

namespace kvd {
namespace {

const char* kBase = R"(
model: {dir: /models/x}
data:
  train: /data/x.h5
train:
  steps: 20
  lr: 0.01
)";

// The message of the kvd::Error thrown by resolve_config, or "" if none.
std::string error_of(const std::string& yaml, std::vector<std::string> overrides = {}) {
  try {
    resolve_config(yaml, "run.yaml", overrides);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(Config, DefaultsFileAndOverridesResolveInOrder) {
  RunConfig c = resolve_config(kBase, "run.yaml", {"train.steps=100", "train.out_dir=runs/x", "train.seed=3",
                                                   "loss.kl=0.5", "component.budget=64"});
  EXPECT_EQ(c.model_dir, "/models/x");
  EXPECT_EQ(c.steps, 100);            // override beats the file
  EXPECT_DOUBLE_EQ(c.lr, 0.01);       // file beats the default
  EXPECT_DOUBLE_EQ(c.min_lr, 1e-4);   // default
  EXPECT_EQ(c.out_dir, "runs/x");
  EXPECT_EQ(c.seed, 3);
  EXPECT_DOUBLE_EQ(c.loss_weight("kl"), 0.5);
  EXPECT_DOUBLE_EQ(c.loss_weight("capacity"), 1.0);  // the component's default weight
  EXPECT_EQ(c.component.at("budget").get<int64_t>(), 64);
  EXPECT_EQ(c.component.at("hidden").get<int64_t>(), 512);
  EXPECT_EQ(c.component_kind, "retention_gate");
  EXPECT_THROW(c.loss_weight("mse"), Error);  // the retention gate has no such term
  // Every documented key is resolved, in table order: the general ones plus the component's own.
  EXPECT_EQ(c.values.size(), config_keys_for("retention_gate").size());
  EXPECT_EQ(c.values.begin().key(), "model.dir");
  EXPECT_NE(c.to_text().find("train.steps: 100\n"), std::string::npos);
}

TEST(Config, StoredValuesRoundTrip) {
  RunConfig c = resolve_config(kBase, "run.yaml", {"train.batch_size=4"});
  RunConfig d = config_from_values(c.values, "state.json");
  EXPECT_EQ(d.values, c.values);
  EXPECT_EQ(d.batch_size, 4);
}

TEST(Config, UnknownKeyIsNamed) {
  std::string e = error_of(std::string(kBase) + "loss:\n  kll: 1.0\n");
  EXPECT_NE(e.find("'loss.kll'"), std::string::npos) << e;
  EXPECT_NE(e.find("unknown"), std::string::npos) << e;
  EXPECT_NE(e.find("loss.kl"), std::string::npos) << e;  // lists the known keys of the section
  e = error_of(kBase, {"train.stepz=3"});
  EXPECT_NE(e.find("'train.stepz'"), std::string::npos) << e;
  e = error_of(kBase, {"train.steps"});
  EXPECT_NE(e.find("key=value"), std::string::npos) << e;
}

TEST(Config, WrongTypeIsNamed) {
  std::string e = error_of(kBase, {"train.steps=ten"});
  EXPECT_NE(e.find("'train.steps'"), std::string::npos) << e;
  EXPECT_NE(e.find("integer"), std::string::npos) << e;
  e = error_of(std::string(kBase) + "component: {budget: 1.5}\n");
  EXPECT_NE(e.find("'component.budget'"), std::string::npos) << e;
  e = error_of(std::string(kBase) + "loss: {kl: [1, 2]}\n");
  EXPECT_NE(e.find("'loss.kl'"), std::string::npos) << e;
}

TEST(Config, ImpossibleValueIsNamed) {
  EXPECT_NE(error_of(kBase, {"component.budget=0"}).find("'component.budget'"), std::string::npos);
  EXPECT_NE(error_of(kBase, {"component.budget=-5"}).find("M must be in [1, "), std::string::npos);
  EXPECT_NE(error_of(kBase, {"train.lr=-0.1"}).find("'train.lr'"), std::string::npos);
  EXPECT_NE(error_of(kBase, {"train.steps=0"}).find("'train.steps'"), std::string::npos);
  EXPECT_NE(error_of(kBase, {"dist.backend=mpi"}).find("'dist.backend'"), std::string::npos);
  EXPECT_NE(error_of("train: {steps: 3}\n").find("'model.dir'"), std::string::npos);
  EXPECT_NE(error_of("model: [1\n").find("not valid YAML"), std::string::npos);
  EXPECT_EQ(error_of(kBase), "");
}

TEST(Config, ActivationCheckpointingIsATypedEnum) {
  EXPECT_EQ(resolve_config(kBase, "run.yaml", {}).activation_checkpointing, ActivationCheckpointing::None);
  RunConfig c = resolve_config(std::string(kBase) + "  activation_checkpointing: layers\n", "run.yaml", {});
  EXPECT_EQ(c.activation_checkpointing, ActivationCheckpointing::Layers);
  EXPECT_EQ(config_from_values(c.values, "state.json").activation_checkpointing, ActivationCheckpointing::Layers);
  const std::string e = error_of(kBase, {"train.activation_checkpointing=true"});
  EXPECT_NE(e.find("'train.activation_checkpointing'"), std::string::npos) << e;
  EXPECT_NE(e.find("none | layers"), std::string::npos) << e;
}

TEST(Schedule, WarmupThenCosineToMinLr) {
  RunConfig c = resolve_config(kBase, "run.yaml", {"train.steps=110", "train.warmup=10", "train.lr=1.0",
                                                   "train.min_lr=0.1"});
  EXPECT_DOUBLE_EQ(lr_at(0, c), 0.1);   // (0 + 1) / 10
  EXPECT_DOUBLE_EQ(lr_at(4, c), 0.5);
  EXPECT_DOUBLE_EQ(lr_at(9, c), 1.0);   // end of warm-up
  EXPECT_DOUBLE_EQ(lr_at(10, c), 1.0);  // cosine starts at the peak
  // A third of the way through the decay (steps 10 .. 109, 99 intervals): cos(pi / 3) = 1/2.
  EXPECT_NEAR(lr_at(10 + 33, c), 0.1 + 0.45 * 1.5, 1e-12);
  EXPECT_DOUBLE_EQ(lr_at(109, c), 0.1);  // the last step is at min_lr
  for (int64_t s = 10; s < 109; ++s) EXPECT_GE(lr_at(s, c), lr_at(s + 1, c)) << s;  // monotone decay
  // No warm-up: the first step is at the peak.
  RunConfig d = resolve_config(kBase, "run.yaml", {"train.warmup=0", "train.lr=1.0", "train.min_lr=0"});
  EXPECT_DOUBLE_EQ(lr_at(0, d), 1.0);
  EXPECT_NEAR(lr_at(d.steps - 1, d), 0.0, 1e-15);
}

TEST(Config, ShippedConfigsResolve) {
  for (const char* name : {"demo-trimkv.yaml", "trimkv-smollm2.yaml"}) {
    RunConfig c = load_config(std::string(KVD_SOURCE_DIR) + "/configs/" + name, {});
    EXPECT_EQ(c.component_kind, "retention_gate") << name;
    EXPECT_GT(c.steps, 0) << name;
  }
  // The query-row configs: each resolves to its preset's options (auto values resolved in the factory).
  for (const auto& [name, preset] : std::vector<std::pair<std::string, std::string>>{
           {"judgeq-smollm2.yaml", "judgeq"}, {"lookahead-smollm2.yaml", "lookahead"}, {"demo-lookahead.yaml", "lookahead"}}) {
    RunConfig c = load_config(std::string(KVD_SOURCE_DIR) + "/configs/" + name, {});
    EXPECT_EQ(c.component_kind, "query_rows") << name;
    EXPECT_EQ(c.component.at("preset"), preset) << name;
    EXPECT_GT(c.steps, 0) << name;
  }
}

TEST(Resume, ParsesModes) {
  EXPECT_EQ(parse_resume("auto").mode, ResumeMode::Auto);
  EXPECT_EQ(parse_resume("none").mode, ResumeMode::None);
  ResumeRequest r = parse_resume("runs/x/checkpoints/step_00000004");
  EXPECT_EQ(r.mode, ResumeMode::Path);
  EXPECT_EQ(r.path, "runs/x/checkpoints/step_00000004");
}

}  // namespace
}  // namespace kvd
