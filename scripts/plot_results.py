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
        # Up to 20 heuristics stay apart: 20 colours, and markers that change with every colour cycle.
        # Learned gates in black / navy, thick; the heuristics in 20 colours with a marker per colour cycle.
        colors = plt.get_cmap("tab20").colors
        markers = "osD^vP<>Xh"
        gate_colors = ["black", "#1f3a93", "#7b241c"]
        n_gate = 0
        for i, label in enumerate(sorted(series)):
            pts = sorted(series[label], key=lambda p: p[0])
            gate = label.startswith("trimkv")
            color = gate_colors[n_gate % len(gate_colors)] if gate else colors[(2 * i + i // 10) % len(colors)]
            n_gate += 1 if gate else 0
            ax.plot([p[0] for p in pts], [p[1][metric] for p in pts], "-" + ("*" if gate else markers[i % len(markers)]),
                    color=color, label=label, linewidth=2.8 if gate else 1.4, markersize=9 if gate else 5)
        if full is not None and metric == "accuracy":
            ax.axhline(full[metric], color="black", linestyle="--", linewidth=1.2, label="full cache")
        if metric == "kl":
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        title = f"{ylabel} vs budget\n{args.title}" if args.title else f"{model}: {ylabel} vs budget"
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
