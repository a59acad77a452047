// Window-attention column-statistics cases and a naive float64 reference written with loops, shared by the
// window-scores tests (the emulated kernel on the CPU, the CUDA kernel, and the dispatcher gates/heuristics.h).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <torch/torch.h>

#include "kernels/window_scores.h"

namespace kvd_test {

struct WindowCase {
  int64_t B = 1, H = 2, Hkv = 1, hd = 64, w = 1, n = 19;
  bool ragged = false;    // a random valid mask (as after per-head eviction) and positions with gaps
  bool strided = false;   // k and k_pos narrowed out of larger buffers (a cache with spare capacity)
  bool blind_row = false; // row 0 of request 0 sits before every entry: it sees nothing
};

inline std::vector<WindowCase> window_cases() {
  std::vector<WindowCase> c;
  c.push_back({1, 2, 1, 64, 1, 19, false, false, false});    // TOVA: one row; less than one tile
  c.push_back({2, 4, 2, 64, 5, 70, true, false, false});     // padding rows inside each head; two tiles; ragged
  c.push_back({1, 3, 1, 128, 32, 130, false, true, false});  // G = 3, hd 128, three tiles, strided cache
  c.push_back({2, 6, 2, 64, 24, 64, true, true, true});      // a row that sees nothing; exactly one tile
  c.push_back({1, 16, 1, 64, 3, 40, false, false, false});   // the largest group
  return c;
}

// The window rows are the last w positions before the next token; their own entries are the cache's last w
// (the causal part of the window is exercised: row i sees only entries at positions <= its own).
inline kvd::WindowScoresInput make_window_input(const WindowCase& c, uint64_t seed) {
  torch::manual_seed(static_cast<int64_t>(seed));
  kvd::WindowScoresInput in;
  in.q = (torch::randn({c.B, c.H, c.w, c.hd}) * 1.5).to(torch::kBFloat16);
  const int64_t cap = c.strided ? c.n + 13 : c.n;  // spare capacity past n
  at::Tensor kbuf = (torch::randn({c.B, c.Hkv + (c.strided ? 1 : 0), cap, c.hd}) * 1.5).to(torch::kBFloat16);
  in.k = kbuf.narrow(1, 0, c.Hkv).narrow(2, 0, c.n);  // (B, H_kv, n, hd)
  at::Tensor gaps = c.ragged ? torch::randint(1, 4, {c.B, c.Hkv, cap}, torch::kLong)
                             : torch::ones({c.B, c.Hkv, cap}, torch::kLong);
  at::Tensor pbuf = gaps.cumsum(2) - 1;  // (B, H_kv, cap) increasing positions from 0
  in.k_pos = pbuf.narrow(2, 0, c.n);
  // Every head's last w entries hold the window; the rows sit at request b's positions of head 0's window.
  in.q_pos = in.k_pos.select(1, 0).narrow(1, c.n - c.w, c.w).contiguous();  // (B, w)
  if (c.blind_row) in.q_pos[0][0] = -1;
  if (c.ragged) in.valid = torch::rand({c.B, c.Hkv, c.n}).gt(0.3);
  return in;
}

// (B, H, n) float64 sums (and sums of squares) of the probabilities, and their maximum over the rows with each
// row's weight (in.row_weight, else 1), by loops.
inline kvd::WindowColumns naive_window_columns(const kvd::WindowScoresInput& in) {
  const int64_t B = in.q.size(0), H = in.q.size(1), w = in.q.size(2), hd = in.q.size(3);
  const int64_t Hkv = in.k.size(1), n = in.k.size(2), G = H / Hkv;
  at::Tensor q = in.q.to(torch::kDouble).contiguous(), k = in.k.to(torch::kDouble).contiguous();
  at::Tensor qp = in.q_pos.contiguous(), kp = in.k_pos.contiguous();
  at::Tensor vd = in.valid.defined() ? in.valid.contiguous() : torch::ones({B, Hkv, n}, torch::kBool);
  auto Q = q.accessor<double, 4>(), K = k.accessor<double, 4>();
  auto QP = qp.accessor<int64_t, 2>();
  auto KP = kp.accessor<int64_t, 3>();
  auto V = vd.accessor<bool, 3>();
  kvd::WindowColumns out{torch::zeros({B, H, n}, torch::kDouble), torch::zeros({B, H, n}, torch::kDouble),
                         torch::zeros({B, H, n}, torch::kDouble)};
  auto S1 = out.sum.accessor<double, 3>(), S2 = out.sumsq.accessor<double, 3>(), M = out.max.accessor<double, 3>();
  at::Tensor rw = in.row_weight.defined() ? in.row_weight.to(torch::kDouble).contiguous() : torch::ones({B, w}, torch::kDouble);
  auto RW = rw.accessor<double, 2>();
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
  std::vector<double> s(n);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < w; ++i) {
        const int64_t kh = h / G;
        double mx = -INFINITY;
        for (int64_t j = 0; j < n; ++j) {
          s[j] = -INFINITY;
          if (!V[b][kh][j] || KP[b][kh][j] > QP[b][i]) continue;
          double d = 0;
          for (int64_t x = 0; x < hd; ++x) d += Q[b][h][i][x] * K[b][kh][j][x];
          s[j] = d * scale;
          mx = std::max(mx, s[j]);
        }
        if (mx == -INFINITY) continue;  // sees nothing: adds 0
        double z = 0;
        for (int64_t j = 0; j < n; ++j) z += std::exp(s[j] - mx);
        for (int64_t j = 0; j < n; ++j) {
          const double p = std::exp(s[j] - mx) / z;
          S1[b][h][j] += p;
          S2[b][h][j] += p * p;
          M[b][h][j] = std::max(M[b][h][j], p * RW[b][i]);
        }
      }
  return out;
}

// max |got - ref| over the statistics got has (sum, sumsq, max).
inline double window_error(const kvd::WindowColumns& got, const kvd::WindowColumns& ref) {
  double e = 0;
  if (got.sum.defined()) e = (got.sum.to(torch::kCPU).to(torch::kDouble) - ref.sum).abs().max().item<double>();
  if (got.max.defined())
    e = std::max(e, (got.max.to(torch::kCPU).to(torch::kDouble) - ref.max).abs().max().item<double>());
  if (got.sumsq.defined())
    e = std::max(e, (got.sumsq.to(torch::kCPU).to(torch::kDouble) - ref.sumsq).abs().max().item<double>());
  return e;
}

}  // namespace kvd_test
