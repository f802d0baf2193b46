#include "core/adpq.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <vector>

#include "core/gptq.h"

namespace intrain {

SalientRule parse_salient_rule(const std::string& s) {
  if (s == "fraction") return SalientRule::Fraction;
  if (s == "universal") return SalientRule::Universal;
  throw std::invalid_argument("--adpq-rule must be fraction or universal, got '" + s + "'");
}

namespace {

double median_of(std::vector<double> v) {
  const std::size_t h = v.size() / 2;
  std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(h), v.end());
  const double hi = v[h];
  if (v.size() % 2 == 1) return hi;
  return 0.5 * (hi + *std::max_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(h)));
}

// τ of the layer under the chosen rule.
double threshold(std::span<const float> W, const AdpqOptions& opt) {
  const auto n = static_cast<std::int64_t>(W.size());
  if (opt.rule == SalientRule::Universal) {
    std::vector<double> v(W.begin(), W.end());
    const double med = median_of(v);
    for (double& x : v) x = std::abs(x - med);
    const double sigma = 1.4826 * median_of(std::move(v));
    return sigma * std::sqrt(2.0 * std::log(static_cast<double>(n)));
  }
  const auto m = static_cast<std::int64_t>(std::llround(opt.salient_fraction * static_cast<double>(n)));
  if (m <= 0) return std::numeric_limits<double>::infinity();  // nothing salient
  if (m >= n) return 0.0;
  // The (m+1)-th largest magnitude: the largest that is not salient.
  std::vector<double> a(W.size());
  for (std::size_t i = 0; i < W.size(); ++i) a[i] = std::abs(static_cast<double>(W[i]));
  std::nth_element(a.begin(), a.begin() + m, a.end(), std::greater<>());
  return a[static_cast<std::size_t>(m)];
}

}  // namespace

AdpqResult quantize_adpq(std::span<const float> W, std::int64_t K, std::int64_t N, const AdpqOptions& opt) {
  if (static_cast<std::int64_t>(W.size()) != K * N || K < 1 || N < 1) {
    throw std::invalid_argument("quantize_adpq: " + std::to_string(W.size()) + " weights do not fill [" + std::to_string(K) +
                                ", " + std::to_string(N) + "]");
  }
  if (!(opt.salient_fraction >= 0.0 && opt.salient_fraction < 1.0)) {
    throw std::invalid_argument("--salient-fraction must be in [0, 1), got " + std::to_string(opt.salient_fraction));
  }
  if (!(opt.gamma >= 0.0) || !std::isfinite(opt.gamma)) {
    throw std::invalid_argument("--adpq-gamma must be a finite number >= 0, got " + std::to_string(opt.gamma));
  }
  for (float w : W)
    if (!std::isfinite(w)) throw std::invalid_argument("quantize_adpq: the weights hold a NaN or infinity");
  AdpqResult res;
  const double tau = threshold(W, opt);
  res.threshold = tau;
  res.lambda = std::pow(tau, 1.0 + opt.gamma);

  // Salient entries in position order p = n·K + k (column by column), with
  // the fraction rule's ties broken by position: among weights of magnitude
  // exactly τ, none is salient (so exactly the ones strictly above τ are,
  // plus no more than m in all).
  std::vector<float> rest(W.begin(), W.end());
  std::vector<std::uint32_t> pos;
  std::vector<float> u;
  for (std::int64_t n = 0; n < N; ++n) {
    for (std::int64_t k = 0; k < K; ++k) {
      const double w = W[static_cast<std::size_t>(k * N + n)];
      const double a = std::abs(w);
      if (!(a > tau)) continue;
      // u* = sign(w)(|w| − λ/|w|^γ), written as sign(w)·|w|·(1 − (τ/|w|)^(1+γ)) so that
      // nothing overflows for large γ; 0 <= u* < |w|.
      const double shrunk = a * (1.0 - std::pow(tau / a, 1.0 + opt.gamma));
      const float uf = static_cast<float>(std::copysign(shrunk, w));
      pos.push_back(static_cast<std::uint32_t>(n * K + k));
      u.push_back(uf);
      rest[static_cast<std::size_t>(k * N + n)] = static_cast<float>(w - static_cast<double>(uf));
    }
  }
  res.base = quantize_rtn(rest, K, N, opt.bits, opt.group);

  // The salient values, group by group (Gs = opt.group consecutive entries),
  // with the base's scale floor: same min-max rule as every other group.
  const float floor = scale_floor(rest, K, N, opt.bits, opt.group);
  const auto m = static_cast<std::int64_t>(u.size());
  const std::int64_t ng = (m + opt.group - 1) / opt.group;
  std::vector<std::uint8_t> codes(static_cast<std::size_t>(m)), zeros(static_cast<std::size_t>(ng));
  std::vector<float> scales(static_cast<std::size_t>(ng));
  for (std::int64_t g = 0; g < ng; ++g) {
    const std::int64_t j0 = g * opt.group, j1 = std::min(m, j0 + opt.group);
    const GroupParams p = group_params(u.data() + j0, j1 - j0, 1, opt.bits, floor);
    zeros[static_cast<std::size_t>(g)] = static_cast<std::uint8_t>(p.zero);
    scales[static_cast<std::size_t>(g)] = p.scale;
    for (std::int64_t j = j0; j < j1; ++j) codes[static_cast<std::size_t>(j)] = static_cast<std::uint8_t>(quantize_code(u[static_cast<std::size_t>(j)], p, opt.bits));
  }
  res.salient = SalientWeights::pack(K, N, opt.bits, opt.group, pos, codes, zeros, scales);
  return res;
}

}  // namespace intrain
