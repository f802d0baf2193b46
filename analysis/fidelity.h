// Teacher fidelity: how closely a model's next-byte distributions follow a
// teacher's, accumulated batch by batch while the validation text streams
// through both models (no file of logits). The statistics are the ones
// llama.cpp's `llama-perplexity --kl-divergence` prints, defined in
// docs/fidelity.md:
//
//   per token i (one row of logits), with log-softmax computed in double by
//   log-sum-exp, p_m / p_t the model's / teacher's next-byte distributions
//   and y_i the true next byte:
//     nll_i   = -log p_m(y_i)                      (nats)
//     kl_i    = sum_v p_t(v) (log p_t(v) - log p_m(v))   KL(teacher || model), nats
//     dp_i    = p_m(y_i) - p_t(y_i)
//     top1_i  = [argmax p_m == argmax p_t]
//     top5_i  = [argmax p_t is among the 5 largest entries of p_m]
//   argmax ties go to the smallest index; "the 5 largest" orders entries by
//   value, then by index (smaller first), so every row has exactly 5.
//
// Invariants:
//   * every statistic is a mean over tokens (rows), never over sequences or
//     batches: a batch of 3 rows and one of 300 weigh 3 and 300 tokens;
//   * the result does not depend on the thread count or on how the rows are
//     cut into add() calls: per-row values are computed independently, kept by
//     index, and summed in row order;
//   * one double per token is kept (the KL values, for the percentiles); the
//     logits themselves are not kept;
//   * either every add() passes a teacher or none does (std::logic_error
//     otherwise), so the KL statistics always cover all tokens.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/tensor.h"

namespace intrain {

// The per-token quantities above for one row (the reference definition; the
// accumulator calls it on every row). `teacher` may be empty: then only
// `nll` is filled. Throws std::invalid_argument if the spans' sizes differ or
// `target` is outside [0, V).
struct TokenFidelity {
  double nll = 0.0, teacher_nll = 0.0, kl = 0.0, dp = 0.0;
  bool top1 = false, top5 = false;
};
TokenFidelity token_fidelity(std::span<const double> model_logits, std::span<const double> teacher_logits,
                             std::int32_t target);

// Percentile of values sorted ascending by linear interpolation between
// closest ranks (Hyndman & Fan type 7; numpy's default, and the rule of
// llama.cpp's perplexity tool): h = fraction * (n - 1), result =
// x[floor h] + (h - floor h) * (x[floor h + 1] - x[floor h]). fraction 0.5 is
// the median (the mean of the two middle values when n is even). Throws
// std::invalid_argument for an empty input or a fraction outside [0, 1].
double percentile_of_sorted(std::span<const double> sorted, double fraction);

// Per-token comparison of a model's next-byte distribution with a teacher's, accumulated while streaming.
class FidelityAccumulator {
 public:
  // rows x V logits, row-major: model_logits and teacher_logits are Tensors
  // (float, fixed-point or integer accumulator; read as exact real values) of
  // shape [rows, V]. targets: the true next byte of each row. teacher_logits
  // may be null (then only NLL/perplexity statistics are kept).
  // Throws std::invalid_argument if a tensor is not rank 2, the shapes
  // differ, or a target is outside [0, V); std::logic_error if the teacher is
  // given in some calls and not in others.
  void add(const Tensor& model_logits, const Tensor* teacher_logits, const std::int32_t* targets);
  std::int64_t tokens() const { return tokens_; }

  // JSON object (nats per token; fractions in [0, 1]):
  //   "tokens", "nll" (mean), "perplexity" (exp of the mean NLL);
  // with a teacher also
  //   "teacher_nll", "teacher_perplexity", "perplexity_ratio" (model / teacher),
  //   "kl_mean", "kl_stderr" (sample standard deviation / sqrt(n); 0 when n < 2),
  //   "kl_median", "kl_p90", "kl_p95", "kl_p99", "kl_p999" (percentile_of_sorted),
  //   "kl_max", "top1", "top1_stderr", "top5", "top5_stderr" (binomial
  //   sqrt(p (1 - p) / n)), "dp_mean", "dp_rms" (sqrt of the mean dp^2).
  // With no tokens yet: {"tokens": 0} only (a mean over nothing is undefined).
  nlohmann::json report() const;

 private:
  std::int64_t tokens_ = 0;
  int with_teacher_ = -1;  // -1: no add() yet; 0: without; 1: with
  // Running sums, each folded in row order.
  double sum_nll_ = 0.0, sum_teacher_nll_ = 0.0, sum_dp_ = 0.0, sum_dp2_ = 0.0;
  std::int64_t n_top1_ = 0, n_top5_ = 0;
  std::vector<double> kl_;  // per token, in the order seen (mean, stderr and percentiles in report())
};

}  // namespace intrain
