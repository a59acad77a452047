#include "models/attention.h"

#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>

#include <torch/torch.h>

#include "common/error.h"

namespace kvd {

// See models/attention.h. A mask rules flash attention out, and the memory-efficient kernel, which takes one,
// does not group heads: K/V are repeated to H heads for it (one layer's K/V copied) instead of leaving the call
// to the math fallback (on an H100: 7x slower at T = n = 2048 alone; an eval batch's compressing prefill
// 0.67 s instead of 1.00 s).
at::Tensor grouped_sdpa(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                        bool causal, double scale) {
  if (!mask.defined() || !q.is_cuda()) return at::scaled_dot_product_attention(q, k, v, mask, 0.0, causal, scale, true);
  const int64_t G = q.size(1) / k.size(1);
  if (G == 1) return at::scaled_dot_product_attention(q, k, v, mask, 0.0, causal, scale, false);
  return at::scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), mask, 0.0, causal,
                                          scale, false);  // (B, H, T, hd)
}

void disable_cudnn_attention() { at::globalContext().setSDPUseCuDNN(false); }

namespace {
ChunkAttention& chunk_attention_setting() {
  static ChunkAttention a = [] {
    const char* e = std::getenv("KVD_CHUNK_ATTENTION");
    return e != nullptr && std::string(e) == "masked" ? ChunkAttention::Masked : ChunkAttention::Flash;
  }();
  return a;
}
}  // namespace

void set_chunk_attention(ChunkAttention a) { chunk_attention_setting() = a; }
ChunkAttention chunk_attention() { return chunk_attention_setting(); }

PackedRows pack_left_padded(const std::vector<int64_t>& lead, int64_t T, c10::Device device) {
  const int64_t B = static_cast<int64_t>(lead.size());
  std::vector<int64_t> index;
  std::vector<int32_t> cu(B + 1, 0);
  PackedRows r;
  for (int64_t b = 0; b < B; ++b) {
    KVD_CHECK(lead[b] >= 0 && lead[b] <= T, "pack_left_padded: lead ", lead[b], " outside [0, ", T, "]");
    for (int64_t t = lead[b]; t < T; ++t) index.push_back(b * T + t);
    cu[b + 1] = cu[b] + static_cast<int32_t>(T - lead[b]);
    r.max_len = std::max(r.max_len, T - lead[b]);
  }
  r.total = static_cast<int64_t>(index.size());
  r.index = torch::tensor(index, torch::kLong).to(device);  // (total)
  r.cu_seqlens = torch::tensor(std::vector<int32_t>(cu.begin(), cu.end()), torch::kInt).to(device);  // (B + 1)
  return r;
}

bool varlen_flash_applies(c10::Device device, c10::ScalarType dtype, int64_t head_dim, bool sliding_window) {
  return device.is_cuda() && !sliding_window && (dtype == torch::kBFloat16 || dtype == torch::kHalf) &&
         head_dim % 8 == 0 && head_dim <= 256;
}

at::Tensor varlen_causal_flash(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const PackedRows& rows,
                               double scale) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), hd = q.size(3), Hkv = k.size(1);
  KVD_CHECK(k.size(0) == B && k.size(2) == T && v.sizes() == k.sizes() && H % Hkv == 0,
            "varlen_causal_flash: q ", q.sizes(), " and k ", k.sizes(), " do not match");
  // (B, heads, T, hd) -> (B * T, heads, hd) -> the real rows (total, heads, hd), contiguous.
  auto pack = [&](const at::Tensor& x) {
    return x.transpose(1, 2).reshape({B * T, x.size(1), hd}).index_select(0, rows.index);
  };
  const at::Tensor out = std::get<0>(at::_flash_attention_forward(
      pack(q), pack(k), pack(v), rows.cu_seqlens, rows.cu_seqlens, rows.max_len, rows.max_len, 0.0,
      /*is_causal=*/true, /*return_debug_mask=*/false, scale));  // (total, H, hd)
  return torch::zeros({B * T, H, hd}, q.options()).index_copy_(0, rows.index, out).view({B, T, H, hd}).transpose(1, 2);
}

at::Tensor segment_causal_flash(const at::Tensor& q, const KVLayerSegments& seg, double scale) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), hd = q.size(3), R = seg.len.size(0);
  KVD_CHECK(R % B == 0 && H % (R / B) == 0 && seg.k.defined() && seg.k.size(1) == hd && seg.max_len > 0,
            "segment_causal_flash: q ", q.sizes(), " does not match a cache layer of ", R, " head rows");
  const int64_t Hkv = R / B, G = H / Hkv;
  // (B, H, T, hd) -> (B, H_kv, T, G, hd): each head row's T queries, its G query heads side by side.
  const at::Tensor qs = q.reshape({B, Hkv, G, T, hd}).transpose(2, 3).reshape({R * T, G, hd});  // (R T, G, hd)
  const at::Tensor cu_q = torch::arange(0, (R + 1) * T, T, q.options().dtype(torch::kInt));     // (R + 1)
  const at::Tensor out = std::get<0>(at::_flash_attention_forward(
      qs, seg.k.unsqueeze(1), seg.v.unsqueeze(1), cu_q, seg.start, T, seg.max_len, 0.0, /*is_causal=*/true,
      /*return_debug_mask=*/false, scale, std::nullopt, std::nullopt, seg.len));  // (R T, G, hd)
  return out.view({B, Hkv, T, G, hd}).transpose(2, 3).reshape({B, H, T, hd});
}

at::Tensor segment_then_rows_flash(const at::Tensor& q, const KVLayerSegments& seg, const at::Tensor& k_rows,
                                   const at::Tensor& v_rows, double scale) {
  const int64_t B = q.size(0), H = q.size(1), n = q.size(2), hd = q.size(3), Hkv = k_rows.size(1);
  const int64_t R = B * Hkv, G = H / Hkv;
  KVD_CHECK(n > 1 && H % Hkv == 0 && k_rows.sizes() == at::IntArrayRef({B, Hkv, n, hd}) &&
                v_rows.sizes() == k_rows.sizes() && seg.len.defined() && seg.len.size(0) == R,
            "segment_then_rows_flash: q ", q.sizes(), ", rows' keys ", k_rows.sizes(), " and a cache layer of ",
            seg.len.defined() ? seg.len.size(0) : 0, " head rows do not match (n > 1)");
  // The rows among themselves, causally: (B, n, H, hd) out, (B, H, n) log-sum-exp.
  auto rows = at::_flash_attention_forward(q.transpose(1, 2).contiguous(), k_rows.transpose(1, 2).contiguous(),
                                           v_rows.transpose(1, 2).contiguous(), std::nullopt, std::nullopt, n, n, 0.0,
                                           /*is_causal=*/true, /*return_debug_mask=*/false, scale);
  const at::Tensor o_rows = std::get<0>(rows).transpose(1, 2).to(torch::kFloat);  // (B, H, n, hd)
  const at::Tensor l_rows = std::get<1>(rows).view({B, H, n});                   // (B, H, n) float32
  if (seg.max_len == 0) return o_rows.to(q.scalar_type());
  // The stored entries, all visible: each head row's n queries with its G query heads side by side.
  const at::Tensor qs = q.reshape({B, Hkv, G, n, hd}).transpose(2, 3).reshape({R * n, G, hd});  // (R n, G, hd)
  const at::Tensor cu_q = torch::arange(0, (R + 1) * n, n, q.options().dtype(torch::kInt));     // (R + 1)
  auto cache = at::_flash_attention_forward(qs, seg.k.unsqueeze(1), seg.v.unsqueeze(1), cu_q, seg.start, n,
                                            seg.max_len, 0.0, /*is_causal=*/false, /*return_debug_mask=*/false, scale,
                                            std::nullopt, std::nullopt, seg.len);
  const at::Tensor o_cache = std::get<0>(cache).view({B, Hkv, n, G, hd}).transpose(2, 3).reshape({B, H, n, hd})
                                 .to(torch::kFloat);  // (B, H, n, hd)
  // The log-sum-exp comes unpadded, (G, R n), or padded per sequence, (R, G, n_max); an empty segment's is inf.
  at::Tensor lse = std::get<1>(cache);
  lse = lse.dim() == 2 ? lse.view({G, R, n}).transpose(0, 1) : lse.narrow(2, 0, n);  // (R, G, n)
  lse = lse.reshape({B, H, n});
  const at::Tensor l_cache = lse.masked_fill(lse.isinf(), -std::numeric_limits<double>::infinity());  // (B, H, n)
  const at::Tensor m = torch::maximum(l_cache, l_rows);                                              // (B, H, n)
  const at::Tensor wc = (l_cache - m).exp().unsqueeze(-1), wr = (l_rows - m).exp().unsqueeze(-1);   // (B, H, n, 1)
  return ((o_cache * wc + o_rows * wr) / (wc + wr)).to(q.scalar_type());  // (B, H, n, hd)
}

at::Tensor SequenceMask::visible(const at::Tensor& q_rows) const {  // (B, Sq) int64
  at::Tensor kj = torch::arange(S, q_rows.options()).view({1, 1, S});  // (1, 1, S)
  at::Tensor vis = kj.le(q_rows.unsqueeze(-1));                      // (B, Sq, S)
  if (doc_ids.defined()) {
    at::Tensor qd = doc_ids.gather(1, q_rows);                    // (B, Sq)
    vis = vis.logical_and(qd.unsqueeze(-1).eq(doc_ids.unsqueeze(1)));  // (B, Sq, S)
  }
  if (window) {
    at::Tensor qp = positions.gather(1, q_rows);                           // (B, Sq)
    at::Tensor dp = qp.unsqueeze(-1) - positions.unsqueeze(1);             // (B, Sq, S)
    vis = vis.logical_and(dp.lt(*window));
  }
  return vis;
}

const at::Tensor& SequenceMask::sdpa_mask() {
  if (!bool_mask.defined()) {
    const int64_t B = positions.size(0);
    at::Tensor rows = torch::arange(S, positions.options()).view({1, S}).expand({B, S});  // (B, S)
    bool_mask = visible(rows).unsqueeze(1);  // (B, 1, S, S)
  }
  return bool_mask;
}


at::Tensor mods_bias(const at::Tensor& q_rows,  // (B, Sq)
                     const SequenceMask& tm, const LayerMods& m, int64_t Hkv, c10::ScalarType acc) {
  const int64_t B = q_rows.size(0), Sq = q_rows.size(1), S = tm.S;
  at::Tensor vis = tm.visible(q_rows);  // (B, Sq, S)
  at::Tensor bias = torch::zeros({B, 1, Sq, S}, q_rows.options().dtype(acc));  // (B, 1, Sq, S)
  at::Tensor qpos = tm.positions.gather(1, q_rows);                                      // (B, Sq)
  if (m.key_rate.defined()) {
    KVD_CHECK(m.key_rate.dim() == 3 && m.key_rate.size(0) == B && m.key_rate.size(1) == Hkv &&
                  m.key_rate.size(2) == S,
              "LayerMods::key_rate must be (B=", B, ", H_kv=", Hkv, ", S=", S, "), got ", m.key_rate.sizes());
    at::Tensor age = (qpos.unsqueeze(-1) - tm.positions.unsqueeze(1)).to(acc);  // (B, Sq, S)
    // Future keys (masked anyway) get age 0 so that no inf * 0 can appear.
    age = age.clamp_min(0);
    bias = bias + age.unsqueeze(1) * m.key_rate.to(acc).unsqueeze(2);  // (B, H_kv, Sq, S)
  }
  if (m.key_log_mask.defined()) {
    KVD_CHECK(m.key_log_mask.dim() == 3 && m.key_log_mask.size(0) == B && m.key_log_mask.size(1) == Hkv &&
                  m.key_log_mask.size(2) == S,
              "LayerMods::key_log_mask must be (B=", B, ", H_kv=", Hkv, ", S=", S, "), got ",
              m.key_log_mask.sizes());
    KVD_CHECK(m.key_log_mask_delay >= 0, "LayerMods::key_log_mask_delay must be >= 0, got ", m.key_log_mask_delay);
    // Unmasked: a row's own key (delay 0), or every key at most `delay` positions back.
    at::Tensor kj = torch::arange(S, q_rows.options()).view({1, 1, S});  // (1, 1, S)
    at::Tensor keep = m.key_log_mask_delay > 0
                          ? (qpos.unsqueeze(-1) - tm.positions.unsqueeze(1)).le(m.key_log_mask_delay).unsqueeze(1)
                          : kj.eq(q_rows.unsqueeze(-1)).unsqueeze(1);   // (B, 1, Sq, S)
    at::Tensor lm = m.key_log_mask.to(acc).unsqueeze(2);       // (B, H_kv, 1, S)
    bias = bias + torch::where(keep, torch::zeros_like(lm), lm);         // (B, H_kv, Sq, S)
  }
  if (m.pair_bias) {
    PairBiasQuery pq{q_rows, qpos, tm.positions};
    at::Tensor pb = m.pair_bias(pq).to(acc);  // broadcastable to (B, H_kv, Sq, S)
    KVD_CHECK(pb.dim() == 4 && pb.size(-1) == S && pb.size(-2) == Sq &&
                  (pb.size(1) == 1 || pb.size(1) == Hkv),
              "LayerMods::pair_bias must return (B|1, H_kv|1, Sq=", Sq, ", S=", S, "), got ", pb.sizes());
    bias = bias + pb;
  }
  return bias.masked_fill(vis.logical_not().unsqueeze(1), -std::numeric_limits<float>::infinity());
}

at::Tensor grouped_probs(const at::Tensor& q,     // (B, H, Sq, hd)
                         const at::Tensor& k,     // (B, H_kv, S, hd)
                         const at::Tensor& bias,  // (B, H_kv|1, Sq, S) float32 / float64
                         double scale) {
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), hd = q.size(3), Hkv = k.size(1);
  at::Tensor qg = q.reshape({B, Hkv, H / Hkv, Sq, hd}).to(bias.scalar_type());           // (B, H_kv, G, Sq, hd)
  at::Tensor kt = k.to(bias.scalar_type()).unsqueeze(2).transpose(-1, -2);               // (B, H_kv, 1, hd, S)
  at::Tensor scores = torch::matmul(qg, kt) * scale + bias.unsqueeze(2);            // (B, H_kv, G, Sq, S)
  return torch::softmax(scores, -1);                                                // (B, H_kv, G, Sq, S)
}

at::Tensor attention_probs(const at::Tensor& q, const at::Tensor& q_pos, const at::Tensor& k, const at::Tensor& k_pos,
                           const at::Tensor& valid, c10::ScalarType compute, EmptyRows empty) {
  KVD_CHECK(q.dim() == 4 && k.dim() == 4 && q.size(0) == k.size(0) && q.size(3) == k.size(3) &&
                q.size(1) % k.size(1) == 0,
            "attention_probs: q (B, H, w, hd) and k (B, H_kv, n, hd) do not fit: ", q.sizes(), " vs ", k.sizes());
  const int64_t H = q.size(1), hd = q.size(3), G = H / k.size(1);
  auto heads = [&](const at::Tensor& t) { return G == 1 ? t : t.repeat_interleave(G, 1); };  // (B, H_kv, ..) -> (B, H, ..)
  at::Tensor qf = q.to(compute);                                                      // (B, H, w, hd)
  at::Tensor kf = heads(k.to(compute));                                               // (B, H, n, hd)
  at::Tensor logits = torch::matmul(qf, kf.transpose(2, 3)) / std::sqrt(static_cast<double>(hd));  // (B, H, w, n)
  at::Tensor vis = heads(k_pos).unsqueeze(2).le(q_pos.unsqueeze(1).unsqueeze(-1));   // (B, H, w, n)
  if (valid.defined()) vis = vis.logical_and(heads(valid).unsqueeze(2));
  at::Tensor p = torch::softmax(logits.masked_fill(vis.logical_not(), -std::numeric_limits<double>::infinity()), -1);
  return empty == EmptyRows::Zero ? torch::nan_to_num(p, 0.0, 0.0, 0.0) : p;  // (B, H, w, n)
}

}  // namespace kvd
