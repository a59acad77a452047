// See kernels/kv_select.h.
#include "kernels/kv_select.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "common/error.h"

#ifdef KVD_WITH_RA_KERNEL
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/kv_select.cuh"
#endif

namespace kvd {

namespace {

struct Dims {
  int64_t B, H, n;
};

Dims check_scores(const at::Tensor& scores, const RowSelectSpec& spec) {
  KVD_CHECK(scores.defined() && scores.dim() == 3, "select_rows: scores must be (B, H, n), got ",
            scores.defined() ? scores.sizes() : at::IntArrayRef{});
  KVD_CHECK(scores.scalar_type() == torch::kFloat, "select_rows: scores must be float32, got ", scores.scalar_type());
  const Dims d{scores.size(0), scores.size(1), scores.size(2)};
  KVD_CHECK(d.n <= INT32_MAX, "select_rows: ", d.n, " entries do not fit int32 indices");
  KVD_CHECK(spec.sinks >= 0 && spec.recent >= 0, "select_rows: sinks and recent must be >= 0");
  if (spec.keeps.defined())
    KVD_CHECK(spec.keeps.dim() == 2 && spec.keeps.size(0) == d.B && spec.keeps.size(1) == d.H,
              "select_rows: keeps must be (B, H) = (", d.B, ", ", d.H, "), got ", spec.keeps.sizes());
  if (spec.lengths.defined())
    KVD_CHECK(spec.lengths.dim() == 1 && spec.lengths.size(0) == d.B, "select_rows: lengths must be (B = ", d.B,
              "), got ", spec.lengths.sizes());
  return d;
}

int64_t capacity_of(const Dims& d, const RowSelectSpec& spec) {
  if (spec.mode == RowSelectMode::Threshold) return d.n;
  const int64_t k = spec.keeps.defined() && spec.keep <= 0
                        ? (spec.keeps.numel() ? spec.keeps.max().item<int64_t>() : 0)
                        : spec.keep;
  return std::clamp<int64_t>(k, 0, d.n);
}

// The same order as the kernel's keys: protected first, then by score (NaN lowest, ±0 equal), then lower index.
struct Ranked {
  bool prot;
  float score;
};
bool before(const Ranked& a, const Ranked& b) {
  if (a.prot != b.prot) return a.prot;
  if (a.prot) return false;
  const bool an = std::isnan(a.score), bn = std::isnan(b.score);
  if (an || bn) return !an && bn;
  return a.score > b.score;
}

}  // namespace

bool kv_select_fused_available(const at::Tensor& t) {
#ifdef KVD_WITH_RA_KERNEL
  return t.defined() && t.is_cuda();
#else
  (void)t;
  return false;
#endif
}

RowSelection select_rows_reference(const at::Tensor& scores_in, const RowSelectSpec& spec) {
  const Dims d = check_scores(scores_in, spec);
  at::Tensor scores = scores_in.to(torch::kCPU).contiguous();
  at::Tensor keeps = spec.keeps.defined() ? spec.keeps.to(torch::kCPU, torch::kLong).contiguous() : at::Tensor();
  if (keeps.defined() && spec.keep > 0) keeps = keeps.clamp_max(spec.keep);
  at::Tensor lengths = spec.lengths.defined() ? spec.lengths.to(torch::kCPU, torch::kLong).contiguous() : at::Tensor();
  const int64_t cap = capacity_of(d, spec);
  RowSelection out{torch::zeros({d.B, d.H, cap}, torch::kInt), torch::zeros({d.B, d.H}, torch::kInt)};
  const float* s = scores.data_ptr<float>();
  int32_t* oi = out.indices.data_ptr<int32_t>();
  int32_t* oc = out.counts.data_ptr<int32_t>();
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t h = 0; h < d.H; ++h) {
      const int64_t len = lengths.defined() ? lengths.data_ptr<int64_t>()[b] : d.n;
      const float* row = s + (b * d.H + h) * d.n;
      std::vector<Ranked> r(static_cast<size_t>(len));
      for (int64_t i = 0; i < len; ++i) r[i] = {i < spec.sinks || i >= len - spec.recent, row[i]};
      std::vector<int32_t> kept;
      if (spec.mode == RowSelectMode::Threshold) {
        const float t = static_cast<float>(spec.threshold);
        for (int64_t i = 0; i < len; ++i)
          if (r[i].prot || (!std::isnan(r[i].score) && r[i].score >= t)) kept.push_back(static_cast<int32_t>(i));
      } else {
        const int64_t k = std::clamp<int64_t>(keeps.defined() ? keeps.data_ptr<int64_t>()[b * d.H + h] : spec.keep,
                                              0, len);
        std::vector<int32_t> order(static_cast<size_t>(len));
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(), [&](int32_t x, int32_t y) { return before(r[x], r[y]); });
        kept.assign(order.begin(), order.begin() + k);
        std::sort(kept.begin(), kept.end());
      }
      std::copy(kept.begin(), kept.end(), oi + (b * d.H + h) * cap);
      oc[b * d.H + h] = static_cast<int32_t>(kept.size());
    }
  return out;
}

void compact_rows_reference(at::Tensor& cache, const RowSelection& sel) {
  KVD_CHECK(cache.dim() >= 3 && cache.is_contiguous(), "compact_rows: cache must be contiguous (B, H, n, ...)");
  const int64_t B = cache.size(0), H = cache.size(1);
  at::Tensor idx = sel.indices.to(torch::kCPU, torch::kLong), cnt = sel.counts.to(torch::kCPU, torch::kLong);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t c = cnt[b][h].item<int64_t>();
      if (c == 0) continue;
      at::Tensor seg = cache[b][h];                                  // (n, ...)
      at::Tensor rows = seg.index_select(0, idx[b][h].narrow(0, 0, c).to(seg.device()));  // (c, ...)
      seg.narrow(0, 0, c).copy_(rows);
    }
}

#ifdef KVD_WITH_RA_KERNEL
namespace {
void check_cuda(cudaError_t e, const char* who) { KVD_CHECK(e == cudaSuccess, who, ": CUDA error ", cudaGetErrorString(e)); }
}  // namespace

RowSelection select_rows_fused(const at::Tensor& scores_in, const RowSelectSpec& spec) {
  const Dims d = check_scores(scores_in, spec);
  KVD_CHECK(scores_in.is_cuda(), "select_rows_fused: scores must be on a CUDA device");
  c10::cuda::CUDAGuard guard(scores_in.device());
  at::Tensor scores = scores_in.contiguous();
  const int64_t cap = capacity_of(d, spec);
  auto iopt = scores.options().dtype(torch::kInt);
  RowSelection out{torch::empty({d.B, d.H, std::max<int64_t>(cap, 1)}, iopt), torch::empty({d.B, d.H}, iopt)};
  at::Tensor keeps = spec.keeps.defined() ? spec.keeps.to(scores.device(), torch::kLong) : at::Tensor();
  if (keeps.defined() && spec.keep > 0) keeps = keeps.clamp_max(spec.keep);
  if (keeps.defined()) keeps = keeps.to(torch::kInt).contiguous();  // (B, H)
  at::Tensor lengths = spec.lengths.defined() ? spec.lengths.to(scores.device(), torch::kInt).contiguous() : at::Tensor();
  kernels::SelectArgs a;
  a.scores = scores.data_ptr<float>();
  a.score_stride = d.n;
  a.num_segments = static_cast<int>(d.B * d.H);
  a.heads = static_cast<int>(d.H);
  a.n = d.n;
  a.lengths = lengths.defined() ? lengths.data_ptr<int32_t>() : nullptr;
  a.mode = spec.mode == RowSelectMode::Threshold ? kernels::SelectMode::Threshold : kernels::SelectMode::TopK;
  a.keep = spec.keep;
  a.keeps = keeps.defined() ? keeps.data_ptr<int32_t>() : nullptr;
  a.threshold = static_cast<float>(spec.threshold);
  a.sinks = spec.sinks;
  a.recent = spec.recent;
  a.indices = out.indices.data_ptr<int32_t>();
  a.out_b_stride = d.H * out.indices.size(2);
  a.out_h_stride = out.indices.size(2);
  a.counts = out.counts.data_ptr<int32_t>();
  if (d.B * d.H > 0) check_cuda(kernels::select_rows(a, c10::cuda::getCurrentCUDAStream().stream()), "select_rows_fused");
  out.indices = out.indices.narrow(2, 0, cap);
  return out;
}

namespace {
void compact_fused(at::Tensor& cache, at::Tensor* second, const RowSelection& sel) {
  KVD_CHECK(cache.is_cuda() && cache.dim() >= 3 && cache.is_contiguous(),
            "compact_rows_fused: cache must be a contiguous (B, H, n, ...) CUDA tensor");
  KVD_CHECK(!second || (second->sizes() == cache.sizes() && second->scalar_type() == cache.scalar_type() &&
                        second->device() == cache.device() && second->is_contiguous()),
            "compact_rows_fused: V must be contiguous with K's shape ", cache.sizes(), " and dtype ",
            cache.scalar_type());
  const int64_t B = cache.size(0), H = cache.size(1), n = cache.size(2);
  KVD_CHECK(sel.indices.dim() == 3 && sel.indices.size(0) == B && sel.indices.size(1) == H &&
                sel.indices.scalar_type() == torch::kInt && sel.counts.scalar_type() == torch::kInt,
            "compact_rows_fused: the selection must be int32 (B, H, capacity) indices and (B, H) counts");
  if (cache.numel() == 0) return;
  c10::cuda::CUDAGuard guard(cache.device());
  at::Tensor idx = sel.indices.to(cache.device()).contiguous(), cnt = sel.counts.to(cache.device()).contiguous();
  kernels::CompactArgs a;
  a.base = cache.data_ptr();
  a.base2 = second ? second->data_ptr() : nullptr;
  a.row_bytes = cache.nbytes() / (B * H * n);
  a.segment_rows = n;
  a.num_segments = static_cast<int>(B * H);
  a.heads = static_cast<int>(H);
  a.n = n;
  a.indices = idx.data_ptr<int32_t>();
  a.idx_b_stride = H * idx.size(2);
  a.idx_h_stride = idx.size(2);
  a.counts = cnt.data_ptr<int32_t>();
  check_cuda(kernels::compact_rows(a, c10::cuda::getCurrentCUDAStream().stream()), "compact_rows_fused");
}
}  // namespace

void compact_rows_fused(at::Tensor& cache, const RowSelection& sel) { compact_fused(cache, nullptr, sel); }
void compact_rows_fused(at::Tensor& k, at::Tensor& v, const RowSelection& sel) { compact_fused(k, &v, sel); }

at::Tensor retention_score_fused(const at::Tensor& hidden, const at::Tensor& w1, const at::Tensor& b1,
                                 const at::Tensor& w2, const at::Tensor& bias, const at::Tensor& positions,
                                 int64_t next_position) {
  KVD_CHECK(hidden.is_cuda() && hidden.dim() == 3, "retention_score_fused: hidden must be a (B, n, D) CUDA tensor");
  const int64_t B = hidden.size(0), n = hidden.size(1), D = hidden.size(2);
  KVD_CHECK(w1.dim() == 2 && w1.size(1) == D && w2.dim() == 2 && w2.size(1) == w1.size(0),
            "retention_score_fused: w1 (G, D) and w2 (H, G) do not match hidden size ", D);
  KVD_CHECK(w1.size(0) <= kernels::kMaxGateWidth, "retention_score_fused: gate width ", w1.size(0), " exceeds ",
            kernels::kMaxGateWidth);
  c10::cuda::CUDAGuard guard(hidden.device());
  auto f = hidden.options().dtype(torch::kFloat);
  at::Tensor x = hidden.contiguous();
  at::Tensor w1t = w1.to(f).t().contiguous(), bb = b1.to(f).contiguous(), ww = w2.to(f).contiguous(),
             bs = bias.to(f).contiguous();
  kernels::RetentionGateDevice g;
  g.w1t = w1t.data_ptr<float>();
  g.b1 = bb.data_ptr<float>();
  g.w2 = ww.data_ptr<float>();
  g.bias = bs.data_ptr<float>();
  g.D = static_cast<int>(D);
  g.G = static_cast<int>(w1.size(0));
  g.H = static_cast<int>(w2.size(0));
  kernels::RowDType dt;
  switch (x.scalar_type()) {
    case torch::kFloat: dt = kernels::RowDType::F32; break;
    case torch::kBFloat16: dt = kernels::RowDType::BF16; break;
    case torch::kHalf: dt = kernels::RowDType::F16; break;
    default: KVD_CHECK(false, "retention_score_fused: hidden must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
  at::Tensor pos;
  int64_t pos_stride = 0;
  if (positions.defined()) {
    pos = positions.to(hidden.device(), torch::kLong).contiguous();
    KVD_CHECK((pos.dim() == 1 && pos.size(0) == n) || (pos.dim() == 2 && pos.size(0) == B && pos.size(1) == n),
              "retention_score_fused: positions must be (n) or (B, n), got ", pos.sizes());
    pos_stride = pos.dim() == 2 ? n : 0;
  }
  at::Tensor out = torch::empty({B, g.H, n}, f);
  check_cuda(kernels::retention_score(x.data_ptr(), dt, static_cast<int>(B), n, g,
                                      pos.defined() ? pos.data_ptr<int64_t>() : nullptr, pos_stride, next_position,
                                      out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream()),
             "retention_score_fused");
  return out;
}
#else
RowSelection select_rows_fused(const at::Tensor&, const RowSelectSpec&) {
  KVD_CHECK(false, "select_rows_fused: this build has no CUDA kernels");
}
void compact_rows_fused(at::Tensor&, const RowSelection&) {
  KVD_CHECK(false, "compact_rows_fused: this build has no CUDA kernels");
}
void compact_rows_fused(at::Tensor&, at::Tensor&, const RowSelection&) {
  KVD_CHECK(false, "compact_rows_fused: this build has no CUDA kernels");
}
at::Tensor retention_score_fused(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, const at::Tensor&, int64_t) {
  KVD_CHECK(false, "retention_score_fused: this build has no CUDA kernels");
}
#endif

}  // namespace kvd
