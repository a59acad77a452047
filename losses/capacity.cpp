#include "losses/capacity.h"

#include <algorithm>
#include <vector>

#include <torch/autograd.h>
#include <torch/torch.h>

#include "common/error.h"
#include "kernels/soft_cache_size.h"

namespace kvd {
namespace {

c10::ScalarType acc_type(const at::Tensor& x) { return x.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat; }

// The document of every row: (B, T) int64 on x's device (zeros when undefined).
at::Tensor docs_or_zero(const at::Tensor& doc_ids, int64_t B, int64_t T, c10::Device device) {
  if (!doc_ids.defined()) return torch::zeros({B, T}, torch::TensorOptions().dtype(torch::kLong).device(device));
  KVD_CHECK(doc_ids.dim() == 2 && doc_ids.size(0) == B && doc_ids.size(1) == T,
            "capacity loss: doc_ids must be (B=", B, ", T=", T, "), got ", doc_ids.sizes());
  return doc_ids.to(device, torch::kLong);
}

// Per t block, over its rows and the batch: the earliest and the latest first row of their documents. i blocks
// that end before the earliest hold no visible key and are skipped; i blocks that start at or after the
// latest and end before the t block are fully visible (no mask needed).
struct BlockStarts {
  std::vector<int64_t> min_start, max_start;  // [t block]
};
BlockStarts block_doc_starts(const at::Tensor& docs,  // (B, T) int64
                             int64_t block) {
  const int64_t B = docs.size(0), T = docs.size(1);
  at::Tensor pos = positions_in_document(docs, B, T, docs.device());                     // (B, T)
  at::Tensor rows = torch::arange(T, pos.options()).view({1, T}).expand({B, T});          // (B, T)
  at::Tensor start = (rows - pos).to(torch::kCPU).contiguous();                           // (B, T)
  const int64_t nb = (T + block - 1) / block;
  BlockStarts out{std::vector<int64_t>(nb, T), std::vector<int64_t>(nb, 0)};
  auto a = start.accessor<int64_t, 2>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      out.min_start[t / block] = std::min(out.min_start[t / block], a[b][t]);
      out.max_start[t / block] = std::max(out.max_start[t / block], a[b][t]);
    }
  return out;
}

// One tile's ages (t − i) and, unless every pair is visible, which pairs are (i ≤ t, same document).
struct Tile {
  at::Tensor age;     // (1, 1, bt, bi) acc dtype, clamped ≥ 0
  at::Tensor hidden;  // (B, 1, bt, bi) bool: true where the pair is NOT visible; undefined: all visible
};
Tile make_tile(const at::Tensor& docs,  // (B, T) int64
               int64_t t0, int64_t bt, int64_t i0, int64_t bi, bool all_visible, c10::ScalarType acc) {
  auto opt = docs.options();
  at::Tensor t = torch::arange(t0, t0 + bt, opt).view({bt, 1});  // (bt, 1)
  at::Tensor i = torch::arange(i0, i0 + bi, opt).view({1, bi});  // (1, bi)
  at::Tensor d = t - i;                                         // (bt, bi)
  Tile tile;
  tile.age = d.clamp_min(0).to(acc).view({1, 1, bt, bi});  // (1, 1, bt, bi)
  if (!all_visible) {
    at::Tensor other = docs.narrow(1, t0, bt).unsqueeze(-1).ne(docs.narrow(1, i0, bi).unsqueeze(1));  // (B, bt, bi)
    tile.hidden = other.logical_or(d.lt(0).unsqueeze(0)).unsqueeze(1);                                // (B, 1, bt, bi)
  }
  return tile;
}

// Calls f(t0, bt, i0, bi, all_visible) for every tile that may hold a visible pair.
template <typename F>
void for_each_tile(int64_t T, int64_t block, const BlockStarts& starts, F&& f) {
  for (int64_t t0 = 0; t0 < T; t0 += block) {
    const int64_t bt = std::min(block, T - t0), tb = t0 / block;
    const int64_t first = (starts.min_start[tb] / block) * block;
    for (int64_t i0 = first; i0 < t0 + bt; i0 += block) {
      const int64_t bi = std::min(block, T - i0);
      const bool all_visible = i0 >= starts.max_start[tb] && i0 + bi - 1 <= t0;
      f(t0, bt, i0, bi, all_visible);
    }
  }
}

struct SoftCacheSizeFn : public torch::autograd::Function<SoftCacheSizeFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx,
                            const at::Tensor& x,     // (B, H, T)
                            const at::Tensor& docs,  // (B, T) int64
                            int64_t block) {
    torch::NoGradGuard no_grad;
    const c10::ScalarType acc = acc_type(x);
    const int64_t T = x.size(2);
    at::Tensor xa = x.to(acc);                       // (B, H, T)
    at::Tensor out = torch::zeros(x.sizes(), xa.options());  // (B, H, T)
    const BlockStarts starts = block_doc_starts(docs, block);
    for_each_tile(T, block, starts, [&](int64_t t0, int64_t bt, int64_t i0, int64_t bi, bool all_visible) {
      Tile tile = make_tile(docs, t0, bt, i0, bi, all_visible, acc);
      at::Tensor e = (tile.age * xa.narrow(2, i0, bi).unsqueeze(2)).exp_();  // (B, H, bt, bi)
      if (tile.hidden.defined()) e.masked_fill_(tile.hidden, 0);
      out.narrow(2, t0, bt).add_(e.sum(-1));
    });
    ctx->save_for_backward({x, docs});
    ctx->saved_data["block"] = block;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    torch::NoGradGuard no_grad;
    auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];     // (B, H, T)
    const at::Tensor& docs = saved[1];  // (B, T)
    const int64_t block = ctx->saved_data["block"].toInt();
    const c10::ScalarType acc = acc_type(x);
    const int64_t T = x.size(2);
    at::Tensor xa = x.to(acc);                    // (B, H, T)
    at::Tensor dout = grads[0].to(acc);           // (B, H, T)
    at::Tensor dx = torch::zeros(x.sizes(), xa.options());  // (B, H, T)
    const BlockStarts starts = block_doc_starts(docs, block);
    for_each_tile(T, block, starts, [&](int64_t t0, int64_t bt, int64_t i0, int64_t bi, bool all_visible) {
      Tile tile = make_tile(docs, t0, bt, i0, bi, all_visible, acc);
      at::Tensor g = (tile.age * xa.narrow(2, i0, bi).unsqueeze(2)).exp_();  // (B, H, bt, bi) exp((t−j)·x_j)
      g.mul_(tile.age).mul_(dout.narrow(2, t0, bt).unsqueeze(-1));          // · (t − j) · dout_t
      if (tile.hidden.defined()) g.masked_fill_(tile.hidden, 0);
      dx.narrow(2, i0, bi).add_(g.sum(2));
    });
    return {dx.to(x.scalar_type()), at::Tensor(), at::Tensor()};
  }
};

at::Tensor soft_cache_size_dense(const at::Tensor& x, const at::Tensor& docs) {  // (B, H, T), (B, T)
  const int64_t T = x.size(2);
  at::Tensor xa = x.to(acc_type(x));                                           // (B, H, T)
  at::Tensor r = torch::arange(T, docs.options());                             // (T)
  at::Tensor d = r.view({T, 1}) - r.view({1, T});                              // (T, T) t − i
  at::Tensor mask = docs.unsqueeze(-1).eq(docs.unsqueeze(1)).logical_and(d.ge(0).unsqueeze(0));  // (B, T, T)
  at::Tensor e = torch::exp(d.clamp_min(0).to(xa.scalar_type()) * xa.unsqueeze(2));              // (B, H, T, T)
  return e.masked_fill(mask.logical_not().unsqueeze(1), 0).sum(-1);                              // (B, H, T)
}

}  // namespace

at::Tensor positions_in_document(const at::Tensor& doc_ids, int64_t batch, int64_t T, c10::Device device) {
  if (!doc_ids.defined())
    return torch::arange(T, torch::TensorOptions().dtype(torch::kLong).device(device)).view({1, T}).expand({batch, T});
  KVD_CHECK(doc_ids.dim() == 2, "positions_in_document: doc_ids must be (B, T), got ", doc_ids.sizes());
  const int64_t B = doc_ids.size(0), n = doc_ids.size(1);
  if (n == 0) return torch::empty({B, 0}, doc_ids.options().dtype(torch::kLong));
  at::Tensor d = doc_ids.to(torch::kLong);                                    // (B, T)
  at::Tensor idx = torch::arange(n, d.options()).view({1, n}).expand({B, n});  // (B, T)
  at::Tensor change = torch::cat({torch::ones({B, 1}, d.options().dtype(torch::kBool)),
                                  d.narrow(1, 1, n - 1).ne(d.narrow(1, 0, n - 1))}, 1);  // (B, T)
  at::Tensor starts = std::get<0>(torch::where(change, idx, torch::zeros_like(idx)).cummax(1));  // (B, T)
  return idx - starts;
}

at::Tensor soft_cache_size(const at::Tensor& x, const at::Tensor& doc_ids, CapacityImpl impl, int64_t block) {
  KVD_CHECK(x.dim() == 3, "soft_cache_size: x (log beta) must be (B, H, T), got ", x.sizes());
  KVD_CHECK(x.is_floating_point(), "soft_cache_size: x must be floating point");
  KVD_CHECK(block > 0, "soft_cache_size: block must be positive");
  const int64_t B = x.size(0), T = x.size(2);
  at::Tensor docs = docs_or_zero(doc_ids, B, T, x.device());  // (B, T)
  if (T == 0) return torch::zeros(x.sizes(), x.options().dtype(acc_type(x)));
  if (impl == CapacityImpl::Dense) return soft_cache_size_dense(x, docs);
  if (impl == CapacityImpl::Fused) {
    KVD_CHECK(soft_cache_size_fused_available(x) && x.scalar_type() != torch::kDouble,
              "soft_cache_size: the fused kernel needs a CUDA float32 / bfloat16 input and a kvdistill built with "
              "CUDA kernels; use CapacityImpl::Tiled");
    return soft_cache_size_fused(x, docs);
  }
  return SoftCacheSizeFn::apply(x, docs, block);
}

at::Tensor capacity_loss(const at::Tensor& x, const at::Tensor& doc_ids, double budget, CapacityImpl impl,
                         int64_t block) {
  KVD_CHECK(budget > 0, "capacity_loss: the budget M must be positive, got ", budget);
  const int64_t B = x.size(0), T = x.size(2);
  at::Tensor docs = docs_or_zero(doc_ids, B, T, x.device());                          // (B, T)
  at::Tensor S = soft_cache_size(x, docs, impl, block);                               // (B, H, T)
  at::Tensor t = positions_in_document(docs, B, T, x.device()).to(S.scalar_type());   // (B, T)
  at::Tensor denom = (t - budget).clamp_min(1.0).unsqueeze(1);                        // (B, 1, T)
  at::Tensor valid = docs.ge(0).unsqueeze(1);                                         // (B, 1, T)
  at::Tensor excess = S - budget;                                                     // (B, H, T)
  at::Tensor over = excess.gt(0).logical_and(valid);                                  // (B, H, T)
  at::Tensor terms = torch::relu(excess) / denom;                                     // (B, H, T)
  at::Tensor count = over.sum().clamp_min(1).to(S.scalar_type());                     // ()
  return terms.masked_fill(valid.logical_not(), 0).sum() / count;
}

}  // namespace kvd
