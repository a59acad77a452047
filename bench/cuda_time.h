// Timing for the GPU benches: the median of CUDA-event-timed repetitions on the current stream, after warm-up.
#pragma once

#include <algorithm>
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

}  // namespace kvd::bench
