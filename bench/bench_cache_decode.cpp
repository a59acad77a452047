// Batched decode over a compressed KV cache: the full cache, a uniform budget per head, and a ragged one
// (every head its own count, the same total per row), timed in one run.
//   build/bench_cache_decode --model DIR [--device cuda] [--batch 16] [--context 2048] [--keep 0.5] [--steps 64]
//                            [--paths cache,graph]   (decode paths of models/generate.h, timed in the same run)
// The batch is left-padded (row b's context is 13 * b tokens shorter) and rows stop at staggered steps, so
// the later steps carry finished rows as padding, as an eval batch does. One JSON line per cache shape, then
// the ratios. Timings are the best of --repeat runs after one warm-up. The cache path syncs every step; the
// fixed-shape paths read tokens back every 8 steps.
#include <CLI/CLI.hpp>
#include <torch/cuda.h>

#include <algorithm>
#include <map>
#include <sstream>
#include <cstdio>
#include <numeric>
#include <random>

#include "common/torch_pch.h"
#include "models/generate.h"
#include "models/kv_cache.h"
#include "models/model.h"

namespace {

enum class Shape { Full, Uniform, Ragged };
const char* name(Shape s) { return s == Shape::Full ? "full" : s == Shape::Uniform ? "uniform" : "ragged"; }

// Keeps, per (layer, row, head), a seeded random sorted subset: `keep` of each row's entries per head
// (Uniform), or per-head counts spread 0.25x..1.75x around it and rescaled to the same row total (Ragged).
void compress(kvd::KVCache& cache, Shape shape, double keep, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const int64_t B = cache.batch(), H = cache.num_kv_heads();
  for (int64_t l = 0; l < cache.num_layers(); ++l) {
    std::vector<int64_t> idx, off{0};
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n = cache.length(l, b, 0);
      const int64_t per_head = std::max<int64_t>(1, static_cast<int64_t>(keep * static_cast<double>(n)));
      std::vector<int64_t> count(H, per_head);
      if (shape == Shape::Ragged) {
        std::uniform_real_distribution<double> u(0.25, 1.75);
        std::vector<double> w(H);
        for (double& x : w) x = u(rng);
        const double sum = std::accumulate(w.begin(), w.end(), 0.0);
        int64_t left = per_head * H;
        for (int64_t h = 0; h < H; ++h) {
          count[h] = h + 1 == H ? left : std::min<int64_t>(n, static_cast<int64_t>(w[h] / sum * per_head * H));
          left -= count[h];
        }
        count[H - 1] = std::min<int64_t>(n, count[H - 1]);
      }
      for (int64_t h = 0; h < H; ++h) {
        std::vector<int64_t> all(n);
        std::iota(all.begin(), all.end(), 0);
        std::shuffle(all.begin(), all.end(), rng);
        all.resize(count[h]);
        std::sort(all.begin(), all.end());
        idx.insert(idx.end(), all.begin(), all.end());
        off.push_back(static_cast<int64_t>(idx.size()));
      }
    }
    cache.keep(l, kvd::RaggedIndices{torch::tensor(idx, torch::kLong).to(cache.device()), torch::tensor(off, torch::kLong)});
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"kvdistill batched decode over compressed caches"};
  std::string model_dir, device_s = "cpu", paths_s = "cache,graph";
  int64_t batch = 16, context = 2048, steps = 64, repeat = 2;
  double keep = 0.5;
  app.add_option("--model", model_dir)->required();
  app.add_option("--device", device_s);
  app.add_option("--batch", batch);
  app.add_option("--context", context);
  app.add_option("--keep", keep, "Fraction of each row's entries kept");
  app.add_option("--steps", steps, "Decode steps of the longest row");
  app.add_option("--repeat", repeat);
  app.add_option("--paths", paths_s, "Decode paths to time (models/generate.h): cache, static, graph");
  CLI11_PARSE(app, argc, argv);
  try {
    const c10::Device device(device_s);
    std::vector<kvd::DecodePath> paths;
    std::stringstream ss(paths_s);
    for (std::string p; std::getline(ss, p, ',');) paths.push_back(kvd::parse_decode_path(p));
    kvd::Model model = kvd::Model::load(model_dir, device);
    torch::NoGradGuard no_grad;
    std::mt19937_64 rng(0);
    std::uniform_int_distribution<int64_t> tok(100, model.config().vocab_size - 1);
    std::vector<std::vector<int64_t>> prompts(batch), first(batch);
    std::vector<int64_t> limit(batch);
    for (int64_t b = 0; b < batch; ++b) {
      prompts[b].resize(std::max<int64_t>(16, context - 13 * b));
      for (int64_t& t : prompts[b]) t = tok(rng);
      first[b] = {tok(rng)};
      limit[b] = std::max<int64_t>(1, steps - 3 * b);  // staggered stops: finished rows become padding
    }
    const std::vector<Shape> shapes{Shape::Full, Shape::Uniform, Shape::Ragged};
    std::map<std::pair<int, int>, double> best;               // (shape, path) -> best decode seconds
    std::map<std::pair<int, int>, std::vector<std::vector<int64_t>>> tokens;
    int64_t decode_steps = 0, kv_bytes[3] = {0, 0, 0};
    for (int64_t r = 0; r <= repeat; ++r) {  // r == 0: warm-up
      for (Shape s : shapes)
        for (size_t pi = 0; pi < paths.size(); ++pi) {
          kvd::GenerateOptions g;
          g.max_new_tokens_per_row = limit;
          g.eos_ids = std::vector<int64_t>{};  // run every row to its limit
          g.decode = paths[pi];
          kvd::KVCache cache = model.new_cache(batch);
          std::vector<int64_t> lead;
          model.prefill(kvd::left_pad(prompts, 0, lead), cache, kvd::LogitsMode::LastPosition, {}, lead);
          if (s != Shape::Full) compress(cache, s, keep, 7);
          kv_bytes[static_cast<int>(s)] = cache.bytes();
          kvd::BatchGenerateResult res = kvd::generate_batch(model, first, cache, g);
          decode_steps = res.decode_steps;
          const auto key = std::make_pair(static_cast<int>(s), static_cast<int>(pi));
          tokens[key] = res.tokens;
          if (r > 0) best[key] = std::min(best.count(key) ? best[key] : 1e30, res.decode_seconds);
        }
    }
    for (Shape s : shapes)
      for (size_t pi = 0; pi < paths.size(); ++pi) {
        const auto key = std::make_pair(static_cast<int>(s), static_cast<int>(pi));
        // Tokens equal to the first path's, position by position.
        int64_t same = 0, total = 0;
        const auto& ref = tokens[std::make_pair(static_cast<int>(s), 0)];
        for (size_t b = 0; b < ref.size(); ++b)
          for (size_t i = 0; i < ref[b].size(); ++i, ++total) same += ref[b][i] == tokens[key][b][i];
        std::printf("{\"cache\": \"%s\", \"path\": \"%s\", \"device\": \"%s\", \"batch\": %lld, \"context\": %lld, "
                    "\"keep\": %.3f, \"decode_steps\": %lld, \"ms_per_step\": %.3f, \"kv_mb_after_prefill\": %.2f, "
                    "\"tokens_equal_to_%s\": \"%lld/%lld\"}\n",
                    name(s), kvd::decode_path_name(paths[pi]), device_s.c_str(), static_cast<long long>(batch),
                    static_cast<long long>(context), keep, static_cast<long long>(decode_steps),
                    1e3 * best[key] / static_cast<double>(decode_steps),
                    static_cast<double>(kv_bytes[static_cast<int>(s)]) / 1048576.0, kvd::decode_path_name(paths[0]),
                    static_cast<long long>(same), static_cast<long long>(total));
      }
    for (size_t pi = 0; pi < paths.size(); ++pi) {
      auto t = [&](Shape s) { return best[std::make_pair(static_cast<int>(s), static_cast<int>(pi))]; };
      std::printf("%s: ratio ragged/uniform step time %.2fx; uniform/full %.2fx\n", kvd::decode_path_name(paths[pi]),
                  t(Shape::Ragged) / t(Shape::Uniform), t(Shape::Uniform) / t(Shape::Full));
    }
    for (size_t pi = 1; pi < paths.size(); ++pi)
      for (Shape s : shapes)
        std::printf("%s cache: %s is %.2fx faster per step than %s\n", name(s), kvd::decode_path_name(paths[pi]),
                    best[std::make_pair(static_cast<int>(s), 0)] / best[std::make_pair(static_cast<int>(s), static_cast<int>(pi))],
                    kvd::decode_path_name(paths[0]));
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cache_decode: %s\n", e.what());
    return 1;
  }
}
