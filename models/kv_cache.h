// KVCache: per layer and per KV head, post-RoPE keys and values with each entry's original position.
//
// Storage per layer: one tensor (B, H_kv, capacity, hd) for K and one for V, a (B, H_kv, capacity) int64
// tensor of positions, and an entry count per (batch row, KV head). Heads may hold different counts (ragged),
// which is what per-head eviction produces; a layer's view is then padded to the longest head with a
// validity mask. Appends grow capacity geometrically; keep() compacts for real (and shrinks the storage when
// the kept entries fill at most half of it).
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

namespace kvd {

struct ModelConfig;

// One layer's entries. k/v/pos are views into the storage (valid until the next append / keep / clear).
struct KVLayerView {
  at::Tensor k;      // (B, H_kv, n, hd) post-RoPE keys, n = the longest head's entry count
  at::Tensor v;      // (B, H_kv, n, hd)
  at::Tensor pos;    // (B, H_kv, n) int64 original positions
  at::Tensor valid;  // (B, H_kv, n) bool, or undefined when every head holds exactly n entries
  int64_t n = 0;
};

// Keep indices in the TensorRT-LLM sparse layout: for head r = b * H_kv + h, its sorted indices (into that
// head's current entries) are indices[offsets[r] : offsets[r + 1]]. Heads may keep different counts.
struct RaggedIndices {
  at::Tensor indices;  // (total) int64, ascending within each head
  at::Tensor offsets;  // (B * H_kv + 1) int64, offsets[0] = 0, offsets[-1] = total
  int64_t count(int64_t row) const;  // entries kept by head row r = b * H_kv + h
};

class KVCache {
 public:
  KVCache(int64_t num_layers, int64_t batch, int64_t num_kv_heads, int64_t head_dim, c10::ScalarType dtype,
          c10::Device device);
  KVCache(const ModelConfig& cfg, int64_t batch, c10::ScalarType dtype, c10::Device device);

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }
  int64_t batch() const { return batch_; }
  int64_t num_kv_heads() const { return kv_heads_; }
  int64_t head_dim() const { return head_dim_; }
  c10::ScalarType dtype() const { return dtype_; }
  c10::Device device() const { return device_; }

  // Appends t entries to every head of `layer`; each head's entries go after its own current ones (heads
  // may hold different counts after ragged eviction).
  void append(int64_t layer, const at::Tensor& k,  // (B, H_kv, t, hd)
              const at::Tensor& v,                 // (B, H_kv, t, hd)
              const at::Tensor& pos);              // (B, t) or (B, H_kv, t) int64
  KVLayerView layer(int64_t layer) const;
  at::Tensor positions(int64_t layer) const;  // (B, H_kv, n) int64
  int64_t length(int64_t layer, int64_t b, int64_t h) const;  // entries of one head
  int64_t max_length(int64_t layer) const;                    // the longest head of the layer
  const std::vector<int64_t>& lengths(int64_t layer) const;   // [b * H_kv + h]

  // Keeps, per (batch row, KV head), the entries at `indices` (into the current entries, in that order;
  // pass them sorted to keep the cache in position order). Every head keeps n_keep entries.
  void keep(int64_t layer, const at::Tensor& indices);  // (B, H_kv, n_keep) int64
  // Ragged keep: each head keeps its own count. The storage is reallocated to the longest kept head, so the
  // allocated bytes follow the kept entries (the padding of shorter heads is the only slack).
  void keep(int64_t layer, const RaggedIndices& keep);

  // Tokens processed so far: the position the next token gets. The model advances it once per forward.
  int64_t next_position() const { return next_position_; }
  void advance(int64_t t) { next_position_ += t; }

  // K+V bytes of the stored entries (positions not counted), its peak since construction / clear(), and
  // the bytes actually allocated for K, V and positions.
  int64_t bytes() const;
  int64_t peak_bytes() const { return peak_bytes_; }
  int64_t allocated_bytes() const;
  int64_t bytes_per_entry() const;  // K + V of one (head, token)

  void clear();

 private:
  struct Layer {
    at::Tensor k;    // (B, H_kv, cap, hd)
    at::Tensor v;    // (B, H_kv, cap, hd)
    at::Tensor pos;  // (B, H_kv, cap) int64
    std::vector<int64_t> len;  // [B * H_kv]
    int64_t cap = 0;
  };
  void check_layer(int64_t layer) const;
  void reserve(Layer& L, int64_t needed);
  void update_peak();

  int64_t batch_, kv_heads_, head_dim_;
  c10::ScalarType dtype_;
  c10::Device device_;
  std::vector<Layer> layers_;
  int64_t next_position_ = 0;
  int64_t peak_bytes_ = 0;
};

}  // namespace kvd
