#include "analysis/fidelity.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "core/parallel.h"

namespace intrain {

namespace {

// Rows per parallel chunk: a row of 256 logits costs a few microseconds, so
// 32 rows amortise the scheduling; the chunking never changes a result.
constexpr std::int64_t kRowsPerChunk = 32;

// Row r of a [rows, V] tensor as exact real values in double. Returns false
// if a value is not finite (a diverged float model).
bool read_row(const Tensor& t, std::int64_t r, std::int64_t V, double* out) {
  const std::int64_t base = r * V;
  switch (t.format().scaling()) {
    case Scaling::Float: {
      const float* l = t.data<float>() + base;
      for (std::int64_t j = 0; j < V; ++j) out[j] = l[j];
      break;
    }
    case Scaling::SharedExponent: {
      // mantissa * 2^e: exact in double for every mantissa below 2^53.
      const int e = t.exponent();
      visit_int(t, [&](const auto* l) {
        for (std::int64_t j = 0; j < V; ++j) out[j] = std::ldexp(static_cast<double>(l[base + j]), e);
      });
      break;
    }
    case Scaling::Grouped:
      for (std::int64_t j = 0; j < V; ++j) out[j] = t.value(base + j);
      break;
  }
  for (std::int64_t j = 0; j < V; ++j)
    if (!std::isfinite(out[j])) return false;
  return true;
}

struct LogSoftmax {
  double lse = 0.0;     // log sum_v exp(x_v)
  std::int64_t argmax = 0;  // first index of the largest logit
};

LogSoftmax log_softmax_of(const double* x, std::int64_t V) {
  LogSoftmax s;
  double mx = x[0];
  for (std::int64_t v = 1; v < V; ++v)
    if (x[v] > mx) {
      mx = x[v];
      s.argmax = v;
    }
  double z = 0.0;
  for (std::int64_t v = 0; v < V; ++v) z += std::exp(x[v] - mx);
  s.lse = mx + std::log(z);
  return s;
}

// The definitions of fidelity.h on finite logits; `t` may be null.
TokenFidelity row_fidelity(const double* m, const double* t, std::int64_t V, std::int32_t y) {
  TokenFidelity f;
  const LogSoftmax sm = log_softmax_of(m, V);
  f.nll = sm.lse - m[y];
  if (t == nullptr) return f;
  const LogSoftmax st = log_softmax_of(t, V);
  f.teacher_nll = st.lse - t[y];
  double kl = 0.0;
  for (std::int64_t v = 0; v < V; ++v) {
    const double log_pt = t[v] - st.lse, log_pm = m[v] - sm.lse;
    kl += std::exp(log_pt) * (log_pt - log_pm);
  }
  f.kl = kl;
  f.dp = std::exp(-f.nll) - std::exp(-f.teacher_nll);
  f.top1 = sm.argmax == st.argmax;
  // Rank of the teacher's choice among the model's logits, ties broken by index.
  const std::int64_t a = st.argmax;
  std::int64_t rank = 0;
  for (std::int64_t v = 0; v < V; ++v) rank += (m[v] > m[a] || (m[v] == m[a] && v < a)) ? 1 : 0;
  f.top5 = rank < 5;
  return f;
}

void check_rank2(const Tensor& t, const char* what) {
  if (t.rank() != 2 || t.cols() < 1)
    throw std::invalid_argument(std::string("FidelityAccumulator::add: ") + what + " must be [rows, V] with V >= 1, got " +
                                t.describe());
}

}  // namespace

TokenFidelity token_fidelity(std::span<const double> model_logits, std::span<const double> teacher_logits,
                             std::int32_t target) {
  const auto V = static_cast<std::int64_t>(model_logits.size());
  if (V < 1) throw std::invalid_argument("token_fidelity: empty model logits");
  if (!teacher_logits.empty() && static_cast<std::int64_t>(teacher_logits.size()) != V)
    throw std::invalid_argument("token_fidelity: teacher has " + std::to_string(teacher_logits.size()) +
                                " logits, model " + std::to_string(V));
  if (target < 0 || target >= V)
    throw std::invalid_argument("token_fidelity: target " + std::to_string(target) + " outside [0, " +
                                std::to_string(V) + ")");
  return row_fidelity(model_logits.data(), teacher_logits.empty() ? nullptr : teacher_logits.data(), V, target);
}

double percentile_of_sorted(std::span<const double> sorted, double fraction) {
  if (sorted.empty()) throw std::invalid_argument("percentile_of_sorted: no values");
  if (!(fraction >= 0.0 && fraction <= 1.0))
    throw std::invalid_argument("percentile_of_sorted: fraction " + std::to_string(fraction) + " outside [0, 1]");
  const double h = fraction * static_cast<double>(sorted.size() - 1);
  const auto lo = static_cast<std::size_t>(std::floor(h));
  const std::size_t hi = std::min(lo + 1, sorted.size() - 1);
  return sorted[lo] + (h - static_cast<double>(lo)) * (sorted[hi] - sorted[lo]);
}

void FidelityAccumulator::add(const Tensor& model_logits, const Tensor* teacher_logits, const std::int32_t* targets) {
  check_rank2(model_logits, "model logits");
  const std::int64_t R = model_logits.rows(), V = model_logits.cols();
  if (teacher_logits) {
    check_rank2(*teacher_logits, "teacher logits");
    if (teacher_logits->shape() != model_logits.shape())
      throw std::invalid_argument("FidelityAccumulator::add: teacher logits " + teacher_logits->describe() +
                                  " do not match the model's " + model_logits.describe());
  }
  const int with = teacher_logits ? 1 : 0;
  if (with_teacher_ >= 0 && with_teacher_ != with)
    throw std::logic_error(std::string("FidelityAccumulator::add: called ") + (with ? "with" : "without") +
                           " a teacher after calls " + (with ? "without" : "with") + " one");
  if (R == 0) return;
  if (targets == nullptr) throw std::invalid_argument("FidelityAccumulator::add: no targets");
  for (std::int64_t r = 0; r < R; ++r)
    if (targets[r] < 0 || targets[r] >= V)
      throw std::invalid_argument("FidelityAccumulator::add: target of row " + std::to_string(r) + " is " +
                                  std::to_string(targets[r]) + ", outside [0, " + std::to_string(V) + ")");

  std::vector<TokenFidelity> rows(static_cast<std::size_t>(R));
  std::vector<unsigned char> finite(static_cast<std::size_t>(R), 1);
  for_chunks(
      R,
      [&](std::int64_t, std::int64_t r0, std::int64_t r1) {
        std::vector<double> m(static_cast<std::size_t>(V)), t(teacher_logits ? static_cast<std::size_t>(V) : 0);
        for (std::int64_t r = r0; r < r1; ++r) {
          const auto i = static_cast<std::size_t>(r);
          const bool ok = read_row(model_logits, r, V, m.data()) && (!teacher_logits || read_row(*teacher_logits, r, V, t.data()));
          if (!ok) {
            finite[i] = 0;
            continue;
          }
          rows[i] = row_fidelity(m.data(), teacher_logits ? t.data() : nullptr, V, targets[r]);
        }
      },
      kRowsPerChunk);
  for (std::int64_t r = 0; r < R; ++r)
    if (!finite[static_cast<std::size_t>(r)])
      throw std::invalid_argument("FidelityAccumulator::add: row " + std::to_string(r) + " of the " +
                                  (teacher_logits ? "model or teacher" : "model") +
                                  " logits holds a value that is not finite (a diverged model?)");

  // Fold in row order: the sums do not depend on the thread count.
  with_teacher_ = with;
  for (const TokenFidelity& f : rows) {
    sum_nll_ += f.nll;
    if (!with) continue;
    sum_teacher_nll_ += f.teacher_nll;
    sum_dp_ += f.dp;
    sum_dp2_ += f.dp * f.dp;
    n_top1_ += f.top1 ? 1 : 0;
    n_top5_ += f.top5 ? 1 : 0;
    kl_.push_back(f.kl);
  }
  tokens_ += R;
}

nlohmann::json FidelityAccumulator::report() const {
  nlohmann::json j;
  j["tokens"] = tokens_;
  if (tokens_ == 0) return j;
  const auto n = static_cast<double>(tokens_);
  const double nll = sum_nll_ / n;
  j["nll"] = nll;
  j["perplexity"] = std::exp(nll);
  if (with_teacher_ != 1) return j;

  const double teacher_nll = sum_teacher_nll_ / n;
  j["teacher_nll"] = teacher_nll;
  j["teacher_perplexity"] = std::exp(teacher_nll);
  j["perplexity_ratio"] = std::exp(nll - teacher_nll);

  // Mean and spread in two passes over the kept values (no cancellation
  // between a sum of squares and the squared mean when the KL is tiny).
  double sum = 0.0;
  for (double k : kl_) sum += k;
  const double mean = sum / n;
  double ss = 0.0;
  for (double k : kl_) ss += (k - mean) * (k - mean);
  j["kl_mean"] = mean;
  j["kl_stderr"] = tokens_ > 1 ? std::sqrt(ss / (n - 1.0) / n) : 0.0;
  std::vector<double> sorted = kl_;
  std::sort(sorted.begin(), sorted.end());
  j["kl_median"] = percentile_of_sorted(sorted, 0.5);
  j["kl_p90"] = percentile_of_sorted(sorted, 0.90);
  j["kl_p95"] = percentile_of_sorted(sorted, 0.95);
  j["kl_p99"] = percentile_of_sorted(sorted, 0.99);
  j["kl_p999"] = percentile_of_sorted(sorted, 0.999);
  j["kl_max"] = sorted.back();

  const auto binomial = [n](double p) { return std::sqrt(p * (1.0 - p) / n); };
  const double top1 = static_cast<double>(n_top1_) / n, top5 = static_cast<double>(n_top5_) / n;
  j["top1"] = top1;
  j["top1_stderr"] = binomial(top1);
  j["top5"] = top5;
  j["top5_stderr"] = binomial(top5);
  j["dp_mean"] = sum_dp_ / n;
  j["dp_rms"] = std::sqrt(sum_dp2_ / n);
  return j;
}

}  // namespace intrain
