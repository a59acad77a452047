"""`kvdistill eval` decodes a continuous learned part in fixed-shape steps (SmolLM2, CPU): TRIM-KV's gate, KVzap,
DMS and the Attention-Gate rate each decoded token when it is appended (its log β / score kept in the cache's payload;
the Attention-Gate's block reads its own keys and values of every earlier token, kept per row in the cache), and
their fixed-shape form computes that value inside the step. With `--decode static` (the op-by-op form of the CUDA-graph path) the eval
takes that path for them (the record says "decode": "static") and every sample keeps the answer, kept fraction,
kept and peak bytes it has on the step-by-step cache path; KL and perplexity within float tolerance. A continuous
part evicts as the prompt streams in; its budgets that decode as one batch (the default --decode-rows; "decode_rows"
in the record) are prefilled as one batch too with --join-prefill yes (the default on CUDA), each row held at its own
budget ("prefill_rows"), against each budget prefilled and decoded alone here on the cache path."""
import pytest

from eval_helpers import eval_pair, needs_corpus, tasks  # noqa: F401 (tasks is a fixture)

pytestmark = needs_corpus

METHODS = "untrained:retention_gate,untrained:kvzap,untrained:dms,untrained:attention_gate"


def test_continuous_learned_parts_decode_in_fixed_shape_steps_as_on_the_cache_path(tasks, tmp_path):
    a, b = eval_pair(tasks, tmp_path, ("--decode", "static", "--join-prefill", "yes"),
                     ("--decode", "cache", "--decode-rows", 0), batch=2, methods=METHODS, ratios="0.25,0.75")
    learned = 0
    for k, ra in a.items():
        rb = b[k]
        if k[0] != "full":
            learned += 1
            assert ra["decode"] == "static" and rb["decode"] == "cache", (k, ra["decode"], rb["decode"])
            assert ra.get("decode_rows") == 4 and "decode_rows" not in rb, (k, ra.get("decode_rows"))  # 2 budgets x 2
            assert "prefill_shared_by" not in ra, k  # not one prefill scored for both budgets, but
            assert ra.get("prefill_rows") == 4 and "prefill_rows" not in rb, k  # both budgets' rows in one prefill
        for f in ("output", "score", "kept_fraction", "kv_bytes_kept", "peak_kv_bytes"):
            assert ra[f] == rb[f], (k, f, ra[f], rb[f])
        for f in ("kl", "ppl"):
            assert ra[f] == pytest.approx(rb[f], rel=1e-3, abs=1e-6), (k, f, ra[f], rb[f])
    assert learned == 4 * 2 * 4
