// The binding of the fused retention-biased attention: checks, dispatch, autograd, and the explicit reference.
// See kernels/retention_attention.h.
#include "kernels/retention_attention.h"

#include <cstdlib>
#include <limits>
#include <string>

#include <torch/torch.h>

#include "common/error.h"

#ifdef KVD_WITH_RA_KERNEL
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/retention_attention.cuh"
#endif

namespace kvd {
namespace {

struct Dims {
  int64_t B = 0, H = 0, Hkv = 0, S = 0, D = 0;
};

// Shapes and dtypes shared by every entry point; throws with context.
Dims check_args(const char* who, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const at::Tensor& positions, const at::Tensor& doc_ids, const at::Tensor& key_rate,
                const at::Tensor& key_log_mask, std::optional<int64_t> window) {
  KVD_CHECK(q.defined() && k.defined() && v.defined() && positions.defined(), who,
            ": q, k, v and positions are required");
  KVD_CHECK(q.dim() == 4, who, ": q must be (B, H, S, D), got ", q.sizes());
  Dims d{q.size(0), q.size(1), k.dim() == 4 ? k.size(1) : 0, q.size(2), q.size(3)};
  KVD_CHECK(k.dim() == 4 && k.size(0) == d.B && k.size(2) == d.S && k.size(3) == d.D, who,
            ": k must be (B=", d.B, ", H_kv, S=", d.S, ", D=", d.D, "), got ", k.sizes());
  KVD_CHECK(v.sizes() == k.sizes(), who, ": v must have k's shape ", k.sizes(), ", got ", v.sizes());
  KVD_CHECK(d.Hkv > 0 && d.H % d.Hkv == 0, who, ": H = ", d.H, " must be a multiple of H_kv = ", d.Hkv);
  KVD_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type() && q.is_floating_point(), who,
            ": q, k, v must share one floating dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
            v.scalar_type());
  KVD_CHECK(q.device() == k.device() && q.device() == v.device(), who, ": q, k, v must be on one device");
  KVD_CHECK(positions.dim() == 2 && positions.size(0) == d.B && positions.size(1) == d.S &&
                (positions.scalar_type() == at::kLong || positions.scalar_type() == at::kInt),
            who, ": positions must be (B=", d.B, ", S=", d.S, ") int32 or int64, got ", positions.sizes(), " ",
            positions.scalar_type());
  if (doc_ids.defined())
    KVD_CHECK(doc_ids.dim() == 2 && doc_ids.size(0) == d.B && doc_ids.size(1) == d.S &&
                  !doc_ids.is_floating_point(),
              who, ": doc_ids must be (B=", d.B, ", S=", d.S, ") integers, got ", doc_ids.sizes(), " ",
              doc_ids.scalar_type());
  for (const auto& [t, name] : {std::pair{&key_rate, "key_rate"}, std::pair{&key_log_mask, "key_log_mask"}}) {
    if (!t->defined()) continue;
    KVD_CHECK(t->dim() == 3 && t->size(0) == d.B && t->size(1) == d.Hkv && t->size(2) == d.S &&
                  t->is_floating_point(),
              who, ": ", name, " must be (B=", d.B, ", H_kv=", d.Hkv, ", S=", d.S, ") floating, got ", t->sizes(),
              " ", t->scalar_type());
    KVD_CHECK(t->device() == q.device(), who, ": ", name, " must be on q's device ", q.device());
  }
  KVD_CHECK(!window || *window >= 1, who, ": the sliding window must be >= 1, got ", window ? *window : 0);
  return d;
}

}  // namespace

// --- the explicit reference ---------------------------------------------------------------------------------

at::Tensor retention_attention_reference(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                         const at::Tensor& positions, const at::Tensor& doc_ids,
                                         const at::Tensor& key_rate, const at::Tensor& key_log_mask,
                                         std::optional<int64_t> window, double scale, c10::ScalarType acc,
                                         int64_t mask_delay) {
  const Dims d = check_args("retention_attention_reference", q, k, v, positions, doc_ids, key_rate, key_log_mask,
                            window);
  KVD_CHECK(mask_delay >= 0, "retention_attention_reference: mask_delay must be >= 0, got ", mask_delay);
  const int64_t B = d.B, H = d.H, Hkv = d.Hkv, S = d.S, D = d.D, G = H / Hkv;
  auto lopt = torch::TensorOptions().dtype(torch::kLong).device(q.device());
  at::Tensor pos = positions.to(q.device(), torch::kLong);              // (B, S)
  at::Tensor rows = torch::arange(S, lopt);                              // (S)
  at::Tensor vis = rows.view({1, 1, S}).le(rows.view({1, S, 1})).expand({B, S, S});  // (B, Sq, Sk)
  at::Tensor dpos = pos.unsqueeze(2) - pos.unsqueeze(1);                 // (B, Sq, Sk) pos_i - pos_j
  if (doc_ids.defined()) {
    at::Tensor doc = doc_ids.to(q.device(), torch::kLong);
    vis = vis.logical_and(doc.unsqueeze(2).eq(doc.unsqueeze(1)));
  }
  if (window) vis = vis.logical_and(dpos.lt(*window));
  at::Tensor bias = torch::zeros({B, 1, S, S}, q.options().dtype(acc));  // (B, 1|H_kv, Sq, Sk)
  if (key_rate.defined()) {
    at::Tensor age = dpos.clamp_min(0).to(acc);  // future keys (masked anyway) get age 0: no inf · 0
    bias = bias + age.unsqueeze(1) * key_rate.to(acc).unsqueeze(2);
  }
  if (key_log_mask.defined()) {
    // Unmasked: a row's own key (delay 0), or every key at most mask_delay positions back.
    at::Tensor keep = mask_delay > 0 ? dpos.le(mask_delay).unsqueeze(1)                          // (B, 1, Sq, Sk)
                                     : rows.view({1, 1, S, 1}).eq(rows.view({1, 1, 1, S}));     // (1, 1, Sq, Sk)
    at::Tensor lm = key_log_mask.to(acc).unsqueeze(2);                       // (B, H_kv, 1, Sk)
    bias = bias + torch::where(keep, torch::zeros_like(lm), lm);
  }
  bias = bias.masked_fill(vis.logical_not().unsqueeze(1), -std::numeric_limits<double>::infinity());
  at::Tensor qg = q.to(acc).reshape({B, Hkv, G, S, D});                 // (B, H_kv, G, S, D)
  at::Tensor kt = k.to(acc).unsqueeze(2).transpose(-1, -2);             // (B, H_kv, 1, D, S)
  at::Tensor scores = torch::matmul(qg, kt) * scale + bias.unsqueeze(2);  // (B, H_kv, G, S, S)
  at::Tensor p = torch::softmax(scores, -1);
  return torch::matmul(p, v.to(acc).unsqueeze(2)).reshape({B, H, S, D});  // (B, H, S, D)
}

// --- the fused kernel ---------------------------------------------------------------------------------------

bool retention_attention_fused_available(const at::Tensor& q, const at::Tensor& k) {
#ifdef KVD_WITH_RA_KERNEL
  return q.defined() && k.defined() && q.is_cuda() && k.is_cuda() && q.scalar_type() == at::kBFloat16 &&
         k.scalar_type() == at::kBFloat16 && q.dim() == 4 && (q.size(3) == 64 || q.size(3) == 128);
#else
  (void)q;
  (void)k;
  return false;
#endif
}

#ifdef KVD_WITH_RA_KERNEL
namespace {

// The kernel reads 16-byte chunks: a contiguous head dim, strides in multiples of 8 elements, aligned data.
at::Tensor kernel_layout(const at::Tensor& t) {
  bool ok = t.stride(-1) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t i = 0; i + 1 < t.dim(); ++i) ok = ok && (t.stride(i) % 8 == 0 || t.size(i) == 1);
  return ok ? t : t.contiguous();
}

// An output with t's layout when that layout suits the kernel (e.g. q as a transposed (B, S, H, D) view).
at::Tensor kernel_empty_like(const at::Tensor& t) {
  at::Tensor e = at::empty_like(t);
  return kernel_layout(e).data_ptr() == e.data_ptr() ? e : at::empty(t.sizes(), t.options());
}

struct Prepared {
  Dims d;
  at::Tensor q, k, v, pos, doc, rate, mask;
  at::Tensor row_blocks;  // (B, ceil(S / 32), 4) int32 workspace when doc ids or a window are set
};

Prepared prepare(const char* who, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const at::Tensor& positions, const at::Tensor& doc_ids, const at::Tensor& key_rate,
                 const at::Tensor& key_log_mask, std::optional<int64_t> window) {
  Prepared p;
  p.d = check_args(who, q, k, v, positions, doc_ids, key_rate, key_log_mask, window);
  KVD_CHECK(retention_attention_fused_available(q, k), who,
            ": the fused kernel takes CUDA bf16 q/k/v with D in {64, 128}; got ", q.device(), " ", q.scalar_type(),
            " D=", p.d.D, " (use retention_attention_reference otherwise)");
  KVD_CHECK(p.d.S < (int64_t{1} << 31) / 2 && p.d.B * p.d.H * p.d.S < (int64_t{1} << 31), who,
            ": sizes beyond the kernel's 32-bit row indexing");
  p.q = kernel_layout(q);
  p.k = kernel_layout(k);
  p.v = kernel_layout(v);
  p.pos = positions.to(q.device(), torch::kInt).contiguous();
  if (doc_ids.defined()) p.doc = doc_ids.to(q.device(), torch::kInt).contiguous();
  auto per_key = [&](const at::Tensor& t) {
    if (!t.defined()) return t;
    at::Tensor f = t.detach().to(torch::kFloat);
    return f.stride(2) == 1 ? f : f.contiguous();
  };
  p.rate = per_key(key_rate);
  p.mask = per_key(key_log_mask);
  if (doc_ids.defined() || window)
    p.row_blocks = at::empty({p.d.B, (p.d.S + 31) / 32, 4}, p.pos.options());
  return p;
}

kernels::RetentionAttnParams params(const Prepared& p, const at::Tensor& out, const at::Tensor& lse,
                                    std::optional<int64_t> window, double scale, int64_t mask_delay) {
  kernels::RetentionAttnParams r;
  r.B = static_cast<int>(p.d.B);
  r.H = static_cast<int>(p.d.H);
  r.Hkv = static_cast<int>(p.d.Hkv);
  r.S = static_cast<int>(p.d.S);
  r.D = static_cast<int>(p.d.D);
  r.q = p.q.data_ptr();
  r.q_sb = p.q.stride(0), r.q_sh = p.q.stride(1), r.q_ss = p.q.stride(2);
  r.k = p.k.data_ptr();
  r.k_sb = p.k.stride(0), r.k_sh = p.k.stride(1), r.k_ss = p.k.stride(2);
  r.v = p.v.data_ptr();
  r.v_sb = p.v.stride(0), r.v_sh = p.v.stride(1), r.v_ss = p.v.stride(2);
  r.out = out.data_ptr();
  r.o_sb = out.stride(0), r.o_sh = out.stride(1), r.o_ss = out.stride(2);
  r.lse = lse.data_ptr<float>();
  r.pos = p.pos.data_ptr<int32_t>();
  r.doc = p.doc.defined() ? p.doc.data_ptr<int32_t>() : nullptr;
  if (p.rate.defined()) {
    r.key_rate = p.rate.data_ptr<float>();
    r.kr_sb = p.rate.stride(0), r.kr_sh = p.rate.stride(1);
  }
  if (p.mask.defined()) {
    r.key_log_mask = p.mask.data_ptr<float>();
    r.km_sb = p.mask.stride(0), r.km_sh = p.mask.stride(1);
  }
  r.window = window ? static_cast<int>(std::min<int64_t>(*window, std::numeric_limits<int>::max())) : 0;
  r.scale = static_cast<float>(scale);
  KVD_CHECK(mask_delay >= 0 && mask_delay < (int64_t{1} << 24), "retention attention: mask_delay ", mask_delay,
            " outside [0, 2^24)");
  r.mask_delay = static_cast<int>(mask_delay);
  r.row_blocks = p.row_blocks.defined() ? p.row_blocks.data_ptr<int32_t>() : nullptr;
  return r;
}

void check_cuda(cudaError_t e, const char* who) {
  KVD_CHECK(e == cudaSuccess, who, ": CUDA error ", cudaGetErrorString(e));
}

}  // namespace
#endif

RetentionAttentionForward retention_attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const at::Tensor& positions, const at::Tensor& doc_ids,
                                                      const at::Tensor& key_rate, const at::Tensor& key_log_mask,
                                                      std::optional<int64_t> window, double scale,
                                                      int64_t mask_delay) {
#ifdef KVD_WITH_RA_KERNEL
  const char* who = "retention_attention_forward";
  Prepared p = prepare(who, q, k, v, positions, doc_ids, key_rate, key_log_mask, window);
  c10::cuda::CUDAGuard guard(q.device());
  RetentionAttentionForward f;
  f.out = kernel_empty_like(p.q);
  f.lse = at::empty({p.d.B, p.d.H, p.d.S}, q.options().dtype(torch::kFloat));
  check_cuda(kernels::retention_attention_fwd(params(p, f.out, f.lse, window, scale, mask_delay),
                                              c10::cuda::getCurrentCUDAStream().stream()),
             who);
  return f;
#else
  (void)q, (void)k, (void)v, (void)positions, (void)doc_ids, (void)key_rate, (void)key_log_mask, (void)window,
      (void)scale, (void)mask_delay;
  KVD_FAIL("retention_attention_forward: this build has no CUDA kernels (LibTorch without CUDA or no nvcc)");
#endif
}

RetentionBackward backward_kind() {
  static const RetentionBackward kind = [] {
    const char* e = std::getenv("KVD_RA_BACKWARD");
    return e && std::string(e) == "one-pass" ? RetentionBackward::OnePass : RetentionBackward::TwoPass;
  }();
  return kind;
}

RetentionAttentionGrads retention_attention_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& v, const RetentionAttentionForward& fwd,
                                                     const at::Tensor& positions, const at::Tensor& doc_ids,
                                                     const at::Tensor& key_rate, const at::Tensor& key_log_mask,
                                                     std::optional<int64_t> window, double scale, int passes,
                                                     int64_t mask_delay) {
#ifdef KVD_WITH_RA_KERNEL
  const char* who = "retention_attention_backward";
  Prepared p = prepare(who, q, k, v, positions, doc_ids, key_rate, key_log_mask, window);
  KVD_CHECK(dout.defined() && dout.sizes() == q.sizes(), who, ": dout must be q's shape ", q.sizes());
  KVD_CHECK(fwd.out.defined() && fwd.out.sizes() == q.sizes() && fwd.out.scalar_type() == at::kBFloat16, who,
            ": fwd.out must be the forward's (B, H, S, D) bf16 output");
  KVD_CHECK(fwd.lse.defined() && fwd.lse.dim() == 3 && fwd.lse.size(0) == p.d.B && fwd.lse.size(1) == p.d.H &&
                fwd.lse.size(2) == p.d.S && fwd.lse.scalar_type() == at::kFloat && fwd.lse.is_contiguous(),
            who, ": fwd.lse must be the forward's contiguous (B, H, S) float32 log-sum-exp");
  c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = kernel_layout(fwd.out);
  at::Tensor d_o = kernel_layout(dout.to(at::kBFloat16));
  RetentionAttentionGrads g;
  const bool do_dq = passes & kernels::kRetentionBwdDq, do_dkv = passes & kernels::kRetentionBwdDkv;
  if (do_dq) g.dq = kernel_empty_like(p.q);
  if (do_dkv) {
    g.dk = kernel_empty_like(p.k);
    g.dv = kernel_empty_like(p.v);
  }
  auto fopt = q.options().dtype(torch::kFloat);
  if (do_dkv && p.rate.defined()) g.dkey_rate = at::empty({p.d.B, p.d.Hkv, p.d.S}, fopt);
  if (do_dkv && p.mask.defined()) g.dkey_log_mask = at::empty({p.d.B, p.d.Hkv, p.d.S}, fopt);
  at::Tensor delta = at::empty({p.d.B, p.d.H, p.d.S}, fopt);

  kernels::RetentionAttnParams r = params(p, out, fwd.lse, window, scale, mask_delay);
  kernels::RetentionAttnGrads gr;
  gr.dout = d_o.data_ptr();
  gr.do_sb = d_o.stride(0), gr.do_sh = d_o.stride(1), gr.do_ss = d_o.stride(2);
  if (do_dq) {
    gr.dq = g.dq.data_ptr();
    gr.dq_sb = g.dq.stride(0), gr.dq_sh = g.dq.stride(1), gr.dq_ss = g.dq.stride(2);
  }
  if (do_dkv) {
    gr.dk = g.dk.data_ptr();
    gr.dk_sb = g.dk.stride(0), gr.dk_sh = g.dk.stride(1), gr.dk_ss = g.dk.stride(2);
    gr.dv = g.dv.data_ptr();
    gr.dv_sb = g.dv.stride(0), gr.dv_sh = g.dv.stride(1), gr.dv_ss = g.dv.stride(2);
  }
  gr.passes = passes & kernels::kRetentionBwdAll;
  gr.dkey_rate = g.dkey_rate.defined() ? g.dkey_rate.data_ptr<float>() : nullptr;
  gr.dkey_log_mask = g.dkey_log_mask.defined() ? g.dkey_log_mask.data_ptr<float>() : nullptr;
  gr.delta = delta.data_ptr<float>();
  at::Tensor dq_acc, dq_count;  // the one-pass backward's workspaces
  if (do_dq && do_dkv && backward_kind() == RetentionBackward::OnePass) {
    dq_acc = at::empty({p.d.B, p.d.H, p.d.S, p.d.D}, fopt);
    dq_count = at::empty({p.d.B, p.d.H, (p.d.S + 63) / 64}, q.options().dtype(torch::kInt));
    gr.dq_acc = dq_acc.data_ptr<float>();
    gr.dq_count = dq_count.data_ptr<int32_t>();
  }
  check_cuda(kernels::retention_attention_bwd(r, gr, c10::cuda::getCurrentCUDAStream().stream()), who);
  return g;
#else
  (void)dout, (void)q, (void)k, (void)v, (void)fwd, (void)positions, (void)doc_ids, (void)key_rate,
      (void)key_log_mask, (void)window, (void)scale, (void)passes, (void)mask_delay;
  KVD_FAIL("retention_attention_backward: this build has no CUDA kernels (LibTorch without CUDA or no nvcc)");
#endif
}

// --- autograd -----------------------------------------------------------------------------------------------

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct RetentionAttentionFn : torch::autograd::Function<RetentionAttentionFn> {
  // The optional inputs travel as std::optional: autograd makes no VariableInfo for an empty one (it cannot
  // for an undefined at::Tensor).
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& positions, const std::optional<at::Tensor>& doc_ids,
                            const std::optional<at::Tensor>& key_rate, const std::optional<at::Tensor>& key_log_mask,
                            int64_t window, double scale, int64_t mask_delay) {
    std::optional<int64_t> w = window > 0 ? std::optional<int64_t>(window) : std::nullopt;
    const at::Tensor doc = doc_ids.value_or(at::Tensor()), rate = key_rate.value_or(at::Tensor()),
                     mask = key_log_mask.value_or(at::Tensor());
    RetentionAttentionForward f =
        retention_attention_forward(q, k, v, positions, doc, rate, mask, w, scale, mask_delay);
    ctx->save_for_backward({q, k, v, f.out, f.lse, positions, doc, rate, mask});
    ctx->saved_data["window"] = window;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["mask_delay"] = mask_delay;
    return f.out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    const variable_list s = ctx->get_saved_variables();
    const int64_t window = ctx->saved_data["window"].toInt();
    const double scale = ctx->saved_data["scale"].toDouble();
    const int64_t mask_delay = ctx->saved_data["mask_delay"].toInt();
    std::optional<int64_t> w = window > 0 ? std::optional<int64_t>(window) : std::nullopt;
    const at::Tensor &q = s[0], &k = s[1], &v = s[2], &pos = s[5], &doc = s[6], &rate = s[7], &mask = s[8];
    // dQ only when q needs it (e.g. not in a first layer whose q depends on no trained part).
    // Edges exist for the tensor inputs only: q, k, v, positions, then doc_ids, key_rate, key_log_mask if given.
    const size_t e_rate = 4 + (doc.defined() ? 1 : 0), e_mask = e_rate + (rate.defined() ? 1 : 0);
    const bool need_dkv = ctx->needs_input_grad(1) || ctx->needs_input_grad(2) ||
                          (rate.defined() && ctx->needs_input_grad(e_rate)) ||
                          (mask.defined() && ctx->needs_input_grad(e_mask));
    const int passes = 1 | (ctx->needs_input_grad(0) ? 2 : 0) | (need_dkv ? 4 : 0);
    RetentionAttentionGrads g =
        retention_attention_backward(grad_out[0], q, k, v, {s[3], s[4]}, pos, doc, rate, mask, w, scale, passes,
                                     mask_delay);
    at::Tensor drate = g.dkey_rate.defined() ? g.dkey_rate.to(rate.scalar_type()) : at::Tensor();
    at::Tensor dmask = g.dkey_log_mask.defined() ? g.dkey_log_mask.to(mask.scalar_type()) : at::Tensor();
    return {g.dq, g.dk, g.dv, at::Tensor(), at::Tensor(), drate, dmask, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor retention_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& positions, const at::Tensor& doc_ids, const at::Tensor& key_rate,
                               const at::Tensor& key_log_mask, std::optional<int64_t> window, double scale,
                               int64_t mask_delay) {
  if (!retention_attention_fused_available(q, k)) {
    const c10::ScalarType acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    return retention_attention_reference(q, k, v, positions, doc_ids, key_rate, key_log_mask, window, scale, acc,
                                         mask_delay)
        .to(q.scalar_type());
  }
  check_args("retention_attention", q, k, v, positions, doc_ids, key_rate, key_log_mask, window);
  auto opt = [](const at::Tensor& t) { return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt; };
  return RetentionAttentionFn::apply(q, k, v, positions, opt(doc_ids), opt(key_rate), opt(key_log_mask),
                                     window ? *window : 0, scale, mask_delay);
}

}  // namespace kvd
