#include "models/profile.h"

#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>

#include <torch/torch.h>

namespace kvd {
namespace {

struct SectionTotals {
  const bool on = std::getenv("KVD_PROFILE") != nullptr;
  std::map<std::string, std::pair<double, int64_t>> sec;  // name -> (seconds, calls)
  ~SectionTotals() {
    if (!on || sec.empty()) return;
    std::fprintf(stderr, "[profile] timed sections (KVD_PROFILE; percentages of their group):\n");
    std::map<std::string, double> group;  // the prefix before the first space
    for (const auto& [name, v] : sec) group[name.substr(0, name.find(' '))] += v.first;
    for (const auto& [name, v] : sec) {
      const double all = group[name.substr(0, name.find(' '))];
      std::fprintf(stderr, "[profile] %-30s %9.3f s %5.1f%% %9lld calls\n", name.c_str(), v.first,
                   100.0 * v.first / std::max(all, 1e-12), static_cast<long long>(v.second));
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
  mark();
  auto& e = section_totals().sec[std::string(prefix_) + name];
  e.first += std::chrono::duration<double>(t_ - t0).count();
  e.second += 1;
}

void ProfileLap::mark() {
  if (!on_) return;
  if (cuda_) torch::cuda::synchronize();
  t_ = std::chrono::steady_clock::now();
}

}  // namespace kvd
