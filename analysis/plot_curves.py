#!/usr/bin/python3
"""Validation-loss curves of several `intrain train` runs (their metrics.csv),
and the share of the int8 -> int16 gap that each run closes.

    /usr/bin/python3 analysis/plot_curves.py out.png int8=runs/int8 tiled=runs/tiled int16=runs/int16

The gap line is printed when runs named int8 and int16 are given:
closed = (val(int8) - val(run)) / (val(int8) - val(int16)) at the last step.
"""
import csv
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def val_curve(run):
    steps, vals = [], []
    with open(os.path.join(run, "metrics.csv")) as f:
        for row in csv.DictReader(f):
            if row["val_loss"]:
                steps.append(int(row["step"]) + 1)
                vals.append(float(row["val_loss"]))
    return steps, vals


def main(dst, runs):
    curves = {}
    plt.figure(figsize=(8, 5))
    for spec in runs:
        name, path = spec.split("=", 1)
        steps, vals = val_curve(path)
        curves[name] = vals
        plt.plot(steps, vals, marker="o", ms=3, label=f"{name} (final {vals[-1]:.4f})")
    plt.xlabel("step")
    plt.ylabel("validation loss (nats/byte)")
    plt.grid(alpha=0.3)
    plt.legend()
    plt.tight_layout()
    plt.savefig(dst, dpi=120)
    print("wrote", dst)
    if "int8" in curves and "int16" in curves:
        lo, hi = curves["int16"][-1], curves["int8"][-1]
        for name, vals in curves.items():
            if name not in ("int8", "int16") and hi != lo:
                print(f"{name}: closes {(hi - vals[-1]) / (hi - lo):.2f} of the int8 -> int16 gap "
                      f"(int8 {hi:.4f}, {name} {vals[-1]:.4f}, int16 {lo:.4f})")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
