// The frozen weights of a decoder as torch tensors, converted from a Checkpoint's byte views.
// Names follow the HF layout (model.layers.{i}.self_attn.q_proj.weight, ...); shapes are checked against the
// ModelConfig. Frozen weights never require grad.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

namespace kvd {

class Checkpoint;
struct ModelConfig;
struct TensorView;

// A view's bytes as a tensor of its own dtype (F32/F16/BF16/F64/I64/I32/I16/I8/U8/BOOL), copied out of the
// mapping into owned CPU memory. Throws kvd::Error naming the tensor for an unsupported dtype.
at::Tensor view_to_tensor(const TensorView& view);
// A floating-point view (F32/F16/BF16) converted to `dtype` on `device`; never requires grad.
at::Tensor view_to_param(const TensorView& view, c10::ScalarType dtype, c10::Device device);

struct LayerWeights {
  at::Tensor input_norm;  // (d)              input_layernorm.weight
  at::Tensor q_proj;      // (H*hd, d)
  at::Tensor k_proj;      // (H_kv*hd, d)
  at::Tensor v_proj;      // (H_kv*hd, d)
  at::Tensor o_proj;      // (d, H*hd)
  at::Tensor q_bias;      // (H*hd) or undefined (Qwen2; Llama with attention_bias)
  at::Tensor k_bias;      // (H_kv*hd) or undefined
  at::Tensor v_bias;      // (H_kv*hd) or undefined
  at::Tensor o_bias;      // (d) or undefined (Llama / Qwen3 with attention_bias)
  at::Tensor q_norm;      // (hd) or undefined (Qwen3)
  at::Tensor k_norm;      // (hd) or undefined (Qwen3)
  at::Tensor post_norm;   // (d)              post_attention_layernorm.weight
  at::Tensor gate_proj;   // (ffn, d)
  at::Tensor up_proj;     // (ffn, d)
  at::Tensor down_proj;   // (d, ffn)
};

struct DecoderWeights {
  at::Tensor embed;       // (V, d)  model.embed_tokens.weight
  std::vector<LayerWeights> layers;
  at::Tensor final_norm;  // (d)     model.norm.weight
  at::Tensor lm_head;     // (V, d)  lm_head.weight, or the same tensor as `embed` when tied
};

// Reads every tensor the config calls for. A missing tensor or a shape mismatch throws kvd::Error
// "<dir>: tensor '<name>': expected shape [a, b], found [c]". With tie_word_embeddings, lm_head.weight is
// not required (and ignored if present).
DecoderWeights load_weights(const Checkpoint& ckpt, const ModelConfig& cfg, c10::ScalarType dtype,
                            c10::Device device);

// Bytes held by the weights (tied tensors counted once).
int64_t weight_bytes(const DecoderWeights& w);

}  // namespace kvd
