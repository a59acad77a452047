"""`kvdistill compress` for the methods without a kvpress oracle (DefensiveKV, Layer-DefensiveKV, CriticalKV,
H2O, Random, global top-k): the dump's shape, ascending positions, budgets, and the byte accounting
(kept bytes = Σ kept entries × bytes per entry; ragged methods keep H_kv · n_kept per layer on average)."""
import json

import pytest

from conftest import MODEL_DIR, assert_clean_error, run_kvd

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


def _kept(tmp_path, *flags):
    prompt = tmp_path / "p.txt"
    prompt.write_text(PROMPT)
    out = tmp_path / "kept.json"
    r = run_kvd("compress", "--model", MODEL_DIR, "--prompt-file", prompt, "--out", out, *flags)
    return r, out


def test_budget_tokens_and_chunk_size(tmp_path):
    """--budget-tokens N keeps min(T, N) per head; --chunk-size compresses after every chunk and still ends at
    the budget of all T tokens; a chunk covering the prompt gives the unchunked result."""
    r, out = _kept(tmp_path, "--method", "snapkv", "--budget-tokens", 100)
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    assert d["budget_tokens"] == 100 and "ratio" not in d
    assert all(len(p) == min(d["tokens"], 100) for heads in d["layers"] for p in heads)
    r, out = _kept(tmp_path, "--method", "snapkv", "--ratio", 0.5)
    once = json.loads(out.read_text())
    r, out = _kept(tmp_path, "--method", "snapkv", "--ratio", 0.5, "--chunk-size", 100000)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["layers"] == once["layers"]
    r, out = _kept(tmp_path, "--method", "snapkv", "--ratio", 0.5, "--chunk-size", 96)
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    T = d["tokens"]
    assert T > 96 and d["chunk_size"] == 96
    assert all(len(p) == T // 2 for heads in d["layers"] for p in heads)
    assert d["layers"] != once["layers"]


@pytest.mark.parametrize("flags,needles", [
    (["--method", "snapkv", "--ratio", 0.5, "--budget-tokens", 10], ["--ratio", "--budget-tokens"]),
    (["--method", "snapkv", "--budget-tokens", 0], ["--budget-tokens"]),
    (["--method", "snapkv", "--ratio", 1.5], ["--ratio"]),
    (["--method", "nosuch", "--ratio", 0.5], ["known:", "snapkv", "cake"]),
    (["--method", "snapkv"], ["--ratio", "--budget-tokens"]),
])
def test_compress_flag_errors(tmp_path, flags, needles):
    r, _ = _kept(tmp_path, *flags)
    assert_clean_error(r, *needles)
