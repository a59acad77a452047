// kvdistill train --config run.yaml [key=value ...] [--resume auto|none|PATH]: distills a learned part
// from the frozen model (train/trainer.h). Launch with torchrun (`torchrun --no-python --nproc-per-node=N
// kvdistill train ...`) or srun for data-parallel runs.
#include <CLI/CLI.hpp>
#include <c10/util/Exception.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <iostream>

#include "cli/commands.h"
#include "common/error.h"
#include "gates/components.h"
#include "train/config.h"
#include "train/distributed.h"
#include "train/trainer.h"

namespace kvd::cli {
namespace {

struct TrainArgs {
  std::string config;
  std::vector<std::string> overrides;
  std::string resume = "auto";
  bool list_keys = false;
};

void print_key(const ConfigKey& k) {
  std::printf("%-26s %-8s %-16s %s\n", k.key, value_type_short(k.type), *k.value ? k.value : "\"\"", k.doc);
}

// The general keys, then each component kind's own options and loss weights.
int list_keys() {
  std::printf("%-26s %-8s %-16s %s\n", "key", "type", "default", "meaning");
  for (const ConfigKey& k : config_keys()) print_key(k);
  for (const std::string& kind : component_kinds()) {
    const ComponentSpec& spec = component_spec(kind, "--list-keys");
    std::printf("\ncomponent.kind: %s  (%s)\n", kind.c_str(), spec.doc.c_str());
    for (const ConfigKey& k : spec.options) print_key(k);
    for (const ConfigKey& k : spec.losses) print_key(k);
  }
  return 0;
}

int run(const TrainArgs& a) {
  if (a.list_keys) return list_keys();
  KVD_CHECK(!a.config.empty(), "kvdistill train needs --config run.yaml (see configs/; --list-keys prints every key)");
  const RunConfig cfg = load_config(a.config, a.overrides);
  const ResumeRequest resume = parse_resume(a.resume);
  int world = 1, rank = 0;
  try {
    const RankInfo r = discover_ranks();
    world = r.world_size;
    rank = r.rank;
  } catch (...) {
  }
  // Stopped by SIGTERM / SIGINT after a checkpoint: say where, and exit as the signal would (128 + its number).
  auto finish = [&](const TrainResult& r) {
    if (r.stop_signal == 0) return 0;
    if (rank == 0)
      std::fprintf(stderr, "kvdistill: stopped by %s after step %lld of %lld%s%s; rerun with --resume auto to continue\n",
                   r.stop_signal == SIGINT ? "SIGINT" : "SIGTERM", static_cast<long long>(r.steps_done),
                   static_cast<long long>(cfg.steps), r.last_checkpoint.empty() ? "" : ", saved ",
                   r.last_checkpoint.c_str());
    return 128 + r.stop_signal;
  };
  if (world == 1) return finish(train(cfg, resume));
  // Data-parallel: an error ends this rank at once, without tearing down a process group whose peers may be
  // gone (the trainer has told them why through the store).
  try {
    return finish(train(cfg, resume));
  } catch (const kvd::Error& e) {
    std::fprintf(stderr, "kvdistill: error: rank %d: %s\n", rank, e.what());
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "kvdistill: error: rank %d: %s\n", rank, e.what_without_backtrace());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kvdistill: error: rank %d: %s\n", rank, e.what());
  }
  std::fflush(stdout);
  std::fflush(stderr);
  std::_Exit(1);
}

Registration reg([](CLI::App& root) {
  auto a = std::make_shared<TrainArgs>();
  CLI::App* sub = root.add_subcommand("train", "Distill a learned KV-cache part (e.g. TRIM-KV retention gates) from the frozen model");
  sub->add_option("--config", a->config, "YAML run config (examples in configs/)");
  sub->add_option("overrides", a->overrides, "Dotted overrides, e.g. train.steps=100 train.out_dir=runs/x component.budget=64");
  sub->add_option("--resume", a->resume, "auto (latest checkpoint in train.out_dir, if any), none, or a checkpoint directory")
      ->capture_default_str();
  sub->add_flag("--list-keys", a->list_keys, "Print every config key with its type, default and meaning");
  on_run(sub, [a] { return run(*a); });
});

}  // namespace
}  // namespace kvd::cli
