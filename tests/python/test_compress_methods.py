"""`kvdistill compress` for the methods without a kvpress oracle (DefensiveKV, Layer-DefensiveKV, CriticalKV,
H2O, Random, global top-k): the dump's shape, ascending positions, budgets, and the byte accounting
(kept bytes = Σ kept entries × bytes per entry; ragged methods keep H_kv · n_kept per layer on average)."""
import json

import pytest

from conftest import MODEL_DIR, run_kvd

PROMPT = " ".join(f"Line {i}: station {chr(65 + i % 26)} reports {3 * i % 17} trains late by {i % 9} minutes."
                  for i in range(14))


@pytest.mark.parametrize("method", ["defensivekv", "layer_defensivekv", "criticalkv_snapkv", "h2o", "random",
                                    "global_knorm"])
def test_compress_method(tmp_path, method):
    prompt = tmp_path / "p.txt"
    prompt.write_text(PROMPT)
    out = tmp_path / "kept.json"
    ratio = 0.75
    r = run_kvd("compress", "--model", MODEL_DIR, "--prompt-file", prompt, "--method", method, "--ratio", ratio,
                "--out", out)
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    T, layers = d["tokens"], d["layers"]
    n_kept = max(1, int(T * (1 - ratio)))
    entries = 0
    for l, heads in enumerate(layers):
        for h, pos in enumerate(heads):
            assert pos == sorted(set(pos)) and all(0 <= p < T for p in pos), f"layer {l} head {h}"
        entries += sum(len(p) for p in heads)
        if method in ("criticalkv_snapkv", "h2o", "random"):
            assert all(len(p) == n_kept for p in heads)
        elif method == "defensivekv":  # AdaKV budgets: per layer H_kv * n_kept in all
            assert sum(len(p) for p in heads) == len(heads) * n_kept
    assert entries == len(layers) * len(layers[0]) * n_kept
    b = d["bytes"]
    assert b["kept"] == entries * b["per_entry"]
    assert b["full"] == len(layers) * len(layers[0]) * T * b["per_entry"]
    assert b["peak"] >= b["kept"]
