#!/usr/bin/env python3
"""Plots DIR/int21.json (written by `intrain reproduce int21`) to DIR/int21.png:
perplexity against bits per method, before (dashed) and after LREC (solid),
with the float teacher as a line; and the INT2 rank sweep (KL reduction and
log-perplexity gap recovered against effective bits)."""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main(d):
    r = json.load(open(f"{d}/int21.json"))
    rows = r["rows"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = sorted({x["method"] for x in rows})
    for i, m in enumerate(methods):
        xs = sorted((x for x in rows if x["method"] == m), key=lambda x: x["bits"])
        c = f"C{i}"
        a.plot([x["bits"] for x in xs], [x["ppl_quantized"] for x in xs], "--o", color=c, label=f"{m} quantized")
        a.plot([x["bits"] for x in xs], [x["ppl_lrec"] for x in xs], "-s", color=c, label=f"{m} + LREC")
    if rows:
        a.axhline(rows[0]["ppl_float"], color="k", lw=1, label="float teacher")
    a.set_xlabel("weight bits")
    a.set_ylabel("validation perplexity")
    a.set_yscale("log")
    a.set_title("perplexity before and after LREC")
    a.legend(fontsize=7)
    sw = sorted(r.get("rank_sweep", []), key=lambda x: x["rank"])
    if sw:
        eb = [x["effective_bits"] for x in sw]
        b.plot(eb, [x["kl_reduction"] for x in sw], "-o", label="KL reduction")
        b.plot(eb, [x["log_ppl_gap_recovered"] for x in sw], "-s", label="log-ppl gap recovered")
        for x in sw:
            b.annotate(f"r{x['rank']}", (x["effective_bits"], x["kl_reduction"]), fontsize=7)
        b.set_xlabel("effective bits per base weight")
        b.set_title(f"INT{sw[0]['bits']} rank sweep ({sw[0]['method']})")
        b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{d}/int21.png", dpi=120)


if __name__ == "__main__":
    main(sys.argv[1])
