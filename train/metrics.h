// Training metrics: a JSONL log with one object per optimizer step (rank 0 writes it), and a live
// progress line on rank 0 (step/total, loss, tokens/s, ETA).
//
//   <out_dir>/metrics.jsonl
//   {"step": 12, "loss": 3.21, "kl": 0.8, "ce": 2.4, "capacity": 0.01, "lr": 0.001, "grad_norm": 0.5,
//    "tokens": 4096, "tokens_per_s": 1830.2, "step_s": 2.2, "rss_mb": 812, "cuda_max_alloc_mb": 0}
#pragma once

#include <chrono>
#include <cstdint>
#include <fstream>
#include <string>

#include <nlohmann/json.hpp>

namespace kvd {

enum class ProgressMode { Live, Lines, Never };
// "auto" -> Live on a terminal, else Lines.
ProgressMode progress_mode(const std::string& s);

class MetricsLog {
 public:
  // Appends to `path`. A run resumed at step `resume_step` > 0 first drops the lines of later steps (written
  // by the interrupted run after its last checkpoint), so every step appears once.
  explicit MetricsLog(const std::string& path, int64_t resume_step = 0);
  void write(const nlohmann::ordered_json& record);  // one line, flushed

 private:
  std::string path_;
  std::ofstream out_;
};

class ProgressLine {
 public:
  ProgressLine(int64_t first_step, int64_t total_steps, ProgressMode mode);
  // After step `step` (1-based count of steps done).
  void update(int64_t step, double loss, double tokens_per_s, const std::string& extra = "");
  // Prints a message on its own line (keeps the live line intact).
  void message(const std::string& text);
  void finish();

 private:
  int64_t first_, total_;
  ProgressMode mode_;
  std::chrono::steady_clock::time_point t0_ = std::chrono::steady_clock::now();
  bool live_open_ = false;
};

// Resident set size of this process, MiB.
double rss_mib();
// Peak CUDA memory allocated on the current device, MiB (0 without CUDA).
double cuda_max_allocated_mib();
// "1h02m", "3m05s", "12s".
std::string format_duration(double seconds);

}  // namespace kvd
