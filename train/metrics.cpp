#include "train/metrics.h"

#include <unistd.h>

#include <cstdio>
#include <iostream>

#include "common/error.h"
#include "common/fs.h"

#if defined(KVD_WITH_CUDA)
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

namespace kvd {

ProgressMode progress_mode(const std::string& s) {
  if (s == "never") return ProgressMode::Never;
  if (s == "lines") return ProgressMode::Lines;
  return ::isatty(STDERR_FILENO) ? ProgressMode::Live : ProgressMode::Lines;
}

namespace {
void drop_lines_after(const std::string& path, int64_t step) {
  std::ifstream in(path);
  if (!in) return;
  std::string kept, line;
  while (std::getline(in, line)) {
    nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_object() && j.contains("step") && (!j["step"].is_number_integer() || j["step"].get<int64_t>() > step))
      continue;
    kept += line + "\n";
  }
  write_file_atomic(path, kept);
}
}  // namespace

MetricsLog::MetricsLog(const std::string& path, int64_t resume_step) : path_(path) {
  // A run that starts from scratch in a directory where an earlier run was killed before its first
  // checkpoint starts a new log.
  if (resume_step > 0) drop_lines_after(path, resume_step);
  else write_file_atomic(path, std::string());
  out_.open(path, std::ios::app);
  KVD_CHECK(out_.good(), "cannot open ", path, " for writing; check train.out_dir");
}

void MetricsLog::write(const nlohmann::ordered_json& record) {
  out_ << record.dump() << "\n";
  out_.flush();
  KVD_CHECK(out_.good(), "cannot write ", path_, " (disk full?)");
}

std::string format_duration(double s) {
  char buf[32];
  if (s < 0) s = 0;
  const long t = static_cast<long>(s + 0.5);
  if (t >= 3600) std::snprintf(buf, sizeof buf, "%ldh%02ldm", t / 3600, (t / 60) % 60);
  else if (t >= 60) std::snprintf(buf, sizeof buf, "%ldm%02lds", t / 60, t % 60);
  else std::snprintf(buf, sizeof buf, "%lds", t);
  return buf;
}

ProgressLine::ProgressLine(int64_t first_step, int64_t total_steps, ProgressMode mode)
    : first_(first_step), total_(total_steps), mode_(mode) {}

void ProgressLine::update(int64_t step, double loss, double tokens_per_s, const std::string& extra) {
  if (mode_ == ProgressMode::Never) return;
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
  const int64_t done = step - first_;
  const double eta = done > 0 ? elapsed / done * (total_ - step) : 0;
  char buf[256];
  std::snprintf(buf, sizeof buf, "step %lld/%lld  loss %.4f  %.0f tok/s  elapsed %s  ETA %s",
                static_cast<long long>(step), static_cast<long long>(total_), loss, tokens_per_s,
                format_duration(elapsed).c_str(), format_duration(eta).c_str());
  if (mode_ == ProgressMode::Live) {
    std::cerr << "\r\033[K" << buf << extra << std::flush;
    live_open_ = true;
  } else {
    std::cerr << buf << extra << "\n";
  }
}

void ProgressLine::message(const std::string& text) {
  if (mode_ == ProgressMode::Never) return;
  if (live_open_) std::cerr << "\r\033[K";
  std::cerr << text << "\n";
  live_open_ = false;
}

void ProgressLine::finish() {
  if (live_open_) std::cerr << "\n";
  live_open_ = false;
}

double rss_mib() {
  FILE* f = std::fopen("/proc/self/statm", "r");
  if (!f) return 0;
  long pages = 0, rss = 0;
  const int n = std::fscanf(f, "%ld %ld", &pages, &rss);
  std::fclose(f);
  return n == 2 ? rss * (::sysconf(_SC_PAGESIZE) / 1048576.0) : 0;
}

double cuda_max_allocated_mib() {
#if defined(KVD_WITH_CUDA)
  if (c10::cuda::device_count() == 0) return 0;
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(c10::cuda::current_device());
  return stats.allocated_bytes[0].peak / 1048576.0;  // [0]: StatType::AGGREGATE
#else
  return 0;
#endif
}

}  // namespace kvd
