// The distillation losses (forward KL + next-token CE over the vocabulary, and their gradient to the student's
// hidden rows) on the GPU: losses/distill.cpp with the fused rows kernel (kernels/distill_rows.*) against the same
// function on its LibTorch chain (fp32 casts, two log-softmaxes, products, sums, scatter), in the same run. Both form
// the teacher's and the student's logits block by block through the same LM head (cuBLAS), so the difference is the
// vocabulary work; `matmuls_ms` times the four LM-head products per block alone, the floor of either path.
//
//   bench_distill_rows [--rows 8192] [--block 512] [--reps 10]
//
// Shapes: SmolLM2-135M (d 576, V 49,152) and Llama-3-8B (d 4,096, V 128,256). One JSON line per shape: wall-clock
// medians (bench/cuda_time.h) of forward + backward, the ratio, peak memory of each, and how far the fused results
// are from the chain's (KL, CE, gradient relative L2).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include <c10/cuda/CUDACachingAllocator.h>
#include <torch/torch.h>

#include "bench/cuda_time.h"
#include "losses/distill.h"

int main(int argc, char** argv) {
  int64_t rows = 8192, block = 512;
  int reps = 10;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--rows") && i + 1 < argc) rows = std::atoll(argv[++i]);
    else if (!std::strcmp(argv[i], "--block") && i + 1 < argc) block = std::atoll(argv[++i]);
    else if (!std::strcmp(argv[i], "--reps") && i + 1 < argc) reps = std::atoi(argv[++i]);
    else {
      std::fprintf(stderr, "usage: bench_distill_rows [--rows N] [--block N] [--reps N]\n");
      return 2;
    }
  }
  if (!torch::cuda::is_available()) {
    std::fprintf(stderr, "bench_distill_rows: needs a CUDA device and a build with the CUDA kernels\n");
    return 1;
  }
  torch::manual_seed(0);
  auto bf = torch::TensorOptions().device(torch::kCUDA).dtype(torch::kBFloat16);
  struct Shape {
    const char* name;
    int64_t d, V;
  };
  for (const Shape& m : {Shape{"SmolLM2-135M", 576, 49152}, Shape{"Llama-3-8B", 4096, 128256}}) {
    at::Tensor w = torch::randn({m.V, m.d}, bf) * 0.02;  // (V, d) LM head
    at::Tensor teacher = torch::randn({1, rows, m.d}, bf);  // (1, N, d)
    at::Tensor student = (teacher.to(torch::kFloat) + torch::randn({1, rows, m.d}, bf.dtype(torch::kFloat)) * 0.3)
                             .to(torch::kBFloat16);
    at::Tensor labels = torch::randint(0, m.V, {1, rows}, bf.dtype(torch::kLong));
    const kvd::LogitsFn logits = [&](const at::Tensor& h) { return torch::matmul(h, w.t()); };
    struct Result {
      double kl = 0, ce = 0, ms = 0, peak_mib = 0;
      at::Tensor grad;
    };
    auto measure = [&](kvd::KernelPath path) {
      Result r;
      at::Tensor s = student.clone().requires_grad_(true);
      auto step = [&] {
        s.mutable_grad() = at::Tensor();
        kvd::DistillLosses d =
            kvd::distill_losses(teacher, s, labels, logits, block, kvd::DistillImpl::Blocked, path);
        (d.kl + d.ce).backward();
        r.kl = d.kl.item<double>();
        r.ce = d.ce.item<double>();
      };
      step();
      torch::cuda::synchronize();
      c10::cuda::CUDACachingAllocator::resetPeakStats(0);
      const auto base = c10::cuda::CUDACachingAllocator::getDeviceStats(0).allocated_bytes[0].current;
      r.ms = kvd::bench::time_ms(step, reps, 1);
      r.peak_mib = static_cast<double>(c10::cuda::CUDACachingAllocator::getDeviceStats(0).allocated_bytes[0].peak -
                                       base) / (1 << 20);
      r.grad = s.grad().clone();
      return r;
    };
    const Result ref = measure(kvd::KernelPath::Reference);
    const Result fused = measure(kvd::KernelPath::Fused);
    // The four LM-head products per block that both paths run.
    at::Tensor hb = teacher.view({rows, m.d}).narrow(0, 0, block), gb = torch::randn({block, m.V}, bf);
    const double mm_ms = kvd::bench::time_ms(
                             [&] {
                               torch::matmul(hb, w.t());
                               torch::matmul(hb, w.t());
                               torch::matmul(gb, w);
                               torch::matmul(gb, w);
                             },
                             reps) *
                         static_cast<double>((rows + block - 1) / block);
    at::Tensor gr = ref.grad.to(torch::kDouble), gf = fused.grad.to(torch::kDouble);
    const double grad_rel_l2 = (gf - gr).norm().item<double>() / gr.norm().item<double>();
    std::printf(
        "{\"what\": \"distill_rows\", \"shape\": \"%s\", \"d\": %ld, \"V\": %ld, \"rows\": %ld, \"block\": %ld, "
        "\"chain_ms\": %.3f, \"fused_ms\": %.3f, \"speedup\": %.2f, \"matmuls_ms\": %.3f, \"chain_peak_mib\": %.0f, "
        "\"fused_peak_mib\": %.0f, \"kl\": [%.6f, %.6f], \"ce\": [%.6f, %.6f], \"grad_rel_l2\": %.2e}\n",
        m.name, (long)m.d, (long)m.V, (long)rows, (long)block, ref.ms, fused.ms, ref.ms / fused.ms, mm_ms,
        ref.peak_mib, fused.peak_mib, fused.kl, ref.kl, fused.ce, ref.ce, grad_rel_l2);
    std::fflush(stdout);
  }
  return 0;
}
