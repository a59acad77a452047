// Prefill and decode throughput of kvdistill's frozen decoder.
//   build/bench_decoder --model DIR [--device cuda] [--prefill 4096] [--decode 128] [--repeat 3]
// Prints one JSON line; bench/decoder.sh runs it next to transformers on the same machine and prints the
// ratio. Random token ids (seeded); timings exclude loading and one warm-up run; CUDA is synchronized.
#include <CLI/CLI.hpp>
#include <torch/cuda.h>

#include <algorithm>
#include <chrono>
#include <cstdio>

#include "common/torch_pch.h"
#include "models/kv_cache.h"
#include "models/model.h"

namespace {
double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }
void sync(const c10::Device& d) {
  if (d.is_cuda()) torch::cuda::synchronize();
}
}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"kvdistill decoder throughput"};
  std::string model_dir, device_s = "cpu";
  int64_t prefill = 4096, decode = 128, repeat = 3;
  app.add_option("--model", model_dir)->required();
  app.add_option("--device", device_s);
  app.add_option("--prefill", prefill);
  app.add_option("--decode", decode);
  app.add_option("--repeat", repeat);
  CLI11_PARSE(app, argc, argv);
  try {
    const c10::Device device(device_s);
    kvd::Model model = kvd::Model::load(model_dir, device);
    torch::NoGradGuard no_grad;
    torch::manual_seed(0);
    at::Tensor ids = torch::randint(0, model.config().vocab_size, {1, prefill}, torch::kInt64).to(device);
    double best_prefill = 1e30, best_decode = 1e30;
    int64_t peak = 0;
    for (int64_t r = 0; r <= repeat; ++r) {  // r == 0 is the warm-up
      kvd::KVCache cache = model.new_cache(1);
      sync(device);
      double t0 = now();
      at::Tensor logits = model.prefill(ids, cache);
      sync(device);
      double t1 = now();
      at::Tensor next = logits.argmax(-1).view({1, 1});
      for (int64_t s = 0; s < decode; ++s) next = model.decode(next, cache).argmax(-1).view({1, 1});
      sync(device);
      double t2 = now();
      if (r > 0) {
        best_prefill = std::min(best_prefill, t1 - t0);
        best_decode = std::min(best_decode, t2 - t1);
      }
      peak = cache.peak_bytes();
    }
    std::printf("{\"impl\": \"kvdistill\", \"device\": \"%s\", \"dtype\": \"%s\", \"prefill_tokens\": %lld, "
                "\"prefill_tok_s\": %.1f, \"decode_tokens\": %lld, \"decode_tok_s\": %.2f, \"peak_kv_mb\": %.2f}\n",
                device_s.c_str(), c10::toString(model.dtype()), static_cast<long long>(prefill), prefill / best_prefill,
                static_cast<long long>(decode), decode / best_decode, peak / 1e6);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_decoder: %s\n", e.what());
    return 1;
  }
  return 0;
}
