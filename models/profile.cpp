#include "models/profile.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <set>
#include <string>

#include <ATen/record_function.h>
#include <torch/csrc/autograd/profiler_kineto.h>
#include <torch/torch.h>

namespace kvd {
namespace {

// The LibTorch ops our code calls (outermost only: an op's own inner ops are not counted), a proxy for kernel
// launches where a run is launch-bound.
std::atomic<int64_t> g_ops{0};
thread_local int t_depth = 0;

struct Section {
  double seconds = 0;
  int64_t calls = 0, ops = 0;
};

struct SectionTotals {
  const bool on = std::getenv("KVD_PROFILE") != nullptr;
  std::mutex mu;                        // eval --workers: laps from several threads
  std::map<std::string, Section> sec;  // name -> totals
  SectionTotals() {
    if (!on) return;
    at::addGlobalCallback(at::RecordFunctionCallback(
                              [](const at::RecordFunction&) -> std::unique_ptr<at::ObserverContext> {
                                if (t_depth++ == 0) g_ops.fetch_add(1, std::memory_order_relaxed);
                                return nullptr;
                              },
                              [](const at::RecordFunction&, at::ObserverContext*) { --t_depth; })
                              .scopes({at::RecordScope::FUNCTION}));
  }
  ~SectionTotals() {
    if (!on || sec.empty()) return;
    std::fprintf(stderr, "[profile] timed sections (KVD_PROFILE; percentages of their group):\n");
    std::map<std::string, double> group;  // the prefix before the first space
    for (const auto& [name, v] : sec) group[name.substr(0, name.find(' '))] += v.seconds;
    for (const auto& [name, v] : sec) {
      const double all = group[name.substr(0, name.find(' '))];
      std::fprintf(stderr, "[profile] %-30s %9.3f s %5.1f%% %9lld calls %10lld ops\n", name.c_str(), v.seconds,
                   100.0 * v.seconds / std::max(all, 1e-12), static_cast<long long>(v.calls),
                   static_cast<long long>(v.ops));
    }
  }
};
SectionTotals& section_totals() {
  static SectionTotals t;
  return t;
}

}  // namespace

bool profiling() { return section_totals().on; }

ProfileLap::ProfileLap(c10::Device d, const char* prefix)
    : on_(section_totals().on), cuda_(d.is_cuda()), prefix_(prefix) {
  mark();
}

void ProfileLap::operator()(const char* name) {
  if (!on_) return;
  const auto t0 = t_;
  const int64_t ops0 = ops_;
  mark();
  SectionTotals& totals = section_totals();
  std::lock_guard<std::mutex> lock(totals.mu);
  Section& e = totals.sec[std::string(prefix_) + name];
  e.seconds += std::chrono::duration<double>(t_ - t0).count();
  e.calls += 1;
  e.ops += ops_ - ops0;
}

void ProfileLap::mark() {
  if (!on_) return;
  if (cuda_) torch::cuda::synchronize();
  t_ = std::chrono::steady_clock::now();
  ops_ = g_ops.load(std::memory_order_relaxed);
}

TraceScope::TraceScope() {
  const char* path = std::getenv("KVD_TRACE");
  if (!path || !*path) return;
  namespace prof = torch::profiler::impl;
  std::set<prof::ActivityType> what{prof::ActivityType::CPU};
  if (torch::cuda::is_available()) what.insert(prof::ActivityType::CUDA);
  const prof::ProfilerConfig config(prof::ProfilerState::KINETO, /*report_input_shapes=*/true);
  torch::autograd::profiler::prepareProfiler(config, what);
  torch::autograd::profiler::enableProfiler(config, what);
  on_ = true;
  std::fprintf(stderr, "[trace] recording to %s (KVD_TRACE)\n", path);
}

TraceScope::~TraceScope() {
  if (!on_) return;
  const std::string path = std::getenv("KVD_TRACE");
  try {
    if (torch::cuda::is_available()) torch::cuda::synchronize();
    std::unique_ptr<torch::autograd::profiler::ProfilerResult> r = torch::autograd::profiler::disableProfiler();
    r->save(path);
    std::fprintf(stderr, "[trace] wrote %s: summarize it with scripts/trace_summary.py %s\n", path.c_str(),
                 path.c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "[trace] could not write %s: %s\n", path.c_str(), e.what());
  }
}

}  // namespace kvd
