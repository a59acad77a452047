// The eviction kernels' own code (kernels/kv_select.cu) on the CPU through the SIMT emulator. Metrics: kept sets and
// counts equal select_rows_reference exactly (ties, NaN, ±0, protected entries, ragged budgets, padded requests,
// threshold mode); compaction byte-identical to compact_rows_reference (flat at 1-, 4- and 16-byte rows, paged
// with a shuffled block table, two caches in one launch); the retention score within 2e-5 of a float64 evaluation
// of the gate. Runs in CI.
#define KVD_SIMT_EMULATION 1
#include "kernels/kv_select.cu"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "kernels/kv_select.h"

namespace {

namespace emu = kvd::kernels::emulated;
using kvd::RowSelectMode;
using kvd::RowSelectSpec;
using kvd::RowSelection;

// Scores with many exact ties (quantized), a few NaN, −0 next to +0.
at::Tensor awkward_scores(int64_t B, int64_t H, int64_t n, uint64_t seed) {
  torch::manual_seed(static_cast<int64_t>(seed));
  at::Tensor s = torch::round(torch::randn({B, H, n}) * 4.0) / 4.0;  // (B, H, n)
  if (n > 5) {
    s.select(2, 1).fill_(NAN);
    s.select(2, 2).fill_(-0.0);
    s.select(2, 3).fill_(0.0);
  }
  return s;
}

RowSelection run_select(const at::Tensor& scores, const RowSelectSpec& spec) {
  const int64_t B = scores.size(0), H = scores.size(1), n = scores.size(2);
  const int64_t cap = spec.mode == RowSelectMode::Threshold ? n
                      : spec.keeps.defined() ? std::min<int64_t>(n, spec.keeps.max().item<int64_t>())
                                             : std::min<int64_t>(n, std::max<int64_t>(spec.keep, 0));
  RowSelection out{torch::full({B, H, std::max<int64_t>(cap, 1)}, -7, torch::kInt), torch::full({B, H}, -7, torch::kInt)};
  at::Tensor keeps = spec.keeps.defined() ? spec.keeps.to(torch::kInt).contiguous() : at::Tensor();
  at::Tensor lengths = spec.lengths.defined() ? spec.lengths.to(torch::kInt).contiguous() : at::Tensor();
  kvd::kernels::SelectArgs a;
  a.scores = scores.data_ptr<float>();
  a.score_stride = n;
  a.num_segments = static_cast<int>(B * H);
  a.heads = static_cast<int>(H);
  a.n = n;
  a.lengths = lengths.defined() ? lengths.data_ptr<int32_t>() : nullptr;
  a.mode = spec.mode == RowSelectMode::Threshold ? kvd::kernels::SelectMode::Threshold : kvd::kernels::SelectMode::TopK;
  a.keep = spec.keep;
  a.keeps = keeps.defined() ? keeps.data_ptr<int32_t>() : nullptr;
  a.threshold = static_cast<float>(spec.threshold);
  a.sinks = spec.sinks;
  a.recent = spec.recent;
  a.indices = out.indices.data_ptr<int32_t>();
  a.out_b_stride = H * out.indices.size(2);
  a.out_h_stride = out.indices.size(2);
  a.counts = out.counts.data_ptr<int32_t>();
  EXPECT_EQ(emu::select_rows(a, nullptr), cudaSuccess);
  out.indices = out.indices.narrow(2, 0, cap);
  return out;
}

void expect_same_selection(const RowSelection& got, const RowSelection& want, const std::string& what) {
  ASSERT_TRUE(torch::equal(got.counts, want.counts)) << what << "\ncounts " << got.counts << "\nwant " << want.counts;
  for (int64_t b = 0; b < got.counts.size(0); ++b)
    for (int64_t h = 0; h < got.counts.size(1); ++h) {
      const int64_t c = want.counts[b][h].item<int64_t>();
      EXPECT_TRUE(torch::equal(got.indices[b][h].narrow(0, 0, c), want.indices[b][h].narrow(0, 0, c)))
          << what << " b=" << b << " h=" << h;
    }
}

TEST(KvSelectEmulated, TopKMatchesReference) {
  for (int64_t n : {1, 37, 1100}) {  // 1100: three chunks of the CTA's 512 threads
    const at::Tensor s = awkward_scores(2, 2, n, static_cast<uint64_t>(n));
    for (int64_t keep : {int64_t{0}, int64_t{1}, n / 3, n - 1, n + 5}) {
      RowSelectSpec spec;
      spec.keep = keep;
      expect_same_selection(run_select(s, spec), kvd::select_rows_reference(s, spec),
                            "n=" + std::to_string(n) + " keep=" + std::to_string(keep));
      if (n > 40 && keep > 1 && keep < n) {
        spec.sinks = 4;
        spec.recent = 16;
        expect_same_selection(run_select(s, spec), kvd::select_rows_reference(s, spec),
                              "protected n=" + std::to_string(n) + " keep=" + std::to_string(keep));
      }
    }
  }
}

// The search's three ways to read keys: from the shared-memory cache with the candidate buffer (above), from the
// cache past it (more than 4,096 keys share the first 22 bits: a few distinct values, 20,000 entries), and from
// global memory (more entries than the cache holds: every pass re-reads the scores).
TEST(KvSelectEmulated, TopKPastTheCandidateBufferAndTheKeyCache) {
  const at::Tensor few = torch::randint(0, 4, {1, 2, 20000}).to(torch::kFloat) * 0.5f;  // (1, 2, 20000): 4 values
  for (int64_t keep : {int64_t{1}, int64_t{4999}, int64_t{5000}, int64_t{5001}, int64_t{12345}}) {
    RowSelectSpec spec;
    spec.keep = keep;
    spec.sinks = 3;
    expect_same_selection(run_select(few, spec), kvd::select_rows_reference(few, spec),
                          "4 values, keep=" + std::to_string(keep));
  }
  const at::Tensor longer = awkward_scores(1, 1, 50001, 11);  // past kCachedKeys = 49,152
  RowSelectSpec spec;
  spec.keep = 20000;
  spec.recent = 7;
  expect_same_selection(run_select(longer, spec), kvd::select_rows_reference(longer, spec), "50,001 entries");
}

TEST(KvSelectEmulated, RaggedBudgetsPaddedRequestsAndThreshold) {
  const int64_t B = 3, H = 2, n = 700;
  const at::Tensor s = awkward_scores(B, H, n, 11);
  RowSelectSpec spec;
  spec.keeps = torch::tensor({5, 300, 0, 699, 1000, 64}, torch::kLong).view({B, H});
  spec.lengths = torch::tensor({700, 650, 3}, torch::kLong);  // request 2 holds 3 real entries
  spec.sinks = 2;
  spec.recent = 8;
  expect_same_selection(run_select(s, spec), kvd::select_rows_reference(s, spec), "ragged");
  RowSelectSpec th;
  th.mode = RowSelectMode::Threshold;
  th.threshold = 0.25;
  th.lengths = spec.lengths;
  th.sinks = 3;
  expect_same_selection(run_select(s, th), kvd::select_rows_reference(s, th), "threshold");
}

// Runs compact_rows on a host buffer through the emulator (flat when table is undefined).
// base2: a second cache compacted by the same launch.
void run_compact(void* base, int64_t row_bytes, int64_t B, int64_t H, int64_t n, const RowSelection& sel,
                 const at::Tensor& table = at::Tensor(), int tpb = 0, void* base2 = nullptr) {
  at::Tensor idx = sel.indices.contiguous(), cnt = sel.counts.contiguous();
  kvd::kernels::CompactArgs a;
  a.base = base;
  a.row_bytes = row_bytes;
  a.segment_rows = n;
  a.num_segments = static_cast<int>(B * H);
  a.heads = static_cast<int>(H);
  a.n = n;
  if (table.defined()) {
    a.block_table = table.data_ptr<int32_t>();
    a.block_table_stride = table.size(1);
    a.tokens_per_block = tpb;
  }
  a.indices = idx.data_ptr<int32_t>();
  a.idx_b_stride = H * idx.size(2);
  a.idx_h_stride = idx.size(2);
  a.counts = cnt.data_ptr<int32_t>();
  a.base2 = base2;
  ASSERT_EQ(emu::compact_rows(a, nullptr), cudaSuccess);
}

TEST(KvSelectEmulated, CompactFlatMatchesReference) {
  const int64_t B = 2, H = 2, n = 1300;
  const at::Tensor s = awkward_scores(B, H, n, 5);
  RowSelectSpec spec;
  spec.keeps = torch::tensor({1299, 400, 7, 0}, torch::kLong).view({B, H});
  spec.sinks = 3;
  const RowSelection sel = kvd::select_rows_reference(s, spec);
  // Row widths for the 1-, 4- and 16-byte paths: 3 bytes, 12 bytes, 128 bytes (bf16 d = 64), 640 bytes (bf16
  // d = 320: 2 CTA columns of 16-byte vectors) and 601 bytes (3 CTA columns of single bytes).
  const std::vector<std::pair<c10::ScalarType, int64_t>> rows = {
      {torch::kUInt8, 3}, {torch::kInt, 3}, {torch::kBFloat16, 64}, {torch::kBFloat16, 320}, {torch::kUInt8, 601}};
  for (const auto& [dtype, width] : rows) {
    at::Tensor cache = torch::randint(0, 120, {B, H, n, width}, torch::TensorOptions().dtype(dtype));
    at::Tensor want = cache.clone();
    kvd::compact_rows_reference(want, sel);
    at::Tensor one = cache.clone(), two = cache.clone(), second = cache.flip(0).contiguous();
    at::Tensor want2 = second.clone();
    kvd::compact_rows_reference(want2, sel);
    const int64_t row_bytes = cache.nbytes() / (B * H * n);
    run_compact(one.data_ptr(), row_bytes, B, H, n, sel);
    EXPECT_TRUE(torch::equal(one, want)) << "row of " << width << " x " << dtype;
    run_compact(two.data_ptr(), row_bytes, B, H, n, sel, at::Tensor(), 0, second.data_ptr());
    EXPECT_TRUE(torch::equal(two, want) && torch::equal(second, want2))
        << "row of " << width << " x " << dtype << ", two caches in one launch";
  }
}

TEST(KvSelectEmulated, CompactPagedMatchesFlat) {
  const int64_t B = 2, H = 3, n = 333, tpb = 32, d = 8;  // 11 blocks per request; last one partial
  const int64_t nb = (n + tpb - 1) / tpb;
  const at::Tensor s = awkward_scores(B, H, n, 9);
  RowSelectSpec spec;
  spec.keep = 100;
  spec.recent = 5;
  const RowSelection sel = kvd::select_rows_reference(s, spec);
  at::Tensor flat = torch::randn({B, H, n, d});              // (B, H, n, d): the same contents, laid out flat
  at::Tensor perm = torch::randperm(B * nb + 3).to(torch::kInt);  // a shuffled pool with spare blocks
  at::Tensor table = perm.narrow(0, 0, B * nb).view({B, nb}).contiguous();
  at::Tensor pool = torch::zeros({B * nb + 3, H, tpb, d});   // (blocks, H, tokens_per_block, d)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < n; ++i) pool[table[b][i / tpb].item<int64_t>()].select(1, i % tpb).copy_(flat[b].select(1, i));
  kvd::compact_rows_reference(flat, sel);
  run_compact(pool.data_ptr(), d * 4, B, H, n, sel, table, static_cast<int>(tpb));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < spec.keep; ++i)
      ASSERT_TRUE(torch::equal(pool[table[b][i / tpb].item<int64_t>()].select(1, i % tpb), flat[b].select(1, i)))
          << "b=" << b << " token " << i;
}

TEST(KvSelectEmulated, RetentionScoreMatchesFloat64Gate) {
  torch::manual_seed(3);
  const int64_t B = 2, n = 21, D = 70, G = 300, H = 3;  // G > 256: two units per thread; 42 rows: 3 CTAs
  at::Tensor w1 = torch::randn({G, D}) * 0.1, b1 = torch::randn({G}) * 0.1, w2 = torch::randn({H, G}) * 0.1,
             bias = torch::randn({H});
  at::Tensor w1t = w1.t().contiguous();
  kvd::kernels::RetentionGateDevice g;
  g.w1t = w1t.data_ptr<float>();
  g.b1 = b1.data_ptr<float>();
  g.w2 = w2.data_ptr<float>();
  g.bias = bias.data_ptr<float>();
  g.D = D, g.G = G, g.H = H;
  at::Tensor pos = torch::randint(0, 50, {B, n}, torch::kLong);
  for (auto dtype : {torch::kFloat, torch::kBFloat16, torch::kHalf}) {
    at::Tensor x = torch::randn({B, n, D}).to(dtype);
    at::Tensor xd = x.to(torch::kDouble);
    at::Tensor z = torch::linear(torch::silu(torch::linear(xd, w1.to(torch::kDouble), b1.to(torch::kDouble))),
                                 w2.to(torch::kDouble)) + bias.to(torch::kDouble);       // (B, n, H)
    at::Tensor log_beta = torch::log_sigmoid(z).transpose(1, 2);                         // (B, H, n)
    at::Tensor want = log_beta * (60 + 1 - pos).to(torch::kDouble).unsqueeze(1);        // next position 60
    const auto dt = dtype == torch::kFloat ? kvd::kernels::RowDType::F32
                    : dtype == torch::kBFloat16 ? kvd::kernels::RowDType::BF16 : kvd::kernels::RowDType::F16;
    at::Tensor out = torch::full({B, H, n}, NAN), lb = torch::full({B, H, n}, NAN);
    ASSERT_EQ(emu::retention_score(x.data_ptr(), dt, B, n, g, pos.data_ptr<int64_t>(), n, 60, out.data_ptr<float>(),
                                   nullptr), cudaSuccess);
    ASSERT_EQ(emu::retention_score(x.data_ptr(), dt, B, n, g, nullptr, 0, 0, lb.data_ptr<float>(), nullptr), cudaSuccess);
    const double e1 = (out.to(torch::kDouble) - want).abs().max().item<double>() / want.abs().max().item<double>();
    const double e2 = (lb.to(torch::kDouble) - log_beta).abs().max().item<double>() / log_beta.abs().max().item<double>();
    std::printf("  emulated retention score %s: max rel error %.2e (score), %.2e (log beta)\n",
                c10::toString(dtype), e1, e2);
    EXPECT_LT(e1, 2e-5);
    EXPECT_LT(e2, 2e-5);
  }
}

}  // namespace
