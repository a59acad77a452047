// The small row kernels of one inference step (framework-free launchers; the LibTorch bindings and the references
// are kernels/decode_step.{h,cpp}). A decoder layer run op by op in LibTorch launches about 50 kernels, most of
// them elementwise pieces of RMSNorm, RoPE and SiLU; at decode these are tiny and the step is launch-bound. Each
// kernel here replaces one such chain with one launch, and rounds to bf16 where the LibTorch chain rounds, so it
// computes the same function (see each kernel for where it may differ):
//
//   rms_norm      y = w · bf16(x · rsqrt(mean(x²) + eps)), per row of n (HF's RMSNorm: x in fp32, the product with
//                 w in bf16). With `residual`: x = bf16(x + residual) first, written to `sum`. The mean's
//                 summation order differs from LibTorch's, so y may differ by up to 2 bf16 units in the last place.
//   rms_norm_bwd  its gradient with respect to x, for training (w frozen): with u = bf16(dy · w) and r as above,
//                 dx = bf16(r · u − x · r³ · mean(u · x)), the function LibTorch's autograd computes through the
//                 reference chain (there in several fp32 ops, here in one pass; up to a few units apart).
//   rope          the HF half-split rotation of q and k in one launch: out = bf16(bf16(x · cos) + bf16(rot(x) · sin)),
//                 rot(x) = (−x₂, x₁). Bitwise equal to LibTorch's chain. RopePass::Backward runs the transposed
//                 map on the gradients for training: dx₁ = bf16(bf16(dy₁ · cos₁) + bf16(dy₂ · sin₂)),
//                 dx₂ = bf16(bf16(dy₂ · cos₂) + bf16(−dy₁ · sin₁)), as LibTorch's autograd rounds it.
//   silu_mul      out = bf16(bf16(silu(g)) · u). silu(g) = g / (1 + exp(−g)) in fp32, as LibTorch computes it.
//   silu_mul_bwd  its gradients for training: du = bf16(dy · bf16(silu(g))), and with t = bf16(dy · u),
//                 dg = bf16(t · σ(g) · (1 + g · (1 − σ(g)))) (LibTorch's silu_backward in fp32).
//   decode_append one entry per (request, KV head) written at slot start[s] + len[s] of flat K / V / position
//                 storages, then len[s] += 1, all on the device (CUDA graphs replay it).
//
// All tensors are bf16 (uint16_t bits) and contiguous in the layouts given per argument.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace kvd::kernels {

struct RmsNormArgs {
  const uint16_t* x = nullptr;         // (rows, n)
  const uint16_t* residual = nullptr;  // (rows, n) or null
  const uint16_t* w = nullptr;         // (n)
  uint16_t* sum = nullptr;             // (rows, n): bf16(x + residual); needed with residual
  uint16_t* y = nullptr;               // (rows, n)
  int64_t rows = 0;
  int n = 0;
  float eps = 1e-6f;
};
cudaError_t rms_norm(const RmsNormArgs& a, cudaStream_t stream);

struct RmsNormBwdArgs {
  const uint16_t* x = nullptr;   // (rows, n) the normalized input (after any residual add)
  const uint16_t* w = nullptr;   // (n)
  const uint16_t* dy = nullptr;  // (rows, n) gradient of y
  uint16_t* dx = nullptr;        // (rows, n)
  int64_t rows = 0;
  int n = 0;
  float eps = 1e-6f;
};
cudaError_t rms_norm_bwd(const RmsNormBwdArgs& a, cudaStream_t stream);

enum class RopePass {
  Forward,   // q_out = rope(q), k_out = rope(k)
  Backward,  // q / k hold the gradients of rope's outputs; q_out / k_out get the gradients of its inputs
};

struct RopeArgs {
  RopePass pass = RopePass::Forward;
  const uint16_t* q = nullptr;    // (tokens, H, hd)
  const uint16_t* k = nullptr;    // (tokens, H_kv, hd)
  const uint16_t* cos = nullptr;  // (tokens, hd)
  const uint16_t* sin = nullptr;  // (tokens, hd)
  uint16_t* q_out = nullptr;      // (tokens, H, hd)
  uint16_t* k_out = nullptr;      // (tokens, H_kv, hd)
  int64_t tokens = 0;
  int H = 0, Hkv = 0, hd = 0;     // hd even, <= 2048
};
cudaError_t rope(const RopeArgs& a, cudaStream_t stream);

struct SiluMulArgs {
  const uint16_t* g = nullptr;  // (n)
  const uint16_t* u = nullptr;  // (n)
  uint16_t* out = nullptr;      // (n)
  int64_t n = 0;
};
cudaError_t silu_mul(const SiluMulArgs& a, cudaStream_t stream);

struct SiluMulBwdArgs {
  const uint16_t* g = nullptr;   // (n) the forward's inputs
  const uint16_t* u = nullptr;   // (n)
  const uint16_t* dy = nullptr;  // (n) gradient of out
  uint16_t* dg = nullptr;        // (n)
  uint16_t* du = nullptr;        // (n)
  int64_t n = 0;
};
cudaError_t silu_mul_bwd(const SiluMulBwdArgs& a, cudaStream_t stream);

struct DecodeAppendArgs {
  const uint16_t* k = nullptr;    // (B, H_kv, hd) this step's keys
  const uint16_t* v = nullptr;    // (B, H_kv, hd)
  const int64_t* qpos = nullptr;  // (B) their positions
  const int64_t* start = nullptr; // (B · H_kv) first row of each segment
  int64_t* len = nullptr;         // (B · H_kv) entries held; +1
  uint16_t* k_store = nullptr;    // flat rows (·, hd)
  uint16_t* v_store = nullptr;    // flat rows (·, hd)
  int64_t* pos_store = nullptr;   // flat (·)
  int B = 0, Hkv = 0, hd = 0;     // hd <= 1024
};
cudaError_t decode_append(const DecodeAppendArgs& a, cudaStream_t stream);

}  // namespace kvd::kernels
