// KVD_PROFILE=1 in the environment: the inference forwards (prefill / decode), the eval, compression and the
// training step (trainer and distillation objective) time their sections and count the LibTorch ops each calls
// (a proxy for kernel launches), with the device synchronized at every boundary so that the sections add up, and
// print the totals at exit. For finding where time goes; the synchronization itself slows the run.
#pragma once

#include <chrono>
#include <cstdint>

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
  int64_t ops_ = 0;  // LibTorch ops called so far, at the last mark

};

}  // namespace kvd
