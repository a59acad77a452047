#include "gates/selector.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include <torch/torch.h>

#include "common/error.h"

namespace kvd {

Budget Budget::ratio(double r) {
  KVD_CHECK(r >= 0.0 && r < 1.0, "compression ratio must lie in [0, 1) (the fraction of tokens removed), got ", r);
  return Budget{BudgetKind::Ratio, r};
}
Budget Budget::tokens(int64_t n) {
  KVD_CHECK(n > 0, "token budget must be positive, got ", n);
  return Budget{BudgetKind::TokensPerHead, static_cast<double>(n)};
}
Budget Budget::threshold(double tau) { return Budget{BudgetKind::Threshold, tau}; }

int64_t Budget::n_kept(int64_t n) const {
  switch (kind) {
    case BudgetKind::Ratio:
      return std::max<int64_t>(1, static_cast<int64_t>(static_cast<double>(n) * (1.0 - value)));
    case BudgetKind::TokensPerHead:
      return std::min<int64_t>(n, static_cast<int64_t>(value));
    case BudgetKind::Threshold:
      break;
  }
  KVD_FAIL("Budget::n_kept: a threshold budget has no fixed count");
}

RaggedIndices ragged_from_mask(const at::Tensor& mask) {  // (B, H_kv, n) bool
  KVD_CHECK(mask.dim() == 3, "ragged_from_mask: mask must be (B, H_kv, n), got ", mask.sizes());
  const int64_t rows = mask.size(0) * mask.size(1), n = mask.size(2);
  at::Tensor flat = mask.reshape({rows, n}).to(torch::kCPU);  // (rows, n)
  RaggedIndices r;
  at::Tensor counts = flat.sum(1).to(torch::kLong);  // (rows)
  r.offsets = torch::cat({torch::zeros({1}, torch::kLong), counts.cumsum(0)});  // (rows + 1)
  r.indices = flat.nonzero().select(1, 1).contiguous();  // (total), row-major: ascending within each row
  return r;
}

std::vector<std::vector<int64_t>> ragged_to_lists(const RaggedIndices& r) {
  const int64_t rows = r.offsets.size(0) - 1;
  at::Tensor idx = r.indices.to(torch::kCPU).contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();
  const int64_t* op = r.offsets.data_ptr<int64_t>();
  std::vector<std::vector<int64_t>> out(rows);
  for (int64_t i = 0; i < rows; ++i) out[i].assign(ip + op[i], ip + op[i + 1]);
  return out;
}

namespace {

// Stable descending order along the last dim: ties keep the lower index first.
at::Tensor order_desc(const at::Tensor& s) {  // (..., m) -> (..., m) int64
  return std::get<1>(s.sort(/*stable=*/true, /*dim=*/-1, /*descending=*/true));
}

}  // namespace

at::Tensor topk_mask(const at::Tensor& scores, int64_t k) {  // (B, H_kv, n)
  const int64_t n = scores.size(-1);
  k = std::clamp<int64_t>(k, 0, n);
  at::Tensor mask = torch::zeros(scores.sizes(), scores.options().dtype(torch::kBool));  // (B, H_kv, n)
  if (k == 0) return mask;
  at::Tensor top = order_desc(scores).narrow(-1, 0, k);  // (B, H_kv, k)
  return mask.scatter(-1, top, true);
}

int64_t pyramid_layer_budget(int64_t n, double ratio, int64_t window, double beta, int64_t layer, int64_t num_layers) {
  KVD_CHECK(beta >= 1.0, "pyramid: beta must be >= 1");
  const double w = static_cast<double>(window), q = static_cast<double>(n);
  const double max_cap = w + q * (1.0 - ratio);
  double min_num = (max_cap - w) / beta;
  double max_num = (max_cap - w) * 2.0 - min_num;
  if (max_num >= q - w) {
    max_num = q - w;
    min_num = (max_cap - w) * 2.0 - max_num;
  }
  if (!(q >= max_num && max_num >= min_num && min_num >= w))
    return std::max<int64_t>(1, static_cast<int64_t>(std::nearbyint(q * (1.0 - ratio))));
  const double steps = num_layers > 1 ? (max_num - min_num) / static_cast<double>(num_layers - 1) : 0.0;
  // Python's round(): half to even, as std::nearbyint in the default rounding mode.
  return static_cast<int64_t>(std::nearbyint(max_num - static_cast<double>(layer) * steps));
}

RaggedIndices select_layer(const at::Tensor& scores, int64_t layer, int64_t num_layers, const SelectorOptions& opt) {
  KVD_CHECK(scores.dim() == 3, "select_layer: scores must be (B, H_kv, n), got ", scores.sizes());
  const int64_t B = scores.size(0), Hkv = scores.size(1), n = scores.size(2);
  const Budget& bud = opt.budget;
  if (bud.kind == BudgetKind::Threshold) return ragged_from_mask(scores.ge(bud.value));
  if (bud.kind == BudgetKind::Ratio && bud.value == 0.0)
    return ragged_from_mask(torch::ones({B, Hkv, n}, scores.options().dtype(torch::kBool)));
  switch (opt.allocation) {
    case Allocation::Uniform:
      return ragged_from_mask(topk_mask(scores, bud.n_kept(n)));
    case Allocation::Pyramid: {
      KVD_CHECK(bud.kind == BudgetKind::Ratio, "pyramid allocation needs a ratio budget");
      const int64_t k = pyramid_layer_budget(n, bud.value, opt.pyramid_window, opt.pyramid_beta, layer, num_layers);
      return ragged_from_mask(topk_mask(scores, k));
    }
    case Allocation::AdaKV: {
      const int64_t k = bud.n_kept(n);
      int64_t n_safe = static_cast<int64_t>(static_cast<double>(k) * opt.ada_alpha);
      if (opt.ada_alpha > 0) n_safe = k > 0 ? std::max<int64_t>(1, n_safe) : 0;
      // The floor: each head's top n_safe outrank everything; then the top H_kv * k of the pooled heads.
      at::Tensor s = scores.to(torch::kFloat).masked_fill(topk_mask(scores, n_safe),
                                                           std::numeric_limits<float>::max());  // (B, H_kv, n)
      at::Tensor flat = s.reshape({B, Hkv * n});                                                  // (B, H_kv n)
      at::Tensor top = order_desc(flat).narrow(-1, 0, Hkv * k);                                  // (B, H_kv k)
      at::Tensor mask = torch::zeros({B, Hkv * n}, scores.options().dtype(torch::kBool)).scatter(-1, top, true);
      return ragged_from_mask(mask.view({B, Hkv, n}));
    }
    case Allocation::Global:
      break;
  }
  KVD_FAIL("select_layer: the global allocation needs every layer's scores (select_all)");
}

std::vector<RaggedIndices> select_all(const std::vector<at::Tensor>& scores, const SelectorOptions& opt) {
  const int64_t L = static_cast<int64_t>(scores.size());
  std::vector<RaggedIndices> out;
  if (opt.allocation != Allocation::Global || opt.budget.kind == BudgetKind::Threshold) {
    for (int64_t l = 0; l < L; ++l) out.push_back(select_layer(scores[l], l, L, opt));
    return out;
  }
  KVD_CHECK(L > 0, "select_all: no layers");
  const int64_t B = scores[0].size(0), Hkv = scores[0].size(1), n = scores[0].size(2);
  std::vector<at::Tensor> flat;
  for (const at::Tensor& s : scores) {
    KVD_CHECK(s.sizes() == scores[0].sizes(), "select_all (global): every layer must hold the same entries");
    flat.push_back(s.to(torch::kFloat).reshape({B, Hkv * n}));
  }
  at::Tensor all = torch::cat(flat, 1);  // (B, L H_kv n)
  const int64_t k = opt.budget.kind == BudgetKind::Ratio && opt.budget.value == 0.0 ? n : opt.budget.n_kept(n);
  at::Tensor top = order_desc(all).narrow(-1, 0, L * Hkv * k);  // (B, L H_kv k)
  at::Tensor mask = torch::zeros({B, L * Hkv * n}, all.options().dtype(torch::kBool)).scatter(-1, top, true);
  at::Tensor m = mask.view({B, L, Hkv, n});  // (B, L, H_kv, n)
  for (int64_t l = 0; l < L; ++l) out.push_back(ragged_from_mask(m.select(1, l)));
  return out;
}

}  // namespace kvd
