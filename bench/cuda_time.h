// Timing for the GPU benches: the median of CUDA-event-timed repetitions on the current stream, after warm-up, and
// the copy bandwidth they compare with.
//
// Two clocks:
// - time_ms (wall): the events bracket the call on an idle GPU, so the host work before and between the call's
//   launches (argument checks, allocations, launch overhead) counts whenever the GPU waits for it. This is what a
//   caller that waits for the result sees.
// - time_gpu_ms (device): a spin kernel is queued first, so the host has queued the whole call before the first
//   event is reached; the interval is the GPU's own time for the call's kernels and the gaps between them. This is
//   what the call adds inside a stream that is already busy (a prefill's layers, a captured decode step), and what
//   a kernel's bandwidth is measured on. A call that waits for the GPU (a read-back) still counts the wait.
#pragma once

#include <algorithm>
#include <cstdio>
#include <functional>
#include <vector>

#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/Sleep.h>
#include <torch/torch.h>

namespace kvd::bench {

enum class Clock {
  Wall,   // time_ms
  Device  // time_gpu_ms
};

// The median of `reps` CUDA-event-timed calls of fn after `warmup` untimed ones. Device: a spin of about 1 ms at
// the H100 / H200's clocks is queued before each, longer than the host needs to queue any one call of these benches.
inline double time_on(Clock clock, const std::function<void()>& fn, int reps, int warmup = 2) {
  for (int i = 0; i < warmup; ++i) fn();
  torch::cuda::synchronize();
  std::vector<double> ts;
  for (int i = 0; i < reps; ++i) {
    at::cuda::CUDAEvent a(cudaEventDefault), b(cudaEventDefault);
    if (clock == Clock::Device) at::cuda::sleep(2000000);
    a.record();
    fn();
    b.record();
    b.synchronize();
    ts.push_back(a.elapsed_time(b));
  }
  std::sort(ts.begin(), ts.end());
  return ts[ts.size() / 2];
}

inline double time_ms(const std::function<void()>& fn, int reps, int warmup = 2) {
  return time_on(Clock::Wall, fn, reps, warmup);
}
inline double time_gpu_ms(const std::function<void()>& fn, int reps, int warmup = 2) {
  return time_on(Clock::Device, fn, reps, warmup);
}

// The roofline of the memory-bound benches: a device-to-device copy of 2 GiB, in TB/s (bytes read + written),
// printed as a JSON line.
inline double copy_tbps(int reps) {
  at::Tensor x = torch::empty({int64_t{2} << 30}, torch::TensorOptions().device(torch::kCUDA).dtype(torch::kUInt8));
  at::Tensor y = torch::empty_like(x);
  const double ms = time_ms([&] { y.copy_(x); }, reps);
  const double tbps = 2.0 * static_cast<double>(x.numel()) / ms / 1e9;
  std::printf("{\"what\": \"copy\", \"TBps\": %.3f}\n", tbps);
  return tbps;
}

}  // namespace kvd::bench
