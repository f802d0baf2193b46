#include "experiments/evaluate.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <stdexcept>
#include <vector>

#include "analysis/fidelity.h"
#include "core/rng.h"
#include "experiments/checkpoint.h"
#include "experiments/corpus.h"

namespace intrain {

nlohmann::json evaluate_fidelity(GPT& model, GPT* teacher, const Corpus& corpus, int batch, long max_windows,
                                 std::uint64_t seed) {
  const GPTConfig& mc = model.config();
  const int T = mc.n_ctx, B = std::max(1, batch);
  if (teacher) {
    const GPTConfig& tc = teacher->config();
    if (tc.vocab_size != mc.vocab_size)
      throw std::runtime_error("--teacher: the teacher's vocabulary has " + std::to_string(tc.vocab_size) +
                               " entries but the model's has " + std::to_string(mc.vocab_size) +
                               "; compare models over the same vocabulary");
    if (tc.n_ctx != mc.n_ctx)
      throw std::runtime_error("--teacher: the teacher's context is " + std::to_string(tc.n_ctx) +
                               " bytes but the model's is " + std::to_string(mc.n_ctx) +
                               "; both must read the same windows: use a teacher of context " + std::to_string(mc.n_ctx));
  }
  ValWindows windows(corpus.val, T, max_windows);
  std::vector<std::int32_t> x(static_cast<std::size_t>(B) * T), y(x.size());
  FidelityAccumulator acc;
  std::uint64_t batch_index = 0;
  while (int got = windows.next(B, x.data(), y.data())) {
    // Same rounding keys for both models: a model compared with itself gives identical logits.
    const std::uint64_t step = (std::uint64_t{1} << 40) + batch_index++;
    model.forward(x.data(), nullptr, got, T, step, seed, false);
    if (teacher) teacher->forward(x.data(), nullptr, got, T, step, seed, false);
    acc.add(model.logits(), teacher ? &teacher->logits() : nullptr, y.data());
  }
  if (acc.tokens() == 0)
    throw std::runtime_error("eval: the validation split holds no full window of " + std::to_string(T) + " bytes");
  return acc.report();
}

nlohmann::json run_eval(const EvalOptions& o) {
  if (o.threads > 0) omp_set_num_threads(o.threads);
  const Rounding rounding = parse_rounding(o.rounding);
  if (o.storage != "fp32" && o.storage != "fp16")
    throw std::invalid_argument("--storage: '" + o.storage + "' is not one of fp32, fp16");
  LoadMode mode;
  mode.linears_fp16 = o.storage == "fp16";
  GPT model = [&] {
    try {
      return load_model(o.model, o.format, rounding, mode);
    } catch (const std::invalid_argument& e) {
      if (!mode.linears_fp16) throw;
      throw std::invalid_argument("--storage fp16 holds a float model's weights (add --format fp32, or drop --storage): " +
                                  std::string(e.what()));
    }
  }();
  std::optional<GPT> teacher;
  if (o.teacher) teacher.emplace(load_model(*o.teacher, "", rounding));  // the teacher keeps its own format
  const Corpus corpus = Corpus::load(o.data, model.config().n_ctx + 1);
  nlohmann::json j = evaluate_fidelity(model, teacher ? &*teacher : nullptr, corpus, o.batch, o.max_windows, o.seed);
  const double loss = j["nll"].get<double>();
  j["loss"] = loss;
  j["bits_per_byte"] = loss / std::log(2.0);
  j["format"] = model.precision().name();
  j["data"] = corpus.name;
  j["storage"] = o.storage;
  if (teacher) {
    j["teacher"] = o.teacher->string();
    j["teacher_format"] = teacher->precision().name();
  }
  return j;
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
