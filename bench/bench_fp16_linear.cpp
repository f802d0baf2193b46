// The LREC teacher's forward with its linears held in binary16
// (layers/fp16_linear.h) against the same layer in fp32 (Linear), and the
// widening pass alone against a copy of the fp32 weights, at the teacher's
// block shapes: 2048 tokens (batch 16 x context 128) at d = 256, 512 tokens
// (batch 4) at d = 1024.
//
// Benchmarks, each  <variant>/<R>x<K>x<N>/real_time :
//   linear_fp32        Linear::forward, fp32 x and W
//   fp16_linear        Fp16Linear::forward: widen W, then the same product
//   widen_half         widen_half() of the K x N weight alone
//   copy_fp32          a copy of the K x N fp32 weight (what a pass over
//                      4 bytes a weight costs: widening's floor)
// The cost of fp16 storage is fp16_linear / linear_fp32 within one run.
//
// Run:  build/bench/bench_fp16_linear --benchmark_repetitions=3 --benchmark_report_aggregates_only=true
#include <benchmark/benchmark.h>

#include <random>
#include <string>
#include <vector>

#include "core/fp16.h"
#include "core/tensor.h"
#include "layers/fp16_linear.h"
#include "layers/linear.h"

namespace {

using namespace intrain;

struct Problem {
  std::int64_t R, K, N;
  std::string name() const { return std::to_string(R) + "x" + std::to_string(K) + "x" + std::to_string(N); }
};

Tensor normal(Shape s, std::uint64_t seed, float std) {
  Tensor t(std::move(s), Format::fp32());
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, std);
  for (std::int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = d(rng);
  return t;
}

struct Setup {
  Param w, b;
  Tensor x;
  explicit Setup(const Problem& p) {
    w.name = "w";
    w.value = normal({p.K, p.N}, 1, 0.05f);
    b.name = "b";
    b.kind = ParamKind::Bias;
    b.value = normal({p.N}, 2, 0.1f);
    x = normal({p.R, p.K}, 3, 1.0f);
  }
};

void flops(benchmark::State& state, const Problem& p) {
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * p.R * p.K * p.N * state.iterations() * 1e-9, benchmark::Counter::kIsRate);
}

void bm_linear_fp32(benchmark::State& state, Problem p) {
  Setup s(p);
  Linear layer(&s.w, &s.b);
  for (auto _ : state) {
    benchmark::DoNotOptimize(layer.forward(s.x, Format::fp32(), RngKey{}));
    layer.drop_saved();
  }
  flops(state, p);
}

void bm_fp16_linear(benchmark::State& state, Problem p) {
  Setup s(p);
  Fp16Linear layer("w", s.w.value, &s.b);
  for (auto _ : state) benchmark::DoNotOptimize(layer.forward(s.x, Format::fp32(), RngKey{}));
  flops(state, p);
}

void bm_widen(benchmark::State& state, Problem p) {
  Setup s(p);
  const std::vector<HalfBits> h = narrow_to_half({s.w.value.data<float>(), static_cast<std::size_t>(s.w.value.numel())}, "w");
  std::vector<float> out(h.size());
  for (auto _ : state) {
    widen_half(h, out.data());
    benchmark::DoNotOptimize(out.data());
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * static_cast<std::int64_t>(h.size()) * 6);
}

void bm_copy(benchmark::State& state, Problem p) {
  Setup s(p);
  for (auto _ : state) benchmark::DoNotOptimize(Tensor(s.w.value));
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * s.w.value.numel() * 8);
}

const bool registered = [] {
  for (const auto& [R, d] : {std::pair<std::int64_t, std::int64_t>{2048, 256}, {512, 1024}}) {
    for (const Problem p : {Problem{R, d, 3 * d}, Problem{R, d, d}, Problem{R, d, 4 * d}, Problem{R, 4 * d, d}}) {
      benchmark::RegisterBenchmark(("linear_fp32/" + p.name()).c_str(), bm_linear_fp32, p)->UseRealTime()->Unit(benchmark::kMicrosecond);
      benchmark::RegisterBenchmark(("fp16_linear/" + p.name()).c_str(), bm_fp16_linear, p)->UseRealTime()->Unit(benchmark::kMicrosecond);
      benchmark::RegisterBenchmark(("widen_half/" + p.name()).c_str(), bm_widen, p)->UseRealTime()->Unit(benchmark::kMicrosecond);
      benchmark::RegisterBenchmark(("copy_fp32/" + p.name()).c_str(), bm_copy, p)->UseRealTime()->Unit(benchmark::kMicrosecond);
    }
  }
  return true;
}();

}  // namespace

BENCHMARK_MAIN();
