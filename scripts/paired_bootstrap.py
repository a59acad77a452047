#!/usr/bin/env python3
"""Paired bootstrap over samples for eval directories (results.jsonl of `kvdistill eval`).

For every budget and method, the per-sample difference to a baseline method on the same samples (paired by
sample id) of accuracy (`score`), critical-KV hit rate (`hit_rate`) and KL(full || method) (`kl`, lower is
better); prints the method's means, the mean differences and their 95% percentile intervals over
`--resamples` bootstrap resamples of the samples, the mean peak KV bytes per sample, and whether the accuracy
and hit-rate intervals both lie above 0 ("beats"). Several directories (shards of one comparison, each with
its own full-cache reference) are read as one; the first record of a (method, budget, sample) wins. Writes
the same as JSON into the first directory (bootstrap_vs_<baseline>.json).

  scripts/paired_bootstrap.py DIR [DIR ...] [--baseline snapkv | best] [--resamples 2000] [--seed 0]
                              [--move LABEL FROM TO ...] [--plot]

--plot also draws the accuracy differences with their intervals as error bars, one series per method against
the budget, into the first directory (bootstrap_vs_<baseline>.png); learned parts are drawn thick.

--baseline best: at each budget the baseline is the best heuristic there (the heuristic with the highest mean
accuracy over its samples; a learned part is a method whose label names a bundle, "<kind>(<run>)"), and a
headline table follows: per budget, the learned part with the largest paired accuracy difference to the best
heuristic, both accuracies on the samples they share and how many, the difference with its interval, and
"significant" only when the interval excludes 0 (else "no significant difference").

--move LABEL FROM TO compares method LABEL's records at budget FROM as if they were at budget TO: e.g. a gate
evaluated at its own flags (`threshold=0.5`) against heuristics run at the fraction it kept (`ratio=0.039`).
"""
import argparse
import json
import os
import sys
from collections import defaultdict

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dirs", nargs="+", metavar="DIR")
    ap.add_argument("--baseline", default="snapkv")
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--move", nargs=3, action="append", default=[], metavar=("LABEL", "FROM", "TO"),
                    help="treat LABEL's records at budget FROM as records at budget TO")
    ap.add_argument("--plot", action="store_true", help="draw the differences with their intervals as error bars")
    a = ap.parse_args()
    moves = {(label, src): dst for label, src, dst in a.move}
    by = defaultdict(dict)  # (budget, method label) -> id -> row
    for d in a.dirs:
        path = os.path.join(d, "results.jsonl")
        if not os.path.exists(path):
            sys.exit(f"paired_bootstrap: {path} does not exist; give directories written by `kvdistill eval --out`")
        for line in open(path):
            if not line.strip():
                continue
            r = json.loads(line)
            if r["method"] != "full":
                label = r.get("label", r["method"])
                by[(moves.get((label, r["budget"]), r["budget"]), label)].setdefault(r["id"], r)
    rng = np.random.default_rng(a.seed)
    out = []
    baselines = baseline_per_budget(by, a.baseline)
    print(f"| budget | method | n | accuracy | Δacc vs {a.baseline} [95% CI] | hit rate | Δhit [95% CI] | KL | ΔKL [95% CI] "
          f"| peak KV MiB | beats on acc and hit |")
    print("|---|---|---:|---:|---|---:|---|---:|---|---:|---|")
    for (budget, label), samples in sorted(by.items()):
        base_label = baselines.get(budget)
        base = by.get((budget, base_label))
        if base is None or label == base_label:
            continue
        ids = sorted(set(samples) & set(base))
        if not ids:
            continue
        res = {"budget": budget, "method": label, "baseline": base_label, "n": len(ids)}
        # One set of resamples of the samples (rows: resamples; columns: which sample each draw takes) serves the three
        # metrics.
        draws = rng.integers(0, len(ids), size=(a.resamples, len(ids)))
        for key in ("score", "hit_rate", "kl"):
            d = [samples[i][key] - base[i][key] for i in ids]
            means = np.sort(np.asarray(d, dtype=np.float64)[draws].mean(axis=1))
            lo, hi = float(means[int(0.025 * len(means))]), float(means[int(0.975 * len(means)) - 1])
            res[key] = sum(samples[i][key] for i in ids) / len(ids)
            res[key + "_diff"] = sum(d) / len(d)
            res[key + "_ci"] = [lo, hi]
        res["peak_kv_bytes"] = sum(samples[i]["peak_kv_bytes"] for i in ids) / len(ids)
        res["beats"] = res["score_ci"][0] > 0 and res["hit_rate_ci"][0] > 0
        out.append(res)
        shown = label if a.baseline != "best" else f"{label} (vs {base_label})"
        print(f"| {budget} | {shown} | {res['n']} | {100 * res['score']:.1f} | {100 * res['score_diff']:+.1f} "
              f"[{100 * res['score_ci'][0]:+.1f}, {100 * res['score_ci'][1]:+.1f}] | {res['hit_rate']:.3f} | "
              f"{res['hit_rate_diff']:+.3f} [{res['hit_rate_ci'][0]:+.3f}, {res['hit_rate_ci'][1]:+.3f}] | "
              f"{res['kl']:.4f} | {res['kl_diff']:+.4f} [{res['kl_ci'][0]:+.4f}, {res['kl_ci'][1]:+.4f}] | "
              f"{res['peak_kv_bytes'] / 2**20:.2f} | {'yes' if res['beats'] else 'no'} |")
    with open(os.path.join(a.dirs[0], f"bootstrap_vs_{a.baseline}.json"), "w") as f:
        json.dump(out, f, indent=1)
    if a.baseline == "best":
        headline(by, out, baselines)
    if a.plot:
        path = os.path.join(a.dirs[0], f"bootstrap_vs_{a.baseline}.png")
        plot(out, a.baseline, path)
        print(f"wrote {path}", file=sys.stderr)
    return 0


def budget_x(budget):
    """"ratio=0.75" -> 0.75 (the x of a budget); a budget without a number keeps its order instead."""
    try:
        return float(budget.partition("=")[2])
    except ValueError:
        return None


def plot(rows, baseline, path):
    """Δaccuracy (points, in %) with its 95% interval (error bars) per method and budget; 0 is the baseline."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    budgets = sorted({r["budget"] for r in rows}, key=lambda b: (budget_x(b) is None, budget_x(b) or 0, b))
    xs = {b: (budget_x(b) if budget_x(b) is not None else i) for i, b in enumerate(budgets)}
    span = (max(xs.values()) - min(xs.values())) or 1.0
    methods = sorted({r["method"] for r in rows}, key=lambda m: (not is_learned(m), m))
    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors = plt.get_cmap("tab20").colors
    for i, m in enumerate(methods):
        pts = sorted((xs[r["budget"]], r) for r in rows if r["method"] == m)
        dx = (i - (len(methods) - 1) / 2) * 0.004 * span  # side by side, so the bars do not hide each other
        x = [p[0] + dx for p in pts]
        y = [100 * p[1]["score_diff"] for p in pts]
        err = [[100 * (p[1]["score_diff"] - p[1]["score_ci"][0]) for p in pts],
               [100 * (p[1]["score_ci"][1] - p[1]["score_diff"]) for p in pts]]
        learned = is_learned(m)
        ax.errorbar(x, y, yerr=err, fmt="-o" if learned else "-", color="black" if learned and i == 0 else colors[i % 20],
                    linewidth=2.6 if learned else 1.0, markersize=6 if learned else 3, capsize=3, label=m)
    ax.axhline(0, color="black", linestyle="--", linewidth=1)
    ax.set_xlabel("budget (" + (budgets[0].partition("=")[0] if budgets else "") + ")")
    ax.set_ylabel(f"accuracy − {baseline} (points), 95% CI")
    ax.set_title(f"Paired bootstrap: accuracy difference to {'the best heuristic' if baseline == 'best' else baseline}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def is_learned(label):
    """A learned part's label names its bundle: "<kind>(<run>)", possibly behind an allocation prefix."""
    return "(" in label


def mean_score(samples):
    return sum(r["score"] for r in samples.values()) / len(samples)


def baseline_per_budget(by, baseline):
    """budget -> the baseline's label: the one given, or with "best" the heuristic of highest mean accuracy."""
    budgets = sorted({b for b, _ in by})
    if baseline != "best":
        return {b: baseline for b in budgets}
    out = {}
    for b in budgets:
        cands = [(mean_score(s), label) for (bb, label), s in by.items() if bb == b and not is_learned(label)]
        if cands:
            out[b] = max(cands)[1]
    return out


def headline(by, rows, baselines):
    """Per budget: the learned part with the largest paired accuracy difference to the best heuristic, both
    accuracies on the samples they share (a learned part run on part of the samples is compared on those only)."""
    print()
    print("| budget | best learned part | n | accuracy | best heuristic | accuracy (same samples) | Δacc [95% CI] | finding |")
    print("|---|---|---:|---:|---|---:|---|---|")
    for b in sorted(baselines):
        learned = [r for r in rows if r["budget"] == b and is_learned(r["method"])]
        if not learned:
            continue
        r = max(learned, key=lambda x: (x["score_diff"], x["n"]))
        lo, hi = r["score_ci"]
        finding = ("no significant difference" if lo <= 0 <= hi
                   else f"{'learned' if lo > 0 else 'heuristic'} better (significant)")
        print(f"| {b} | {r['method']} | {r['n']} | {100 * r['score']:.1f} | {baselines[b]} | "
              f"{100 * (r['score'] - r['score_diff']):.1f} | {100 * r['score_diff']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] "
              f"| {finding} |")


if __name__ == "__main__":
    sys.exit(main())
