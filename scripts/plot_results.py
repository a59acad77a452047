#!/usr/bin/env python3
"""Draw accuracy-vs-budget and KL-vs-budget plots from a `kvdistill eval` output directory.

    python scripts/plot_results.py runs/eval            # writes runs/eval/accuracy.png and runs/eval/kl.png
    python scripts/plot_results.py runs/eval --title "SmolLM2-135M, RULER 2K+4K, H100"

One line per method; the full cache is a dashed horizontal line. The x axis is the compression ratio
(fraction of KV entries removed) or the KV entries kept per head, whichever the run used.
"""
import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def budget_value(budget):
    kind, _, value = budget.partition("=")
    return kind, float(value)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", help="the --out directory of kvdistill eval (holds results.json)")
    ap.add_argument("--title", default="", help="figure title suffix")
    ap.add_argument("--prefix", default="", help="file name prefix for the PNGs")
    args = ap.parse_args()
    path = os.path.join(args.out_dir, "results.json")
    if not os.path.exists(path):
        sys.exit(f"error: {path} does not exist; run `kvdistill eval ... --out {args.out_dir}` first")
    with open(path) as f:
        results = json.load(f)

    full = None
    series = {}  # label -> [(x, overall)]
    kind = None
    for c in results["configs"]:
        if c["method"] == "full":
            full = c["overall"]
            continue
        k, x = budget_value(c["budget"])
        if kind is None:
            kind = k
        if k != kind:
            continue
        series.setdefault(c["label"], []).append((x, c["overall"]))
    if not series:
        sys.exit(f"error: {path} holds no compressed runs to plot")
    xlabel = {"ratio": "compression ratio (fraction of KV entries removed)",
              "tokens": "KV entries kept per head"}.get(kind, kind)
    model = results.get("settings", {}).get("model", "")

    written = []
    for metric, ylabel, fname in [("accuracy", "accuracy (%)", "accuracy.png"),
                                  ("kl", "KL(full || method), nats/token", "kl.png")]:
        fig, ax = plt.subplots(figsize=(8, 5.5))
        for label in sorted(series):
            pts = sorted(series[label], key=lambda p: p[0])
            style = "-o" if not label.startswith("trimkv") else "-*"
            lw = 1.4 if not label.startswith("trimkv") else 2.8
            ax.plot([p[0] for p in pts], [p[1][metric] for p in pts], style, label=label, linewidth=lw, markersize=5)
        if full is not None and metric == "accuracy":
            ax.axhline(full[metric], color="black", linestyle="--", linewidth=1.2, label="full cache")
        if metric == "kl":
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        title = f"{model}: {ylabel} vs budget"
        if args.title:
            title += f"\n{args.title}"
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        out = os.path.join(args.out_dir, args.prefix + fname)
        fig.savefig(out, dpi=110)
        plt.close(fig)
        written.append(out)
    print("wrote " + ", ".join(written))


if __name__ == "__main__":
    main()
