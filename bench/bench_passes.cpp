// The memory-bound passes around a matmul, against a plain memcpy.
//
// Every benchmark is named  <pass>/<rows>x<cols>/omp:<threads>/real_time  and
// reports two rate counters:
//   elem/s  elements processed per second;
//   GB/s    the pass's minimum memory traffic per second: every input byte read
//           once plus every output byte written once (a pass that reads its
//           input twice, e.g. a max then a rounding pass, still counts it once,
//           so its GB/s shows how far it is from a single streaming pass).
// The memcpy yardsticks count read + write bytes the same way, so a pass's
// GB/s divided by memcpy's GB/s (same size, same threads, same run) is the
// fraction of copy bandwidth it reaches.
//
// Passes (sizes are training activations: 2048 tokens x 384 or 512 features):
//   quantize_rn / quantize_sr        intrain::quantize  f32 -> int8 (max pass + rounding pass)
//   requantize_rn / requantize_sr    intrain::requantize int32 -> int8 (max pass + rounding pass)
//   requantize_at_rn / _sr           intrain::requantize_at: a given exponent, one read (delayed scaling)
//   max_abs_mantissa_i32             intrain::max_abs_mantissa of an int32 tensor
//   max_abs_f32                      intrain::max_abs of floats (the first pass of quantize)
//   dequantize_into_i8               intrain::dequantize_into int8 -> f32, preallocated output
//   dequantize_i8                    intrain::dequantize int8 -> f32, returns a new vector
//   memcpy_f32 / memcpy_i8           memcpy of the f32/int32 (4n bytes) or int8 (n bytes) buffer,
//                                    in the same fixed chunks and OpenMP loop as the passes
//
// Run:  build/bench/bench_passes   (see docs/benchmarks.md for the full commands)
#include <benchmark/benchmark.h>
#include <omp.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "core/parallel.h"
#include "core/quantize.h"
#include "core/rounding.h"
#include "core/tensor.h"

namespace {

using intrain::Format;
using intrain::Rounding;
using intrain::RngKey;
using intrain::Shape;
using intrain::Tensor;

struct Size {
  std::int64_t rows, cols;
  std::int64_t n() const { return rows * cols; }
  std::string name() const { return std::to_string(rows) + "x" + std::to_string(cols); }
};
const Size kSizes[] = {{2048, 384}, {2048, 512}};

// Inputs, made once per benchmark run (outside the timing).
struct Inputs {
  std::vector<float> x;  // f32 activations
  Tensor acc;            // int32 accumulator
  Tensor q8;             // int8 mantissas
  int rq_exponent = 0;   // the exponent requantize() picks for acc (for requantize_at)
  explicit Inputs(const Size& s)
      : x(static_cast<std::size_t>(s.n())),
        acc(Shape{s.rows, s.cols}, Format::accumulator(32), -14),
        q8(Shape{s.rows, s.cols}, Format::fixed(8), -7) {
    std::mt19937 rng(42);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    for (float& v : x) v = nd(rng);
    // An accumulator of a K = 128 product of int8 operands: |acc| well below 2^21.
    std::uniform_int_distribution<std::int32_t> ua(-(1 << 20), 1 << 20);
    std::int32_t* a = acc.data<std::int32_t>();
    for (std::int64_t i = 0; i < acc.numel(); ++i) a[i] = ua(rng);
    std::uniform_int_distribution<int> u8(-127, 127);
    std::int8_t* q = q8.data<std::int8_t>();
    for (std::int64_t i = 0; i < q8.numel(); ++i) q[i] = static_cast<std::int8_t>(u8(rng));
    rq_exponent = acc.exponent() + intrain::shift_for_max(intrain::max_abs_mantissa(acc), Format::fixed(8).qmax());
  }
};

// One benchmark: `bytes_per_elem` of minimum traffic per element; `body(in)`
// runs the pass once.
using Body = std::function<void(Inputs&)>;

void bm_pass(benchmark::State& state, Size s, double bytes_per_elem, Body body) {
  const int threads = static_cast<int>(state.range(0));
  omp_set_num_threads(threads);
  // Inputs are made once per size and shared by every pass and repetition
  // (filling them costs more than a repetition's timing).
  static std::map<std::int64_t, std::unique_ptr<Inputs>> cache;
  auto& slot = cache[s.rows * 1000003 + s.cols];
  if (!slot) slot = std::make_unique<Inputs>(s);
  Inputs& in = *slot;
  body(in);  // warm-up: first touch, allocator, OpenMP pool
  for (auto _ : state) {
    body(in);
    benchmark::ClobberMemory();
  }
  const double n = static_cast<double>(s.n()) * static_cast<double>(state.iterations());
  state.counters["elem/s"] = benchmark::Counter(n, benchmark::Counter::kIsRate);
  state.counters["GB/s"] = benchmark::Counter(n * bytes_per_elem * 1e-9, benchmark::Counter::kIsRate);
  state.SetLabel(s.name() + " omp=" + std::to_string(threads));
}

// memcpy in the passes' fixed chunks, so both thread counts split it the same way.
void chunked_memcpy(void* dst, const void* src, std::int64_t n, int elem) {
  intrain::for_chunks(n, [&](std::int64_t, std::int64_t b, std::int64_t e) {
    std::memcpy(static_cast<char*>(dst) + b * elem, static_cast<const char*>(src) + b * elem,
                static_cast<std::size_t>((e - b) * elem));
  });
}

struct Pass {
  const char* name;
  double bytes_per_elem;
  std::function<Body(const Size&)> make;
};

std::vector<Pass> passes() {
  const RngKey key(1, intrain::stream_id(7, 3));
  const Format rn = Format::fixed(8, Rounding::Nearest), sr = Format::fixed(8, Rounding::Stochastic);
  auto quantize = [](Format f, RngKey k) {
    return [f, k](const Size& s) -> Body {
      const Shape shape{s.rows, s.cols};
      return [f, k, shape](Inputs& in) { benchmark::DoNotOptimize(intrain::quantize(in.x, shape, f, k)); };
    };
  };
  auto requantize = [](Format f, RngKey k) {
    return [f, k](const Size&) -> Body {
      return [f, k](Inputs& in) { benchmark::DoNotOptimize(intrain::requantize(in.acc, f, k)); };
    };
  };
  auto requantize_at = [](Format f, RngKey k) {
    return [f, k](const Size&) -> Body {
      // At the exponent requantize() would pick: no saturation, the same rounding pass.
      return [f, k](Inputs& in) { benchmark::DoNotOptimize(intrain::requantize_at(in.acc, f, in.rq_exponent, k)); };
    };
  };
  std::vector<Pass> p;
  p.push_back({"quantize_rn", 5, quantize(rn, key)});
  p.push_back({"quantize_sr", 5, quantize(sr, key)});
  p.push_back({"requantize_rn", 5, requantize(rn, key)});
  p.push_back({"requantize_sr", 5, requantize(sr, key)});
  p.push_back({"requantize_at_rn", 5, requantize_at(rn, key)});
  p.push_back({"requantize_at_sr", 5, requantize_at(sr, key)});
  p.push_back({"max_abs_mantissa_i32", 4, [](const Size&) -> Body {
                 return [](Inputs& in) { benchmark::DoNotOptimize(intrain::max_abs_mantissa(in.acc)); };
               }});
  p.push_back({"max_abs_f32", 4, [](const Size&) -> Body {
                 return [](Inputs& in) { benchmark::DoNotOptimize(intrain::max_abs(in.x)); };
               }});
  p.push_back({"dequantize_into_i8", 5, [](const Size& s) -> Body {
                 auto out = std::make_shared<std::vector<float>>(static_cast<std::size_t>(s.n()));
                 return [out](Inputs& in) {
                   intrain::dequantize_into(in.q8, *out);
                   benchmark::DoNotOptimize(out->data());
                 };
               }});
  p.push_back({"dequantize_i8", 5, [](const Size&) -> Body {
                 return [](Inputs& in) { benchmark::DoNotOptimize(intrain::dequantize(in.q8)); };
               }});
  p.push_back({"memcpy_f32", 8, [](const Size& s) -> Body {
                 auto out = std::make_shared<std::vector<float>>(static_cast<std::size_t>(s.n()));
                 return [out](Inputs& in) {
                   chunked_memcpy(out->data(), in.x.data(), static_cast<std::int64_t>(in.x.size()), 4);
                   benchmark::DoNotOptimize(out->data());
                 };
               }});
  p.push_back({"memcpy_i8", 2, [](const Size& s) -> Body {
                 auto out = std::make_shared<std::vector<std::int8_t>>(static_cast<std::size_t>(s.n()));
                 return [out](Inputs& in) {
                   chunked_memcpy(out->data(), in.q8.raw(), in.q8.numel(), 1);
                   benchmark::DoNotOptimize(out->data());
                 };
               }});
  return p;
}

// Run order: per thread count, per size, every pass back to back.
void register_all() {
  const std::vector<Pass> all = passes();
  for (int threads : {1, 2}) {
    for (const Size& s : kSizes) {
      for (const Pass& p : all) {
        const std::string name = std::string(p.name) + "/" + s.name();
        benchmark::RegisterBenchmark(name.c_str(), bm_pass, s, p.bytes_per_elem, p.make(s))
            ->ArgName("omp")
            ->Arg(threads)
            ->UseRealTime()
            ->MinTime(0.5)
            ->Unit(benchmark::kMicrosecond);
      }
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
