"""kvpress 0.5.5 parity of KVzip and KVzip+: `kvdistill compress --method kvzip | kvzip_plus` keeps the same
(layer, KV head, position) entries as kvpress's KVzipPress (layerwise=False: one budget pooled over every layer
and head) on transformers' SmolLM2 (float32, sdpa, loaded from the same directory), for the same chat-formatted
context and ratio. One case is longer than kvpress's 2,048-token reconstruction chunk, so the chunked passes
(the later chunks' "starting with" instruction quoting the previous chunk) are compared too.

How kvpress's kept set is read: KVzipPress masks instead of gathering; the kept entries are the complement of
each layer's `masked_key_indices`. Its scores are recorded after its compress_post (sinks set to max + 1).

Ties: our selector breaks ties toward the lower (layer, head, position); torch.topk leaves them unspecified, and
the two implementations round the same score differently (~1e-7 relative). A difference between the kept sets
is accepted only where every swapped entry's kvpress score lies within a numerical tie of the pooled selection
boundary: |s - s_boundary| <= 1e-4 * max|s|. The test reports how many such swaps it saw.
"""
import json

import pytest

from conftest import MODEL_DIR, run_kvd, torch_threads

torch = pytest.importorskip("torch")
kvpress = pytest.importorskip("kvpress")
transformers = pytest.importorskip("transformers")

REL_TIE = 1e-4

SENTENCES = [
    f"Ledger line {i}: the {['copper', 'linen', 'salt', 'indigo', 'timber', 'amber'][i % 6]} shipment for "
    f"{['Marseille', 'Bergen', 'Valparaiso', 'Mombasa', 'Tromso', 'Cebu', 'Halifax'][i % 7]} weighed "
    f"{120 + 17 * i} kilograms and left dock {3 + i % 9} on day {1 + (7 * i) % 28}."
    for i in range(400)
]


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(torch_threads())
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    return {"tok": tok, "model": model}


def chat_context(tok, n_sentences, multiple):
    """The user turn's text up to the end of its content (the part kvpress's pipeline compresses), grown by a
    word or two until its token count is a multiple of `multiple` (so that both sides keep the same count)."""
    content = " ".join(SENTENCES[:n_sentences])
    for extra in ["", " Done.", " All done.", " All is done.", " Nothing else to add.", " Nothing else to add here.",
                  " The ledger ends.", " The ledger ends here."]:
        body = content + extra
        text = tok.apply_chat_template([{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True)
        text = text[: text.index(body) + len(body)]
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
        if ids.shape[1] % multiple == 0:
            return text, ids
    raise AssertionError("no padding word made the token count fit")


def kvpress_kept(hf, ids, ratio, plus):
    """{(layer, head, position)} kvpress keeps, and its scores (L, H_kv, T)."""
    from kvpress import KVzipPress
    from transformers import DynamicCache
    press = KVzipPress(compression_ratio=ratio, kvzip_plus_normalization=plus)
    recorded = {}
    orig = press.compress_post

    def recording(model):
        orig(model)
        recorded["scores"] = press.score_val[:, 0].detach().float().clone()  # (L, H_kv, T)

    press.compress_post = recording
    model = hf["model"]
    with torch.no_grad(), press(model):
        model(ids, past_key_values=DynamicCache(), use_cache=True)
    s = recorded["scores"]
    L, Hkv, T = s.shape
    kept = set()
    for l, layer in enumerate(model.model.layers):
        _, hi, si = layer.self_attn.masked_key_indices
        mask = torch.ones(Hkv, T, dtype=torch.bool)
        mask[hi, si] = False
        del layer.self_attn.masked_key_indices
        for h in range(Hkv):
            kept.update((l, h, int(j)) for j in torch.nonzero(mask[h]).flatten())
    return kept, s


@pytest.mark.parametrize("method,ratio,sentences", [("kvzip", 0.5, 14), ("kvzip", 0.75, 14), ("kvzip_plus", 0.75, 14),
                                                    ("kvzip", 0.75, 70)])
def test_kvzip_parity(hf, tmp_path, method, ratio, sentences):
    text, ids = chat_context(hf["tok"], sentences, 4)
    T = ids.shape[1]
    if sentences == 70:
        assert T > 2048 + 60, "the long case must span two reconstruction chunks"
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(text)
    out = tmp_path / "kept.json"
    r = run_kvd("compress", "--model", MODEL_DIR, "--prompt-file", prompt, "--method", method, "--ratio", ratio,
                "--out", out, timeout=1200)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["tokens"] == T, "our tokenizer and HF's disagree on the prompt"
    ours = {(l, h, j) for l, layer in enumerate(res["layers"]) for h, pos in enumerate(layer) for j in pos}
    theirs, s = kvpress_kept(hf, ids, ratio, method == "kvzip_plus")
    assert len(ours) == len(theirs), f"kept {len(ours)} entries, kvpress {len(theirs)}"
    boundary = min(float(s[l, h, j]) for (l, h, j) in theirs)
    tol = REL_TIE * float(s.abs().max())
    far = [(e, float(s[e])) for e in ours ^ theirs if abs(float(s[e]) - boundary) > tol]
    assert not far, f"{method} r={ratio}: kept sets differ beyond ties: {sorted(far)[:20]}"
    # Per-layer budgets really differ (the pooled selection is not a uniform one in disguise).
    per_layer = [sum(1 for e in ours if e[0] == l) for l in range(s.shape[0])]
    assert len(set(per_layer)) > 1
    print(f"{method} r={ratio}: T={T}, kept {len(ours)}, tie swaps={len(ours ^ theirs)}, per layer {per_layer}")
