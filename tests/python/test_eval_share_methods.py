"""`kvdistill eval --share-prefill methods` (SmolLM2, CPU), checked from the records alone: consecutive methods that
score each layer as it runs share one prefill and give the same records as one prefill per method
(--share-prefill budgets), and with their budgets decoded as one batch (the default) the same outputs, with
KL / perplexity / hit rate within float tolerance (a larger batch rounds differently); methods that score after the
whole forward (KVzip, KVzip+) share a prefill (and one reconstruction pass) with each other only; a method that evicts
while decoding (TOVA's decode form) keeps its own prefill; a memory cap too small for two methods' caches splits the
group."""
import pytest

from eval_helpers import eval_pair, needs_corpus, records, evaluate, tasks  # noqa: F401 (tasks is a fixture)

pytestmark = needs_corpus

METHODS = "snapkv,knorm,kvzip,kvzip_plus,tova_decode,streaming_llm"


def test_methods_sharing_a_prefill_equal_a_prefill_per_method(tasks, tmp_path):
    a, b = eval_pair(tasks, tmp_path, ("--share-prefill", "methods"), ("--share-prefill", "budgets"), batch=2,
                     methods=METHODS, ratios="0.25,0.75")
    for k, ra in a.items():
        rb = b[k]
        for f in ("output", "score", "kept_fraction", "kv_bytes_kept", "peak_kv_bytes"):
            assert ra[f] == rb[f], (k, f, ra[f], rb[f])
        for f in ("kl", "ppl", "hit_rate"):
            assert ra[f] == pytest.approx(rb[f], rel=1e-3, abs=1e-6), (k, f, ra[f], rb[f])
    shared = {k[0]: a[k].get("prefill_shared_by") for k in a}
    # snapkv and knorm (2 budgets each) share one prefill, kvzip and kvzip_plus another; tova_decode shares its with
    # its own budgets only; streaming_llm comes after it and has its own.
    assert shared == {"full": None, "snapkv": 4, "knorm": 4, "kvzip": 4, "kvzip_plus": 4, "tova_decode": 2,
                      "streaming_llm": 2}, shared
    assert {k[0]: b[k].get("prefill_shared_by") for k in b} == {m: (None if m == "full" else 2) for m in shared}


def test_each_budget_decoded_alone_gives_identical_records(tasks, tmp_path):
    a, b = eval_pair(tasks, tmp_path, ("--share-prefill", "methods", "--decode-rows", 0),
                     ("--share-prefill", "budgets", "--decode-rows", 0), batch=2, methods="snapkv,knorm",
                     ratios="0.25,0.75")
    for k, ra in a.items():
        for f in ("output", "score", "kl", "ppl", "hit_rate", "kept_fraction", "kv_bytes_kept", "peak_kv_bytes"):
            assert ra[f] == b[k][f], (k, f, ra[f], b[k][f])
    assert a[("knorm", "ratio=0.25", next(iter(a))[2])]["prefill_shared_by"] == 4


def test_the_memory_cap_splits_a_group(tasks, tmp_path):
    # A cap of a few bytes: no second method fits, so every method keeps its own prefill (its budgets still share).
    proc = evaluate(tasks, tmp_path / "cap", "--share-prefill", "methods", "--share-prefill-gib", "1e-9", batch=2,
                    methods="snapkv,knorm", ratios="0.25,0.75")
    assert proc.returncode == 0, proc.stderr
    recs = records(tmp_path / "cap")[0]
    assert {k[0]: r.get("prefill_shared_by") for k, r in recs.items()} == {"full": None, "snapkv": 2, "knorm": 2}
