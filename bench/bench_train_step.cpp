// A full training step of the default model (4 layers, d = 128, 4 heads,
// context 128, batch 16: 842,496 parameters): forward, backward and the SGD
// update, in fp32 and in integer formats, on 1 and 2 threads. Counters:
// tokens/s and the model's matmul GFLOP/s (about 11.7 GFLOP per step, see
// ../shared/docs/machine.md). Compare with the PyTorch peer measured in the
// same session: /usr/bin/python3 bench/torch_step.py (bench/compare_step.sh
// runs both and prints the ratios).
#include <benchmark/benchmark.h>
#include <omp.h>

#include <random>
#include <string>
#include <vector>

#include "layers/gpt.h"
#include "optim/sgd.h"

namespace {

using namespace intrain;

// Matmul FLOPs of one step: forward 2·N·P_matmul per token plus attention,
// backward twice that (dX and dW), over B·T tokens.
double step_flops(const GPTConfig& c, int B) {
  const double T = c.n_ctx, C = c.n_embd, L = c.n_layer, V = c.vocab_size;
  const double per_token_fwd = 2.0 * (L * 12.0 * C * C + V * C) + L * 2.0 * 2.0 * T * C;  // linears + head + QK, PV
  return 3.0 * per_token_fwd * B * T;
}

void train_step(benchmark::State& state, const std::string& fmt) {
  const int threads = static_cast<int>(state.range(0));
  omp_set_num_threads(threads);
  const GPTConfig cfg{4, 4, 128, 128, 256};
  const int B = 16, T = 128;
  GPT model(cfg, Precision::parse(fmt), 1);
  Sgd opt(SgdConfig{0.9, 0.0});
  std::vector<std::int32_t> x(B * T), y(B * T);
  std::mt19937 rng(1);
  for (auto& v : x) v = static_cast<std::int32_t>(rng() % 256);
  for (auto& v : y) v = static_cast<std::int32_t>(rng() % 256);
  std::uint64_t step = 0;
  for (int w = 0; w < 3; ++w, ++step) {  // warm-up: primitive creation, heap growth
    model.forward(x.data(), y.data(), B, T, step, 1, true);
    model.backward();
    opt.step(model.params(), model.precision().g, 0.01, step, 1);
    model.refresh_values(step + 1, 1);
  }
  for (auto _ : state) {
    model.forward(x.data(), y.data(), B, T, step, 1, true);
    model.backward();
    opt.step(model.params(), model.precision().g, 0.01, step, 1);
    model.refresh_values(step + 1, 1);
    ++step;
  }
  state.counters["tok/s"] = benchmark::Counter(static_cast<double>(B) * T, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GFLOP/s"] =
      benchmark::Counter(step_flops(cfg, B) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

}  // namespace

BENCHMARK_CAPTURE(train_step, fp32, std::string("fp32"))->Arg(1)->Arg(2)->ArgName("threads")->UseRealTime()->Unit(benchmark::kMillisecond)->MinTime(3.0);
BENCHMARK_CAPTURE(train_step, int8, std::string("int8"))->Arg(1)->Arg(2)->ArgName("threads")->UseRealTime()->Unit(benchmark::kMillisecond)->MinTime(3.0);
BENCHMARK_CAPTURE(train_step, int16, std::string("int16"))->Arg(1)->Arg(2)->ArgName("threads")->UseRealTime()->Unit(benchmark::kMillisecond)->MinTime(3.0);

BENCHMARK_MAIN();
