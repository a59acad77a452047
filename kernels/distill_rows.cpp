// See kernels/distill_rows.h.
#include "kernels/distill_rows.h"

#include <torch/torch.h>

#include "common/error.h"

#ifdef KVD_WITH_RA_KERNEL
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/distill_rows.cuh"
#endif

namespace kvd {

bool distill_rows_fused_available(const at::Tensor& logits) {
#ifdef KVD_WITH_RA_KERNEL
  return logits.defined() && logits.is_cuda() &&
         (logits.scalar_type() == torch::kBFloat16 || logits.scalar_type() == torch::kFloat);
#else
  (void)logits;
  return false;
#endif
}

DistillRows distill_rows_fused(const at::Tensor& teacher_logits, const at::Tensor& student_logits,
                               const at::Tensor& targets, RowGrads grads) {
  const at::Tensor &zt = teacher_logits, &zs = student_logits;
  KVD_CHECK(zt.defined() && zs.defined() && zt.dim() == 2 && zt.sizes() == zs.sizes(),
            "distill_rows_fused: teacher and student logits must both be (n, V); got ",
            zt.defined() ? zt.sizes() : at::IntArrayRef{}, " and ", zs.defined() ? zs.sizes() : at::IntArrayRef{});
  KVD_CHECK(zt.scalar_type() == zs.scalar_type() && zt.device() == zs.device(),
            "distill_rows_fused: teacher and student logits must share dtype and device");
  KVD_CHECK(distill_rows_fused_available(zs),
            "distill_rows_fused: needs a CUDA build and bf16 or float32 CUDA logits; use the LibTorch path "
            "(train.kernels: reference) otherwise");
  const int64_t n = zs.size(0), V = zs.size(1);
  KVD_CHECK(targets.defined() && targets.dim() == 1 && targets.size(0) == n && !targets.is_floating_point(),
            "distill_rows_fused: targets must be (n=", n, ") integer");
  KVD_CHECK(V > 0 && V < (int64_t{1} << 31) && n < (int64_t{1} << 31), "distill_rows_fused: sizes out of range: ",
            zs.sizes());
  DistillRows out;
#ifdef KVD_WITH_RA_KERNEL
  c10::cuda::CUDAGuard guard(zs.device());
  const auto rows_ok = [&](const at::Tensor& x) { return x.stride(1) == 1 && (n < 2 || x.stride(0) >= V); };
  const at::Tensor t = rows_ok(zt) ? zt : zt.contiguous();  // (n, V)
  const at::Tensor s = rows_ok(zs) ? zs : zs.contiguous();  // (n, V)
  const at::Tensor tg = targets.to(zs.device(), torch::kLong).contiguous();
  auto f32 = zs.options().dtype(torch::kFloat);
  out.kl = at::empty({n}, f32);
  out.ce = at::empty({n}, f32);
  if (grads == RowGrads::Yes) {
    out.dkl = at::empty({n, V}, zs.options().memory_format(at::MemoryFormat::Contiguous));
    out.dce = at::empty({n, V}, zs.options().memory_format(at::MemoryFormat::Contiguous));
  }
  const cudaError_t e = kernels::distill_rows(
      t.data_ptr(), s.data_ptr(),
      zs.scalar_type() == torch::kBFloat16 ? kernels::LogitsDtype::Bf16 : kernels::LogitsDtype::F32,
      tg.data_ptr<int64_t>(), static_cast<int>(n), static_cast<int>(V), n > 1 ? t.stride(0) : V,
      n > 1 ? s.stride(0) : V, out.kl.data_ptr<float>(), out.ce.data_ptr<float>(),
      out.dkl.defined() ? out.dkl.data_ptr() : nullptr, out.dce.defined() ? out.dce.data_ptr() : nullptr,
      c10::cuda::getCurrentCUDAStream().stream());
  KVD_CHECK(e == cudaSuccess, "distill_rows_fused: CUDA error ", cudaGetErrorString(e));
#else
  (void)grads;
#endif
  return out;
}

}  // namespace kvd
