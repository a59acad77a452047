// See kernels/soft_cache_size.h.
#include "kernels/soft_cache_size.h"

#include <torch/torch.h>

#include "common/error.h"

#ifdef KVD_WITH_RA_KERNEL
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/soft_cache_size.cuh"
#endif

namespace kvd {

bool soft_cache_size_fused_available(const at::Tensor& x) {
#ifdef KVD_WITH_RA_KERNEL
  return x.defined() && x.is_cuda();
#else
  (void)x;
  return false;
#endif
}

#ifdef KVD_WITH_RA_KERNEL
namespace {

// First and last row of each row's document: (B, T) int32 each.
std::pair<at::Tensor, at::Tensor> doc_ranges(const at::Tensor& doc_ids, int64_t B, int64_t T, c10::Device dev) {
  auto lopt = torch::TensorOptions().dtype(torch::kLong).device(dev);
  at::Tensor rows = torch::arange(T, lopt).view({1, T}).expand({B, T});  // (B, T)
  if (!doc_ids.defined())
    return {torch::zeros({B, T}, lopt.dtype(torch::kInt)), torch::full({B, T}, T - 1, lopt.dtype(torch::kInt))};
  at::Tensor d = doc_ids.to(dev, torch::kLong);
  at::Tensor first = torch::ones({B, 1}, lopt.dtype(torch::kBool));
  at::Tensor change = T > 1 ? d.narrow(1, 1, T - 1).ne(d.narrow(1, 0, T - 1)) : torch::empty({B, 0}, first.options());
  at::Tensor is_first = torch::cat({first, change}, 1);  // (B, T)
  at::Tensor is_last = torch::cat({change, first}, 1);   // (B, T)
  at::Tensor start = std::get<0>(torch::where(is_first, rows, torch::zeros_like(rows)).cummax(1));
  at::Tensor big = torch::full_like(rows, T - 1);
  at::Tensor end = std::get<0>(torch::where(is_last, rows, big).flip({1}).cummin(1)).flip({1});
  return {start.to(torch::kInt).contiguous(), end.to(torch::kInt).contiguous()};
}

void check_cuda(cudaError_t e, const char* who) { KVD_CHECK(e == cudaSuccess, who, ": CUDA error ", cudaGetErrorString(e)); }

struct SoftCacheSizeFusedFn : torch::autograd::Function<SoftCacheSizeFusedFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const std::optional<at::Tensor>& doc_ids) {
    const int64_t B = x.size(0), H = x.size(1), T = x.size(2);
    c10::cuda::CUDAGuard guard(x.device());
    at::Tensor xf = x.detach().to(torch::kFloat).contiguous();
    auto [start, end] = doc_ranges(doc_ids.value_or(at::Tensor()), B, T, x.device());
    at::Tensor out = at::empty({B, H, T}, xf.options());
    check_cuda(kernels::soft_cache_size_fwd(xf.data_ptr<float>(), start.data_ptr<int32_t>(), out.data_ptr<float>(),
                                            static_cast<int>(B), static_cast<int>(H), static_cast<int>(T),
                                            c10::cuda::getCurrentCUDAStream().stream()),
               "soft_cache_size_fused");
    ctx->save_for_backward({xf, end});
    ctx->saved_data["dtype"] = static_cast<int64_t>(x.scalar_type());
    return out;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list g) {
    auto s = ctx->get_saved_variables();
    const at::Tensor &xf = s[0], &end = s[1];
    const int64_t B = xf.size(0), H = xf.size(1), T = xf.size(2);
    c10::cuda::CUDAGuard guard(xf.device());
    at::Tensor dout = g[0].to(torch::kFloat).contiguous();
    at::Tensor dx = at::empty_like(xf);
    check_cuda(kernels::soft_cache_size_bwd(xf.data_ptr<float>(), dout.data_ptr<float>(), end.data_ptr<int32_t>(),
                                            dx.data_ptr<float>(), static_cast<int>(B), static_cast<int>(H),
                                            static_cast<int>(T), c10::cuda::getCurrentCUDAStream().stream()),
               "soft_cache_size_fused (backward)");
    const auto dt = static_cast<c10::ScalarType>(ctx->saved_data["dtype"].toInt());
    return {dx.to(dt), at::Tensor()};
  }
};

}  // namespace
#endif

at::Tensor soft_cache_size_fused(const at::Tensor& x, const at::Tensor& doc_ids) {
  KVD_CHECK(x.defined() && x.dim() == 3 && x.is_floating_point(), "soft_cache_size_fused: x must be (B, H, T) floating");
  KVD_CHECK(!doc_ids.defined() || (doc_ids.dim() == 2 && doc_ids.size(0) == x.size(0) && doc_ids.size(1) == x.size(2)),
            "soft_cache_size_fused: doc_ids must be (B=", x.size(0), ", T=", x.size(2), ")");
  KVD_CHECK(soft_cache_size_fused_available(x), "soft_cache_size_fused: needs a CUDA build and a CUDA tensor");
  KVD_CHECK(x.size(2) < (int64_t{1} << 24), "soft_cache_size_fused: T must be below 2^24");
#ifdef KVD_WITH_RA_KERNEL
  if (x.numel() == 0) return torch::zeros(x.sizes(), x.options().dtype(torch::kFloat));
  return SoftCacheSizeFusedFn::apply(x, doc_ids.defined() ? std::optional<at::Tensor>(doc_ids) : std::nullopt);
#else
  return at::Tensor();
#endif
}

}  // namespace kvd
