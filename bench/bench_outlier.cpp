// A linear layer's forward and backward (Y = X·W, dX = dY·Wᵀ, dW = Xᵀ·dY)
// at the default model's shapes (B·T = 2048 tokens, d = 128, 4d MLP), three
// ways, timed in alternation inside one benchmark so that their ratio comes
// from one run on one machine:
//
//   split16  the int16 run: X, W, dY int16 (Format::fixed(16)); every product
//            goes through core/matmul's exact 16-bit split (4 int8 products)
//   tiled    the outlier-tiled int8 run: W int8; X and dY start as int16
//            (what the producing op writes) and are split by outlier_split
//            (included in the time), then multiplied by matmul_tiled
//   int8     plain int8 operands (context: the floor tiling cannot beat)
//
// Counters (medians over the iterations, milliseconds per fwd+bwd):
//   split16_ms, tiled_ms, int8_ms, speedup = split16_ms / tiled_ms,
//   split_ms, tiled_y_ms, tiled_dw_ms, tiled_dx_ms: the parts of tiled_ms
//   (both outlier_split calls, then each product),
//   x_frac / dy_frac: outlier fractions of X and dY.
//
// Outlier patterns, found by the training default rms:5 (planted magnitudes
// 40-53x the bulk's rms of 300; with 1% of them the tensor's rms is about
// 1430, so 5 rms = 7150 separates the planted set exactly: fraction 1%):
//   spread    1% of the elements of X and of dY at uniformly random places
//   channels  X: whole columns (channels) holding 1%; dY: whole rows (tokens)
//   rms5      no planted outliers: Gaussian data only
//
// Run:  build/bench/bench_outlier [--benchmark_filter=...]
#include <benchmark/benchmark.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "core/matmul.h"
#include "core/outliers.h"
#include "core/tensor.h"

namespace {

using intrain::Format;
using intrain::OutlierPolicy;
using intrain::Tensor;
using intrain::Trans;

struct Layer {
  const char* name;
  std::int64_t in, out;
};
constexpr std::int64_t kRows = 2048;
const Layer kLayers[] = {{"c_attn", 128, 384}, {"c_proj", 128, 128}, {"c_fc", 128, 512}, {"mlp_proj", 512, 128}};

enum class Pattern { Spread, Channels, Rms5 };
const char* pattern_name(Pattern p) {
  return p == Pattern::Spread ? "spread" : p == Pattern::Channels ? "channels" : "rms5";
}

// An int16 tensor [rows, cols]: N(0, 300) plus, unless Rms5, 1% outliers of
// magnitude 12000..16000 placed per the pattern (`by_cols`: whole columns,
// else whole rows, for Channels).
Tensor source(std::int64_t rows, std::int64_t cols, Pattern p, bool by_cols, std::uint64_t seed) {
  Tensor t({rows, cols}, Format::fixed(16, intrain::Rounding::Stochastic), -16);
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> g(0.0, 300.0);
  std::uniform_int_distribution<int> mag(12000, 16000);
  std::int16_t* x = t.data<std::int16_t>();
  for (std::int64_t i = 0; i < t.numel(); ++i) x[i] = static_cast<std::int16_t>(std::clamp(std::round(g(rng)), -5000.0, 5000.0));
  const std::int64_t k = t.numel() / 100;
  auto plant = [&](std::int64_t i) { x[i] = static_cast<std::int16_t>(mag(rng) * (rng() & 1 ? 1 : -1)); };
  if (p == Pattern::Spread) {
    std::vector<std::int64_t> idx(static_cast<std::size_t>(t.numel()));
    for (std::int64_t i = 0; i < t.numel(); ++i) idx[static_cast<std::size_t>(i)] = i;
    std::shuffle(idx.begin(), idx.end(), rng);
    for (std::int64_t i = 0; i < k; ++i) plant(idx[static_cast<std::size_t>(i)]);
  } else if (p == Pattern::Channels) {
    // Column-major (by_cols) or row-major order from the start: whole lines, the last one partly.
    for (std::int64_t q = 0; q < k; ++q) plant(by_cols ? (q % rows) * cols + q / rows : q);
  }
  return t;
}

Tensor random_w(std::int64_t in, std::int64_t out, int bits, std::uint64_t seed) {
  const Format f = Format::fixed(bits);
  Tensor t({in, out}, f, -10);
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<std::int64_t> u(-f.qmax(), f.qmax());
  intrain::visit_int(t, [&](auto* w) {
    for (std::int64_t i = 0; i < t.numel(); ++i) w[i] = static_cast<std::remove_pointer_t<decltype(w)>>(u(rng));
  });
  return t;
}

Tensor narrow(const Tensor& x16, int bits) {
  // The same data as an int8 (or other) fixed-point tensor, by the max: what a plain run would hold.
  Tensor t({x16.rows(), x16.cols()}, Format::fixed(bits), x16.exponent() + 8);
  std::int8_t* o = t.data<std::int8_t>();
  const std::int16_t* x = x16.data<std::int16_t>();
  for (std::int64_t i = 0; i < t.numel(); ++i) o[i] = static_cast<std::int8_t>(std::clamp(x[i] / 256, -127, 127));
  return t;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

void bm_linear(benchmark::State& state, Layer L, Pattern p, int threads) {
  omp_set_num_threads(threads);
  const Tensor X = source(kRows, L.in, p, /*by_cols=*/true, 1), dY = source(kRows, L.out, p, /*by_cols=*/false, 2);
  const Tensor W16 = random_w(L.in, L.out, 16, 3), W8 = random_w(L.in, L.out, 8, 4);
  const Tensor X8 = narrow(X, 8), dY8 = narrow(dY, 8);
  const OutlierPolicy px{}, pd{};  // rms:5
  using Clock = std::chrono::steady_clock;
  auto ms = [](Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double, std::milli>(b - a).count(); };
  std::vector<double> t16, tt, t8, tsplit, tfwd, tdw, tdx;  // the last four: parts of tt
  double xf = 0, df = 0;
  std::int64_t sink = 0;
  // Y = X·W, dW = Xᵀ·dY, dX = dY·Wᵀ through the dispatching matmul.
  auto plain_fwd_bwd = [&](const Tensor& x, const Tensor& w, const Tensor& dy) {
    const Tensor Y = intrain::matmul(x, w);
    const Tensor dW = intrain::matmul(x, dy, Trans::T, Trans::N);
    const Tensor dX = intrain::matmul(dy, w, Trans::N, Trans::T);
    sink += Y.numel() + dW.numel() + dX.numel();
  };
  for (auto _ : state) {
    const auto a = Clock::now();
    plain_fwd_bwd(X, W16, dY);
    const auto b = Clock::now();
    {
      const intrain::OutlierSplit sx = intrain::outlier_split(X, px, intrain::RngKey(1, 1));
      const intrain::OutlierSplit sd = intrain::outlier_split(dY, pd, intrain::RngKey(1, 2));
      const auto s1 = Clock::now();
      const Tensor Y = intrain::matmul_tiled(sx, W8);
      const auto s2 = Clock::now();
      const Tensor dW = intrain::matmul_tiled(sx, sd, Trans::T, Trans::N);
      const auto s3 = Clock::now();
      const Tensor dX = intrain::matmul_tiled(sd, W8, Trans::N, Trans::T);
      const auto s4 = Clock::now();
      sink += Y.numel() + dW.numel() + dX.numel();
      xf = sx.fraction();
      df = sd.fraction();
      tsplit.push_back(ms(b, s1));
      tfwd.push_back(ms(s1, s2));
      tdw.push_back(ms(s2, s3));
      tdx.push_back(ms(s3, s4));
    }
    const auto c = Clock::now();
    plain_fwd_bwd(X8, W8, dY8);
    const auto d = Clock::now();
    t16.push_back(ms(a, b));
    tt.push_back(ms(b, c));
    t8.push_back(ms(c, d));
  }
  benchmark::DoNotOptimize(sink);
  const double m16 = median(t16), mt = median(tt), m8 = median(t8);
  state.counters["split16_ms"] = m16;
  state.counters["tiled_ms"] = mt;
  state.counters["int8_ms"] = m8;
  state.counters["speedup"] = m16 / mt;
  state.counters["split_ms"] = median(tsplit);
  state.counters["tiled_y_ms"] = median(tfwd);
  state.counters["tiled_dw_ms"] = median(tdw);
  state.counters["tiled_dx_ms"] = median(tdx);
  state.counters["x_frac"] = xf;
  state.counters["dy_frac"] = df;
  state.SetLabel(std::string(L.name) + " " + std::to_string(kRows) + "x" + std::to_string(L.in) + "->" +
                 std::to_string(L.out) + " " + pattern_name(p) + " omp=" + std::to_string(threads));
}

}  // namespace

int main(int argc, char** argv) {
  for (int threads : {1, 2})
    for (Pattern p : {Pattern::Spread, Pattern::Channels, Pattern::Rms5})
      for (const Layer& L : kLayers) {
        const std::string name = std::string("linear_fwd_bwd/") + L.name + "/" + pattern_name(p) + "/omp:" + std::to_string(threads);
        benchmark::RegisterBenchmark(name.c_str(), bm_linear, L, p, threads)
            ->UseRealTime()
            ->MinTime(0.5)
            ->Unit(benchmark::kMillisecond);
      }
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
