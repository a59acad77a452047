// The window-scores kernels' own code (kernels/window_scores.cu) on the CPU through the SIMT emulator, against a
// naive float64 loop (tests/kernels/window_scores_cases.h) on the same bf16 inputs. Metric: max |got - ref| over
// every column sum and sum of squares <= 2e-6 (each is a sum of at most w probabilities in [0, 1], computed in
// fp32; measured up to 4.2e-7), and of the (weighted) column maxima; both maxima from one launch equal each from
// its own launch, bit for bit; pass 1 split into 1, 2 and as many chunks as tiles, so the chunk merge is
// exercised. Runs in CI.
#define KVD_SIMT_EMULATION 1
#include "kernels/window_scores.cu"

#include <algorithm>
#include <cstdio>
#include <set>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "tests/kernels/window_scores_cases.h"

namespace {

kvd::WindowColumns run_emulated(const kvd::WindowScoresInput& in, int chunks, cudaError_t* status = nullptr,
                                bool max_mode = false, at::Tensor* max_plain = nullptr) {
  const int64_t B = in.q.size(0), H = in.q.size(1), w = in.q.size(2), hd = in.q.size(3);
  const int64_t Hkv = in.k.size(1), n = in.k.size(2);
  kvd::kernels::WindowScoresArgs a;
  a.B = static_cast<int>(B), a.H = static_cast<int>(H), a.Hkv = static_cast<int>(Hkv), a.hd = static_cast<int>(hd);
  a.w = static_cast<int>(w), a.n = n, a.chunks = chunks;
  a.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
  at::Tensor q = in.q.contiguous(), qpos = in.q_pos.contiguous();
  at::Tensor part_ml = torch::full({chunks, B * H * w, 2}, NAN), row_ml = torch::full({B * H * w, 2}, NAN);
  kvd::WindowColumns out{torch::full({B, H, n}, NAN), torch::full({B, H, n}, NAN)};
  a.q = reinterpret_cast<const uint16_t*>(q.data_ptr());
  a.k = reinterpret_cast<const uint16_t*>(in.k.data_ptr());
  a.k_sb = in.k.stride(0), a.k_sh = in.k.stride(1);
  a.qpos = qpos.data_ptr<int64_t>();
  a.kpos = in.k_pos.data_ptr<int64_t>();
  a.p_sb = in.k_pos.stride(0), a.p_sh = in.k_pos.stride(1);
  if (in.valid.defined()) {
    a.valid = in.valid.data_ptr<bool>();
    a.v_sb = in.valid.stride(0), a.v_sh = in.valid.stride(1);
  }
  a.part_ml = part_ml.data_ptr<float>();
  a.row_ml = row_ml.data_ptr<float>();
  a.sum = out.sum.data_ptr<float>();
  a.sumsq = out.sumsq.data_ptr<float>();
  at::Tensor rw;
  if (max_mode) {  // `sum` receives the weighted maximum; no sum of squares
    a.max_mode = 1;
    a.sumsq = nullptr;
    if (in.row_weight.defined()) {
      rw = in.row_weight.to(torch::kFloat).contiguous();
      a.row_w = rw.data_ptr<float>();
    }
    if (max_plain) {  // and the unweighted maximum
      *max_plain = torch::full({B, H, n}, NAN);
      a.max_plain = max_plain->data_ptr<float>();
    }
  }
  const cudaError_t e = kvd::kernels::emulated::window_scores(a, nullptr);
  if (status) *status = e;
  else EXPECT_EQ(e, cudaSuccess);
  return out;
}

TEST(WindowScoresEmulated, MatchesNaiveReference) {
  uint64_t seed = 1;
  for (const kvd_test::WindowCase& c : kvd_test::window_cases()) {
    const kvd::WindowScoresInput in = kvd_test::make_window_input(c, seed++);
    const kvd::WindowColumns ref = kvd_test::naive_window_columns(in);
    const int tiles = static_cast<int>((c.n + 63) / 64);
    const int heuristic = kvd::kernels::emulated::window_scores_chunks(static_cast<int>(c.B), static_cast<int>(c.H),
                                                                        static_cast<int>(c.Hkv), static_cast<int>(c.w), c.n);
    EXPECT_TRUE(heuristic >= 1 && heuristic <= tiles);
    for (int chunks : std::set<int>{1, std::min(2, tiles), tiles}) {
      const kvd::WindowColumns got = run_emulated(in, chunks);
      const double err = kvd_test::window_error(got, ref);
      std::printf("  B %ld H %ld H_kv %ld hd %ld w %ld n %ld%s%s%s chunks %d: error %.2e\n", (long)c.B, (long)c.H,
                  (long)c.Hkv, (long)c.hd, (long)c.w, (long)c.n, c.ragged ? " ragged" : "",
                  c.strided ? " strided" : "", c.blind_row ? " blind-row" : "", chunks, err);
      EXPECT_LE(err, 2e-6);
    }
    // The weighted maximum over the rows (WindowMoments::Max).
    kvd::WindowScoresInput x = in;
    x.row_weight = torch::rand({c.B, c.w}) + 0.5;
    const kvd::WindowColumns mref = kvd_test::naive_window_columns(x);
    for (int chunks : std::set<int>{1, tiles}) {
      // Both maxima from one launch: the weighted one equal to its own launch's, the plain one to an unweighted
      // launch's, bit for bit.
      at::Tensor plain;
      const kvd::WindowColumns both = run_emulated(x, chunks, nullptr, true, &plain);
      const kvd::WindowColumns alone = run_emulated(in, chunks, nullptr, true);
      EXPECT_TRUE(torch::equal(plain, alone.sum));
      kvd::WindowColumns got = run_emulated(x, chunks, nullptr, true);
      EXPECT_TRUE(torch::equal(both.sum, got.sum));
      got.max = got.sum;
      got.sum = at::Tensor();
      got.sumsq = at::Tensor();
      const double err = kvd_test::window_error(got, mref);
      std::printf("  max: B %ld H %ld w %ld n %ld chunks %d: error %.2e\n", (long)c.B, (long)c.H, (long)c.w, (long)c.n,
                  chunks, err);
      EXPECT_LE(err, 2e-6);
    }
  }
}

TEST(WindowScoresEmulated, RefusesUnsupportedShapes) {
  const kvd::WindowScoresInput in = kvd_test::make_window_input(kvd_test::WindowCase{}, 7);
  cudaError_t e = cudaSuccess;
  run_emulated(in, 2, &e);  // 19 entries are one tile: 2 chunks cannot be
  EXPECT_EQ(e, cudaErrorInvalidValue);
  kvd::WindowScoresInput wide = in;
  wide.q = torch::zeros({1, 34, 1, 64}).to(torch::kBFloat16);  // G = 34 > 16
  run_emulated(wide, 1, &e);
  EXPECT_EQ(e, cudaErrorInvalidValue);
}

}  // namespace
