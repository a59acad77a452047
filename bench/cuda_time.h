// Timing for the GPU benches: the median of CUDA-event-timed repetitions on the current stream, after warm-up, and
// the copy bandwidth they compare with.
#pragma once

#include <algorithm>
#include <cstdio>
#include <functional>
#include <vector>

#include <ATen/cuda/CUDAEvent.h>
#include <torch/torch.h>

namespace kvd::bench {

inline double time_ms(const std::function<void()>& fn, int reps, int warmup = 2) {
  for (int i = 0; i < warmup; ++i) fn();
  torch::cuda::synchronize();
  std::vector<double> ts;
  for (int i = 0; i < reps; ++i) {
    at::cuda::CUDAEvent a(cudaEventDefault), b(cudaEventDefault);
    a.record();
    fn();
    b.record();
    b.synchronize();
    ts.push_back(a.elapsed_time(b));
  }
  std::sort(ts.begin(), ts.end());
  return ts[ts.size() / 2];
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
