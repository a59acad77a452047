#!/usr/bin/env python3
"""Golden files for tests/models/test_decoder.cpp: tiny random HF models of each family and their outputs.

For every case <name> it writes under --out/<name>/:
  config.json, model.safetensors     the model, as save_pretrained writes it (config rewritten to the classic
                                     hub layout: top-level rope_theta + rope_scaling, see below)
  golden.safetensors                 input_ids (B, T) int64, logits (B, T, V) float32,
                                     gen_prompt (1, T0) int64, gen_tokens (1, N) int64 (greedy, no eos stop),
                                     packed_ids (1, T1+T2) int64, packed_positions (1, T1+T2) int64,
                                     packed_doc_ids (1, T1+T2) int64, packed_logits (1, T1+T2, V) float32
                                     (each document run on its own, logits concatenated)
The references are transformers' eager attention in float32.
"""
import argparse
import json
import os

import torch
from safetensors.torch import save_file
import transformers
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, vocab_size=300, max_position_embeddings=256,
              rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, attn_implementation="eager")


def cases():
    yield "llama3", LlamaForCausalLM, LlamaConfig(
        **COMMON, rope_theta=10000.0,
        # original_max_position_embeddings 64 with head_dim 16: the wavelengths 2*pi*10000^(2i/16) are
        # 6.3 (< 64/4: kept), 19.9 and 62.8 (blended), 199 and up (divided by factor): every band of llama3
        # scaling is exercised.
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64},
        tie_word_embeddings=False)
    yield "llama_linear_tied", LlamaForCausalLM, LlamaConfig(
        **COMMON, rope_theta=500.0, rope_scaling={"rope_type": "linear", "factor": 2.0}, tie_word_embeddings=True)
    yield "mistral", MistralForCausalLM, MistralConfig(
        **COMMON, rope_theta=10000.0, sliding_window=8, tie_word_embeddings=False)
    yield "qwen2", Qwen2ForCausalLM, Qwen2Config(
        **COMMON, rope_theta=10000.0, use_sliding_window=False, tie_word_embeddings=False)
    yield "qwen3", Qwen3ForCausalLM, Qwen3Config(
        **COMMON, rope_theta=1000000.0, use_sliding_window=False, attention_bias=False,
        tie_word_embeddings=False)


def randomize(model, seed):
    """Weights with O(1) activations; biases and norm weights far from their trivial init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name or "lm_head" in name:
                p.copy_((0.7 if "embed" in name else 0.5) * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / (p.shape[-1] ** 0.5))


def classic_config(path, cfg):
    """transformers 5 writes rope_parameters; hub checkpoints (what users have) use rope_theta + rope_scaling."""
    with open(path) as f:
        j = json.load(f)
    rp = j.pop("rope_parameters", None) or {}
    j["rope_theta"] = rp.get("rope_theta", 10000.0)
    scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
    j["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling
    j.pop("layer_types", None)
    j.pop("dtype", None)
    j["torch_dtype"] = "float32"
    with open(path, "w") as f:
        json.dump(j, f, indent=2, sort_keys=True)


@torch.no_grad()
def feature_matters(name, cls, cfg, model, input_ids, logits):
    """The family feature each case exists for must change the logits, or the C++ test could not fail."""
    import copy
    variant = copy.deepcopy(model)
    if name in ("llama3", "llama_linear_tied"):
        c2 = copy.deepcopy(cfg)
        c2.rope_parameters = {"rope_type": "default", "rope_theta": cfg.rope_parameters["rope_theta"]}
        variant = cls(c2).eval().float()
        variant.load_state_dict(model.state_dict())
    elif name == "mistral":
        c2 = copy.deepcopy(cfg)
        c2.sliding_window = None
        variant = cls(c2).eval().float()
        variant.load_state_dict(model.state_dict())
    elif name == "qwen2":
        for layer in variant.model.layers:
            for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                p.bias.zero_()
    elif name == "qwen3":
        for layer in variant.model.layers:
            layer.self_attn.q_norm.weight.fill_(1.0)
            layer.self_attn.k_norm.weight.fill_(1.0)
    diff = (variant(input_ids).logits.float() - logits).abs().max().item()
    assert diff > 1e-2, (name, "feature does not change the logits", diff)
    print(f"{name}: without its feature the logits move by {diff:.3f}")


@torch.no_grad()
def greedy(model, prompt, n):
    ids = prompt.clone()
    for _ in range(n):
        nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids[:, prompt.shape[1]:]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model-dir")  # unused
    ap.add_argument("--gguf")       # unused
    args = ap.parse_args()
    torch.manual_seed(0)
    for i, (name, cls, cfg) in enumerate(cases()):
        d = os.path.join(args.out, name)
        os.makedirs(d, exist_ok=True)
        model = cls(cfg).eval().float()
        randomize(model, 1000 + i)
        if cfg.tie_word_embeddings:
            assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        model.save_pretrained(d, safe_serialization=True)
        classic_config(os.path.join(d, "config.json"), cfg)
        for extra in ("generation_config.json",):
            p = os.path.join(d, extra)
            if os.path.exists(p):
                os.remove(p)

        g = torch.Generator().manual_seed(2000 + i)
        V = cfg.vocab_size
        input_ids = torch.randint(3, V, (2, 40), generator=g)
        with torch.no_grad():
            logits = model(input_ids).logits.float()
        feature_matters(name, cls, cfg, model, input_ids, logits)

        gen_prompt = torch.randint(3, V, (1, 9), generator=g)
        gen_tokens = greedy(model, gen_prompt, 12)
        # Cross-check against transformers' own generate() with eos disabled.
        with torch.no_grad():
            hf = model.generate(gen_prompt, max_new_tokens=12, do_sample=False, eos_token_id=None,
                                pad_token_id=0, min_new_tokens=12)
        assert torch.equal(hf[:, gen_prompt.shape[1]:], gen_tokens), (name, hf, gen_tokens)

        T1, T2 = 13, 19
        doc1 = torch.randint(3, V, (1, T1), generator=g)
        doc2 = torch.randint(3, V, (1, T2), generator=g)
        with torch.no_grad():
            packed_logits = torch.cat([model(doc1).logits, model(doc2).logits], dim=1).float()
        packed_ids = torch.cat([doc1, doc2], dim=1)
        packed_positions = torch.cat([torch.arange(T1), torch.arange(T2)]).unsqueeze(0)
        packed_doc_ids = torch.cat([torch.zeros(T1, dtype=torch.long), torch.ones(T2, dtype=torch.long)]).unsqueeze(0)

        save_file({
            "input_ids": input_ids.contiguous(),
            "logits": logits.contiguous(),
            "gen_prompt": gen_prompt.contiguous(),
            "gen_tokens": gen_tokens.contiguous(),
            "packed_ids": packed_ids.contiguous(),
            "packed_positions": packed_positions.contiguous(),
            "packed_doc_ids": packed_doc_ids.contiguous(),
            "packed_logits": packed_logits.contiguous(),
        }, os.path.join(d, "golden.safetensors"))
        print(f"{name}: logits std {logits.std():.3f}, gen {gen_tokens.tolist()}")
    print("transformers", transformers.__version__)


if __name__ == "__main__":
    main()
