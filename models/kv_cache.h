// KVCache: per layer and per KV head, post-RoPE keys and values with each entry's original position.
//
// Storage per layer is flat, per head: one K buffer (S_total, hd), one V buffer (S_total, hd) and a
// (S_total) int64 position buffer. Head row r = b * H_kv + h owns the segment [start_r, start_r + cap_r) of
// them, of which its first len_r slots hold its entries (in append order); unused slots are zero (positions
// -1). Heads may hold different counts (ragged), which is what per-head eviction produces, and the allocated
// bytes follow each head's own count: keep() reallocates every segment to its kept count, appends grow a segment
// by len_r / 8 (at least 16) past what it needs, and both give every segment the largest of those capacities
// where that adds little to the layer (a keep 1/64, a growing append 1/8): a regular layout, see layer().
//
// layer() returns (B, H_kv, n, hd) tensors padded to the longest head n. When every segment has the same
// capacity and they are laid out r * cap (the common case: plain prefill / decode, a keep whose heads' counts
// differ by little, as rows of different lengths at one ratio do), these are zero-copy views of the storage; otherwise they are a transient
// padded copy built with one gather (index_select), valid until the caller drops it, and `valid` marks the real
// entries.
//
// Per-entry payload: named per-entry columns a scorer attaches (TRIM-KV's log β written when a token is
// appended, H2O's accumulated attention, LazyEviction's step counters). Each is one scalar per entry of every
// head, stored flat like the positions; appends give new entries the column's fill value, keep() / rewind() /
// reallocation carry the columns with their entries, and layer() shows them padded like the positions.
//
// The segment table (start, len) lives on the host, and a copy of it on the device builds the gather and
// scatter indices there: a decode step (t = 1, padded or not) and layer() upload nothing and never wait for
// the device. Only keep() (the per-head counts; the keep indices may already be on the device), rewind(), a
// reallocation and a left-padded multi-token chunk upload indices.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

namespace kvd {

struct ModelConfig;

// A per-entry payload column: one scalar per entry of every head (KVCache::add_payload).
struct PayloadColumn {
  std::string name;
  c10::ScalarType dtype = c10::ScalarType::Float;
  double fill = 0.0;  // the value of entries the column was never written for
};

// A layer's per-row state (KVCache::row_state): named tensors with the batch rows first, (B, ...).
using RowState = std::map<std::string, at::Tensor>;

// One layer's entries: views into the storage when the layout is regular, else a transient padded copy.
// Either way, valid until the next append / keep / rewind / clear.
struct KVLayerView {
  at::Tensor k;      // (B, H_kv, n, hd) post-RoPE keys, n = the longest head's entry count
  at::Tensor v;      // (B, H_kv, n, hd)
  at::Tensor pos;    // (B, H_kv, n) int64 original positions
  at::Tensor valid;  // (B, H_kv, n) bool, or undefined when every head holds exactly n entries
  std::map<std::string, at::Tensor> payload;  // name -> (B, H_kv, n) in the column's dtype (padding: fill)
  int64_t n = 0;
};

// One layer's storage as it lies, for kernels that read each head's segment in place (flash attention's
// variable-length form over the cache, models/attention.h): no copy, whatever the layout.
struct KVLayerSegments {
  at::Tensor k;      // (S_total, hd) post-RoPE keys; head row r = b * H_kv + h holds slots start[r] .. + len[r]
  at::Tensor v;      // (S_total, hd)
  at::Tensor start;  // (B * H_kv + 1) int32 on the cache's device: each head row's first slot, then S_total
  at::Tensor len;    // (B * H_kv) int32 on the cache's device: each head row's entry count
  int64_t max_len = 0;  // the longest head
};

// Keep indices in the TensorRT-LLM sparse layout: for head r = b * H_kv + h, its sorted indices (into that
// head's current entries) are indices[offsets[r] : offsets[r + 1]]. Heads may keep different counts.
struct RaggedIndices {
  at::Tensor indices;  // (total) int64, ascending within each head
  at::Tensor offsets;  // (B * H_kv + 1) int64, offsets[0] = 0, offsets[-1] = total
  int64_t count(int64_t row) const;  // entries kept by head row r = b * H_kv + h
};

// What KVCache::layer reads into its view.
enum class LayerRead {
  All,       // keys, values, positions, validity and payload columns
  Positions  // positions and validity only (k, v and payload left undefined): no K / V copy where the heads hold
             // different counts (the eval's kept sets)
};

// Whether KVCache::keep checks its indices against each head's entries on the device.
enum class IndexCheck {
  ReadBack,       // one flag read back per keep (a device sync); an index out of range throws
  ByConstruction  // none: the caller derived the indices from the layer's own counts
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
  // Same, for a left-padded chunk: row b's first lead[b] entries (lead[b] in [0, t]) are padding and are NOT
  // stored; every head of row b gains t - lead[b] entries. An empty lead means no padding. A lead of B * H_kv
  // counts pads each head on its own: head row r = b * H_kv + h gains its last t - lead[r] entries.
  void append(int64_t layer, const at::Tensor& k,  // (B, H_kv, t, hd)
              const at::Tensor& v,                 // (B, H_kv, t, hd)
              const at::Tensor& pos,               // (B, t) or (B, H_kv, t) int64
              const std::vector<int64_t>& lead);   // [B], [B * H_kv] or empty
  KVLayerView layer(int64_t layer, LayerRead read = LayerRead::All) const;
  // The layer's flat storage and segment table (k and v undefined while the layer holds no slot).
  KVLayerSegments segments(int64_t layer) const;
  // Replaces this cache's `layer` with a copy of src's (entries, positions, payload columns, layout), as if the
  // same entries had been appended here; the byte counts and peaks follow. src must have the same shape, dtype
  // and device; src's payload columns are added here first. Used to compress one prefill at several budgets
  // (compress_prefill_many).
  void copy_layer_from(const KVCache& src, int64_t layer);
  // One cache holding the rows of `parts` one after another (part 0's rows first): entries, positions, payload
  // columns (a column some part lacks gets its fill there), segment tables, next positions and per-row peaks, as
  // if those rows had been run as one batch. The parts must agree in layers, KV heads, head_dim, dtype and device;
  // they are left as they were. Used to decode the budgets of one prefill as one batch (eval).
  static KVCache concat_rows(const std::vector<const KVCache*>& parts);
  // A cache of rows [first, first + count) of this one, the inverse of concat_rows: their entries, positions, payload
  // columns, segment capacities, per-row state, next positions and per-row peaks, copied. Its peak_bytes() is the
  // sum of the rows' peaks (a bound: the rows may have peaked at different times). Used to hand each budget its own
  // rows of a prefill that ran several budgets as one batch (eval's joined prefill).
  KVCache take_rows(int64_t first, int64_t count) const;
  at::Tensor positions(int64_t layer) const;  // (B, H_kv, n) int64
  int64_t length(int64_t layer, int64_t b, int64_t h) const;  // entries of one head
  int64_t max_length(int64_t layer) const;                    // the longest head of the layer
  // True while the heads of each batch row hold the same positions in the same order (nothing evicted per
  // head since construction / clear()); attention masks may then be shared by a row's heads.
  bool heads_aligned(int64_t layer) const;
  const std::vector<int64_t>& lengths(int64_t layer) const;   // [b * H_kv + h]

  // Keeps, per (batch row, KV head), the entries at `indices` (into the current entries, in that order;
  // pass them sorted to keep the cache in position order). Every head keeps n_keep entries.
  void keep(int64_t layer, const at::Tensor& indices);  // (B, H_kv, n_keep) int64
  // Ragged keep: each head keeps its own count. Both keeps reallocate the layer to the kept entries, so
  // afterwards allocated_bytes() counts Σ kept × (bytes_per_entry() + 8) for the layer, or, where the heads'
  // counts differ by so little that the largest for every head adds at most 1/64, that many slots per head. The indices may be on
  // the host or the cache's device (the selectors leave them there): the gather is built on the device, and
  // the bounds check reads back one flag. An index outside its head's entries throws and leaves the layer as
  // it was. IndexCheck::ByConstruction skips that check (and its read-back) for indices built from this
  // layer's own entries (the per-layer selections and CAKE's cascade cuts).
  void keep(int64_t layer, const RaggedIndices& keep, IndexCheck check = IndexCheck::ReadBack);

  // Per batch row: tokens processed so far, i.e. the position row b's next token gets. The model advances
  // it once per forward (rows of a left-padded chunk advance by their real token counts).
  int64_t next_position(int64_t b = 0) const;
  const std::vector<int64_t>& next_positions() const { return next_pos_; }  // [B]
  void advance(int64_t t);                              // every row by t
  void advance(const std::vector<int64_t>& per_row);   // row b by per_row[b]

  // Drops, in every layer and KV head of row b, the last per_row[b] entries (the most recently appended)
  // and moves next_position(b) back by per_row[b]. Used to roll back a teacher-forced continuation.
  void rewind(const std::vector<int64_t>& per_row);  // [B]

  // K+V bytes of the stored entries (positions not counted), its peak since construction / clear(), and
  // the bytes actually allocated for K, V and positions (the flat buffers; not layer()'s transient copies).
  int64_t bytes() const;
  int64_t peak_bytes() const { return peak_bytes_; }
  int64_t allocated_bytes() const;
  int64_t bytes_per_entry() const;  // K + V of one (head, token)
  // K+V bytes of batch row b's entries (all layers and heads), and its peak since construction / clear().
  int64_t row_bytes(int64_t b) const;
  int64_t row_peak_bytes(int64_t b) const;
  // Raises row b's peak to at least row_bytes[b] and the cache's to at least `bytes`: bytes the rows held in a
  // step that a caller replays in one go (static decoding's write_back of a decode that evicted in every step).
  void raise_peaks(const std::vector<int64_t>& row_bytes, int64_t bytes);

  void clear();

  // ---- per-entry payload ----
  // Adds a column (every layer; entries already held get `fill`). Adding an existing name with the same dtype
  // is a no-op; another dtype is an error.
  void add_payload(const std::string& name, c10::ScalarType dtype = c10::ScalarType::Float, double fill = 0.0);
  bool has_payload(const std::string& name) const;
  const std::vector<PayloadColumn>& payload_columns() const { return payload_; }
  // Writes the column for the entries appended last to `layer`: values (B, H_kv, t); row b's last
  // t - lead[b] entries get values[b, :, lead[b]:] (lead as given to append: [B], [B * H_kv] (head row r's last
  // t - lead[r]) or empty: none).
  void set_payload_tail(int64_t layer, const std::string& name, const at::Tensor& values,
                        const std::vector<int64_t>& lead = {});
  // Writes the column for every entry of `layer`: values (B, H_kv, n) aligned with layer(layer) (padding
  // ignored).
  void set_payload(int64_t layer, const std::string& name, const at::Tensor& values);

  // ---- per-row state ----
  // Named tensors per layer with the batch rows first, (B, ...), for a scorer whose state belongs to each sequence
  // rather than to its cached entries: the Attention-Gate's own keys and values of every earlier token, evicted or
  // not, in slots indexed by position (Scorer::reserve_row_state, EntryContext). keep() leaves it as it is, and so
  // does rewind(): the state must be such that what a rewound continuation wrote is overwritten before it is read
  // again (slots indexed by position are: a row writes position p before any query at p reads it). copy_layer_from
  // copies it (its own tensors: appends write the state in place), concat_rows joins it along the rows
  // (every other dimension padded with zeros to the largest part's; a part without a name gives zeros there), and
  // clear() drops it. It is not counted in the KV bytes.
  const RowState& row_state(int64_t layer) const;
  void set_row_state(int64_t layer, RowState state);  // every tensor's first dimension must be batch()

 private:
  int64_t payload_slot(const std::string& name, const char* what) const;
  struct Layer {
    at::Tensor k;    // (S_total, hd), undefined while S_total = 0
    at::Tensor v;    // (S_total, hd)
    at::Tensor pos;  // (S_total) int64
    std::vector<at::Tensor> cols;  // [payload slot] (S_total) in the payload's dtype
    RowState rows;                 // per-row state, each (B, ...)
    std::vector<int64_t> len;    // [B * H_kv] entries held by head row r
    std::vector<int64_t> cap;    // [B * H_kv] slots of r's segment
    std::vector<int64_t> start;  // [B * H_kv] first slot of r's segment
    int64_t total = 0;           // S_total = Σ cap
    bool aligned = true;         // heads_aligned(): no keep() since the last clear()
    // Device copies of start / len, (B * H_kv) int64; undefined while stale (rebuilt on next use).
    mutable at::Tensor start_d, len_d;
  };
  enum class Layout { Regular, Irregular };  // Regular: equal capacities, segment r at r * cap
  void check_layer(int64_t layer) const;
  Layout layout(const Layer& L) const;
  // Reallocates L with segment capacities new_cap (each >= len_r + the room needed), copying the entries.
  void reallocate(Layer& L, const std::vector<int64_t>& new_cap);
  void set_len(Layer& L, int64_t r, int64_t n);  // keeps the per-row entry counts in step
  const at::Tensor& device_start(const Layer& L) const;  // (B * H_kv) int64 on the device
  const at::Tensor& device_len(const Layer& L) const;    // (B * H_kv) int64 on the device
  // `v` on the device, uploaded once while the same values keep coming (every layer of a forward asks for
  // the same per-row gains).
  const at::Tensor& device_vector(const std::vector<int64_t>& v) const;
  void update_peak();
  // (B*H_kv*n) flat slots of layer()'s padded (B, H_kv, n) view of an irregular layer (padding reads a held slot).
  at::Tensor gather_index(const Layer& L, int64_t n) const;
  // (B*H_kv*t) flat slots of each head's last t entries (rows with fewer entries repeat their first slot).
  at::Tensor tail_index(const Layer& L, int64_t t) const;

  int64_t batch_, kv_heads_, head_dim_;
  c10::ScalarType dtype_;
  c10::Device device_;
  std::vector<Layer> layers_;
  std::vector<PayloadColumn> payload_;
  std::vector<int64_t> next_pos_;   // [B]
  std::vector<int64_t> row_entries_;  // [B] entries of row b, all layers and heads
  int64_t peak_bytes_ = 0;
  std::vector<int64_t> row_peak_;   // [B]
  mutable std::vector<int64_t> memo_key_;  // device_vector()'s last upload
  mutable at::Tensor memo_d_;
};

}  // namespace kvd
