// KVD_PROFILE=1 in the environment: the inference forwards (prefill / decode), the eval, compression and the
// training step (trainer and distillation objective) time their sections and count the LibTorch ops each calls
// (a proxy for kernel launches), with the device synchronized at every boundary so that the sections add up, and
// print the totals at exit. For finding where time goes; the synchronization itself slows the run. Under eval
// --workers the sections of the workers overlap and their ops count together: profile with one worker.
//
// KVD_TRACE=FILE.json: the whole command is recorded by the LibTorch profiler (Kineto: every op on the host and, on
// CUDA, every kernel and copy on the device, through CUPTI), with each op's input shapes and the user scopes of the
// code (the eval's "eval compress METHOD" and "eval answer METHOD"), and written to FILE.json as a Chrome trace
// when it ends. scripts/trace_summary.py reads it: how busy the GPU was, which kernels, ops (and shapes) and scopes
// took the device time. Nothing is
// synchronized, so the times are the run's own; keep the run short (a trace holds every op).
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

// KVD_TRACE's recording: started by the constructor, written by the destructor (nothing when KVD_TRACE is unset).
class TraceScope {
 public:
  TraceScope();
  ~TraceScope();
  TraceScope(const TraceScope&) = delete;
  TraceScope& operator=(const TraceScope&) = delete;

 private:
  bool on_ = false;
};

}  // namespace kvd
