// See kernels/decode_attention.h.
#include "kernels/decode_attention.h"

#include <limits>

#include <torch/torch.h>

#include "common/error.h"

#ifdef KVD_WITH_RA_KERNEL
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/decode_attention.cuh"
#endif

namespace kvd {
namespace {

void check_input(const DecodeAttentionInput& in, const char* who) {
  KVD_CHECK(in.q.defined() && in.q.dim() == 3 && in.q.size(0) > 0, who, ": q must be (B, H, hd) with B > 0");
  KVD_CHECK(in.q.dim() == 3 && in.k.dim() == 2 && in.v.sizes() == in.k.sizes() && in.k.size(1) == in.q.size(2), who,
            ": q must be (B, H, hd) and k / v (rows, hd); got ", in.q.sizes(), ", ", in.k.sizes(), ", ", in.v.sizes());
  KVD_CHECK(in.start.dim() == 1 && in.len.sizes() == in.start.sizes() && in.start.size(0) > 0 &&
                in.start.size(0) % in.q.size(0) == 0 && in.q.size(1) % (in.start.size(0) / in.q.size(0)) == 0,
            who, ": start / len must be (B * H_kv) with H a multiple of H_kv; got ", in.start.sizes(), " for q ",
            in.q.sizes());
  KVD_CHECK(in.start.scalar_type() == torch::kLong && in.len.scalar_type() == torch::kLong, who,
            ": start / len must be int64");
  KVD_CHECK(in.max_len >= 0, who, ": max_len must be >= 0");
  if (in.window) {
    KVD_CHECK(*in.window > 0, who, ": the window must be positive");
    KVD_CHECK(in.kpos.defined() && in.qpos.defined() && in.kpos.dim() == 1 && in.kpos.size(0) == in.k.size(0) &&
                  in.qpos.numel() == in.q.size(0) && in.kpos.scalar_type() == torch::kLong &&
                  in.qpos.scalar_type() == torch::kLong,
              who, ": a window needs kpos (rows) and qpos (B), int64");
  }
  if (in.empty_slots == EmptySlots::NegativePosition)
    KVD_CHECK(in.kpos.defined() && in.kpos.dim() == 1 && in.kpos.size(0) == in.k.size(0) &&
                  in.kpos.scalar_type() == torch::kLong,
              who, ": EmptySlots::NegativePosition needs kpos (rows), int64");
}

}  // namespace

at::Tensor decode_attention_reference(const DecodeAttentionInput& in) {
  check_input(in, "decode_attention_reference");
  const int64_t B = in.q.size(0), H = in.q.size(1), hd = in.q.size(2), S = in.start.size(0), Hkv = S / B, G = H / Hkv;
  const int64_t n = std::max<int64_t>(in.max_len, 1);
  at::Tensor j = torch::arange(n, in.start.options()).view({1, n});                 // (1, n)
  at::Tensor rows = (in.start.view({S, 1}) + j).clamp(0, std::max<int64_t>(in.k.size(0) - 1, 0));  // (S, n)
  at::Tensor vis = j.lt(in.len.view({S, 1}));                                        // (S, n)
  if (in.window) {
    at::Tensor kp = in.kpos.index_select(0, rows.flatten()).view({B, Hkv, n});        // (B, H_kv, n)
    vis = vis.logical_and((in.qpos.view({B, 1, 1}) - kp).lt(*in.window).view({S, n}));
  }
  if (in.empty_slots == EmptySlots::NegativePosition)
    vis = vis.logical_and(in.kpos.index_select(0, rows.flatten()).view({S, n}).ge(0));
  const c10::ScalarType acc = in.q.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
  at::Tensor k = in.k.index_select(0, rows.flatten()).view({B, Hkv, n, hd}).to(acc);  // (B, H_kv, n, hd)
  at::Tensor v = in.v.index_select(0, rows.flatten()).view({B, Hkv, n, hd}).to(acc);  // (B, H_kv, n, hd)
  at::Tensor q = in.q.reshape({B, Hkv, G, hd}).to(acc);                                // (B, H_kv, G, hd)
  at::Tensor s = torch::matmul(q, k.transpose(2, 3)) * in.scale;                       // (B, H_kv, G, n)
  s = s.masked_fill(vis.view({B, Hkv, 1, n}).logical_not(), -std::numeric_limits<double>::infinity());
  at::Tensor p = torch::nan_to_num(torch::softmax(s, -1), 0.0, 0.0, 0.0);             // (B, H_kv, G, n): none seen -> 0
  return torch::matmul(p, v).reshape({B, H, hd}).to(in.q.scalar_type());              // (B, H, hd)
}

int decode_attention_default_splits(int64_t segments, int64_t max_len, int64_t hd, int64_t group) {
#ifdef KVD_WITH_RA_KERNEL
  return kernels::decode_attention_splits(static_cast<int>(segments), max_len, static_cast<int>(hd),
                                          static_cast<int>(group));
#else
  (void)segments, (void)max_len, (void)hd, (void)group;
  return 1;
#endif
}

bool decode_attention_fused_available(const DecodeAttentionInput& in) {
#ifdef KVD_WITH_RA_KERNEL
  if (!in.q.defined() || !in.q.is_cuda() || in.q.dim() != 3 || in.q.size(0) == 0 || in.start.dim() != 1 ||
      in.start.size(0) == 0 || !in.k.defined() || !in.v.defined())
    return false;
  const int64_t B = in.q.size(0), H = in.q.size(1), hd = in.q.size(2);
  if (in.start.size(0) % B != 0 || in.start.size(0) > 65535) return false;  // the grid's y dimension
  const int64_t Hkv = in.start.size(0) / B;
  auto aligned = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; };
  return in.q.scalar_type() == torch::kBFloat16 && in.k.scalar_type() == torch::kBFloat16 &&
         in.v.scalar_type() == torch::kBFloat16 && (hd == 64 || hd == 128) && H % Hkv == 0 &&
         H / Hkv <= kernels::kDecodeMaxGroup && in.k.is_contiguous() && in.v.is_contiguous() && aligned(in.k) &&
         aligned(in.v);
#else
  (void)in;
  return false;
#endif
}

at::Tensor decode_attention_fused(const DecodeAttentionInput& in) {
  const char* who = "decode_attention_fused";
  check_input(in, who);
  KVD_CHECK(decode_attention_fused_available(in), who,
            ": needs a CUDA build, bf16 CUDA tensors, head_dim 64 or 128 and H / H_kv <= 8; use "
            "decode_attention_reference otherwise");
#ifdef KVD_WITH_RA_KERNEL
  const int64_t B = in.q.size(0), H = in.q.size(1), hd = in.q.size(2), S = in.start.size(0);
  KVD_CHECK(in.k.is_contiguous() && in.v.is_contiguous() && in.start.is_cuda() && in.len.is_cuda() &&
                in.k.device() == in.q.device() && in.v.device() == in.q.device(),
            who, ": k / v must be contiguous and every tensor on q's device");
  KVD_CHECK(reinterpret_cast<uintptr_t>(in.k.data_ptr()) % 16 == 0 && reinterpret_cast<uintptr_t>(in.v.data_ptr()) % 16 == 0,
            who, ": k / v must be 16-byte aligned");
  c10::cuda::CUDAGuard guard(in.q.device());
  at::Tensor q = in.q.contiguous();
  if (reinterpret_cast<uintptr_t>(q.data_ptr()) % 16 != 0) q = q.clone();  // 16-byte loads
  at::Tensor start = in.start.contiguous(), len = in.len.contiguous();
  at::Tensor kpos, qpos;
  const bool holes = in.empty_slots == EmptySlots::NegativePosition;
  if (in.window || holes) kpos = in.kpos.contiguous();
  if (in.window) qpos = in.qpos.reshape({B}).contiguous();
  kernels::DecodeAttentionArgs a;
  a.B = static_cast<int>(B);
  a.H = static_cast<int>(H);
  a.Hkv = static_cast<int>(S / B);
  a.hd = static_cast<int>(hd);
  a.max_len = in.max_len;
  KVD_CHECK(in.splits >= 0, who, ": splits must be >= 0 (0: the kernel's choice)");
  a.splits = in.splits > 0 ? in.splits
                            : kernels::decode_attention_splits(static_cast<int>(S), in.max_len, a.hd, a.H / a.Hkv);
  KVD_CHECK(static_cast<int64_t>(a.splits) * S <= (int64_t{1} << 24), who, ": splits · segments must be <= 2^24, got ",
            a.splits, " · ", S);
  a.scale = static_cast<float>(in.scale);
  a.window = in.window ? *in.window : 0;
  at::Tensor part_o = at::empty({a.splits + 1, B * H, hd}, q.options().dtype(torch::kFloat));
  at::Tensor part_ml = at::empty({a.splits + 1, B * H, 2}, q.options().dtype(torch::kFloat));
  at::Tensor out = at::empty({B, H, hd}, q.options());
  a.q = reinterpret_cast<const uint16_t*>(q.data_ptr());
  a.k = reinterpret_cast<const uint16_t*>(in.k.data_ptr());
  a.v = reinterpret_cast<const uint16_t*>(in.v.data_ptr());
  a.start = start.data_ptr<int64_t>();
  a.len = len.data_ptr<int64_t>();
  a.kpos = kpos.defined() ? kpos.data_ptr<int64_t>() : nullptr;
  a.holes = holes ? 1 : 0;
  a.qpos = in.window ? qpos.data_ptr<int64_t>() : nullptr;
  a.part_o = part_o.data_ptr<float>();
  a.part_ml = part_ml.data_ptr<float>();
  a.out = reinterpret_cast<uint16_t*>(out.data_ptr());
  const cudaError_t e = kernels::decode_attention(a, c10::cuda::getCurrentCUDAStream().stream());
  KVD_CHECK(e == cudaSuccess, who, ": CUDA error ", cudaGetErrorString(e));
  return out;
#else
  return at::Tensor();
#endif
}

at::Tensor decode_attention(const DecodeAttentionInput& in) {
  return decode_attention_fused_available(in) ? decode_attention_fused(in) : decode_attention_reference(in);
}

}  // namespace kvd
