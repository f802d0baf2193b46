#!/usr/bin/python3
"""Plots of a bit-width ablation written by `intrain ablate` (reads DIR/ablation.json).

  /usr/bin/python3 analysis/plot_ablation.py DIR

Writes DIR/curves.png (validation loss against step, one panel per bit width,
mean over seeds per rounding mode, the fp32 baseline dashed; where the report
carries a bound, it is drawn as a band over the fp32 curve) and DIR/gap.png
(final gap to fp32 against bits, mean with its 95% interval, per rounding).
Plotting only: every number comes from ablation.json.
"""
import json
import os
import sys

try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("plot_ablation: SKIPPED: python3-matplotlib is not installed (apt-get install python3-matplotlib)")
    sys.exit(77)

STYLE = {"stochastic": ("tab:blue", "SR"), "nearest": ("tab:red", "RN")}


def mean_curve(cells):
    """Mean validation loss per step over the cells that logged that step."""
    by_step = {}
    for c in cells:
        for step, v in c["val_curve"]:
            by_step.setdefault(step, []).append(v)
    steps = sorted(by_step)
    return steps, [sum(by_step[s]) / len(by_step[s]) for s in steps]


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        sys.exit(2)
    out = sys.argv[1]
    with open(os.path.join(out, "ablation.json")) as f:
        rep = json.load(f)
    cells = rep["cells"]
    fp32 = [c for c in cells if c["bits"] == 32]
    bits = sorted({c["bits"] for c in cells if c["bits"] != 32})
    if not bits:
        print("plot_ablation: no integer cells in", out)
        return

    cols = min(3, len(bits))
    rows = (len(bits) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), sharey=True, squeeze=False)
    fs, fv = mean_curve(fp32)
    # The y range follows the fp32 baseline; a diverged cell leaves the top of
    # the panel rather than squashing every other curve.
    ymax = max(fv) * 1.05 if fv else 6.0
    lows = [v for c in cells for _, v in c["val_curve"] if v < ymax]
    ymin = min(lows) * 0.97 if lows else 0.0
    for ax, b in zip(axes.flat, bits):
        if fv:
            ax.plot(fs, fv, "k--", lw=1.2, label="fp32")
            bound = rep.get("bound_band")
            if bound:
                ax.fill_between(fs, fv, [v + bound for v in fv], color="0.8", alpha=0.6, label="bound")
        for r, (color, short) in STYLE.items():
            group = [c for c in cells if c["bits"] == b and c["rounding"] == r]
            s, v = mean_curve(group)
            if s:
                ax.plot(s, v, color=color, lw=1.4, label=f"int{b} {short} (n={len(group)})")
        ax.set_title(f"{b} bits")
        ax.set_xlabel("step")
        ax.set_ylim(ymin, ymax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes.flat[len(bits):]:
        ax.axis("off")
    axes[0][0].set_ylabel("validation loss (nats/byte)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=120)

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for r, (color, short) in STYLE.items():
        xs, ys, lo, hi = [], [], [], []
        for g in rep["groups"]:
            if g["bits"] == 32 or g["rounding"] != r or "gap" not in g or g["gap"]["n"] == 0:
                continue
            xs.append(g["bits"])
            ys.append(g["gap"]["mean"])
            ci = g["gap"].get("ci95", [g["gap"]["mean"], g["gap"]["mean"]])
            lo.append(g["gap"]["mean"] - ci[0])
            hi.append(ci[1] - g["gap"]["mean"])
        if xs:
            ax.errorbar(xs, ys, yerr=[lo, hi], color=color, marker="o", capsize=3, label=short)
    ax.axhline(0.0, color="k", lw=0.8, ls="--")
    # Gaps span from 1e-4 nats (16 bits) to a diverged run's thousands: linear
    # near zero, logarithmic beyond 0.01.
    ax.set_yscale("symlog", linthresh=0.01)
    ax.set_xlabel("bits (every role)")
    ax.set_ylabel("final val loss - fp32 (nats/byte, symlog)")
    ax.set_title("gap to fp32, mean and 95% interval over seeds")
    ax.set_xticks(bits)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "gap.png"), dpi=120)
    print("plot_ablation: wrote", os.path.join(out, "curves.png"), "and", os.path.join(out, "gap.png"))


if __name__ == "__main__":
    main()
