// Retention-biased attention: the LibTorch binding (layer 2 of DESIGN.md's kernel layers) of the fused CUDA
// kernel in kernels/retention_attention.cuh, its autograd wrapper, and the explicit CPU/GPU reference.
//
// The math is models/model.cpp's explicit grouped softmax path (mods_bias + grouped_probs), for S query rows
// against the same S key rows, query head h grouped with KV head h / (H / H_kv):
//   visible(i, j) = j <= i (row order) && doc[i] == doc[j] (doc_ids given) && pos[i] - pos[j] < window
//   s(i, j) = scale · q_i·k_j + max(pos[i] - pos[j], 0) · key_rate[j] + (masked(i, j) ? key_log_mask[j] : 0)
//   masked(i, j) = j != i (mask_delay 0), or pos[i] - pos[j] > mask_delay (mask_delay > 0: delayed eviction)
//   out_i = softmax over the visible j of s(i, j), applied to v.
// key_rate and key_log_mask are per KV head and broadcast over the query heads of its group.
#pragma once

#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>

namespace kvd {

// Differentiable attention with the retention mods.
//   q            (B, H, S, D)       any strides with a contiguous last dim (copied otherwise)
//   k, v         (B, H_kv, S, D)    H % H_kv == 0
//   positions    (B, S) int32 / int64, the RoPE positions (restart per packed document)
//   doc_ids      (B, S) integer document ids, or undefined (one document per batch row)
//   key_rate     (B, H_kv, S) floating, or undefined: bias (pos_i - pos_j)·key_rate[j] (TRIM-KV log β)
//   key_log_mask (B, H_kv, S) floating, or undefined: bias key_log_mask[j] where masked(i, j) (Attention-Gate,
//                DMS)
//   window       sliding window w >= 1 (pos_i - pos_j < w), or nullopt
//   (the kernel holds positions in float32: exact below 2^24)
//   scale        the logit scale, e.g. 1/sqrt(D)
//   mask_delay   0: the log-mask applies to every other row; d > 0: only to rows more than d positions later
// Returns (B, H, S, D) in q's dtype. Gradients flow to q, k, v, key_rate and key_log_mask.
// On CUDA (bf16, D in {64, 128}) this runs the fused kernel, deterministic in its gradients; elsewhere it runs
// retention_attention_reference in float32 (float64 for float64 inputs).
at::Tensor retention_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& positions, const at::Tensor& doc_ids, const at::Tensor& key_rate,
                               const at::Tensor& key_log_mask, std::optional<int64_t> window, double scale,
                               int64_t mask_delay = 0);

// Whether retention_attention would run the fused kernel for these inputs (a CUDA build, CUDA tensors, bf16,
// D in {64, 128}).
bool retention_attention_fused_available(const at::Tensor& q, const at::Tensor& k);

// The explicit reference: (B, H_kv, G, S, S) scores in `acc` (float64 by default), on q's device, differentiable
// through autograd. Returns (B, H, S, D) in `acc`.
at::Tensor retention_attention_reference(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                         const at::Tensor& positions, const at::Tensor& doc_ids,
                                         const at::Tensor& key_rate, const at::Tensor& key_log_mask,
                                         std::optional<int64_t> window, double scale,
                                         c10::ScalarType acc = c10::ScalarType::Double, int64_t mask_delay = 0);

// The fused kernel's two passes without autograd (tests, benchmarks). CUDA bf16 only.
struct RetentionAttentionForward {
  at::Tensor out;  // (B, H, S, D) bf16
  at::Tensor lse;  // (B, H, S) float32, natural log-sum-exp of each row's visible scores
};
RetentionAttentionForward retention_attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const at::Tensor& positions, const at::Tensor& doc_ids,
                                                      const at::Tensor& key_rate, const at::Tensor& key_log_mask,
                                                      std::optional<int64_t> window, double scale,
                                                      int64_t mask_delay = 0);

struct RetentionAttentionGrads {
  at::Tensor dq, dk, dv;           // like q, k, v (bf16)
  at::Tensor dkey_rate;            // (B, H_kv, S) float32, undefined without key_rate
  at::Tensor dkey_log_mask;        // (B, H_kv, S) float32, undefined without key_log_mask
};
// How the backward forms dQ when dK / dV are wanted too: TwoPass (the default) recomputes P and dP in a kernel of
// its own; OnePass has the dK/dV kernel add dS·K into an fp32 accumulator in a fixed order (kernels/
// retention_attention.cuh), 5 products instead of 7 at the cost of B·H·S·D·4 bytes of workspace. Both are
// deterministic. Read once from the environment: KVD_RA_BACKWARD=one-pass (anything else, or unset: two-pass).
enum class RetentionBackward { TwoPass, OnePass };
RetentionBackward backward_kind();

// passes: bit flags of the backward's passes, 1 = Δ (rowsum dout·out, needed by the others), 2 = dQ,
// 4 = dK, dV, dkey_rate, dkey_log_mask. Grads of a pass that does not run stay undefined.
RetentionAttentionGrads retention_attention_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& v, const RetentionAttentionForward& fwd,
                                                     const at::Tensor& positions, const at::Tensor& doc_ids,
                                                     const at::Tensor& key_rate, const at::Tensor& key_log_mask,
                                                     std::optional<int64_t> window, double scale, int passes = 7,
                                                     int64_t mask_delay = 0);

}  // namespace kvd
