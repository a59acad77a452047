// See kernels/decode_step.h.
#include "kernels/decode_step.h"

#include <limits>

#include <torch/torch.h>

#include "common/error.h"

#ifdef KVD_WITH_RA_KERNEL
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/decode_step.cuh"
#endif

namespace kvd {
namespace {

#ifdef KVD_WITH_RA_KERNEL
const uint16_t* in_bits(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr()); }
uint16_t* out_bits(const at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr()); }
cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }
void check_launch(cudaError_t e, const char* who) {
  KVD_CHECK(e == cudaSuccess, who, ": CUDA error ", cudaGetErrorString(e));
}
bool same_device(std::initializer_list<at::Tensor> ts) {
  const at::Tensor& first = *ts.begin();
  for (const at::Tensor& t : ts)
    if (t.device() != first.device()) return false;
  return true;
}
#endif

}  // namespace

bool row_kernels_apply(std::initializer_list<at::Tensor> ts) {
#ifdef KVD_WITH_RA_KERNEL
  for (const at::Tensor& t : ts) {
    // A tensor that requires grad needs the training forms, unless grad mode is off (nothing is recorded then: the
    // forward of a checkpointed layer, say).
    if (!t.defined() || !t.is_cuda() || (t.requires_grad() && torch::GradMode::is_enabled())) return false;
    if (t.scalar_type() != torch::kBFloat16 && t.scalar_type() != torch::kLong) return false;
  }
  return ts.size() > 0 && same_device(ts);
#else
  (void)ts;
  return false;
#endif
}

// ---- RMSNorm --------------------------------------------------------------------------------------------------

namespace {

at::Tensor rms_norm_reference(const at::Tensor& x, const at::Tensor& w, double eps) {  // (..., n), (n)
  at::Tensor xf = x.to(c10::promoteTypes(x.scalar_type(), torch::kFloat));              // (..., n)
  at::Tensor r = torch::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps);              // (..., 1)
  return w * (xf * r).to(x.scalar_type());                                              // (..., n)
}

// Dense with a unit last stride: the rows of n lie one after another in memory, in some order.
bool dense_rows(const at::Tensor& x) { return x.dim() >= 1 && x.stride(-1) == 1 && x.is_non_overlapping_and_dense(); }

#ifdef KVD_WITH_RA_KERNEL
void launch_rms_norm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& w, double eps,
                     const at::Tensor& sum, const at::Tensor& y) {
  c10::cuda::CUDAGuard guard(x.device());
  kernels::RmsNormArgs a;
  a.x = in_bits(x);
  a.residual = residual.defined() ? in_bits(residual) : nullptr;
  a.w = in_bits(w);
  a.sum = sum.defined() ? out_bits(sum) : nullptr;
  a.y = out_bits(y);
  a.n = static_cast<int>(x.size(-1));
  a.rows = x.numel() / x.size(-1);
  a.eps = static_cast<float>(eps);
  check_launch(kernels::rms_norm(a, stream_of(x)), "rms_norm");
}

// Training: the forward kernel, and the gradient to x by kernels::rms_norm_bwd (w is frozen: no gradient).
struct RmsNormFn : public torch::autograd::Function<RmsNormFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            double eps) {
    at::Tensor xd = x.detach();  // (..., n) contiguous
    at::Tensor y = at::empty_like(xd);
    launch_rms_norm(xd, at::Tensor(), w, eps, at::Tensor(), y);
    ctx->save_for_backward({xd, w});
    ctx->saved_data["eps"] = eps;
    return y;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list g) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1];
    at::Tensor dy = g[0].to(x.scalar_type()).contiguous();  // (..., n)
    at::Tensor dx = at::empty_like(x);
    c10::cuda::CUDAGuard guard(x.device());
    kernels::RmsNormBwdArgs a;
    a.x = in_bits(x);
    a.w = in_bits(w);
    a.dy = in_bits(dy);
    a.dx = out_bits(dx);
    a.n = static_cast<int>(x.size(-1));
    a.rows = x.numel() / x.size(-1);
    a.eps = static_cast<float>(ctx->saved_data["eps"].toDouble());
    check_launch(kernels::rms_norm_bwd(a, stream_of(x)), "rms_norm (backward)");
    return {dx, at::Tensor(), at::Tensor()};
  }
};

// Whether the training kernels apply: x (CUDA bf16, contiguous) needs a gradient under grad mode, w (CUDA bf16,
// contiguous) does not.
bool rms_norm_grad_kernels_apply(const at::Tensor& x, const at::Tensor& w) {
  return torch::GradMode::is_enabled() && x.requires_grad() && !w.requires_grad() && x.numel() > 0 && x.is_cuda() &&
         w.is_cuda() && x.device() == w.device() && x.scalar_type() == torch::kBFloat16 &&
         w.scalar_type() == torch::kBFloat16 && x.is_contiguous() && w.is_contiguous() &&
         x.size(-1) <= std::numeric_limits<int>::max();
}

#endif

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps, KernelPath path) {
  KVD_CHECK(x.dim() >= 1 && w.dim() == 1 && w.size(0) == x.size(-1), "rms_norm: x must be (..., n) and w (n); got ",
            x.sizes(), " and ", w.sizes());
#ifdef KVD_WITH_RA_KERNEL
  if (path == KernelPath::Fused && x.numel() > 0 && row_kernels_apply({x, w}) && dense_rows(x) && w.is_contiguous() &&
      x.size(-1) <= std::numeric_limits<int>::max()) {
    at::Tensor y = at::empty_like(x);  // x's strides (dense): the same rows in the same memory order
    launch_rms_norm(x, at::Tensor(), w, eps, at::Tensor(), y);
    return y;
  }
  if (path == KernelPath::Fused && rms_norm_grad_kernels_apply(x, w)) return RmsNormFn::apply(x, w, eps);
#endif
  (void)path;
  return rms_norm_reference(x, w, eps);
}

AddRmsNorm add_rms_norm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& w, double eps,
                        KernelPath path) {
  KVD_CHECK(x.sizes() == residual.sizes(), "add_rms_norm: x ", x.sizes(), " and residual ", residual.sizes(),
            " must have one shape");
#ifdef KVD_WITH_RA_KERNEL
  if (path == KernelPath::Fused && x.numel() > 0 && row_kernels_apply({x, residual, w}) && x.is_contiguous() &&
      residual.is_contiguous() && w.is_contiguous() && w.dim() == 1 && w.size(0) == x.size(-1)) {
    AddRmsNorm out{at::empty_like(x), at::empty_like(x)};
    launch_rms_norm(x, residual, w, eps, out.sum, out.normed);
    return out;
  }
#endif
  AddRmsNorm out;
  out.sum = x + residual;
  out.normed = rms_norm(out.sum, w, eps, path);  // Fused: the training kernels where a gradient is needed
  return out;
}

// ---- RoPE -----------------------------------------------------------------------------------------------------

namespace {

// x * cos + rotate_half(x) * sin with the HF half-split layout.
at::Tensor rope_reference(const at::Tensor& x,    // (B, H, S, hd)
                          const at::Tensor& cos,  // (B, 1, S, hd)
                          const at::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  at::Tensor x1 = x.narrow(-1, 0, half);       // (B, H, S, hd/2)
  at::Tensor x2 = x.narrow(-1, half, half);    // (B, H, S, hd/2)
  at::Tensor rot = torch::cat({-x2, x1}, -1);  // (B, H, S, hd)
  return x * cos + rot * sin;
}

// (B, heads, S, hd) whose memory is (B, S, heads, hd), as a projection's output viewed and transposed.
bool token_major(const at::Tensor& x) { return x.dim() == 4 && x.transpose(1, 2).is_contiguous(); }

#ifdef KVD_WITH_RA_KERNEL
// The rope kernel over token-major q (B, H, S, hd) and k (B, H_kv, S, hd); returns both outputs as the buffers
// (B, S, H, hd) and (B, S, H_kv, hd).
std::pair<at::Tensor, at::Tensor> launch_rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                              const at::Tensor& sin, kernels::RopePass pass) {
  const int64_t B = q.size(0), H = q.size(1), Hkv = k.size(1), S = q.size(2), hd = q.size(3);
  c10::cuda::CUDAGuard guard(q.device());
  at::Tensor qo = at::empty({B, S, H, hd}, q.options()), ko = at::empty({B, S, Hkv, hd}, k.options());
  kernels::RopeArgs a;
  a.pass = pass;
  a.q = in_bits(q);
  a.k = in_bits(k);
  a.cos = in_bits(cos);
  a.sin = in_bits(sin);
  a.q_out = out_bits(qo);
  a.k_out = out_bits(ko);
  a.tokens = B * S;
  a.H = static_cast<int>(H);
  a.Hkv = static_cast<int>(Hkv);
  a.hd = static_cast<int>(hd);
  check_launch(kernels::rope(a, stream_of(q)), pass == kernels::RopePass::Forward ? "rope" : "rope (backward)");
  return {qo, ko};
}

// Training: the forward kernel, and the gradients to q and k by the same kernel's transposed pass (cos / sin are
// not trained). Its outputs are the token-major buffers (B, S, heads, hd) themselves; the caller transposes them.
struct RopeFn : public torch::autograd::Function<RopeFn> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& q,
                                                const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin) {
    ctx->save_for_backward({cos, sin});
    auto [qo, ko] = launch_rope(q.detach(), k.detach(), cos, sin, kernels::RopePass::Forward);
    ctx->saved_data["q_shape"] = qo.sizes().vec();
    ctx->saved_data["k_shape"] = ko.sizes().vec();
    return {qo, ko};
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list g) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& cos = saved[0];
    const at::Tensor& sin = saved[1];
    // (B, S, heads, hd) contiguous; an output that received no gradient contributes zeros.
    auto grad_of = [&](const at::Tensor& dy, const char* shape) {
      return dy.defined() ? dy.to(cos.scalar_type()).contiguous()
                          : at::zeros(ctx->saved_data[shape].toIntVector(), cos.options());
    };
    const at::Tensor dq = grad_of(g[0], "q_shape"), dk = grad_of(g[1], "k_shape");
    auto [gq, gk] = launch_rope(dq.transpose(1, 2), dk.transpose(1, 2), cos, sin, kernels::RopePass::Backward);
    return {gq.transpose(1, 2), gk.transpose(1, 2), at::Tensor(), at::Tensor()};  // q's and k's shapes and layouts
  }
};
#endif

}  // namespace

std::pair<at::Tensor, at::Tensor> rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                       const at::Tensor& sin, KernelPath path) {
  KVD_CHECK(q.dim() == 4 && k.dim() == 4 && q.size(0) == k.size(0) && q.size(2) == k.size(2) && q.size(3) == k.size(3) &&
                q.size(3) % 2 == 0,
            "rope: q must be (B, H, S, hd) and k (B, H_kv, S, hd) with an even hd; got ", q.sizes(), " and ", k.sizes());
  KVD_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 4 && cos.size(1) == 1 && cos.size(2) == q.size(2) &&
                cos.size(3) == q.size(3) && (cos.size(0) == q.size(0) || cos.size(0) == 1),
            "rope: cos / sin must be (B, 1, S, hd); got ", cos.sizes(), " for q ", q.sizes());
#ifdef KVD_WITH_RA_KERNEL
  const int64_t B = q.size(0), H = q.size(1), Hkv = k.size(1), hd = q.size(3);
  const bool shapes = path == KernelPath::Fused && q.numel() > 0 && token_major(q) && token_major(k) &&
                      cos.is_contiguous() && sin.is_contiguous() && cos.size(0) == B && hd <= 2048 && H + Hkv <= 65535;
  if (shapes && row_kernels_apply({q, k, cos, sin})) {
    auto [qo, ko] = launch_rope(q, k, cos, sin, kernels::RopePass::Forward);
    return {qo.transpose(1, 2), ko.transpose(1, 2)};  // (B, H, S, hd), (B, H_kv, S, hd)
  }
  // Training: q or k needs a gradient (cos / sin do not).
  if (shapes && torch::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad()) &&
      row_kernels_apply({q.detach(), k.detach(), cos, sin})) {
    const torch::autograd::variable_list out = RopeFn::apply(q, k, cos, sin);  // (B, S, heads, hd)
    return {out[0].transpose(1, 2), out[1].transpose(1, 2)};                    // (B, H, S, hd), (B, H_kv, S, hd)
  }
#endif
  (void)path;
  return {rope_reference(q, cos, sin), rope_reference(k, cos, sin)};
}

// ---- SiLU · up ------------------------------------------------------------------------------------------------

namespace {

#ifdef KVD_WITH_RA_KERNEL
at::Tensor launch_silu_mul(const at::Tensor& g, const at::Tensor& u) {  // contiguous, one shape
  c10::cuda::CUDAGuard guard(g.device());
  at::Tensor out = at::empty_like(g);
  kernels::SiluMulArgs a;
  a.g = in_bits(g);
  a.u = in_bits(u);
  a.out = out_bits(out);
  a.n = g.numel();
  check_launch(kernels::silu_mul(a, stream_of(g)), "silu_mul");
  return out;
}

// Training: the forward kernel, and both gradients by kernels::silu_mul_bwd (saves g and u only; LibTorch's chain
// also keeps silu(g)).
struct SiluMulFn : public torch::autograd::Function<SiluMulFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& g, const at::Tensor& u) {
    at::Tensor gd = g.detach(), ud = u.detach();
    ctx->save_for_backward({gd, ud});
    return launch_silu_mul(gd, ud);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &g = saved[0], &u = saved[1];
    const at::Tensor dy = grads[0].to(g.scalar_type()).contiguous();  // (n)
    at::Tensor dg = at::empty_like(g), du = at::empty_like(u);
    c10::cuda::CUDAGuard guard(g.device());
    kernels::SiluMulBwdArgs a;
    a.g = in_bits(g);
    a.u = in_bits(u);
    a.dy = in_bits(dy);
    a.dg = out_bits(dg);
    a.du = out_bits(du);
    a.n = g.numel();
    check_launch(kernels::silu_mul_bwd(a, stream_of(g)), "silu_mul (backward)");
    return {dg, du};
  }
};
#endif

}  // namespace

at::Tensor silu_mul(const at::Tensor& g, const at::Tensor& u, KernelPath path) {
#ifdef KVD_WITH_RA_KERNEL
  const bool shapes = path == KernelPath::Fused && g.numel() > 0 && g.sizes() == u.sizes() && g.is_contiguous() &&
                      u.is_contiguous();
  if (shapes && row_kernels_apply({g, u})) return launch_silu_mul(g, u);
  if (shapes && torch::GradMode::is_enabled() && (g.requires_grad() || u.requires_grad()) &&
      row_kernels_apply({g.detach(), u.detach()}))
    return SiluMulFn::apply(g, u);
#endif
  (void)path;
  return torch::silu(g) * u;
}

// ---- the decode step's append -----------------------------------------------------------------------------------

void decode_append(const DecodeAppend& a, KernelPath path) {
  KVD_CHECK(a.k.dim() == 3 && a.v.sizes() == a.k.sizes() && a.qpos.numel() == a.k.size(0) &&
                a.start.numel() == a.k.size(0) * a.k.size(1) && a.len.sizes() == a.start.sizes() &&
                a.k_store.dim() == 2 && a.k_store.size(1) == a.k.size(2) && a.v_store.sizes() == a.k_store.sizes() &&
                a.pos_store.dim() == 1 && a.pos_store.size(0) == a.k_store.size(0),
            "decode_append: expected k / v (B, H_kv, hd), qpos (B), start / len (B * H_kv), stores (rows, hd) and "
            "positions (rows); got k ",
            a.k.sizes(), ", start ", a.start.sizes(), ", k_store ", a.k_store.sizes());
  const int64_t B = a.k.size(0), Hkv = a.k.size(1), hd = a.k.size(2);
#ifdef KVD_WITH_RA_KERNEL
  if (path == KernelPath::Fused && B > 0 && row_kernels_apply({a.k, a.v, a.qpos, a.start, a.len, a.k_store, a.v_store,
                                                                a.pos_store}) &&
      a.k.scalar_type() == torch::kBFloat16 && a.v.scalar_type() == torch::kBFloat16 &&
      a.k_store.scalar_type() == torch::kBFloat16 && a.v_store.scalar_type() == torch::kBFloat16 && a.qpos.scalar_type() == torch::kLong &&
      a.start.scalar_type() == torch::kLong && a.len.scalar_type() == torch::kLong &&
      a.pos_store.scalar_type() == torch::kLong && a.k.is_contiguous() && a.v.is_contiguous() &&
      a.qpos.is_contiguous() && a.start.is_contiguous() && a.len.is_contiguous() && a.k_store.is_contiguous() &&
      a.v_store.is_contiguous() && a.pos_store.is_contiguous() && hd <= 1024) {
    c10::cuda::CUDAGuard guard(a.k.device());
    kernels::DecodeAppendArgs args;
    args.k = in_bits(a.k);
    args.v = in_bits(a.v);
    args.qpos = a.qpos.data_ptr<int64_t>();
    args.start = a.start.data_ptr<int64_t>();
    args.len = a.len.data_ptr<int64_t>();
    args.k_store = out_bits(a.k_store);
    args.v_store = out_bits(a.v_store);
    args.pos_store = a.pos_store.data_ptr<int64_t>();
    args.B = static_cast<int>(B);
    args.Hkv = static_cast<int>(Hkv);
    args.hd = static_cast<int>(hd);
    check_launch(kernels::decode_append(args, stream_of(a.k)), "decode_append");
    return;
  }
#endif
  (void)path;
  const at::Tensor row = a.start + a.len;  // (B * H_kv)
  a.k_store.index_copy_(0, row, a.k.reshape({B * Hkv, hd}).to(a.k_store.scalar_type()));
  a.v_store.index_copy_(0, row, a.v.reshape({B * Hkv, hd}).to(a.v_store.scalar_type()));
  a.pos_store.index_copy_(0, row, a.qpos.reshape({B, 1}).expand({B, Hkv}).reshape({B * Hkv}));
  a.len.add_(1);
}

}  // namespace kvd
