#include "experiments/evaluate.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#include "core/rng.h"
#include "experiments/checkpoint.h"
#include "experiments/corpus.h"

namespace intrain {

nlohmann::json run_eval(const EvalOptions& o) {
  if (o.threads > 0) omp_set_num_threads(o.threads);
  GPT model = load_model(o.model, o.format, parse_rounding(o.rounding));
  const int T = model.config().n_ctx, B = std::max(1, o.batch);
  const Corpus corpus = Corpus::load(o.data, T + 1);
  ValWindows windows(corpus.val, T, o.max_windows);
  std::vector<std::int32_t> x(static_cast<std::size_t>(B) * T), y(x.size());
  double sum = 0.0;
  std::int64_t n = 0, batch_index = 0;
  while (int got = windows.next(B, x.data(), y.data())) {
    const double l = model.forward(x.data(), y.data(), got, T, (std::uint64_t{1} << 40) + batch_index++, o.seed, false);
    sum += l * got * T;
    n += static_cast<std::int64_t>(got) * T;
  }
  if (n == 0) throw std::runtime_error("eval: the validation split holds no full window of " + std::to_string(T) + " bytes");
  const double loss = sum / static_cast<double>(n);
  return {{"loss", loss},
          {"perplexity", std::exp(loss)},
          {"bits_per_byte", loss / std::log(2.0)},
          {"tokens", n},
          {"format", model.precision().name()},
          {"data", corpus.name}};
}

std::string run_sample(const SampleOptions& o) {
  if (o.threads > 0) omp_set_num_threads(o.threads);
  if (!(o.temperature > 0.0)) throw std::invalid_argument("--temperature must be positive");
  if (o.prompt.empty()) throw std::invalid_argument("--prompt must not be empty");
  GPT model = load_model(o.model, o.format, parse_rounding(o.rounding));
  const int C = model.config().n_ctx, V = model.config().vocab_size;
  std::string text = o.prompt;
  const RngKey key(o.seed, 0x5A3B1E);
  for (int i = 0; i < o.tokens; ++i) {
    const std::size_t start = text.size() > static_cast<std::size_t>(C) ? text.size() - C : 0;
    std::vector<std::int32_t> ctx;
    for (std::size_t j = start; j < text.size(); ++j) ctx.push_back(static_cast<unsigned char>(text[j]));
    const auto T = static_cast<std::int64_t>(ctx.size());
    model.forward(ctx.data(), nullptr, 1, T, (std::uint64_t{1} << 41) + static_cast<std::uint64_t>(i), o.seed, false);
    // Sampling is not training: the last row's logits, softened in double.
    const Tensor& logits = model.logits();
    std::vector<double> p(static_cast<std::size_t>(V));
    double mx = -INFINITY;
    for (int v = 0; v < V; ++v) mx = std::max(mx, logits.value((T - 1) * V + v) / o.temperature);
    double z = 0.0;
    for (int v = 0; v < V; ++v) z += p[static_cast<std::size_t>(v)] = std::exp(logits.value((T - 1) * V + v) / o.temperature - mx);
    double u = key.bits(static_cast<std::uint32_t>(i)) / 4294967296.0 * z;
    int pick = V - 1;
    for (int v = 0; v < V; ++v) {
      u -= p[static_cast<std::size_t>(v)];
      if (u < 0) {
        pick = v;
        break;
      }
    }
    text.push_back(static_cast<char>(pick));
  }
  return text;
}

}  // namespace intrain
