// KVD_PROFILE=1 in the environment: the inference forwards (prefill / decode) and the training step
// (trainer and distillation objective) time their sections, with the device synchronized at every boundary so
// that the sections add up, and print the totals at exit. For finding where time goes; the synchronization
// itself slows the run.
#pragma once

#include <chrono>

#include <c10/core/Device.h>

namespace kvd {

bool profiling();  // KVD_PROFILE is set

// lap("name") charges the time since the previous lap (or construction) to prefix + "name".
class ProfileLap {
 public:
  ProfileLap(c10::Device d, const char* prefix);
  void operator()(const char* name);

 private:
  void mark();
  bool on_, cuda_;
  const char* prefix_;
  std::chrono::steady_clock::time_point t_;
};

}  // namespace kvd
