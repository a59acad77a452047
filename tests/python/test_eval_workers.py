"""`kvdistill eval --workers N` (SmolLM2, CPU): batches run by several threads at once give the very records one
thread gives in order (every field but the timings), for methods that prefill-and-select, re-read the context
(KVzip) and evict while decoding; a bad worker count is refused before the model loads."""
from eval_helpers import eval_pair, needs_corpus, evaluate, tasks  # noqa: F401 (tasks is a fixture)

pytestmark = needs_corpus

TIMINGS = {"prefill_s", "decode_s"}


def test_workers_give_the_records_of_one_thread(tasks, tmp_path):
    a, b = eval_pair(tasks, tmp_path, ("--workers", 3), (), batch=1, methods="snapkv,kvzip,tova_decode",
                     ratios="0.25,0.75")
    for k, ra in a.items():
        rb = b[k]
        assert ra.keys() == rb.keys(), k
        for f in ra.keys() - TIMINGS:
            assert ra[f] == rb[f], (k, f, ra[f], rb[f])


def test_a_bad_worker_count_is_refused(tasks, tmp_path):
    proc = evaluate(tasks, tmp_path / "w0", "--workers", 0)
    assert proc.returncode != 0
    assert "--workers 0: must be positive" in proc.stderr, proc.stderr
