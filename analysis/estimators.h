// Estimating the bound's constants from a run (docs/convergence.md §8).
//
// SmoothnessEstimator: L from gradient differences, ||g(x1) - g(x0)|| / ||x1 - x0||.
//   For an L-smooth f every such ratio of *full* gradients is <= L, so the
//   maximum is a lower estimate of L that approaches it when the trajectory
//   probes the top curvature direction. Feed gradients of the SAME minibatch at
//   both points: the ratio then measures the minibatch loss's curvature along
//   dx, which errs high rather than low (for a quadratic, E lambda_max(H_B) >=
//   lambda_max(E H_B) = L by Jensen), and it keeps the sampling noise
//   sigma / ||dx|| out of the ratio, which would otherwise blow up as steps
//   shrink. A high quantile (e.g. 0.9) is offered beside the max because one
//   ratio from a tiny ||dx|| can be an outlier of the integer casts, not of
//   the loss.
//
// GradientNoiseEstimator: sigma^2 = E||g_i - grad f||^2 from per-sample (or
//   per-micro-batch) gradients of one step, by Welford's running mean and sum
//   of squared deviations (numerically stable in one pass). The variance of a
//   mean of B independent samples is per_sample / B.
//
// Both own their data (a copy of the running sums, or the list of ratios);
// neither keeps a pointer to the caller's buffers.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace intrain {

class SmoothnessEstimator {
 public:
  // One gradient pair at two points. Pairs with ||x1 - x0|| == 0 are skipped.
  void add(std::span<const double> x0, std::span<const double> x1, std::span<const double> g0,
           std::span<const double> g1);
  void add(std::span<const float> x0, std::span<const float> x1, std::span<const float> g0,
           std::span<const float> g1);
  // The same from norms already computed by the caller.
  void add_norms(double dx_norm, double dg_norm);

  std::int64_t count() const { return static_cast<std::int64_t>(ratios_.size()); }
  double max() const;                // 0 if empty
  double quantile(double q) const;   // q in [0, 1], nearest-rank; 0 if empty

 private:
  std::vector<double> ratios_;
};

class GradientNoiseEstimator {
 public:
  explicit GradientNoiseEstimator(std::int64_t dim) : mean_(static_cast<std::size_t>(dim), 0.0) {}

  // One per-sample (or per-micro-batch) gradient of the current step.
  void add(std::span<const double> g);
  void add(std::span<const float> g);

  std::int64_t count() const { return n_; }
  // Trace of the sample covariance: sum_i ||g_i - mean||^2 / (n - 1)
  // (unbiased; needs n >= 2), or / n for the population of an enumerated data set.
  double variance(bool unbiased = true) const;
  // The variance of a mean of `batch` independent draws: variance() / batch.
  double batch_variance(std::int64_t batch) const;
  const std::vector<double>& mean() const { return mean_; }
  void reset();

 private:
  std::vector<double> mean_;
  double m2_ = 0.0;  // sum of squared deviations, summed over coordinates
  std::int64_t n_ = 0;
};

}  // namespace intrain
