"""The kvpress press (export/python, KVDistillPress) on a Judge-Q bundle (kind query_rows, no LoRA), on
SmolLM2-135M-Instruct in float32 on the CPU (docs/serving.md, section 3).

- The press keeps, per layer and KV head, the positions `kvdistill compress --method gate:<bundle> --ratio r`
  keeps for the same bundle, prompt and ratio; mean, max and no pooling; three ratios. Kept rows are matched
  bitwise to the uncompressed keys (as in test_kvpress_parity.py). The two compute the rows' attention from
  prefills that differ by float32 rounding, so a difference is accepted only between positions whose press
  scores are a numerical tie (|Δ| ≤ 1e-4 · max |s| of the layer), at most two; the test prints how many it saw.
- The press's scores are the rows' attention as transformers' eager attention reports it when the rows are fed
  after the prompt in one forward (mean over rows, then over each KV head's query heads, pooled by hand).
- After the prefill the cache holds the compressed prompt alone (the rows' K/V dropped), the prompt's logits are
  those of a plain forward, a batch of two copies keeps what one copy keeps, a decode step inside the press is
  not compressed, and ratio 0 leaves the prompt's cache whole.
- Refused with one clear message: a LookaheadKV bundle (LoRA on the rows), another kind, another model, a
  padded batch, a forward without a cache.
"""
import json
import os
import sys
from pathlib import Path

import pytest

from conftest import MODEL_DIR, run_kvd, torch_threads
from train_helpers import broken_bundle, prepare_data, set_manifest_field, train

torch = pytest.importorskip("torch")
kvpress = pytest.importorskip("kvpress")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "export" / "python"))
from kvdistill_export import BundleError, load_ops  # noqa: E402

OPS = ROOT / "build" / "libkvdistill_ops.so"  # unless $KVD_OPS_LIB names it
REL_TIE = 1e-4

# Deterministic prose (537 tokens of SmolLM2's tokenizer).
PROMPT = " ".join(
    f"Report {i}: the {['north', 'east', 'south', 'west'][i % 4]} gate of "
    f"{['Lyon', 'Porto', 'Oslo', 'Quito', 'Accra', 'Perth'][i % 6]} opened at {6 + i % 9}:{(17 * i) % 60:02d}; "
    f"{2 + i % 5} trucks carried crate {500 + 41 * i} to dock {i % 7}."
    for i in range(16)
)


@pytest.fixture(scope="module")
def ops():
    return load_ops(os.environ.get("KVD_OPS_LIB", str(OPS)))


def qr_config(path, data, out_dir, component, steps):
    lines = [f"model: {{dir: {MODEL_DIR}}}", f"data: {{train: {data}, prefetch: 2}}",
             f"component: {{kind: query_rows, {component}}}", "loss: {attention: 1.0}",
             "train:", f"  out_dir: {out_dir}", "  device: cpu", f"  steps: {steps}", "  batch_size: 1",
             "  grad_accum: 1", "  lr: 0.05", "  min_lr: 0.005", "  warmup: 1", "  seed: 0", "  save_every: 0",
             "  progress: lines", "  eval_every: 0"]
    Path(path).write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """Judge-Q bundles of SmolLM2 trained 3 steps on 64-token packed text (each document's first half the prompt),
    one per pooling, and a LookaheadKV bundle (1 step) for the refusal: name -> bundle directory."""
    d = tmp_path_factory.mktemp("qr_bundles")
    data = prepare_data(MODEL_DIR, d / "prose.h5", seq_len=64)
    components = {
        "mean": ("preset: judgeq, rows: 4, budget: 8", 3),
        "max": ("preset: judgeq, rows: 4, budget: 8, pooling: max, pool_kernel: 5", 3),
        "none": ("preset: judgeq, rows: 4, budget: 8, pooling: none", 3),
        "lookahead": ("preset: lookahead, rows: 2, lora_rank: 2, lora_alpha: 4.0, budget: 8", 1),
    }
    out = {}
    for name, (component, steps) in components.items():
        train(qr_config(d / f"{name}.yaml", data, d / name, component, steps), "--resume", "none")
        out[name] = d / name / "bundle"
        m = json.loads((out[name] / "kvdistill.json").read_text())
        assert m["kind"] == "query_rows" and m["variant"] == ("lookahead" if name == "lookahead" else "judgeq")
    return out


@pytest.fixture(scope="module")
def hf():
    """The prompt's ids, transformers' float32 model (sdpa), and a plain prefill's keys [L] (1, H_kv, T, hd) and
    last logits (1, V)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
    torch.set_num_threads(torch_threads())
    ids = AutoTokenizer.from_pretrained(MODEL_DIR)(PROMPT, add_special_tokens=False, return_tensors="pt").input_ids
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    cache = DynamicCache()
    with torch.no_grad():
        logits = model(ids, past_key_values=cache, use_cache=True).logits[:, -1]
    return {"ids": ids, "model": model, "keys": [l.keys.clone() for l in cache.layers], "logits": logits}


def press_kept(hf, press, ids=None):
    """Runs one prefill through the press: ([layer][batch row][head] sorted kept positions, the press's scores
    [layer] (B, H_kv, T), the cache, the forward's last logits)."""
    from transformers import DynamicCache
    ids = hf["ids"] if ids is None else ids
    recorded, orig = [], press.score_rows

    def recording(*args):
        s = orig(*args)
        recorded.extend(x.clone() for x in s)
        return s

    press.score_rows = recording
    cache = DynamicCache()
    with torch.no_grad(), press(hf["model"]):
        logits = hf["model"](ids, past_key_values=cache, use_cache=True).logits[:, -1]
    kept = []
    for l, full in enumerate(hf["keys"]):
        k = cache.layers[l].keys  # (B, H_kv, n_kept, hd)
        rows = []
        for b in range(k.shape[0]):
            heads = []
            for h in range(k.shape[1]):
                eq = (k[b, h][:, None, :] == full[0, h][None, :, :]).all(-1)  # (n_kept, T)
                assert bool(eq.any(1).all()), f"layer {l} head {h}: a kept key matches no prompt position"
                pos = eq.float().argmax(1).tolist()
                assert pos == sorted(pos), f"layer {l} head {h}: the press did not compact in position order"
                heads.append(pos)
            rows.append(heads)
        kept.append(rows)
    return kept, recorded, cache, logits


@pytest.mark.parametrize("pooling, ratio", [("mean", 0.5), ("mean", 0.75), ("max", 0.25), ("none", 0.5)])
def test_press_keeps_what_compress_keeps(ops, bundles, hf, tmp_path, pooling, ratio):
    from kvdistill_export.kvpress_press import KVDistillPress
    bundle = bundles[pooling]
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(PROMPT)
    r = run_kvd("compress", "--model", MODEL_DIR, "--prompt-file", prompt, "--method", f"gate:{bundle}",
                "--ratio", ratio, "--out", tmp_path / "kept.json")
    assert r.returncode == 0, r.stderr
    ours = json.loads((tmp_path / "kept.json").read_text())
    T = hf["ids"].shape[1]
    assert ours["tokens"] == T, "our tokenizer and transformers' disagree on the prompt"
    theirs, scores, cache, logits = press_kept(hf, KVDistillPress(bundle=bundle, compression_ratio=ratio))
    n_kept = kvpress.utils.compute_n_kept(T, ratio)
    assert all(cache.layers[l].keys.shape[2] == n_kept and cache.layers[l].values.shape[2] == n_kept
               for l in range(len(cache.layers))), "the cache must hold the compressed prompt alone"
    assert cache.get_seq_length() == n_kept
    assert torch.equal(logits, hf["logits"]), "the rows must not change the prompt's logits"
    assert len(scores) == len(ours["layers"]) == len(theirs)
    swaps = differing = 0
    for l, (ol, tl) in enumerate(zip(ours["layers"], theirs)):
        tl = tl[0]
        s = scores[l][0]  # (H_kv, T)
        tol = REL_TIE * float(s.abs().max())
        for h in range(len(tl)):
            assert len(tl[h]) == n_kept and len(ol[h]) == n_kept
            if ol[h] == tl[h]:
                continue
            differing += 1
            boundary = min(float(s[h, j]) for j in tl[h])
            for j in set(ol[h]) ^ set(tl[h]):
                assert abs(float(s[h, j]) - boundary) <= tol, \
                    f"layer {l} head {h}: position {j} differs and is not a tie ({float(s[h, j])} vs {boundary})"
                swaps += 1
    heads = len(theirs) * len(theirs[0][0])
    print(f"pooling {pooling} ratio {ratio}: T={T}, n_kept={n_kept}, {heads - differing}/{heads} (layer, head) "
          f"sets identical, tie swaps={swaps}")
    assert swaps <= 2


def reference_scores(hf, bundle):
    """The rows' attention from transformers' eager attention over [prompt; rows] in one forward, pooled by hand
    (zero padding counted): [layer] (1, H_kv, T)."""
    from kvdistill_export import Bundle
    from transformers import AutoModelForCausalLM
    b = Bundle(bundle)
    m = b.manifest
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32, attn_implementation="eager").eval()
    ids = hf["ids"]
    T = ids.shape[1]
    rows = b.tensors["kvdistill.query_rows.rows"]  # (n, D)
    n = rows.shape[0]
    x = torch.cat([model.model.embed_tokens(ids), rows.unsqueeze(0)], 1)  # (1, T + n, D)
    with torch.no_grad():
        att = model(inputs_embeds=x, output_attentions=True).attentions  # [L] (1, H, T + n, T + n)
    Hkv = model.config.num_key_value_heads
    k, half = m["pool_kernel"], m["pool_kernel"] // 2
    out = []
    for a in att:
        s = a[0, :, T:, :T].mean(1)                      # (H, T): the rows' mean attention per query head
        s = s.reshape(Hkv, -1, T).mean(1)                # (H_kv, T): the mean over each KV head's group
        if m["pooling"] != "none":
            w = torch.nn.functional.pad(s, (half, half)).unfold(1, k, 1)  # (H_kv, T, k)
            s = w.mean(-1) if m["pooling"] == "mean" else w.amax(-1)
        out.append(s.unsqueeze(0))
    return out


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_scores_are_the_rows_attention(ops, bundles, hf, pooling):
    from kvdistill_export.kvpress_press import KVDistillPress
    _, scores, _, _ = press_kept(hf, KVDistillPress(bundle=bundles[pooling], compression_ratio=0.5))
    ref = reference_scores(hf, bundles[pooling])
    worst = 0.0
    for l, (s, r) in enumerate(zip(scores, ref)):
        assert s.shape == r.shape and s.dtype == torch.float32
        worst = max(worst, float((s - r).abs().max()) / float(r.abs().max()))
    print(f"pooling {pooling}: max relative difference to eager attention {worst:.2e}")
    assert worst < 1e-4


def test_batch_decode_and_ratio_zero(ops, bundles, hf):
    from kvdistill_export.kvpress_press import KVDistillPress
    from transformers import DynamicCache
    model, ids = hf["model"], hf["ids"][:, :160]  # a shorter prompt keeps this test quick

    def prefill(batch, ratio):
        cache = DynamicCache()
        with torch.no_grad(), KVDistillPress(bundle=bundles["mean"], compression_ratio=ratio)(model):
            model(batch, past_key_values=cache, use_cache=True)
        return cache

    one, two = prefill(ids, 0.5), prefill(ids.repeat(2, 1), 0.5)
    for l in range(len(one.layers)):
        k1, k2 = one.layers[l].keys, two.layers[l].keys  # (1, H_kv, n_kept, hd), (2, H_kv, n_kept, hd)
        assert k2.shape[2] == k1.shape[2] == 80
        # The batched forward rounds differently from the single one (keys of deep layers, of magnitude ~10, differ
        # by up to ~2e-5); a different kept entry would differ by the size of a key.
        assert torch.allclose(k2[0], k1[0], rtol=1e-5, atol=1e-4) and torch.allclose(k2[1], k1[0], rtol=1e-5, atol=1e-4), \
            f"layer {l}: each row of a batch must keep what the prompt keeps alone"

    # A decode step inside the press is not a prefill: it appends one entry and compresses nothing.
    cache = DynamicCache()
    with torch.no_grad(), KVDistillPress(bundle=bundles["mean"], compression_ratio=0.5)(model):
        model(ids, past_key_values=cache, use_cache=True)
        n_kept = cache.get_seq_length()
        model(ids[:, :1], past_key_values=cache, use_cache=True)
    assert n_kept == 80 and cache.get_seq_length() == n_kept + 1

    # Ratio 0: no rows run; the prompt's cache stays whole.
    T = hf["ids"].shape[1]
    cache = prefill(hf["ids"], 0.0)
    assert all(torch.equal(cache.layers[l].keys, k) for l, k in enumerate(hf["keys"])) and cache.get_seq_length() == T


def test_refusals(ops, bundles, hf, tmp_path):
    from kvdistill_export.kvpress_press import KVDistillPress
    from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache
    with pytest.raises(BundleError, match="a LookaheadKV bundle .* without LoRA"):
        KVDistillPress(bundle=bundles["lookahead"], compression_ratio=0.5)
    kind = broken_bundle(bundles["mean"], tmp_path / "kind", set_manifest_field("kind", "attention_gate"))
    with pytest.raises(BundleError, match="'attention_gate' bundle"):
        KVDistillPress(bundle=kind, compression_ratio=0.5)
    score = broken_bundle(bundles["mean"], tmp_path / "score", set_manifest_field("score", "log_beta"))
    with pytest.raises(BundleError, match="not query_row_attention"):
        KVDistillPress(bundle=score, compression_ratio=0.5)

    cfg = AutoConfig.from_pretrained(MODEL_DIR)
    cfg.num_hidden_layers = 3
    press = KVDistillPress(bundle=bundles["mean"], compression_ratio=0.5)
    with pytest.raises(BundleError, match="num_layers is 30 in the bundle"):
        with press(AutoModelForCausalLM.from_config(cfg)):
            pass

    ids = hf["ids"].repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with pytest.raises(ValueError, match="padding"), torch.no_grad(), press(hf["model"]):
        hf["model"](ids, attention_mask=mask, past_key_values=DynamicCache(), use_cache=True)
    with pytest.raises(ValueError, match="use_cache=True"), torch.no_grad(), press(hf["model"]):
        hf["model"](hf["ids"], use_cache=False)
    # the press's forward wrapper is gone after an error
    assert "forward" not in vars(hf["model"].model)
