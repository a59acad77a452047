// Attention entry points shared by the decoder's inference and training paths.
#pragma once

#include <ATen/core/Tensor.h>

namespace kvd {

// Scaled dot-product attention with grouped K/V heads: q (B, H, T, hd), k / v (B, H_kv, n, hd) with H a
// multiple of H_kv (query head h reads KV head h / (H / H_kv)), mask undefined or boolean (true = visible),
// broadcastable to (B, H, T, n). Returns (B, H, T, hd). Unmasked calls run flash attention, which groups heads
// itself; masked ones on CUDA run the memory-efficient kernel on K/V repeated to H heads.
at::Tensor grouped_sdpa(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                        bool causal, double scale);

// Turns PyTorch's cuDNN attention backend off for the process; Model does this when it is loaded on CUDA
// (unless KVD_CUDNN_ATTENTION=1). Measured on an H100 (bench/cudnn_attention.sh, one batch of 16 samples at
// 2K): with cuDNN's attention on, the eval decoded AdaKV's per-head-ragged caches in 19.1 s instead of 1.0 s,
// SnapKV's in 3.0 s instead of 1.0 s, the full cache in 5.4 s instead of 1.1 s. Every decode step brings new
// key lengths, one per layer, and cuDNN plans per shape; an isolated loop of such calls did not show the
// slowdown, so its exact trigger is not pinned down.
void disable_cudnn_attention();

}  // namespace kvd
