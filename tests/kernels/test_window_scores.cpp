// Window-attention column statistics: the dispatcher's LibTorch reference (gates/heuristics.h window_columns,
// what CPU runs use) and the fused CUDA kernel (kernels/window_scores.h), each against the naive float64 loops of
// tests/kernels/window_scores_cases.h. Metric: max |got - ref| over every column sum and sum of squares (and the
// weighted column maximum); 1e-5 for
// the reference (float32 softmax), 2e-5 for the kernel (fp32 scores from bf16 mma, ex2.approx). The kernel is
// deterministic: two runs are bitwise equal. The CUDA cases skip without a GPU.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "gates/heuristics.h"
#include "tests/kernels/window_scores_cases.h"

namespace {

kvd::WindowScoresInput to(const kvd::WindowScoresInput& in, c10::Device d, c10::ScalarType dtype) {
  return {in.q.to(d, dtype), in.q_pos.to(d), in.k.to(d, dtype), in.k_pos.to(d),
          in.valid.defined() ? in.valid.to(d) : at::Tensor(), in.row_weight.defined() ? in.row_weight.to(d) : at::Tensor()};
}

// The same input with a weight per row in [0.5, 1.5) (the max moment's).
kvd::WindowScoresInput weighted(kvd::WindowScoresInput in, uint64_t seed) {
  torch::manual_seed(static_cast<int64_t>(seed));
  in.row_weight = torch::rand({in.q.size(0), in.q.size(2)}) + 0.5;
  return in;
}

TEST(WindowColumnsReference, MatchesNaiveLoopsInAnyRowBlocks) {
  uint64_t seed = 40;
  for (const kvd_test::WindowCase& c : kvd_test::window_cases()) {
    const kvd::WindowScoresInput in = kvd_test::make_window_input(c, seed++);
    const kvd::WindowColumns ref = kvd_test::naive_window_columns(in);
    const kvd::WindowScoresInput f = to(in, torch::kCPU, torch::kFloat);
    for (int64_t row_block : {int64_t{256}, int64_t{7}}) {
      const kvd::WindowColumns got =
          kvd::window_columns(f, kvd::WindowMoments::SumAndSquares, kvd::KernelPath::Fused, row_block);
      EXPECT_FALSE(got.sum.isnan().any().item<bool>()) << "a row that sees nothing must add 0";
      EXPECT_LE(kvd_test::window_error(got, ref), 1e-5) << "w " << c.w << " n " << c.n << " block " << row_block;
    }
    const kvd::WindowColumns sum_only = kvd::window_columns(f, kvd::WindowMoments::Sum, kvd::KernelPath::Reference);
    EXPECT_FALSE(sum_only.sumsq.defined());
    // The maximum over the rows, plain and with row weights, in any row blocks.
    for (bool wt : {false, true}) {
      const kvd::WindowScoresInput x = wt ? weighted(in, seed) : in;
      const kvd::WindowColumns mref = kvd_test::naive_window_columns(x);
      for (int64_t row_block : {int64_t{256}, int64_t{7}}) {
        const kvd::WindowColumns got =
            kvd::window_columns(to(x, torch::kCPU, torch::kFloat), kvd::WindowMoments::Max, kvd::KernelPath::Fused, row_block);
        ASSERT_TRUE(got.max.defined() && !got.sum.defined());
        EXPECT_LE(kvd_test::window_error(got, mref), 1e-5) << "max w " << c.w << " block " << row_block;
        // MaxAndPlain: the same weighted maximum, and the unweighted one equal to Max without weights.
        const kvd::WindowColumns both = kvd::window_columns(to(x, torch::kCPU, torch::kFloat), kvd::WindowMoments::MaxAndPlain,
                                                            kvd::KernelPath::Fused, row_block);
        EXPECT_TRUE(torch::equal(both.max, got.max));
        const kvd::WindowColumns plain =
            kvd::window_columns(to(in, torch::kCPU, torch::kFloat), kvd::WindowMoments::Max, kvd::KernelPath::Fused, row_block);
        EXPECT_TRUE(torch::equal(both.max_plain, plain.max));
      }
    }
  }
}

TEST(WindowScoresKernel, MatchesNaiveLoopsAndIsDeterministic) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  uint64_t seed = 80;
  for (const kvd_test::WindowCase& c : kvd_test::window_cases()) {
    const kvd::WindowScoresInput in = kvd_test::make_window_input(c, seed++);
    const kvd::WindowColumns ref = kvd_test::naive_window_columns(in);
    const kvd::WindowScoresInput g = to(in, torch::kCUDA, torch::kBFloat16);
    ASSERT_TRUE(kvd::window_scores_fused_available(g));
    const kvd::WindowColumns a = kvd::window_columns_fused(g, kvd::WindowMoments::SumAndSquares);
    const kvd::WindowColumns b = kvd::window_columns_fused(g, kvd::WindowMoments::SumAndSquares);
    const double err = kvd_test::window_error(a, ref);
    std::printf("  B %ld H %ld H_kv %ld hd %ld w %ld n %ld: error %.2e\n", (long)c.B, (long)c.H, (long)c.Hkv,
                (long)c.hd, (long)c.w, (long)c.n, err);
    EXPECT_LE(err, 2e-5);
    EXPECT_TRUE(torch::equal(a.sum, b.sum) && torch::equal(a.sumsq, b.sumsq)) << "two runs differ";
    // The dispatcher takes the kernel on CUDA bf16 with Fused, and the reference with Reference.
    const kvd::WindowColumns d = kvd::window_columns(g, kvd::WindowMoments::Sum, kvd::KernelPath::Fused);
    EXPECT_TRUE(torch::equal(d.sum, a.sum));
    EXPECT_FALSE(d.sumsq.defined());
    const kvd::WindowColumns r = kvd::window_columns(g, kvd::WindowMoments::Sum, kvd::KernelPath::Reference);
    EXPECT_LE((r.sum.cpu().to(torch::kDouble) - ref.sum).abs().max().item<double>(), 1e-5);
    // The maximum over the rows with row weights (KVzip+'s), deterministic too.
    const kvd::WindowScoresInput x = weighted(in, seed);
    const kvd::WindowColumns mref = kvd_test::naive_window_columns(x);
    const kvd::WindowColumns m1 = kvd::window_columns_fused(to(x, torch::kCUDA, torch::kBFloat16), kvd::WindowMoments::Max);
    const kvd::WindowColumns m2 = kvd::window_columns_fused(to(x, torch::kCUDA, torch::kBFloat16), kvd::WindowMoments::Max);
    EXPECT_LE(kvd_test::window_error(m1, mref), 2e-5) << "max";
    EXPECT_TRUE(torch::equal(m1.max, m2.max));
    // Both maxima from one launch equal each alone, bit for bit (KVzip's and KVzip+'s shared pass).
    const kvd::WindowColumns mb = kvd::window_columns_fused(to(x, torch::kCUDA, torch::kBFloat16), kvd::WindowMoments::MaxAndPlain);
    const kvd::WindowColumns mp = kvd::window_columns_fused(g, kvd::WindowMoments::Max);
    EXPECT_TRUE(torch::equal(mb.max, m1.max));
    EXPECT_TRUE(torch::equal(mb.max_plain, mp.max));
  }
}

TEST(WindowScoresKernel, RefusesWhatItCannotRun) {
  const kvd::WindowScoresInput in = kvd_test::make_window_input(kvd_test::WindowCase{}, 3);
  EXPECT_FALSE(kvd::window_scores_fused_available(in));  // CPU tensors
  EXPECT_THROW(kvd::window_columns_fused(in, kvd::WindowMoments::Sum), std::exception);
  if (!torch::cuda::is_available()) return;
  kvd::WindowScoresInput f = to(in, torch::kCUDA, torch::kFloat);
  EXPECT_FALSE(kvd::window_scores_fused_available(f));  // float32
  kvd::WindowScoresInput odd = to(in, torch::kCUDA, torch::kBFloat16);
  odd.q = odd.q.narrow(3, 0, 32), odd.k = odd.k.narrow(3, 0, 32);  // head dim 32
  EXPECT_FALSE(kvd::window_scores_fused_available(odd));
}

}  // namespace
