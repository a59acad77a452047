"""`kvdistill eval`'s work shared across a method's budgets (SmolLM2, CPU), checked from the records alone:
- one prefill shared by a method's budgets (--share-prefill budgets, the default) gives the same records as a
  prefill per (method, budget);
- decoding those budgets as one batch (--decode-rows) gives each sample the same answer, kept set and bytes, and
  KL / perplexity / hit rate within float tolerance."""
import pytest

from eval_helpers import eval_pair, needs_corpus, tasks  # noqa: F401 (tasks is a fixture)

pytestmark = needs_corpus


def test_shared_prefill_equals_one_prefill_per_budget(tasks, tmp_path):
    a, b = eval_pair(tasks, tmp_path, ("--share-prefill", "budgets", "--decode-rows", 0),
                     ("--share-prefill", "none", "--decode-rows", 0), batch=2, methods="snapkv,pyramidkv,defensivekv",
                     ratios="0.25,0.75")
    for k, ra in a.items():
        rb = b[k]
        for f in ("output", "score", "kl", "ppl", "hit_rate", "kept_fraction", "kv_bytes_kept", "peak_kv_bytes"):
            assert ra[f] == rb[f], (k, f, ra[f], rb[f])
        # SnapKV and PyramidKV score alike at every budget; DefensiveKV's first stage depends on it.
        assert ra.get("prefill_shared_by") == (2 if k[0] in ("snapkv", "pyramidkv") else None), k
        assert "prefill_shared_by" not in rb


def test_budgets_decoded_together_equal_budgets_decoded_alone(tasks, tmp_path):
    a, b = eval_pair(tasks, tmp_path, ("--decode-rows", 256), ("--decode-rows", 0), batch=2,
                     methods="snapkv,defensivekv", ratios="0.25,0.5,0.75")
    for k, ra in a.items():
        rb = b[k]
        for f in ("output", "score", "kept_fraction", "kv_bytes_kept", "peak_kv_bytes", "batch"):
            assert ra[f] == rb[f], (k, f, ra[f], rb[f])
        for f in ("kl", "ppl", "hit_rate"):
            assert ra[f] == pytest.approx(rb[f], rel=1e-3, abs=1e-6), (k, f, ra[f], rb[f])
        # SnapKV's three budgets share a prefill and decode as one batch of 3 x 2 rows; DefensiveKV's do not share.
        assert ra.get("decode_rows") == (6 if k[0] == "snapkv" else None), k
        assert "decode_rows" not in rb
