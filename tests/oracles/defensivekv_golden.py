#!/usr/bin/env python3
"""Golden kept sets for tests/python/test_defensivekv_golden.py, produced by the DefensiveKV authors' own code.

The oracle is the official code of "Taming the Fragility of KV Cache Eviction in LLM Inference"
(arXiv 2510.13334), the public repository FFY0/DefensiveKV (a fork of NVIDIA kvpress):
kvpress/presses/efficient_defensivekv_press.py (EfficientDefensiveKVPress, AdaKV budgets within a layer) and
kvpress/presses/efficient_layer_defensivekv_press.py (EfficientLayerDefensiveKVPress, one budget over all
layers), with the selection code of their EfficientAdaScorerPress / EfficientAdaGlobalScorerPress and their
flattened cache (kvpress/ada_cache.py). Export a checkout and pass its path:

    mkdir -p /tmp/defensivekv_src
    git -C <mirror of FFY0/DefensiveKV> archive <commit> | tar -x -C /tmp/defensivekv_src
    .venv/bin/python tests/oracles/defensivekv_golden.py /tmp/defensivekv_src --commit <commit> \
        --model-dir .cache/models/SmolLM2-135M-Instruct

(the committed file: <commit> = 9251b95e7e282a6c18dd98ef6318dd489e639a58, deterministic: a second run writes
the same bytes; about 80 s on 2 cores).

It writes tests/python/data/defensivekv_golden.json (committed; --json to write elsewhere). Without a
checkout (as CTest runs every tests/oracles/*.py, with --out/--model-dir/--gguf) it does nothing: the committed
file is the golden.

How their code is run here. Their package targets transformers 4.57 with flash-attn, a CUDA cache-update
extension and a Triton kernel, and is named `kvpress` like the kvpress 0.5.5 installed in .venv. So:
  * their package __init__ files are not executed (they import every press, the pipeline and the flash-attn
    attention patch): `kvpress`, `kvpress.presses` and `kvpress.ops` are registered as bare packages whose
    path is their folders, and only the press modules above, base_press.py, scorer_press.py, ada_cache.py and
    ops/vw_norm.py are imported from the checkout, unmodified;
  * patch 1, only if the `attrs` package is missing: ada_cache.py takes `dataclass` from attrs for its
    MetaData record; a stub module `attr` maps it to the standard library's dataclass (same generated
    __init__ with the same defaults);
  * patch 2: the presses call vwl1norm_triton (a fused Triton kernel, CUDA only, TF32 on tensor cores); it is
    rebound to their own vwl1norm, the unfused torch path that their score() offers as the commented-out
    alternative (identical formula: per query head sum_d |(v W_O^h)_d|, mean over the GQA group, the same
    two-stage step after it);
  * the model is transformers' LlamaForCausalLM in float32 with sdpa attention and a normal DynamicCache;
    after each attention layer a forward hook (where their BasePress.forward_hook sits) copies that layer's
    keys and values into their DynamicCacheSplitHeadFlatten through its own update() (the prefill branch,
    which flattens and initializes the metadata) and calls their press.forward_hook with that cache as
    past_key_values. output[1] (the attention weights) is None under sdpa, as under their flash-attn patch,
    so score() computes the window attention itself (the only path on which it defines window_bias).
Their kept set is read as test_kvpress_parity.py does: their compressed cache holds gathered rows of the
flattened keys, grouped by head (lengths in the metadata), and every row is matched bitwise to its position
among the uncompressed keys of its head.

Scores for the tie rule: their score() output (the final ranking values, after the value-norm term, the
two-stage step and the window padding) is recorded per layer. The selection boundary is the smallest kept
score of the pool that one top-k ranks: a layer for DefensiveKV, all layers for Layer-DefensiveKV. For every
head the file stores the entries whose score lies within REL_TIE of it, |s - b| <= REL_TIE * |b|. The first stage
(CriticalKV's) ranks a second quantity, the normalized mean window attention, and marks its leaders with the
layer's maximum score; the file also stores, per head, the entries whose first-stage rank is a numerical tie at the
edge of what that stage takes ("stage1_ties"; recorded from the values their vwl1norm receives).
"""
import argparse
import dataclasses
import importlib.util
import json
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REL_TIE = 1e-4
WINDOW = 32


def make_prompt():
    """The fixed prompt (508 SmolLM2 tokens, a multiple of 4, so that n·(1-r) is exact for r = 0.5 and 0.75)."""
    colors = ["ochre", "teal", "crimson", "ivory", "slate", "saffron"]
    cities = ["Bergen", "Cusco", "Dakar", "Gdansk", "Kochi", "Tartu", "Valparaiso", "Zadar"]
    goods = ["barometers", "maps", "lanterns", "seed packets", "violins"]
    parts = ["The harbour log for the week lists every arrival in order."]
    for i in range(15):
        parts.append(f"Ship {i + 1}, painted {colors[i % 6]}, sailed in from {cities[(3 * i) % 8]} with "
                     f"{12 + (7 * i) % 40} crates of {goods[i % 5]} and docked at berth {(5 * i) % 13 + 1}.")
    parts.append("Question: which ship carried violins from Dakar, and at which berth did it dock?")
    return " ".join(parts)


CASES = [("defensivekv", 0.5), ("defensivekv", 0.75), ("layer_defensivekv", 0.5), ("layer_defensivekv", 0.75)]


def load_official(src):
    """Imports their press modules from the checkout `src` (see the module docstring for what is patched)."""
    src = Path(src).resolve()
    assert (src / "kvpress/presses/efficient_defensivekv_press.py").is_file(), f"{src}: not a DefensiveKV checkout"
    assert "kvpress" not in sys.modules, "another kvpress was imported first"
    if importlib.util.find_spec("attr") is None:  # patch 1
        attr = types.ModuleType("attr")
        attr.dataclass = dataclasses.dataclass
        sys.modules["attr"] = attr
    for name, sub in (("kvpress", "kvpress"), ("kvpress.presses", "kvpress/presses"), ("kvpress.ops", "kvpress/ops")):
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(src / sub)]
        sys.modules[name] = pkg
    from kvpress.ada_cache import DynamicCacheSplitHeadFlatten
    from kvpress.presses.efficient_defensivekv_press import EfficientDefensiveKVPress
    from kvpress.presses.efficient_layer_defensivekv_press import EfficientLayerDefensiveKVPress
    for cls in (EfficientDefensiveKVPress, EfficientLayerDefensiveKVPress):  # patch 2
        cls.vwl1norm_triton = cls.vwl1norm
    for mod in ("kvpress.ada_cache", "kvpress.presses.efficient_defensivekv_press",
                "kvpress.presses.efficient_layer_defensivekv_press", "kvpress.presses.efficient_ada_scorer_press",
                "kvpress.presses.efficient_ada_global_scorer_press", "kvpress.presses.base_press"):
        assert Path(sys.modules[mod].__file__).resolve().is_relative_to(src), mod
    return {"defensivekv": EfficientDefensiveKVPress, "layer_defensivekv": EfficientLayerDefensiveKVPress,
            "cache": DynamicCacheSplitHeadFlatten}


def run_official(official, model, ids, method, ratio):
    """Runs their press over one prefill; returns kept [L][H_kv] sorted positions and scores [L] (H_kv, T)."""
    import torch
    from transformers import DynamicCache

    press = official[method](compression_ratio=ratio)
    assert press.window_size == WINDOW and press.kernel_size == 5
    scores = {}
    orig = press.score

    def recording(module, hidden_states, keys, values, attentions, kwargs):
        s = orig(module, hidden_states, keys, values, attentions, kwargs)
        scores[module.layer_idx] = s.detach().clone()
        return s

    press.score = recording
    # Their first stage (CriticalKV's), recorded per layer: the normalized mean window attention (H_kv, m) it
    # ranks and the threshold 0.9 - window_bias it fills to.
    stage1 = {}
    orig_vw = press.vwl1norm_triton

    def recording_vw(values, module, scores_, window_bias, ave_attn_weights):
        a = ave_attn_weights[0].detach().float()
        stage1[module.layer_idx] = (a / a.sum(-1, keepdim=True), 0.9 - window_bias, values.shape[2])
        return orig_vw(values, module, scores_, window_bias, ave_attn_weights)

    press.vwl1norm_triton = recording_vw
    flat = official["cache"]()
    dyn = DynamicCache()
    full_keys = {}

    def hook(module, args, kwargs, output):
        l = module.layer_idx
        k, v = dyn.layers[l].keys, dyn.layers[l].values  # (1, H_kv, T, hd)
        full_keys[l] = k.clone()
        flat.update(k, v, l)  # their prefill branch: flatten + metadata
        assert output[1] is None, "their score() needs attentions=None (sdpa / flash-attn)"
        kw = dict(kwargs)
        kw["past_key_values"] = flat
        return press.forward_hook(module, args, kw, output)

    layers = model.model.layers
    hooks = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in layers]
    try:
        with torch.no_grad():
            model(ids, past_key_values=dyn, use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    kept = []
    for l in range(len(layers)):
        full = full_keys[l][0]  # (H_kv, T, hd)
        Hkv, T, hd = full.shape
        lens = [int(x) for x in flat.metadata_list[l].head_lens]
        assert len(lens) == Hkv
        rows = flat.key_cache[l]  # (sum lens, hd), grouped by head
        assert rows.shape[0] == sum(lens)
        heads, off = [], 0
        for h in range(Hkv):
            seg = rows[off:off + lens[h]]
            off += lens[h]
            eq = (seg[:, None, :] == full[h][None, :, :]).all(-1)  # (lens[h], T)
            assert bool((eq.sum(1) == 1).all()), f"layer {l} head {h}: a kept key matches no or several positions"
            pos = sorted(eq.float().argmax(1).tolist())
            assert len(set(pos)) == len(pos)
            heads.append(pos)
        kept.append(heads)
    sc = [scores[l][0].reshape(len(kept[l]), -1).float() for l in range(len(layers))]  # [L] (H_kv, T)
    return kept, sc, [stage1_ties(*stage1[l], ratio) for l in range(len(layers))]


def stage1_ties(a, threshold, m, ratio):
    """Per head, the entries whose first-stage rank is a numerical tie: those whose normalized mean attention lies
    within REL_TIE of the last entry the first stage takes or of the first it leaves, when at least two do
    (a swap of such entries between the stage's taken and left sets is rounding, not a formula difference)."""
    import torch
    out = []
    for h in range(a.shape[0]):
        v, order = a[h].sort(descending=True)
        count = int((v.cumsum(0) >= threshold).to(torch.int32).argmax())
        count = min(count, int(m * (1 - ratio) - WINDOW))
        near = set()
        for edge in (count - 1, count):
            if 0 <= edge < len(v) and count > 0:
                e = float(v[edge])
                near |= {int(order[i]) for i in range(len(v)) if abs(float(v[i]) - e) <= REL_TIE * abs(e)}
        out.append(sorted(near) if len(near) >= 2 else [])
    return out


def ranges(pos):
    """Sorted positions -> [[first, last], ...] runs."""
    out = []
    for p in pos:
        if out and out[-1][1] == p - 1:
            out[-1][1] = p
        else:
            out.append([p, p])
    return out


def tie_info(kept, scores, pooled_over_layers):
    """Per pool: the boundary b (smallest kept score) and, per head, [[pos, score], ...] with |s-b| <= REL_TIE|b|."""
    def near(l, b):
        tol = REL_TIE * abs(b)
        s = scores[l]
        return [[[j, float(s[h, j])] for j in range(s.shape[1]) if abs(float(s[h, j]) - b) <= tol]
                for h in range(s.shape[0])]

    if pooled_over_layers:
        b = min(float(scores[l][h, j]) for l in range(len(kept)) for h in range(len(kept[l])) for j in kept[l][h])
        return {"boundary": b, "near": [near(l, b) for l in range(len(kept))]}
    bs = [min(float(scores[l][h, j]) for h in range(len(kept[l])) for j in kept[l][h]) for l in range(len(kept))]
    return {"boundary": bs, "near": [near(l, b) for l, b in enumerate(bs)]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src", nargs="?", help="exported checkout of FFY0/DefensiveKV (without it: nothing to do)")
    ap.add_argument("--commit", default=None, help="the checkout's commit hash, recorded in the file")
    ap.add_argument("--model-dir", default=str(REPO / ".cache/models/SmolLM2-135M-Instruct"))
    ap.add_argument("--json", default=str(REPO / "tests/python/data/defensivekv_golden.json"))
    ap.add_argument("--out", help="(CTest's fixture argument; unused)")
    ap.add_argument("--gguf", help="(CTest's fixture argument; unused)")
    a = ap.parse_args()
    if not a.src:
        print("defensivekv_golden: no DefensiveKV checkout given; the committed "
              "tests/python/data/defensivekv_golden.json is the golden")
        return
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    official = load_official(a.src)
    torch.set_num_threads(2)
    prompt = make_prompt()
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids  # (1, T)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    T = ids.shape[1]
    out = {
        "oracle": "FFY0/DefensiveKV (arXiv 2510.13334), EfficientDefensiveKVPress / EfficientLayerDefensiveKVPress",
        "commit": a.commit,
        "transformers": transformers.__version__, "torch": torch.__version__,
        "model": "SmolLM2-135M-Instruct (float32, sdpa)",
        "rel_tie": REL_TIE,
        "prompt": prompt, "tokens": T,
        "cases": [],
    }
    for method, ratio in CASES:
        kept, scores, s1 = run_official(official, model, ids, method, ratio)
        n_kept = [sum(len(h) for h in layer) for layer in kept]
        ties = tie_info(kept, scores, pooled_over_layers=method == "layer_defensivekv")
        out["cases"].append({
            "method": method, "ratio": ratio, "tokens": T,
            "kept": [[ranges(h) for h in layer] for layer in kept],
            "ties": ties,
            "stage1_ties": s1,
        })
        print(f"{method} r={ratio}: T={T}, kept per layer {n_kept[:4]}... total {sum(n_kept)}, "
              f"near-boundary entries {sum(len(x) for layer in ties['near'] for x in layer)}, first-stage ties "
              f"{sum(len(x) for layer in s1 for x in layer)}")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, separators=(",", ":")) + "\n")
    print(f"wrote {a.json} ({Path(a.json).stat().st_size} bytes)")


if __name__ == "__main__":
    main()
