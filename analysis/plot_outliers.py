#!/usr/bin/python3
"""Plots analysis/outlier_stats JSON: outlier fraction, max/median ratio and the
share of rows (tokens) and channels holding an outlier, per linear layer and role.

    /usr/bin/python3 analysis/plot_outliers.py runs/x/outliers.json runs/x/outliers.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src, dst):
    j = json.load(open(src))
    fig, axes = plt.subplots(3, 1, figsize=(12, 10), sharex=True)
    for role, colour in (("a", "tab:blue"), ("e", "tab:red")):
        rows = [l for l in j["layers"] if l["role"] == role]
        names = [l["layer"].replace(".weight", "") for l in rows]
        x = range(len(rows))
        off = -0.2 if role == "a" else 0.2
        label = {"a": "activations (A)", "e": "errors (E)"}[role]
        axes[0].bar([i + off for i in x], [100 * l["fraction"] for l in rows], 0.4, color=colour, label=label)
        axes[1].bar([i + off for i in x], [l["max_over_median"] or 0 for l in rows], 0.4, color=colour, label=label)
        axes[2].bar([i + off for i in x], [100 * l["row_fraction"] for l in rows], 0.2, color=colour, label=label + ": rows")
        axes[2].bar([i + off + 0.2 for i in x], [100 * l["channel_fraction"] for l in rows], 0.2, color=colour,
                    alpha=0.4, label=label + ": channels")
        axes[2].set_xticks(list(x))
        axes[2].set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    axes[0].set_ylabel("outliers (% of elements)")
    axes[1].set_ylabel("max|x| / median|x|")
    axes[1].set_yscale("log")
    axes[2].set_ylabel("% holding an outlier")
    for a in axes:
        a.legend(fontsize=7)
        a.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{j['format']}, threshold {j['threshold']}, {j['batches']} batches of {j['tokens_per_batch']} tokens")
    fig.tight_layout()
    fig.savefig(dst, dpi=120)
    print("wrote", dst)


if __name__ == "__main__":
    main(*sys.argv[1:3])
