// Window scoring (SnapKV, PyramidKV, TOVA, the query-row methods) on the GPU: the fused column statistics of
// kernels/window_scores.* against the LibTorch path a scorer would otherwise run (the explicit (B, H, w, n) fp32
// softmax, then its sum over the rows), in the same run, next to the same layer's causal prefill attention (SDPA
// flash, K / V repeated to the query heads outside the timed region) and next to the whole layer's prefill: that
// attention plus the layer's bf16 projections (Q, K, V, O) and gated MLP (gate, up, SiLU · up, down) over the same n
// tokens. Every layer is scored, so the share of one layer is the share of the prefill (embedding and LM head
// aside, which only add to the prefill).
//
//   bench_window_scores [--reps 20]
//
// Shapes: SmolLM2-135M (9 / 3 heads, d 64) and Llama-3-8B (32 / 8 heads, d 128); n = 8K and 32K; windows of 64
// rows (SnapKV's default), 32 (DefensiveKV's, CAKE's) and 1 (TOVA's). One JSON line per measurement; times are
// medians of CUDA-event-timed repetitions on both clocks of bench/cuda_time.h: *_ms wall (the binding's host work
// before its launches included) and *_gpu_ms device time. In a prefill the layers keep the stream busy, so the host
// work is hidden and the device time is what scoring adds; layer_with_ours_gpu_ms measures that directly (the layer
// followed by the scoring, against the layer alone: added_percent_of_layer_prefill).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include <torch/torch.h>

#include "bench/cuda_time.h"
#include "gates/heuristics.h"
#include "kernels/window_scores.h"

int main(int argc, char** argv) {
  int reps = 20;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--reps") && i + 1 < argc) {
      reps = std::atoi(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: bench_window_scores [--reps N]\n");
      return 2;
    }
  }
  if (!torch::cuda::is_available()) {
    std::fprintf(stderr, "bench_window_scores: needs a CUDA device and a build with the CUDA kernels\n");
    return 1;
  }
  torch::NoGradGuard no_grad;
  torch::manual_seed(0);
  auto f = torch::TensorOptions().device(torch::kCUDA);
  struct Shape {
    const char* name;
    int64_t Hq, Hkv, d, D, F;  // heads, KV heads, head dim, hidden size, MLP width
  };
  for (const Shape& m : {Shape{"SmolLM2-135M", 9, 3, 64, 576, 1536}, Shape{"Llama-3-8B", 32, 8, 128, 4096, 14336}})
    for (int64_t n : {int64_t{8192}, int64_t{32768}}) {
      at::Tensor q = torch::randn({1, m.Hq, n, m.d}, f.dtype(torch::kBFloat16));  // (1, H, n, d)
      at::Tensor k = torch::randn({1, m.Hkv, n, m.d}, f.dtype(torch::kBFloat16)), v = torch::randn_like(k);
      at::Tensor ke = k.repeat_interleave(m.Hq / m.Hkv, 1), ve = v.repeat_interleave(m.Hq / m.Hkv, 1);
      const double scale = 1.0 / std::sqrt(static_cast<double>(m.d));
      auto attention = [&] { at::_scaled_dot_product_flash_attention(q, ke, ve, 0.0, true, false, scale); };
      const double attn_ms = kvd::bench::time_ms(attention, reps);
      // The layer's projections and MLP (random bf16 weights; cuBLAS).
      const auto bf = f.dtype(torch::kBFloat16);
      at::Tensor x = torch::randn({n, m.D}, bf);                                               // (n, D)
      at::Tensor wq = torch::randn({m.D, m.Hq * m.d}, bf) * 0.02, wkv = torch::randn({m.D, m.Hkv * m.d}, bf) * 0.02;
      at::Tensor wo = torch::randn({m.Hq * m.d, m.D}, bf) * 0.02, wg = torch::randn({m.D, m.F}, bf) * 0.02;
      at::Tensor wu = torch::randn({m.D, m.F}, bf) * 0.02, wd = torch::randn({m.F, m.D}, bf) * 0.02;
      auto dense = [&] {
        at::Tensor o = x.matmul(wq);  // (n, Hq·d), standing in for the attention's output
        x.matmul(wkv);
        x.matmul(wkv);
        at::Tensor h = x + o.matmul(wo);                                      // (n, D)
        at::Tensor g = h.matmul(wg), u = h.matmul(wu);                         // (n, F)
        (torch::silu(g) * u).matmul(wd);                                       // (n, D)
      };
      const double dense_ms = kvd::bench::time_ms(dense, reps);
      const double layer_ms = attn_ms + dense_ms;
      const double layer_gpu_ms = kvd::bench::time_gpu_ms([&] { attention(); dense(); }, reps);
      at::Tensor pos = torch::arange(n, f.dtype(torch::kLong));
      for (int64_t w : {int64_t{64}, int64_t{32}, int64_t{1}}) {
        kvd::WindowScoresInput in;
        in.q = q.narrow(2, n - w, w);                                      // (1, H, w, d): the last w rows
        in.q_pos = pos.narrow(0, n - w, w).view({1, w});                   // (1, w)
        in.k = k;                                                          // (1, H_kv, n, d)
        in.k_pos = pos.view({1, 1, n}).expand({1, m.Hkv, n}).contiguous();  // (1, H_kv, n)
        if (!kvd::window_scores_fused_available(in)) {
          std::fprintf(stderr, "bench_window_scores: the fused kernel does not run here (a build without CUDA kernels?)\n");
          return 1;
        }
        kvd::WindowColumns ours, ref;
        auto fused = [&] { ours = kvd::window_columns_fused(in, kvd::WindowMoments::Sum); };
        auto reference = [&] { ref = kvd::window_columns(in, kvd::WindowMoments::Sum, kvd::KernelPath::Reference); };
        const double ours_ms = kvd::bench::time_ms(fused, reps);
        const double ref_ms = kvd::bench::time_ms(reference, reps);
        const double ours_gpu_ms = kvd::bench::time_gpu_ms(fused, reps);
        const double ref_gpu_ms = kvd::bench::time_gpu_ms(reference, reps);
        // What scoring adds to the layer where it runs: the layer with and without it, on the device clock.
        const double with_ours_gpu_ms = kvd::bench::time_gpu_ms([&] { attention(); dense(); fused(); }, reps);
        const double diff = (ours.sum - ref.sum).abs().max().item<double>();
        const double flops = 2.0 * 2.0 * static_cast<double>(m.Hq) * w * n * m.d;  // q·k in both passes
        std::printf("{\"what\": \"window scores\", \"model\": \"%s\", \"n\": %ld, \"w\": %ld, \"attention_ms\": %.4f, "
                    "\"layer_prefill_ms\": %.4f, \"ours_ms\": %.4f, \"ours_percent_of_attention\": %.3f, "
                    "\"ours_percent_of_layer_prefill\": %.3f, \"ours_TFLOPs\": %.2f, \"torch_ms\": %.4f, "
                    "\"torch_percent_of_attention\": %.3f, \"torch_percent_of_layer_prefill\": %.3f, "
                    "\"speedup\": %.2f, \"layer_prefill_gpu_ms\": %.4f, \"ours_gpu_ms\": %.4f, "
                    "\"ours_gpu_percent_of_layer_prefill\": %.3f, \"torch_gpu_ms\": %.4f, \"layer_with_ours_gpu_ms\": %.4f, "
                    "\"added_percent_of_layer_prefill\": %.3f, \"max_abs_diff\": %.2e}\n",
                    m.name, (long)n, (long)w, attn_ms, layer_ms, ours_ms, 100.0 * ours_ms / attn_ms,
                    100.0 * ours_ms / layer_ms, flops / ours_ms / 1e9, ref_ms, 100.0 * ref_ms / attn_ms,
                    100.0 * ref_ms / layer_ms, ref_ms / ours_ms, layer_gpu_ms, ours_gpu_ms,
                    100.0 * ours_gpu_ms / layer_gpu_ms, ref_gpu_ms, with_ours_gpu_ms,
                    100.0 * (with_ours_gpu_ms - layer_gpu_ms) / layer_gpu_ms, diff);
        std::fflush(stdout);
      }
    }
  return 0;
}
