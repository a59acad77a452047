#include "models/kv_cache.h"

#include <algorithm>
#include <limits>
#include <numeric>

#include "common/error.h"
#include "models/config.h"
#include "models/device.h"

namespace kvd {

KVCache::KVCache(int64_t num_layers, int64_t batch, int64_t num_kv_heads, int64_t head_dim, c10::ScalarType dtype,
                 c10::Device device)
    : batch_(batch), kv_heads_(num_kv_heads), head_dim_(head_dim), dtype_(dtype), device_(device) {
  KVD_CHECK(num_layers > 0 && batch > 0 && num_kv_heads > 0 && head_dim > 0,
            "KVCache: layers, batch, kv heads and head_dim must be positive (got ", num_layers, ", ", batch, ", ",
            num_kv_heads, ", ", head_dim, ")");
  layers_.resize(num_layers);
  for (Layer& L : layers_) {
    L.len.assign(batch_ * kv_heads_, 0);
    L.cap.assign(batch_ * kv_heads_, 0);
    L.start.assign(batch_ * kv_heads_, 0);
  }
  next_pos_.assign(batch_, 0);
  row_entries_.assign(batch_, 0);
  row_peak_.assign(batch_, 0);
}

KVCache::KVCache(const ModelConfig& cfg, int64_t batch, c10::ScalarType dtype, c10::Device device)
    : KVCache(cfg.num_layers, batch, cfg.num_kv_heads, cfg.head_dim, dtype, device) {}

void KVCache::check_layer(int64_t layer) const {
  KVD_CHECK(layer >= 0 && layer < num_layers(), "KVCache: layer ", layer, " out of range [0, ", num_layers(), ")");
}

int64_t KVCache::bytes_per_entry() const {
  return 2 * head_dim_ * static_cast<int64_t>(c10::elementSize(dtype_));
}

KVCache::Layout KVCache::layout(const Layer& L) const {
  const int64_t c = L.cap[0];
  for (size_t r = 0; r < L.cap.size(); ++r)
    if (L.cap[r] != c || L.start[r] != static_cast<int64_t>(r) * c) return Layout::Irregular;
  return Layout::Regular;
}

void KVCache::set_len(Layer& L, int64_t r, int64_t n) {
  row_entries_[r / kv_heads_] += n - L.len[r];
  L.len[r] = n;
}

const at::Tensor& KVCache::device_start(const Layer& L) const {
  if (!L.start_d.defined()) L.start_d = host_ints(L.start, device_);
  return L.start_d;
}

const at::Tensor& KVCache::device_len(const Layer& L) const {
  if (!L.len_d.defined()) L.len_d = host_ints(L.len, device_);
  return L.len_d;
}

const at::Tensor& KVCache::device_vector(const std::vector<int64_t>& v) const {
  if (!memo_d_.defined() || v != memo_key_) {
    memo_key_ = v;
    memo_d_ = host_ints(v, device_);
  }
  return memo_d_;
}

void KVCache::reallocate(Layer& L, const std::vector<int64_t>& new_cap) {
  const int64_t rows = batch_ * kv_heads_;
  std::vector<int64_t> new_start(rows, 0);
  int64_t total = 0;
  for (int64_t r = 0; r < rows; ++r) {
    KVD_CHECK(new_cap[r] >= L.len[r], "KVCache: internal error, a segment would shrink below its entries");
    new_start[r] = total;
    total += new_cap[r];
  }
  auto opt = torch::TensorOptions().dtype(dtype_).device(device_);
  // Zeroed, not empty: slots past a head's length are masked out of attention, but a masked weight of 0 times
  // garbage that happens to be NaN/Inf is still NaN (seen on the GPU machine's CPU).
  at::Tensor k = torch::zeros({total, head_dim_}, opt);               // (S_total', hd)
  at::Tensor v = torch::zeros({total, head_dim_}, opt);               // (S_total', hd)
  at::Tensor pos = torch::full({total}, -1, opt.dtype(torch::kLong));  // (S_total')
  std::vector<at::Tensor> cols;  // [slot] (S_total')
  for (const PayloadColumn& p : payload_) cols.push_back(torch::full({total}, p.fill, opt.dtype(p.dtype)));
  // Old slot -> new slot of every held entry (entry j of head row r: start[r] + j -> new_start[r] + j), built on the
  // device from the per-row tables: the host work is O(rows), not O(entries) (a decode step that evicts and then
  // appends reallocates every layer).
  int64_t held = 0;
  for (int64_t r = 0; r < rows; ++r) held += L.len[r];
  if (held > 0) {
    const at::Tensor lens = host_ints(L.len, device_);                                     // (rows)
    const at::Tensor row = at::repeat_interleave(lens, std::optional<int64_t>(held));      // (N) head row
    const at::Tensor first = (lens.cumsum(0) - lens).index_select(0, row);                 // (N) row's first entry
    const at::Tensor j = torch::arange(held, lens.options()) - first;                      // (N) entry within its row
    const at::Tensor s = host_ints(L.start, device_).index_select(0, row) + j;             // (N)
    const at::Tensor d = host_ints(new_start, device_).index_select(0, row) + j;           // (N)
    k.index_copy_(0, d, L.k.index_select(0, s));
    v.index_copy_(0, d, L.v.index_select(0, s));
    pos.index_copy_(0, d, L.pos.index_select(0, s));
    for (size_t c = 0; c < cols.size(); ++c) cols[c].index_copy_(0, d, L.cols[c].index_select(0, s));
  }
  if (total > 0) {
    L.k = k;
    L.v = v;
    L.pos = pos;
    L.cols = cols;
  } else {
    L.k = L.v = L.pos = at::Tensor();
    L.cols.assign(payload_.size(), at::Tensor());
  }
  L.cap = new_cap;
  L.start = new_start;
  L.total = total;
  L.start_d = at::Tensor();
}

void KVCache::append(int64_t layer, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pos) {
  append(layer, k, v, pos, {});
}

void KVCache::append(int64_t layer, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& pos_in,
                     const std::vector<int64_t>& lead) {
  check_layer(layer);
  Layer& L = layers_[layer];
  KVD_CHECK(k_in.dim() == 4 && k_in.size(0) == batch_ && k_in.size(1) == kv_heads_ && k_in.size(3) == head_dim_,
            "KVCache::append: k must be (B=", batch_, ", H_kv=", kv_heads_, ", t, hd=", head_dim_, "), got ",
            k_in.sizes());
  KVD_CHECK(v_in.sizes() == k_in.sizes(), "KVCache::append: v ", v_in.sizes(), " differs from k ", k_in.sizes());
  const int64_t t = k_in.size(2);
  const bool per_head = static_cast<int64_t>(lead.size()) == batch_ * kv_heads_ && kv_heads_ > 1;
  KVD_CHECK(lead.empty() || static_cast<int64_t>(lead.size()) == batch_ || per_head,
            "KVCache::append: lead must be empty or have B=", batch_, " or B*H_kv=", batch_ * kv_heads_,
            " entries, got ", lead.size());
  for (size_t b = 0; b < lead.size(); ++b)
    KVD_CHECK(lead[b] >= 0 && lead[b] <= t, "KVCache::append: lead[", b, "] = ", lead[b], " is outside [0, ", t, "]");
  at::Tensor p = pos_in;
  if (p.dim() == 2) p = p.unsqueeze(1).expand({batch_, kv_heads_, t});  // (B, H_kv, t)
  KVD_CHECK(p.dim() == 3 && p.size(0) == batch_ && p.size(1) == kv_heads_ && p.size(2) == t,
            "KVCache::append: pos must be (B, t) or (B, H_kv, t), got ", pos_in.sizes());
  if (t == 0) return;
  const bool padded = std::any_of(lead.begin(), lead.end(), [](int64_t x) { return x != 0; });
  const int64_t rows = batch_ * kv_heads_;
  std::vector<int64_t> gain(rows, t);  // [B * H_kv] new entries of head row r
  if (padded)
    for (int64_t r = 0; r < rows; ++r) gain[r] -= lead[per_head ? r : r / kv_heads_];
  if (per_head) L.aligned = false;  // each head gains its own entries: a row's heads may now hold different positions

  // Room check; reallocate every segment with slack when any head lacks room.
  bool room = true;
  for (int64_t r = 0; r < rows && room; ++r) room = L.len[r] + gain[r] <= L.cap[r];
  if (!room) {
    std::vector<int64_t> cap(rows);
    int64_t sum = 0, top = 0;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t need = L.len[r] + gain[r];
      cap[r] = need + std::max<int64_t>(16, need / 8);  // geometric: amortized O(1) single-token appends
      sum += cap[r];
      top = std::max(top, cap[r]);
    }
    // One capacity for every segment where that adds at most an eighth: the layout is then regular (r * cap) and
    // layer() a view of the storage, not a gathered copy each time a forward reads the layer (after a keep, rows of
    // different lengths and heads of different budgets hold different counts).
    if (top * rows <= sum + sum / 8) std::fill(cap.begin(), cap.end(), top);
    reallocate(L, cap);
  }

  at::Tensor k = k_in.to(device_, dtype_), v = v_in.to(device_, dtype_);  // (B, H_kv, t, hd)
  p = p.to(device_, torch::kLong);                                         // (B, H_kv, t)
  const int64_t n0 = L.len[0];
  const bool uniform = !padded && std::all_of(L.len.begin(), L.len.end(), [&](int64_t l) { return l == n0; });
  // A padded decode step can write in place of its padding rows only where each such row owns a slot.
  bool device_path = !padded;
  if (padded && t == 1) {
    device_path = true;
    for (int64_t r = 0; r < rows && device_path; ++r) device_path = gain[r] > 0 || L.cap[r] > 0;
  }
  if (uniform && layout(L) == Layout::Regular) {
    // Hot path for plain prefill / decode: one strided copy into the (B, H_kv, cap, hd) view.
    const int64_t c = L.cap[0];
    L.k.view({batch_, kv_heads_, c, head_dim_}).narrow(2, n0, t).copy_(k);
    L.v.view({batch_, kv_heads_, c, head_dim_}).narrow(2, n0, t).copy_(v);
    L.pos.view({batch_, kv_heads_, c}).narrow(2, n0, t).copy_(p);
    for (size_t i = 0; i < payload_.size(); ++i) L.cols[i].view({batch_, kv_heads_, c}).narrow(2, n0, t).fill_(payload_[i].fill);
  } else if (device_path) {
    // Scatter indices built on the device from its copy of the segment table: nothing is uploaded.
    at::Tensor kf = k.reshape({rows * t, head_dim_});  // (B*H_kv*t, hd)
    at::Tensor vf = v.reshape({rows * t, head_dim_});  // (B*H_kv*t, hd)
    at::Tensor pf = p.reshape({rows * t});             // (B*H_kv*t)
    const at::Tensor& start = device_start(L);         // (B*H_kv)
    const at::Tensor& len = device_len(L);             // (B*H_kv)
    at::Tensor d;                                      // (B*H_kv*t)
    if (!padded) {
      d = ((start + len).view({rows, 1}) + torch::arange(t, start.options()).view({1, t})).reshape({rows * t});
    } else {
      // t = 1: a padding row (a finished one) writes its own last slot back unchanged, so one index_copy_
      // serves every row with no compaction (which would need the count on the host).
      at::Tensor real = device_vector(gain).gt(0);                                            // (B*H_kv)
      d = torch::where(real, start + len, start + (len - 1).clamp_min(0));                  // (B*H_kv)
      at::Tensor real2 = real.view({rows, 1});
      kf = torch::where(real2, kf, L.k.index_select(0, d));
      vf = torch::where(real2, vf, L.v.index_select(0, d));
      pf = torch::where(real, pf, L.pos.index_select(0, d));
    }
    L.k.index_copy_(0, d, kf);
    L.v.index_copy_(0, d, vf);
    L.pos.index_copy_(0, d, pf);
    for (size_t i = 0; i < payload_.size(); ++i) {
      at::Tensor cf = torch::full({d.size(0)}, payload_[i].fill, L.cols[i].options());  // (B*H_kv*t)
      if (padded) cf = torch::where(device_vector(gain).gt(0), cf, L.cols[i].index_select(0, d));
      L.cols[i].index_copy_(0, d, cf);
    }
  } else {
    // A left-padded chunk: every head's real entries (the last gain[r] of its t) go to its own next slots, one
    // index_copy_ per tensor. The N = sum(gain) indices are built on the device from the per-row tables (O(rows)
    // host work and upload; the count N is known here, so nothing is read back).
    int64_t N = 0;
    for (int64_t r = 0; r < rows; ++r) N += gain[r];
    if (N > 0) {
      const at::Tensor g = device_vector(gain);                                             // (B*H_kv)
      const at::Tensor row = at::repeat_interleave(g, std::optional<int64_t>(N));           // (N) head row
      const at::Tensor i = torch::arange(N, g.options()) - (g.cumsum(0) - g).index_select(0, row);  // (N) entry in row
      const at::Tensor s = row * t + (t - g).index_select(0, row) + i;                      // (N) chunk row
      const at::Tensor d = (device_start(L) + device_len(L)).index_select(0, row) + i;      // (N) slot
      L.k.index_copy_(0, d, k.reshape({rows * t, head_dim_}).index_select(0, s));
      L.v.index_copy_(0, d, v.reshape({rows * t, head_dim_}).index_select(0, s));
      L.pos.index_copy_(0, d, p.reshape({rows * t}).index_select(0, s));
      for (size_t c = 0; c < payload_.size(); ++c) L.cols[c].index_fill_(0, d, payload_[c].fill);
    }
  }
  // The device copy of len follows without an upload where it is current.
  if (L.len_d.defined()) {
    if (!padded) {
      L.len_d.add_(t);
    } else {
      L.len_d.add_(device_vector(gain));
    }
  }
  for (int64_t r = 0; r < rows; ++r) set_len(L, r, L.len[r] + gain[r]);
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

KVLayerView KVCache::layer(int64_t layer, LayerRead read) const {
  check_layer(layer);
  const Layer& L = layers_[layer];
  KVLayerView view;
  const int64_t n = max_length(layer);
  view.n = n;
  auto opt = torch::TensorOptions().dtype(dtype_).device(device_);
  const bool ragged = std::any_of(L.len.begin(), L.len.end(), [&](int64_t l) { return l != n; });
  if (ragged) {
    at::Tensor len = device_len(L).view({batch_, kv_heads_, 1});                     // (B, H_kv, 1)
    view.valid = torch::arange(n, opt.dtype(torch::kLong)).view({1, 1, n}).lt(len);  // (B, H_kv, n)
  }
  if (read == LayerRead::Positions) {  // the positions alone: a view where the layout is regular, else one gather
    if (n == 0) {
      view.pos = torch::empty({batch_, kv_heads_, 0}, opt.dtype(torch::kLong));
    } else if (layout(L) == Layout::Regular) {
      view.pos = L.pos.view({batch_, kv_heads_, L.cap[0]}).narrow(2, 0, n);  // (B, H_kv, n)
    } else {
      view.pos = L.pos.index_select(0, gather_index(L, n)).view({batch_, kv_heads_, n});  // (B, H_kv, n)
      if (ragged) view.pos.masked_fill_(view.valid.logical_not(), -1);
    }
    return view;
  }
  if (n == 0) {
    view.k = torch::empty({batch_, kv_heads_, 0, head_dim_}, opt);
    view.v = torch::empty({batch_, kv_heads_, 0, head_dim_}, opt);
    view.pos = torch::empty({batch_, kv_heads_, 0}, opt.dtype(torch::kLong));
    for (const PayloadColumn& p : payload_) view.payload[p.name] = torch::empty({batch_, kv_heads_, 0}, opt.dtype(p.dtype));
    return view;
  }
  if (layout(L) == Layout::Regular) {
    // Zero-copy: slots past a head's length are zero (positions -1), so the padded view needs no masking.
    const int64_t c = L.cap[0];
    view.k = L.k.view({batch_, kv_heads_, c, head_dim_}).narrow(2, 0, n);  // (B, H_kv, n, hd)
    view.v = L.v.view({batch_, kv_heads_, c, head_dim_}).narrow(2, 0, n);  // (B, H_kv, n, hd)
    view.pos = L.pos.view({batch_, kv_heads_, c}).narrow(2, 0, n);         // (B, H_kv, n)
    for (size_t i = 0; i < payload_.size(); ++i)
      view.payload[payload_[i].name] = L.cols[i].view({batch_, kv_heads_, c}).narrow(2, 0, n);  // (B, H_kv, n)
    return view;
  }
  // Irregular segments: a transient padded copy, one gather per tensor, its indices built on the device.
  // Padding slots read some held slot (the head's last one, or its segment's first slot for an empty head;
  // clamped into the buffer, which is not empty as n > 0) and are then zeroed.
  const at::Tensor gi = gather_index(L, n);  // (B*H_kv*n)
  view.k = L.k.index_select(0, gi).view({batch_, kv_heads_, n, head_dim_});          // (B, H_kv, n, hd)
  view.v = L.v.index_select(0, gi).view({batch_, kv_heads_, n, head_dim_});          // (B, H_kv, n, hd)
  view.pos = L.pos.index_select(0, gi).view({batch_, kv_heads_, n});                 // (B, H_kv, n)
  if (ragged) {
    at::Tensor pad = view.valid.logical_not();  // (B, H_kv, n)
    view.k.masked_fill_(pad.unsqueeze(-1), 0);
    view.v.masked_fill_(pad.unsqueeze(-1), 0);
    view.pos.masked_fill_(pad, -1);
  }
  for (size_t i = 0; i < payload_.size(); ++i) {
    at::Tensor c = L.cols[i].index_select(0, gi).view({batch_, kv_heads_, n});  // (B, H_kv, n)
    if (ragged) c.masked_fill_(view.valid.logical_not(), payload_[i].fill);
    view.payload[payload_[i].name] = c;
  }
  return view;
}

KVLayerSegments KVCache::segments(int64_t layer) const {
  check_layer(layer);
  const Layer& L = layers_[layer];
  KVD_CHECK(L.total <= std::numeric_limits<int32_t>::max(), "KVCache::segments: layer ", layer, " holds ", L.total,
            " slots, past the int32 offsets of flash attention's variable-length form; use smaller batches");
  KVLayerSegments s;
  s.max_len = max_length(layer);
  s.k = L.k;
  s.v = L.v;
  s.start = at::constant_pad_nd(device_start(L), {0, 1}, static_cast<double>(L.total)).to(torch::kInt);  // (B*H_kv + 1)
  s.len = device_len(L).to(torch::kInt);                                                                // (B*H_kv)
  return s;
}

at::Tensor KVCache::gather_index(const Layer& L, int64_t n) const {
  const int64_t rows = batch_ * kv_heads_;
  const at::Tensor& start = device_start(L);                               // (B*H_kv)
  at::Tensor last = (device_len(L) - 1).clamp_min(0).view({rows, 1});      // (B*H_kv, 1)
  at::Tensor j = torch::arange(n, start.options()).view({1, n});           // (1, n)
  return (start.view({rows, 1}) + torch::minimum(j, last)).clamp_max(L.total - 1).reshape({rows * n});
}

at::Tensor KVCache::tail_index(const Layer& L, int64_t t) const {
  const int64_t rows = batch_ * kv_heads_;
  const at::Tensor& start = device_start(L);                                                   // (B*H_kv)
  at::Tensor first = (device_len(L) - t).view({rows, 1});                                      // (B*H_kv, 1)
  at::Tensor j = torch::arange(t, start.options()).view({1, t});                               // (1, t)
  return (start.view({rows, 1}) + (first + j).clamp_min(0)).clamp(0, std::max<int64_t>(L.total - 1, 0)).reshape({rows * t});
}

int64_t KVCache::payload_slot(const std::string& name, const char* what) const {
  for (size_t i = 0; i < payload_.size(); ++i)
    if (payload_[i].name == name) return static_cast<int64_t>(i);
  KVD_FAIL("KVCache::", what, ": no payload column '", name, "'; add it with add_payload first");
}

bool KVCache::has_payload(const std::string& name) const {
  for (const PayloadColumn& p : payload_)
    if (p.name == name) return true;
  return false;
}

void KVCache::copy_layer_from(const KVCache& src, int64_t layer) {
  check_layer(layer);
  KVD_CHECK(src.batch_ == batch_ && src.kv_heads_ == kv_heads_ && src.head_dim_ == head_dim_ &&
                src.num_layers() == num_layers() && src.dtype_ == dtype_ && src.device_ == device_,
            "KVCache::copy_layer_from: the caches differ in shape, dtype or device");
  for (const PayloadColumn& p : src.payload_) add_payload(p.name, p.dtype, p.fill);
  const Layer& S = src.layers_[layer];
  Layer& D = layers_[layer];
  for (int64_t r = 0; r < batch_ * kv_heads_; ++r) set_len(D, r, S.len[r]);
  D.k = S.k.defined() ? S.k.clone() : at::Tensor();
  D.v = S.v.defined() ? S.v.clone() : at::Tensor();
  D.pos = S.pos.defined() ? S.pos.clone() : at::Tensor();
  D.cols.assign(payload_.size(), at::Tensor());
  for (size_t i = 0; i < payload_.size(); ++i) {
    const int64_t slot = src.has_payload(payload_[i].name) ? src.payload_slot(payload_[i].name, "copy_layer_from") : -1;
    if (slot >= 0 && S.cols[slot].defined()) {
      D.cols[i] = S.cols[slot].clone();
    } else if (S.total > 0) {
      D.cols[i] = torch::full({S.total}, payload_[i].fill, torch::TensorOptions().dtype(payload_[i].dtype).device(device_));
    }
  }
  D.rows.clear();
  for (const auto& [name, t] : S.rows) D.rows[name] = t.clone();  // its own: appends write the state in place
  D.cap = S.cap;
  D.start = S.start;
  D.total = S.total;
  D.aligned = S.aligned;
  D.start_d = at::Tensor();
  D.len_d = at::Tensor();
  update_peak();
}

KVCache KVCache::concat_rows(const std::vector<const KVCache*>& parts) {
  KVD_CHECK(!parts.empty(), "KVCache::concat_rows: no caches given");
  const KVCache& first = *parts[0];
  int64_t batch = 0;
  for (const KVCache* p : parts) {
    KVD_CHECK(p->num_layers() == first.num_layers() && p->kv_heads_ == first.kv_heads_ &&
                  p->head_dim_ == first.head_dim_ && p->dtype_ == first.dtype_ && p->device_ == first.device_,
              "KVCache::concat_rows: the caches differ in layers, KV heads, head_dim, dtype or device");
    batch += p->batch_;
  }
  KVCache out(first.num_layers(), batch, first.kv_heads_, first.head_dim_, first.dtype_, first.device_);
  for (const KVCache* p : parts)
    for (const PayloadColumn& c : p->payload_) out.add_payload(c.name, c.dtype, c.fill);
  const auto opts = [&](c10::ScalarType dt) { return torch::TensorOptions().dtype(dt).device(out.device_); };
  for (int64_t l = 0; l < out.num_layers(); ++l) {
    Layer& D = out.layers_[l];
    std::vector<at::Tensor> ks, vs, ps;
    std::vector<std::vector<at::Tensor>> cols(out.payload_.size());
    D.len.clear(), D.cap.clear(), D.start.clear();
    D.total = 0;
    D.aligned = true;
    for (const KVCache* p : parts) {
      const Layer& S = p->layers_[l];
      for (size_t r = 0; r < S.len.size(); ++r) {
        D.len.push_back(S.len[r]);
        D.cap.push_back(S.cap[r]);
        D.start.push_back(S.start[r] + D.total);
      }
      D.aligned = D.aligned && S.aligned;
      if (S.total > 0) {
        ks.push_back(S.k), vs.push_back(S.v), ps.push_back(S.pos);
        for (size_t i = 0; i < out.payload_.size(); ++i) {
          const PayloadColumn& c = out.payload_[i];
          const int64_t slot = p->has_payload(c.name) ? p->payload_slot(c.name, "concat_rows") : -1;
          cols[i].push_back(slot >= 0 ? S.cols[slot] : torch::full({S.total}, c.fill, opts(c.dtype)));
        }
      }
      D.total += S.total;
    }
    if (D.total > 0) {
      D.k = torch::cat(ks), D.v = torch::cat(vs), D.pos = torch::cat(ps);
      for (size_t i = 0; i < cols.size(); ++i) D.cols[i] = torch::cat(cols[i]);
    }
    // Per-row state: each name's parts padded with zeros to the largest in every dimension after the rows.
    std::map<std::string, std::vector<int64_t>> shape;  // name -> the largest size of each dimension (rows: 0)
    for (const KVCache* p : parts)
      for (const auto& [name, t] : p->layers_[l].rows) {
        std::vector<int64_t>& sh = shape[name];
        if (sh.empty()) sh.assign(static_cast<size_t>(t.dim()), 0);
        KVD_CHECK(static_cast<int64_t>(sh.size()) == t.dim(), "KVCache::concat_rows: row state '", name,
                  "' of layer ", l, " has ", t.dim(), " dimensions in one part and ", sh.size(), " in another");
        for (int64_t d = 1; d < t.dim(); ++d) sh[d] = std::max(sh[d], t.size(d));
      }
    for (const auto& [name, sh] : shape) {
      std::vector<at::Tensor> rows;
      at::TensorOptions o;
      for (const KVCache* p : parts) {
        auto it = p->layers_[l].rows.find(name);
        if (it != p->layers_[l].rows.end()) o = it->second.options();
      }
      for (const KVCache* p : parts) {
        std::vector<int64_t> size = sh;
        size[0] = p->batch_;
        at::Tensor part = torch::zeros(size, o);
        auto it = p->layers_[l].rows.find(name);
        if (it != p->layers_[l].rows.end()) {
          at::Tensor dst = part;
          for (int64_t d = 1; d < it->second.dim(); ++d) dst = dst.narrow(d, 0, it->second.size(d));
          dst.copy_(it->second);
        }
        rows.push_back(part);
      }
      D.rows[name] = torch::cat(rows);
    }
  }
  out.next_pos_.clear(), out.row_entries_.clear(), out.row_peak_.clear();
  out.peak_bytes_ = 0;
  for (const KVCache* p : parts) {
    out.next_pos_.insert(out.next_pos_.end(), p->next_pos_.begin(), p->next_pos_.end());
    out.row_entries_.insert(out.row_entries_.end(), p->row_entries_.begin(), p->row_entries_.end());
    out.row_peak_.insert(out.row_peak_.end(), p->row_peak_.begin(), p->row_peak_.end());
    out.peak_bytes_ += p->peak_bytes_;  // the parts existed side by side
  }
  return out;
}

KVCache KVCache::take_rows(int64_t first, int64_t count) const {
  KVD_CHECK(first >= 0 && count > 0 && first + count <= batch_, "KVCache::take_rows: rows [", first, ", ",
            first + count, ") are not within the batch of ", batch_);
  KVCache out(num_layers(), count, kv_heads_, head_dim_, dtype_, device_);
  for (const PayloadColumn& c : payload_) out.add_payload(c.name, c.dtype, c.fill);
  const int64_t r0 = first * kv_heads_, rows = count * kv_heads_;
  for (int64_t l = 0; l < num_layers(); ++l) {
    const Layer& S = layers_[l];
    Layer& D = out.layers_[l];
    D.len.assign(S.len.begin() + r0, S.len.begin() + r0 + rows);
    D.cap.assign(S.cap.begin() + r0, S.cap.begin() + r0 + rows);
    D.start.assign(rows, 0);
    D.total = 0;
    for (int64_t r = 0; r < rows; ++r) D.start[r] = D.total, D.total += D.cap[r];
    D.aligned = S.aligned;
    D.cols.assign(payload_.size(), at::Tensor());
    if (D.total > 0) {
      // Slot j of head row r's segment: S.start[r0 + r] + j -> D.start[r] + j, every slot of the segment (its capacity).
      const at::Tensor caps = host_ints(D.cap, device_);                                       // (rows)
      const at::Tensor row = at::repeat_interleave(caps, std::optional<int64_t>(D.total));     // (S_total') head row
      const at::Tensor j = torch::arange(D.total, caps.options()) - host_ints(D.start, device_).index_select(0, row);
      const std::vector<int64_t> src_start(S.start.begin() + r0, S.start.begin() + r0 + rows);
      const at::Tensor src = host_ints(src_start, device_).index_select(0, row) + j;           // (S_total')
      D.k = S.k.index_select(0, src);
      D.v = S.v.index_select(0, src);
      D.pos = S.pos.index_select(0, src);
      for (size_t i = 0; i < payload_.size(); ++i) D.cols[i] = S.cols[i].index_select(0, src);
    }
    for (const auto& [name, t] : S.rows) D.rows[name] = t.narrow(0, first, count).clone();
  }
  out.next_pos_.assign(next_pos_.begin() + first, next_pos_.begin() + first + count);
  out.row_entries_.assign(row_entries_.begin() + first, row_entries_.begin() + first + count);
  out.row_peak_.assign(row_peak_.begin() + first, row_peak_.begin() + first + count);
  out.peak_bytes_ = std::accumulate(out.row_peak_.begin(), out.row_peak_.end(), int64_t{0});
  return out;
}

void KVCache::add_payload(const std::string& name, c10::ScalarType dtype, double fill) {
  for (const PayloadColumn& p : payload_)
    if (p.name == name) {
      KVD_CHECK(p.dtype == dtype, "KVCache::add_payload: column '", name, "' exists with another dtype");
      return;
    }
  payload_.push_back(PayloadColumn{name, dtype, fill});
  for (Layer& L : layers_)
    L.cols.push_back(L.total > 0 ? torch::full({L.total}, fill, torch::TensorOptions().dtype(dtype).device(device_))
                                 : at::Tensor());
}

void KVCache::set_payload_tail(int64_t layer, const std::string& name, const at::Tensor& values,
                               const std::vector<int64_t>& lead) {
  check_layer(layer);
  const int64_t slot = payload_slot(name, "set_payload_tail");
  Layer& L = layers_[layer];
  KVD_CHECK(values.dim() == 3 && values.size(0) == batch_ && values.size(1) == kv_heads_,
            "KVCache::set_payload_tail: values must be (B=", batch_, ", H_kv=", kv_heads_, ", t), got ", values.sizes());
  const int64_t t = values.size(2), rows = batch_ * kv_heads_;
  const bool per_head = static_cast<int64_t>(lead.size()) == batch_ * kv_heads_ && kv_heads_ > 1;
  KVD_CHECK(lead.empty() || static_cast<int64_t>(lead.size()) == batch_ || per_head,
            "KVCache::set_payload_tail: lead must be empty or have B=", batch_, " or B*H_kv=", batch_ * kv_heads_,
            " entries, got ", lead.size());
  const auto lead_of = [&](int64_t r) { return per_head ? lead[r] : lead[r / kv_heads_]; };
  if (t == 0 || L.total == 0) return;
  at::Tensor& col = L.cols[slot];
  at::Tensor vals = values.to(device_, payload_[slot].dtype);  // (B, H_kv, t)
  const bool padded = std::any_of(lead.begin(), lead.end(), [](int64_t x) { return x != 0; });
  for (int64_t r = 0; r < rows; ++r)
    KVD_CHECK(L.len[r] >= t - (padded ? lead_of(r) : 0), "KVCache::set_payload_tail: layer ", layer,
              " head row ", r, " holds ", L.len[r], " entries, fewer than the ", t, " values given");
  if (!padded) {
    L.cols[slot].index_copy_(0, tail_index(L, t), vals.reshape({rows * t}));
    return;
  }
  // Left padding: row b's values [lead[b], t) are its last t - lead[b] entries, i.e. the tail of length t
  // shifted so that the padding columns land before the head's entries; those slots keep their values.
  at::Tensor idx = tail_index(L, t).view({rows, t});                               // (B*H_kv, t)
  std::vector<int64_t> lr(rows);
  for (int64_t r = 0; r < rows; ++r) lr[r] = lead_of(r);
  at::Tensor real = torch::arange(t, idx.options()).view({1, t}).ge(host_ints(lr, device_).view({rows, 1}));  // (rows, t)
  at::Tensor v = torch::where(real, vals.reshape({rows, t}), col.index_select(0, idx.reshape({rows * t})).view({rows, t}));
  // Padding columns may alias real slots (a short head): write them first, then the real ones.
  col.index_copy_(0, idx.masked_select(real.logical_not()), v.masked_select(real.logical_not()));
  col.index_copy_(0, idx.masked_select(real), v.masked_select(real));
}

void KVCache::set_payload(int64_t layer, const std::string& name, const at::Tensor& values) {
  check_layer(layer);
  const int64_t slot = payload_slot(name, "set_payload");
  Layer& L = layers_[layer];
  const int64_t n = max_length(layer), rows = batch_ * kv_heads_;
  KVD_CHECK(values.dim() == 3 && values.size(0) == batch_ && values.size(1) == kv_heads_ && values.size(2) == n,
            "KVCache::set_payload: values must be (B=", batch_, ", H_kv=", kv_heads_, ", n=", n, "), got ", values.sizes());
  if (n == 0) return;
  at::Tensor vals = values.to(device_, payload_[slot].dtype).reshape({rows, n});  // (B*H_kv, n)
  at::Tensor valid = torch::arange(n, torch::TensorOptions().dtype(torch::kLong).device(device_)).view({1, n})
                         .lt(device_len(L).view({rows, 1}));                                 // (B*H_kv, n)
  at::Tensor idx = gather_index(L, n).view({rows, n});                                       // (B*H_kv, n)
  L.cols[slot].index_copy_(0, idx.masked_select(valid), vals.masked_select(valid));
}

at::Tensor KVCache::positions(int64_t layer) const { return this->layer(layer, LayerRead::Positions).pos; }

void KVCache::keep(int64_t layer, const at::Tensor& indices) {
  check_layer(layer);
  KVD_CHECK(indices.dim() == 3 && indices.size(0) == batch_ && indices.size(1) == kv_heads_,
            "KVCache::keep: indices must be (B=", batch_, ", H_kv=", kv_heads_, ", n_keep), got ", indices.sizes());
  KVD_CHECK(indices.scalar_type() == torch::kLong, "KVCache::keep: indices must be int64");
  const int64_t rows = batch_ * kv_heads_, n_keep = indices.size(2);
  RaggedIndices rg;
  rg.indices = indices.reshape({rows * n_keep});                                           // (B*H_kv*n_keep)
  rg.offsets = torch::arange(0, (rows + 1) * n_keep, std::max<int64_t>(n_keep, 1), torch::kLong);  // (rows + 1)
  if (n_keep == 0) rg.offsets = torch::zeros({rows + 1}, torch::kLong);
  keep(layer, rg);
}

int64_t RaggedIndices::count(int64_t row) const {
  const int64_t* o = offsets.data_ptr<int64_t>();
  return o[row + 1] - o[row];
}

void KVCache::keep(int64_t layer, const RaggedIndices& keep, IndexCheck check) {
  check_layer(layer);
  Layer& L = layers_[layer];
  const int64_t rows = batch_ * kv_heads_;
  KVD_CHECK(keep.offsets.defined() && keep.offsets.dim() == 1 && keep.offsets.size(0) == rows + 1 &&
                keep.offsets.scalar_type() == torch::kLong && keep.offsets.device().is_cpu(),
            "KVCache::keep: offsets must be a CPU int64 (B * H_kv + 1 = ", rows + 1, ") tensor");
  KVD_CHECK(keep.indices.defined() && keep.indices.dim() == 1 && keep.indices.scalar_type() == torch::kLong,
            "KVCache::keep: indices must be a 1-D int64 tensor");
  at::Tensor off_c = keep.offsets.contiguous();
  const int64_t* off = off_c.data_ptr<int64_t>();
  KVD_CHECK(off[0] == 0 && off[rows] == keep.indices.size(0), "KVCache::keep: offsets must run from 0 to ",
            keep.indices.size(0));
  std::vector<int64_t> count(rows), cap(rows), start(rows);
  int64_t total = 0, top = 0;
  for (int64_t r = 0; r < rows; ++r) {
    count[r] = off[r + 1] - off[r];
    KVD_CHECK(count[r] >= 0, "KVCache::keep: offsets must not decrease");
    total += count[r];
    top = std::max(top, count[r]);
  }
  // Segments laid out head row after head row, each exactly its kept count, or all of the largest count where that
  // adds at most 1/64 (rows of a batch differ in length by about 1% and keep counts in proportion at one ratio):
  // the layout is then regular and layer() a view of the storage rather than a gathered copy on every read.
  const bool common = top * rows <= total + total / 64;
  int64_t alloc = 0;
  for (int64_t r = 0; r < rows; ++r) {
    cap[r] = common ? top : count[r];
    start[r] = alloc;
    alloc += cap[r];
  }
  // One gather per tensor. The indices stay where they are (the selectors leave them on the cache's device): each
  // entry's head row and source slot are built there, and only the bounds check reads one flag back.
  if (total > 0) {
    at::Tensor idx = keep.indices.to(device_);                                          // (total)
    at::Tensor row = at::repeat_interleave(host_ints(count, device_), std::optional<int64_t>(total));  // (total) head row
    at::Tensor bad = check == IndexCheck::ReadBack
                         ? idx.lt(0).logical_or(idx.ge(device_len(L).index_select(0, row)))  // (total)
                         : at::Tensor();
    if (bad.defined() && bad.any().item<bool>()) {
      const int64_t i = bad.nonzero()[0][0].item<int64_t>(), r = row[i].item<int64_t>();
      KVD_FAIL("KVCache::keep: layer ", layer, ", head row ", r, ": index ", idx[i].item<int64_t>(),
               " is outside its ", L.len[r], " entries");
    }
    at::Tensor s = device_start(L).index_select(0, row) + idx;  // (total) flat slots
    if (alloc == total) {
      L.k = L.k.index_select(0, s);               // (total, hd)
      L.v = L.v.index_select(0, s);               // (total, hd)
      L.pos = L.pos.index_select(0, s);           // (total)
      for (at::Tensor& c : L.cols) c = c.index_select(0, s);  // (total)
    } else {
      // Padded segments: entry j of head row r goes to slot r * top + j; the slots past a head's count are zero
      // (positions -1, payload its fill), as layer()'s padding expects.
      const std::vector<int64_t> first(off, off + rows);  // [row] its first kept index in `idx`
      const at::Tensor j = torch::arange(total, row.options()) - host_ints(first, device_).index_select(0, row);  // (total)
      const at::Tensor d = row * top + j;  // (total) slot of each kept entry
      auto moved = [&](const at::Tensor& src, at::Tensor dst) { return dst.index_copy_(0, d, src.index_select(0, s)); };
      const auto opt = L.k.options();
      L.k = moved(L.k, torch::zeros({alloc, head_dim_}, opt));                       // (alloc, hd)
      L.v = moved(L.v, torch::zeros({alloc, head_dim_}, opt));                       // (alloc, hd)
      L.pos = moved(L.pos, torch::full({alloc}, -1, L.pos.options()));              // (alloc)
      for (size_t c = 0; c < L.cols.size(); ++c)
        L.cols[c] = moved(L.cols[c], torch::full({alloc}, payload_[c].fill, L.cols[c].options()));  // (alloc)
    }
  } else {
    L.k = L.v = L.pos = at::Tensor();
    for (at::Tensor& c : L.cols) c = at::Tensor();
  }
  L.aligned = false;
  L.cap = cap;
  L.start = start;
  L.total = alloc;
  for (int64_t r = 0; r < rows; ++r) set_len(L, r, count[r]);
  L.start_d = L.len_d = at::Tensor();
}

void KVCache::rewind(const std::vector<int64_t>& per_row) {
  KVD_CHECK(static_cast<int64_t>(per_row.size()) == batch_, "KVCache::rewind: per_row must have B=", batch_,
            " entries, got ", per_row.size());
  for (int64_t b = 0; b < batch_; ++b) {
    KVD_CHECK(per_row[b] >= 0 && per_row[b] <= next_pos_[b], "KVCache::rewind: row ", b, " cannot go back ",
              per_row[b], " from position ", next_pos_[b]);
    for (size_t l = 0; l < layers_.size(); ++l)
      for (int64_t h = 0; h < kv_heads_; ++h)
        KVD_CHECK(layers_[l].len[b * kv_heads_ + h] >= per_row[b], "KVCache::rewind: layer ", l, ", row ", b,
                  ", head ", h, " holds ", layers_[l].len[b * kv_heads_ + h], " entries, fewer than the ",
                  per_row[b], " to drop (were they evicted? rewind only what was appended since the last keep)");
  }
  const int64_t rows = batch_ * kv_heads_;
  for (Layer& L : layers_) {
    // Dropped slots go back to zero (positions -1), as unused slots must be.
    std::vector<int64_t> drop;
    L.len_d = at::Tensor();
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t d = per_row[r / kv_heads_];
      for (int64_t j = L.len[r] - d; j < L.len[r]; ++j) drop.push_back(L.start[r] + j);
      set_len(L, r, L.len[r] - d);
    }
    if (drop.empty()) continue;
    at::Tensor d = host_ints(drop, device_);  // (N)
    L.k.index_fill_(0, d, 0);
    L.v.index_fill_(0, d, 0);
    L.pos.index_fill_(0, d, -1);
    for (size_t i = 0; i < payload_.size(); ++i) L.cols[i].index_fill_(0, d, payload_[i].fill);
  }
  for (int64_t b = 0; b < batch_; ++b) next_pos_[b] -= per_row[b];
}

int64_t KVCache::bytes() const {
  const int64_t entries = std::accumulate(row_entries_.begin(), row_entries_.end(), int64_t{0});
  return entries * bytes_per_entry();
}

int64_t KVCache::allocated_bytes() const {
  int64_t total = 0;
  for (const Layer& L : layers_) {
    if (L.total == 0) continue;
    total += static_cast<int64_t>(L.k.nbytes() + L.v.nbytes() + L.pos.nbytes());
    for (const at::Tensor& c : L.cols) total += static_cast<int64_t>(c.nbytes());
  }
  return total;
}

int64_t KVCache::row_bytes(int64_t b) const {
  KVD_CHECK(b >= 0 && b < batch_, "KVCache::row_bytes: row ", b, " out of range [0, ", batch_, ")");
  return row_entries_[b] * bytes_per_entry();
}

int64_t KVCache::row_peak_bytes(int64_t b) const {
  KVD_CHECK(b >= 0 && b < batch_, "KVCache::row_peak_bytes: row ", b, " out of range [0, ", batch_, ")");
  return row_peak_[b];
}

void KVCache::raise_peaks(const std::vector<int64_t>& row_bytes, int64_t bytes) {
  KVD_CHECK(static_cast<int64_t>(row_bytes.size()) == batch_, "KVCache::raise_peaks: ", row_bytes.size(),
            " rows for a batch of ", batch_);
  for (int64_t b = 0; b < batch_; ++b) row_peak_[b] = std::max(row_peak_[b], row_bytes[b]);
  peak_bytes_ = std::max(peak_bytes_, bytes);
}

void KVCache::update_peak() {
  peak_bytes_ = std::max(peak_bytes_, bytes());
  for (int64_t b = 0; b < batch_; ++b) row_peak_[b] = std::max(row_peak_[b], row_bytes(b));
}

int64_t KVCache::next_position(int64_t b) const {
  KVD_CHECK(b >= 0 && b < batch_, "KVCache::next_position: row ", b, " out of range [0, ", batch_, ")");
  return next_pos_[b];
}

void KVCache::advance(int64_t t) {
  for (int64_t& p : next_pos_) p += t;
}

void KVCache::advance(const std::vector<int64_t>& per_row) {
  KVD_CHECK(static_cast<int64_t>(per_row.size()) == batch_, "KVCache::advance: per_row must have B=", batch_,
            " entries, got ", per_row.size());
  for (int64_t b = 0; b < batch_; ++b) next_pos_[b] += per_row[b];
}

bool KVCache::heads_aligned(int64_t layer) const {
  check_layer(layer);
  return layers_[layer].aligned;
}

const RowState& KVCache::row_state(int64_t layer) const {
  check_layer(layer);
  return layers_[layer].rows;
}

void KVCache::set_row_state(int64_t layer, RowState state) {
  check_layer(layer);
  for (const auto& [name, t] : state)
    KVD_CHECK(t.defined() && t.dim() >= 1 && t.size(0) == batch_, "KVCache::set_row_state: '", name, "' of layer ",
              layer, " must have the ", batch_, " batch rows first, got ", t.defined() ? t.sizes() : at::IntArrayRef{});
  layers_[layer].rows = std::move(state);
}

void KVCache::clear() {
  for (Layer& L : layers_) {
    L.rows.clear();
    L.k = L.v = L.pos = at::Tensor();
    for (at::Tensor& c : L.cols) c = at::Tensor();
    std::fill(L.len.begin(), L.len.end(), 0);
    std::fill(L.cap.begin(), L.cap.end(), 0);
    std::fill(L.start.begin(), L.start.end(), 0);
    L.total = 0;
    L.aligned = true;
    L.start_d = L.len_d = at::Tensor();
  }
  std::fill(next_pos_.begin(), next_pos_.end(), 0);
  std::fill(row_entries_.begin(), row_entries_.end(), 0);
  peak_bytes_ = 0;
  std::fill(row_peak_.begin(), row_peak_.end(), 0);
}

}  // namespace kvd
