// Which code computes the training attention under mods and the capacity loss's soft cache size (config key
// train.kernels). Kept free of LibTorch headers so that run configs can name it.
#pragma once

namespace kvd {

enum class KernelPath {
  Fused,      // the fused CUDA kernels of kernels/ where they apply (CUDA tensors, bf16 attention with head
              // dim 64 / 128, no pair_bias); the reference path everywhere else (the CPU, float32 / float64)
  Reference,  // always the LibTorch reference paths: the explicit grouped softmax (models/attention.h) and the
              // tiled capacity sum (losses/capacity.h)
};

}  // namespace kvd
