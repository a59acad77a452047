"""`kvdistill eval`'s budgets decoded as one batch (--decode-rows; SmolLM2, CPU), checked from the records alone:
each sample keeps the same answer, kept set and bytes as when each budget decodes alone, and KL / perplexity / hit
rate within float tolerance, for a method that evicts once after prefill (SnapKV) and one that goes on evicting
while decoding (H2O)."""
import pytest

from eval_helpers import eval_pair, evaluate, needs_corpus, records, tasks  # noqa: F401 (tasks is a fixture)

pytestmark = needs_corpus


def test_budgets_decoded_together_equal_budgets_decoded_alone(tasks, tmp_path):
    a, b = eval_pair(tasks, tmp_path, ("--decode-rows", 256), ("--decode-rows", 0), batch=2,
                     methods="snapkv,h2o_decode", ratios="0.25,0.5,0.75")
    for k, ra in a.items():
        rb = b[k]
        for f in ("output", "score", "kept_fraction", "kv_bytes_kept", "peak_kv_bytes", "batch"):
            assert ra[f] == rb[f], (k, f, ra[f], rb[f])
        for f in ("kl", "ppl", "hit_rate"):
            assert ra[f] == pytest.approx(rb[f], rel=1e-3, abs=1e-6), (k, f, ra[f], rb[f])
        # Each method's three budgets share a prefill and decode as one batch of 3 x 2 rows (H2O evicting as it
        # decodes holds each row at its own budget's count).
        assert ra.get("decode_rows") == (None if k[0] == "full" else 6), k
        assert "decode_rows" not in rb
    # A teacher-forced logits cap below one budget's logits decodes every budget alone: the records of --decode-rows 0.
    proc = evaluate(tasks, tmp_path / "c", "--decode-logits-gib", "1e-6", batch=2, methods="snapkv,h2o_decode",
                    ratios="0.25,0.5,0.75")
    assert proc.returncode == 0, proc.stderr
    c = records(tmp_path / "c")[0]
    assert c.keys() == b.keys()
    for k, rc in c.items():
        assert "decode_rows" not in rc, k
        for f in ("output", "score", "kv_bytes_kept", "peak_kv_bytes", "kl", "ppl", "hit_rate"):
            assert rc[f] == b[k][f], (k, f, rc[f], b[k][f])
