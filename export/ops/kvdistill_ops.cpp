// libkvdistill_ops.so: PyTorch operators for serving engines (docs/serving.md), loaded from Python with
// torch.ops.load_library(path) and called as torch.ops.kvdistill.<name>. They are written with ATen operations
// only, so the same code runs on CPU and on CUDA tensors (the device of the inputs), and links nothing of
// kvdistill beyond LibTorch.
//
//   kvdistill::score(hidden, w1, b1, w2, bias, positions, next_position) -> scores
//       TRIM-KV's retention score of one layer from a bundle's tensors of that layer
//       (model.layers.<l>.self_attn.retention_gate.{w1.weight, w1.bias, w2.weight, bias}):
//         log β = log_sigmoid(w2 · silu(w1 · x + b1) + bias)        x: the attention input after the input RMSNorm
//         score = log β · (next_position + 1 − position)             higher keeps
//       hidden (B, n, D) float / bf16 / f16; w1 (G, D), b1 (G), w2 (H_kv, G), bias (H_kv) float32;
//       positions (n) or (B, H_kv, n) int64; returns (B, H_kv, n) float32.
//   kvdistill::select(scores, keep) -> (indices, offsets)
//       per request b and KV head h, the `keep` highest scores of scores (B, H_kv, n); ties go to the lower
//       position (a stable sort, as kvdistill's selectors break them). TensorRT-LLM's layout:
//       indices int32 (H_kv, B · keep), request b's positions in columns [offsets[b], offsets[b + 1]),
//       ascending per head; offsets int32 (B + 1) = b · keep. Every head keeps the same count.
//   kvdistill::compact(cache, indices, offsets) -> cache
//       in place: cache (B, H_kv, n, d) (keys or values, any dtype); for every b and h the kept rows
//       cache[b, h, indices[h, offsets[b]:offsets[b+1]]] move to the front, in order, rows [keep, n) are left
//       as they were. Returns the cache; its first `keep` rows per head are the compacted cache.
// Every check failure raises RuntimeError (c10::Error) naming the argument and what was expected.
//
// With KVD_OPS_CUDA, CUDA tensors go to the fused kernels of kernels/kv_select.cuh (select, compact, and score
// where positions is (n)); the ATen code above serves the CPU and the remaining cases.
#include <torch/library.h>
#include <ATen/ATen.h>

#include <tuple>

#ifdef KVD_OPS_CUDA
#include "kernels/kv_select.h"
#endif

namespace {

void check_float(const at::Tensor& t, const char* name, bool allow_half) {
  const auto st = t.scalar_type();
  const bool ok = st == at::kFloat || (allow_half && (st == at::kBFloat16 || st == at::kHalf));
  TORCH_CHECK(ok, "kvdistill: ", name, " must be ", allow_half ? "float32, bfloat16 or float16" : "float32",
              ", got ", st);
}

void check_device(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "kvdistill: ", name, " is on ", t.device(), " but hidden is on ",
              ref.device(), "; move every tensor to one device");
}

void check_score(const at::Tensor& hidden, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                 const at::Tensor& bias, const at::Tensor& positions) {
  TORCH_CHECK(hidden.dim() == 3, "kvdistill::score: hidden must be (B, n, D), got ", hidden.sizes());
  check_float(hidden, "hidden", true);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{w1, "w1"}, {b1, "b1"}, {w2, "w2"},
                                {bias, "bias"}}) {
    check_float(t, name, false);
    check_device(t, hidden, name);
  }
  check_device(positions, hidden, "positions");
  const int64_t B = hidden.size(0), n = hidden.size(1), D = hidden.size(2);
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == D, "kvdistill::score: w1 must be (G, ", D, ") for hidden size ", D,
              ", got ", w1.sizes(), "; is the bundle for this model?");
  const int64_t G = w1.size(0);
  TORCH_CHECK(b1.dim() == 1 && b1.size(0) == G, "kvdistill::score: b1 must be (", G, "), got ", b1.sizes());
  TORCH_CHECK(w2.dim() == 2 && w2.size(1) == G, "kvdistill::score: w2 must be (H_kv, ", G, "), got ", w2.sizes());
  const int64_t H = w2.size(0);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == H, "kvdistill::score: bias must be (", H, "), got ", bias.sizes());
  TORCH_CHECK(positions.scalar_type() == at::kLong, "kvdistill::score: positions must be int64, got ",
              positions.scalar_type());
  TORCH_CHECK((positions.dim() == 1 && positions.size(0) == n) ||
                  (positions.dim() == 3 && positions.sizes() == at::IntArrayRef({B, H, n})),
              "kvdistill::score: positions must be (", n, ") or (", B, ", ", H, ", ", n, "), got ", positions.sizes());
}

// The score with ATen operations, after check_score.
at::Tensor score_aten(const at::Tensor& hidden, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                      const at::Tensor& bias, const at::Tensor& positions, int64_t next_position) {
  at::Tensor x = hidden.to(at::kFloat);                                        // (B, n, D)
  at::Tensor z = at::linear(at::silu(at::linear(x, w1, b1)), w2) + bias;      // (B, n, H)
  at::Tensor log_beta = at::log_sigmoid(z).transpose(1, 2);                    // (B, H, n)
  at::Tensor age = (next_position + 1 - positions).to(at::kFloat);             // (n) or (B, H, n)
  return (log_beta * age).contiguous();                                        // (B, H, n)
}

at::Tensor score_op(const at::Tensor& hidden, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                    const at::Tensor& bias, const at::Tensor& positions, int64_t next_position) {
  check_score(hidden, w1, b1, w2, bias, positions);
  return score_aten(hidden, w1, b1, w2, bias, positions, next_position);
}

void check_select(const at::Tensor& scores, int64_t keep) {
  TORCH_CHECK(scores.dim() == 3, "kvdistill::select: scores must be (B, H_kv, n), got ", scores.sizes());
  const int64_t n = scores.size(2);
  TORCH_CHECK(keep >= 1 && keep <= n, "kvdistill::select: keep must lie in [1, n = ", n, "], got ", keep);
  TORCH_CHECK(at::isFloatingType(scores.scalar_type()), "kvdistill::select: scores must be floating point, got ",
              scores.scalar_type());
}

at::Tensor trtllm_offsets(int64_t B, int64_t keep, const at::TensorOptions& opt) {
  return (at::arange(B + 1, opt.dtype(at::kLong)) * keep).to(at::kInt);  // (B + 1)
}

std::tuple<at::Tensor, at::Tensor> select_op(const at::Tensor& scores, int64_t keep) {
  check_select(scores, keep);
  const int64_t B = scores.size(0), H = scores.size(1);
  // Stable descending sort: among equal scores the lower position comes first.
  at::Tensor order = std::get<1>(scores.sort(/*stable=*/true, /*dim=*/-1, /*descending=*/true));  // (B, H, n)
  at::Tensor kept = std::get<0>(order.narrow(-1, 0, keep).sort(-1));                              // (B, H, keep)
  at::Tensor indices = kept.permute({1, 0, 2}).reshape({H, B * keep}).to(at::kInt).contiguous();  // (H, B·keep)
  return {indices, trtllm_offsets(B, keep, scores.options())};
}

// The checks of compact; returns keep (rows kept per request and head).
int64_t check_compact(const at::Tensor& cache, const at::Tensor& indices, const at::Tensor& offsets) {
  TORCH_CHECK(cache.dim() == 4, "kvdistill::compact: cache must be (B, H_kv, n, d), got ", cache.sizes());
  const int64_t B = cache.size(0), H = cache.size(1), n = cache.size(2);
  TORCH_CHECK(indices.scalar_type() == at::kInt && offsets.scalar_type() == at::kInt,
              "kvdistill::compact: indices and offsets must be int32 (kvdistill::select's output), got ",
              indices.scalar_type(), " and ", offsets.scalar_type());
  TORCH_CHECK(indices.device() == cache.device() && offsets.device() == cache.device(),
              "kvdistill::compact: indices and offsets must be on the cache's device ", cache.device());
  TORCH_CHECK(indices.dim() == 2 && indices.size(0) == H, "kvdistill::compact: indices must be (H_kv = ", H,
              ", B · keep), got ", indices.sizes());
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) == B + 1, "kvdistill::compact: offsets must be (B + 1 = ",
              B + 1, "), got ", offsets.sizes());
  TORCH_CHECK(indices.size(1) % std::max<int64_t>(B, 1) == 0, "kvdistill::compact: indices' ", indices.size(1),
              " columns are not B = ", B, " equal blocks");
  const int64_t keep = B ? indices.size(1) / B : 0;
  TORCH_CHECK(at::equal(offsets, trtllm_offsets(B, keep, offsets.options())),
              "kvdistill::compact: offsets must be b · keep (equal counts per request)");
  TORCH_CHECK(keep <= n, "kvdistill::compact: keep ", keep, " exceeds the cache's ", n, " rows");
  return keep;
}

at::Tensor compact_op(at::Tensor cache, const at::Tensor& indices, const at::Tensor& offsets) {
  const int64_t keep = check_compact(cache, indices, offsets);
  const int64_t B = cache.size(0), H = cache.size(1), n = cache.size(2);
  if (keep == 0 || B == 0) return cache;
  at::Tensor idx = indices.reshape({H, B, keep}).permute({1, 0, 2}).to(at::kLong);  // (B, H, keep)
  TORCH_CHECK(idx.min().item<int64_t>() >= 0 && idx.max().item<int64_t>() < n,
              "kvdistill::compact: an index lies outside [0, ", n, ")");
  at::Tensor rows = cache.gather(2, idx.unsqueeze(-1).expand({B, H, keep, cache.size(3)}));  // (B, H, keep, d)
  cache.narrow(2, 0, keep).copy_(rows);
  return cache;
}

#ifdef KVD_OPS_CUDA
// CUDA: the fused kernels. Same checks, same results (selection ties and order are the kernels' documented rule,
// which is the ATen path's stable sort). A failure inside the kernels' binding leaves as a c10::Error, like every
// other error of the operators.
template <typename F>
auto as_c10_error(const char* op, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const c10::Error&) {
    throw;
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "kvdistill::", op, ": ", e.what());
  }
}

std::tuple<at::Tensor, at::Tensor> select_cuda(const at::Tensor& scores, int64_t keep) {
  check_select(scores, keep);
  const int64_t B = scores.size(0), H = scores.size(1);
  kvd::RowSelectSpec spec;
  spec.keep = keep;
  const kvd::RowSelection sel =
      as_c10_error("select", [&] { return kvd::select_rows_fused(scores.to(at::kFloat), spec); });  // (B, H, keep)
  at::Tensor indices = sel.indices.permute({1, 0, 2}).reshape({H, B * keep}).contiguous();  // (H, B·keep)
  return {indices, trtllm_offsets(B, keep, scores.options())};
}

at::Tensor compact_cuda(at::Tensor cache, const at::Tensor& indices, const at::Tensor& offsets) {
  const int64_t keep = check_compact(cache, indices, offsets);
  const int64_t B = cache.size(0), H = cache.size(1);
  if (keep == 0 || B == 0) return cache;
  if (!cache.is_contiguous()) return compact_op(cache, indices, offsets);
  kvd::RowSelection sel{indices.reshape({H, B, keep}).permute({1, 0, 2}).contiguous(),  // (B, H, keep)
                        at::full({B, H}, keep, cache.options().dtype(at::kInt))};
  as_c10_error("compact", [&] {
    kvd::compact_rows_fused(cache, sel);
    return 0;
  });
  return cache;
}

at::Tensor score_cuda(const at::Tensor& hidden, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                      const at::Tensor& bias, const at::Tensor& positions, int64_t next_position) {
  check_score(hidden, w1, b1, w2, bias, positions);
  if (positions.dim() != 1 || w1.size(0) > 1024)  // per-head positions, or a gate wider than the kernel's: ATen
    return score_aten(hidden, w1, b1, w2, bias, positions, next_position);
  return as_c10_error("score", [&] { return kvd::retention_score_fused(hidden, w1, b1, w2, bias, positions, next_position); });
}
#endif

}  // namespace

TORCH_LIBRARY(kvdistill, m) {
  m.def("score(Tensor hidden, Tensor w1, Tensor b1, Tensor w2, Tensor bias, Tensor positions, int next_position) -> Tensor");
  m.def("select(Tensor scores, int keep) -> (Tensor, Tensor)");
  m.def("compact(Tensor(a!) cache, Tensor indices, Tensor offsets) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(kvdistill, CompositeExplicitAutograd, m) {
  m.impl("score", TORCH_FN(score_op));
  m.impl("select", TORCH_FN(select_op));
  m.impl("compact", TORCH_FN(compact_op));
}

#ifdef KVD_OPS_CUDA
TORCH_LIBRARY_IMPL(kvdistill, CUDA, m) {
  m.impl("score", TORCH_FN(score_cuda));
  m.impl("select", TORCH_FN(select_cuda));
  m.impl("compact", TORCH_FN(compact_cuda));
}
#endif
