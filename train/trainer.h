// The trainer: one loop for every learned part (DESIGN.md, "The abstractions"). It distills a Component
// from the frozen model: teacher = the model without mods (no grad), student = the model with the
// component's AttentionMods; loss = w_kl·KL + w_ce·CE + Σ w_r·regularizer_r. Data-parallel over c10d
// (train/distributed.h), resumable (train/checkpoint.h), logged (train/metrics.h).
#pragma once

#include <cstdint>
#include <string>

#include "train/config.h"

namespace kvd {

enum class ResumeMode { None, Auto, Path };

struct ResumeRequest {
  ResumeMode mode = ResumeMode::Auto;
  std::string path;  // ResumeMode::Path: a step_* checkpoint directory
};
// "auto" | "none" | a path.
ResumeRequest parse_resume(const std::string& s);

// The learning rate of optimizer step `step` (0-based): linear warm-up to cfg.lr over cfg.warmup steps,
// then cosine decay to cfg.min_lr at step cfg.steps - 1.
double lr_at(int64_t step, const RunConfig& cfg);

struct TrainResult {
  int64_t first_step = 0;        // where this invocation started (after a resume)
  int64_t steps_done = 0;        // optimizer steps done in total
  double last_loss = 0;
  std::string last_checkpoint;   // "" when none was written (ranks other than 0)
  int64_t skipped_steps = 0;     // steps whose update was dropped (train.on_nonfinite=skip)
  int stop_signal = 0;           // SIGTERM / SIGINT that stopped the run early (on any rank), after a checkpoint
                                 // of its last step; 0 when it ran to train.steps
};

// Test hook (docs/reliability.md): KVD_TEST_POISON="<what>@<step>[=nan|inf]" poisons, at that optimizer
// step (1-based), a loss term (<what> = kl, ce, capacity, ...) or the gradient (<what> = grad) with NaN
// (default) or +Inf; "sigterm@<step>" / "sigint@<step>" raises that signal in the middle of the step (after
// the first micro-batch's backward). Parsed once; {"", 0} when unset. Throws on a malformed value.
struct PoisonHook {
  std::string what;  // "" = off
  int64_t step = 0;
  double value = 0;
};
PoisonHook poison_hook_from_env();

// Runs the whole training described by `cfg`. Throws kvd::Error on bad input, a non-finite loss term or
// gradient with train.on_nonfinite=stop (naming the step and the term; nothing of that step is applied or
// saved), or a failed peer. With train.on_nonfinite=skip such a step's update is dropped and counted.
TrainResult train(const RunConfig& cfg, const ResumeRequest& resume);

}  // namespace kvd
