#!/bin/sh
# A training step of the default model: intrain (fp32, int8, int16) against the
# PyTorch peer, in one session on this machine, 1 and 2 threads. Prints each
# measurement and the ratios against PyTorch at its best thread count.
#   bench/compare_step.sh [build-dir]
set -eu
B=${1:-build}
O=$(mktemp -d)
"$B/bench/bench_train_step" --benchmark_repetitions=3 --benchmark_report_aggregates_only=true \
  --benchmark_out="$O/intrain.json" --benchmark_out_format=json >/dev/null
/usr/bin/python3 "$(dirname "$0")/torch_step.py" --threads 1,2 > "$O/torch.jsonl"
python3 - "$O/intrain.json" "$O/torch.jsonl" <<'PY'
import json, sys
ours = json.load(open(sys.argv[1]))["benchmarks"]
torch = [json.loads(l) for l in open(sys.argv[2]) if l.strip().startswith("{")]
best_torch = max(t["tokens_per_s"] for t in torch)
print("| engine | threads | ms/step | tokens/s | x PyTorch (best threads) |")
print("|---|---|---|---|---|")
for t in torch:
    print(f"| PyTorch fp32 | {t['threads']} | {t['median_ms']:.1f} | {t['tokens_per_s']:.0f} | {t['tokens_per_s']/best_torch:.2f} |")
for b in ours:
    if b.get("aggregate_name") != "median":
        continue
    name = b["run_name"].split("/")[1]
    thr = b["run_name"].split("threads:")[1].split("/")[0]
    print(f"| intrain {name} | {thr} | {b['real_time']:.1f} | {b['tok/s']:.0f} | {b['tok/s']/best_torch:.2f} |")
PY
