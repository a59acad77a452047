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
// split by entries, not by heads: with S = B · H_kv segments, chunks are ceil(Σ len / (splits · S)) rows and segment s
// gets ceil(len[s] / chunk) of them, so a ragged cache keeps as many CTAs busy as a uniform one of the same total.
// Every CTA derives this split from `len` itself (a block-wide sum and prefix over the S lengths). The grid has a
// bound of (splits + 1) · S CTAs; those past the chunks in use exit. Each CTA writes, per query head, its chunk's
// running max, sum and unnormalized output (fp32) to a workspace; a second kernel merges a segment's chunks in a
// fixed order (4 interleaved groups of chunks, then the groups; deterministic: no atomics).
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
  int splits = 1;                  // CTAs per segment on average, >= 1
  float* part_o = nullptr;         // workspace (splits + 1, B · H, hd) fp32
  float* part_ml = nullptr;        // workspace (splits + 1, B · H, 2) fp32: max, sum
  uint16_t* out = nullptr;         // (B, H, hd) bf16
};

// How many splits a launch should use: about 1,056 CTAs (8 per SM on 132 SMs) without chunks shorter than 64 rows.
int decode_attention_splits(int segments, int64_t max_len);

cudaError_t decode_attention(const DecodeAttentionArgs& a, cudaStream_t stream);

}  // namespace kvd::kernels
