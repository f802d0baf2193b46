#include "analysis/estimators.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace intrain {

namespace {

// ||a - b|| in double, for either element type.
template <class T>
double diff_norm(std::span<const T> a, std::span<const T> b) {
  if (a.size() != b.size()) throw std::invalid_argument("SmoothnessEstimator: vectors of different lengths");
  double s = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double d = static_cast<double>(a[i]) - static_cast<double>(b[i]);
    s += d * d;
  }
  return std::sqrt(s);
}

template <class T>
void welford_add(std::vector<double>& mean, double& m2, std::int64_t& n, std::span<const T> g) {
  if (g.size() != mean.size()) {
    throw std::invalid_argument("GradientNoiseEstimator: gradient of length " + std::to_string(g.size()) +
                                ", expected " + std::to_string(mean.size()));
  }
  ++n;
  const double inv = 1.0 / static_cast<double>(n);
  for (std::size_t i = 0; i < g.size(); ++i) {
    const double x = static_cast<double>(g[i]);
    const double d = x - mean[i];
    mean[i] += d * inv;
    m2 += d * (x - mean[i]);
  }
}

}  // namespace

void SmoothnessEstimator::add(std::span<const double> x0, std::span<const double> x1, std::span<const double> g0,
                              std::span<const double> g1) {
  add_norms(diff_norm(x1, x0), diff_norm(g1, g0));
}

void SmoothnessEstimator::add(std::span<const float> x0, std::span<const float> x1, std::span<const float> g0,
                              std::span<const float> g1) {
  add_norms(diff_norm(x1, x0), diff_norm(g1, g0));
}

void SmoothnessEstimator::add_norms(double dx_norm, double dg_norm) {
  if (!(dx_norm > 0.0) || !std::isfinite(dg_norm)) return;
  ratios_.push_back(dg_norm / dx_norm);
}

double SmoothnessEstimator::max() const {
  return ratios_.empty() ? 0.0 : *std::max_element(ratios_.begin(), ratios_.end());
}

double SmoothnessEstimator::quantile(double q) const {
  if (!(q >= 0.0 && q <= 1.0)) throw std::invalid_argument("SmoothnessEstimator::quantile: q must lie in [0, 1]");
  if (ratios_.empty()) return 0.0;
  std::vector<double> r = ratios_;
  // Nearest rank: the smallest value with at least a fraction q of the ratios at or below it.
  const auto rank = static_cast<std::size_t>(std::ceil(q * static_cast<double>(r.size())));
  const std::size_t i = rank == 0 ? 0 : rank - 1;
  std::nth_element(r.begin(), r.begin() + static_cast<std::ptrdiff_t>(i), r.end());
  return r[i];
}

void GradientNoiseEstimator::add(std::span<const double> g) { welford_add(mean_, m2_, n_, g); }
void GradientNoiseEstimator::add(std::span<const float> g) { welford_add(mean_, m2_, n_, g); }

double GradientNoiseEstimator::variance(bool unbiased) const {
  const std::int64_t div = unbiased ? n_ - 1 : n_;
  if (div <= 0) throw std::logic_error("GradientNoiseEstimator: too few gradients for a variance");
  return m2_ / static_cast<double>(div);
}

double GradientNoiseEstimator::batch_variance(std::int64_t batch) const {
  if (batch < 1) throw std::invalid_argument("GradientNoiseEstimator::batch_variance: batch must be >= 1");
  return variance() / static_cast<double>(batch);
}

void GradientNoiseEstimator::reset() {
  std::fill(mean_.begin(), mean_.end(), 0.0);
  m2_ = 0.0;
  n_ = 0;
}

}  // namespace intrain
