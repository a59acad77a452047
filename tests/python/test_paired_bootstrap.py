"""scripts/paired_bootstrap.py on hand-made eval directories: the paired differences and their means are the
hand-derived ones, the 95% interval contains the mean and excludes 0 exactly when the difference is clear, shards
are read as one (the first record of a method / budget / sample wins), and a missing directory is one clear
error."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "paired_bootstrap.py"


def record(method, budget, sid, score, hit, kl, peak):
    return {"method": method, "label": method, "budget": budget, "id": sid, "score": score, "hit_rate": hit,
            "kl": kl, "peak_kv_bytes": peak}


def write(d, rows):
    d.mkdir(parents=True, exist_ok=True)
    (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=120)


def test_paired_differences_and_shards(tmp_path):
    n = 40
    base, good, same = [], [], []
    for i in range(n):
        sid = f"s{i}"
        base.append(record("snapkv", "ratio=0.5", sid, float(i % 2), 0.5, 0.30, 2 ** 20))
        # always at least as good: +1 on the samples snapkv fails, hit +0.1, KL lower by 0.05
        good.append(record("gate", "ratio=0.5", sid, 1.0, 0.6, 0.25, 2 ** 21))
        # the same score as snapkv on half the samples, swapped on the other half: mean difference 0
        same.append(record("coin", "ratio=0.5", sid, float((i // 2) % 2), 0.5, 0.30, 2 ** 20))
    a = write(tmp_path / "a", base + good + [record("full", "none", f"s{i}", 1, 1, 0, 3) for i in range(n)])
    # the second shard repeats the gate on s0 with another score: the first record must win
    b = write(tmp_path / "b", same + [record("gate", "ratio=0.5", "s0", 0.0, 0.0, 9.0, 1)])
    r = run(a, b, "--baseline", "snapkv", "--resamples", 500)
    assert r.returncode == 0, r.stderr
    res = {x["method"]: x for x in json.loads((a / "bootstrap_vs_snapkv.json").read_text())}
    assert set(res) == {"gate", "coin"}
    g = res["gate"]
    assert g["n"] == n
    assert abs(g["score_diff"] - 0.5) < 1e-12 and abs(g["hit_rate_diff"] - 0.1) < 1e-12
    assert abs(g["kl_diff"] + 0.05) < 1e-12 and g["peak_kv_bytes"] == 2 ** 21
    assert g["score_ci"][0] > 0 and g["score_ci"][0] <= 0.5 <= g["score_ci"][1] and g["beats"]
    c = res["coin"]
    assert abs(c["score_diff"]) < 1e-12 and c["score_ci"][0] < 0 < c["score_ci"][1] and not c["beats"]
    assert "| ratio=0.5 | gate | 40 |" in r.stdout


def test_missing_directory(tmp_path):
    r = run(tmp_path / "nope")
    assert r.returncode != 0
    assert "does not exist" in r.stderr and "kvdistill eval --out" in r.stderr


def test_move_compares_across_budgets(tmp_path):
    """--move LABEL FROM TO: a gate at its own flags (threshold) paired with a heuristic run at the gate's fraction."""
    n = 20
    rows = []
    for i in range(n):
        rows.append(record("snapkv", "ratio=0.04", f"s{i}", 0.0, 0.9, 0.2, 10))
        rows.append(record("gate", "threshold=0.5", f"s{i}", 1.0, 0.95, 0.1, 10))
    d = write(tmp_path / "m", rows)
    r = run(d, "--baseline", "snapkv", "--resamples", 200)
    assert r.returncode == 0, r.stderr
    assert json.loads((d / "bootstrap_vs_snapkv.json").read_text()) == [], "different budgets must not be paired"
    r = run(d, "--baseline", "snapkv", "--resamples", 200, "--move", "gate", "threshold=0.5", "ratio=0.04")
    assert r.returncode == 0, r.stderr
    (g,) = json.loads((d / "bootstrap_vs_snapkv.json").read_text())
    assert g["budget"] == "ratio=0.04" and g["n"] == n and abs(g["score_diff"] - 1.0) < 1e-12


def test_best_heuristic_baseline_and_headline(tmp_path):
    """--baseline best: per budget the heuristic of highest mean accuracy is the baseline (learned parts, whose
    labels name a bundle, never are), and the headline pairs the best learned part with it."""
    n = 40
    rows = []
    for i in range(n):
        sid = f"s{i}"
        for budget, lo_acc, hi_acc, learned_acc in (("ratio=0.5", 0.0, float(i % 2), 1.0),
                                                    ("ratio=0.75", 0.0, float(i % 2), float((i // 2) % 2))):
            rows.append(record("snapkv", budget, sid, lo_acc, 0.5, 0.3, 10))
            rows.append(record("defensivekv", budget, sid, hi_acc, 0.6, 0.2, 10))
            r = record("kvzap:/runs/a/bundle", budget, sid, learned_acc, 0.7, 0.1, 10)
            r["label"] = "kvzap(a)"
            rows.append(r)
            r = record("dms:/runs/b/bundle", budget, sid, 0.0, 0.7, 0.1, 10)
            r["label"] = "dms(b)"
            rows.append(r)
    d = write(tmp_path / "best", rows)
    r = run(d, "--baseline", "best", "--resamples", 500, "--plot")
    assert r.returncode == 0, r.stderr
    png = (d / "bootstrap_vs_best.png").read_bytes()  # the intervals as error bars
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    res = json.loads((d / "bootstrap_vs_best.json").read_text())
    assert {x["baseline"] for x in res} == {"defensivekv"}
    assert {(x["budget"], x["method"]) for x in res} == {(b, m) for b in ("ratio=0.5", "ratio=0.75")
                                                         for m in ("snapkv", "kvzap(a)", "dms(b)")}
    head = r.stdout.split("| budget | best learned part |")[1]
    assert "| ratio=0.5 | kvzap(a) | 40 | 100.0 | defensivekv | 50.0 | +50.0 [" in head
    assert "learned better (significant)" in head.splitlines()[2]
    assert "| ratio=0.75 | kvzap(a) | 40 | 50.0 | defensivekv | 50.0 | +0.0 [" in head
    assert "no significant difference" in head.splitlines()[3]


def test_headline_compares_a_partial_run_on_its_own_samples(tmp_path):
    """A learned part run on part of the samples (here the 20 the best heuristic gets right) is compared there: its
    accuracy (100) against the heuristic's on those same samples (100, not its 50 over all), n = 20, Δ 0."""
    n = 40
    rows = []
    for i in range(n):
        rows.append(record("defensivekv", "ratio=0.5", f"s{i}", float(i % 2), 0.6, 0.2, 10))
        if i % 2:
            r = record("retention_gate:/runs/t/bundle", "ratio=0.5", f"s{i}", 1.0, 0.6, 0.2, 10)
            r["label"] = "retention_gate(t)"
            rows.append(r)
    d = write(tmp_path / "partial", rows)
    r = run(d, "--baseline", "best", "--resamples", 200)
    assert r.returncode == 0, r.stderr
    head = r.stdout.split("| budget | best learned part |")[1]
    assert "| ratio=0.5 | retention_gate(t) | 20 | 100.0 | defensivekv | 100.0 | +0.0 [+0.0, +0.0] | no significant" in head
