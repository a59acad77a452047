// Decode attention over a ragged per-head KV cache (kernels/decode_attention.cuh) for LibTorch callers, and the
// reference it is tested against. One query token per request; segment s = b * H_kv + h holds its entries at rows
// start[s] .. start[s] + len[s] - 1 of flat K / V storages; query head h * G + g reads segment b * H_kv + h. With a
// sliding window, entry j is visible only if qpos[b] - kpos[start[s] + j] < window. With
// EmptySlots::NegativePosition, an entry whose kpos is negative is an empty slot (evicted in place while
// decoding, models/static_decode.h) and is not seen.
#pragma once

#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>

namespace kvd {

// Whether a segment's first len[s] rows may hold empty slots.
enum class EmptySlots {
  None,             // every row j < len[s] is an entry
  NegativePosition  // a row whose kpos is negative is empty (kpos needed)
};

struct DecodeAttentionInput {
  at::Tensor q;      // (B, H, hd)
  at::Tensor k;      // (rows, hd) flat storage
  at::Tensor v;      // (rows, hd)
  at::Tensor start;  // (B * H_kv) int64 first row of each segment
  at::Tensor len;    // (B * H_kv) int64 entries of each segment, each <= max_len
  int64_t max_len = 0;
  at::Tensor kpos;   // (rows) int64 stored positions; needed with a window or EmptySlots::NegativePosition
  at::Tensor qpos;   // (B) int64 query positions; needed with a window
  std::optional<int64_t> window;
  EmptySlots empty_slots = EmptySlots::None;
  double scale = 1.0;
  int splits = 0;  // the fused kernel's CTAs per segment; 0: its own choice (kernels::decode_attention_splits)
};

// The fused kernel's own choice of CTAs per segment for `segments` (B * H_kv) segments of at most max_len entries,
// head dim hd and group H / H_kv on the current device (1 in a build without the CUDA kernels).
int decode_attention_default_splits(int64_t segments, int64_t max_len, int64_t hd, int64_t group);

// Whether decode_attention_fused runs for `in`: a build with the CUDA kernels, CUDA tensors, bf16, hd 64 or 128,
// H / H_kv <= 8.
bool decode_attention_fused_available(const DecodeAttentionInput& in);

// (B, H, hd) in q's dtype. The fused kernel reads start / len on the device and never synchronizes, so a call can
// be captured in a CUDA graph; it checks shapes, dtypes and devices on the host only.
at::Tensor decode_attention_fused(const DecodeAttentionInput& in);
// The same with LibTorch ops (fp32 softmax), any device and dtype; also never synchronizes.
at::Tensor decode_attention_reference(const DecodeAttentionInput& in);
// The fused kernel where it is available, else the reference.
at::Tensor decode_attention(const DecodeAttentionInput& in);

}  // namespace kvd
