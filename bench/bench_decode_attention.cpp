// Decode attention over a compressed cache on the GPU: the ragged decode kernel (kernels/decode_attention.*) against
// PyTorch's SDPA over the same kept tokens, in the same run.
//
//   bench_decode_attention [--reps 50] [--splits 16,64,256]
//
// For each model shape (SmolLM2-135M: 9 / 3 heads, d 64; Llama-3-8B: 32 / 8 heads, d 128), batch (1, 16) and kept
// entries per head n (8K, 32K; B 16 at 32K only for SmolLM2's shape), one decode step of one layer:
//   - uniform: every (request, KV head) keeps n entries. Ours over the flat storage; SDPA flash (no mask, GQA) over
//     the same (B, H_kv, n, d) tensors;
//   - ragged: per-head counts spread 0.25x..1.75x around n, the same total per request (what AdaKV-style budgets
//     give). Ours over the packed flat storage; SDPA over the padded (B, H, n_max, d) copy with a boolean mask (the
//     memory-efficient kernel; the padding and the K/V repeat to the query heads are done outside the timed region,
//     in PyTorch's favour).
// Bytes: the kept K and V read once (2 x entries x d x 2 B); bandwidth also as a fraction of a device-to-device copy
// measured in the same run. Median of CUDA-event-timed repetitions, on both clocks of bench/cuda_time.h: *_ms wall
// (the binding's host work before the launch included) and *_gpu_ms device time (what the step costs in a busy or
// captured stream; the bandwidth goal is measured on it). One JSON line per measurement. --splits also times ours
// (device time) at each of those CTA counts per segment (split_sweep_gpu_ms), to choose the kernel's rule from data.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "bench/cuda_time.h"
#include "kernels/decode_attention.h"

int main(int argc, char** argv) {
  int reps = 50;
  std::vector<int> sweep;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--reps") && i + 1 < argc) {
      reps = std::atoi(argv[++i]);
    } else if (!std::strcmp(argv[i], "--splits") && i + 1 < argc) {
      for (char* t = std::strtok(argv[++i], ","); t; t = std::strtok(nullptr, ",")) sweep.push_back(std::atoi(t));
    } else {
      std::fprintf(stderr, "usage: bench_decode_attention [--reps N] [--splits N,N,...]\n");
      return 2;
    }
  }
  if (!torch::cuda::is_available()) {
    std::fprintf(stderr, "bench_decode_attention: needs a CUDA device\n");
    return 1;
  }
  torch::NoGradGuard no_grad;
  torch::manual_seed(0);
  auto f = torch::TensorOptions().device(torch::kCUDA);
  const double copy_tbps = kvd::bench::copy_tbps(20);
  struct Shape {
    const char* name;
    int64_t H, Hkv, d;
  };
  std::mt19937_64 rng(1);
  for (Shape s : {Shape{"smollm2-135m", 9, 3, 64}, Shape{"llama3-8b", 32, 8, 128}})
    for (int64_t B : {1, 16})
      for (int64_t n : {8192, 32768}) {
        if (B == 16 && n == 32768 && s.d == 128) continue;  // 8.6 GB of K/V for one layer: not a decode shape
        const int64_t S = B * s.Hkv;
        for (const char* kind : {"uniform", "ragged"}) {
          const bool ragged = !std::strcmp(kind, "ragged");
          std::vector<int64_t> lens(S, n);
          if (ragged)
            for (int64_t b = 0; b < B; ++b) {
              std::uniform_real_distribution<double> u(0.25, 1.75);
              std::vector<double> w(s.Hkv);
              for (double& x : w) x = u(rng);
              const double sum = std::accumulate(w.begin(), w.end(), 0.0);
              int64_t left = n * s.Hkv;
              for (int64_t h = 0; h < s.Hkv; ++h) {
                lens[b * s.Hkv + h] = h + 1 == s.Hkv ? left : static_cast<int64_t>(w[h] / sum * n * s.Hkv);
                left -= lens[b * s.Hkv + h];
              }
            }
          const int64_t total = std::accumulate(lens.begin(), lens.end(), int64_t{0});
          const int64_t n_max = *std::max_element(lens.begin(), lens.end());
          std::vector<int64_t> start(S, 0);
          for (int64_t i = 1; i < S; ++i) start[i] = start[i - 1] + lens[i - 1];
          kvd::DecodeAttentionInput in;
          in.q = torch::randn({B, s.H, s.d}, f).to(torch::kBFloat16);
          in.k = torch::randn({total, s.d}, f).to(torch::kBFloat16);
          in.v = torch::randn({total, s.d}, f).to(torch::kBFloat16);
          in.start = torch::tensor(start, torch::kLong).to(torch::kCUDA);
          in.len = torch::tensor(lens, torch::kLong).to(torch::kCUDA);
          in.max_len = n_max;
          in.scale = 1.0 / std::sqrt(static_cast<double>(s.d));
          const double ours = kvd::bench::time_ms([&] { kvd::decode_attention_fused(in); }, reps);
          const double ours_gpu = kvd::bench::time_gpu_ms([&] { kvd::decode_attention_fused(in); }, reps);
          // The reference's inputs, built outside the timed region.
          at::Tensor q4 = in.q.view({B, s.H, 1, s.d});
          double ref = 0, ref_gpu = 0;
          const char* ref_name = "";
          if (!ragged) {
            at::Tensor k = in.k.view({B, s.Hkv, n, s.d}), v = in.v.view({B, s.Hkv, n, s.d});
            auto sdpa = [&] { at::scaled_dot_product_attention(q4, k, v, {}, 0.0, false, in.scale, /*enable_gqa=*/true); };
            ref = kvd::bench::time_ms(sdpa, reps);
            ref_gpu = kvd::bench::time_gpu_ms(sdpa, reps);
            ref_name = "sdpa_flash";
          } else {
            at::Tensor kp = torch::zeros({S, n_max, s.d}, f.dtype(torch::kBFloat16)), vp = torch::zeros_like(kp);
            for (int64_t i = 0; i < S; ++i) {
              kp[i].narrow(0, 0, lens[i]).copy_(in.k.narrow(0, start[i], lens[i]));
              vp[i].narrow(0, 0, lens[i]).copy_(in.v.narrow(0, start[i], lens[i]));
            }
            const int64_t G = s.H / s.Hkv;
            at::Tensor k = kp.view({B, s.Hkv, n_max, s.d}).repeat_interleave(G, 1);
            at::Tensor v = vp.view({B, s.Hkv, n_max, s.d}).repeat_interleave(G, 1);
            at::Tensor mask = torch::arange(n_max, f.dtype(torch::kLong)).view({1, n_max})
                                  .lt(in.len.view({S, 1})).view({B, s.Hkv, 1, 1, n_max})
                                  .expand({B, s.Hkv, G, 1, n_max}).reshape({B, s.H, 1, n_max});
            auto sdpa = [&] { at::scaled_dot_product_attention(q4, k, v, mask, 0.0, false, in.scale, false); };
            ref = kvd::bench::time_ms(sdpa, reps);
            ref_gpu = kvd::bench::time_gpu_ms(sdpa, reps);
            ref_name = "sdpa_masked_padded";
          }
          std::string swept;  // "splits": ms, for --splits
          for (int sp : sweep) {
            kvd::DecodeAttentionInput fixed = in;
            fixed.splits = sp;
            const double ms = kvd::bench::time_gpu_ms([&] { kvd::decode_attention_fused(fixed); }, reps);
            swept += (swept.empty() ? "" : ", ") + ("\"" + std::to_string(sp) + "\": ") + std::to_string(ms);
          }
          const double bytes = 2.0 * static_cast<double>(total) * static_cast<double>(s.d) * 2.0;
          const double tbps = bytes / ours / 1e9;
          std::printf("{\"shape\": \"%s\", \"cache\": \"%s\", \"batch\": %ld, \"kept_per_head\": %ld, \"kv_mb\": %.1f, "
                      "\"ours_ms\": %.4f, \"ours_TBps\": %.3f, \"ours_frac_of_copy\": %.2f, \"ref\": \"%s\", "
                      "\"ref_ms\": %.4f, \"speedup\": %.2f, \"ours_gpu_ms\": %.4f, \"ours_gpu_frac_of_copy\": %.3f, "
                      "\"ref_gpu_ms\": %.4f, \"gpu_speedup\": %.2f, \"splits\": %d, \"split_sweep_gpu_ms\": {%s}}\n",
                      s.name, kind, static_cast<long>(B), static_cast<long>(n), bytes / 1048576.0, ours, tbps,
                      tbps / copy_tbps, ref_name, ref, ref / ours, ours_gpu, bytes / ours_gpu / 1e9 / copy_tbps, ref_gpu,
                      ref_gpu / ours_gpu,
                      kvd::decode_attention_default_splits(S, n_max, s.d, s.H / s.Hkv), swept.c_str());
        }
      }
  return 0;
}
