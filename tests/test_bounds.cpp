// Convergence bounds (analysis/bounds.h), their estimators, and the convex
// sanity problem trained by the integer engine (analysis/convex_problem.h).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <vector>

#include "analysis/bounds.h"
#include "analysis/convex_problem.h"
#include "analysis/estimators.h"
#include "core/quantize.h"
#include "core/rng.h"
#include "experiments/bound.h"

namespace intrain {
namespace {

std::vector<StepTerms> constant_steps(long K, StepTerms t) { return std::vector<StepTerms>(static_cast<std::size_t>(K), t); }

// ---- the bound's arithmetic --------------------------------------------------

// SR update, exact gradients with variance sigma^2: the recursion is
// rho^k F0 + N (1 - rho^k)/(1 - rho), rho = 1 - 2 mu a (1 - L a / 2), N = L a^2 s2 / 2 + L r2 / 2.
// Tolerance 1e-12 relative: the double recursion accumulates ~K * 2^-53.
TEST(Bound, SrConstantStepMatchesClosedForm) {
  ProblemConstants pc{4.0, 1.0, 3.0, 0.7, 0.0, 0.0, 0.0};
  const double a = 1.0 / 8, d = 10, grid = 1.0 / 64;
  StepTerms t{a, 0.0, 0.0, d * grid * grid / 4};
  const SgdBound b(pc, Rounding::Stochastic);
  const auto v = b.suboptimality(constant_steps(400, t), Arithmetic::Double);
  const double rho = 1 - 2 * pc.mu * a * (1 - pc.L * a / 2), N = pc.L * a * a * pc.sigma2 / 2 + pc.L * t.update_r2 / 2;
  for (long k = 0; k <= 400; ++k) {
    EXPECT_NEAR(v[k].value, pl_closed_form(rho, N, pc.gap0, k), 1e-12 * v[k].value) << k;
    // The research note's headline (a <= 1/L): (1 - mu a)^k F0 + L a s2 / (2 mu) + L d grid^2 / (8 mu a).
    const double headline = std::pow(1 - pc.mu * a, k) * pc.gap0 + pc.L * a * pc.sigma2 / (2 * pc.mu) +
                            pc.L * d * grid * grid / (8 * pc.mu * a);
    EXPECT_LE(v[k].value, headline * (1 + 1e-12)) << k;
  }
}

// RN update with one tuning (beta, eta): c = 1 - beta/2 - (1+eta) L a / 2,
// N = (1+eta) L a^2 s2/2 + R^2/(2 a beta) + (1 + 1/eta) L R^2 / 2.
TEST(Bound, RnConstantStepMatchesClosedForm) {
  ProblemConstants pc{2.0, 0.5, 1.0, 0.2, 0.0, 0.0, 0.0};
  const Tuning tu{0.5, 0.5, 1.0, 0.5, 1.0};
  const double a = 1.0 / 16, R2 = 1e-6;
  const SgdBound b(pc, Rounding::Nearest, {tu});
  const auto v = b.suboptimality(constant_steps(300, StepTerms{a, 0.0, 0.0, R2}), Arithmetic::Double);
  const double c = 1 - tu.beta / 2 - (1 + tu.eta) * pc.L * a / 2;
  const double N = (1 + tu.eta) * pc.L * a * a * pc.sigma2 / 2 + R2 / (2 * a * tu.beta) + (1 + 1 / tu.eta) * pc.L * R2 / 2;
  for (long k = 0; k <= 300; ++k) EXPECT_NEAR(v[k].value, pl_closed_form(1 - 2 * pc.mu * a * c, N, pc.gap0, k), 1e-12 * v[k].value);
}

// The multiprecision path against the double path on a range where double
// suffices (varying steps, all terms on): agreement to 1e-12 relative.
TEST(Bound, MultiprecisionMatchesDouble) {
  ProblemConstants pc{3.0, 0.4, 2.5, 0.3, 0.1, 0.2, 0.01};
  std::vector<StepTerms> steps;
  for (int k = 0; k < 600; ++k) steps.push_back(StepTerms{0.05 * (1 + std::cos(k * 0.01)) / 2 + 0.01, 1e-3 * (k % 7), 1e-4, 1e-9});
  for (Rounding r : {Rounding::Stochastic, Rounding::Nearest}) {
    const SgdBound b(pc, r);
    const auto d = b.suboptimality(steps, Arithmetic::Double), m = b.suboptimality(steps, Arithmetic::Multiprecision);
    const auto gd = b.gradient_norm(steps, Arithmetic::Double), gm = b.gradient_norm(steps, Arithmetic::Multiprecision);
    for (std::size_t k = 0; k < d.size(); ++k) EXPECT_NEAR(d[k].value, m[k].value, 1e-12 * m[k].value);
    for (std::size_t k = 0; k < gd.size(); ++k) EXPECT_NEAR(gd[k].value, gm[k].value, 1e-12 * gm[k].value);
  }
}

// gap0 * rho^k beyond double's range: rho = 1/4 over 1000 steps is 1e-602.
// The multiprecision path keeps it (log10 exact to 1e-9); double underflows to 0.
TEST(Bound, TransientBeyondDoubleRange) {
  ProblemConstants pc{1.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0};
  const SgdBound b(pc, Rounding::Stochastic);
  const auto steps = constant_steps(1000, StepTerms{0.5, 0.0, 0.0, 0.0});  // c = 3/4, rho = 1/4
  const auto m = b.suboptimality(steps, Arithmetic::Multiprecision);
  const auto d = b.suboptimality(steps, Arithmetic::Double);
  EXPECT_NEAR(m.back().log10_transient, std::log10(2.0) + 1000 * std::log10(0.25), 1e-9);
  EXPECT_EQ(d.back().log10_transient, -std::numeric_limits<double>::infinity());
}

// Non-convex, constant step: (gap0 + K N) / (K a c) = gap0 / (a c K) + N / (a c); and below the
// research note's SR headline 2 gap0 / (a K) + L a s2 + L d grid^2 / (4 a) for a <= 1/L.
TEST(Bound, NonConvexConstantStepMatchesClosedForm) {
  ProblemConstants pc{5.0, 0.0, 4.0, 0.8, 0.0, 0.0, 0.0};
  const double a = 0.1, d = 1000, grid = std::ldexp(1.0, -24);
  const SgdBound b(pc, Rounding::Stochastic);
  const auto v = b.gradient_norm(constant_steps(500, StepTerms{a, 0.0, 0.0, d * grid * grid / 4}), Arithmetic::Double);
  const double c = 1 - pc.L * a / 2, N = pc.L * a * a * pc.sigma2 / 2 + pc.L * d * grid * grid / 8;
  for (long K = 1; K <= 500; ++K) {
    EXPECT_NEAR(v[K - 1].value, pc.gap0 / (a * c * K) + N / (a * c), 1e-12 * v[K - 1].value);
    EXPECT_LE(v[K - 1].value, 2 * pc.gap0 / (a * K) + pc.L * a * pc.sigma2 + pc.L * d * grid * grid / (4 * a));
  }
}

// Heavy ball with beta = 0 is SGD: z_k = x_k, no drift term, and one tuning
// gives the momentum-free recursion exactly (SR and RN updates, format terms on).
TEST(Bound, HeavyBallWithoutMomentumIsTheSgdBound) {
  ProblemConstants pc{5.0, 0.0, 4.0, 0.8, 0.1, 0.0, 0.01};
  std::vector<StepTerms> steps;
  for (int k = 0; k < 200; ++k) steps.push_back(StepTerms{0.005 + 0.00002 * k, 1e-3 * (1 + k % 3), 2e-4, 1e-9});
  for (Rounding r : {Rounding::Stochastic, Rounding::Nearest}) {
    const SgdBound b(pc, r, {Tuning{}});
    const auto hb = b.heavy_ball_gradient_norm(steps, 0.0);
    const auto sgd = b.gradient_norm(steps, Arithmetic::Double);
    for (std::size_t k = 0; k < steps.size(); ++k) {
      ASSERT_NEAR(hb[k].value, sgd[k].value, 1e-12 * sgd[k].value) << "step " << k;
      ASSERT_NEAR(hb[k].log_weight, sgd[k].log_weight, 1e-12) << "step " << k;
    }
  }
}

// Momentum costs: at the same schedule the heavy-ball bound is above the
// momentum-free one at the effective step lr / (1 - beta); a step too long for
// the drift term (L gamma large) gives no bound rather than a wrong one.
TEST(Bound, HeavyBallNeedsShortEffectiveSteps) {
  ProblemConstants pc{4.0, 0.0, 2.0, 0.5, 0.0, 0.0, 0.0};
  const double beta = 0.5, a = 0.01;
  const SgdBound b(pc, Rounding::Stochastic);
  const auto hb = b.heavy_ball_gradient_norm(constant_steps(400, StepTerms{a, 0.0, 0.0, 0.0}), beta);
  const auto sgd = b.gradient_norm(constant_steps(400, StepTerms{a / (1 - beta), 0.0, 0.0, 0.0}), Arithmetic::Double);
  EXPECT_TRUE(std::isfinite(hb.back().value));
  EXPECT_GT(hb.back().value, sgd.back().value);
  EXPECT_LT(hb.back().value, 2.0 * sgd.back().value);  // at L gamma = 0.08 the drift costs little
  const auto long_steps = b.heavy_ball_gradient_norm(constant_steps(50, StepTerms{0.3, 0.0, 0.0, 0.0}), 0.9);
  EXPECT_EQ(long_steps.back().value, std::numeric_limits<double>::infinity());
  EXPECT_THROW(b.heavy_ball_gradient_norm(constant_steps(5, StepTerms{a, 0.0, 0.0, 0.0}), 1.0), std::invalid_argument);
  // noise_gap without mu cannot be folded into the gradient-norm bound.
  EXPECT_THROW(SgdBound(ProblemConstants{4.0, 0.0, 2.0, 0.5, 0.0, 1.0, 0.0}, Rounding::Stochastic)
                   .heavy_ball_gradient_norm(constant_steps(5, StepTerms{a, 0.0, 0.0, 0.0}), beta),
               std::invalid_argument);
}

// A step too long for the descent lemma (c < 0) still gives a finite bound,
// through ||grad f||^2 <= 2 L (f - f*), and it grows.
TEST(Bound, LongStepGrowsButStaysFinite) {
  ProblemConstants pc{1.0, 0.5, 1.0, 0.0, 0.0, 0.0, 0.0};
  const auto v = SgdBound(pc, Rounding::Stochastic).suboptimality(constant_steps(3, StepTerms{3.0, 0.0, 0.0, 0.0}));
  EXPECT_TRUE(std::isfinite(v[3].value));
  EXPECT_GT(v[3].value, v[0].value);
}

TEST(Bound, RejectsBadConstants) {
  EXPECT_THROW(SgdBound(ProblemConstants{0.0, 0.0, 1.0}, Rounding::Stochastic), std::invalid_argument);
  EXPECT_THROW(SgdBound(ProblemConstants{1.0, 2.0, 1.0}, Rounding::Stochastic), std::invalid_argument);
  EXPECT_THROW(SgdBound(ProblemConstants{1.0, 0.0, 1.0}, Rounding::Stochastic).suboptimality({}),
               std::invalid_argument);
}

// ---- format constants ---------------------------------------------------------

// format_grid is the grid quantize() actually uses.
TEST(Bound, FormatGridIsTheQuantizeGrid) {
  for (int bits : {4, 8, 12, 16}) {
    for (double mx : {1.0, 0.3, 37.5, 1e-5}) {
      const Format f = Format::fixed(bits);
      const Tensor t = quantize(std::vector<float>{static_cast<float>(mx), static_cast<float>(-mx / 3)}, {2}, f);
      EXPECT_EQ(format_grid(f, static_cast<float>(mx)), std::ldexp(1.0, t.exponent())) << bits << " " << mx;
      EXPECT_LE(format_grid(f, mx) / 2, mx * unit_roundoff(f)) << "RN error within u * max";
    }
  }
  EXPECT_EQ(format_grid(Format::fp32(), 1.0), std::ldexp(1.0, -23));
  EXPECT_EQ(format_grid(Format::fixed(8), 0.0), 0.0);
  EXPECT_EQ(cast_error(Rounding::Nearest, 16, 0.5).bias, 1.0);
  EXPECT_EQ(cast_error(Rounding::Stochastic, 16, 0.5).variance, 1.0);
}

// ---- RN stagnation ---------------------------------------------------------------

// Gradient descent with exact gradients on f = (1/2) sum h_i x_i^2, each step
// rounded to nearest onto the grid: it stops moving exactly when
// lr ||grad||_inf < grid / 2, and there f - f* <= d grid^2 / (8 mu lr^2).
TEST(Bound, RnGradientDescentStagnatesWhereTheoryPredicts) {
  // Curvatures that are not dyadic, so that no |lr g_i| lands exactly on grid / 2 (a tie).
  const std::vector<double> h{1.1, 1.7, 3.3, 0.55};
  const double mu = 0.55, lr = 1.0 / 8, grid = 1.0 / 64;
  std::vector<double> x{3.0, -2.0, 1.0, 5.0};
  std::vector<double> lrs, ginf;
  long stuck_at = -1;
  for (long k = 0; k < 2000 && stuck_at < 0; ++k) {
    double gi = 0;
    std::vector<double> next = x;
    for (std::size_t i = 0; i < x.size(); ++i) {
      gi = std::max(gi, std::abs(h[i] * x[i]));
      next[i] = grid * std::nearbyint((x[i] - lr * h[i] * x[i]) / grid);
    }
    lrs.push_back(lr);
    ginf.push_back(gi);
    EXPECT_EQ(next == x, rn_update_stagnates(lr, gi, grid)) << k;
    if (next == x) stuck_at = k;
    x = next;
  }
  ASSERT_GE(stuck_at, 0);
  double f = 0;
  for (std::size_t i = 0; i < x.size(); ++i) f += 0.5 * h[i] * x[i] * x[i];
  EXPECT_GT(f, 0.0) << "stuck away from the optimum, as RN must";
  EXPECT_LE(f, rn_stall_level(4, grid, mu, lr, 0.0));
  const StagnationReport rep = rn_stagnation(lrs, ginf, grid, 4, mu, 0.0);
  EXPECT_EQ(rep.first_step, stuck_at);
  EXPECT_EQ(rep.stall_level, rn_stall_level(4, grid, mu, lr, 0.0));
}

// RN-A alone: the PL recursion over the tunings' RN-A steps, without RN-B.
double rn_a_final(const SgdBound& b, const StepTerms& t, long K) {
  double B = b.constants().gap0;
  for (long k = 0; k < K; ++k) {
    double best = std::numeric_limits<double>::infinity();
    for (const Tuning& tu : default_tunings()) {
      const StepConstants s = b.step_constants(t, tu);
      best = std::min(best, (1 - 2 * b.constants().mu * t.lr * s.c + s.kappa) * B + s.N);
    }
    B = best;
  }
  return B;
}

// RN-B (docs §5b), alpha <= 1/L, delta = 0: the recursion is never above the
// research note's headline (1 - mu a)^k F0 + (sigma + R/a)^2 / (2 mu), and
// with sigma = 0 its floor R^2 / (2 mu a^2) is the stall level d grid^2 / (8 mu a^2)
// of an exact-gradient RN run. RN-A's floor is at least R^2 / (4 mu a^2 beta (1 - beta/2)),
// 4/3 of that for the grid's largest beta = 1/2.
// Tolerance 1e-12 relative: a few thousand double operations.
TEST(Bound, RnBMatchesItsHeadlineAndTheStallLevel) {
  const double a = 1.0 / 8, d = 4, grid = 1.0 / 64, R2 = d * grid * grid / 4;
  const StepTerms t{a, 0.0, 0.0, R2};
  for (double sigma2 : {0.0, 0.3}) {
    const ProblemConstants pc{3.3, 0.55, 2.0, sigma2, 0.0, 0.0, 0.0};
    const SgdBound b(pc, Rounding::Nearest);
    const auto v = b.suboptimality(constant_steps(4000, t), Arithmetic::Double);
    const double floor = std::pow(std::sqrt(sigma2) + std::sqrt(R2) / a, 2) / (2 * pc.mu);
    for (long k = 0; k <= 4000; ++k)
      EXPECT_LE(v[k].value, (std::pow(1 - pc.mu * a, k) * pc.gap0 + floor) * (1 + 1e-12)) << sigma2 << " " << k;
    if (sigma2 == 0.0) {
      EXPECT_NEAR(v.back().value, rn_stall_level(d, grid, pc.mu, a, 0.0), 1e-12 * v.back().value);
      EXPECT_GE(rn_a_final(b, t, 4000), 4.0 / 3.0 * v.back().value);
    }
  }
  // RN-B is offered only where it was derived: an RN update, delta = 0, lr <= 1/L.
  const std::size_t n_tunings = default_tunings().size();
  const ProblemConstants pc{3.3, 0.55, 2.0, 0.3, 0.0, 0.0, 0.0};
  EXPECT_GT(SgdBound(pc, Rounding::Nearest).step_candidates(t).size(), n_tunings);
  EXPECT_EQ(SgdBound(pc, Rounding::Nearest).step_candidates(StepTerms{0.31, 0.0, 0.0, R2}).size(), n_tunings);
  EXPECT_EQ(SgdBound(pc, Rounding::Stochastic).step_candidates(t).size(), n_tunings);
  ProblemConstants biased = pc;
  biased.delta = 0.01;
  EXPECT_EQ(SgdBound(biased, Rounding::Nearest).step_candidates(t).size(), n_tunings);
}

// The RN-rounded gradient descent of RnGradientDescentStagnatesWhereTheoryPredicts
// (exact gradients, update rounded to nearest, ||r||^2 <= d grid^2 / 4) stays
// under the PL bound at every step, including after it has stalled.
TEST(Bound, RnGradientDescentStaysUnderTheRnBound) {
  const std::vector<double> h{1.1, 1.7, 3.3, 0.55};
  const double lr = 1.0 / 8, grid = 1.0 / 64, d = 4;
  std::vector<double> x{3.0, -2.0, 1.0, 5.0};
  auto f = [&] {
    double s = 0;
    for (std::size_t i = 0; i < x.size(); ++i) s += 0.5 * h[i] * x[i] * x[i];
    return s;
  };
  const long K = 400;
  const SgdBound b(ProblemConstants{3.3, 0.55, f(), 0.0, 0.0, 0.0, 0.0}, Rounding::Nearest);
  const auto v = b.suboptimality(constant_steps(K, StepTerms{lr, 0.0, 0.0, d * grid * grid / 4}));
  for (long k = 0; k <= K; ++k) {
    ASSERT_LE(f(), v[static_cast<std::size_t>(k)].value) << k;
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = grid * std::nearbyint((x[i] - lr * h[i] * x[i]) / grid);
  }
}

// ---- estimators ------------------------------------------------------------------

// Full gradients of f = (1/2) sum s_j^2 x_j^2 at random pairs of points: every
// ratio ||H dx|| / ||dx|| lies in [mu, L] (up to rounding, 1e-12 relative),
// and the maximum of 400 ratios comes within 10% of L (d = 8, half of the
// spectrum at L).
TEST(Estimators, SmoothnessOnAQuadratic) {
  const std::vector<double> s2{1, 1, 1, 1, 4, 4, 4, 4};
  SmoothnessEstimator est;
  const RngKey key(3, 4);
  std::uint32_t c = 0;
  for (int p = 0; p < 400; ++p) {
    std::vector<double> x0(8), x1(8), g0(8), g1(8);
    for (int j = 0; j < 8; ++j) {
      x0[j] = std::ldexp(static_cast<double>(key.bits(c++)), -31) - 1;
      x1[j] = std::ldexp(static_cast<double>(key.bits(c++)), -31) - 1;
      g0[j] = s2[j] * x0[j];
      g1[j] = s2[j] * x1[j];
    }
    est.add(x0, x1, g0, g1);
  }
  EXPECT_EQ(est.count(), 400);
  EXPECT_LE(est.max(), 4.0 * (1 + 1e-12));
  EXPECT_GE(est.quantile(0.0), 1.0 * (1 - 1e-12));
  EXPECT_GE(est.max(), 0.9 * 4.0);
  EXPECT_EQ(est.quantile(1.0), est.max());
  EXPECT_LE(est.quantile(0.9), est.max());
}

// Per-sample gradients of the least-squares problem over the whole data set:
// at x* the population variance is sigma*^2 exactly (the mean is grad f(x*) = 0);
// at another point it matches a direct two-pass computation. 1e-10 relative.
TEST(Estimators, GradientNoiseOnLeastSquares) {
  const LeastSquares ls = make_least_squares(LeastSquaresConfig{});
  for (int at_star = 0; at_star < 2; ++at_star) {
    std::vector<double> x = ls.x_star;
    if (!at_star) {
      x[0] += 0.5;
      x[5] -= 0.25;
    }
    GradientNoiseEstimator est(ls.d);
    std::vector<std::vector<double>> all;
    for (int i = 0; i < ls.n; ++i) {
      double r = -ls.b[i];
      for (int j = 0; j < ls.d; ++j) r += ls.A[i * ls.d + j] * x[j];
      std::vector<double> g(ls.d);
      for (int j = 0; j < ls.d; ++j) g[j] = ls.A[i * ls.d + j] * r;
      est.add(g);
      all.push_back(g);
    }
    std::vector<double> mean(ls.d, 0.0);
    for (const auto& g : all)
      for (int j = 0; j < ls.d; ++j) mean[j] += g[j] / ls.n;
    double var = 0;
    for (const auto& g : all)
      for (int j = 0; j < ls.d; ++j) var += (g[j] - mean[j]) * (g[j] - mean[j]) / ls.n;
    EXPECT_NEAR(est.variance(false), var, 1e-10 * var);
    if (at_star) {
      EXPECT_NEAR(est.variance(false), ls.sigma_star2, 1e-10 * ls.sigma_star2);
    }
    EXPECT_NEAR(est.batch_variance(32), est.variance() / 32, 1e-15 * var);
  }
}

// ---- the convex sanity problem -------------------------------------------------

TEST(ConvexProblem, DesignHasTheStatedConstants) {
  const LeastSquares ls = make_least_squares(LeastSquaresConfig{});
  EXPECT_EQ(ls.L, 4.0);
  EXPECT_EQ(ls.mu, 1.0);
  EXPECT_EQ(ls.L_max, 20.0);
  // A^T A = n diag(s^2) exactly (integer entries, exact in double).
  for (int j = 0; j < ls.d; ++j)
    for (int l = 0; l < ls.d; ++l) {
      double t = 0;
      for (int i = 0; i < ls.n; ++i) t += double(ls.A[i * ls.d + j]) * ls.A[i * ls.d + l];
      EXPECT_EQ(t, j == l ? ls.n * ls.s[j] * ls.s[j] : 0.0);
    }
  // f(x) - f* by the identity against f computed from the residual, at x = 0 (1e-12 relative).
  double rss = 0;
  for (int i = 0; i < ls.n; ++i) rss += ls.b[i] * ls.b[i];
  EXPECT_NEAR(ls.suboptimality(std::vector<double>(ls.d, 0.0)), rss / (2 * ls.n) - ls.f_star, 1e-12 * rss);
}

// The acceptance test: trained by the engine (matmuls through core/matmul.h,
// the update through optim/sgd.h) in each format and both rounding modes, the
// replicate mean of f(x_k) - f* stays under the bound at every step.
TEST(ConvexProblem, SuboptimalityStaysUnderTheBound) {
  const LeastSquares ls = make_least_squares(LeastSquaresConfig{});
  const ConvexRunConfig cfg;
  std::printf("%-14s %12s %12s %12s %10s %10s\n", "format", "F0", "measured", "bound", "max ratio", "flushed");
  for (const char* spec : {"fp32", "int16", "int12", "int8", "int4"}) {
    for (Rounding r : {Rounding::Stochastic, Rounding::Nearest}) {
      if (std::string(spec) == "fp32" && r == Rounding::Nearest) continue;  // fp32 has one rounding
      const ConvexRun run = run_least_squares(ls, Precision::parse(spec, r), cfg);
      EXPECT_EQ(run.saturated, 0) << run.format;
      for (std::size_t k = 0; k < run.suboptimality.size(); ++k) {
        ASSERT_LE(run.suboptimality[k], run.bound[k].value) << run.format << " step " << k;
      }
      std::printf("%-14s %12.4e %12.4e %12.4e %10.3f %10.4f\n", run.format.c_str(), run.suboptimality[0],
                  run.suboptimality.back(), run.bound.back().value, run.max_ratio, run.flushed_fraction);
    }
  }
}

// Heavy ball on the same problem (optim/sgd.h with momentum, the buffer
// requantized to 31 bits with SR, or float): the weighted mean of the
// replicates' exact ||grad f(x_k)||^2 stays under heavy_ball_gradient_norm at
// every K, in each format and both roundings, at beta 0.5 and 0.9.
TEST(ConvexProblem, HeavyBallGradientNormStaysUnderTheBound) {
  const LeastSquares ls = make_least_squares(LeastSquaresConfig{});
  std::printf("%-14s %5s %12s %12s %12s %10s\n", "format", "beta", "||g0||^2", "measured", "bound", "max ratio");
  for (double beta : {0.5, 0.9}) {
    ConvexRunConfig cfg;
    cfg.momentum = beta;
    // gamma = lr / (1 - beta) = 1/32 and 1/410: heavy ball's drift term asks
    // for L m beta lr / (1 - beta)^2 below about 1/2 (docs §6b).
    cfg.lr = beta == 0.5 ? 1.0 / 64 : 1.0 / 4096;
    for (const char* spec : {"fp32", "int16", "int8", "int4"}) {
      for (Rounding r : {Rounding::Stochastic, Rounding::Nearest}) {
        if (std::string(spec) == "fp32" && r == Rounding::Nearest) continue;
        const ConvexRun run = run_least_squares(ls, Precision::parse(spec, r), cfg);
        EXPECT_EQ(run.saturated, 0) << run.format;
        ASSERT_EQ(run.hb_bound.size(), run.grad_norm2.size());
        ASSERT_TRUE(run.bound.empty()) << "the PL bound is not derived for heavy ball";
        for (std::size_t K = 0; K < run.hb_bound.size(); ++K) {
          ASSERT_LE(run.hb_measured[K], run.hb_bound[K].value) << run.format << " beta " << beta << " K " << K + 1;
        }
        EXPECT_TRUE(std::isfinite(run.hb_bound.back().value)) << run.format;
        std::printf("%-14s %5.2f %12.4e %12.4e %12.4e %10.3f\n", run.format.c_str(), beta, run.grad_norm2[0],
                    run.hb_measured.back(), run.hb_bound.back().value, run.max_ratio);
      }
    }
  }
}

// ---- intrain bound ---------------------------------------------------------------

TEST(BoundCommand, PlansARunAndRejectsMissingConstants) {
  BoundOptions o;
  o.format = "int8";
  o.steps = 200;
  o.warmup = 20;
  o.log_every = 50;
  o.L = 20;
  o.sigma2 = 1;
  o.grad_max = 0.01;
  o.weight_max = 0.5;
  o.params = 1000;
  o.mu = 0.01;
  o.momentum = 0.0;  // the PL bound is momentum-free only
  const nlohmann::json j = run_bound(o);
  ASSERT_EQ(j["steps"].size(), 4u);
  EXPECT_EQ(j["steps"][3]["step"], 200);
  EXPECT_GT(j["steps"][3]["suboptimality_bound"].get<double>(), 0.0);
  BoundOptions bad = o;
  bad.L = -1;
  EXPECT_THROW(run_bound(bad), std::invalid_argument);
  bad = o;
  bad.grad_max = -1;
  EXPECT_THROW(run_bound(bad), std::invalid_argument);
  bad = o;
  bad.warmup = 500;
  EXPECT_THROW(run_bound(bad), std::invalid_argument);
  bad = o;
  bad.momentum = 0.9;  // heavy ball has no PL bound here: refused rather than evaluated
  EXPECT_THROW(run_bound(bad), std::invalid_argument);
  BoundOptions hb = o;
  hb.mu = 0.0;
  hb.momentum = 0.9;
  hb.lr = 1e-4;  // short enough for the drift term at L = 20
  const nlohmann::json jh = run_bound(hb);
  EXPECT_EQ(jh["optimizer"], "heavy ball");
  EXPECT_TRUE(std::isfinite(jh["steps"][3]["grad_norm2_bound"].get<double>()));
}

}  // namespace
}  // namespace intrain
