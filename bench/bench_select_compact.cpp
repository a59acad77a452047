// Eviction on the GPU: the fused kernels of kernels/kv_select.* against the PyTorch chains a user would write, in
// the same run, plus the per-layer cost of the serving runtime's steps next to that layer's attention.
//
//   bench_select_compact [--reps 20]
//
// 1. Select + compact, all layers at once, the shapes of ../shared/bench/attention_anchors.py: scores (L·B, H_kv, n)
//    fp32, K and V (L·B, H_kv, n, 128) bf16, keep M per head. PyTorch: topk → sort → gather of K and V (new
//    tensors). Ours: select_rows_fused (one launch) + compact_rows_fused of K and V (in place), K then V in two
//    launches and both in one. Bytes counted as
//    the anchor does: the scores read + the kept K and V rows read and written. Bandwidth is also given as a
//    fraction of a device-to-device copy measured in the same run. Ours and PyTorch's kept sets are compared (random
//    scores: no ties).
// 2. One layer of TRIM-KV in a serving engine after a prefill of n tokens (n = 8K, 32K), keeping n/2 per head:
//    score (the gate MLP on the layer's attention input) + select + compact K and V, fused vs the ATen ops of
//    libkvdistill_ops.so's CPU path, next to SDPA flash attention's causal prefill of the same layer
//    (K/V repeated to the query heads outside the timed region). Shapes: SmolLM2-135M (D 576, 9 / 3 heads,
//    d 64) and Llama-3-8B (D 4096, 32 / 8 heads, d 128); gate width 512.
// 3. What compress_prefill / eval do after a prefill: per layer, select_layer (uniform budget) + KVCache::keep (a
//    gather into storage of exactly the kept entries, which frees the rest), with the fused selector vs the
//    reference selector (stable sort → mask → nonzero), both keeping the indices on the device. Wall time over every
//    layer, host work and read-backs included, the cache restored outside the timed region. Kept sets compared.
// Times are medians of CUDA-event-timed repetitions (3: of wall-clock ones), one JSON line per measurement. Part 1
// gives both clocks of bench/cuda_time.h: *_ms (host work before the launches included) and *_gpu_ms (device time,
// what the kernels cost in a busy stream; the bandwidth goal is measured on it).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "bench/cuda_time.h"
#include "gates/selector.h"
#include "kernels/kv_select.h"
#include "models/kv_cache.h"

int main(int argc, char** argv) {
  int reps = 20;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--reps") && i + 1 < argc) {
      reps = std::atoi(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: bench_select_compact [--reps N]\n");
      return 2;
    }
  }
  if (!torch::cuda::is_available() || !kvd::kv_select_fused_available(torch::empty({1}, torch::kCUDA))) {
    std::fprintf(stderr, "bench_select_compact: needs a CUDA device and a build with the CUDA kernels\n");
    return 1;
  }
  torch::NoGradGuard no_grad;
  torch::manual_seed(0);
  auto f = torch::TensorOptions().device(torch::kCUDA);

  const double copy_tbps = kvd::bench::copy_tbps(reps);  // the roofline

  // 1. Select + compact over every layer at once.
  struct Evict {
    int64_t B, H, n, M, D, L;
  };
  for (const Evict& e : {Evict{1, 8, 32768, 4096, 128, 32}, Evict{8, 8, 8192, 1024, 128, 32}}) {
    const int64_t LB = e.L * e.B;
    at::Tensor K = torch::randn({LB, e.H, e.n, e.D}, f.dtype(torch::kBFloat16));  // (L·B, H, n, D)
    at::Tensor V = torch::randn_like(K);
    at::Tensor S = torch::randn({LB, e.H, e.n}, f);                               // (L·B, H, n)
    auto torch_chain = [&] {
      at::Tensor idx = std::get<0>(std::get<1>(S.topk(e.M, -1)).sort(-1));  // (L·B, H, M)
      at::Tensor gi = idx.unsqueeze(-1).expand({LB, e.H, e.M, e.D});
      K.gather(2, gi);
      V.gather(2, gi);
    };
    const double torch_ms = kvd::bench::time_ms(torch_chain, reps);
    const double torch_gpu_ms = kvd::bench::time_gpu_ms(torch_chain, reps);
    kvd::RowSelectSpec spec;
    spec.keep = e.M;
    kvd::RowSelection sel = kvd::select_rows_fused(S, spec);
    auto select = [&] { sel = kvd::select_rows_fused(S, spec); };
    const double select_ms = kvd::bench::time_ms(select, reps);
    const double select_gpu_ms = kvd::bench::time_gpu_ms(select, reps);
    at::Tensor want = std::get<0>(std::get<1>(S.topk(e.M, -1)).sort(-1)).to(torch::kInt);
    const int64_t differ = sel.indices.ne(want).any(-1).sum().item<int64_t>();
    const double moved = S.numel() * 4.0 + 2.0 * 2.0 * (LB * e.H * e.M * e.D * 2.0);
    // The compaction's two ways: K then V (two launches) or both in one.
    for (const bool one_launch : {false, true}) {
      const char* name = one_launch ? "K+V" : "K then V";
      auto compact = [&](const kvd::RowSelection& s) {
        if (one_launch) {
          kvd::compact_rows_fused(K, V, s);
        } else {
          kvd::compact_rows_fused(K, s);
          kvd::compact_rows_fused(V, s);
        }
      };
      auto both = [&] { compact(kvd::select_rows_fused(S, spec)); };
      const double compact_ms = kvd::bench::time_ms([&] { compact(sel); }, reps);
      const double compact_gpu_ms = kvd::bench::time_gpu_ms([&] { compact(sel); }, reps);
      const double ours_ms = kvd::bench::time_ms(both, reps);
      const double ours_gpu_ms = kvd::bench::time_gpu_ms(both, reps);
      // *_ms: wall clock (host work before the launches included); *_gpu_ms: device time (bench/cuda_time.h).
      std::printf("{\"what\": \"select+compact\", \"compaction\": \"%s\", \"L\": %ld, \"B\": %ld, \"H_kv\": %ld, "
                  "\"n\": %ld, \"keep\": %ld, \"d\": %ld, \"torch_ms\": %.4f, \"ours_ms\": %.4f, \"select_ms\": %.4f, "
                  "\"compact_kv_ms\": %.4f, \"speedup\": %.2f, \"ours_TBps\": %.3f, \"ours_fraction_of_copy\": %.3f, "
                  "\"compact_fraction_of_copy\": %.3f, \"torch_TBps\": %.3f, \"torch_fraction_of_copy\": %.3f, "
                  "\"torch_gpu_ms\": %.4f, \"ours_gpu_ms\": %.4f, \"select_gpu_ms\": %.4f, \"compact_kv_gpu_ms\": %.4f, "
                  "\"gpu_speedup\": %.2f, \"ours_gpu_fraction_of_copy\": %.3f, \"compact_gpu_fraction_of_copy\": %.3f, "
                  "\"torch_gpu_fraction_of_copy\": %.3f, \"segments_whose_kept_set_differs\": %ld}\n",
                  name, (long)e.L, (long)e.B, (long)e.H, (long)e.n, (long)e.M, (long)e.D, torch_ms, ours_ms,
                  select_ms, compact_ms, torch_ms / ours_ms, moved / ours_ms / 1e9, moved / ours_ms / 1e9 / copy_tbps,
                  (moved - S.numel() * 4.0) / compact_ms / 1e9 / copy_tbps, moved / torch_ms / 1e9,
                  moved / torch_ms / 1e9 / copy_tbps, torch_gpu_ms, ours_gpu_ms, select_gpu_ms, compact_gpu_ms,
                  torch_gpu_ms / ours_gpu_ms, moved / ours_gpu_ms / 1e9 / copy_tbps,
                  (moved - S.numel() * 4.0) / compact_gpu_ms / 1e9 / copy_tbps, moved / torch_gpu_ms / 1e9 / copy_tbps,
                  (long)differ);
      std::fflush(stdout);
    }
  }

  // 2. One layer: score + select + compact vs the same layer's attention.
  struct Shape {
    const char* name;
    int64_t D, Hq, Hkv, d;
  };
  const int64_t G = 512;
  for (const Shape& m : {Shape{"SmolLM2-135M", 576, 9, 3, 64}, Shape{"Llama-3-8B", 4096, 32, 8, 128}})
    for (int64_t n : {int64_t{8192}, int64_t{32768}}) {
      const int64_t keep = n / 2;
      at::Tensor hidden = torch::randn({1, n, m.D}, f.dtype(torch::kBFloat16));  // (1, n, D)
      at::Tensor w1 = torch::randn({G, m.D}, f) * 0.05, b1 = torch::randn({G}, f) * 0.1,
                 w2 = torch::randn({m.Hkv, G}, f) * 0.05, bias = torch::randn({m.Hkv}, f) + 3.0;
      at::Tensor pos = torch::arange(n, f.dtype(torch::kLong));
      at::Tensor q = torch::randn({1, m.Hq, n, m.d}, f.dtype(torch::kBFloat16));
      at::Tensor k = torch::randn({1, m.Hkv, n, m.d}, f.dtype(torch::kBFloat16)), v = torch::randn_like(k);
      at::Tensor ke = k.repeat_interleave(m.Hq / m.Hkv, 1), ve = v.repeat_interleave(m.Hq / m.Hkv, 1);
      const double scale = 1.0 / std::sqrt(static_cast<double>(m.d));
      const double attn_ms =
          kvd::bench::time_ms([&] { at::_scaled_dot_product_flash_attention(q, ke, ve, 0.0, true, false, scale); }, reps);
      kvd::RowSelectSpec spec;
      spec.keep = keep;
      at::Tensor scores;
      kvd::RowSelection sel;
      const double score_ms =
          kvd::bench::time_ms([&] { scores = kvd::retention_score_fused(hidden, w1, b1, w2, bias, pos, n); }, reps);
      const double select_ms = kvd::bench::time_ms([&] { sel = kvd::select_rows_fused(scores, spec); }, reps);
      const double compact_ms = kvd::bench::time_ms(
          [&] {
            kvd::compact_rows_fused(k, sel);
            kvd::compact_rows_fused(v, sel);
          },
          reps);
      // The ATen chain (libkvdistill_ops.so's CPU path, run on the GPU).
      at::Tensor aten_scores;
      const double aten_ms = kvd::bench::time_ms(
          [&] {
            at::Tensor z = at::linear(at::silu(at::linear(hidden.to(torch::kFloat), w1, b1)), w2) + bias;  // (1, n, H)
            aten_scores = at::log_sigmoid(z).transpose(1, 2) * (n + 1 - pos).to(torch::kFloat);           // (1, H, n)
            at::Tensor order = std::get<1>(aten_scores.sort(true, -1, true));
            at::Tensor kept = std::get<0>(order.narrow(-1, 0, keep).sort(-1));                           // (1, H, keep)
            at::Tensor gi = kept.unsqueeze(-1).expand({1, m.Hkv, keep, m.d});
            k.narrow(2, 0, keep).copy_(k.gather(2, gi));
            v.narrow(2, 0, keep).copy_(v.gather(2, gi));
          },
          reps);
      const double ours = score_ms + select_ms + compact_ms;
      const double score_err =
          (scores - aten_scores).abs().max().item<double>() / aten_scores.abs().max().item<double>();
      std::printf("{\"what\": \"runtime layer\", \"model\": \"%s\", \"n\": %ld, \"keep\": %ld, \"attention_ms\": %.4f, "
                  "\"score_ms\": %.4f, \"select_ms\": %.4f, \"compact_kv_ms\": %.4f, \"ours_ms\": %.4f, "
                  "\"ours_percent_of_attention\": %.2f, \"aten_ms\": %.4f, \"aten_percent_of_attention\": %.2f, "
                  "\"speedup\": %.2f, \"score_max_rel_diff\": %.2e}\n",
                  m.name, (long)n, (long)keep, attn_ms, score_ms, select_ms, compact_ms, ours,
                  100.0 * ours / attn_ms, aten_ms, 100.0 * aten_ms / attn_ms, aten_ms / ours, score_err);
      std::fflush(stdout);
    }

  // 3. The cache's eviction after a prefill, every layer: select_layer + KVCache::keep, fused vs reference selector.
  struct Prefill {
    const char* name;
    int64_t L, B, Hkv, d, n;
    double ratio;
  };
  for (const Prefill& p : {Prefill{"SmolLM2-135M", 30, 1, 3, 64, 8192, 0.5}, Prefill{"SmolLM2-135M", 30, 8, 3, 64, 8192, 0.5},
                           Prefill{"Llama-3-8B", 32, 1, 8, 128, 32768, 0.875}}) {
    kvd::KVCache full(p.L, p.B, p.Hkv, p.d, torch::kBFloat16, torch::kCUDA), work = full;
    at::Tensor pos = torch::arange(p.n, f.dtype(torch::kLong)).view({1, p.n}).expand({p.B, p.n}).contiguous();
    std::vector<at::Tensor> scores;
    for (int64_t l = 0; l < p.L; ++l) {
      at::Tensor kv = torch::randn({p.B, p.Hkv, p.n, p.d}, f.dtype(torch::kBFloat16));
      full.append(l, kv, kv, pos);
      scores.push_back(torch::round(torch::randn({p.B, p.Hkv, p.n}, f) * 64.0) / 64.0);  // (B, H_kv, n), ties
    }
    kvd::SelectorOptions opt;
    opt.budget = kvd::Budget::ratio(p.ratio);
    std::vector<std::vector<std::vector<int64_t>>> kept(2);  // [path][layer · B · H_kv + r] -> indices
    auto run = [&](kvd::KernelPath path) {
      std::vector<double> ts;
      for (int i = 0; i < reps + 2; ++i) {
        for (int64_t l = 0; l < p.L; ++l) work.copy_layer_from(full, l);
        torch::cuda::synchronize();
        const auto t0 = std::chrono::steady_clock::now();
        for (int64_t l = 0; l < p.L; ++l) work.keep(l, kvd::select_layer(scores[l], l, p.L, opt, -1, at::Tensor(), path));
        torch::cuda::synchronize();
        if (i >= 2) ts.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
      }
      std::vector<std::vector<int64_t>>& out = kept[path == kvd::KernelPath::Fused ? 0 : 1];
      out.clear();
      for (int64_t l = 0; l < p.L; ++l) {
        at::Tensor kp = work.positions(l).cpu();  // (B, H_kv, keep): positions = original indices here
        for (int64_t r = 0; r < p.B * p.Hkv; ++r) {
          at::Tensor row = kp.view({p.B * p.Hkv, -1})[r].contiguous();
          out.emplace_back(row.data_ptr<int64_t>(), row.data_ptr<int64_t>() + row.numel());
        }
      }
      std::sort(ts.begin(), ts.end());
      return ts[ts.size() / 2];
    };
    const double fused_ms = run(kvd::KernelPath::Fused), ref_ms = run(kvd::KernelPath::Reference);
    int64_t differ = 0;
    for (size_t i = 0; i < kept[0].size(); ++i) differ += kept[0][i] != kept[1][i];
    const double moved = 2.0 * static_cast<double>(work.bytes()) + p.L * p.B * p.Hkv * p.n * 4.0;  // kept K, V read + written; scores
    std::printf("{\"what\": \"cache eviction after prefill\", \"model\": \"%s\", \"L\": %ld, \"B\": %ld, \"n\": %ld, "
                "\"ratio\": %.3f, \"fused_ms\": %.3f, \"reference_ms\": %.3f, \"speedup\": %.2f, "
                "\"fused_fraction_of_copy\": %.3f, \"heads_whose_kept_set_differs\": %ld}\n",
                p.name, (long)p.L, (long)p.B, (long)p.n, p.ratio, fused_ms, ref_ms, ref_ms / fused_ms,
                moved / fused_ms / 1e9 / copy_tbps, (long)differ);
    std::fflush(stdout);
  }
  return 0;
}
