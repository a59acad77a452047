// See kernels/window_scores.h.
#include "kernels/window_scores.h"

#include <cmath>

#include <torch/torch.h>

#include "common/error.h"

#ifdef KVD_WITH_RA_KERNEL
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/window_scores.cuh"
#endif

namespace kvd {

bool window_scores_fused_available(const WindowScoresInput& in) {
#ifdef KVD_WITH_RA_KERNEL
  const at::Tensor &q = in.q, &k = in.k;
  if (!q.defined() || !k.defined() || !q.is_cuda() || q.dim() != 4 || k.dim() != 4 || q.size(0) != k.size(0) ||
      q.size(3) != k.size(3) || k.size(1) == 0 || q.size(1) % k.size(1) != 0 || q.size(2) == 0 || k.size(2) == 0)
    return false;
  const int64_t hd = q.size(3), G = q.size(1) / k.size(1);
  return q.scalar_type() == torch::kBFloat16 && k.scalar_type() == torch::kBFloat16 && (hd == 64 || hd == 128) &&
         G <= kernels::kWindowMaxGroup && k.device() == q.device() && k.stride(3) == 1 && k.stride(2) == hd &&
         k.stride(0) % 8 == 0 && k.stride(1) % 8 == 0 && reinterpret_cast<uintptr_t>(k.data_ptr()) % 16 == 0 &&
         k.size(0) * k.size(1) <= 65535;
#else
  (void)in;
  return false;
#endif
}

WindowColumns window_columns_fused(const WindowScoresInput& in, WindowMoments moments) {
  const char* who = "window_columns_fused";
  KVD_CHECK(window_scores_fused_available(in), who,
            ": needs a CUDA build, bf16 CUDA q (B, H, w, hd) and k (B, H_kv, n, hd) with hd 64 or 128, H / H_kv <= 16 "
            "and k's rows contiguous; use gates/heuristics.h's window_columns, which falls back to the reference");
#ifdef KVD_WITH_RA_KERNEL
  const int64_t B = in.q.size(0), H = in.q.size(1), w = in.q.size(2), hd = in.q.size(3);
  const int64_t Hkv = in.k.size(1), n = in.k.size(2);
  KVD_CHECK(in.q_pos.defined() && in.q_pos.sizes() == at::IntArrayRef({B, w}) && in.q_pos.scalar_type() == torch::kLong,
            who, ": q_pos must be (B, w) int64, got ", in.q_pos.sizes());
  KVD_CHECK(in.k_pos.defined() && in.k_pos.sizes() == at::IntArrayRef({B, Hkv, n}) &&
                in.k_pos.scalar_type() == torch::kLong && in.k_pos.stride(2) == 1 && in.k_pos.device() == in.q.device(),
            who, ": k_pos must be (B, H_kv, n) int64 on q's device with unit stride over n, got ", in.k_pos.sizes());
  KVD_CHECK(!in.valid.defined() || (in.valid.sizes() == in.k_pos.sizes() && in.valid.scalar_type() == torch::kBool &&
                                    in.valid.stride(2) == 1 && in.valid.device() == in.q.device()),
            who, ": valid must be (B, H_kv, n) bool on q's device with unit stride over n");
  c10::cuda::CUDAGuard guard(in.q.device());
  at::Tensor q = in.q.contiguous();
  if (reinterpret_cast<uintptr_t>(q.data_ptr()) % 16 != 0) q = q.clone();  // 16-byte loads
  at::Tensor qpos = in.q_pos.to(q.device()).contiguous();
  const at::Tensor& kpos = in.k_pos;
  kernels::WindowScoresArgs a;
  a.B = static_cast<int>(B), a.H = static_cast<int>(H), a.Hkv = static_cast<int>(Hkv), a.hd = static_cast<int>(hd);
  a.w = static_cast<int>(w), a.n = n;
  a.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
  a.chunks = kernels::window_scores_chunks(a.B, a.H, a.Hkv, a.w, n);
  const auto f32 = q.options().dtype(torch::kFloat);
  at::Tensor part_ml = at::empty({a.chunks, B * H * w, 2}, f32), row_ml = at::empty({B * H * w, 2}, f32);
  const bool max_mode = moments == WindowMoments::Max || moments == WindowMoments::MaxAndPlain;
  at::Tensor row_w;
  if (in.row_weight.defined()) {
    KVD_CHECK(max_mode, who, ": row_weight applies to WindowMoments::Max and MaxAndPlain only");
    KVD_CHECK(in.row_weight.sizes() == at::IntArrayRef({B, w}), who, ": row_weight must be (B, w), got ",
              in.row_weight.sizes());
    row_w = in.row_weight.to(q.device(), torch::kFloat).contiguous();
  }
  WindowColumns out;
  (max_mode ? out.max : out.sum) = at::empty({B, H, n}, f32);
  if (moments == WindowMoments::SumAndSquares) out.sumsq = at::empty({B, H, n}, f32);
  if (moments == WindowMoments::MaxAndPlain) out.max_plain = at::empty({B, H, n}, f32);
  a.q = reinterpret_cast<const uint16_t*>(q.data_ptr());
  a.k = reinterpret_cast<const uint16_t*>(in.k.data_ptr());
  a.k_sb = in.k.stride(0), a.k_sh = in.k.stride(1);
  a.qpos = qpos.data_ptr<int64_t>();
  a.kpos = kpos.data_ptr<int64_t>();
  a.p_sb = kpos.stride(0), a.p_sh = kpos.stride(1);
  if (in.valid.defined()) {
    a.valid = in.valid.data_ptr<bool>();
    a.v_sb = in.valid.stride(0), a.v_sh = in.valid.stride(1);
  }
  a.part_ml = part_ml.data_ptr<float>();
  a.row_ml = row_ml.data_ptr<float>();
  a.sum = max_mode ? out.max.data_ptr<float>() : out.sum.data_ptr<float>();
  a.sumsq = out.sumsq.defined() ? out.sumsq.data_ptr<float>() : nullptr;
  a.max_mode = max_mode ? 1 : 0;
  a.max_plain = out.max_plain.defined() ? out.max_plain.data_ptr<float>() : nullptr;
  a.row_w = row_w.defined() ? row_w.data_ptr<float>() : nullptr;
  const cudaError_t e = kernels::window_scores(a, c10::cuda::getCurrentCUDAStream().stream());
  KVD_CHECK(e == cudaSuccess, who, ": CUDA error ", cudaGetErrorString(e));
  return out;
#else
  (void)moments;
  return {};
#endif
}

}  // namespace kvd
