// The eviction kernels on the GPU (kernels/kv_select.*) against their CPU references at serving sizes. Metrics: kept
// sets and counts equal select_rows_reference exactly (top-k at 32K → 4K, ragged budgets, padded requests,
// protected entries, threshold); compaction byte-identical to compact_rows_reference; the retention score within
// 2e-5 (relative to the largest) of a float64 evaluation, bitwise equal across two runs. GPU only (skipped without
// one); the same kernel code runs in CI through the emulator (emu_kv_select).
#include <atomic>
#include <cstdio>
#include <thread>

#include <gtest/gtest.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/torch.h>

#include "kernels/kv_select.h"

namespace {

using kvd::RowSelectMode;
using kvd::RowSelectSpec;
using kvd::RowSelection;

bool have_kernels() {
  return torch::cuda::is_available() && kvd::kv_select_fused_available(torch::empty({1}, torch::kCUDA));
}

void expect_same(const RowSelection& got, const RowSelection& want, const char* what) {
  ASSERT_TRUE(torch::equal(got.counts.cpu(), want.counts)) << what;
  at::Tensor gi = got.indices.cpu();
  int64_t mismatched = 0;
  for (int64_t b = 0; b < want.counts.size(0); ++b)
    for (int64_t h = 0; h < want.counts.size(1); ++h) {
      const int64_t c = want.counts[b][h].item<int64_t>();
      mismatched += !torch::equal(gi[b][h].narrow(0, 0, c), want.indices[b][h].narrow(0, 0, c));
    }
  EXPECT_EQ(mismatched, 0) << what << ": segments whose kept set differs";
}

TEST(KvSelectKernel, SelectMatchesReferenceAtServingSizes) {
  if (!have_kernels()) GTEST_SKIP() << "no CUDA device or no fused kernels in this build";
  torch::manual_seed(0);
  const int64_t B = 2, H = 8, n = 32768;
  // Quantized scores: thousands of exact ties around the cut.
  at::Tensor s = torch::round(torch::randn({B, H, n}) * 64.0) / 64.0;  // (B, H, n)
  at::Tensor sg = s.cuda();
  RowSelectSpec topk;
  topk.keep = 4096;
  expect_same(kvd::select_rows_fused(sg, topk), kvd::select_rows_reference(s, topk), "top-k 32K -> 4K");
  RowSelectSpec ragged;
  ragged.keeps = torch::randint(0, n + 10, {B, H}, torch::kLong);
  ragged.lengths = torch::tensor({n, n - 1001}, torch::kLong);
  ragged.sinks = 4;
  ragged.recent = 64;
  expect_same(kvd::select_rows_fused(sg, ragged), kvd::select_rows_reference(s, ragged), "ragged, padded, protected");
  RowSelectSpec th;
  th.mode = RowSelectMode::Threshold;
  th.threshold = 0.5;
  th.sinks = 4;
  expect_same(kvd::select_rows_fused(sg, th), kvd::select_rows_reference(s, th), "threshold");
  // Longer than the shared-memory key cache (48K entries): every pass reads the scores again.
  at::Tensor longer = torch::round(torch::randn({1, 2, 70001}) * 16.0) / 16.0;
  RowSelectSpec lk;
  lk.keep = 9000;
  lk.recent = 100;
  expect_same(kvd::select_rows_fused(longer.cuda(), lk), kvd::select_rows_reference(longer, lk), "70001 entries");
  // Awkward small sizes, one CTA chunk or less.
  for (int64_t m : {1, 3, 31, 511, 513}) {
    at::Tensor t = torch::round(torch::randn({3, 5, m}) * 2.0) / 2.0;
    RowSelectSpec spec;
    spec.keep = std::max<int64_t>(1, m / 2);
    expect_same(kvd::select_rows_fused(t.cuda(), spec), kvd::select_rows_reference(t, spec), "small");
  }
}

// Two host threads selecting at once, each on a stream of its own, one with segments of 40K entries (keys cached in
// about 160 KB of shared memory) and one with 64 (a few hundred bytes): the kernel's dynamic shared memory limit is
// one per function for every thread, and a launcher that set it to its own need let the small selection lower it
// between the large one's set and launch (cudaErrorInvalidValue, `eval --workers 2`).
TEST(KvSelectKernel, ThreadsSelectingAtOnceWithDifferentSharedMemory) {
  if (!have_kernels()) GTEST_SKIP() << "no CUDA device or no fused kernels in this build";
  torch::manual_seed(1);
  const at::Tensor big = torch::round(torch::randn({1, 4, 40000}) * 32.0) / 32.0, small = torch::randn({2, 3, 64});
  RowSelectSpec big_spec, small_spec;
  big_spec.keep = 5000;
  small_spec.keep = 17;
  const RowSelection big_want = kvd::select_rows_reference(big, big_spec);
  const RowSelection small_want = kvd::select_rows_reference(small, small_spec);
  std::atomic<int> failures{0};
  auto worker = [&](const at::Tensor& host, const RowSelectSpec& spec, const RowSelection& want) {
    c10::cuda::CUDAStream stream = c10::cuda::getStreamFromPool();
    c10::cuda::CUDAStreamGuard on(stream);
    const at::Tensor dev = host.cuda();
    for (int i = 0; i < 300; ++i) {
      try {
        const RowSelection got = kvd::select_rows_fused(dev, spec);
        if (i % 50 == 0 && !torch::equal(got.counts.cpu(), want.counts)) ++failures;
      } catch (const std::exception& e) {
        if (failures++ == 0) std::fprintf(stderr, "%s\n", e.what());
      }
    }
    stream.synchronize();
  };
  std::thread a(worker, std::cref(big), std::cref(big_spec), std::cref(big_want));
  std::thread b(worker, std::cref(small), std::cref(small_spec), std::cref(small_want));
  a.join();
  b.join();
  EXPECT_EQ(failures.load(), 0);
  expect_same(kvd::select_rows_fused(big.cuda(), big_spec), big_want, "after the threads");
}

TEST(KvSelectKernel, CompactMatchesReference) {
  if (!have_kernels()) GTEST_SKIP() << "no CUDA device or no fused kernels in this build";
  torch::manual_seed(1);
  const int64_t B = 2, H = 8, n = 8191;
  at::Tensor s = torch::randn({B, H, n});
  RowSelectSpec spec;
  spec.keeps = torch::randint(0, n, {B, H}, torch::kLong);
  spec.sinks = 4;
  const RowSelection sel = kvd::select_rows_reference(s, spec);
  RowSelection sel_gpu{sel.indices.cuda(), sel.counts.cuda()};
  for (auto [dtype, d] : std::vector<std::pair<c10::ScalarType, int64_t>>{{torch::kBFloat16, 128}, {torch::kFloat, 3}}) {
    at::Tensor k = torch::randn({B, H, n, d}).to(dtype), v = torch::randn({B, H, n, d}).to(dtype);
    at::Tensor want_k = k.clone(), want_v = v.clone();
    kvd::compact_rows_reference(want_k, sel);
    kvd::compact_rows_reference(want_v, sel);
    at::Tensor got = k.cuda();
    kvd::compact_rows_fused(got, sel_gpu);
    EXPECT_TRUE(torch::equal(got.cpu(), want_k)) << dtype << " d=" << d;
    at::Tensor got_k = k.cuda(), got_v = v.cuda();
    kvd::compact_rows_fused(got_k, got_v, sel_gpu);
    EXPECT_TRUE(torch::equal(got_k.cpu(), want_k) && torch::equal(got_v.cpu(), want_v))
        << dtype << " d=" << d << ", K and V in one launch";
  }
}

TEST(KvSelectKernel, RetentionScoreMatchesFloat64AndIsDeterministic) {
  if (!have_kernels()) GTEST_SKIP() << "no CUDA device or no fused kernels in this build";
  torch::manual_seed(2);
  const int64_t B = 2, n = 4099, D = 576, G = 512, H = 3;  // SmolLM2-135M's gate shape
  auto f = torch::TensorOptions().device(torch::kCUDA);
  at::Tensor w1 = torch::randn({G, D}, f) * 0.05, b1 = torch::randn({G}, f) * 0.1, w2 = torch::randn({H, G}, f) * 0.05,
             bias = torch::randn({H}, f) + 3.0;
  at::Tensor x = torch::randn({B, n, D}, f).to(torch::kBFloat16);
  at::Tensor pos = torch::arange(n, f.dtype(torch::kLong));
  at::Tensor a = kvd::retention_score_fused(x, w1, b1, w2, bias, pos, n);
  at::Tensor b = kvd::retention_score_fused(x, w1, b1, w2, bias, pos, n);
  EXPECT_TRUE(torch::equal(a, b)) << "two runs differ";
  auto dd = [](const at::Tensor& t) { return t.to(torch::kDouble); };
  at::Tensor z = torch::linear(torch::silu(torch::linear(dd(x), dd(w1), dd(b1))), dd(w2)) + dd(bias);  // (B, n, H)
  at::Tensor want = torch::log_sigmoid(z).transpose(1, 2) * (n + 1 - pos).to(torch::kDouble);           // (B, H, n)
  const double err = (dd(a) - want).abs().max().item<double>() / want.abs().max().item<double>();
  std::printf("  retention score on the GPU: max error %.2e of the largest score\n", err);
  EXPECT_LT(err, 2e-5);
}

}  // namespace
