// Decode attention over a ragged per-head KV cache (framework-free launcher; the LibTorch binding and the
// reference are kernels/decode_attention.{h,cpp}).
//
// One query token per request. Segment s = b · H_kv + h is one (request, KV head); its entries are the rows
// start[s] .. start[s] + len[s] − 1 of flat K and V storages (row stride hd elements, bf16). Query head
// q = h · G + g (G = H / H_kv) of request b reads segment b · H_kv + h:
//   out[b, q] = Σ_j softmax_j(scale · <Q[b, q], K[start[s] + j]>) · V[start[s] + j]
// over its visible entries j < len[s]; with a sliding window (window > 0), entry j is visible only if
// qpos[b] − kpos[start[s] + j] < window; with holes (holes != 0), an entry whose kpos is negative is an empty slot
// (an entry evicted in place while decoding) and is not seen. A segment with no visible entry gives 0.
//
// start and len are read on the device, so one launch shape serves every decode step (CUDA graphs). The work is
// split by entries, not by heads: the S = B · H_kv segments' E entries are taken end to end, and CTA x of the
// C = splits · S CTAs takes entries [x · E / C, (x + 1) · E / C), so every CTA gets the same work whether the cache
// is uniform or ragged, and one wave of them ends together. A CTA whose range crosses segments makes one piece per
// segment. Every CTA derives this split from `len` itself (a block-wide sum and prefix over the S lengths). Each
// piece writes, per query head, its running max, sum and unnormalized output (fp32) to a workspace slot (CTA +
// segment: at most C + S − 1); a second kernel merges a segment's pieces in a fixed order (interleaved groups of
// pieces, then the groups; deterministic: no atomics).
//
// Inside a CTA (4 warps), hd / 8 lanes hold one key row (8 bf16 each, one 16-byte load), so a warp reads
// 32 · 8 / hd keys per round with coalesced rows; a lane group loads 4 rounds of K and V rows before using them (loads
// in flight), q · k is reduced over its lanes with shuffles, and each lane group keeps an online softmax for the G
// query heads (G is a template parameter: registers for exactly G heads). fp32 accumulation throughout.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace kvd::kernels {

constexpr int kDecodeMaxGroup = 8;  // G = H / H_kv up to this

struct DecodeAttentionArgs {
  const uint16_t* q = nullptr;    // (B, H, hd) contiguous bf16
  const uint16_t* k = nullptr;    // flat rows (·, hd) bf16
  const uint16_t* v = nullptr;    // flat rows (·, hd) bf16
  const int64_t* start = nullptr;  // (B · H_kv) first row of each segment
  const int64_t* len = nullptr;    // (B · H_kv) entries of each segment, <= max_len
  const int64_t* kpos = nullptr;   // flat (·) stored positions; read only when window > 0 or holes != 0
  const int64_t* qpos = nullptr;   // (B) positions of the queries; read only when window > 0
  int64_t window = 0;              // <= 0: no sliding window
  int holes = 0;                   // != 0: kpos < 0 marks an empty slot
  int B = 0, H = 0, Hkv = 0, hd = 0;  // hd 64 or 128; H / Hkv <= kDecodeMaxGroup
  float scale = 1.f;
  int64_t max_len = 0;
  int splits = 1;                  // CTAs per segment on average, >= 1 (splits · B · H_kv <= 2^24)
  float* part_o = nullptr;         // workspace (splits + 1, B · H, hd) fp32
  float* part_ml = nullptr;        // workspace (splits + 1, B · H, 2) fp32: max, sum
  uint16_t* out = nullptr;         // (B, H, hd) bf16
};

// How many splits a launch should use: one wave of the CTAs the current device holds at once for this head dim and
// group (splits · segments at most that), without CTAs of fewer than 64 entries on average.
int decode_attention_splits(int segments, int64_t max_len, int hd, int group);

cudaError_t decode_attention(const DecodeAttentionArgs& a, cudaStream_t stream);

}  // namespace kvd::kernels
