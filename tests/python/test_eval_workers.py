"""`kvdistill eval --workers N` (SmolLM2, CPU): batches run by several threads at once give the very records one
thread gives in order (every field but the timings), for methods that prefill-and-select, re-read the context
(KVzip) and evict while decoding; a batch that runs out of device memory beside other workers runs again alone
(KVD_TEST_OOM injects the fault a CPU cannot reach) and, out of memory alone, stops with the flags to lower and
what was written kept; a bad worker count is refused before the model loads."""
from eval_helpers import eval_pair, needs_corpus, evaluate, records, tasks  # noqa: F401 (tasks is a fixture)

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


OOM_METHODS = dict(methods="snapkv,tova_decode,streaming_llm", ratios="0.5")  # three configuration groups after the full cache


def test_a_batch_out_of_memory_beside_other_workers_runs_again_alone(tasks, tmp_path):
    one = evaluate(tasks, tmp_path / "one", **OOM_METHODS)
    assert one.returncode == 0, one.stderr
    ref, _ = records(tmp_path / "one")
    assert len(ref) == 4 * 4

    put_off = evaluate(tasks, tmp_path / "put-off", "--workers", 2, env={"KVD_TEST_OOM": "1"}, **OOM_METHODS)
    assert put_off.returncode == 0, put_off.stderr
    assert "samples 1..2 ran out of device memory beside other workers" in put_off.stderr, put_off.stderr
    got, rows = records(tmp_path / "put-off")
    assert len(rows) == len(got) == len(ref)  # each record once: the rerun skips what the batch had written
    for k, r in ref.items():
        for f in r.keys() - TIMINGS:
            assert got[k][f] == r[f], (k, f, got[k][f], r[f])

    alone = evaluate(tasks, tmp_path / "alone", "--workers", 2, env={"KVD_TEST_OOM": "1:always"}, **OOM_METHODS)
    assert alone.returncode != 0
    assert "samples 1..2 ran out of device memory alone" in alone.stderr, alone.stderr
    assert "lower --batch-tokens, --share-prefill-gib or --decode-logits-gib" in alone.stderr, alone.stderr
    kept, rows = records(tmp_path / "alone")
    assert len(rows) == len(kept)
    missing = ref.keys() - kept.keys()
    assert missing and len({k[2] for k in missing}) == 1, missing  # only the failing batch's later groups
    for k, r in kept.items():
        for f in r.keys() - TIMINGS:
            assert ref[k][f] == r[f], (k, f, ref[k][f], r[f])
