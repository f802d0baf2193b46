#!/bin/sh
# Runs both benchmark programs and writes JSON and a Markdown report.
#   bench/run_benchmarks.sh [build-dir] [out-dir]      (defaults: build, out/bench)
# bench_matmul runs once per thread count, in separate processes: intrain's
# primitive cache is keyed by shape and strides only, so a primitive created
# under one thread count would be reused under the other.
set -eu
B=${1:-build}
O=${2:-out/bench}
REPS=${REPS:-3}
mkdir -p "$O"
for t in 1 2; do
  "$B/bench/bench_matmul" --benchmark_filter="/omp:$t/" --benchmark_repetitions="$REPS" \
    --benchmark_out="$O/bench_matmul_omp$t.json" --benchmark_out_format=json
done
"$B/bench/bench_passes" --benchmark_repetitions="$REPS" \
  --benchmark_out="$O/bench_passes.json" --benchmark_out_format=json
python3 "$(dirname "$0")/report.py" "$O/bench_matmul_omp1.json" "$O/bench_matmul_omp2.json" \
  "$O/bench_passes.json" > "$O/report.md"
echo "wrote $O/report.md"
