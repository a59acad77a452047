#include "models/kv_cache.h"

#include <algorithm>

#include "common/error.h"
#include "models/config.h"

namespace kvd {

KVCache::KVCache(int64_t num_layers, int64_t batch, int64_t num_kv_heads, int64_t head_dim, c10::ScalarType dtype,
                 c10::Device device)
    : batch_(batch), kv_heads_(num_kv_heads), head_dim_(head_dim), dtype_(dtype), device_(device) {
  KVD_CHECK(num_layers > 0 && batch > 0 && num_kv_heads > 0 && head_dim > 0,
            "KVCache: layers, batch, kv heads and head_dim must be positive (got ", num_layers, ", ", batch, ", ",
            num_kv_heads, ", ", head_dim, ")");
  layers_.resize(num_layers);
  for (Layer& L : layers_) L.len.assign(batch_ * kv_heads_, 0);
}

KVCache::KVCache(const ModelConfig& cfg, int64_t batch, c10::ScalarType dtype, c10::Device device)
    : KVCache(cfg.num_layers, batch, cfg.num_kv_heads, cfg.head_dim, dtype, device) {}

void KVCache::check_layer(int64_t layer) const {
  KVD_CHECK(layer >= 0 && layer < num_layers(), "KVCache: layer ", layer, " out of range [0, ", num_layers(), ")");
}

int64_t KVCache::bytes_per_entry() const {
  return 2 * head_dim_ * static_cast<int64_t>(c10::elementSize(dtype_));
}

void KVCache::reserve(Layer& L, int64_t needed) {
  if (needed <= L.cap) return;
  // Geometric growth (amortized O(1) appends), at least 64 entries at a time.
  const int64_t cap = std::max({needed, L.cap + L.cap / 2, L.cap + 64});
  auto opt = torch::TensorOptions().dtype(dtype_).device(device_);
  // Zeroed, not empty: slots past a ragged head's length are masked out of attention, but a masked weight of
  // 0 times garbage that happens to be NaN/Inf is still NaN (seen on the GPU machine's CPU).
  at::Tensor k = torch::zeros({batch_, kv_heads_, cap, head_dim_}, opt);  // (B, H_kv, cap, hd)
  at::Tensor v = torch::zeros({batch_, kv_heads_, cap, head_dim_}, opt);  // (B, H_kv, cap, hd)
  at::Tensor pos = torch::full({batch_, kv_heads_, cap}, -1, opt.dtype(torch::kLong));  // (B, H_kv, cap)
  const int64_t n = *std::max_element(L.len.begin(), L.len.end());
  if (n > 0) {
    k.narrow(2, 0, n).copy_(L.k.narrow(2, 0, n));
    v.narrow(2, 0, n).copy_(L.v.narrow(2, 0, n));
    pos.narrow(2, 0, n).copy_(L.pos.narrow(2, 0, n));
  }
  L.k = k;
  L.v = v;
  L.pos = pos;
  L.cap = cap;
}

void KVCache::append(int64_t layer, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pos) {
  check_layer(layer);
  Layer& L = layers_[layer];
  KVD_CHECK(k.dim() == 4 && k.size(0) == batch_ && k.size(1) == kv_heads_ && k.size(3) == head_dim_,
            "KVCache::append: k must be (B=", batch_, ", H_kv=", kv_heads_, ", t, hd=", head_dim_, "), got ",
            k.sizes());
  KVD_CHECK(v.sizes() == k.sizes(), "KVCache::append: v ", v.sizes(), " differs from k ", k.sizes());
  const int64_t t = k.size(2);
  if (t == 0) return;
  at::Tensor p = pos;
  if (p.dim() == 2) p = p.unsqueeze(1).expand({batch_, kv_heads_, t});  // (B, H_kv, t)
  KVD_CHECK(p.dim() == 3 && p.size(0) == batch_ && p.size(1) == kv_heads_ && p.size(2) == t,
            "KVCache::append: pos must be (B, t) or (B, H_kv, t), got ", pos.sizes());
  const int64_t n = *std::max_element(L.len.begin(), L.len.end());
  const bool ragged = std::any_of(L.len.begin(), L.len.end(), [&](int64_t l) { return l != n; });
  if (!ragged) {
    reserve(L, n + t);
    L.k.narrow(2, n, t).copy_(k);
    L.v.narrow(2, n, t).copy_(v);
    L.pos.narrow(2, n, t).copy_(p);
  } else {
    // Ragged heads: each head's new entries follow its own entries.
    reserve(L, n + t);
    for (int64_t b = 0; b < batch_; ++b) {
      for (int64_t h = 0; h < kv_heads_; ++h) {
        const int64_t at_ = L.len[b * kv_heads_ + h];
        L.k[b][h].narrow(0, at_, t).copy_(k[b][h]);  // (t, hd)
        L.v[b][h].narrow(0, at_, t).copy_(v[b][h]);  // (t, hd)
        L.pos[b][h].narrow(0, at_, t).copy_(p[b][h]);  // (t)
      }
    }
  }
  for (int64_t& l : L.len) l += t;
  update_peak();
}

int64_t KVCache::max_length(int64_t layer) const {
  check_layer(layer);
  const auto& len = layers_[layer].len;
  return *std::max_element(len.begin(), len.end());
}

int64_t KVCache::length(int64_t layer, int64_t b, int64_t h) const {
  check_layer(layer);
  KVD_CHECK(b >= 0 && b < batch_ && h >= 0 && h < kv_heads_, "KVCache::length: (b, h) = (", b, ", ", h,
            ") out of range");
  return layers_[layer].len[b * kv_heads_ + h];
}

const std::vector<int64_t>& KVCache::lengths(int64_t layer) const {
  check_layer(layer);
  return layers_[layer].len;
}

KVLayerView KVCache::layer(int64_t layer) const {
  check_layer(layer);
  const Layer& L = layers_[layer];
  KVLayerView view;
  view.n = max_length(layer);
  if (view.n == 0) {
    auto opt = torch::TensorOptions().dtype(dtype_).device(device_);
    view.k = torch::empty({batch_, kv_heads_, 0, head_dim_}, opt);
    view.v = torch::empty({batch_, kv_heads_, 0, head_dim_}, opt);
    view.pos = torch::empty({batch_, kv_heads_, 0}, opt.dtype(torch::kLong));
    return view;
  }
  view.k = L.k.narrow(2, 0, view.n);      // (B, H_kv, n, hd)
  view.v = L.v.narrow(2, 0, view.n);      // (B, H_kv, n, hd)
  view.pos = L.pos.narrow(2, 0, view.n);  // (B, H_kv, n)
  const bool ragged = std::any_of(L.len.begin(), L.len.end(), [&](int64_t l) { return l != view.n; });
  if (ragged) {
    at::Tensor len = torch::tensor(L.len, torch::kLong).view({batch_, kv_heads_, 1}).to(device_);  // (B, H_kv, 1)
    view.valid = torch::arange(view.n, torch::TensorOptions().dtype(torch::kLong).device(device_))
                     .view({1, 1, view.n})
                     .lt(len);  // (B, H_kv, n)
  }
  return view;
}

at::Tensor KVCache::positions(int64_t layer) const { return this->layer(layer).pos; }

void KVCache::keep(int64_t layer, const at::Tensor& indices) {
  check_layer(layer);
  Layer& L = layers_[layer];
  KVD_CHECK(indices.dim() == 3 && indices.size(0) == batch_ && indices.size(1) == kv_heads_,
            "KVCache::keep: indices must be (B=", batch_, ", H_kv=", kv_heads_, ", n_keep), got ", indices.sizes());
  KVD_CHECK(indices.scalar_type() == torch::kLong, "KVCache::keep: indices must be int64");
  const int64_t n_keep = indices.size(2);
  if (n_keep > 0) {
    // Every index must address an entry of its own head.
    at::Tensor len = torch::tensor(L.len, torch::kLong).view({batch_, kv_heads_, 1});  // (B, H_kv, 1)
    at::Tensor idx_cpu = indices.to(torch::kCPU);                                      // (B, H_kv, n_keep)
    KVD_CHECK(idx_cpu.ge(0).all().item<bool>() && idx_cpu.lt(len).all().item<bool>(), "KVCache::keep: layer ",
              layer, ": an index is outside its head's entries");
  }
  at::Tensor idx = indices.to(device_);  // (B, H_kv, n_keep)
  const int64_t n = max_length(layer);
  at::Tensor k, v, pos;
  if (n > 0 && n_keep > 0) {
    at::Tensor gi = idx.unsqueeze(-1).expand({batch_, kv_heads_, n_keep, head_dim_});  // (B, H_kv, n_keep, hd)
    k = L.k.narrow(2, 0, n).gather(2, gi);           // (B, H_kv, n_keep, hd), a new tensor
    v = L.v.narrow(2, 0, n).gather(2, gi);           // (B, H_kv, n_keep, hd)
    pos = L.pos.narrow(2, 0, n).gather(2, idx);      // (B, H_kv, n_keep)
  }
  if (n_keep * 2 <= L.cap) {
    // Shrink for real: the kept entries become the whole storage.
    if (n_keep > 0) {
      L.k = k;
      L.v = v;
      L.pos = pos;
    } else {
      L.k = L.v = L.pos = at::Tensor();
    }
    L.cap = n_keep;
  } else if (n_keep > 0) {
    L.k.narrow(2, 0, n_keep).copy_(k);
    L.v.narrow(2, 0, n_keep).copy_(v);
    L.pos.narrow(2, 0, n_keep).copy_(pos);
    L.pos.narrow(2, n_keep, L.cap - n_keep).fill_(-1);
  }
  std::fill(L.len.begin(), L.len.end(), n_keep);
}

int64_t RaggedIndices::count(int64_t row) const {
  const int64_t* o = offsets.data_ptr<int64_t>();
  return o[row + 1] - o[row];
}

void KVCache::keep(int64_t layer, const RaggedIndices& keep) {
  check_layer(layer);
  Layer& L = layers_[layer];
  const int64_t rows = batch_ * kv_heads_;
  KVD_CHECK(keep.offsets.defined() && keep.offsets.dim() == 1 && keep.offsets.size(0) == rows + 1 &&
                keep.offsets.scalar_type() == torch::kLong && keep.offsets.device().is_cpu(),
            "KVCache::keep: offsets must be a CPU int64 (B * H_kv + 1 = ", rows + 1, ") tensor");
  KVD_CHECK(keep.indices.defined() && keep.indices.dim() == 1 && keep.indices.scalar_type() == torch::kLong,
            "KVCache::keep: indices must be a 1-D int64 tensor");
  const int64_t* off = keep.offsets.data_ptr<int64_t>();
  KVD_CHECK(off[0] == 0 && off[rows] == keep.indices.size(0), "KVCache::keep: offsets must run from 0 to ",
            keep.indices.size(0));
  at::Tensor idx_cpu = keep.indices.to(torch::kCPU).contiguous();  // (total)
  const int64_t* ip = idx_cpu.data_ptr<int64_t>();
  int64_t n_new = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t c = off[r + 1] - off[r];
    KVD_CHECK(c >= 0, "KVCache::keep: offsets must not decrease");
    for (int64_t i = off[r]; i < off[r + 1]; ++i)
      KVD_CHECK(ip[i] >= 0 && ip[i] < L.len[r], "KVCache::keep: layer ", layer, ", head row ", r, ": index ", ip[i],
                " is outside its ", L.len[r], " entries");
    n_new = std::max(n_new, c);
  }
  auto opt = torch::TensorOptions().dtype(dtype_).device(device_);
  at::Tensor k, v, pos;
  if (n_new > 0) {
    k = torch::zeros({batch_, kv_heads_, n_new, head_dim_}, opt);                   // (B, H_kv, n_new, hd)
    v = torch::zeros({batch_, kv_heads_, n_new, head_dim_}, opt);                   // (B, H_kv, n_new, hd)
    pos = torch::full({batch_, kv_heads_, n_new}, -1, opt.dtype(torch::kLong));     // (B, H_kv, n_new)
    at::Tensor idx = idx_cpu.to(device_);                                           // (total)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t c = off[r + 1] - off[r];
      if (c == 0) continue;
      const int64_t b = r / kv_heads_, h = r % kv_heads_;
      at::Tensor ir = idx.narrow(0, off[r], c);  // (c)
      k[b][h].narrow(0, 0, c).copy_(L.k[b][h].index_select(0, ir));  // (c, hd)
      v[b][h].narrow(0, 0, c).copy_(L.v[b][h].index_select(0, ir));  // (c, hd)
      pos[b][h].narrow(0, 0, c).copy_(L.pos[b][h].index_select(0, ir));  // (c)
    }
  }
  // Always reallocate: the storage becomes exactly the longest kept head.
  L.k = k;
  L.v = v;
  L.pos = pos;
  L.cap = n_new;
  for (int64_t r = 0; r < rows; ++r) L.len[r] = off[r + 1] - off[r];
}

int64_t KVCache::bytes() const {
  int64_t entries = 0;
  for (const Layer& L : layers_)
    for (int64_t l : L.len) entries += l;
  return entries * bytes_per_entry();
}

int64_t KVCache::allocated_bytes() const {
  int64_t total = 0;
  for (const Layer& L : layers_) {
    if (L.cap == 0) continue;
    total += static_cast<int64_t>(L.k.nbytes() + L.v.nbytes() + L.pos.nbytes());
  }
  return total;
}

void KVCache::update_peak() { peak_bytes_ = std::max(peak_bytes_, bytes()); }

void KVCache::clear() {
  for (Layer& L : layers_) {
    L.k = L.v = L.pos = at::Tensor();
    L.cap = 0;
    std::fill(L.len.begin(), L.len.end(), 0);
  }
  next_position_ = 0;
  peak_bytes_ = 0;
}

}  // namespace kvd
