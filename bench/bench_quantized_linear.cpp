// QuantizedLinear (packed INT2/INT4 weights, tile by tile) against the plain
// int8 Linear, forward + backward, at the block shapes of d = 128 and d = 256
// with 2048 tokens (batch 16 × context 128).
//
// Benchmarks, each  <variant>/<R>x<K>x<N>/real_time :
//   linear_int8          Linear::forward + Linear::backward (dx, dW and db)
//   linear_int8_dx_only  the same work as a frozen layer: x·W + b and dy·Wᵀ
//                        (the baseline QuantizedLinear should be held to)
//   quantized_int{2,4}_g{128,32}   QuantizedLinear::forward + backward (dx only)
// Activations and errors are int8 (round to nearest for x, stochastic for dy).
// Compare ratios within one run (docs/benchmarks.md on machine variance).
//
// Run:  build/bench/bench_quantized_linear --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
#include <benchmark/benchmark.h>

#include <random>
#include <string>
#include <vector>

#include "core/gptq.h"
#include "core/matmul.h"
#include "core/ops.h"
#include "core/quantize.h"
#include "layers/linear.h"
#include "layers/quantized_linear.h"

namespace {

using namespace intrain;

struct Problem {
  std::int64_t R, K, N;
  std::string name() const { return std::to_string(R) + "x" + std::to_string(K) + "x" + std::to_string(N); }
};

// Gaussian test data, seeded.
std::vector<float> normal(std::int64_t n, std::uint64_t seed, float std) {
  std::vector<float> v(static_cast<std::size_t>(n));
  std::mt19937_64 rng(seed);
  for (std::normal_distribution<float> d(0.0f, std); float& x : v) x = d(rng);
  return v;
}

struct Setup {
  Param w, b;
  Tensor x, dy;
  std::vector<float> wf;
  explicit Setup(const Problem& p) {
    wf = normal(p.K * p.N, 1, 0.05f);
    w.name = "w";
    w.value = quantize(wf, {p.K, p.N}, Format::fixed(8));
    b.name = "b";
    b.kind = ParamKind::Bias;
    b.value = quantize(normal(p.N, 2, 0.1f), {p.N}, residual_format());
    x = quantize(normal(p.R * p.K, 3, 1.0f), {p.R, p.K}, Format::fixed(8, Rounding::Nearest));
    dy = quantize(normal(p.R * p.N, 4, 1e-3f), {p.R, p.N}, Format::fixed(8, Rounding::Stochastic));
  }
};

void finish(benchmark::State& state, const Problem& p) {
  // Forward and dx: 2 products of 2·R·K·N operations each.
  state.counters["GOP/s"] = benchmark::Counter(4.0 * p.R * p.K * p.N * state.iterations() * 1e-9,
                                               benchmark::Counter::kIsRate);
}

void bm_linear(benchmark::State& state, Problem p) {
  Setup s(p);
  Linear layer(&s.w, &s.b);
  for (auto _ : state) {
    benchmark::DoNotOptimize(layer.forward(s.x, Format::fixed(8), RngKey(1, 1)));
    benchmark::DoNotOptimize(layer.backward(s.dy, RngKey{}));
    s.w.zero_grad();
    s.b.zero_grad();
  }
  state.counters["GOP/s"] = benchmark::Counter(6.0 * p.R * p.K * p.N * state.iterations() * 1e-9,
                                               benchmark::Counter::kIsRate);
}

void bm_linear_dx_only(benchmark::State& state, Problem p) {
  Setup s(p);
  for (auto _ : state) {
    benchmark::DoNotOptimize(bias_add(matmul(s.x, s.w.value), &s.b.value, Format::fixed(8), RngKey(1, 1)));
    benchmark::DoNotOptimize(matmul(s.dy, s.w.value, Trans::N, Trans::T));
  }
  finish(state, p);
}

void bm_quantized(benchmark::State& state, Problem p, int bits, int group) {
  Setup s(p);
  QuantizedLinear layer("q", quantize_rtn(s.wf, p.K, p.N, bits, group), &s.b);
  for (auto _ : state) {
    benchmark::DoNotOptimize(layer.forward(s.x, Format::fixed(8), RngKey(1, 1)));
    benchmark::DoNotOptimize(layer.backward(s.dy, RngKey{}));
  }
  finish(state, p);
}

const bool registered = [] {
  for (std::int64_t d : {128, 256}) {
    for (const Problem p : {Problem{2048, d, 3 * d}, Problem{2048, d, 4 * d}, Problem{2048, 4 * d, d}}) {
      benchmark::RegisterBenchmark(("linear_int8/" + p.name()).c_str(), bm_linear, p)->UseRealTime()->Unit(benchmark::kMicrosecond);
      benchmark::RegisterBenchmark(("linear_int8_dx_only/" + p.name()).c_str(), bm_linear_dx_only, p)
          ->UseRealTime()->Unit(benchmark::kMicrosecond);
      for (int bits : {2, 4})
        for (int group : {128, 32})
          benchmark::RegisterBenchmark(("quantized_int" + std::to_string(bits) + "_g" + std::to_string(group) + "/" + p.name()).c_str(),
                                       bm_quantized, p, bits, group)
              ->UseRealTime()->Unit(benchmark::kMicrosecond);
    }
  }
  return true;
}();

}  // namespace

BENCHMARK_MAIN();
