// LazyEviction (docs/methods/lazy_eviction.md): per cached entry, the decode step it was last important and its maximum
// recurrence interval (MRI); at each trigger, entries idle for longer than their MRI go first. See
// gates/decode_eviction.h for the exact ranking.
#include <limits>

#include <torch/torch.h>

#include "common/error.h"
#include "gates/decode_eviction.h"

namespace kvd {

LazyEvictionState lazy_eviction_fresh(int64_t B, int64_t H_kv, int64_t n, int64_t step, c10::Device device) {
  auto li = torch::TensorOptions().dtype(torch::kLong).device(device);
  LazyEvictionState st;
  st.born = torch::full({B, H_kv, n}, step, li);                                      // (B, H_kv, n)
  st.last = torch::full({B, H_kv, n}, step, li);                                      // (B, H_kv, n)
  st.mri = torch::zeros({B, H_kv, n}, li);                                            // (B, H_kv, n)
  st.attn = torch::zeros({B, H_kv, n}, li.dtype(torch::kDouble));                     // (B, H_kv, n)
  return st;
}

namespace {

// The step as an int64 or as a device tensor (fixed-shape decode steps, where a host value would be frozen in a
// CUDA graph): the same arithmetic either way.
at::Tensor like(const at::Tensor& t, int64_t step) { return torch::full_like(t, step); }
at::Tensor like(const at::Tensor& t, const at::Tensor& step) { return step.to(t.scalar_type()).expand_as(t); }

template <class Step>
void update_impl(LazyEvictionState& st, const at::Tensor& attn_in, const at::Tensor& valid, const Step& step,
                 double threshold) {
  KVD_CHECK(attn_in.dim() == 3 && attn_in.sizes() == st.last.sizes(), "lazy_eviction_update: attention ",
            attn_in.sizes(), " does not match the state ", st.last.sizes(), "; extend the state to the cache first");
  at::Tensor attn = attn_in.to(torch::kDouble);  // (B, H_kv, n)
  at::Tensor thr;                                // (B, H_kv, 1) or scalar
  if (threshold > 0) {
    thr = torch::full({1, 1, 1}, threshold, attn.options());
  } else {
    at::Tensor cnt = valid.defined() ? valid.sum(-1, true).to(torch::kDouble)
                                     : torch::full({1, 1, 1}, static_cast<double>(attn.size(2)), attn.options());
    thr = 1.0 / cnt.clamp_min(1.0);  // (B, H_kv, 1)
  }
  at::Tensor imp = attn.gt(thr);  // (B, H_kv, n)
  if (valid.defined()) imp = imp.logical_and(valid);
  const at::Tensor now = like(st.last, step);  // (B, H_kv, n)
  at::Tensor gap = now - st.last;              // (B, H_kv, n)
  // In place: inside a captured decode step (CUDA graphs) the state must stay in the buffers the graph replays; an
  // assignment would leave the next replay reading the state from before the capture.
  st.mri.copy_(torch::where(imp, torch::maximum(st.mri, gap), st.mri));
  st.last.copy_(torch::where(imp, now, st.last));
  st.attn.copy_(valid.defined() ? torch::where(valid, attn, st.attn) : attn);
}

template <class Step>
at::Tensor keep_scores_impl(const LazyEvictionState& st, const at::Tensor& valid, const Step& step, int64_t window) {
  const double inf = std::numeric_limits<double>::infinity();
  const at::Tensor now = like(st.last, step);             // (B, H_kv, n)
  at::Tensor idle = now - st.last;                        // (B, H_kv, n)
  at::Tensor over = (idle - st.mri).to(torch::kDouble);   // (B, H_kv, n) > 0: idle beyond the MRI
  at::Tensor low = 1.0 - st.attn.clamp(0.0, 1.0);          // (B, H_kv, n) in [0, 1], larger = less attended
  // Eviction key, higher = evict first: over-MRI entries 2·over + low >= 2 (distinct overs 2 apart, so
  // attention only breaks ties), the others low <= 1.
  at::Tensor evict = torch::where(over.gt(0), 2.0 * over + low, low);  // (B, H_kv, n)
  at::Tensor keep = -evict;
  keep = keep.masked_fill(st.born.gt(now - window), inf);
  if (valid.defined()) keep = keep.masked_fill(valid.logical_not(), -inf);
  return keep;  // (B, H_kv, n)
}

}  // namespace

void lazy_eviction_update(LazyEvictionState& st, const at::Tensor& attn, const at::Tensor& valid, int64_t step,
                          double threshold) {
  update_impl(st, attn, valid, step, threshold);
}

void lazy_eviction_update(LazyEvictionState& st, const at::Tensor& attn, const at::Tensor& valid,
                          const at::Tensor& step, double threshold) {
  update_impl(st, attn, valid, step, threshold);
}

at::Tensor lazy_eviction_keep_scores(const LazyEvictionState& st, const at::Tensor& valid, int64_t step,
                                     int64_t window) {
  return keep_scores_impl(st, valid, step, window);
}

at::Tensor lazy_eviction_keep_scores(const LazyEvictionState& st, const at::Tensor& valid, const at::Tensor& step,
                                     int64_t window) {
  return keep_scores_impl(st, valid, step, window);
}

}  // namespace kvd
