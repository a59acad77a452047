#include "gates/selector.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include <torch/torch.h>

#include "common/error.h"
#include "kernels/kv_select.h"
#include "models/device.h"

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

const Budget& SelectorOptions::budget_of(int64_t row) const {
  if (row_budgets.empty()) return budget;
  KVD_CHECK(row >= 0 && row < static_cast<int64_t>(row_budgets.size()), "SelectorOptions: row ", row,
            " has no budget (", row_budgets.size(), " row budgets)");
  return row_budgets[static_cast<size_t>(row)];
}

SelectorOptions SelectorOptions::for_row(int64_t row) const {
  SelectorOptions o = *this;
  o.budget = budget_of(row);
  o.row_budgets.clear();
  return o;
}

RaggedIndices ragged_from_mask(const at::Tensor& mask) {  // (B, H_kv, n) bool
  KVD_CHECK(mask.dim() == 3, "ragged_from_mask: mask must be (B, H_kv, n), got ", mask.sizes());
  const int64_t rows = mask.size(0) * mask.size(1), n = mask.size(2);
  at::Tensor flat = mask.reshape({rows, n});  // (rows, n)
  RaggedIndices r;
  at::Tensor counts = flat.sum(1).to(torch::kCPU, torch::kLong);                   // (rows), the one read-back
  r.offsets = torch::cat({torch::zeros({1}, torch::kLong), counts.cumsum(0)});     // (rows + 1)
  const int64_t total = r.offsets[rows].item<int64_t>();
  // Row-major, so ascending within each row; the size is known, so the device does not report it back.
  r.indices = at::nonzero_static(flat, total).select(1, 1).contiguous();  // (total)
  return r;
}

RaggedIndices ragged_from_mask(const at::Tensor& mask, const std::vector<int64_t>& counts) {  // (B, H_kv, n) bool
  KVD_CHECK(mask.dim() == 3 && static_cast<int64_t>(counts.size()) == mask.size(0) * mask.size(1),
            "ragged_from_mask: mask must be (B, H_kv, n) with one count per head row, got ", mask.sizes(), " and ",
            counts.size(), " counts");
  const int64_t rows = mask.size(0) * mask.size(1);
  std::vector<int64_t> off(rows + 1, 0);
  for (int64_t r = 0; r < rows; ++r) off[r + 1] = off[r] + counts[r];
  const at::Tensor flat = mask.reshape({rows, mask.size(2)});  // (rows, n)
  if (flat.is_cpu()) {  // free here: the counts the caller derived must be the mask's
    const at::Tensor got = flat.sum(1).to(torch::kLong).contiguous();
    KVD_CHECK(std::equal(counts.begin(), counts.end(), got.data_ptr<int64_t>()),
              "ragged_from_mask: the given counts are not the mask's");
  }
  RaggedIndices r;
  r.offsets = torch::tensor(off, torch::kLong);                                    // (rows + 1), host
  r.indices = at::nonzero_static(flat, off.back()).select(1, 1).contiguous();      // (total), ascending per row
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

at::Tensor topk_mask(const at::Tensor& scores, const std::vector<int64_t>& k) {  // (B, H_kv, n)
  KVD_CHECK(scores.dim() == 3 && static_cast<int64_t>(k.size()) == scores.size(0), "topk_mask: scores must be (B, H_kv, n) "
            "with one k per row; got ", scores.sizes(), " and ", k.size(), " k");
  return topk_mask(scores, host_ints(k, scores.device()).view({-1, 1}));
}

at::Tensor topk_mask(const at::Tensor& scores, const at::Tensor& k) {  // (B, H_kv, n); k (B, H_kv) or (B, 1)
  KVD_CHECK(scores.dim() == 3 && k.dim() == 2 && k.size(0) == scores.size(0) &&
                (k.size(1) == scores.size(1) || k.size(1) == 1),
            "topk_mask: scores must be (B, H_kv, n) and k (B, H_kv) or (B, 1); got ", scores.sizes(), " and ", k.sizes());
  const int64_t n = scores.size(-1);
  if (n == 0) return torch::zeros(scores.sizes(), scores.options().dtype(torch::kBool));
  return rank_desc(scores).lt(k.to(scores.device(), torch::kLong).unsqueeze(-1));  // (B, H_kv, n)
}

at::Tensor rank_desc(const at::Tensor& scores) {  // (..., n)
  const int64_t n = scores.size(-1);
  const at::Tensor order = order_desc(scores);  // (..., n)
  return torch::empty_like(order).scatter_(-1, order, torch::arange(n, order.options()).expand_as(order));  // 0 = best
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

namespace {

// The kernel's selection as RaggedIndices: the offsets from the counts (read back from the device, the one
// read-back, unless the caller knows them: host_counts, [b * H_kv + h]), the (B, H_kv, capacity) indices packed
// head after head on the device.
RaggedIndices ragged_from_rows(const RowSelection& sel, const std::vector<int64_t>& host_counts = {}) {
  const int64_t rows = sel.counts.numel(), cap = sel.indices.size(2);
  RaggedIndices r;
  at::Tensor counts = host_counts.empty() ? sel.counts.reshape({rows}).to(torch::kCPU, torch::kLong)  // (rows)
                                          : torch::tensor(host_counts, torch::kLong);
  r.offsets = torch::cat({torch::zeros({1}, torch::kLong), counts.cumsum(0)});   // (rows + 1)
  const int64_t total = r.offsets[rows].item<int64_t>();
  at::Tensor idx = sel.indices.reshape({rows * cap}).to(torch::kLong);  // (rows cap)
  if (total == rows * cap) {
    r.indices = idx;  // every head kept `cap`
    return r;
  }
  const auto opt = idx.options();
  const std::vector<int64_t> cv(counts.data_ptr<int64_t>(), counts.data_ptr<int64_t>() + rows);
  const std::vector<int64_t> ov(r.offsets.data_ptr<int64_t>(), r.offsets.data_ptr<int64_t>() + rows);
  at::Tensor row = at::repeat_interleave(host_ints(cv, idx.device()), std::optional<int64_t>(total));  // (total) head row
  at::Tensor first = host_ints(ov, idx.device()).index_select(0, row);                                  // (total)
  at::Tensor j = torch::arange(total, opt) - first;                                      // (total) slot in the head
  r.indices = idx.index_select(0, row * cap + j);                                        // (total)
  return r;
}

bool use_kernel(const at::Tensor& scores, KernelPath kernels) {
  return kernels == KernelPath::Fused && kv_select_fused_available(scores);
}

// Scores for the kernel: float32, NaN outside `valid` (the kernel ranks NaN below every number, and no threshold
// passes it).
at::Tensor kernel_scores(const at::Tensor& scores, const at::Tensor& valid) {
  at::Tensor s = scores.to(torch::kFloat);  // (B, H_kv, n)
  return valid.defined() ? s.masked_fill(valid.logical_not(), std::numeric_limits<float>::quiet_NaN()) : s;
}

}  // namespace

RaggedIndices select_top(const at::Tensor& scores, const std::vector<int64_t>& k, const at::Tensor& valid,
                         KernelPath kernels) {
  KVD_CHECK(scores.dim() == 3 && static_cast<int64_t>(k.size()) == scores.size(0),
            "select_top: scores must be (B, H_kv, n) with one k per row; got ", scores.sizes(), " and ", k.size(), " k");
  const int64_t n = scores.size(2);
  if (use_kernel(scores, kernels)) {
    RowSelectSpec spec;
    spec.keep = std::clamp<int64_t>(*std::max_element(k.begin(), k.end()), 0, n);  // bounds every head's count
    if (spec.keep == 0) return ragged_from_mask(torch::zeros(scores.sizes(), scores.options().dtype(torch::kBool)));
    // Head (b, h) keeps its top min(k[b], valid entries): the NaN entries rank last, so none of them is among those.
    // (The reference's top-k over every entry, then AND valid, is the same set when a head's valid entries come
    // first, as in every cache view, or when no valid entry ties an invalid one.)
    at::Tensor kk = host_ints(k, scores.device()).view({-1, 1});  // (B, 1)
    spec.keeps = valid.defined() ? torch::minimum(valid.sum(-1), kk) : kk.expand({scores.size(0), scores.size(1)});
    return ragged_from_rows(select_rows_fused(kernel_scores(scores, valid), spec));
  }
  at::Tensor mask = topk_mask(scores, k);             // (B, H_kv, n)
  if (valid.defined()) mask = mask.logical_and(valid);
  return ragged_from_mask(mask);
}

RaggedIndices select_top_prefix(const at::Tensor& scores, const std::vector<int64_t>& k, const std::vector<int64_t>& lengths,
                                KernelPath kernels) {
  KVD_CHECK(scores.dim() == 3 && static_cast<int64_t>(k.size()) == scores.size(0) &&
                static_cast<int64_t>(lengths.size()) == scores.size(0) * scores.size(1),
            "select_top_prefix: scores must be (B, H_kv, n) with one k per row and one length per head; got ",
            scores.sizes(), ", ", k.size(), " k and ", lengths.size(), " lengths");
  const int64_t B = scores.size(0), H = scores.size(1), n = scores.size(2);
  std::vector<int64_t> counts(B * H);  // head (b, h) keeps min(k[b], its entries)
  for (int64_t r = 0; r < B * H; ++r) counts[r] = std::clamp<int64_t>(std::min(k[r / H], lengths[r]), 0, n);
  const at::Tensor len = host_ints(lengths, scores.device()).view({B, H, 1});
  const at::Tensor valid = torch::arange(n, len.options()).view({1, 1, n}).lt(len);  // (B, H_kv, n)
  if (use_kernel(scores, kernels)) {
    RowSelectSpec spec;
    spec.keep = *std::max_element(counts.begin(), counts.end());  // the capacity, known without a read-back
    if (spec.keep == 0) return ragged_from_mask(torch::zeros(scores.sizes(), scores.options().dtype(torch::kBool)), counts);
    spec.keeps = host_ints(counts, scores.device()).view({B, H});
    return ragged_from_rows(select_rows_fused(kernel_scores(scores, valid), spec), counts);
  }
  // Past a head's entries the scores rank last (-inf, ties to the lower index), so its top min(k, length) are
  // entries; the count check in ragged_from_mask holds the caller to that.
  return ragged_from_mask(topk_mask(scores, k).logical_and(valid), counts);
}

RaggedIndices select_threshold(const at::Tensor& scores, double tau, const at::Tensor& valid, KernelPath kernels) {
  KVD_CHECK(scores.dim() == 3, "select_threshold: scores must be (B, H_kv, n), got ", scores.sizes());
  if (use_kernel(scores, kernels)) {
    RowSelectSpec spec;
    spec.mode = RowSelectMode::Threshold;
    spec.threshold = tau;
    return ragged_from_rows(select_rows_fused(kernel_scores(scores, valid), spec));
  }
  at::Tensor mask = scores.ge(tau);  // (B, H_kv, n)
  if (valid.defined()) mask = mask.logical_and(valid);
  return ragged_from_mask(mask);
}

int64_t adakv_floor(const SelectorOptions& opt, int64_t k) {
  const int64_t n_safe = static_cast<int64_t>(static_cast<double>(k) * opt.ada_alpha);
  return opt.ada_alpha > 0 ? (k > 0 ? std::max<int64_t>(1, n_safe) : 0) : n_safe;
}

RaggedIndices select_pooled(const at::Tensor& scores, const std::vector<int64_t>& k, const std::vector<int64_t>& floor,
                            const at::Tensor& valid) {
  KVD_CHECK(scores.dim() == 3 && static_cast<int64_t>(k.size()) == scores.size(0) && floor.size() == k.size(),
            "select_pooled: scores must be (B, H_kv, n) with one k and one floor per row; got ", scores.sizes(), ", ",
            k.size(), " and ", floor.size());
  const int64_t B = scores.size(0), Hkv = scores.size(1), n = scores.size(2);
  const auto lopt = torch::TensorOptions().dtype(torch::kLong).device(scores.device());
  // The floor: each head's top floor[b] outrank everything; then the top H_kv · k[b] of the pooled heads.
  at::Tensor s = scores.to(torch::kFloat).masked_fill(topk_mask(scores, floor),
                                                       std::numeric_limits<float>::max());  // (B, H_kv, n)
  at::Tensor order = order_desc(s.reshape({B, Hkv * n}));                                   // (B, H_kv n)
  std::vector<int64_t> take(B);
  for (int64_t b = 0; b < B; ++b) take[b] = Hkv * std::clamp<int64_t>(k[b], 0, n);
  const at::Tensor first = torch::arange(Hkv * n, lopt).view({1, -1}).lt(host_ints(take, scores.device()).view({B, 1}));
  at::Tensor mask = torch::zeros({B, Hkv * n}, scores.options().dtype(torch::kBool)).scatter(-1, order, first);
  mask = mask.view({B, Hkv, n});
  if (valid.defined()) mask = mask.logical_and(valid);
  return ragged_from_mask(mask);
}

int64_t layer_keep_count(const SelectorOptions& opt, int64_t layer, int64_t num_layers, int64_t tokens) {
  const Budget& bud = opt.budget;
  switch (opt.allocation) {
    case Allocation::Uniform:
      return bud.n_kept(tokens);
    case Allocation::Pyramid:
      KVD_CHECK(bud.kind == BudgetKind::Ratio, "pyramid allocation needs a ratio budget (--ratio)");
      return pyramid_layer_budget(tokens, bud.value, opt.pyramid_window, opt.pyramid_beta, layer, num_layers);
    default:
      KVD_FAIL("layer_keep_count: only the uniform and pyramid allocations keep a fixed count per head");
  }
}

RaggedIndices select_layer(const at::Tensor& scores, int64_t layer, int64_t num_layers, const SelectorOptions& opt,
                           int64_t tokens, const at::Tensor& valid, KernelPath kernels) {
  KVD_CHECK(scores.dim() == 3, "select_layer: scores must be (B, H_kv, n), got ", scores.sizes());
  const int64_t B = scores.size(0), Hkv = scores.size(1), n = scores.size(2);
  if (tokens < 0) tokens = n;
  const Budget& bud = opt.budget;
  if (bud.kind == BudgetKind::Threshold) return select_threshold(scores, bud.value, valid, kernels);
  if (bud.kind == BudgetKind::Ratio && bud.value == 0.0)
    return ragged_from_mask(valid.defined() ? valid : torch::ones({B, Hkv, n}, scores.options().dtype(torch::kBool)));
  switch (opt.allocation) {
    case Allocation::Uniform:
    case Allocation::Pyramid:
      return select_top(scores, std::vector<int64_t>(B, layer_keep_count(opt, layer, num_layers, tokens)), valid,
                        kernels);
    case Allocation::AdaKV: {
      const int64_t k = std::min(bud.n_kept(tokens), n);
      return select_pooled(scores, std::vector<int64_t>(B, k), std::vector<int64_t>(B, adakv_floor(opt, k)), valid);
    }
    case Allocation::Global:
      break;
    case Allocation::Cake:
      KVD_FAIL("select_layer: the cake allocation cascades over layers during prefill (compress_prefill)");
  }
  KVD_FAIL("select_layer: the global allocation needs every layer's scores (select_all)");
}

std::vector<RaggedIndices> select_all(const std::vector<at::Tensor>& scores, const SelectorOptions& opt,
                                      int64_t tokens, const std::vector<at::Tensor>& valid, KernelPath kernels) {
  const int64_t L = static_cast<int64_t>(scores.size());
  KVD_CHECK(valid.empty() || static_cast<int64_t>(valid.size()) == L, "select_all: one validity mask per layer");
  auto valid_of = [&](int64_t l) { return valid.empty() ? at::Tensor() : valid[l]; };
  std::vector<RaggedIndices> out;
  if (opt.allocation != Allocation::Global || opt.budget.kind == BudgetKind::Threshold) {
    for (int64_t l = 0; l < L; ++l) out.push_back(select_layer(scores[l], l, L, opt, tokens, valid_of(l), kernels));
    return out;
  }
  KVD_CHECK(L > 0, "select_all: no layers");
  const int64_t B = scores[0].size(0), Hkv = scores[0].size(1);
  int64_t n = 0;
  for (const at::Tensor& s : scores) {
    KVD_CHECK(s.dim() == 3 && s.size(0) == B && s.size(1) == Hkv, "select_all (global): every layer must be (B, H_kv, n_l)");
    n = std::max(n, s.size(2));
  }
  const float ninf = -std::numeric_limits<float>::infinity();
  std::vector<at::Tensor> flat, vflat;
  for (int64_t l = 0; l < L; ++l) {
    at::Tensor s = scores[l].to(torch::kFloat);  // (B, H_kv, n_l)
    at::Tensor v = valid_of(l).defined() ? valid_of(l) : torch::ones(s.sizes(), s.options().dtype(torch::kBool));
    if (s.size(2) < n) {
      s = torch::constant_pad_nd(s, {0, n - s.size(2)}, ninf);  // (B, H_kv, n)
      v = torch::constant_pad_nd(v, {0, n - v.size(2)}, 0);      // (B, H_kv, n)
    }
    flat.push_back(s.reshape({B, Hkv * n}));
    vflat.push_back(v.reshape({B, Hkv * n}));
  }
  at::Tensor all = torch::cat(flat, 1);    // (B, L H_kv n)
  at::Tensor vall = torch::cat(vflat, 1);  // (B, L H_kv n)
  const int64_t t = tokens < 0 ? n : tokens;
  const int64_t k = opt.budget.kind == BudgetKind::Ratio && opt.budget.value == 0.0 ? t : opt.budget.n_kept(t);
  const int64_t total = std::min(L * Hkv * k, L * Hkv * n);
  at::Tensor top = order_desc(all).narrow(-1, 0, total);  // (B, total)
  at::Tensor mask = torch::zeros({B, L * Hkv * n}, all.options().dtype(torch::kBool)).scatter(-1, top, true);
  mask = mask.logical_and(vall);
  at::Tensor m = mask.view({B, L, Hkv, n});  // (B, L, H_kv, n)
  for (int64_t l = 0; l < L; ++l) out.push_back(ragged_from_mask(m.select(1, l).narrow(2, 0, scores[l].size(2))));
  return out;
}

RaggedIndices concat_ragged(const std::vector<RaggedIndices>& parts) {
  KVD_CHECK(!parts.empty(), "concat_ragged: nothing to concatenate");
  const c10::Device dev = parts[0].indices.device();
  std::vector<at::Tensor> idx, off;
  int64_t base = 0;
  for (size_t i = 0; i < parts.size(); ++i) {
    const at::Tensor& o = parts[i].offsets;  // (rows_i + 1), on the host
    idx.push_back(parts[i].indices.to(dev));
    off.push_back((i == 0 ? o : o.narrow(0, 1, o.size(0) - 1)) + base);
    base += o[-1].item<int64_t>();
  }
  RaggedIndices r;
  r.indices = torch::cat(idx).contiguous();  // (total)
  r.offsets = torch::cat(off).contiguous();  // (rows + 1)
  return r;
}

RaggedIndices ragged_keep_all(const std::vector<int64_t>& lengths, c10::Device device) {
  std::vector<int64_t> idx, off{0};
  for (int64_t len : lengths) {
    for (int64_t j = 0; j < len; ++j) idx.push_back(j);
    off.push_back(off.back() + len);
  }
  RaggedIndices r;
  r.indices = host_ints(idx, device);  // (total)
  r.offsets = torch::tensor(off, torch::kLong);             // (rows + 1)
  return r;
}

std::vector<int64_t> cake_layer_budgets(const std::vector<double>& pref, int64_t total, int64_t cap) {
  const int64_t L = static_cast<int64_t>(pref.size());
  KVD_CHECK(L > 0 && total >= 0 && cap >= 0, "cake_layer_budgets: needs layers and non-negative budgets");
  for (double p : pref) KVD_CHECK(std::isfinite(p) && p >= 0, "cake: layer preferences must be finite and >= 0, got ", p);
  std::vector<int64_t> out(L, 0);
  std::vector<bool> capped(L, false);
  int64_t left = std::min(total, L * cap);  // entries to place among the uncapped layers
  std::vector<double> share(L, 0.0);
  for (;;) {  // water-filling: cap the layers whose share exceeds cap, re-split the rest
    double sum = 0;
    int64_t active = 0;
    for (int64_t l = 0; l < L; ++l)
      if (!capped[l]) sum += pref[l], ++active;
    if (active == 0) break;
    bool changed = false;
    for (int64_t l = 0; l < L; ++l) {
      if (capped[l]) continue;
      share[l] = sum > 0 ? static_cast<double>(left) * pref[l] / sum : static_cast<double>(left) / active;
      if (share[l] > static_cast<double>(cap)) {
        capped[l] = true;
        out[l] = cap;
        left -= cap;
        changed = true;
      }
    }
    if (!changed) break;
  }
  for (int64_t l = 0; l < L; ++l)
    if (!capped[l]) out[l] = std::min(cap, static_cast<int64_t>(std::floor(share[l])));
  return out;
}

}  // namespace kvd
