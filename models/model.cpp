#include "models/model.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <map>
#include <string>
#include <unordered_set>

#include <ATen/autocast_mode.h>
#include <torch/torch.h>

#include "common/error.h"
#include "kernels/decode_attention.h"
#include "kernels/decode_step.h"
#include "kernels/retention_attention.h"
#include "models/attention.h"
#include "models/device.h"
#include "models/kv_cache.h"
#include "models/profile.h"
#include "models/safetensors.h"
#include "models/static_decode.h"

namespace kvd {
namespace {

constexpr double kPi = 3.14159265358979323846;

// Which rows LoRA deltas apply to.
struct LoraRows {
  at::Tensor mask;  // (B, S, 1) in the model dtype, or undefined: rows [T, S)
  int64_t T = 0;
  int64_t S = 0;
};

// y = x Wᵀ + b, plus the row-masked LoRA delta.
at::Tensor project(const at::Tensor& x,  // (B, S, in)
                   const at::Tensor& w,  // (out, in)
                   const at::Tensor& b,  // (out) or undefined
                   const LoraDelta& lora, const LoraRows* rows) {
  at::Tensor y = b.defined() ? at::linear(x, w, b) : at::linear(x, w);  // (B, S, out)
  if (!lora.defined() || rows == nullptr) return y;
  KVD_CHECK(lora.a.dim() == 2 && lora.b.dim() == 2 && lora.a.size(1) == x.size(-1) &&
                lora.b.size(0) == w.size(0) && lora.b.size(1) == lora.a.size(0),
            "LoRA delta: a must be (r, ", x.size(-1), ") and b (", w.size(0), ", r); got ", lora.a.sizes(), " and ",
            lora.b.sizes());
  auto delta = [&](const at::Tensor& xr) {  // (B, s, in) -> (B, s, out)
    at::Tensor a = lora.a.to(xr.scalar_type()), bm = lora.b.to(xr.scalar_type());
    return at::linear(at::linear(xr, a), bm) * lora.scale;
  };
  if (rows->mask.defined()) return y + delta(x) * rows->mask;
  const int64_t n = rows->S - rows->T;
  if (n == 0) return y;
  return torch::cat({y.narrow(1, 0, rows->T), y.narrow(1, rows->T, n) + delta(x.narrow(1, rows->T, n))}, 1);
}

// What every layer of one forward_train shares: masks, RoPE tables, LoRA rows, the statistics request.
// Held by pointer from each checkpointed layer's autograd node, so it lives until the backward is done.
struct TrainForwardCtx : torch::CustomClassHolder {
  SequenceMask tm;
  at::Tensor cos, sin;      // (B, 1, S, hd)
  LoraRows lrows;
  at::Tensor all_rows;      // (B, S) 0..S-1, for the explicit path
  at::Tensor stat_rows;     // (B, n_rows) or undefined
  int64_t stat_block = 0;
  StatReduce stat_reduce = StatReduce::Mean;
  int64_t B = 0, S = 0, H = 0, Hkv = 0, hd = 0;
  double scale = 1.0, eps = 0.0;
  bool qk_norm = false;
  c10::ScalarType acc = torch::kFloat;  // scores and softmax
  KernelPath kernels = KernelPath::Fused;
  // Grad mode was on when forward_train began (a student; a checkpointed layer's forward then runs without it, and
  // must attend as its recomputation will). The teacher's forward runs under no-grad.
  bool grad = false;
  // Packed documents as the sequences of flash attention's variable-length form over the B·S tokens, one per
  // (row, run of one document id); built on first use (document_flash). Undefined cu_seqlens: it does not apply.
  struct DocumentRuns {
    bool built = false;
    at::Tensor cu_seqlens;  // (runs + 1) int32 on the device
    int64_t max_len = 0;
  } doc_runs;
};

// One decoder layer's projections from its normed input h (B, S, d).
struct LayerQKV {
  at::Tensor q;      // (B, H, S, hd) post-RoPE
  at::Tensor k;      // (B, H_kv, S, hd) post-RoPE
  at::Tensor v;      // (B, H_kv, S, hd)
  at::Tensor q_pre;  // (B, H, S, hd) before RoPE (after q_norm for Qwen3)
};

// What a layer's attention reads: its projections, returning the attention output (B, H, S, hd). Training
// attends over the whole sequence (with the mods' biases and statistics); inference appends K/V to a cache and
// attends over it.
using AttendFn = std::function<at::Tensor(const LayerQKV&)>;

// The small row ops of inference (RMSNorm with the residual add, RoPE, SiLU · up) at prefill, extra rows and decode
// steps: one fused kernel each where it applies (kernels/decode_step.h: CUDA bf16; rows trained through run the
// kernels' training forms), the reference elsewhere. A prefill layer's reference path is about 25
// LibTorch ops more, and an eval's prefills are launch-bound.
constexpr KernelPath kInferenceRowOps = KernelPath::Fused;

// The decoder layer, the one both paths run: q/k/v projections (with LoRA on the LoRA rows), Qwen3's q/k
// norm, RoPE (cos / sin (B, 1, S, hd)), the attention `attend` computes, the output projection, the residual
// and the MLP. x (B, S, d) is the layer input, h (B, S, d) = rms_norm(x, input_norm). Returns the layer output.
// ops: KernelPath::Fused runs RMSNorm (with the residual add), RoPE and SiLU · up as one kernel each where they
// apply (kernels/decode_step.h: CUDA bf16, with backward kernels where an input needs a gradient); inference and
// the training forwards (train.kernels) take it.
at::Tensor decoder_layer(const LayerWeights& lw, const LayerLora& lora, const LoraRows* lr, const at::Tensor& cos,
                         const at::Tensor& sin, int64_t H, int64_t Hkv, int64_t hd, bool qk_norm, double eps,
                         const at::Tensor& x_in, const at::Tensor& h, const AttendFn& attend,
                         KernelPath ops = KernelPath::Reference) {
  const int64_t B = h.size(0), S = h.size(1);
  LayerQKV p;
  p.q = project(h, lw.q_proj, lw.q_bias, lora.q, lr).view({B, S, H, hd}).transpose(1, 2);  // (B, H, S, hd)
  p.k = project(h, lw.k_proj, lw.k_bias, lora.k, lr).view({B, S, Hkv, hd}).transpose(1, 2);  // (B, H_kv, S, hd)
  p.v = project(h, lw.v_proj, lw.v_bias, lora.v, lr).view({B, S, Hkv, hd}).transpose(1, 2);  // (B, H_kv, S, hd)
  if (qk_norm) {
    p.q = rms_norm(p.q, lw.q_norm, eps, ops);
    p.k = rms_norm(p.k, lw.k_norm, eps, ops);
  }
  p.q_pre = p.q;
  std::tie(p.q, p.k) = rope(p.q, p.k, cos, sin, ops);  // (B, H, S, hd), (B, H_kv, S, hd)
  at::Tensor attn = attend(p);                          // (B, H, S, hd)

  at::Tensor o = attn.transpose(1, 2).reshape({B, S, H * hd});  // (B, S, H*hd)
  const AddRmsNorm r = add_rms_norm(x_in, project(o, lw.o_proj, lw.o_bias, lora.o, lr), lw.post_norm, eps, ops);
  const at::Tensor& x = r.sum;                                        // (B, S, d)
  at::Tensor g = project(r.normed, lw.gate_proj, {}, lora.gate, lr);  // (B, S, ffn)
  at::Tensor u = project(r.normed, lw.up_proj, {}, lora.up, lr);      // (B, S, ffn)
  return x + project(silu_mul(g, u, ops), lw.down_proj, {}, lora.down, lr);  // (B, S, d)
}

// The attention by the fused kernel (kernels/retention_attention.h), with the layer's key_rate / key_log_mask
// if any and the documents / window of the mask; or an undefined tensor where the kernel does not apply
// (KernelPath::Reference, a pair_bias, not CUDA, not bf16 under the model dtype or autocast, another head dim),
// and the caller runs its LibTorch path.
at::Tensor fused_attention(const TrainForwardCtx& c, const LayerMods& m, const LayerQKV& p) {
  if (c.kernels != KernelPath::Fused || m.pair_bias || !p.q.is_cuda()) return {};
  at::Tensor q = p.q, k = p.k, v = p.v;
  // Under bf16 autocast the projections are bf16 but RoPE may promote q / k to float32.
  if (q.scalar_type() != torch::kBFloat16 && at::autocast::is_autocast_enabled(at::kCUDA) &&
      at::autocast::get_autocast_dtype(at::kCUDA) == torch::kBFloat16) {
    q = q.to(torch::kBFloat16);
    k = k.to(torch::kBFloat16);
    v = v.to(torch::kBFloat16);
  }
  if (v.scalar_type() != q.scalar_type() || !retention_attention_fused_available(q, k)) return {};
  return retention_attention(q, k, v, c.tm.positions, c.tm.doc_ids, m.key_rate, m.key_log_mask, c.tm.window,
                             c.scale, m.key_log_mask_delay)
      .to(p.v.scalar_type());  // (B, H, S, hd), as the reference returns it
}

// The runs of TrainForwardCtx::DocumentRuns from doc_ids (B, S), read back once. A document id that recurs after
// another within a row gets no runs (the mask is by id; the fused kernel takes that case).
TrainForwardCtx::DocumentRuns document_runs(const at::Tensor& doc_ids) {
  TrainForwardCtx::DocumentRuns r;
  r.built = true;
  const at::Tensor d = doc_ids.to(torch::kCPU, torch::kLong).contiguous();  // (B, S)
  const int64_t B = d.size(0), S = d.size(1);
  if (B * S >= std::numeric_limits<int32_t>::max()) return r;
  auto a = d.accessor<int64_t, 2>();
  std::vector<int32_t> cu{0};
  for (int64_t b = 0; b < B; ++b) {
    std::unordered_set<int64_t> seen;
    for (int64_t t = 0; t < S; ++t) {
      if (t > 0 && a[b][t] == a[b][t - 1]) continue;
      if (!seen.insert(a[b][t]).second) return r;  // a recurring id
      if (t > 0) cu.push_back(static_cast<int32_t>(b * S + t));
    }
    cu.push_back(static_cast<int32_t>((b + 1) * S));
  }
  for (size_t i = 1; i < cu.size(); ++i) r.max_len = std::max<int64_t>(r.max_len, cu[i] - cu[i - 1]);
  r.cu_seqlens = torch::tensor(cu, torch::kInt).to(doc_ids.device());
  return r;
}

// The attention of a layer without mods over packed documents by flash attention's variable-length form, in a
// forward without gradients (the teacher's): each document a causal sequence, GQA inside the kernel, q / k / v
// read in place. Undefined where it does not apply (KernelPath::Reference, a window, grad mode, not CUDA bf16 /
// fp16, q / k / v not laid out token by token, documents that are not runs); the caller then takes the fused kernel.
at::Tensor document_flash(TrainForwardCtx& c, const LayerQKV& p) {
  if (c.kernels != KernelPath::Fused || c.grad || !c.tm.doc_ids.defined() || c.tm.window) return {};
  const c10::ScalarType dt = p.q.scalar_type();
  if (!varlen_flash_applies(p.q.device(), dt, c.hd, /*sliding_window=*/false) || p.k.scalar_type() != dt ||
      p.v.scalar_type() != dt)
    return {};
  auto token_major = [](const at::Tensor& x) { return x.transpose(1, 2).is_contiguous(); };
  if (!token_major(p.q) || !token_major(p.k) || !token_major(p.v)) return {};
  if (!c.doc_runs.built) c.doc_runs = document_runs(c.tm.doc_ids);
  const TrainForwardCtx::DocumentRuns& r = c.doc_runs;
  if (!r.cu_seqlens.defined()) return {};
  const int64_t B = c.B, S = c.S;
  auto flat = [&](const at::Tensor& x) { return x.transpose(1, 2).reshape({B * S, x.size(1), c.hd}); };  // a view
  const at::Tensor out = std::get<0>(at::_flash_attention_forward(
      flat(p.q), flat(p.k), flat(p.v), r.cu_seqlens, r.cu_seqlens, r.max_len, r.max_len, 0.0, /*is_causal=*/true,
      /*return_debug_mask=*/false, c.scale));     // (B S, H, hd)
  return out.view({B, S, c.H, c.hd}).transpose(1, 2);  // (B, H, S, hd)
}

struct LayerResult {
  at::Tensor x;      // (B, S, d) the layer's output (residual stream)
  at::Tensor stats;  // (B, H, S) or undefined
};

// One training layer after its input RMSNorm and hook: decoder_layer with whole-sequence attention under the
// mods, and the optional statistics of the chosen query rows.
LayerResult train_layer(TrainForwardCtx& c, const LayerWeights& lw, const LayerMods& m, bool want_stats,
                        const at::Tensor& x_in, const at::Tensor& h) {
  const int64_t B = c.B, S = c.S, H = c.H, Hkv = c.Hkv, hd = c.hd;
  const LoraRows* lr = m.lora.any() ? &c.lrows : nullptr;
  LayerResult out;
  const AttendFn attend = [&](const LayerQKV& p) {
    at::Tensor attn;  // (B, H, S, hd)
    if (!m.changes_attention()) {
      if (c.tm.plain_causal()) {
        attn = at::scaled_dot_product_attention(p.q, p.k, p.v, {}, 0.0, /*is_causal=*/true, c.scale, /*enable_gqa=*/true);
      } else if (at::Tensor flash = document_flash(c, p); flash.defined()) {
        attn = flash;  // packed documents, no gradient (the teacher)
      } else if (at::Tensor fused = fused_attention(c, m, p); fused.defined()) {
        // Packed documents or a window: the fused kernel skips the tiles no query can see, where SDPA would
        // run its memory-efficient path over a dense (B, 1, S, S) mask.
        attn = fused;
      } else {
        attn = grouped_sdpa(p.q, p.k, p.v, c.tm.sdpa_mask(), false, c.scale);
      }
    } else if (at::Tensor fused = fused_attention(c, m, p); fused.defined()) {
      attn = fused;
    } else {
      if (!c.all_rows.defined())
        c.all_rows = torch::arange(S, c.tm.positions.options()).view({1, S}).expand({B, S});
      at::Tensor pr = grouped_probs(p.q, p.k, mods_bias(c.all_rows, c.tm, m, Hkv, c.acc), c.scale);  // (B, H_kv, G, S, S)
      attn = torch::matmul(pr.to(p.v.scalar_type()), p.v.unsqueeze(2)).reshape({B, H, S, hd});
    }
    if (want_stats) {
      const int64_t nr = c.stat_rows.size(1), blk = c.stat_block;
      at::Tensor sum;  // (B, H, S)
      for (int64_t r0 = 0; r0 < nr; r0 += blk) {
        const int64_t nb = std::min(blk, nr - r0);
        at::Tensor rows = c.stat_rows.narrow(1, r0, nb);                                   // (B, nb)
        at::Tensor qr = p.q.gather(2, rows.view({B, 1, nb, 1}).expand({B, H, nb, hd}));    // (B, H, nb, hd)
        at::Tensor pr = grouped_probs(qr, p.k, mods_bias(rows, c.tm, m, Hkv, c.acc), c.scale);  // (B, H_kv, G, nb, S)
        at::Tensor st = pr.sum(3).reshape({B, H, S});                                      // (B, H, S)
        sum = sum.defined() ? sum + st : st;
      }
      out.stats = c.stat_reduce == StatReduce::Mean ? sum / static_cast<double>(nr) : sum;
    }
    return attn;
  };
  out.x = decoder_layer(lw, m.lora, lr, c.cos, c.sin, H, Hkv, hd, c.qk_norm, c.eps, x_in, h, attend, c.kernels);
  return out;
}

// --- activation checkpointing of one layer ----------------------------------------------------------------
//
// The tensors a checkpointed layer takes as autograd inputs, in this order (undefined ones are left out and
// remembered by slot): x, h (when the layer hook ran), key_rate, key_log_mask, the LoRA a/b of q k v o gate up
// down, and an empty anchor (when a pair_bias closure is set, so that its captured parameters get gradients
// even where no other input requires grad).
enum Slot : int {
  kX = 0, kH, kKeyRate, kKeyLogMask, kLoraFirst,
  kAnchor = kLoraFirst + 14,
  kNumSlots
};

std::vector<LoraDelta*> lora_deltas(LayerLora& l) { return {&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down}; }

// What a checkpointed layer needs besides its tensor inputs.
struct CheckpointedLayerRun : torch::CustomClassHolder {
  c10::intrusive_ptr<TrainForwardCtx> ctx;
  LayerWeights w;                    // the frozen layer's weights (handles; they never require grad)
  PairBiasFn pair_bias;              // re-run in the backward
  int64_t key_log_mask_delay = 0;
  std::vector<double> lora_scale;    // [7]
  bool want_stats = false;
  std::vector<int> slot_of_input;    // [n_inputs] which Slot each autograd input fills
  // at::autocast state of the forward, restored for the recomputation.
  bool autocast_cuda = false, autocast_cpu = false;
  c10::ScalarType autocast_cuda_dtype = torch::kHalf, autocast_cpu_dtype = torch::kBFloat16;
};

// Sets the autocast state of CUDA and CPU for a scope, restoring the previous one on exit. The cast cache is
// off inside: the recomputation's inputs are fresh leaves that require grad, which autocast would otherwise
// cache (one bfloat16 copy of h shared by the q, k and v projections sums their gradients in bfloat16, where
// the original graph, in which h is no leaf, sums them in float32: 5e-3 relative on the gate's gradients).
class AutocastStateGuard {
 public:
  AutocastStateGuard(bool cuda, c10::ScalarType cuda_dtype, bool cpu, c10::ScalarType cpu_dtype)
      : cuda_(at::autocast::is_autocast_enabled(c10::DeviceType::CUDA)),
        cpu_(at::autocast::is_autocast_enabled(c10::DeviceType::CPU)),
        cache_(at::autocast::is_autocast_cache_enabled()),
        cuda_dtype_(at::autocast::get_autocast_dtype(c10::DeviceType::CUDA)),
        cpu_dtype_(at::autocast::get_autocast_dtype(c10::DeviceType::CPU)) {
    set(cuda, cuda_dtype, cpu, cpu_dtype, /*cache=*/false);
  }
  ~AutocastStateGuard() { set(cuda_, cuda_dtype_, cpu_, cpu_dtype_, cache_); }
  AutocastStateGuard(const AutocastStateGuard&) = delete;
  AutocastStateGuard& operator=(const AutocastStateGuard&) = delete;

 private:
  static void set(bool cuda, c10::ScalarType cuda_dtype, bool cpu, c10::ScalarType cpu_dtype, bool cache) {
    at::autocast::set_autocast_enabled(c10::DeviceType::CUDA, cuda);
    at::autocast::set_autocast_dtype(c10::DeviceType::CUDA, cuda_dtype);
    at::autocast::set_autocast_enabled(c10::DeviceType::CPU, cpu);
    at::autocast::set_autocast_dtype(c10::DeviceType::CPU, cpu_dtype);
    at::autocast::set_autocast_cache_enabled(cache);
  }
  bool cuda_, cpu_, cache_;
  c10::ScalarType cuda_dtype_, cpu_dtype_;
};

// Rebuilds the layer's mods from the slots (tensors) and the run (closures, scales).
LayerMods mods_from_slots(const CheckpointedLayerRun& r, const std::vector<at::Tensor>& slots) {
  LayerMods m;
  m.key_rate = slots[kKeyRate];
  m.key_log_mask = slots[kKeyLogMask];
  m.key_log_mask_delay = r.key_log_mask_delay;
  m.pair_bias = r.pair_bias;
  std::vector<LoraDelta*> d = lora_deltas(m.lora);
  for (size_t i = 0; i < d.size(); ++i) {
    d[i]->a = slots[kLoraFirst + 2 * i];
    d[i]->b = slots[kLoraFirst + 2 * i + 1];
    d[i]->scale = r.lora_scale[i];
  }
  return m;
}

// Forward: the layer under no-grad (Function::apply turns grad mode off), saving only its inputs.
// Backward: the layer again, with grad, from detached copies of the saved inputs, under the forward's autocast
// state; torch::autograd::backward through it accumulates into leaves the layer reached (parameters captured
// by pair_bias closures) and into the detached inputs, whose gradients are returned.
struct CheckpointedLayer : public torch::autograd::Function<CheckpointedLayer> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, at::TensorList inputs,
                                                c10::intrusive_ptr<CheckpointedLayerRun> run) {
    std::vector<at::Tensor> slots(kNumSlots);
    for (size_t i = 0; i < inputs.size(); ++i) slots[run->slot_of_input[i]] = inputs[i];
    at::Tensor h = slots[kH].defined() ? slots[kH] : rms_norm(slots[kX], run->w.input_norm, run->ctx->eps, run->ctx->kernels);
    LayerResult r = train_layer(*run->ctx, run->w, mods_from_slots(*run, slots), run->want_stats, slots[kX], h);
    // h is an input only to carry the hook's gradient path; it is recomputed from x in the backward.
    std::vector<at::Tensor> to_save(inputs.begin(), inputs.end());
    for (size_t i = 0; i < to_save.size(); ++i)
      if (run->slot_of_input[i] == kH) to_save[i] = at::Tensor();
    ctx->save_for_backward(to_save);
    ctx->saved_data["run"] = c10::IValue::make_capsule(run);
    ctx->set_materialize_grads(false);
    torch::autograd::variable_list out{r.x};
    if (run->want_stats) out.push_back(r.stats);
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_out) {
    auto run = c10::static_intrusive_pointer_cast<CheckpointedLayerRun>(ctx->saved_data["run"].toCapsule());
    const std::vector<at::Tensor> saved = ctx->get_saved_variables();  // x is always input 0
    const size_t n = saved.size();
    torch::autograd::variable_list grads(n + 1);  // + one (undefined) for the run, which is not a tensor

    std::vector<at::Tensor> slots(kNumSlots), leaves(n);
    {
      torch::NoGradGuard ng;
      for (size_t i = 0; i < n; ++i) {
        const int slot = run->slot_of_input[i];
        const at::Tensor t = slot == kH ? rms_norm(saved[0], run->w.input_norm, run->ctx->eps, run->ctx->kernels) : saved[i];
        leaves[i] = t.detach().requires_grad_(ctx->needs_input_grad(i));
        slots[slot] = leaves[i];
      }
    }
    {
      torch::AutoGradMode grad_on(true);
      AutocastStateGuard autocast(run->autocast_cuda, run->autocast_cuda_dtype, run->autocast_cpu,
                                  run->autocast_cpu_dtype);
      const at::Tensor h = slots[kH].defined() ? slots[kH] : rms_norm(slots[kX], run->w.input_norm, run->ctx->eps, run->ctx->kernels);
      LayerResult r = train_layer(*run->ctx, run->w, mods_from_slots(*run, slots), run->want_stats, slots[kX], h);
      const std::vector<at::Tensor> outs{r.x, r.stats};
      std::vector<at::Tensor> o, g;  // recomputed outputs with an incoming gradient and a graph
      for (size_t i = 0; i < grad_out.size() && i < outs.size(); ++i)
        if (grad_out[i].defined() && outs[i].requires_grad()) {
          o.push_back(outs[i]);
          g.push_back(grad_out[i]);
        }
      if (!o.empty()) torch::autograd::backward(o, g);
    }
    for (size_t i = 0; i < n; ++i)
      if (run->slot_of_input[i] != kAnchor && leaves[i].requires_grad()) grads[i] = leaves[i].grad();
    return grads;
  }
};

at::Tensor check_ids(const at::Tensor& ids, int64_t vocab, const char* what) {
  KVD_CHECK(ids.dim() == 2, what, ": ids must be (B, T), got ", ids.sizes());
  KVD_CHECK(ids.scalar_type() == torch::kLong || ids.scalar_type() == torch::kInt, what,
            ": ids must be int64 or int32");
  if (ids.numel() > 0) {
    const int64_t lo = ids.min().item<int64_t>(), hi = ids.max().item<int64_t>();
    KVD_CHECK(lo >= 0 && hi < vocab, what, ": token id out of range [0, ", vocab, "): min ", lo, ", max ", hi,
              " (tokenizer and model disagree?)");
  }
  return ids.to(torch::kLong);
}

}  // namespace

// --- RoPE -----------------------------------------------------------------------------------------------

at::Tensor rope_inv_freq(const ModelConfig& cfg) {
  const int64_t half = cfg.head_dim / 2;
  at::Tensor inv = torch::empty({half}, torch::kDouble);  // (hd / 2)
  auto* p = inv.data_ptr<double>();
  for (int64_t i = 0; i < half; ++i) {
    double f = 1.0 / std::pow(cfg.rope_theta, static_cast<double>(2 * i) / static_cast<double>(cfg.head_dim));
    switch (cfg.rope_scaling) {
      case RopeScaling::None:
        break;
      case RopeScaling::Linear:
        f /= cfg.rope_factor;
        break;
      case RopeScaling::Llama3: {
        // Wavelengths shorter than original/high_freq_factor keep their frequency; longer than
        // original/low_freq_factor are divided by factor; in between, a linear blend in (original / wavelen).
        const double orig = static_cast<double>(cfg.rope_original_max_position);
        const double wavelen = 2.0 * kPi / f;
        const double short_wl = orig / cfg.rope_high_freq_factor, long_wl = orig / cfg.rope_low_freq_factor;
        if (wavelen > long_wl) {
          f /= cfg.rope_factor;
        } else if (wavelen >= short_wl) {
          const double t = (orig / wavelen - cfg.rope_low_freq_factor) /
                           (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor);
          f = (1.0 - t) * f / cfg.rope_factor + t * f;
        }
        break;
      }
    }
    p[i] = f;
  }
  return inv;
}

at::Tensor Model::rope_cos_sin(const at::Tensor& positions) const {  // (B, S)
  at::Tensor ang = positions.to(torch::kDouble).unsqueeze(-1) * inv_freq_;  // (B, S, hd/2)
  ang = torch::cat({ang, ang}, -1).unsqueeze(1);                             // (B, 1, S, hd)
  // cos / sin in float64, rounded once to float32 and then to the model dtype (as HF casts float32 -> dtype).
  const c10::ScalarType mid = c10::promoteTypes(dtype_, torch::kFloat);
  at::Tensor cos = ang.cos().to(mid).to(dtype_);
  at::Tensor sin = ang.sin().to(mid).to(dtype_);
  return torch::stack({cos, sin});  // (2, B, 1, S, hd)
}

// --- construction -----------------------------------------------------------------------------------------

Model::Model(ModelConfig cfg, DecoderWeights weights, c10::ScalarType dtype, c10::Device device)
    : cfg_(std::move(cfg)), w_(std::move(weights)), dtype_(dtype), device_(device) {
  KVD_CHECK(cfg_.num_kv_heads > 0 && cfg_.num_heads % cfg_.num_kv_heads == 0,
            "Model: num_attention_heads must be a multiple of num_key_value_heads");
  KVD_CHECK(static_cast<int64_t>(w_.layers.size()) == cfg_.num_layers, "Model: ", w_.layers.size(),
            " layers of weights for num_hidden_layers ", cfg_.num_layers);
  KVD_CHECK(!w_.embed.defined() || (w_.embed.device().type() == device_.type() &&
                                     (!device_.has_index() || w_.embed.device().index() == device_.index())),
            "Model: the weights are on ", w_.embed.device(),
            " but the model is for ", device_, "; load them onto that device (Model::load does) or move them first");
  inv_freq_ = rope_inv_freq(cfg_).to(device_);
  // See disable_cudnn_attention(); KVD_CUDNN_ATTENTION=1 keeps cuDNN's attention on (bench/cudnn_attention.sh).
  if (device_.is_cuda() && std::getenv("KVD_CUDNN_ATTENTION") == nullptr) disable_cudnn_attention();
}

Model Model::load(const std::string& model_dir, c10::Device device, std::optional<c10::ScalarType> dtype) {
  ModelConfig cfg = load_config(model_dir);
  const c10::ScalarType dt = dtype ? *dtype : (device.is_cuda() ? torch::kBFloat16 : torch::kFloat);
  Checkpoint ckpt(model_dir);
  DecoderWeights w = load_weights(ckpt, cfg, dt, device);
  return Model(std::move(cfg), std::move(w), dt, device);
}

at::Tensor Model::logits(const at::Tensor& hidden) const {  // (..., d) -> (..., V)
  KVD_CHECK(hidden.size(-1) == cfg_.hidden_size, "Model::logits: hidden size ", hidden.size(-1), ", expected ",
            cfg_.hidden_size);
  return at::linear(hidden.to(dtype_), w_.lm_head);
}

at::Tensor Model::embed(const at::Tensor& ids) const {
  torch::NoGradGuard no_grad;
  at::Tensor t = check_ids(ids, cfg_.vocab_size, "Model::embed").to(device_);  // (B, T)
  return at::embedding(w_.embed, t);                                           // (B, T, d)
}

KVCache Model::new_cache(int64_t batch) const { return KVCache(cfg_, batch, dtype_, device_); }

// --- forward_train ------------------------------------------------------------------------------------------

ForwardOutput Model::forward_train(const at::Tensor& ids_in, const at::Tensor& positions_in,
                                   const AttentionMods& mods, const at::Tensor& doc_ids_in,
                                   ActivationCheckpointing checkpointing) const {
  const char* ctx = "Model::forward_train";
  at::Tensor ids = check_ids(ids_in, cfg_.vocab_size, ctx).to(device_);  // (B, T)
  const int64_t B = ids.size(0), T = ids.size(1);
  KVD_CHECK(T > 0, ctx, ": empty sequence");
  KVD_CHECK(positions_in.sizes() == ids.sizes(), ctx, ": positions must be (B, T) = ", ids.sizes(), ", got ",
            positions_in.sizes());
  at::Tensor positions = positions_in.to(device_, torch::kLong);  // (B, T)
  at::Tensor doc_ids;                                             // (B, T) or undefined
  if (doc_ids_in.defined()) {
    KVD_CHECK(doc_ids_in.sizes() == ids.sizes(), ctx, ": doc_ids must be (B, T) = ", ids.sizes(), ", got ",
              doc_ids_in.sizes());
    doc_ids = doc_ids_in.to(device_, torch::kLong);
  }

  at::Tensor x = at::embedding(w_.embed, ids);  // (B, T, d)

  // Extra rows after the sequence.
  const ExtraRows& ex = mods.extra;
  const int64_t n = ex.count();
  if (n > 0) {
    at::Tensor e = ex.embeddings;
    if (e.dim() == 2) e = e.unsqueeze(0).expand({B, n, e.size(1)});  // (B, n, d)
    KVD_CHECK(e.dim() == 3 && e.size(0) == B && e.size(2) == cfg_.hidden_size, ctx,
              ": extra embeddings must be (n, d) or (B, n, d) with d = ", cfg_.hidden_size, ", got ",
              ex.embeddings.sizes());
    KVD_CHECK(ex.positions.defined(), ctx, ": extra rows need positions");
    at::Tensor ep = ex.positions.to(device_, torch::kLong);
    if (ep.dim() == 1) ep = ep.unsqueeze(0).expand({B, n});  // (B, n)
    KVD_CHECK(ep.dim() == 2 && ep.size(0) == B && ep.size(1) == n, ctx, ": extra positions must be (n) or (B, n), got ",
              ex.positions.sizes());
    x = torch::cat({x, e.to(device_, dtype_)}, 1);   // (B, S, d)
    positions = torch::cat({positions, ep}, 1);       // (B, S)
    if (doc_ids.defined() || ex.doc_ids.defined()) {
      if (!doc_ids.defined()) doc_ids = torch::zeros({B, T}, positions.options());
      at::Tensor ed = ex.doc_ids.defined() ? ex.doc_ids.to(device_, torch::kLong)
                                           : doc_ids.narrow(1, T - 1, 1).expand({B, n});  // (B, n)
      KVD_CHECK(ed.dim() == 2 && ed.size(0) == B && ed.size(1) == n, ctx, ": extra doc_ids must be (B, n), got ",
                ed.sizes());
      doc_ids = torch::cat({doc_ids, ed}, 1);  // (B, S)
    }
  }
  const int64_t S = T + n;

  auto c = c10::make_intrusive<TrainForwardCtx>();
  c->tm = SequenceMask{positions, doc_ids, cfg_.sliding_window, S, {}};
  c->lrows = LoraRows{at::Tensor(), T, S};
  if (mods.lora_row_mask.defined()) {
    KVD_CHECK(mods.lora_row_mask.dim() == 2 && mods.lora_row_mask.size(0) == B && mods.lora_row_mask.size(1) == S,
              ctx, ": lora_row_mask must be (B, S = T + n_extra) = (", B, ", ", S, "), got ",
              mods.lora_row_mask.sizes());
    c->lrows.mask = mods.lora_row_mask.to(device_, dtype_).unsqueeze(-1);  // (B, S, 1)
  }

  // Statistics request.
  std::vector<bool> stat_layer(cfg_.num_layers, false);
  if (mods.stats.wanted()) {
    at::Tensor stat_rows = mods.stats.rows.to(device_, torch::kLong);  // (B, n_rows)
    if (stat_rows.dim() == 1) stat_rows = stat_rows.unsqueeze(0).expand({B, stat_rows.size(0)});
    KVD_CHECK(stat_rows.dim() == 2 && stat_rows.size(0) == B && stat_rows.size(1) > 0, ctx,
              ": stats.rows must be (n) or (B, n) with n > 0, got ", mods.stats.rows.sizes());
    KVD_CHECK(stat_rows.min().item<int64_t>() >= 0 && stat_rows.max().item<int64_t>() < S, ctx,
              ": stats.rows must lie in [0, S = ", S, ")");
    KVD_CHECK(mods.stats.row_block > 0, ctx, ": stats.row_block must be positive");
    c->stat_rows = stat_rows;
    c->stat_block = mods.stats.row_block;
    c->stat_reduce = mods.stats.reduce;
    if (mods.stats.layers.empty()) {
      std::fill(stat_layer.begin(), stat_layer.end(), true);
    } else {
      for (int64_t l : mods.stats.layers) {
        KVD_CHECK(l >= 0 && l < cfg_.num_layers, ctx, ": stats layer ", l, " out of range");
        stat_layer[l] = true;
      }
    }
  }

  const at::Tensor cs = rope_cos_sin(positions);  // (2, B, 1, S, hd)
  c->cos = cs[0];                                 // (B, 1, S, hd)
  c->sin = cs[1];
  c->B = B;
  c->S = S;
  c->H = cfg_.num_heads;
  c->Hkv = cfg_.num_kv_heads;
  c->hd = cfg_.head_dim;
  c->scale = 1.0 / std::sqrt(static_cast<double>(cfg_.head_dim));
  c->eps = cfg_.rms_norm_eps;
  c->qk_norm = cfg_.qk_norm;
  c->acc = dtype_ == torch::kDouble ? torch::kDouble : torch::kFloat;
  c->kernels = mods.kernels;
  c->grad = torch::GradMode::is_enabled();

  const bool checkpoint = checkpointing == ActivationCheckpointing::Layers && torch::GradMode::is_enabled();
  ForwardOutput out;
  out.attention_stats.resize(cfg_.num_layers);
  for (int64_t l = 0; l < cfg_.num_layers; ++l) {
    const LayerWeights& lw = w_.layers[l];
    if (!checkpoint) {
      at::Tensor h = rms_norm(x, lw.input_norm, cfg_.rms_norm_eps, c->kernels);  // (B, S, d)
      LayerMods m;
      if (mods.layer_hook) m = mods.layer_hook(LayerInput{l, h, positions, doc_ids, T});
      LayerResult r = train_layer(*c, lw, m, stat_layer[l], x, h);
      x = r.x;
      out.attention_stats[l] = r.stats;
      continue;
    }
    // Checkpointed: the hook runs here, in the graph; the rest of the layer in CheckpointedLayer.
    at::Tensor h;  // (B, S, d), only when a hook needs it
    LayerMods m;
    if (mods.layer_hook) {
      h = rms_norm(x, lw.input_norm, cfg_.rms_norm_eps, c->kernels);
      m = mods.layer_hook(LayerInput{l, h, positions, doc_ids, T});
    }
    auto run = c10::make_intrusive<CheckpointedLayerRun>();
    run->ctx = c;
    run->w = lw;
    run->pair_bias = m.pair_bias;
    run->key_log_mask_delay = m.key_log_mask_delay;
    run->want_stats = stat_layer[l];
    run->autocast_cuda = at::autocast::is_autocast_enabled(c10::DeviceType::CUDA);
    run->autocast_cuda_dtype = at::autocast::get_autocast_dtype(c10::DeviceType::CUDA);
    run->autocast_cpu = at::autocast::is_autocast_enabled(c10::DeviceType::CPU);
    run->autocast_cpu_dtype = at::autocast::get_autocast_dtype(c10::DeviceType::CPU);
    std::vector<at::Tensor> inputs;
    auto add = [&](const at::Tensor& t, int slot) {
      if (!t.defined()) return;
      inputs.push_back(t);
      run->slot_of_input.push_back(slot);
    };
    add(x, kX);
    add(h, kH);
    add(m.key_rate, kKeyRate);
    add(m.key_log_mask, kKeyLogMask);
    std::vector<LoraDelta*> d = lora_deltas(m.lora);
    for (size_t i = 0; i < d.size(); ++i) {
      // A half-defined delta is off in project(); keep it so.
      if (d[i]->defined()) {
        add(d[i]->a, kLoraFirst + 2 * static_cast<int>(i));
        add(d[i]->b, kLoraFirst + 2 * static_cast<int>(i) + 1);
      }
      run->lora_scale.push_back(d[i]->scale);
    }
    if (m.pair_bias) add(torch::empty({0}, x.options().dtype(torch::kFloat)).requires_grad_(), kAnchor);
    torch::autograd::variable_list r = CheckpointedLayer::apply(at::TensorList(inputs), run);
    x = r[0];
    if (stat_layer[l]) out.attention_stats[l] = r[1];
  }
  out.hidden = rms_norm(x, w_.final_norm, cfg_.rms_norm_eps, c->kernels);  // (B, S, d)
  return out;
}

// --- inference ------------------------------------------------------------------------------------------------

at::Tensor Model::prefill(const at::Tensor& ids_in, KVCache& cache, LogitsMode mode,
                          const PrefillObserver& observer, const std::vector<int64_t>& lead_in) const {
  torch::NoGradGuard no_grad;
  const char* ctx = "Model::prefill";
  at::Tensor ids = check_ids(ids_in, cfg_.vocab_size, ctx).to(device_);  // (B, T)
  const int64_t B = ids.size(0), T = ids.size(1);
  KVD_CHECK(T > 0, ctx, ": empty input");
  KVD_CHECK(cache.batch() == B && cache.num_layers() == cfg_.num_layers && cache.num_kv_heads() == cfg_.num_kv_heads &&
                cache.head_dim() == cfg_.head_dim,
            ctx, ": the cache (batch ", cache.batch(), ", ", cache.num_layers(), " layers, ", cache.num_kv_heads(),
            " kv heads, head_dim ", cache.head_dim(), ") does not fit this model and batch ", B);
  KVD_CHECK(cache.dtype() == dtype_ && cache.device() == device_, ctx,
            ": the cache's dtype / device differ from the model's; create it with Model::new_cache");
  KVD_CHECK(lead_in.empty() || static_cast<int64_t>(lead_in.size()) == B, ctx, ": lead has ", lead_in.size(),
            " entries for a batch of ", B);
  const bool padded = std::any_of(lead_in.begin(), lead_in.end(), [](int64_t x) { return x != 0; });
  std::vector<int64_t> lead = padded ? lead_in : std::vector<int64_t>();
  for (int64_t x : lead) KVD_CHECK(x >= 0 && x <= T, ctx, ": lead ", x, " outside [0, T = ", T, "]");
  const int64_t H = cfg_.num_heads, Hkv = cfg_.num_kv_heads, hd = cfg_.head_dim, G = H / Hkv;
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));

  // Row b's real tokens get positions next_position(b), +1, ...; padding rows get -1.
  const std::vector<int64_t>& next = cache.next_positions();
  const bool same_start = std::all_of(next.begin(), next.end(), [&](int64_t p) { return p == next[0]; });
  at::Tensor qpos;  // (B, T)
  at::Tensor pad_rows;  // (B, 1, T, 1) bool, padding query rows; undefined without padding
  if (!padded && same_start) {
    qpos = torch::arange(next[0], next[0] + T, ids.options()).view({1, T}).expand({B, T});
  } else {
    at::Tensor t = torch::arange(T, ids.options()).view({1, T});                                     // (1, T)
    at::Tensor first = host_ints(next, device_).view({B, 1});                   // (B, 1)
    at::Tensor ld = host_ints(padded ? lead : std::vector<int64_t>(B, 0), device_).view({B, 1});
    at::Tensor real = t.ge(ld);                                                                      // (B, T)
    qpos = torch::where(real, first + t - ld, torch::full_like(t - ld, -1));                         // (B, T)
    if (padded) pad_rows = real.logical_not().view({B, 1, T, 1});
  }
  ProfileLap lap(device_, T == 1 ? "decode " : "prefill ");
  // Where the chunk is not a plain causal prefill it runs flash attention's variable-length form (models/
  // attention.h, ChunkAttention): into an empty layer over the rows' real tokens packed end to end (the packing
  // built once for every layer), over stored entries on each head's segment of the cache in place.
  const bool flash = chunk_attention() == ChunkAttention::Flash &&
                     varlen_flash_applies(device_, dtype_, hd, cfg_.sliding_window.has_value());
  PackedRows packed;
  const at::Tensor cs = rope_cos_sin(qpos.clamp_min(0));  // (2, B, 1, T, hd)
  const at::Tensor cos = cs[0], sin = cs[1];

  const KernelPath ops = kInferenceRowOps;
  at::Tensor x = at::embedding(w_.embed, ids);  // (B, T, d)
  for (int64_t l = 0; l < cfg_.num_layers; ++l) {
    const LayerWeights& lw = w_.layers[l];
    at::Tensor h = rms_norm(x, lw.input_norm, cfg_.rms_norm_eps, ops);  // (B, T, d)
    // Attention against the cache: this chunk's K/V are appended, then the chunk attends to every stored entry
    // by its stored position.
    const AttendFn attend = [&](const LayerQKV& p) -> at::Tensor {
      const at::Tensor& q = p.q;
      const at::Tensor& k = p.k;
      const at::Tensor& v = p.v;
      const at::Tensor& q_pre = p.q_pre;
      const bool fresh = cache.max_length(l) == 0;
      lap("qkv+rope");
      cache.append(l, k, v, qpos, lead);
      lap("cache.append");
      const std::vector<int64_t>& len = cache.lengths(l);
      const int64_t n = cache.max_length(l);
      const bool uneven = std::any_of(len.begin(), len.end(), [n](int64_t x) { return x != n; });

      // The masks below are built as small as the case allows: none for a plain causal prefill or a decode
      // step, (B, 1, T, n) when the heads of a row hold the same entries, per KV head otherwise.
      at::Tensor attn;  // (B, H, T, hd)
      const bool window = cfg_.sliding_window.has_value();
      const bool simple = !padded && !window && !uneven;
      if (simple && fresh) {
        const KVLayerView view = cache.layer(l);  // k, v (B, H_kv, T, hd): views of the storage
        attn = at::scaled_dot_product_attention(q, view.k, view.v, {}, 0.0, /*is_causal=*/true, scale, true);
      } else if (flash && fresh) {
        if (!packed.index.defined()) packed = pack_left_padded(lead, T, device_);
        attn = varlen_causal_flash(q, k, v, packed, scale);  // (B, H, T, hd); k, v: this chunk's, the layer's only
      } else if (simple && T == 1) {
        // Every stored entry is in the past of the one query.
        const KVLayerView view = cache.layer(l);  // views of the storage (heads of equal counts)
        attn = at::scaled_dot_product_attention(q, view.k, view.v, {}, 0.0, false, scale, true);
      } else if (flash) {
        // Every stored entry precedes the chunk, which follows them in each head's segment: bottom-right causal.
        attn = segment_causal_flash(q, cache.segments(l), scale);  // (B, H, T, hd)
      } else {
        const KVLayerView view = cache.layer(l);  // k, v (B, H_kv, n, hd); pos (B, H_kv, n)
        lap("cache.layer");
        if (simple) {
          // Entries before this chunk are all visible; the chunk's own T entries are the last T, causally.
          at::Tensor j = torch::arange(view.n, qpos.options()).view({1, view.n});  // (1, n)
          at::Tensor t = torch::arange(T, qpos.options()).view({T, 1});           // (T, 1)
          at::Tensor mask = j.lt(t + (view.n - T + 1)).view({1, 1, T, view.n});  // (1, 1, T, n)
          attn = grouped_sdpa(q, view.k, view.v, mask, false, scale);
        } else {
          // Key j of head h is visible to query t iff its stored position <= the query's (and within the window,
          // and valid). Padding query rows see every valid key (their output is discarded; this keeps it finite).
          // Per-head masks where a row's heads differ: in their counts, or (for a sliding window, the one mask
          // that compares positions of entries older than this chunk) in which positions they kept.
          bool per_head = window && !cache.heads_aligned(l);
          for (int64_t b = 0; b < B && !per_head; ++b)
            for (int64_t hh = 1; hh < Hkv; ++hh) per_head |= len[b * Hkv + hh] != len[b * Hkv];
          at::Tensor kpos = per_head ? view.pos : view.pos.narrow(1, 0, 1);  // (B, H_kv | 1, n)
          at::Tensor kp = kpos.unsqueeze(2);                                 // (B, H_kv | 1, 1, n)
          at::Tensor qp = qpos.view({B, 1, T, 1});                           // (B, 1, T, 1)
          at::Tensor mask = kp.le(qp);                                       // (B, H_kv | 1, T, n)
          if (window) mask = mask.logical_and((qp - kp).lt(*cfg_.sliding_window));
          at::Tensor valid;  // (B, H_kv | 1, 1, n)
          if (view.valid.defined()) {
            valid = (per_head ? view.valid : view.valid.narrow(1, 0, 1)).unsqueeze(2);
            mask = mask.logical_and(valid);
          }
          if (pad_rows.defined()) {
            at::Tensor all = valid.defined() ? valid : torch::ones_like(kp, kp.options().dtype(torch::kBool));
            mask = torch::where(pad_rows, all, mask);  // (B, H_kv | 1, T, n)
          }
          if (per_head) mask = mask.unsqueeze(2).expand({B, Hkv, G, T, view.n}).reshape({B, H, T, view.n});  // (B, H, T, n)
          lap("mask");
          attn = grouped_sdpa(q, view.k, view.v, mask, false, scale);
        }
      }
      lap("attention");
      if (observer) observer(PrefillLayerObservation{l, h, q_pre, q, qpos, lead, ids}, cache);
      if (observer) lap("observer");
      return attn;
    };
    x = decoder_layer(lw, LayerLora(), nullptr, cos, sin, H, Hkv, hd, cfg_.qk_norm, cfg_.rms_norm_eps, x, h, attend,
                      ops);
    lap("o_proj+mlp");
  }
  if (padded) {
    std::vector<int64_t> adv(B);
    for (int64_t b = 0; b < B; ++b) adv[b] = T - lead[b];
    cache.advance(adv);
  } else {
    cache.advance(T);
  }
  if (mode == LogitsMode::LastPosition) x = x.narrow(1, T - 1, 1);  // (B, 1, d)
  at::Tensor hid = rms_norm(x, w_.final_norm, cfg_.rms_norm_eps, ops);  // (B, T|1, d)
  at::Tensor lg = logits(hid).to(torch::kFloat);                    // (B, T|1, V)
  lap("lm_head");
  return mode == LogitsMode::LastPosition ? lg.squeeze(1) : lg;
}

ExtraRowsOutput Model::forward_extra(const KVCache& cache, const AttentionMods& mods,
                                    const ExtraRowsObserver& observer) const {
  const char* ctx = "Model::forward_extra";
  const ExtraRows& ex = mods.extra;
  const int64_t n = ex.count(), B = cache.batch();
  KVD_CHECK(n > 0, ctx, ": no extra rows (AttentionMods::extra.embeddings is empty)");
  KVD_CHECK(cache.num_layers() == cfg_.num_layers && cache.num_kv_heads() == cfg_.num_kv_heads &&
                cache.dtype() == dtype_ && cache.device() == device_,
            ctx, ": the cache does not belong to this model; create it with Model::new_cache");
  KVD_CHECK(!mods.stats.wanted() && !mods.lora_row_mask.defined(), ctx,
            ": statistics and LoRA row masks are implied (every extra row); leave stats / lora_row_mask empty");
  at::Tensor e = ex.embeddings;
  if (e.dim() == 2) e = e.unsqueeze(0).expand({B, n, e.size(1)});  // (B, n, d)
  KVD_CHECK(e.dim() == 3 && e.size(0) == B && e.size(2) == cfg_.hidden_size, ctx,
            ": extra embeddings must be (n, d) or (B, n, d) with d = ", cfg_.hidden_size, ", got ", ex.embeddings.sizes());
  KVD_CHECK(ex.positions.defined(), ctx, ": extra rows need positions");
  at::Tensor pos = ex.positions.to(device_, torch::kLong);
  if (pos.dim() == 1) pos = pos.unsqueeze(0).expand({B, n});  // (B, n)
  KVD_CHECK(pos.dim() == 2 && pos.size(0) == B && pos.size(1) == n, ctx, ": extra positions must be (n) or (B, n), got ",
            ex.positions.sizes());
  const int64_t H = cfg_.num_heads, Hkv = cfg_.num_kv_heads, hd = cfg_.head_dim, G = H / Hkv;
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
  const c10::ScalarType acc = dtype_ == torch::kDouble ? torch::kDouble : torch::kFloat;
  const at::Tensor cs = rope_cos_sin(pos);  // (2, B, 1, n, hd)
  const LoraRows all_rows{at::Tensor(), 0, n};
  // Rows placed after the cache attend through flash attention where it applies (models/attention.h, ChunkAttention).
  const bool after_cache = ex.placement == ExtraPlacement::AfterCache && n > 1 &&
                           chunk_attention() == ChunkAttention::Flash &&
                           varlen_flash_applies(device_, dtype_, hd, cfg_.sliding_window.has_value());
  // Extra row i sees extra row j <= i.
  const at::Tensor causal = torch::ones({n, n}, pos.options().dtype(torch::kBool)).tril();  // (n, n)

  ExtraRowsOutput out;
  out.attention_to_cache.resize(cfg_.num_layers);
  const KernelPath ops = kInferenceRowOps;
  at::Tensor x = e.to(device_, dtype_);  // (B, n, d)
  for (int64_t l = 0; l < cfg_.num_layers; ++l) {
    const LayerWeights& lw = w_.layers[l];
    at::Tensor h = rms_norm(x, lw.input_norm, cfg_.rms_norm_eps, ops);  // (B, n, d)
    LayerMods m;
    if (mods.layer_hook) m = mods.layer_hook(LayerInput{l, h, pos, at::Tensor(), 0});
    KVD_CHECK(!m.changes_attention(), ctx, ": layer hooks of extra rows may return LoRA only");
    const AttendFn attend = [&](const LayerQKV& p) -> at::Tensor {
      const bool fused = ex.attention == ExtraAttention::Fused;
      if (fused && after_cache) {
        // Every stored entry is in the rows' past: the cache's segments in place, no mask, no concatenated copy.
        at::Tensor attn = segment_then_rows_flash(p.q, cache.segments(l), p.k.to(dtype_), p.v.to(dtype_), scale);
        if (observer) observer(ExtraRowsLayerObservation{l, h, p.q, p.k, p.v, pos}, cache.layer(l));
        return attn;  // (B, H, n, hd)
      }
      const KVLayerView kv = cache.layer(l);  // k, v (B, H_kv, nc, hd); pos (B, H_kv, nc)
      const int64_t nc = kv.n;
      // Batch rows [b0, b0 + nb) at a time, each block's probabilities (or mask) within ex.prob_bytes.
      // Fused: one mask per row when its heads hold the same positions (nothing evicted per head), else per head.
      const bool head_mask = fused && !cache.heads_aligned(l);
      const int64_t row_bytes = fused ? (head_mask ? H : 1) * n * (nc + n)
                                      : H * n * (nc + n) * static_cast<int64_t>(c10::elementSize(acc));
      const int64_t rows = std::clamp<int64_t>(ex.prob_bytes / std::max<int64_t>(row_bytes, 1), 1, B);
      std::vector<at::Tensor> att, res;
      for (int64_t b0 = 0; b0 < B; b0 += rows) {
        const int64_t nb = std::min(rows, B - b0);
        auto r = [&](const at::Tensor& t) { return t.narrow(0, b0, nb); };
        at::Tensor keys = torch::cat({r(kv.k), r(p.k).to(kv.k.scalar_type())}, 2);  // (nb, H_kv, nc + n, hd)
        at::Tensor vals = torch::cat({r(kv.v), r(p.v).to(kv.v.scalar_type())}, 2);  // (nb, H_kv, nc + n, hd)
        at::Tensor qp = r(pos).view({nb, 1, n, 1});                                  // (nb, 1, n, 1)
        at::Tensor see = r(kv.pos).unsqueeze(2).le(qp);                              // (nb, H_kv, n, nc)
        if (kv.valid.defined()) see = see.logical_and(r(kv.valid).unsqueeze(2));
        at::Tensor mine = causal.view({1, 1, n, n}).expand({nb, Hkv, n, n});         // (nb, H_kv, n, n)
        if (cfg_.sliding_window) {
          see = see.logical_and((qp - r(kv.pos).unsqueeze(2)).lt(*cfg_.sliding_window));
          mine = mine.logical_and((qp - r(pos).view({nb, 1, 1, n})).lt(*cfg_.sliding_window));
        }
        at::Tensor vis = torch::cat({see, mine}, 3);                                 // (nb, H_kv, n, nc + n)
        if (fused) {
          if (!head_mask) {
            vis = vis.narrow(1, 0, 1);  // (nb, 1, n, nc + n)
          } else if (G > 1) {
            vis = vis.unsqueeze(2).expand({nb, Hkv, G, n, nc + n}).reshape({nb, H, n, nc + n});  // (nb, H, n, nc + n)
          }
          res.push_back(grouped_sdpa(r(p.q), keys, vals, vis, false, scale));  // (nb, H, n, hd)
          continue;
        }
        at::Tensor bias = torch::zeros(vis.sizes(), vis.options().dtype(acc))
                              .masked_fill(vis.logical_not(), -std::numeric_limits<double>::infinity());
        at::Tensor pr = grouped_probs(r(p.q), keys, bias, scale);  // (nb, H_kv, G, n, nc + n)
        att.push_back(pr.narrow(-1, 0, nc).mean(3).reshape({nb, H, nc}));  // (nb, H, nc)
        res.push_back(torch::matmul(pr.to(vals.scalar_type()), vals.unsqueeze(2)).reshape({nb, H, n, hd}));
      }
      if (!att.empty()) out.attention_to_cache[l] = att.size() == 1 ? att[0] : torch::cat(att, 0);  // (B, H, nc)
      if (observer) observer(ExtraRowsLayerObservation{l, h, p.q, p.k, p.v, pos}, kv);
      return res.size() == 1 ? res[0] : torch::cat(res, 0);  // (B, H, n, hd)
    };
    x = decoder_layer(lw, m.lora, m.lora.any() ? &all_rows : nullptr, cs[0], cs[1], H, Hkv, hd, cfg_.qk_norm,
                      cfg_.rms_norm_eps, x, h, attend, ops);
  }
  out.hidden = rms_norm(x, w_.final_norm, cfg_.rms_norm_eps, ops);  // (B, n, d)
  return out;
}

at::Tensor Model::decode(const at::Tensor& ids, KVCache& cache, const PrefillObserver& observer) const {
  KVD_CHECK(ids.dim() == 2 && ids.size(1) == 1, "Model::decode: ids must be (B, 1), got ", ids.sizes());
  return prefill(ids, cache, LogitsMode::LastPosition, observer);  // (B, V)
}

void Model::decode_static(StaticDecodeState& s) const {
  torch::NoGradGuard no_grad;
  const int64_t B = s.batch, H = cfg_.num_heads, Hkv = cfg_.num_kv_heads, hd = cfg_.head_dim;
  KVD_CHECK(s.kv_heads == Hkv && s.head_dim == hd && static_cast<int64_t>(s.k.size()) == cfg_.num_layers,
            "Model::decode_static: the state was made for another model");
  const KernelPath ops = kInferenceRowOps;
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
  const at::Tensor cs = rope_cos_sin(s.qpos);              // (2, B, 1, 1, hd)
  at::Tensor x = at::embedding(w_.embed, s.tok);            // (B, 1, d)
  const at::Tensor qpos = s.qpos.view({B});                 // (B)
  for (int64_t l = 0; l < cfg_.num_layers; ++l) {
    const LayerWeights& lw = w_.layers[l];
    at::Tensor h = rms_norm(x, lw.input_norm, cfg_.rms_norm_eps, ops);  // (B, 1, d)
    const AttendFn attend = [&](const LayerQKV& p) -> at::Tensor {
      // This step's entry goes to slot len[s] of segment s = b * H_kv + h, then every head attends over its own
      // len[s] + 1 entries.
      DecodeAppend app;
      app.k = p.k.reshape({B, Hkv, hd}).to(s.k[l].scalar_type());
      app.v = p.v.reshape({B, Hkv, hd}).to(s.v[l].scalar_type());
      app.qpos = qpos;
      app.start = s.start;
      app.len = s.len[l];
      app.k_store = s.k[l];
      app.v_store = s.v[l];
      app.pos_store = s.pos[l];
      decode_append(app, ops);
      if (s.evictor) {  // the rows that feed this step gained one entry per KV head; peaks count them here
        s.entries.add_(s.alive.to(torch::kLong) * Hkv);
        s.peak.copy_(torch::maximum(s.peak, s.entries));
        s.peak_total.copy_(torch::maximum(s.peak_total, s.entries.sum().view({1})));
      }
      DecodeAttentionInput in;
      in.q = p.q.reshape({B, H, hd});
      in.k = s.k[l];
      in.v = s.v[l];
      in.start = s.start;
      in.len = s.len[l];
      in.max_len = s.capacity;
      in.scale = scale;
      if (cfg_.sliding_window) {
        in.window = *cfg_.sliding_window;
        in.kpos = s.pos[l];
        in.qpos = qpos;
      }
      if (s.evictor) {  // slots the evictor emptied hold position -1
        in.kpos = s.pos[l];
        in.empty_slots = EmptySlots::NegativePosition;
      }
      at::Tensor out = decode_attention(in);  // (B, H, hd)
      if (s.evictor) s.evictor->on_layer(l, in.q, h, s);
      return out.view({B, H, 1, hd});  // (B, H, 1, hd)
    };
    x = decoder_layer(lw, LayerLora(), nullptr, cs[0], cs[1], H, Hkv, hd, cfg_.qk_norm, cfg_.rms_norm_eps, x, h, attend,
                      ops);
  }
  at::Tensor hid = rms_norm(x, w_.final_norm, cfg_.rms_norm_eps, ops);  // (B, 1, d)
  at::Tensor next = logits(hid).to(torch::kFloat).argmax(-1);           // (B, 1)
  s.tok.copy_(next);
  s.history.index_copy_(0, s.step, next.view({1, B}));
  s.step.add_(1);
  s.qpos.add_(1);
  if (s.evictor) {
    // A row feeds the next step unless this one gave it an eos token or its last allowed one.
    s.fed.add_(s.alive.to(torch::kLong));
    const at::Tensor stop = next.view({B, 1}).eq(s.eos.view({1, -1})).any(1);  // (B)
    s.alive.logical_and_(stop.logical_not()).logical_and_(s.fed.lt(s.limit));
  }
}

// --- positions ----------------------------------------------------------------------------------------------

at::Tensor document_positions(const at::Tensor& doc_ids) {  // (B, T)
  KVD_CHECK(doc_ids.dim() == 2, "document_positions: doc_ids must be (B, T), got ", doc_ids.sizes());
  const int64_t B = doc_ids.size(0), T = doc_ids.size(1);
  if (T == 0) return torch::empty({B, 0}, doc_ids.options().dtype(torch::kLong));
  at::Tensor d = doc_ids.to(torch::kLong);
  at::Tensor idx = torch::arange(T, d.options()).view({1, T}).expand({B, T});  // (B, T)
  at::Tensor start = torch::ones({B, 1}, d.options().dtype(torch::kBool));     // (B, 1)
  at::Tensor change = torch::cat({start, d.narrow(1, 1, T - 1).ne(d.narrow(1, 0, T - 1))}, 1);  // (B, T)
  at::Tensor starts = std::get<0>(torch::where(change, idx, torch::zeros_like(idx)).cummax(1));   // (B, T)
  return idx - starts;
}

at::Tensor sequential_positions(int64_t batch, int64_t T, c10::Device device) {
  return torch::arange(T, torch::TensorOptions().dtype(torch::kLong).device(device))
      .view({1, T})
      .expand({batch, T})
      .contiguous();  // (B, T)
}

}  // namespace kvd
