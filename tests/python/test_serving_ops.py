"""libkvdistill_ops.so and the kvpress press of export/python (docs/serving.md).

- The press, run through kvpress on transformers' float32 model, keeps the positions `kvdistill compress` keeps
  for the same TRIM-KV bundle, prompt and ratio (kept rows matched bitwise to the uncompressed keys, as in
  test_kvpress_parity.py). The two compute log β from hidden states that differ by float32 rounding, so a
  difference is accepted only between positions whose scores are a numerical tie (|Δ| ≤ 1e-4 · max |s|); the
  test prints how many it saw.
- select / compact against a plain-Python reference of the TensorRT-LLM layout (ties to the lower position).
- Bad input: wrong dtypes, shapes and layouts raise RuntimeError naming the argument; corrupt, truncated,
  newer-format, other-kind and other-model bundles raise BundleError.
"""
import json
import sys
from pathlib import Path

import pytest

from conftest import run_kvd
from hf_helpers import PROMPT, attention_inputs
from train_helpers import broken_bundle, retention_run, set_manifest_field, truncate_tensors

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "export" / "python"))
from kvdistill_export import Bundle, BundleError, load_ops  # noqa: E402

OPS = Path(__file__).resolve().parents[2] / "build" / "libkvdistill_ops.so"  # unless $KVD_OPS_LIB names it
REL_TIE = 1e-4


@pytest.fixture(scope="module")
def ops():
    import os
    return load_ops(os.environ.get("KVD_OPS_LIB", str(OPS)))


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    return retention_run(tiny_model, tmp_path_factory.mktemp("serving_run"))


def kept_by_kvpress(model, ids, press):
    """[layer][head] -> sorted kept positions, plus the press's scores per layer (1, H_kv, T)."""
    from transformers import DynamicCache
    full = DynamicCache()
    with torch.no_grad():
        model(ids, past_key_values=full, use_cache=True)
    scores, orig = {}, press.score

    def recording(module, hidden_states, keys, values, attentions, kwargs):
        s = orig(module, hidden_states, keys, values, attentions, kwargs)
        scores[module.layer_idx] = s.detach().clone()
        return s

    press.score = recording
    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model(ids, past_key_values=cache, use_cache=True)
    kept = []
    for l in range(len(full.layers)):
        fk, k = full.layers[l].keys[0], cache.layers[l].keys[0]  # (H_kv, T, hd), (H_kv, n_kept, hd)
        heads = []
        for h in range(fk.shape[0]):
            eq = (k[h][:, None, :] == fk[h][None, :, :]).all(-1)  # (n_kept, T)
            assert bool(eq.any(1).all()), f"layer {l} head {h}: a kept key matches no position"
            pos = eq.float().argmax(1).tolist()
            assert pos == sorted(pos), f"layer {l} head {h}: the press did not compact in position order"
            heads.append(pos)
        kept.append(heads)
    return kept, scores


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_press_keeps_what_compress_keeps(ops, run, tiny_model, tmp_path, ratio):
    kvpress = pytest.importorskip("kvpress")
    from kvdistill_export.kvpress_press import KVDistillPress
    from transformers import AutoModelForCausalLM, AutoTokenizer
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(PROMPT)
    r = run_kvd("compress", "--model", tiny_model, "--prompt-file", prompt, "--method", f"gate:{run / 'bundle'}",
                "--ratio", ratio, "--out", tmp_path / "kept.json")
    assert r.returncode == 0, r.stderr
    ours = json.loads((tmp_path / "kept.json").read_text())
    ids = AutoTokenizer.from_pretrained(tiny_model)(PROMPT, add_special_tokens=False, return_tensors="pt").input_ids
    assert ours["tokens"] == ids.shape[1]
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    theirs, scores = kept_by_kvpress(model, ids, KVDistillPress(bundle=run / "bundle", compression_ratio=ratio))
    n_kept = kvpress.utils.compute_n_kept(ids.shape[1], ratio)
    swaps = 0
    for l, (ol, tl) in enumerate(zip(ours["layers"], theirs)):
        s = scores[l][0]
        tol = REL_TIE * float(s.abs().max())
        for h in range(len(tl)):
            assert len(tl[h]) == n_kept and len(ol[h]) == n_kept
            if ol[h] == tl[h]:
                continue
            boundary = min(float(s[h, j]) for j in tl[h])
            for j in set(ol[h]) ^ set(tl[h]):
                assert abs(float(s[h, j]) - boundary) <= tol, \
                    f"layer {l} head {h}: position {j} differs and is not a tie ({float(s[h, j])} vs {boundary})"
                swaps += 1
    print(f"ratio {ratio}: T={ids.shape[1]}, n_kept={n_kept}, tie swaps={swaps}")
    assert swaps <= 2


def reference_select(scores, keep):
    """Plain Python: per (b, h) the `keep` best positions (ties to the lower), ascending, in TRT-LLM's layout."""
    B, H, n = scores.shape
    cols = []
    for b in range(B):
        per_head = []
        for h in range(H):
            best = sorted(range(n), key=lambda j: (-float(scores[b, h, j]), j))[:keep]
            per_head.append(sorted(best))
        cols.append(per_head)
    indices = [[j for b in range(B) for j in cols[b][h]] for h in range(H)]
    return torch.tensor(indices, dtype=torch.int32), torch.tensor([b * keep for b in range(B + 1)], dtype=torch.int32)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_select_and_compact_layout(ops, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no GPU")
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (2, 3, 11), generator=g).float()  # many ties
    idx, off = torch.ops.kvdistill.select(scores.to(device), 4)
    ref_idx, ref_off = reference_select(scores, 4)
    assert idx.dtype == torch.int32 and off.dtype == torch.int32 and idx.shape == (3, 8)
    assert torch.equal(idx.cpu(), ref_idx) and torch.equal(off.cpu(), ref_off)
    cache = torch.randn(2, 3, 11, 5, generator=g)
    want = torch.stack([torch.stack([cache[b, h, ref_idx[h, 4 * b:4 * b + 4].long()] for h in range(3)])
                        for b in range(2)])  # (B, H, keep, d)
    got = cache.to(device).to(torch.bfloat16)
    out = torch.ops.kvdistill.compact(got, idx, off)
    assert out.data_ptr() == got.data_ptr(), "compact must work in place"
    assert torch.equal(got[:, :, :4].float().cpu(), want.to(torch.bfloat16).float())
    # score: the bundle's formula by hand, against the op
    x = torch.randn(2, 7, 16, generator=g)
    w1, b1, w2, bias = torch.randn(8, 16, generator=g), torch.randn(8, generator=g), torch.randn(3, 8, generator=g), \
        torch.randn(3, generator=g)
    pos = torch.arange(7)
    s = torch.ops.kvdistill.score(*(t.to(device) for t in (x, w1, b1, w2, bias, pos)), 9)
    lb = torch.nn.functional.logsigmoid(torch.nn.functional.silu(x.double() @ w1.double().T + b1.double())
                                        @ w2.double().T + bias.double())  # (B, n, H)
    ref = lb.transpose(1, 2) * (10 - pos).double()
    assert s.shape == (2, 3, 7) and s.dtype == torch.float32
    assert torch.allclose(s.cpu().double(), ref, rtol=1e-5, atol=1e-5)


def test_ops_reject_bad_input(ops):
    x, w1, b1, w2, bias, pos = torch.randn(1, 4, 16), torch.randn(8, 16), torch.randn(8), torch.randn(2, 8), \
        torch.randn(2), torch.arange(4)
    with pytest.raises(RuntimeError, match="hidden must be float32, bfloat16 or float16"):
        torch.ops.kvdistill.score(x.long(), w1, b1, w2, bias, pos, 4)
    with pytest.raises(RuntimeError, match="w1 must be float32"):
        torch.ops.kvdistill.score(x, w1.double(), b1, w2, bias, pos, 4)
    with pytest.raises(RuntimeError, match="is the bundle for this model"):
        torch.ops.kvdistill.score(torch.randn(1, 4, 32), w1, b1, w2, bias, pos, 4)
    with pytest.raises(RuntimeError, match="positions must be int64"):
        torch.ops.kvdistill.score(x, w1, b1, w2, bias, pos.int(), 4)
    with pytest.raises(RuntimeError, match=r"keep must lie in \[1, n = 4\]"):
        torch.ops.kvdistill.select(torch.randn(1, 2, 4), 5)
    idx, off = torch.ops.kvdistill.select(torch.randn(1, 2, 4), 2)
    with pytest.raises(RuntimeError, match="must be int32"):
        torch.ops.kvdistill.compact(torch.randn(1, 2, 4, 3), idx.long(), off)
    with pytest.raises(RuntimeError, match="indices must be"):
        torch.ops.kvdistill.compact(torch.randn(1, 3, 4, 3), idx, off)
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.kvdistill.compact(torch.randn(1, 2, 4, 3), idx + 7, off)


def test_bad_bundles(ops, run, tiny_model, tmp_path):
    pytest.importorskip("kvpress")
    from kvdistill_export.kvpress_press import KVDistillPress

    def broken(name, edit):
        return broken_bundle(run / "bundle", tmp_path / name, edit)

    with pytest.raises(BundleError, match="corrupt"):
        Bundle(broken("truncated", truncate_tensors))
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle(broken("json", lambda d: (d / "kvdistill.json").write_text("{")))
    with pytest.raises(BundleError, match="format_version 2, this reader reads 1"):
        Bundle(broken("v2", set_manifest_field("format_version", 2)))
    with pytest.raises(BundleError, match="BF16"):
        Bundle(broken("dtype", set_manifest_field("dtype", "BF16")))
    with pytest.raises(BundleError, match="'attention_gate' bundle"):
        KVDistillPress(bundle=broken("kind", set_manifest_field("kind", "attention_gate")), compression_ratio=0.5)
    # another model: one layer more than the bundle was trained for
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.from_pretrained(tiny_model)
    cfg.num_hidden_layers = 3
    other = AutoModelForCausalLM.from_config(cfg)
    press = KVDistillPress(bundle=run / "bundle", compression_ratio=0.5)
    with pytest.raises(BundleError, match="num_layers is 2 in the bundle"):
        with press(other):
            pass


def test_trtllm_contract(ops, run, tiny_model, tmp_path):
    """Two context requests packed as TensorRT-LLM packs them (tokens concatenated, fused qkv, k=None)."""
    from types import SimpleNamespace
    from kvdistill_export.trtllm import KVDistillSparseKV, kept_count
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    cfg = model.config
    H, Hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompts = [PROMPT[:len(PROMPT) // 2], PROMPT]
    ids = [tok(p, add_special_tokens=False, return_tensors="pt").input_ids for p in prompts]
    lens = [i.shape[1] for i in ids]
    per_request = [attention_inputs(model, i) for i in ids]
    ratio = 0.5
    ours = []
    for r, p in enumerate(prompts):
        (tmp_path / f"p{r}.txt").write_text(p)
        res = run_kvd("compress", "--model", tiny_model, "--prompt-file", tmp_path / f"p{r}.txt", "--method",
                      f"gate:{run / 'bundle'}", "--ratio", ratio, "--out", tmp_path / f"k{r}.json")
        assert res.returncode == 0, res.stderr
        ours.append(json.loads((tmp_path / f"k{r}.json").read_text())["layers"])
    meta = SimpleNamespace(num_contexts=2, num_generations=0, seq_lens=torch.tensor(lens, dtype=torch.int32),
                           kv_cache_params=SimpleNamespace(num_cached_tokens_per_seq=[0, 0]))
    keeps = [kept_count(n, compression_ratio=ratio) for n in lens]
    for l in range(cfg.num_hidden_layers):
        hidden = torch.cat([per_request[r][l] for r in range(2)])                  # (Σ n, D)
        attn = model.model.layers[l].self_attn
        qkv = torch.cat([attn.q_proj(hidden), attn.k_proj(hidden), attn.v_proj(hidden)], dim=-1).detach()
        backend = KVDistillSparseKV(run / "bundle", l, H, Hkv, d, compression_ratio=ratio)
        idx, off = backend.sparse_kv_predict(qkv, None, meta, SimpleNamespace(hidden_states=hidden))
        assert idx.dtype == torch.int32 and off.dtype == torch.int32
        assert idx.shape == (Hkv, sum(keeps)) and off.tolist() == [0, keeps[0], keeps[0] + keeps[1]]
        for r in range(2):
            block = idx[:, off[r]:off[r + 1]]
            for h in range(Hkv):
                kept = block[h].tolist()
                assert all(a < b for a, b in zip(kept, kept[1:])) and 0 <= kept[0] and kept[-1] < lens[r]
                assert kept == ours[r][l][h], f"request {r} layer {l} head {h}: kept sets differ from compress"
    # generation steps, and bad input
    gen = SimpleNamespace(num_contexts=0, num_generations=2, seq_lens=torch.tensor([1, 1]))
    assert backend.sparse_kv_predict(qkv[:2], None, gen, SimpleNamespace(hidden_states=hidden[:2])) == (None, None)
    with pytest.raises(ValueError, match="forward_args.hidden_states"):
        backend.sparse_kv_predict(qkv, None, meta, SimpleNamespace())
    with pytest.raises(ValueError, match="q must be"):
        backend.sparse_kv_predict(qkv[:, :-1], None, meta, SimpleNamespace(hidden_states=hidden))
    chunked = SimpleNamespace(**{**vars(meta), "kv_cache_params": SimpleNamespace(num_cached_tokens_per_seq=[0, 64])})
    with pytest.raises(ValueError, match="already cached"):
        backend.sparse_kv_predict(qkv, None, chunked, SimpleNamespace(hidden_states=hidden))
    with pytest.raises(BundleError, match="num_kv_heads is 2 in the bundle but 4"):
        KVDistillSparseKV(run / "bundle", 0, H, 4, d, compression_ratio=ratio)
    with pytest.raises(ValueError, match="exactly one of"):
        KVDistillSparseKV(run / "bundle", 0, H, Hkv, d)
