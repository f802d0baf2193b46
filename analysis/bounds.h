// Upper bounds on the progress of SGD whose gradient is computed in a
// low-precision format and whose update is rounded onto a grid.
// The derivation, every assumption and its source: docs/convergence.md.
//
// The model (SGD; heavy ball below, heavy_ball_gradient_norm):
//   x_{k+1} = Q(x_k - a_k * gh_k),   gh_k = gt_k + e_k,
//   gt_k    the stochastic gradient: E[gt|x] = grad f(x),
//           E||gt - grad f||^2 <= sigma2 + noise_grad * ||grad f||^2 + noise_gap * (f(x) - f*);
//   e_k     the format's gradient error: a bias part with
//           ||e_bias|| <= delta * ||gt|| + eps_abs_k (round-to-nearest casts),
//           plus a part with mean zero given the past and E||e_var||^2 <= grad_var_k
//           (stochastic-rounding casts);
//   Q       the update's rounding: stochastic (E[r] = 0, E||r||^2 <= update_r2_k) or
//           nearest (||r||^2 <= update_r2_k, any sign, worst case).
// Each step gives E f(x_{k+1}) - f* <= rho_k (E f(x_k) - f*) + N_k (docs/convergence.md §3-5).
//
// Units: every quantity is in the units of the objective f and of x (not of
// an integer mantissa). The caller converts grids with format_grid().
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "core/format.h"

namespace intrain {

// Constants of the problem and of the stochastic gradient (assumptions A1-A3).
// Invariants (checked by SgdBound): L > 0; 0 <= mu <= L; gap0 >= 0; every
// noise term >= 0; 0 <= delta < 1.
struct ProblemConstants {
  double L = 0.0;           // smoothness of f
  double mu = 0.0;          // PL (or strong convexity) constant; 0: non-convex, gradient-norm bound only
  double gap0 = 0.0;        // f(x_0) - f* (PL), or f(x_0) - f_inf with f_inf <= inf f (non-convex)
  double sigma2 = 0.0;      // gradient noise at the optimum (Bottou et al.'s M)
  double noise_grad = 0.0;  // growth of the noise with ||grad f||^2 (Bottou et al.'s M_V)
  double noise_gap = 0.0;   // growth of the noise with f - f* (expected smoothness, Gower et al.)
  double delta = 0.0;       // relative bias of the computed gradient
};

// What one step contributes. All >= 0.
struct StepTerms {
  double lr = 0.0;         // the step size actually applied (after the optimizer's own rounding of lr)
  double eps_abs = 0.0;    // absolute bias of the computed gradient (round-to-nearest casts)
  double grad_var = 0.0;   // variance of the mean-zero gradient rounding (stochastic casts)
  double update_r2 = 0.0;  // SR: E||r||^2 of the update rounding; RN: max ||r||^2
};

// Free parameters of Young's inequality in the derivation. Every choice gives
// a valid one-step inequality, so SgdBound picks, at every step, the one of a
// list that gives the smallest bound (docs/convergence.md §6).
struct Tuning {
  double eps1 = 0.5;  // splits the delta-bias term (used when delta > 0)
  double eps2 = 0.5;  // splits the eps_abs term (used when eps_abs > 0)
  double zeta = 1.0;  // ||gt + e||^2 <= (1+zeta)||gt||^2 + (1+1/zeta)||e||^2 (when eps_abs > 0)
  double beta = 0.5;  // RN update: grad f . r <= (a beta/2)||grad f||^2 + ||r||^2 / (2 a beta)
  double eta = 1.0;   // RN update: ||a gh - r||^2 <= (1+eta) a^2 ||gh||^2 + (1+1/eta) ||r||^2
};
std::vector<Tuning> default_tunings();
// Heavy ball's extra Young parameter tau: |D . gh| <= ||D||^2 / (2 tau) + tau ||gh||^2 / 2,
// D = grad f(z) - grad f(x) the drift of the gradient (docs §6b). Log-spaced:
// the best tau grows with L * c_k / (1 - beta), from ~1e-2 (convex test) to ~1e2 (GPT).
std::vector<double> default_taus();

// The gradient inequalities of one step (docs §3), with F = f(x) - f*:
//   (i)  E[grad f . gh] >= a ||grad f||^2 - b - bF F
//   (ii) E||gh||^2      <= m ||grad f||^2 + q F + s
struct GradientConstants {
  double a = 1.0, b = 0.0, bF = 0.0, m = 1.0, q = 0.0, s = 0.0;
};

// One step's constants: with F = E f(x) - f*,
//   E f(x+) - f* <= F - lr * c * E||grad f||^2 + kappa * F + N.
struct StepConstants {
  double c = 0.0, kappa = 0.0, N = 0.0;
};

// One evaluated step of a bound.
struct BoundPoint {
  long step = 0;                 // PL: the bound on E f(x_step) - f*; gradient norm: over x_0..x_{step-1}
  double value = 0.0;            // the bound (+inf where no bound follows)
  double log10_transient = 0.0;  // PL: log10 of gap0 * prod rho (the decaying part; far below double's range
                                 // after many steps, hence evaluated in multiprecision); -inf if gap0 = 0.
                                 // Non-convex: log10(1 / P_K), P_K the product of the growth factors.
  double noise = 0.0;            // PL: the accumulated floor part sum_j N_j prod_{i>j} rho_i;
                                 // non-convex: sum_k N_k / P_{k+1}
  double log_weight = 0.0;       // non-convex: ln w_{step-1} = ln(lr c+ / P_step), the weight of
                                 // E||grad f(x_{step-1})||^2 in the mean the bound is on (-inf if 0);
                                 // a log because P can leave double's range. PL: unused (0).
};

enum class Arithmetic { Double, Multiprecision };

class SgdBound {
 public:
  // Throws std::invalid_argument naming the bad constant.
  SgdBound(ProblemConstants pc, Rounding update_rounding, std::vector<Tuning> tunings = default_tunings());

  // PL / strongly convex (mu > 0): bounds on E f(x_k) - f* for k = 0..steps.size().
  // Pointwise minimum over the tunings. Throws if mu == 0.
  std::vector<BoundPoint> suboptimality(std::span<const StepTerms> steps,
                                        Arithmetic arith = Arithmetic::Multiprecision) const;

  // L-smooth, possibly non-convex: for K = 1..steps.size(), a bound on the
  // weighted mean sum_{k<K} w_k E||grad f(x_k)||^2 / sum w_k (w_k >= 0, docs
  // §6), hence on min_{k<K} E||grad f(x_k)||^2. With a constant lr and no
  // noise_gap it is the plain average.
  std::vector<BoundPoint> gradient_norm(std::span<const StepTerms> steps,
                                        Arithmetic arith = Arithmetic::Multiprecision) const;

  // Heavy ball without weight decay (optim/sgd.h with weight_decay 0):
  //   v_{k+1} = beta v_k + gh_k + s_k,  x_{k+1} = Q(x_k - a_k v_{k+1}),  v_0 = 0,
  // s_k the rounding of the buffer: mean zero (integer SR, counted in grad_var)
  // or a bias (fp32, counted in eps_abs). For K = 1..steps.size() a bound on the
  // weighted mean sum_{k<K} w_k E||grad f(x_k)||^2 / sum w_k; +inf from the
  // first step with w_k < 0 on (a step too long for the bound). One tuning for
  // the whole schedule (the one with the smallest final bound), because a
  // step's tuning enters the weights of the steps before it. Needs
  // noise_gap = 0, or mu > 0 (then PL folds noise_gap into noise_grad).
  // With beta = 0 and one tuning it is gradient_norm() (tested). Double
  // arithmetic suffices: there is no product over steps, only sums of
  // nonnegative terms and the decaying beta^i.
  std::vector<BoundPoint> heavy_ball_gradient_norm(std::span<const StepTerms> steps, double beta,
                                                   std::span<const double> taus = default_taus()) const;

  // RN-A (round-to-nearest update) or the SR step, for one tuning (docs §4-5).
  StepConstants step_constants(const StepTerms& t, const Tuning& tu) const;
  // RN-B (docs §5b) with Young parameter eta (+inf: the limit without variance).
  // Valid only for an RN update, delta = 0 and lr <= 1/L; step_candidates checks that.
  StepConstants rn_b_constants(const StepTerms& t, double eta) const;
  // Every one-step inequality the recursions choose from: step_constants for
  // each tuning, and for an RN update (where RN-B applies) the RN-B ones.
  std::vector<StepConstants> step_candidates(const StepTerms& t) const;
  GradientConstants gradient_constants(const StepTerms& t, const Tuning& tu) const;

  const ProblemConstants& constants() const { return pc_; }
  Rounding update_rounding() const { return rounding_; }

 private:
  ProblemConstants pc_;
  Rounding rounding_;
  std::vector<Tuning> tunings_;
  std::vector<double> etas_;  // the distinct etas of tunings_ (RN-B's candidates)
};

// ---- closed forms (constant step), for tests and for a quick reading ----

// rho^k F0 + N (1 - rho^k) / (1 - rho), in double.
double pl_closed_form(double rho, double N, double F0, long k);

// ---- format constants ----

// The grid step of a cast of values with max |x| = observed_max to format f:
// fixed point by the maximum (quantize.h's rule): 2^exponent_for_max; fp32: the
// spacing of floats at observed_max, 2^(ilogb(max) - 23). 0 if observed_max == 0
// (an all-zero tensor is cast exactly).
double format_grid(const Format& f, double observed_max);

// Unit roundoff: fp32 2^-24 (relative to each value); fixed point 1/qmax
// (relative to the tensor's maximum: |error| <= max|x| / qmax under RN).
double unit_roundoff(const Format& f);

// Error of rounding n values onto a grid of step `grid`:
// RN: ||e|| <= sqrt(n) grid / 2 (a bias, any sign); SR: mean zero, E||e||^2 <= n grid^2 / 4.
struct CastError {
  double bias = 0.0;
  double variance = 0.0;
};
CastError cast_error(Rounding r, double n, double grid);

// One cast on the way to the computed gradient, as observed in a step.
// `gain` maps the cast's error vector into the gradient: ||e_grad|| <= gain ||e_cast||
// (1 for the gradient's own cast; ||X^T||/B for a residual cast; L_B for the
// weights of a quadratic). `linear`: the gradient is affine in this cast's
// output, so a stochastic rounding stays mean zero in the gradient (true for
// the error and gradient casts of any model, and for the weights of a
// quadratic; false for the weights and activations of a nonlinear model,
// whose SR error is then counted as a bias of up to gain * sqrt(n) * grid).
struct CastObservation {
  Format format;
  double n = 0.0;             // elements cast
  double observed_max = 0.0;  // max |value| before the cast
  double gain = 1.0;
  bool linear = true;
};

// The terms of one step: eps_abs and grad_var summed over the casts (by the
// triangle inequality for biases; variances add because each SR error has
// mean zero given everything before it); update_r2 from the update's grid
// over d_update coordinates (fixed point), or pass update_r2 directly.
StepTerms step_terms(double lr, std::span<const CastObservation> casts, Rounding update_rounding, double d_update,
                     double update_grid);

// ---- round-to-nearest stagnation (docs §7) ----

// An RN update onto grid `grid` leaves coordinate i where it is iff
// |lr * gh_i| < grid / 2, and the whole iterate iff lr * ||gh||_inf < grid / 2.
bool rn_update_stagnates(double lr, double grad_inf, double grid);
// The smallest |gh_i| an RN update of step lr still moves: grid / (2 lr).
double rn_move_threshold(double lr, double grid);
// Under PL, a point where RN-SGD with exact gradients is stuck has
// f - f* <= d grid^2 / (8 mu lr^2 (1 - delta)^2).
double rn_stall_level(double d, double grid, double mu, double lr, double delta);

struct StagnationReport {
  long first_step = -1;   // first step whose whole update rounds away (-1: none)
  long stuck_steps = 0;   // how many steps do
  double stall_level = 0.0;  // rn_stall_level at first_step's lr (0 if none)
};
// lr[k] and grad_inf[k] (an estimate or observation of ||gh_k||_inf) per step.
StagnationReport rn_stagnation(std::span<const double> lr, std::span<const double> grad_inf, double grid, double d,
                               double mu, double delta);

}  // namespace intrain
