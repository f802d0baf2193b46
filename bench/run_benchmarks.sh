#!/bin/sh
# Runs both benchmark programs and writes JSON and a Markdown report.
#   bench/run_benchmarks.sh [build-dir] [out-dir]      (defaults: build, out/bench)
# Each benchmark is repeated REPS times (default 3), the repetitions randomly
# interleaved across benchmarks, so a burst of other work on the machine spoils
# one repetition of several benchmarks rather than every repetition of one.
# The report shows the best repetition and the median. About 2.5 minutes for
# bench_matmul and 2 for bench_passes at REPS=3, on an idle machine.
set -eu
B=${1:-build}
O=${2:-out/bench}
REPS=${REPS:-3}
mkdir -p "$O"
for prog in bench_matmul bench_passes; do
  "$B/bench/$prog" --benchmark_repetitions="$REPS" --benchmark_enable_random_interleaving=true \
    --benchmark_out="$O/$prog.json" --benchmark_out_format=json
done
python3 "$(dirname "$0")/report.py" "$O/bench_matmul.json" "$O/bench_passes.json" > "$O/report.md"
echo "wrote $O/report.md"
