"""`kvdistill eval` on SmolLM2 (CPU), checked from its output files alone:
- every record's score is re-derived from its output with RULER's string-match rules;
- the full cache has KL 0, hit rate 1 and keeps everything; byte counts equal entries x bytes per entry;
- a ratio-r uniform method keeps floor(n (1 - r)) entries per head;
- --batch 3 gives every sample the same results as --batch 1; --batch-tokens caps a batch's padded size;
- --shard K/N: the shards' records are the single run's, each once;
- --kernels reference is recorded in each record;
- (a method's budgets sharing one prefill and one decode batch: test_eval_budgets.py)
- a run killed mid-way (plus a torn last line) resumes to the same results without duplicates;
- bad input: one clear line each."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import KVD_BIN, MODEL_DIR, assert_clean_error, run_kvd
from eval_helpers import METHODS, ROOT, evaluate, needs_corpus, records, ruler_score, tasks  # noqa: F401 (a fixture)

L, HKV, HD = 30, 3, 64          # SmolLM2-135M: layers, KV heads, head dim
BYTES_PER_ENTRY = 2 * HD * 4    # K + V in float32 (CPU)

pytestmark = needs_corpus


@pytest.fixture(scope="module")
def single(tasks, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval1")
    proc = evaluate(tasks, out, batch=1)
    assert proc.returncode == 0, proc.stderr
    return out


def test_records_and_reports(single, tasks):
    by_key, rows = records(single)
    samples = [json.loads(l) for l in Path(tasks).read_text().splitlines()]
    assert len(rows) == len(by_key) == 4 * len(samples)  # full + 3 methods at one ratio, no duplicates
    answers = {s["id"]: (s["answers"], s["task"]) for s in samples}
    for r in rows:
        a, task = answers[r["id"]]
        assert r["score"] == pytest.approx(ruler_score(r["output"], a, task))
        n = r["span_tokens"]
        assert r["kv_bytes_full"] == n * L * HKV * BYTES_PER_ENTRY
        assert r["kv_bytes_kept"] % BYTES_PER_ENTRY == 0
        assert r["kept_fraction"] == pytest.approx(r["kv_bytes_kept"] / r["kv_bytes_full"])
        assert r["peak_kv_bytes"] >= r["kv_bytes_kept"]
        if r["method"] == "full":
            assert r["kl"] == 0.0 and r["hit_rate"] == 1.0 and r["kept_fraction"] == 1.0
        else:
            assert r["kl"] > 0.0 and 0.0 < r["hit_rate"] <= 1.0
            # The full cache's peak is the whole span plus the answer; compression must stay below it.
            assert r["peak_kv_bytes"] < by_key[("full", "none", r["id"])]["peak_kv_bytes"]
        if r["method"] in ("streaming_llm", "snapkv"):  # uniform: floor(n (1 - r)) per head, every layer
            assert r["kv_bytes_kept"] == (n // 2) * L * HKV * BYTES_PER_ENTRY
        if r["method"] == "adakv_snapkv":  # head-adaptive: the same total per layer
            assert r["kv_bytes_kept"] == (n // 2) * L * HKV * BYTES_PER_ENTRY
    # Streaming keeps the 4 sinks and the recent half; its hit rate is the share of those in the oracle top-k.
    res = json.loads((Path(single) / "results.json").read_text())
    labels = {(c["method"], c["budget"]) for c in res["configs"]}
    assert labels == {("full", "none"), ("streaming_llm", "ratio=0.5"), ("snapkv", "ratio=0.5"),
                      ("adakv_snapkv", "ratio=0.5")}
    full = next(c for c in res["configs"] if c["method"] == "full")
    mean = sum(r["score"] for r in rows if r["method"] == "full") / len(samples)
    assert full["overall"]["accuracy"] == pytest.approx(100 * mean)  # one sample per (task, length) cell
    csv = (Path(single) / "results.csv").read_text().splitlines()
    assert csv[0].startswith("method,label,budget,task,length,n,accuracy")
    assert len(csv) == 1 + 4 * len(samples)
    md = (Path(single) / "results.md").read_text()
    assert "| full cache |" in md and "| snapkv |" in md and "Accuracy (%) per task, ratio=0.5" in md
    # run.json names the model and the tasks by file name and hash, never by a machine path.
    run = json.loads((Path(single) / "run.json").read_text())
    assert run["model"] == Path(MODEL_DIR).name and run["tasks"] == Path(tasks).name
    assert len(run["model_config_sha256"]) == 64 and len(run["tasks_sha256"]) == 64
    assert not any("/" in str(v) for v in run.values())


def test_plot(single):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/plot_results.py"), str(single)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in ("accuracy.png", "kl.png"):
        data = (Path(single) / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_batch_equals_single(single, tasks, tmp_path):
    proc = evaluate(tasks, tmp_path, batch=3)
    assert proc.returncode == 0, proc.stderr
    one, _ = records(single)
    three, _ = records(tmp_path)
    assert one.keys() == three.keys()
    for k, a in one.items():
        b = three[k]
        assert b["batch"] in (1, 3)
        for f in ("output", "score", "span_tokens", "kv_bytes_full", "kv_bytes_kept", "peak_kv_bytes", "kept_fraction"):
            assert a[f] == b[f], (k, f, a[f], b[f])
        assert b["hit_rate"] == pytest.approx(a["hit_rate"], abs=1e-9)
        assert b["kl"] == pytest.approx(a["kl"], rel=1e-3, abs=1e-6)
        assert b["ppl"] == pytest.approx(a["ppl"], rel=1e-4)


def test_shards_split_the_samples(single, tasks, tmp_path):
    # Shards 0/3, 1/3, 2/3 take the task file's lines 0 and 3, 1, 2: together every record of the single run,
    # each exactly once, equal to it (batch 1 both ways).
    one, _ = records(single)
    ids = [json.loads(l)["id"] for l in Path(tasks).read_text().splitlines()]
    seen = {}
    for k in range(3):
        proc = evaluate(tasks, tmp_path / f"s{k}", "--shard", f"{k}/3", batch=1)
        assert proc.returncode == 0, proc.stderr
        assert f"shard {k}/3" in proc.stderr
        got, _ = records(tmp_path / f"s{k}")
        assert {i for _, _, i in got} == set(ids[k::3])
        for key, r in got.items():
            assert key not in seen
            seen[key] = r
    assert seen.keys() == one.keys()
    for key, a in one.items():
        assert seen[key]["output"] == a["output"] and seen[key]["kv_bytes_kept"] == a["kv_bytes_kept"], key
    for bad in ("3/3", "1", "-1/2", "a/b"):
        assert_clean_error(evaluate(tasks, tmp_path / "bad", "--shard", bad), "--shard")


def test_batch_tokens_caps_the_padded_batch(single, tasks, tmp_path):
    one, _ = records(single)
    spans = sorted({r["id"]: r["span_tokens"] for r in one.values()}.items(), key=lambda kv: kv[1])
    cap = 2 * spans[-1][1]  # two rows of the longest prompt fit, three do not
    # --kernels reference: on the CPU the reference runs either way, so the records are the same, and say so.
    proc = evaluate(tasks, tmp_path, "--batch-tokens", cap, "--kernels", "reference", batch=4)
    assert proc.returncode == 0, proc.stderr
    got, _ = records(tmp_path)
    # The rule, rederived: consecutive samples by length, while (rows) x (the longest span) <= cap.
    size, i = {}, 0
    while i < len(spans):
        j = i + 1
        while j < len(spans) and j - i < 4 and (j - i + 1) * spans[j][1] <= cap:
            j += 1
        for sid, _ in spans[i:j]:
            size[sid] = j - i
        i = j
    assert sorted(size.values()) == [2, 2, 2, 2]
    for k, a in one.items():
        assert got[k]["batch"] == size[k[2]], k
        assert got[k]["output"] == a["output"] and got[k]["kv_bytes_kept"] == a["kv_bytes_kept"], k
        assert got[k]["kernels"] == "reference" and "kernels" not in a, k


def test_resume_after_kill(single, tasks, tmp_path):
    args = [KVD_BIN, "eval", "--model", MODEL_DIR, "--tasks", tasks, "--methods", METHODS, "--ratios", "0.5",
            "--out", tmp_path, "--batch", "1", "--max-new-tokens", "12"]
    p = subprocess.Popen(list(map(str, args)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    res = tmp_path / "results.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not res.exists() or len(res.read_text().splitlines()) < 3):
        time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    n_before = len(res.read_text().splitlines())
    assert 3 <= n_before < 16
    with open(res, "a") as f:  # a write torn by the crash
        f.write('{"id": "torn", "meth')
    proc = evaluate(tasks, tmp_path, batch=1)
    assert proc.returncode == 0, proc.stderr
    assert f"{16 - n_before} results to compute" in proc.stderr
    resumed, rows = records(tmp_path)
    assert len(rows) == 16
    one, _ = records(single)
    for k, a in one.items():
        assert resumed[k]["output"] == a["output"] and resumed[k]["kept_fraction"] == a["kept_fraction"]
    # A rerun has nothing to do.
    proc = evaluate(tasks, tmp_path, batch=1)
    assert proc.returncode == 0 and "0 results to compute" in proc.stderr


def test_other_settings_refused(single, tasks):
    proc = evaluate(tasks, single, "--query-aware")
    assert_clean_error(proc, "query", "new --out")


def test_bad_input(tasks, tmp_path):
    assert_clean_error(evaluate(tasks, tmp_path / "a", methods="snapkv,nosuch"), "unknown method 'nosuch'", "known:")
    assert_clean_error(evaluate(tasks, tmp_path / "b", ratios="1.0"), "--ratios", "outside [0, 1)")
    assert_clean_error(evaluate(tasks, tmp_path / "b", "--kernels", "cudnn"), "--kernels", "cudnn")
    proc = run_kvd("eval", "--model", MODEL_DIR, "--tasks", tasks, "--methods", "snapkv", "--budget-tokens", "100000",
                   "--out", tmp_path / "c")
    assert_clean_error(proc, "--budget-tokens 100000", "not smaller than the context")
    bad = tmp_path / "bad.jsonl"
    good = Path(tasks).read_text().splitlines()[0]
    j = json.loads(good)
    del j["answers"]
    bad.write_text(good + "\n" + json.dumps(j) + "\n")
    assert_clean_error(evaluate(bad, tmp_path / "d"), "bad.jsonl:2", 'missing field "answers"')
    bundle = tmp_path / "other-gates"
    bundle.mkdir()
    (bundle / "kvdistill.json").write_text(json.dumps({
        "format_version": 1, "kind": "retention_gate", "gate_hidden": 512,
        "base_model": {"id": "Llama-3.2-1B", "config_sha256": "0" * 64}}))
    assert_clean_error(evaluate(tasks, tmp_path / "e", methods=f"gate:{bundle}"), "trained for model 'Llama-3.2-1B'")
    alien = tmp_path / "alien-bundle"
    alien.mkdir()
    (alien / "kvdistill.json").write_text(json.dumps({"format_version": 1, "kind": "warp_drive"}))
    assert_clean_error(evaluate(tasks, tmp_path / "f", methods=f"gate:{alien}"), "'warp_drive'", "known kinds",
                       "retention_gate")
    assert_clean_error(evaluate(tasks, tmp_path / "g", methods=f"retention_gate:{tmp_path / 'nowhere'}"), "nowhere")
    for d in "abcdefg":
        assert not (tmp_path / d / "results.jsonl").exists()
