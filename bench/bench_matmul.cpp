// Matmul throughput: intrain's paths against raw oneDNN, in GOP/s.
//
// Every benchmark is named  <path>/<M>x<K>x<N>/omp:<threads>/real_time  and
// reports a counter GOP/s = 2·M·K·N·batch per iteration / wall time. The label
// repeats the shape and thread count and names the oneDNN implementation that
// runs (e.g. brg:avx512_core_vnni), so a slow layout is visible at a glance.
//
// Paths (all operands random over their full range):
//   intrain_int8      intrain::matmul, two Format::fixed(8) tensors  (s8 x s8 -> s32)
//   intrain_split16   intrain::matmul, two Format::fixed(16) tensors (split into int8 pieces)
//   onednn_u8s8       raw oneDNN u8 src x s8 weights -> s32
//   onednn_s8s8       raw oneDNN s8 src x s8 weights -> s32
//   onednn_f32        raw oneDNN f32 x f32 -> f32
//   intrain_int8_TN   intrain::matmul(A, B, Trans::T, Trans::N): A stored [K, M]  (dW = Xᵀ·dY)
//   intrain_int8_NT   intrain::matmul(A, B, Trans::N, Trans::T): B stored [N, K]  (dX = dY·Wᵀ)
// The transposed variants keep the logical M x K x N of the NN run, so their
// GOP/s compares directly with intrain_int8 at the same shape: at the three
// forward training shapes (TN and NT), and at the weight-gradient shapes
// 128x2048x384, 128x2048x512, 512x2048x128 (NN and TN only).
//
// Raw oneDNN runs use plain row-major (strided) memory, as intrain does, with
// the primitive, memory objects and stream created once, outside the timing.
//
// Run:  build/bench/bench_matmul   (see docs/benchmarks.md for the full commands)
#include <benchmark/benchmark.h>
#include <omp.h>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <oneapi/dnnl/dnnl.hpp>

#include "core/matmul.h"
#include "core/tensor.h"

namespace {

using intrain::Format;
using intrain::Tensor;
using intrain::Trans;
using dt = dnnl::memory::data_type;

struct Dims {
  std::int64_t M, K, N;
};

// The square reference shape and the training shapes (GPT-2-style block,
// d = 128, tokens per batch 2048: QKV projection, MLP up, MLP down).
const Dims kShapes[] = {{1024, 1024, 1024}, {2048, 128, 384}, {2048, 128, 512}, {2048, 512, 128}};
// Shapes at which the transposed (backward-pass) layouts are measured.
const Dims kTrainShapes[] = {{2048, 128, 384}, {2048, 128, 512}, {2048, 512, 128}};
// The weight-gradient products of those layers, dW = Xᵀ·dY: M = fan-in,
// K = 2048 tokens, N = fan-out. Measured as Aᵀ·B (how backward calls it) and
// as A·B at the same shape.
const Dims kWeightGradShapes[] = {{128, 2048, 384}, {128, 2048, 512}, {512, 2048, 128}};

std::string shape_name(const Dims& d) {
  return std::to_string(d.M) + "x" + std::to_string(d.K) + "x" + std::to_string(d.N);
}

double gop_per_iter(const Dims& d) { return 2.0 * static_cast<double>(d.M) * d.K * d.N * 1e-9; }

void set_counters(benchmark::State& state, const Dims& d, int threads, const std::string& impl) {
  state.counters["GOP/s"] =
      benchmark::Counter(gop_per_iter(d) * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
  state.SetLabel(shape_name(d) + " omp=" + std::to_string(threads) + " " + impl);
}

dnnl::engine& engine() {
  static dnnl::engine e(dnnl::engine::kind::cpu, 0);
  return e;
}

// A strided memory descriptor for a rows x cols matrix; `transposed` stores it
// column-major (as the transpose of a row-major [cols, rows] array).
dnnl::memory::desc mat_md(dt type, std::int64_t rows, std::int64_t cols, bool transposed = false) {
  const dnnl::memory::dims strides = transposed ? dnnl::memory::dims{1, rows} : dnnl::memory::dims{cols, 1};
  return dnnl::memory::desc({rows, cols}, type, strides);
}

// Name of the oneDNN implementation chosen for these descriptors (for labels).
std::string impl_name(const dnnl::memory::desc& a, const dnnl::memory::desc& b, const dnnl::memory::desc& c) {
  dnnl::matmul::desc md(a, b, c);
  dnnl::matmul::primitive_desc pd(md, engine());
  return pd.impl_info_str();
}

template <class T> void fill_uniform(T* p, std::int64_t n, int lo, int hi, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> u(lo, hi);
  for (std::int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(u(rng));
}

Tensor random_fixed(std::int64_t rows, std::int64_t cols, int bits, unsigned seed) {
  const Format f = Format::fixed(bits);
  Tensor t({rows, cols}, f, -bits);
  const int q = static_cast<int>(f.qmax());
  if (bits <= 8) {
    fill_uniform(t.data<std::int8_t>(), t.numel(), -q, q, seed);
  } else {
    fill_uniform(t.data<std::int16_t>(), t.numel(), -q, q, seed);
  }
  return t;
}

// ---- intrain::matmul ---------------------------------------------------------

void bm_intrain(benchmark::State& state, Dims d, int bits, Trans ta, Trans tb) {
  const int threads = static_cast<int>(state.range(0));
  omp_set_num_threads(threads);
  // Storage shapes: op(A) is M x K, op(B) is K x N.
  const Tensor A = ta == Trans::N ? random_fixed(d.M, d.K, bits, 1) : random_fixed(d.K, d.M, bits, 1);
  const Tensor B = tb == Trans::N ? random_fixed(d.K, d.N, bits, 2) : random_fixed(d.N, d.K, bits, 2);

  // The oneDNN implementation behind the (first) int8 product, for the label.
  std::string impl;
  if (bits <= 8) {
    impl = impl_name(mat_md(dt::s8, d.M, d.K, ta == Trans::T), mat_md(dt::s8, d.K, d.N, tb == Trans::T),
                     mat_md(dt::s32, d.M, d.N));
  } else {  // split: dense u8 pieces of A times dense s8 pieces of B, in the operands' layouts
    impl = impl_name(mat_md(dt::u8, d.M, d.K, ta == Trans::T), mat_md(dt::s8, d.K, d.N, tb == Trans::T),
                     mat_md(dt::s32, d.M, d.N));
  }

  benchmark::DoNotOptimize(intrain::matmul(A, B, ta, tb));  // warm-up: primitive creation, first touch
  for (auto _ : state) {
    Tensor C = intrain::matmul(A, B, ta, tb);
    benchmark::DoNotOptimize(C.raw());
    benchmark::ClobberMemory();
  }
  set_counters(state, d, threads, impl);
}

// ---- raw oneDNN ----------------------------------------------------------------

void bm_onednn(benchmark::State& state, Dims d, dt ta, dt tb, dt tc) {
  const int threads = static_cast<int>(state.range(0));
  omp_set_num_threads(threads);
  dnnl::engine& eng = engine();
  const auto a_md = mat_md(ta, d.M, d.K), b_md = mat_md(tb, d.K, d.N), c_md = mat_md(tc, d.M, d.N);
  // Created after omp_set_num_threads: oneDNN sizes its work split by the
  // thread count at creation time.
  dnnl::matmul::desc md(a_md, b_md, c_md);
  dnnl::matmul::primitive_desc pd(md, eng);
  dnnl::matmul prim(pd);

  dnnl::memory a(a_md, eng), b(b_md, eng), c(c_md, eng);
  const std::int64_t na = d.M * d.K, nb = d.K * d.N;
  auto fill = [](dnnl::memory& m, dt t, std::int64_t n, unsigned seed) {
    void* p = m.get_data_handle();
    switch (t) {
      case dt::u8: fill_uniform(static_cast<std::uint8_t*>(p), n, 0, 255, seed); break;
      case dt::s8: fill_uniform(static_cast<std::int8_t*>(p), n, -128, 127, seed); break;
      case dt::f32: {
        std::mt19937 rng(seed);
        std::uniform_real_distribution<float> u(-1.0f, 1.0f);
        auto* f = static_cast<float*>(p);
        for (std::int64_t i = 0; i < n; ++i) f[i] = u(rng);
        break;
      }
      default: break;
    }
  };
  fill(a, ta, na, 1);
  fill(b, tb, nb, 2);

  dnnl::stream s(eng);
  auto run = [&] {
    prim.execute(s, {{DNNL_ARG_SRC, a}, {DNNL_ARG_WEIGHTS, b}, {DNNL_ARG_DST, c}});
    s.wait();
  };
  run();  // warm-up
  for (auto _ : state) {
    run();
    benchmark::ClobberMemory();
  }
  set_counters(state, d, threads, pd.impl_info_str());
}

void configure(benchmark::internal::Benchmark* b, int threads) {
  b->ArgName("omp")->Arg(threads)->UseRealTime()->MinTime(0.5)->Unit(benchmark::kMillisecond);
}

// Registration order = run order: per thread count, per shape, every path back
// to back, so the ratios compare numbers measured seconds apart.
void register_all() {
  for (int threads : {1, 2}) {
    for (const Dims& d : kShapes) {
      const std::string s = "/" + shape_name(d);
      configure(benchmark::RegisterBenchmark(("intrain_int8" + s).c_str(), bm_intrain, d, 8, Trans::N, Trans::N),
                threads);
      configure(benchmark::RegisterBenchmark(("intrain_split16" + s).c_str(), bm_intrain, d, 16, Trans::N, Trans::N),
                threads);
      configure(benchmark::RegisterBenchmark(("onednn_u8s8" + s).c_str(), bm_onednn, d, dt::u8, dt::s8, dt::s32),
                threads);
      configure(benchmark::RegisterBenchmark(("onednn_s8s8" + s).c_str(), bm_onednn, d, dt::s8, dt::s8, dt::s32),
                threads);
      configure(benchmark::RegisterBenchmark(("onednn_f32" + s).c_str(), bm_onednn, d, dt::f32, dt::f32, dt::f32),
                threads);
    }
    for (const Dims& d : kTrainShapes) {
      const std::string s = "/" + shape_name(d);
      configure(benchmark::RegisterBenchmark(("intrain_int8_TN" + s).c_str(), bm_intrain, d, 8, Trans::T, Trans::N),
                threads);
      configure(benchmark::RegisterBenchmark(("intrain_int8_NT" + s).c_str(), bm_intrain, d, 8, Trans::N, Trans::T),
                threads);
    }
    for (const Dims& d : kWeightGradShapes) {
      const std::string s = "/" + shape_name(d);
      configure(benchmark::RegisterBenchmark(("intrain_int8" + s).c_str(), bm_intrain, d, 8, Trans::N, Trans::N),
                threads);
      configure(benchmark::RegisterBenchmark(("intrain_int8_TN" + s).c_str(), bm_intrain, d, 8, Trans::T, Trans::N),
                threads);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
