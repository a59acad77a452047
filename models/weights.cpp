#include "models/weights.h"

#include <cstring>
#include <sstream>
#include <unordered_set>

#include "common/error.h"
#include "models/config.h"
#include "models/safetensors.h"

namespace kvd {
namespace {

std::string shape_str(const std::vector<int64_t>& s) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

bool torch_dtype_of(DType d, c10::ScalarType* out) {
  switch (d) {
    case DType::F32: *out = c10::kFloat; return true;
    case DType::F16: *out = c10::kHalf; return true;
    case DType::BF16: *out = c10::kBFloat16; return true;
    case DType::F64: *out = c10::kDouble; return true;
    case DType::I64: *out = c10::kLong; return true;
    case DType::I32: *out = c10::kInt; return true;
    case DType::I16: *out = c10::kShort; return true;
    case DType::I8: *out = c10::kChar; return true;
    case DType::U8: *out = c10::kByte; return true;
    case DType::BOOL: *out = c10::kBool; return true;
    default: return false;
  }
}

}  // namespace

at::Tensor view_to_tensor(const TensorView& view) {
  c10::ScalarType st;
  KVD_CHECK(torch_dtype_of(view.dtype, &st), "tensor '", view.name, "': dtype ", dtype_name(view.dtype),
            " is not supported here");
  at::Tensor t = torch::empty(view.shape, torch::TensorOptions().dtype(st));  // shape of the view
  KVD_CHECK(static_cast<size_t>(t.nbytes()) == view.nbytes, "tensor '", view.name, "': ", view.nbytes,
            " bytes for shape ", shape_str(view.shape), " and dtype ", dtype_name(view.dtype));
  // A copy, not from_blob: the mapping may be unaligned for the dtype and must not outlive the file.
  if (view.nbytes) std::memcpy(t.data_ptr(), view.data, view.nbytes);
  return t;
}

at::Tensor view_to_param(const TensorView& view, c10::ScalarType dtype, c10::Device device) {
  KVD_CHECK(view.dtype == DType::F32 || view.dtype == DType::F16 || view.dtype == DType::BF16, "tensor '",
            view.name, "': weights must be F32, F16 or BF16, found ", dtype_name(view.dtype),
            " (quantized checkpoints: run `kvdistill convert` first)");
  at::Tensor t = view_to_tensor(view).to(device, dtype);  // same shape
  t.set_requires_grad(false);
  return t;
}

namespace {

struct Loader {
  const Checkpoint& ckpt;
  c10::ScalarType dtype;
  c10::Device device;
  std::unordered_set<std::string> used;

  at::Tensor get(const std::string& name, const std::vector<int64_t>& shape) {
    const TensorView* v = ckpt.find(name);
    KVD_CHECK(v != nullptr, ckpt.dir(), ": tensor '", name, "' (expected shape ", shape_str(shape),
              ") not found; is this checkpoint of the architecture config.json names?");
    KVD_CHECK(v->shape == shape, ckpt.dir(), ": tensor '", name, "': expected shape ", shape_str(shape),
              ", found ", shape_str(v->shape), "; config.json and the weights disagree");
    used.insert(name);
    return view_to_param(*v, dtype, device);
  }
};

}  // namespace

DecoderWeights load_weights(const Checkpoint& ckpt, const ModelConfig& cfg, c10::ScalarType dtype,
                            c10::Device device) {
  KVD_CHECK(dtype == c10::kFloat || dtype == c10::kBFloat16 || dtype == c10::kHalf || dtype == c10::kDouble,
            ckpt.dir(), ": model dtype must be a floating type");
  const int64_t d = cfg.hidden_size, hd = cfg.head_dim, H = cfg.num_heads, Hkv = cfg.num_kv_heads;
  const int64_t ffn = cfg.intermediate_size, V = cfg.vocab_size;
  KVD_CHECK(d > 0 && hd > 0 && H > 0 && Hkv > 0 && ffn > 0 && V > 0 && cfg.num_layers > 0, ckpt.dir(),
            ": config has a non-positive dimension");
  KVD_CHECK(H % Hkv == 0, ckpt.dir(), ": num_attention_heads ", H, " is not a multiple of num_key_value_heads ",
            Hkv);
  Loader L{ckpt, dtype, device, {}};
  DecoderWeights w;
  w.embed = L.get("model.embed_tokens.weight", {V, d});
  w.final_norm = L.get("model.norm.weight", {d});
  if (cfg.tie_word_embeddings) {
    w.lm_head = w.embed;
  } else {
    w.lm_head = L.get("lm_head.weight", {V, d});
  }
  w.layers.resize(cfg.num_layers);
  for (int64_t i = 0; i < cfg.num_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    LayerWeights& lw = w.layers[i];
    lw.input_norm = L.get(p + "input_layernorm.weight", {d});
    lw.post_norm = L.get(p + "post_attention_layernorm.weight", {d});
    lw.q_proj = L.get(p + "self_attn.q_proj.weight", {H * hd, d});
    lw.k_proj = L.get(p + "self_attn.k_proj.weight", {Hkv * hd, d});
    lw.v_proj = L.get(p + "self_attn.v_proj.weight", {Hkv * hd, d});
    lw.o_proj = L.get(p + "self_attn.o_proj.weight", {d, H * hd});
    if (cfg.attention_bias) {
      lw.q_bias = L.get(p + "self_attn.q_proj.bias", {H * hd});
      lw.k_bias = L.get(p + "self_attn.k_proj.bias", {Hkv * hd});
      lw.v_bias = L.get(p + "self_attn.v_proj.bias", {Hkv * hd});
    }
    if (cfg.o_proj_bias) lw.o_bias = L.get(p + "self_attn.o_proj.bias", {d});
    if (cfg.qk_norm) {
      lw.q_norm = L.get(p + "self_attn.q_norm.weight", {hd});
      lw.k_norm = L.get(p + "self_attn.k_norm.weight", {hd});
    }
    lw.gate_proj = L.get(p + "mlp.gate_proj.weight", {ffn, d});
    lw.up_proj = L.get(p + "mlp.up_proj.weight", {ffn, d});
    lw.down_proj = L.get(p + "mlp.down_proj.weight", {d, ffn});
  }
  // A tensor the config does not account for (e.g. o_proj.bias, a bias with attention_bias false) would be
  // silently ignored and give wrong outputs: refuse it. Rotary caches some exporters add are harmless.
  for (const std::string& name : ckpt.names()) {
    if (L.used.count(name)) continue;
    if (name == "lm_head.weight" && cfg.tie_word_embeddings) continue;
    if (name.find("rotary_emb.inv_freq") != std::string::npos) continue;
    KVD_FAIL(ckpt.dir(), ": tensor '", name, "' is not used by a ", family_name(cfg.family),
             " decoder with this config.json (unsupported variant?)");
  }
  return w;
}

int64_t weight_bytes(const DecoderWeights& w) {
  std::unordered_set<const void*> seen;
  int64_t total = 0;
  auto add = [&](const at::Tensor& t) {
    if (!t.defined()) return;
    if (!seen.insert(t.data_ptr()).second) return;
    total += static_cast<int64_t>(t.nbytes());
  };
  add(w.embed);
  add(w.final_norm);
  add(w.lm_head);
  for (const LayerWeights& l : w.layers) {
    for (const at::Tensor* t : {&l.input_norm, &l.q_proj, &l.k_proj, &l.v_proj, &l.o_proj, &l.q_bias, &l.k_bias,
                                &l.v_bias, &l.o_bias, &l.q_norm, &l.k_norm, &l.post_norm, &l.gate_proj, &l.up_proj,
                                &l.down_proj})
      add(*t);
  }
  return total;
}

}  // namespace kvd
