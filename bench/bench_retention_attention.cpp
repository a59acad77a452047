// Times the fused retention-biased attention (kernels/retention_attention.h) against PyTorch SDPA's flash backend
// (no bias, causal), forward and forward + backward, in the same run, and prints ratios and TFLOP/s.
//
//   bench_retention_attention [--seqs 4096,8192,16384,32768] [--heads 9,32] [--dims 64,128] [--csv FILE]
//                             [--docs N]
// --docs N: ours sees N packed documents of S/N rows each (doc ids, positions restarting), the training layout
// of packed sequences; the kernels skip the key tiles of other documents. SDPA still runs plain causal.
//
// Shapes: batch 1, H query heads, H_kv = 3 for H = 9 (SmolLM2-135M) and H / 4 otherwise; ours is grouped (GQA)
// with a key_rate bias (TRIM-KV) and, as a second line, without any mod; SDPA flash gets K/V repeated to H heads
// (flash in ATen takes equal head counts; the repeat is outside the timed region). The work is the same.
// FLOPs (causal): forward 4·B·H·S²·D / 2; forward + backward 3.5x that (the backward's five S×S products; ours
// recomputes two more for deterministic dQ, not counted). Times are medians of CUDA-event-timed repetitions.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include <c10/cuda/CUDAStream.h>
#include <torch/torch.h>

#include "bench/cuda_time.h"

#include "kernels/retention_attention.h"

namespace {

std::vector<int64_t> parse_list(const char* s) {
  std::vector<int64_t> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) out.push_back(std::stoll(item));
  return out;
}


}  // namespace

int main(int argc, char** argv) {
  std::vector<int64_t> seqs{4096, 8192, 16384, 32768}, heads{9, 32}, dims{64, 128};
  std::string csv;
  int64_t ndocs = 0;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string a = argv[i];
    if (a == "--seqs") seqs = parse_list(argv[i + 1]);
    else if (a == "--heads") heads = parse_list(argv[i + 1]);
    else if (a == "--dims") dims = parse_list(argv[i + 1]);
    else if (a == "--csv") csv = argv[i + 1];
    else if (a == "--docs") ndocs = std::stoll(argv[i + 1]);
    else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }
  if (!torch::cuda::is_available()) {
    std::fprintf(stderr, "bench_retention_attention: no CUDA device\n");
    return 1;
  }
  // Only the flash backend for the SDPA line.
  at::globalContext().setSDPUseFlash(true);
  at::globalContext().setSDPUseMemEfficient(false);
  at::globalContext().setSDPUseMath(false);
  at::globalContext().setSDPUseCuDNN(false);
  torch::manual_seed(0);
  auto bf = torch::TensorOptions().dtype(torch::kBFloat16).device(torch::kCUDA);
  auto f32 = torch::TensorOptions().dtype(torch::kFloat).device(torch::kCUDA);

  std::ofstream out_csv;
  if (!csv.empty()) {
    out_csv.open(csv);
    out_csv << "S,H,Hkv,D,ours_fwd_ms,ours_nobias_fwd_ms,sdpa_fwd_ms,ours_fb_ms,ours_nobias_fb_ms,sdpa_fb_ms,bwd_dq_ms,"
               "bwd_dkv_ms\n";
  }
  std::printf("%6s %3s %4s %4s | %22s %22s %22s %6s | %22s %22s %22s %6s %6s | %7s %7s\n", "S", "H", "Hkv", "D",
              "ours fwd ms (TF/s)", "ours-nobias fwd", "sdpa flash fwd", "ratio", "ours fwd+bwd ms (TF/s)",
              "ours-nobias f+b", "sdpa flash f+b", "ratio", "nb/sd", "bwd dQ", "bwd dKV");
  for (int64_t D : dims)
    for (int64_t H : heads)
      for (int64_t S : seqs) {
        const int64_t Hkv = H == 9 ? 3 : std::max<int64_t>(1, H / 4), G = H / Hkv;
        const double scale = 1.0 / std::sqrt(static_cast<double>(D));
        at::Tensor q = torch::randn({1, H, S, D}, bf), k = torch::randn({1, Hkv, S, D}, bf),
                   v = torch::randn({1, Hkv, S, D}, bf);
        at::Tensor pos = torch::arange(S, f32.dtype(torch::kLong)).view({1, S});
        at::Tensor docs;  // undefined: one document
        if (ndocs > 1) {
          docs = torch::div(pos * ndocs, S, "floor");                        // (1, S) document of each row
          pos = pos - torch::div(docs * S + ndocs - 1, ndocs, "floor");      // restart at each document's start
        }
        at::Tensor rate = -torch::exp(torch::randn({1, Hkv, S}, f32) * 1.5 - 5.0);
        at::Tensor dout = torch::randn({1, H, S, D}, bf);
        at::Tensor ke = k.repeat_interleave(G, 1), ve = v.repeat_interleave(G, 1);
        const int reps = S <= 8192 ? 20 : (S <= 16384 ? 10 : 5);
        const double fl = 2.0 * H * static_cast<double>(S) * S * D;  // causal forward FLOPs

        kvd::RetentionAttentionForward f;
        const double o_f = kvd::bench::time_ms([&] { f = kvd::retention_attention_forward(q, k, v, pos, docs, rate, {}, {}, scale); },
                                   reps);
        const double o_fb = kvd::bench::time_ms(
            [&] {
              f = kvd::retention_attention_forward(q, k, v, pos, docs, rate, {}, {}, scale);
              kvd::retention_attention_backward(dout, q, k, v, f, pos, docs, rate, {}, {}, scale);
            },
            reps);
        const double n_f = kvd::bench::time_ms([&] { f = kvd::retention_attention_forward(q, k, v, pos, docs, {}, {}, {}, scale); },
                                   reps);
        const double n_fb = kvd::bench::time_ms(
            [&] {
              f = kvd::retention_attention_forward(q, k, v, pos, docs, {}, {}, {}, scale);
              kvd::retention_attention_backward(dout, q, k, v, f, pos, docs, {}, {}, {}, scale);
            },
            reps);
        const double s_f = kvd::bench::time_ms([&] { at::_scaled_dot_product_flash_attention(q, ke, ve, 0.0, true, false, scale); },
                                   reps);
        const double s_fb = kvd::bench::time_ms(
            [&] {
              auto r = at::_scaled_dot_product_flash_attention(q, ke, ve, 0.0, true, false, scale);
              at::_scaled_dot_product_flash_attention_backward(
                  dout, q, ke, ve, std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r),
                  std::get<4>(r).expect_int(), std::get<5>(r).expect_int(), 0.0, true, std::get<6>(r), std::get<7>(r),
                  scale);
            },
            reps);
        // The backward's passes apart (with the key_rate bias): Δ + dQ, and Δ + dK/dV.
        f = kvd::retention_attention_forward(q, k, v, pos, docs, rate, {}, {}, scale);
        const double b_dq = kvd::bench::time_ms(
            [&] { kvd::retention_attention_backward(dout, q, k, v, f, pos, docs, rate, {}, {}, scale, 1 | 2); }, reps);
        const double b_dkv = kvd::bench::time_ms(
            [&] { kvd::retention_attention_backward(dout, q, k, v, f, pos, docs, rate, {}, {}, scale, 1 | 4); }, reps);
        auto tf = [](double flops, double ms) { return flops / (ms * 1e-3) / 1e12; };
        char c1[64], c2[64], c3[64], c4[64], c5[64], c6[64];
        std::snprintf(c1, sizeof c1, "%.3f (%.0f)", o_f, tf(fl, o_f));
        std::snprintf(c2, sizeof c2, "%.3f (%.0f)", n_f, tf(fl, n_f));
        std::snprintf(c3, sizeof c3, "%.3f (%.0f)", s_f, tf(fl, s_f));
        std::snprintf(c4, sizeof c4, "%.3f (%.0f)", o_fb, tf(3.5 * fl, o_fb));
        std::snprintf(c5, sizeof c5, "%.3f (%.0f)", n_fb, tf(3.5 * fl, n_fb));
        std::snprintf(c6, sizeof c6, "%.3f (%.0f)", s_fb, tf(3.5 * fl, s_fb));
        std::printf("%6ld %3ld %4ld %4ld | %22s %22s %22s %6.2f | %22s %22s %22s %6.2f %6.2f | %7.3f %7.3f\n",
                    (long)S, (long)H, (long)Hkv, (long)D, c1, c2, c3, o_f / s_f, c4, c5, c6, o_fb / s_fb, n_fb / s_fb,
                    b_dq, b_dkv);
        std::fflush(stdout);
        if (out_csv)
          out_csv << S << ',' << H << ',' << Hkv << ',' << D << ',' << o_f << ',' << n_f << ',' << s_f << ',' << o_fb
                  << ',' << n_fb << ',' << s_fb << ',' << b_dq << ',' << b_dkv << '\n';
      }
  if (ndocs > 1) std::printf("ours with %ld packed documents per row; SDPA plain causal\n", (long)ndocs);
  std::printf("ratio = ours (key_rate bias, GQA) / SDPA flash (no bias); nb/sd = ours without mods / SDPA flash; "
              "bwd dQ / dKV: ms of the backward's Δ + dQ and Δ + dK/dV passes alone\n");
  return 0;
}
