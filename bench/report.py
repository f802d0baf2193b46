#!/usr/bin/env python3
"""Turns the JSON output of bench_matmul and bench_passes into Markdown tables.

    python3 bench/report.py out/bench_matmul_omp1.json out/bench_matmul_omp2.json out/bench_passes.json

Any mix of files from the two programs may be given. With --benchmark_repetitions
each benchmark's best repetition is used (highest rate, lowest time: on a shared
machine other work only ever slows a run down), and a second table shows the
median and the min..max spread; with --stat=median the median is used instead.
Without repetitions, the single run. Ratios are only formed between numbers of one
file set, i.e. one run on one machine: absolute numbers vary up to 2x between
machines of this kind.
"""
import json
import sys
from collections import defaultdict


def load(paths):
    """{(path, shape, threads): {"median": value-dict, "min": .., "max": ..}}"""
    runs = defaultdict(list)
    medians = defaultdict(list)  # used only where a file holds aggregates alone
    context = None
    for p in paths:
        with open(p) as f:
            data = json.load(f)
        context = context or data.get("context", {})
        for b in data["benchmarks"]:
            parts = b["run_name"].split("/")
            threads = next(int(x.split(":")[1]) for x in parts if x.startswith("omp:"))
            key = (parts[0], parts[1], threads)
            if b.get("run_type") == "aggregate":
                if b.get("aggregate_name") == "median":
                    medians[key].append(b)
                continue  # otherwise recomputed below from the iterations
            runs[key].append(b)
    for key, bs in medians.items():
        runs.setdefault(key, bs)
    out = {}
    for key, bs in runs.items():
        def stat(field):
            vals = sorted(x[field] for x in bs if field in x)
            if not vals:
                return None
            n = len(vals)
            med = vals[n // 2] if n % 2 else 0.5 * (vals[n // 2 - 1] + vals[n // 2])
            return med, vals[0], vals[-1]
        out[key] = {f: stat(f) for f in ("GOP/s", "GB/s", "elem/s", "real_time")}
        out[key]["time_unit"] = bs[0].get("time_unit", "ns")
        out[key]["n"] = len(bs)
    return out, context


def fmt(x, digits=0):
    return "—" if x is None else f"{x:.{digits}f}"


STAT = "best"


def med(r, key, field):
    """The value a table shows: the best repetition (default) or the median."""
    v = r.get(key, {}).get(field)
    if v is None:
        return None
    if STAT == "median":
        return v[0]
    return v[1] if field == "real_time" else v[2]


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def spread(r, key, field):
    v = r.get(key, {}).get(field)
    if v is None or r[key]["n"] < 2:
        return ""
    return f"{v[0]:.0f} ({v[1]:.0f}–{v[2]:.0f})"


def matmul_tables(r):
    shapes = []  # shapes measured on every path (the weight-gradient shapes only have int8 NN and TN)
    for (path, shape, _t) in r:
        if path.startswith("onednn_") and shape not in shapes:
            shapes.append(shape)
    shapes.sort(key=lambda s: (s != "1024x1024x1024", s))
    if not shapes:
        return []
    threads = sorted({t for (_p, _s, t) in r})
    paths = ["intrain_int8", "intrain_split16", "onednn_u8s8", "onednn_s8s8", "onednn_f32"]
    reps = max((r[k]["n"] for k in r), default=1)
    label = f"best of {reps}" if STAT == "best" and reps > 1 else ("median" if reps > 1 else "one run")
    lines = [f"### Matmul throughput, GOP/s ({label})", ""]
    lines.append("| M×K×N | threads | " + " | ".join(paths) +
                 " | int8 / u8s8 | int8 / s8s8 | split16 / f32 | s8s8 / u8s8 |")
    lines.append("|" + "---|" * (2 + len(paths) + 4))
    for t in threads:
        for s in shapes:
            v = {p: med(r, (p, s, t), "GOP/s") for p in paths}
            if all(x is None for x in v.values()):
                continue
            lines.append(f"| {s} | {t} | " + " | ".join(fmt(v[p]) for p in paths) + " | " + " | ".join(
                fmt(x, 2) for x in (ratio(v["intrain_int8"], v["onednn_u8s8"]),
                                    ratio(v["intrain_int8"], v["onednn_s8s8"]),
                                    ratio(v["intrain_split16"], v["onednn_f32"]),
                                    ratio(v["onednn_s8s8"], v["onednn_u8s8"]))) + " |")
    if any(r[k]["n"] > 1 for k in r):
        lines += ["", "Median (min–max) GOP/s over the repetitions:", ""]
        lines.append("| M×K×N | threads | " + " | ".join(paths) + " |")
        lines.append("|" + "---|" * (2 + len(paths)))
        for t in threads:
            for s in shapes:
                if all((p, s, t) not in r for p in paths):
                    continue
                lines.append(f"| {s} | {t} | " + " | ".join(spread(r, (p, s, t), "GOP/s") for p in paths) + " |")

    tshapes = sorted({s for (p, s, _t) in r if p == "intrain_int8_TN"}, key=lambda s: (s not in shapes, s))
    if tshapes:
        lines += ["", f"### Transposed layouts, intrain int8 path, GOP/s ({label})", "",
                  "Same logical M×K×N; TN = Aᵀ·B with A stored [K, M], NT = A·Bᵀ with B stored [N, K]. "
                  "The K = 2048 shapes are the weight gradients dW = Xᵀ·dY of the training layers.", "",
                  "| M×K×N | threads | NN | TN (Aᵀ·B) | NT (A·Bᵀ) | TN / NN | NT / NN |", "|---|---|---|---|---|---|---|"]
        for t in threads:
            for s in tshapes:
                nn = med(r, ("intrain_int8", s, t), "GOP/s")
                tn = med(r, ("intrain_int8_TN", s, t), "GOP/s")
                nt = med(r, ("intrain_int8_NT", s, t), "GOP/s")
                if tn is None and nt is None:
                    continue
                lines.append(f"| {s} | {t} | {fmt(nn)} | {fmt(tn)} | {fmt(nt)} | {fmt(ratio(tn, nn), 2)} | "
                             f"{fmt(ratio(nt, nn), 2)} |")
    return lines


def passes_tables(r):
    order = ["quantize_rn", "quantize_sr", "requantize_rn", "requantize_sr", "requantize_at_rn",
             "requantize_at_sr", "max_abs_mantissa_i32", "max_abs_f32", "dequantize_into_i8", "dequantize_i8",
             "memcpy_f32", "memcpy_i8"]
    sizes = sorted({s for (p, s, _t) in r if p in order})
    threads = sorted({t for (p, _s, t) in r if p in order})
    if not sizes:
        return []
    reps = max((r[k]["n"] for k in r if k[0] in order), default=1)
    label = f"best of {reps}" if STAT == "best" and reps > 1 else ("median" if reps > 1 else "one run")
    lines = [f"### Memory-bound passes ({label})", "",
             "GB/s = minimum traffic (input read once + output written once) per second; "
             "vs memcpy = GB/s ÷ memcpy_f32 GB/s at the same size and threads.", "",
             "| pass | size | threads | time (µs) | Gelem/s | GB/s | vs memcpy |", "|---|---|---|---|---|---|---|"]
    for t in threads:
        for s in sizes:
            ref = med(r, ("memcpy_f32", s, t), "GB/s")
            for p in order:
                k = (p, s, t)
                if k not in r:
                    continue
                us = med(r, k, "real_time")
                unit = r[k]["time_unit"]
                us = us * {"ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6}[unit]
                lines.append(f"| {p} | {s} | {t} | {fmt(us, 1)} | {fmt(med(r, k, 'elem/s') * 1e-9, 2)} | "
                             f"{fmt(med(r, k, 'GB/s'), 1)} | {fmt(ratio(med(r, k, 'GB/s'), ref), 2)} |")
    return lines


def main(argv):
    global STAT
    args = [a for a in argv[1:] if not a.startswith("--stat=")]
    for a in argv[1:]:
        if a.startswith("--stat="):
            STAT = a.split("=", 1)[1]
    if not args or STAT not in ("best", "median"):
        print(__doc__)
        return 1
    r, ctx = load(args)
    lines = []
    if ctx:
        lines += [f"Run {ctx.get('date', '?')} on {ctx.get('host_name', '?')}, "
                  f"{ctx.get('num_cpus', '?')} CPUs at {ctx.get('mhz_per_cpu', '?')} MHz.", ""]
    m, p = matmul_tables(r), passes_tables(r)
    lines += m + ([""] if m and p else []) + p
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
