"""kvpress 0.5.5 parity: `kvdistill compress` keeps the same positions per layer and KV head as kvpress's press
on transformers' model (float32, loaded from the same directory), for the same prompt and ratio.

How kvpress's kept set is read: the press runs as a context manager over one prefill into a DynamicCache;
each layer's compressed keys are gathered rows of the full keys, so every kept row is matched bitwise to its
position in an uncompressed run. For AdaKV, which masks instead of gathering, the kept set is the complement of
`module.masked_key_indices`.

Ties: our selector breaks ties toward the lower position (stable sort); torch.topk leaves them unspecified. Two
implementations also compute the same score with float32 rounding differences (~1e-6 relative). A
difference between the two kept sets is therefore accepted only where every swapped position's kvpress score
lies within a numerical tie of the selection boundary: |s_j - s_boundary| <= 1e-4 * max|s| of the layer.
The test reports how many such swaps it saw; any other difference fails.
"""
import json
import os

import pytest

from conftest import MODEL_DIR, run_kvd, torch_threads

torch = pytest.importorskip("torch")
kvpress = pytest.importorskip("kvpress")
transformers = pytest.importorskip("transformers")

REL_TIE = 1e-4

# Deterministic prose (~480 tokens): varied enough that attention scores are rarely tied.
PROMPT = " ".join(
    f"Entry {i}: the {['red', 'green', 'amber', 'violet', 'grey'][i % 5]} courier from "
    f"{['Lyon', 'Porto', 'Oslo', 'Quito', 'Accra', 'Perth', 'Hanoi'][i % 7]} delivered parcel {1000 + 37 * i} "
    f"at {7 + i % 11}:{(13 * i) % 60:02d} after {3 + i % 4} stops."
    for i in range(16)
)


def press_for(name, ratio):
    from kvpress import (AdaKVPress, ExpectedAttentionPress, KeyDiffPress, KnormPress, ObservedAttentionPress,
                         PyramidKVPress, SnapKVPress, StreamingLLMPress, TOVAPress)
    return {
        "streaming_llm": lambda: StreamingLLMPress(compression_ratio=ratio),
        "snapkv": lambda: SnapKVPress(compression_ratio=ratio),
        "tova": lambda: TOVAPress(compression_ratio=ratio),
        "keydiff": lambda: KeyDiffPress(compression_ratio=ratio),
        "knorm": lambda: KnormPress(compression_ratio=ratio),
        "expected_attention": lambda: ExpectedAttentionPress(compression_ratio=ratio),
        "pyramidkv": lambda: PyramidKVPress(compression_ratio=ratio),
        "observed_attention": lambda: ObservedAttentionPress(compression_ratio=ratio),
        "adakv_snapkv": lambda: AdaKVPress(SnapKVPress(compression_ratio=ratio)),
    }[name]()


# (method, ratio): PyramidKV at 0.5 so that its layer budgets really differ (at r > 0.5 kvpress falls back to
# uniform budgets for a prompt this short).
CASES = [("streaming_llm", 0.5), ("snapkv", 0.5), ("tova", 0.5), ("keydiff", 0.5), ("knorm", 0.5),
         ("expected_attention", 0.5), ("pyramidkv", 0.5), ("observed_attention", 0.5), ("adakv_snapkv", 0.75)]


def load_hf():
    """The prompt's ids, transformers' model (sdpa and eager) and the uncompressed keys per layer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(torch_threads())
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    ids = tok(PROMPT, add_special_tokens=False, return_tensors="pt").input_ids  # (1, T)
    models = {}
    for impl in ("sdpa", "eager"):
        m = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32, attn_implementation=impl)
        m.eval()
        models[impl] = m
    from transformers import DynamicCache
    full = {}  # impl -> [L] (1, H_kv, T, hd): eager and sdpa round differently, so each has its own
    for impl, m in models.items():
        cache = DynamicCache()
        with torch.no_grad():
            m(ids, past_key_values=cache, use_cache=True)
        full[impl] = [cache.layers[l].keys.clone() for l in range(len(cache.layers))]
    return {"ids": ids, "models": models, "full_keys": full}


@pytest.fixture(scope="module")
def hf():
    return load_hf()


def kvpress_kept(hf, name, ratio):
    """[layer][head] -> sorted kept positions, plus the recorded kvpress scores [layer] (1, H_kv, T)."""
    from transformers import DynamicCache
    press = press_for(name, ratio)
    scorer = press.press if name.startswith("adakv_") else press
    scores = {}
    orig = scorer.score

    def recording(module, hidden_states, keys, values, attentions, kwargs):
        s = orig(module, hidden_states, keys, values, attentions, kwargs)
        scores[module.layer_idx] = s.detach().clone()
        return s

    scorer.score = recording
    impl = "eager" if name == "observed_attention" else "sdpa"
    model = hf["models"][impl]
    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model(hf["ids"], past_key_values=cache, use_cache=True)
    layers = model.model.layers
    kept = []
    for l, full in enumerate(hf["full_keys"][impl]):
        T = full.shape[2]
        heads = []
        if name.startswith("adakv_"):
            _, hi, si = layers[l].self_attn.masked_key_indices
            mask = torch.ones(full.shape[1], T, dtype=torch.bool)
            mask[hi, si] = False
            heads = [torch.nonzero(mask[h]).flatten().tolist() for h in range(full.shape[1])]
            del layers[l].self_attn.masked_key_indices
        else:
            k = cache.layers[l].keys  # (1, H_kv, n_kept, hd)
            for h in range(full.shape[1]):
                eq = (k[0, h][:, None, :] == full[0, h][None, :, :]).all(-1)  # (n_kept, T)
                assert bool(eq.any(1).all()), f"{name}: layer {l} head {h}: a kept key matches no position"
                heads.append(sorted(eq.float().argmax(1).tolist()))
        kept.append(heads)
    return kept, scores


def tie_only(ours, theirs, s, pooled):
    """True if the two kept sets of one layer differ only by numerical ties. s: (H_kv, T) kvpress scores."""
    scale = float(s.abs().max())
    tol = REL_TIE * max(scale, 1e-30)
    swaps = 0
    for h in range(len(theirs)):
        a, b = set(ours[h]), set(theirs[h])
        if a == b:
            continue
        if not pooled and len(a) != len(b):
            return False, swaps
        if pooled:
            boundary = min(float(s[g, j]) for g in range(len(theirs)) for j in theirs[g])
        else:
            boundary = min(float(s[h, j]) for j in b)
        for j in a ^ b:
            if abs(float(s[h, j]) - boundary) > tol:
                return False, swaps
            swaps += 1
    return True, swaps


@pytest.mark.parametrize("name,ratio", CASES)
def test_kvpress_parity(hf, tmp_path, name, ratio):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(PROMPT)
    out = tmp_path / "kept.json"
    r = run_kvd("compress", "--model", MODEL_DIR, "--prompt-file", prompt, "--method", name, "--ratio", ratio,
                "--out", out)
    assert r.returncode == 0, r.stderr
    ours = json.loads(out.read_text())
    assert ours["method"] == name and ours["ratio"] == ratio
    T = hf["ids"].shape[1]
    assert ours["tokens"] == T, "our tokenizer and HF's disagree on the prompt"
    theirs, scores = kvpress_kept(hf, name, ratio)
    assert len(ours["layers"]) == len(theirs)
    total_swaps = 0
    for l, (ol, tl) in enumerate(zip(ours["layers"], theirs)):
        for h in range(len(tl)):
            assert ol[h] == sorted(ol[h]), f"layer {l} head {h}: positions not ascending"
        if ol == tl:
            continue
        s = scores[l][0].float()  # (H_kv, T)
        if name == "adakv_snapkv":
            n_kept = max(1, int(T * (1 - ratio)))
            n_safe = max(1, int(n_kept * 0.2))
            s = s.clone()
            top = s.topk(n_safe, dim=-1).indices
            s.scatter_(-1, top, torch.finfo(s.dtype).max)
        ok, swaps = tie_only(ol, tl, s, pooled=name.startswith("adakv_"))
        assert ok, (f"{name}: layer {l}: kept sets differ beyond ties; ours-theirs per head: "
                    f"{[sorted(set(o) - set(t)) for o, t in zip(ol, tl)]}, theirs-ours: "
                    f"{[sorted(set(t) - set(o)) for o, t in zip(ol, tl)]}")
        total_swaps += swaps
    print(f"{name} r={ratio}: T={T}, tie swaps={total_swaps}")


def test_compress_rejects_bad_input(tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text("hello world, this is a prompt")
    r = run_kvd("compress", "--model", MODEL_DIR, "--prompt-file", prompt, "--method", "nosuch", "--ratio", 0.5,
                "--out", tmp_path / "o.json")
    assert r.returncode != 0 and "unknown method 'nosuch'" in r.stderr
    for bad in ("1.0", "-0.1"):
        r = run_kvd("compress", "--model", MODEL_DIR, "--prompt-file", prompt, "--method", "snapkv", "--ratio", bad,
                    "--out", tmp_path / "o.json")
        assert r.returncode != 0 and "--ratio must lie in [0, 1)" in r.stderr
