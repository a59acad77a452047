// Fused retention-biased attention, forward and backward, for sm_90 (framework-free launchers).
//
// Layer 1 of the three kernel layers (DESIGN.md): raw pointers, strides and a stream, returning cudaError_t.
// The LibTorch binding that checks shapes and dispatches is kernels/retention_attention.{h,cpp}.
//
// Math (the same as models/model.cpp's explicit grouped softmax path, mods_bias + grouped_probs):
//   query row i (head h), key row j (KV head hk = h / (H / H_kv)), both in [0, S):
//     visible(i, j) = j <= i  &&  doc[i] == doc[j] (when doc ids are given)
//                     &&  pos[i] - pos[j] < window (when window > 0)
//     s(i, j) = scale · q_i·k_j + max(pos[i] - pos[j], 0) · key_rate[hk, j]
//                               + (masked(i, j) ? key_log_mask[hk, j] : 0)       if visible, else -inf
//     masked(i, j) = j != i (mask_delay 0), or pos[i] - pos[j] > mask_delay (mask_delay > 0: DMS's delayed
//                    eviction, a key stays fully visible to the next mask_delay positions)
//     out_i  = Σ_j softmax_j(s(i, ·)) v_j,    lse_i = log Σ_j exp s(i, j)  (-inf for a row that sees nothing)
// Backward: with dS = P ⊙ (dP − Δ), Δ_i = Σ_d dout_i·out_i,
//     dq = scale · dS k,  dk = scale · dSᵀ q,  dv = Pᵀ dout,
//     dkey_rate[j] = Σ_{i, heads of the group} dS(i, j) · max(pos[i] - pos[j], 0),
//     dkey_log_mask[j] = Σ_{i: masked(i, j), heads of the group} dS(i, j).
//
// Precision: bf16 q, k, v, dout; fp32 accumulation (mma.sync m16n8k16), fp32 softmax statistics; P and dS are
// rounded to bf16 as the operands of the second matrix products (as FlashAttention-2 does).
//
// Determinism: no atomics anywhere. The backward runs two kernels:
//   * dK/dV kernel: one CTA per (batch, KV head, 64-key tile); it loops over every query tile of every query
//     head of its group, so it alone owns its keys' dk, dv, dkey_rate and dkey_log_mask (fixed order sums).
//   * dQ kernel: one CTA per (batch, head, query tile), looping over key tiles; it recomputes P and dP.
//   The recomputation (2 extra S×S products of the 7) is the price of determinism without a cross-CTA dQ
//   reduction (atomics, or fp32 partials of size S·D per key tile).
// The one-pass backward (RetentionAttnGrads::dq_acc) does that reduction instead, in a fixed order: the dK/dV
// kernel forms each query tile's dS·K and adds it to an fp32 accumulator after the key tiles before it (a count per
// query tile and head; 5 products instead of 7, plus the ordered adds). Still deterministic.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace kvd::kernels {

// Element strides (not bytes). The head dim is contiguous (stride 1) everywhere; the row, head and batch
// strides of q/k/v/out/dout/dq/dk/dv must be multiples of 8 elements and the pointers 16-byte aligned.
struct RetentionAttnParams {
  int B = 0, H = 0, Hkv = 0, S = 0, D = 0;  // D in {64, 128}; H % Hkv == 0
  const void* q = nullptr;   // bf16 (B, H, S, D)
  int64_t q_sb = 0, q_sh = 0, q_ss = 0;
  const void* k = nullptr;   // bf16 (B, H_kv, S, D)
  int64_t k_sb = 0, k_sh = 0, k_ss = 0;
  const void* v = nullptr;   // bf16 (B, H_kv, S, D)
  int64_t v_sb = 0, v_sh = 0, v_ss = 0;
  void* out = nullptr;       // bf16 (B, H, S, D)
  int64_t o_sb = 0, o_sh = 0, o_ss = 0;
  float* lse = nullptr;      // (B, H, S) contiguous, natural log; written by the forward, read by the backward
  const int32_t* pos = nullptr;   // (B, S) contiguous positions (restart per packed document)
  const int32_t* doc = nullptr;   // (B, S) contiguous document ids, or null (one document per batch row)
  const float* key_rate = nullptr;      // (B, H_kv, S), last dim contiguous, or null (no decay bias)
  int64_t kr_sb = 0, kr_sh = 0;
  const float* key_log_mask = nullptr;  // (B, H_kv, S), last dim contiguous, or null (no log-mask)
  int64_t km_sb = 0, km_sh = 0;
  int window = 0;   // sliding window w > 0: pos_i - pos_j < w; 0: none
  int mask_delay = 0;  // key_log_mask applies where j != i (0) or where pos_i - pos_j > mask_delay (> 0)
  float scale = 1.f;
  // Workspace (B, ceil(S / 32), 4) int32, needed when doc ids or a window are set (else may be null): the
  // launchers write each 32-row block's min / max document and position into it, and the kernels skip the tile
  // pairs that these bounds prove invisible (packed documents and windows then cost only their own tiles).
  int32_t* row_blocks = nullptr;
};

// The backward's passes: Δ, then dQ and dK/dV (+ dkey_rate, dkey_log_mask), independent of each other.
constexpr int kRetentionBwdDelta = 1, kRetentionBwdDq = 2, kRetentionBwdDkv = 4, kRetentionBwdAll = 7;

struct RetentionAttnGrads {
  const void* dout = nullptr;  // bf16 (B, H, S, D)
  int64_t do_sb = 0, do_sh = 0, do_ss = 0;
  void* dq = nullptr;          // bf16 (B, H, S, D)
  int64_t dq_sb = 0, dq_sh = 0, dq_ss = 0;
  void* dk = nullptr;          // bf16 (B, H_kv, S, D)
  int64_t dk_sb = 0, dk_sh = 0, dk_ss = 0;
  void* dv = nullptr;          // bf16 (B, H_kv, S, D)
  int64_t dv_sb = 0, dv_sh = 0, dv_ss = 0;
  float* dkey_rate = nullptr;      // (B, H_kv, S) contiguous; written when key_rate is set (may be null)
  float* dkey_log_mask = nullptr;  // (B, H_kv, S) contiguous; written when key_log_mask is set (may be null)
  float* delta = nullptr;          // workspace (B, H, S) contiguous fp32
  int passes = kRetentionBwdAll;   // which passes run (bits below); dq needs delta, so does dk/dv
  // The one-pass backward (when set and both dq and dk/dv are wanted): the dK/dV kernel also forms dQ and adds it,
  // in a fixed order, into dq_acc; then dq = bf16(scale · dq_acc). Workspaces, zeroed by the launcher:
  float* dq_acc = nullptr;    // (B, H, S, D) contiguous fp32
  int32_t* dq_count = nullptr;  // (B, H, ceil(S / 64)) contiguous
};

// Forward: writes out and lse.
cudaError_t retention_attention_fwd(const RetentionAttnParams& p, cudaStream_t stream);
// Backward: reads p.out and p.lse from the forward; writes dq, dk, dv, dkey_rate, dkey_log_mask (and delta).
cudaError_t retention_attention_bwd(const RetentionAttnParams& p, const RetentionAttnGrads& g, cudaStream_t stream);

}  // namespace kvd::kernels
