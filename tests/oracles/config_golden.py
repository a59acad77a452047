"""Golden HF config.json files and the values transformers resolves from them, for tests/models/test_config.cpp.

Writes under --out:
  valid/<name>/config.json     written by transformers' config.save_pretrained (v5 form: rope_parameters),
                               or by hand in the legacy form found on the Hub (top-level rope_theta +
                               rope_scaling), for every supported family
  expected.json                {name: resolved values}; read back through transformers (AutoConfig) and,
                               for biases, q/k norms and sliding windows, from the modules of a model
                               instantiated from the config, so they mean what transformers does with them
  invalid/<name>/config.json   unsupported or broken configs
  invalid.json                 {name: [substrings the error must contain besides the path]}
"""
import argparse
import json
import shutil
from pathlib import Path

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config,
                          Qwen3Config)

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=97)

FAMILY = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}


def valid_configs():
    """name -> (a config object to save_pretrained, or a dict to write as config.json by hand)."""
    c = {}
    c["llama3_rope"] = LlamaConfig(
        **TINY, num_key_value_heads=2, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        tie_word_embeddings=True, bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
        architectures=["LlamaForCausalLM"])
    c["llama_bias_headdim"] = LlamaConfig(
        **TINY, num_key_value_heads=1, head_dim=32, attention_bias=True, max_position_embeddings=4096,
        architectures=["LlamaForCausalLM"])
    c["llama_mha_default"] = LlamaConfig(**TINY)  # no architectures (bare save_pretrained), kv heads = heads
    c["mistral_sliding"] = MistralConfig(**TINY, num_key_value_heads=2, sliding_window=4096,
                                         architectures=["MistralForCausalLM"])
    c["mistral_no_window"] = MistralConfig(**TINY, num_key_value_heads=2, sliding_window=None,
                                           rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                           architectures=["MistralForCausalLM"])
    c["qwen2"] = Qwen2Config(**TINY, num_key_value_heads=2, tie_word_embeddings=True,
                             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                             bos_token_id=151643, eos_token_id=151645, architectures=["Qwen2ForCausalLM"])
    c["qwen2_all_sliding"] = Qwen2Config(**TINY, num_key_value_heads=2, use_sliding_window=True,
                                         sliding_window=256, max_window_layers=0,
                                         architectures=["Qwen2ForCausalLM"])
    c["qwen2_window_unused"] = Qwen2Config(**TINY, num_key_value_heads=2, use_sliding_window=True,
                                           sliding_window=256, max_window_layers=28,
                                           architectures=["Qwen2ForCausalLM"])
    c["qwen3"] = Qwen3Config(**TINY, num_key_value_heads=2, head_dim=32, eos_token_id=[151645, 151643],
                             architectures=["Qwen3ForCausalLM"])
    c["qwen3_bias"] = Qwen3Config(**TINY, num_key_value_heads=4, head_dim=16, attention_bias=True,
                                  architectures=["Qwen3ForCausalLM"])
    # Legacy (transformers 4 / Hub) forms, by hand.
    c["legacy_llama32"] = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False, "mlp_bias": False,
        "hidden_act": "silu", **TINY, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True, "bos_token_id": 128000,
        "eos_token_id": 128001, "torch_dtype": "bfloat16", "pretraining_tp": 1, "use_cache": True,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    }
    c["legacy_linear"] = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", **TINY, "num_key_value_heads": 4,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "rope_theta": 10000, "hidden_act": "silu",
        "rope_scaling": {"type": "linear", "factor": 2.0}, "bos_token_id": None, "eos_token_id": None,
    }
    c["legacy_qwen2"] = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **TINY, "num_key_value_heads": 2,
        "max_position_embeddings": 32768, "max_window_layers": 21, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "sliding_window": 32768, "use_sliding_window": False, "tie_word_embeddings": True, "rope_scaling": None,
        "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16",
    }
    # Keys left out: transformers' class defaults apply (Qwen3: head_dim 128, no bos/eos; Mistral:
    # sliding_window 4096, num_key_value_heads 8, bos 1, eos 2).
    c["qwen3_no_head_dim"] = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **TINY,
                              "num_key_value_heads": 2, "max_position_embeddings": 40960}
    c["mistral_defaults"] = {"architectures": ["MistralForCausalLM"], "model_type": "mistral",
                             **{**TINY, "num_attention_heads": 16}, "max_position_embeddings": 32768,
                             "rope_theta": 1e6}
    return c


def resolved(d: Path):
    """What transformers makes of the config in `d`: its config values plus facts read off the modules."""
    cfg = AutoConfig.from_pretrained(d)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    attn = model.model.layers[0].self_attn
    rp = cfg.rope_parameters
    rope_type = rp.get("rope_type", "default")
    rope = {"default": "none", "linear": "linear", "llama3": "llama3"}[rope_type]
    eos = cfg.eos_token_id
    eos = [] if eos is None else (eos if isinstance(eos, list) else [eos])
    windows = {getattr(layer.self_attn, "sliding_window", None) for layer in model.model.layers}
    if cfg.model_type == "mistral":
        windows = {cfg.sliding_window}  # Mistral's attention reads config.sliding_window on every layer
    assert len(windows) == 1, windows
    out = {
        "family": FAMILY[cfg.model_type],
        "architecture": (cfg.architectures or [type(model).__name__])[0],
        "model_type": cfg.model_type,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": model.model.layers[0].mlp.up_proj.out_features,
        "num_layers": len(model.model.layers),
        "num_heads": cfg.num_attention_heads,
        "num_kv_heads": cfg.num_key_value_heads,
        "head_dim": attn.head_dim,
        "vocab_size": model.model.embed_tokens.num_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": model.model.norm.variance_epsilon,
        "rope_theta": float(rp["rope_theta"]),
        "rope_scaling": rope,
        "tie_word_embeddings": bool(cfg.tie_word_embeddings),
        "attention_bias": attn.q_proj.bias is not None,
        "o_proj_bias": attn.o_proj.bias is not None,
        "qk_norm": hasattr(attn, "q_norm"),
        "sliding_window": windows.pop(),
        "bos_token_id": cfg.bos_token_id,
        "eos_token_ids": eos,
    }
    assert attn.k_proj.bias is not None if out["attention_bias"] else attn.k_proj.bias is None
    assert attn.q_proj.out_features == out["num_heads"] * out["head_dim"]
    if rope != "none":
        out["rope_factor"] = float(rp["factor"])
    if rope == "llama3":
        out["rope_low_freq_factor"] = float(rp["low_freq_factor"])
        out["rope_high_freq_factor"] = float(rp["high_freq_factor"])
        out["rope_original_max_position"] = rp["original_max_position_embeddings"]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model-dir")  # unused
    ap.add_argument("--gguf")       # unused
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    expected = {}
    for name, c in valid_configs().items():
        d = out / "valid" / name
        if isinstance(c, dict):
            d.mkdir(parents=True)
            (d / "config.json").write_text(json.dumps(c, indent=2))
        else:
            c.save_pretrained(d)
        expected[name] = resolved(d)
    (out / "expected.json").write_text(json.dumps(expected, indent=1))

    # --- invalid variants, each a mutation of a config transformers wrote ---------------------------------
    base = json.loads((out / "valid" / "llama3_rope" / "config.json").read_text())
    qwen2 = json.loads((out / "valid" / "qwen2" / "config.json").read_text())
    invalid = {}

    def bad(name, needles, cfg=None, text=None):
        d = out / "invalid" / name
        d.mkdir(parents=True)
        (d / "config.json").write_text(text if text is not None else json.dumps(cfg, indent=2))
        invalid[name] = needles

    def mutate(src, **changes):
        c = json.loads(json.dumps(src))
        for k, v in changes.items():
            if v is ...:
                c.pop(k)
            else:
                c[k] = v
        return c

    bad("unknown_arch", ["architectures", "GPTNeoXForCausalLM"],
        mutate(base, architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox"))
    bad("unknown_model_type", ["model_type", "gemma"], mutate(base, architectures=..., model_type="gemma"))
    bad("arch_type_mismatch", ["model_type", "qwen2"], mutate(base, model_type="qwen2"))
    bad("no_family", ["architectures", "missing"], mutate(base, architectures=..., model_type=...))
    bad("hidden_act_gelu", ["hidden_act", "gelu"], mutate(base, hidden_act="gelu"))
    bad("rope_yarn", ["rope_parameters.rope_type", "yarn"],
        mutate(base, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                      "original_max_position_embeddings": 4096}))
    bad("rope_dynamic_legacy", ["rope_scaling.type", "dynamic"],
        mutate(base, rope_parameters=..., rope_theta=10000.0, rope_scaling={"type": "dynamic", "factor": 2.0}))
    bad("rope_llama3_missing_factor", ["rope_parameters.low_freq_factor", "missing"],
        mutate(base, rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0,
                                      "high_freq_factor": 4.0}))
    bad("rope_partial", ["partial_rotary_factor"],
        mutate(base, rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}))
    bad("rope_per_layer_type", ["rope_parameters", "per-layer-type"],
        mutate(base, rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4}}))
    bad("missing_heads", ["num_attention_heads", "missing"], mutate(base, num_attention_heads=...))
    bad("null_hidden_size", ["hidden_size", "must not be null"], mutate(base, hidden_size=None))
    bad("wrong_type_string", ["hidden_size", "expected an integer"], mutate(base, hidden_size="64"))
    bad("wrong_type_float", ["num_hidden_layers", "expected an integer"], mutate(base, num_hidden_layers=2.0))
    bad("wrong_type_bool", ["tie_word_embeddings", "expected true or false"], mutate(base, tie_word_embeddings=1))
    bad("wrong_type_eos", ["eos_token_id"], mutate(base, eos_token_id=[1, "2"]))
    bad("wrong_type_arch", ["architectures"], mutate(base, architectures="LlamaForCausalLM"))
    bad("negative_size", ["intermediate_size", "positive"], mutate(base, intermediate_size=-1))
    bad("kv_not_dividing", ["num_key_value_heads", "does not divide"], mutate(base, num_key_value_heads=3))
    bad("head_dim_odd", ["head_dim", "even"], mutate(base, head_dim=15))
    bad("hidden_not_divisible", ["head_dim", "not a multiple"], mutate(base, head_dim=..., hidden_size=66))
    bad("mlp_bias", ["mlp_bias"], mutate(base, mlp_bias=True))
    bad("rms_eps_zero", ["rms_norm_eps", "positive"], mutate(base, rms_norm_eps=0))
    bad("quantized", ["quantization_config"], mutate(base, quantization_config={"quant_method": "gptq"}))
    bad("qwen2_mixed_sliding", ["max_window_layers", "mixing sliding and full"],
        mutate(qwen2, use_sliding_window=True, sliding_window=128, max_window_layers=1, layer_types=...))
    bad("qwen2_bad_layer_types", ["layer_types"],
        mutate(qwen2, use_sliding_window=True, sliding_window=128, layer_types=["full_attention"]))
    bad("not_an_object", ["expected a JSON object"], text="[1, 2, 3]")
    text = json.dumps(base, indent=2)
    bad("truncated", ["not valid JSON"], text=text[: len(text) // 2])
    (out / "invalid.json").write_text(json.dumps(invalid, indent=1))
    print(f"wrote {len(expected)} valid and {len(invalid)} invalid configs to {out}")


if __name__ == "__main__":
    main()
