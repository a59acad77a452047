// Expected Attention (docs/methods/expected_attention.md; kvpress ExpectedAttentionPress): a Gaussian model of future
// queries (mean and covariance of the prompt's pre-RoPE queries, rotated by the average RoPE of the next
// n_future positions) gives each key its expected softmax attention, times ||v_j||.
#include <cmath>
#include <limits>

#include <torch/torch.h>

#include "common/error.h"
#include "gates/heuristics.h"
#include "models/model.h"

namespace kvd {

ScorerNeeds ExpectedAttentionScorer::needs() const {
  ScorerNeeds n;
  n.queries_pre_rope = true;
  n.rows = RowBatching::Together;
  return n;
}

at::Tensor ExpectedAttentionScorer::rotation(const LayerView& view, int64_t hd) {
  const int64_t B = static_cast<int64_t>(view.next_positions.size());
  if (rot_.defined() && rot_model_ == view.model && rot_next_ == view.next_positions && rot_.size(-1) == hd &&
      rot_.device() == view.keys.device())
    return rot_;
  // Average RoPE rotation over each row's next n_future positions (float32 on the CPU, as HF's rotary embedding).
  auto f32 = torch::TensorOptions().dtype(torch::kFloat);
  at::Tensor inv = rope_inv_freq(view.model->config()).to(torch::kFloat);  // (hd/2)
  const int64_t half = hd / 2;
  at::Tensor I = torch::eye(hd, f32);  // (hd, hd)
  at::Tensor P = torch::zeros({hd, hd}, f32);
  P.narrow(0, half, half).narrow(1, 0, half).copy_(torch::eye(half, f32));
  P.narrow(0, 0, half).narrow(1, half, half).copy_(-torch::eye(half, f32));
  std::vector<at::Tensor> rot;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t t = view.next_positions[b];
    at::Tensor pos = torch::arange(t, t + opt_.n_future, f32);  // (F)
    at::Tensor ang = pos.unsqueeze(1) * inv.unsqueeze(0);       // (F, hd/2)
    ang = torch::cat({ang, ang}, 1);                            // (F, hd)
    at::Tensor cos = ang.cos(), sin = ang.sin();                // (F, hd)
    rot.push_back((cos.unsqueeze(1) * I + sin.unsqueeze(1) * P).mean(0));  // (hd, hd)
  }
  rot_ = torch::stack(rot).to(view.keys.device()).unsqueeze(1);  // (B, 1, hd, hd)
  rot_model_ = view.model;
  rot_next_ = view.next_positions;
  return rot_;
}

at::Tensor ExpectedAttentionScorer::score(const LayerView& view) {
  KVD_CHECK(view.model != nullptr && view.queries_pre_rope.defined(),
            "expected_attention: needs the model and the prompt's pre-RoPE queries");
  const int64_t B = view.keys.size(0), Hkv = view.keys.size(1), n = view.keys.size(2), hd = view.keys.size(3);
  const int64_t ns = opt_.n_sink;
  const int64_t T = view.queries_pre_rope.size(2);
  KVD_CHECK(n > ns && T > ns, "expected_attention: needs more than ", ns, " tokens");
  const int64_t H = view.queries_pre_rope.size(1), G = H / Hkv;

  // Query statistics over each row's real query rows (sinks excluded).
  at::Tensor q = view.queries_pre_rope.narrow(2, ns, T - ns).to(torch::kFloat);  // (B, H, T', hd)
  at::Tensor mu, cov;
  if (view.query_valid.defined()) {
    const at::Tensor use = view.query_valid.narrow(1, ns, T - ns).to(torch::kFloat).view({B, 1, T - ns, 1});  // (B, 1, T', 1)
    const at::Tensor cnt = use.sum(2, true).clamp_min(1.0);                                                  // (B, 1, 1, 1)
    mu = (q * use).sum(2, true) / cnt;                                                                       // (B, H, 1, hd)
    const at::Tensor c = (q - mu) * use;                                                                     // (B, H, T', hd)
    cov = torch::matmul(c.transpose(2, 3), c) / cnt;                                                         // (B, H, hd, hd)
  } else {
    mu = q.mean(2, true);                                                                // (B, H, 1, hd)
    const at::Tensor c = q - mu;                                                         // (B, H, T', hd)
    cov = torch::matmul(c.transpose(2, 3), c) / static_cast<double>(T - ns);             // (B, H, hd, hd)
  }
  mu = mu.squeeze(2);  // (B, H, hd)
  KVD_CHECK(static_cast<int64_t>(view.next_positions.size()) == B, "expected_attention: next_positions holds ",
            view.next_positions.size(), " rows, the view ", B);

  at::Tensor R = rotation(view, hd);                                     // (B, 1, hd, hd)
  mu = torch::matmul(mu.unsqueeze(2), R.transpose(2, 3)).squeeze(2);     // (B, H, hd)
  cov = torch::matmul(R, torch::matmul(cov, R.transpose(2, 3)));         // (B, H, hd, hd)

  at::Tensor k = view.keys.narrow(2, ns, n - ns).to(torch::kFloat).repeat_interleave(G, 1);  // (B, H, n', hd)
  at::Tensor s = torch::matmul(k, mu.unsqueeze(-1)).squeeze(-1) / std::sqrt(static_cast<double>(hd));  // (B, H, n')
  s = s + (torch::matmul(k, cov) * k).sum(-1) / static_cast<double>(hd) / 2.0;                       // (B, H, n')
  at::Tensor valid;  // (B, H_kv, n') or undefined
  if (view.valid.defined()) {
    valid = view.valid.narrow(2, ns, n - ns);
    s = s.masked_fill(valid.logical_not().repeat_interleave(G, 1), -std::numeric_limits<float>::infinity());
  }
  s = torch::softmax(s, -1);
  s = reduce_group(s, Hkv, GroupReduce::Mean);  // (B, H_kv, n')
  at::Tensor vn = torch::linalg_vector_norm(view.values.narrow(2, ns, n - ns).to(torch::kFloat), 2, {-1}, false,
                                            c10::nullopt);  // (B, H_kv, n')
  s = (s + opt_.epsilon) * vn;
  at::Tensor top = valid.defined() ? row_top(s, valid) : s.amax({1, 2}, true) + 1.0;  // (B, 1, 1)
  return torch::cat({top.expand({B, Hkv, ns}), s}, 2);  // (B, H_kv, n): the sinks at max + 1
}

}  // namespace kvd
