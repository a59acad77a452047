"""Helpers shared by the `kvdistill eval` pytest files: the RULER task slice (one sample of four tasks at 384
tokens), running eval on it, and reading its records back."""
import json
from pathlib import Path

import pytest

from conftest import MODEL_DIR, run_kvd

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / ".cache/corpus"
METHODS = "streaming_llm,snapkv,adakv_snapkv"

needs_corpus = pytest.mark.skipif(not (CORPUS / "MANIFEST").exists(),
                                  reason="the default corpus is missing: run scripts/corpus.sh")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    d = tmp_path_factory.mktemp("evaltasks")
    full = d / "all.jsonl"
    proc = run_kvd("prepare", "tasks", "--model", MODEL_DIR, "--suite", "ruler", "--lengths", "384",
                   "--samples", "1", "--seed", "5", "--corpus", CORPUS, "--out", full)
    assert proc.returncode == 0, proc.stderr
    lines = full.read_text().splitlines()
    keep = [l for l in lines if json.loads(l)["task"] in ("niah_single", "vt", "fwe", "qa")]
    assert len(keep) == 4
    out = d / "tasks.jsonl"
    out.write_text("\n".join(keep) + "\n")
    return out


def evaluate(tasks, out, *extra, batch=1, methods=METHODS, ratios="0.5", env=None):
    return run_kvd("eval", "--model", MODEL_DIR, "--tasks", tasks, "--methods", methods, "--ratios", ratios,
                   "--out", out, "--batch", batch, "--max-new-tokens", 12, *extra, env=env)


def records(out):
    rows = [json.loads(l) for l in (Path(out) / "results.jsonl").read_text().splitlines()]
    return {(r["method"], r["budget"], r["id"]): r for r in rows}, rows


def ruler_score(output, answers, task):
    o = output.lower()
    hits = [a.lower() in o for a in answers]
    return float(any(hits)) if task.startswith("qa") else sum(hits) / len(answers)


def eval_pair(tasks, tmp_path, flags_a, flags_b, **kw):
    """Two runs of the same samples and configurations, differing in flags: their records by key."""
    runs = []
    for name, flags in (("a", flags_a), ("b", flags_b)):
        proc = evaluate(tasks, tmp_path / name, *flags, **kw)
        assert proc.returncode == 0, proc.stderr
        runs.append(records(tmp_path / name)[0])
    configs = 1 + len(kw.get("methods", METHODS).split(",")) * len(kw.get("ratios", "0.5").split(","))  # + full
    assert runs[0].keys() == runs[1].keys() and len(runs[0]) == configs * 4
    return runs
