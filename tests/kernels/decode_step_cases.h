// Inputs and the metric shared by the row kernels' tests (kernels/decode_step.*): emu_decode_step runs the kernels'
// code on the CPU through the SIMT emulator, test_decode_step runs them on the GPU; both against the LibTorch
// references of kernels/decode_step.h.
#pragma once

#include <cstdint>
#include <cstring>

#include <torch/torch.h>

namespace kvd_test {

// Random bf16 values, roughly N(0, scale²).
inline at::Tensor bf16_randn(std::vector<int64_t> shape, uint64_t seed, double scale = 1.0) {
  at::Generator g = at::detail::createCPUGenerator(seed);
  return (torch::randn(shape, g, torch::kFloat) * scale).to(torch::kBFloat16);
}

// The largest distance in bf16 units in the last place between a and b (bf16, one shape), over their elements;
// +0 and -0 are 0 apart, and values of opposite signs count as their distance through zero.
inline int64_t max_ulps(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor x = a.to(torch::kCPU).contiguous().view(torch::kShort).to(torch::kLong);
  const at::Tensor y = b.to(torch::kCPU).contiguous().view(torch::kShort).to(torch::kLong);
  // Sign-magnitude bits -> a monotone integer line.
  auto line = [](const at::Tensor& t) {
    const at::Tensor mag = t.bitwise_and(0x7FFF);
    return torch::where(t.lt(0), -mag, mag);
  };
  if (x.numel() == 0) return 0;
  return (line(x) - line(y)).abs().max().item<int64_t>();
}

}  // namespace kvd_test
