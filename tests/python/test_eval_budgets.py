"""`kvdistill eval`'s prefill shared across a method's budgets (SmolLM2, CPU), checked from the records alone: one
prefill shared by a method's budgets (--share-prefill budgets, the default) gives the same records as a prefill per
(method, budget), whether the budgets share one scoring (SnapKV) or each scores the shared observation itself
(DefensiveKV), and for a method that goes on evicting while decoding (TOVA). (Decoding the budgets as one batch:
test_eval_joint_decode.py; two files, so that each eval pair has its own time limit.)"""
from eval_helpers import eval_pair, needs_corpus, tasks  # noqa: F401 (tasks is a fixture)

pytestmark = needs_corpus


def test_shared_prefill_equals_one_prefill_per_budget(tasks, tmp_path):
    a, b = eval_pair(tasks, tmp_path, ("--share-prefill", "budgets", "--decode-rows", 0),
                     ("--share-prefill", "none", "--decode-rows", 0), batch=2,
                     methods="snapkv,defensivekv,tova_decode", ratios="0.25,0.75")
    for k, ra in a.items():
        rb = b[k]
        for f in ("output", "score", "kl", "ppl", "hit_rate", "kept_fraction", "kv_bytes_kept", "peak_kv_bytes"):
            assert ra[f] == rb[f], (k, f, ra[f], rb[f])
        # Every method's two budgets share the prefill (DefensiveKV's first stage depends on the budget: each budget
        # scores the shared observation itself; TOVA goes on evicting while decoding).
        assert ra.get("prefill_shared_by") == (None if k[0] == "full" else 2), k
        assert "prefill_shared_by" not in rb
