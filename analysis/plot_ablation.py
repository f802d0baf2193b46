#!/usr/bin/python3
"""Plots of a bit-width ablation written by `intrain ablate` (reads DIR/ablation.json).

  /usr/bin/python3 analysis/plot_ablation.py DIR

Writes DIR/curves.png (validation loss against step, one panel per bit width,
mean over seeds per rounding mode, the fp32 baseline dashed; where cells carry
an evaluated convergence bound, a second row of panels under the loss panels
shows it as a band: from the measured weighted mean of ||g||^2 up to the bound
on it, log scale, per rounding mode and for fp32) and DIR/gap.png (final gap
to fp32 against bits, mean with its 95% interval, per rounding).
The bound of a non-convex run is on the gradient norm, not the loss
(docs/convergence.md §6): that is why its band has panels of its own.
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


def bound_curve(cells):
    """Mean over seeds of (bound, measured) per step, over cells with an evaluated bound."""
    by_step = {}
    for c in cells:
        for step, b, m in c.get("bound", {}).get("curve", []):
            if b is not None:
                by_step.setdefault(step, []).append((b, m))
    steps = sorted(by_step)
    return (steps, [sum(b for b, _ in by_step[s]) / len(by_step[s]) for s in steps],
            [sum(m for _, m in by_step[s]) / len(by_step[s]) for s in steps])


def draw_bound(ax, cells, b):
    """The bound on the weighted mean of E||grad f||^2 as a band above the measured value."""
    drawn = False
    groups = [("fp32", "k", [c for c in cells if c["bits"] == 32])]
    groups += [(f"int{b} {short}", color, [c for c in cells if c["bits"] == b and c["rounding"] == r])
               for r, (color, short) in STYLE.items()]
    for label, color, group in groups:
        s, bound, meas = bound_curve(group)
        if not s:
            continue
        drawn = True
        ax.plot(s, meas, color=color, lw=1.2, ls="--" if label == "fp32" else "-", label=f"{label} measured")
        ax.fill_between(s, meas, bound, color=color, alpha=0.12, label=f"{label} bound")
        ax.plot(s, bound, color=color, lw=0.8, alpha=0.6)
    statuses = sorted({c.get("bound", {}).get("status", "n/a") for c in cells
                       if c["bits"] in (32, b) and c.get("status") == "done"} - {"evaluated"})
    if statuses:
        ax.text(0.02, 0.02, "not evaluated: " + ", ".join(statuses), transform=ax.transAxes, fontsize=7)
    if drawn:
        ax.set_yscale("log")
        ax.legend(fontsize=6)
    ax.set_title(f"{b} bits: bound on mean E||grad f||^2")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)


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
    bounded = [c for c in cells if c.get("bound", {}).get("curve")]
    # With bounds: each row of loss panels gets a row of bound panels under it.
    fig, grid = plt.subplots(rows * (2 if bounded else 1), cols, figsize=(4.2 * cols, 3.2 * rows * (2 if bounded else 1)),
                             squeeze=False)
    axes = grid[0::2] if bounded else grid
    baxes = grid[1::2] if bounded else None
    fs, fv = mean_curve(fp32)
    # The y range follows the fp32 baseline; a diverged cell leaves the top of
    # the panel rather than squashing every other curve.
    ymax = max(fv) * 1.05 if fv else 6.0
    lows = [v for c in cells for _, v in c["val_curve"] if v < ymax]
    ymin = min(lows) * 0.97 if lows else 0.0
    for i, (ax, b) in enumerate(zip(axes.flat, bits)):
        if fv:
            ax.plot(fs, fv, "k--", lw=1.2, label="fp32")
        if bounded:
            draw_bound(baxes.flat[i], cells, b)
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
    if bounded:
        for ax in baxes.flat[len(bits):]:
            ax.axis("off")
    axes[0][0].set_ylabel("validation loss (nats/byte)")
    if bounded:
        baxes[0][0].set_ylabel("weighted mean of ||g||^2")
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
