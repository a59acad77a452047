"""KVzap with our weights in kvpress 0.5.5: a KVzap bundle trained by `kvdistill train` (3 steps on SmolLM2's
KVzip+ targets of 64-token packed text) holds kvpress's KVzapModel layout under kvpress/, which
`KVzapModel.from_pretrained` loads as it is; kvpress's presses with those weights then keep the entries
`kvdistill compress --method kvzap:<bundle>` keeps on SmolLM2-135M-Instruct (float32):
- threshold mode, the paper's: DMSPress(KVzapPress, threshold=τ, sliding_window_size=128) against `--threshold τ`
  with the bundle's window 128, at two thresholds;
- ratio mode: KVzapPress(compression_ratio=r) (a per-head top-k, no window) against `--ratio r` with the
  bundle's window set to 0.

Ties: the two sides compute the hidden states with float32 rounding differences (~1e-6); a difference between
the kept sets is accepted only for entries whose kvpress score lies within 1e-4 · max|s| of the boundary (τ, or
the head's k-th score). The test prints how many such swaps it saw.
"""
import json
from pathlib import Path

import pytest

from conftest import MODEL_DIR, assert_clean_error, run_kvd, torch_threads
from train_helpers import broken_bundle, prepare_data, set_manifest_field, train

torch = pytest.importorskip("torch")
kvpress = pytest.importorskip("kvpress")
transformers = pytest.importorskip("transformers")

REL_TIE = 1e-4

PROMPT = " ".join(
    f"Note {i}: the {['blue', 'white', 'rust', 'olive'][i % 4]} ferry from "
    f"{['Kiel', 'Split', 'Nantes', 'Dakar', 'Bilbao', 'Gdansk'][i % 6]} docked at pier {2 + i % 8} with "
    f"{30 + 13 * i} passengers and {i % 5} cars."
    for i in range(20)
)


def kvzap_config(path, data, out_dir):
    lines = [f"model: {{dir: {MODEL_DIR}}}", f"data: {{train: {data}, prefetch: 2}}",
             "component: {kind: kvzap, variant: mlp, hidden: 32, budget: 8}", "loss: {mse: 1.0}",
             "train:", f"  out_dir: {out_dir}", "  device: cpu", "  steps: 3", "  batch_size: 1",
             "  grad_accum: 1", "  lr: 0.01", "  min_lr: 0.001", "  warmup: 1", "  seed: 0", "  save_every: 0",
             "  progress: lines", "  eval_every: 0"]
    Path(path).write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    d = tmp_path_factory.mktemp("kvzap")
    data = prepare_data(MODEL_DIR, d / "prose.h5", seq_len=64)
    r = train(kvzap_config(d / "kvzap.yaml", data, d / "run"), "--resume", "none")
    assert "mse" in r.stdout + r.stderr
    b = d / "run" / "bundle"
    m = json.loads((b / "kvdistill.json").read_text())
    assert m["kind"] == "kvzap" and m["options"]["window"] == 128
    no_window = broken_bundle(b, d / "no_window", lambda p: None)
    m["options"]["window"] = 0
    (no_window / "kvdistill.json").write_text(json.dumps(m))
    return {"window": b, "no_window": no_window, "dir": d}


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(torch_threads())
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    ids = tok(PROMPT, add_special_tokens=False, return_tensors="pt").input_ids
    from transformers import DynamicCache
    cache = DynamicCache()
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    full = [cache.layers[l].keys.clone() for l in range(len(cache.layers))]
    return {"model": model, "ids": ids, "full_keys": full}


def kvzap_press(bundle):
    from kvpress.presses.kvzap_press import KVzapModel, KVzapPress
    kv = KVzapModel.from_pretrained(bundle / "kvpress")
    press = KVzapPress(model_type="mlp")
    press.kvzap_model_name = f"nvidia/KVzap-mlp-{Path(str(MODEL_DIR)).name}"  # what post_init_from_model would fetch
    press.kvzap_model = kv
    return press


def run_press(hf, press, scorer):
    """kvpress's kept positions [layer][head] and the scores it computed [layer] (H_kv, T)."""
    from transformers import DynamicCache
    scores = {}
    orig = scorer.score

    def recording(module, hidden_states, keys, values, attentions, kwargs):
        s = orig(module, hidden_states, keys, values, attentions, kwargs)
        scores[module.layer_idx] = s[0].detach().float().clone()
        return s

    scorer.score = recording
    model = hf["model"]
    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model(hf["ids"], past_key_values=cache, use_cache=True)
    kept = []
    for l, full in enumerate(hf["full_keys"]):
        Hkv, T = full.shape[1], full.shape[2]
        attn = model.model.layers[l].self_attn
        if getattr(attn, "masked_key_indices", None) is not None:
            _, hi, si = attn.masked_key_indices
            mask = torch.ones(Hkv, T, dtype=torch.bool)
            mask[hi, si] = False
            attn.masked_key_indices = None
            kept.append([torch.nonzero(mask[h]).flatten().tolist() for h in range(Hkv)])
        else:
            k = cache.layers[l].keys
            heads = []
            for h in range(Hkv):
                eq = (k[0, h][:, None, :] == full[0, h][None, :, :]).all(-1)  # (n_kept, T)
                assert bool(eq.any(1).all()), f"layer {l} head {h}: a kept key matches no position"
                heads.append(sorted(eq.float().argmax(1).tolist()))
            kept.append(heads)
    return kept, scores


def ours(tmp_path, bundle, *budget):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(PROMPT)
    out = tmp_path / "kept.json"
    r = run_kvd("compress", "--model", MODEL_DIR, "--prompt-file", prompt, "--method", f"kvzap:{bundle}", *budget,
                "--out", out)
    assert r.returncode == 0, r.stderr
    return json.loads(out.read_text())


def compare(mine, theirs, scores, boundary_of):
    swaps = 0
    for l, (ol, tl) in enumerate(zip(mine, theirs)):
        s = scores[l]
        tol = REL_TIE * float(s.abs().max())
        for h, (a, b) in enumerate(zip(ol, tl)):
            bound = boundary_of(s[h], b)
            for j in set(a) ^ set(b):
                assert abs(float(s[h, j]) - bound) <= tol, (
                    f"layer {l} head {h}: position {j} (score {float(s[h, j]):.6g}, boundary {bound:.6g}) kept by "
                    f"{'us' if j in a else 'kvpress'} only")
                swaps += 1
    return swaps


def test_bundle_loads_in_kvpress(bundles):
    from kvpress.presses.kvzap_press import KVzapModel
    from safetensors.torch import load_file
    kv = KVzapModel.from_pretrained(bundles["window"] / "kvpress")
    assert kv.config.n_modules == 30 and kv.config.input_dim == 576 and kv.config.output_dim == 3
    assert kv.config.hidden_dim == 32
    ours_t = load_file(str(bundles["window"] / "gates.safetensors"))
    theirs = kv.state_dict()
    assert len(theirs) == len(ours_t) == 30 * 4
    for name, t in theirs.items():  # layers.<l>.<0|2>.<weight|bias> = our model.layers.<l>.self_attn.kvzap.<...>
        l, rest = name.split(".", 2)[1], name.split(".", 2)[2]
        assert torch.equal(t, ours_t[f"model.layers.{l}.self_attn.kvzap.{rest}"]), name


@pytest.mark.parametrize("quantile", [0.3, 0.6])
def test_threshold_parity(bundles, hf, tmp_path, quantile):
    from kvpress import DMSPress
    # τ at a quantile of the scores kvpress computes for this prompt.
    probe = kvzap_press(bundles["window"])
    _, s0 = run_press(hf, DMSPress(press=probe, threshold=0.0, sliding_window_size=128), probe)
    tau = float(torch.quantile(torch.cat([v.flatten() for v in s0.values()]), quantile))
    scorer = kvzap_press(bundles["window"])
    theirs, scores = run_press(hf, DMSPress(press=scorer, threshold=tau, sliding_window_size=128), scorer)
    res = ours(tmp_path, bundles["window"], "--threshold", tau)
    T = hf["ids"].shape[1]
    assert res["tokens"] == T
    assert sum(len(h) for l in theirs for h in l) < 0.9 * T * 3 * 30, "the threshold evicts something"
    swaps = compare(res["layers"], theirs, scores, lambda s, kept: tau)
    for layer in res["layers"]:
        for h in layer:
            assert set(range(T - 128, T)) <= set(h), "the last 128 positions are never evicted"
    print(f"kvzap threshold {tau:.4f} (q={quantile}): T={T}, tie swaps={swaps}")


@pytest.mark.parametrize("ratio", [0.5, 0.8])
def test_ratio_parity(bundles, hf, tmp_path, ratio):
    scorer = kvzap_press(bundles["no_window"])
    scorer.compression_ratio = ratio
    theirs, scores = run_press(hf, scorer, scorer)
    res = ours(tmp_path, bundles["no_window"], "--ratio", ratio)
    swaps = compare(res["layers"], theirs, scores, lambda s, kept: min(float(s[j]) for j in kept))
    print(f"kvzap ratio {ratio}: tie swaps={swaps}")


def test_bad_input(bundles, tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text(PROMPT)
    other = broken_bundle(bundles["window"], tmp_path / "other", set_manifest_field(
        "base_model", {"id": "Llama-3.2-1B", "config_sha256": "0" * 64}))
    r = run_kvd("compress", "--model", MODEL_DIR, "--prompt-file", prompt, "--method", f"kvzap:{other}",
                "--ratio", 0.5, "--out", tmp_path / "o.json")
    assert_clean_error(r, "Llama-3.2-1B")
    r = run_kvd("compress", "--model", MODEL_DIR, "--prompt-file", prompt, "--method", f"query_rows:{bundles['window']}",
                "--ratio", 0.5, "--out", tmp_path / "o.json")
    assert_clean_error(r, "'kvzap'")
