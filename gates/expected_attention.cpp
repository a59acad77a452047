// Expected Attention (docs/methods/expected_attention.md; kvpress ExpectedAttentionPress): a Gaussian model of future
// queries (mean and covariance of the prompt's pre-RoPE queries, rotated by the average RoPE of the next
// n_future positions) gives each key its expected softmax attention, times ||v_j||.
#include <cmath>

#include <torch/torch.h>

#include "common/error.h"
#include "gates/heuristics.h"
#include "models/model.h"

namespace kvd {

ScorerNeeds ExpectedAttentionScorer::needs() const {
  ScorerNeeds n;
  n.queries_pre_rope = true;
  return n;
}

at::Tensor ExpectedAttentionScorer::score(const LayerView& view) {
  KVD_CHECK(view.model != nullptr && view.queries_pre_rope.defined(),
            "expected_attention: needs the model and the prompt's pre-RoPE queries");
  KVD_CHECK(!view.valid.defined(), "expected_attention: ragged heads before scoring are not supported");
  const int64_t B = view.keys.size(0), Hkv = view.keys.size(1), n = view.keys.size(2), hd = view.keys.size(3);
  const int64_t ns = opt_.n_sink;
  const int64_t T = view.queries_pre_rope.size(2);
  KVD_CHECK(n > ns && T > ns, "expected_attention: needs more than ", ns, " tokens");
  const int64_t H = view.queries_pre_rope.size(1), G = H / Hkv;

  // Query statistics (sinks excluded).
  at::Tensor q = view.queries_pre_rope.narrow(2, ns, T - ns).to(torch::kFloat);  // (B, H, T', hd)
  at::Tensor mu = q.mean(2, true);                                              // (B, H, 1, hd)
  at::Tensor c = q - mu;                                                        // (B, H, T', hd)
  at::Tensor cov = torch::matmul(c.transpose(2, 3), c) / static_cast<double>(T - ns);  // (B, H, hd, hd)
  mu = mu.squeeze(2);                                                                // (B, H, hd)

  // Average RoPE rotation over the next n_future positions (float32, as HF's rotary embedding).
  auto f32 = torch::TensorOptions().dtype(torch::kFloat);
  at::Tensor inv = rope_inv_freq(view.model->config()).to(torch::kFloat);                    // (hd/2)
  at::Tensor pos = torch::arange(view.next_position, view.next_position + opt_.n_future, f32);  // (F)
  at::Tensor ang = pos.unsqueeze(1) * inv.unsqueeze(0);                                       // (F, hd/2)
  ang = torch::cat({ang, ang}, 1);                                                            // (F, hd)
  at::Tensor cos = ang.cos(), sin = ang.sin();                                                // (F, hd)
  const int64_t half = hd / 2;
  at::Tensor I = torch::eye(hd, f32);  // (hd, hd)
  at::Tensor P = torch::zeros({hd, hd}, f32);
  P.narrow(0, half, half).narrow(1, 0, half).copy_(torch::eye(half, f32));
  P.narrow(0, 0, half).narrow(1, half, half).copy_(-torch::eye(half, f32));
  at::Tensor R = (cos.unsqueeze(1) * I + sin.unsqueeze(1) * P).mean(0).to(view.keys.device());  // (hd, hd)
  mu = torch::matmul(mu, R.t());                                  // (B, H, hd)
  cov = torch::matmul(R, torch::matmul(cov, R.t()));              // (B, H, hd, hd)

  at::Tensor k = view.keys.narrow(2, ns, n - ns).to(torch::kFloat).repeat_interleave(G, 1);  // (B, H, n', hd)
  at::Tensor s = torch::matmul(k, mu.unsqueeze(-1)).squeeze(-1) / std::sqrt(static_cast<double>(hd));  // (B, H, n')
  s = s + (torch::matmul(k, cov) * k).sum(-1) / static_cast<double>(hd) / 2.0;                       // (B, H, n')
  s = torch::softmax(s, -1);
  s = reduce_group(s, Hkv, GroupReduce::Mean);  // (B, H_kv, n')
  at::Tensor vn = torch::linalg_vector_norm(view.values.narrow(2, ns, n - ns).to(torch::kFloat), 2, {-1}, false,
                                            c10::nullopt);  // (B, H_kv, n')
  s = (s + opt_.epsilon) * vn;
  at::Tensor top = s.max() + 1.0;  // () on the device: no wait for it
  return torch::cat({top.expand({B, Hkv, ns}), s}, 2);  // (B, H_kv, n)
}

}  // namespace kvd
