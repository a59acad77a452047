// The small row ops of a decoder layer at inference (RMSNorm with an optional residual add, RoPE, SiLU · up, and
// the fixed-shape cache append of a decode step) for LibTorch callers: each runs its fused kernel
// (kernels/decode_step.cuh) with KernelPath::Fused where the kernel applies, and otherwise the LibTorch
// reference, which is the code the decoder has always run (HF's rounding order; autograd works through it).
//
// The fused kernels apply to a CUDA build, CUDA bf16 tensors, no tensor that requires grad under grad mode, and
// the layouts stated per op; they never synchronize, so a CUDA graph can capture them. RMSNorm, RoPE and SiLU · up
// also have a training form: where an input needs a gradient under grad mode (RMSNorm's w, RoPE's cos / sin
// frozen), Fused runs the same forward kernel and a backward kernel through autograd (kernels::rms_norm_bwd, rope's
// transposed pass, kernels::silu_mul_bwd). The append never takes gradients.
#pragma once

#include <utility>

#include <ATen/core/Tensor.h>

#include "models/kernel_path.h"

namespace kvd {

// HF RMSNorm over the last dim: w · (x / sqrt(mean(x²) + eps)), normalized in float32 (float64 stays float64),
// cast back to x's dtype, then scaled in it. x (..., n), w (n). Fused: x dense with a unit last stride; the result
// has x's strides. May differ from the reference by up to 2 bf16 units in the last place: the mean is summed in
// another order, which can move bf16(x · r) by 1 unit, and the product with w by 2 (measured on an H200: 2).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps, KernelPath path = KernelPath::Reference);

// sum = x + residual (in x's dtype), and rms_norm(sum). x and residual (..., n) of one shape. Fused: both contiguous.
struct AddRmsNorm {
  at::Tensor sum;     // (..., n)
  at::Tensor normed;  // (..., n)
};
AddRmsNorm add_rms_norm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& w, double eps,
                        KernelPath path = KernelPath::Reference);

// x · cos + rotate_half(x) · sin with HF's half-split layout, for q (B, H, S, hd) and k (B, H_kv, S, hd) at once;
// cos / sin (B, 1, S, hd). Fused: q and k laid out (B, S, heads, hd) in memory (a projection's output viewed and
// transposed), cos / sin contiguous; the results have the same layout. Bitwise equal to the reference.
std::pair<at::Tensor, at::Tensor> rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                       const at::Tensor& sin, KernelPath path = KernelPath::Reference);

// silu(g) · u, rounded to the dtype after the silu and after the product (as LibTorch computes it). Fused: g and u
// contiguous, of one shape.
at::Tensor silu_mul(const at::Tensor& g, const at::Tensor& u, KernelPath path = KernelPath::Reference);

// One decode step's entry per (request, KV head) into flat per-head storages (models/static_decode.h): segment
// s = b · H_kv + h gets k[b, h], v[b, h] and position qpos[b] at row start[s] + len[s], then len[s] += 1. Every
// index stays on the device. Fused: k / v / storages contiguous.
struct DecodeAppend {
  at::Tensor k;          // (B, H_kv, hd) keys after RoPE, in the storage dtype
  at::Tensor v;          // (B, H_kv, hd)
  at::Tensor qpos;       // (B) int64
  at::Tensor start;      // (B · H_kv) int64
  at::Tensor len;        // (B · H_kv) int64, updated in place
  at::Tensor k_store;    // (rows, hd), written in place
  at::Tensor v_store;    // (rows, hd)
  at::Tensor pos_store;  // (rows) int64
};
void decode_append(const DecodeAppend& a, KernelPath path = KernelPath::Reference);

// Whether the fused kernels can run on these tensors at all: a CUDA build, CUDA bf16 tensors (int64 ones are
// ignored), none requiring grad while grad mode is on. Each op checks its layouts on top of this.
bool row_kernels_apply(std::initializer_list<at::Tensor> ts);

}  // namespace kvd
