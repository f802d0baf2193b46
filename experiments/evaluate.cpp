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

namespace {

// Log-probabilities of one row of logits, in double.
void log_softmax_row(const Tensor& logits, std::int64_t r, std::int64_t V, std::vector<double>& out) {
  double mx = -INFINITY;
  for (std::int64_t j = 0; j < V; ++j) mx = std::max(mx, out[static_cast<std::size_t>(j)] = logits.value(r * V + j));
  double z = 0.0;
  for (std::int64_t j = 0; j < V; ++j) z += std::exp(out[static_cast<std::size_t>(j)] - mx);
  const double lz = mx + std::log(z);
  for (std::int64_t j = 0; j < V; ++j) out[static_cast<std::size_t>(j)] -= lz;
}

}  // namespace

nlohmann::json evaluate_fidelity(GPT& model, GPT* teacher, const Corpus& corpus, int batch, long max_windows,
                                 std::uint64_t seed) {
  const int T = model.config().n_ctx, B = std::max(1, batch);
  const std::int64_t V = model.config().vocab_size;
  if (teacher && (teacher->config().n_ctx != T || teacher->config().vocab_size != V)) {
    throw std::invalid_argument("--teacher: its context or vocabulary differs from the model's");
  }
  ValWindows windows(corpus.val, T, max_windows);
  std::vector<std::int32_t> x(static_cast<std::size_t>(B) * T), y(x.size());
  std::vector<double> lm(static_cast<std::size_t>(V)), lt(lm.size());
  double nll = 0.0, nll_t = 0.0, kl = 0.0;
  std::int64_t n = 0, top1 = 0, batch_index = 0;
  while (int got = windows.next(B, x.data(), y.data())) {
    const std::uint64_t step = (std::uint64_t{1} << 40) + static_cast<std::uint64_t>(batch_index++);
    model.forward(x.data(), nullptr, got, T, step, seed, false);
    if (teacher) teacher->forward(x.data(), nullptr, got, T, step, seed, false);
    for (std::int64_t r = 0; r < static_cast<std::int64_t>(got) * T; ++r) {
      log_softmax_row(model.logits(), r, V, lm);
      nll -= lm[static_cast<std::size_t>(y[static_cast<std::size_t>(r)])];
      if (teacher) {
        log_softmax_row(teacher->logits(), r, V, lt);
        nll_t -= lt[static_cast<std::size_t>(y[static_cast<std::size_t>(r)])];
        double k = 0.0;
        for (std::int64_t j = 0; j < V; ++j) k += std::exp(lt[static_cast<std::size_t>(j)]) * (lt[static_cast<std::size_t>(j)] - lm[static_cast<std::size_t>(j)]);
        kl += k;
        top1 += std::max_element(lm.begin(), lm.end()) - lm.begin() == std::max_element(lt.begin(), lt.end()) - lt.begin();
      }
      ++n;
    }
  }
  if (n == 0) throw std::runtime_error("eval: the validation split holds no full window of " + std::to_string(T) + " bytes");
  nlohmann::json j = {{"tokens", n}, {"nll", nll / n}, {"perplexity", std::exp(nll / n)}};
  if (teacher) {
    j["teacher_perplexity"] = std::exp(nll_t / n);
    j["kl_mean"] = kl / n;
    j["top1"] = static_cast<double>(top1) / n;
  }
  return j;
}

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
