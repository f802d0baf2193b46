// The bound's constants estimated from a training run itself, and the bound
// evaluated at every step of that run (docs/convergence.md §8 and §10).
//
// A probe at step k (every K steps) measures, on the training minibatch B_k
// split into m micro-batches:
//   the micro-batch gradients at w_k (the point the gradient is computed at:
//   the weights' values, in integer formats the W cast of the master x_k) and
//   at w_{k+1} (after the update; in integer formats cast with the same
//   random bits as w_k), with the same rounding keys at both points.
// From these:
//   smoothness   ||g1 - g0|| / ||w_{k+1} - w_k||, g0 and g1 the batch
//                gradients (means over the micro-batches): a same-batch gradient
//                difference (SmoothnessEstimator's recommended pairing);
//   sigma2_batch the trace of the covariance of a B-sample gradient, from the
//                spread of the m micro-batch gradients (each of B/m samples):
//                variance over micro-batches / m, averaged over both points;
//   grad_norm2   ||g||^2 of the training gradient of step k, which in
//                expectation is >= ||grad f(x_k)||^2;
//   format terms of step k from the observed per-tensor maxima (FormatScales).
// None of this changes the training run: the probe's passes use their own
// rounding keys, and the caller clears the gradients they leave.
//
// The bound covers SGD and heavy ball without weight decay (analysis/bounds.h);
// for a run with weight decay evaluate_run_bound() says so instead of returning numbers.
#pragma once

#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "analysis/bounds.h"
#include "analysis/estimators.h"
#include "core/precision.h"

namespace intrain {

// One probe: the gradients of the same m micro-batches of one batch at two
// points w0 and w1, computed with the same rounding keys at both (common
// random numbers: the difference then reflects the displacement, not fresh
// rounding noise). Owns copies of what it is given.
class SameBatchProbe {
 public:
  explicit SameBatchProbe(std::int64_t dim) : at0_(dim), at1_(dim) {}
  // Gradient of one micro-batch at w0 (point 0) or at w1 (point 1).
  void add_micro(int point, std::span<const double> g);
  struct Result {
    double smoothness = 0.0;    // ||mean_j g_j(w1) - mean_j g_j(w0)|| / ||w1 - w0||; 0 if w1 == w0
    double sigma2_batch = NAN;  // variance of a full-batch gradient; NaN with fewer than 2 micro-batches
    double grad_norm2 = 0.0;    // ||g||^2 of the training gradient, as passed to finish()
    double dw_norm = 0.0;       // ||w1 - w0||
  };
  // Needs the same number (>= 1) of micro-batches at both points.
  Result finish(std::span<const double> w0, std::span<const double> w1, double grad_norm2) const;
  std::int64_t micro_batches() const { return at0_.count(); }

 private:
  GradientNoiseEstimator at0_, at1_;
};

// The format's part of one step's terms, from the observed scales, before
// the smoothness constant and the lr are known (they are applied by
// scaled_step_terms): eps_abs = eps_g + L * eps_w_per_L, grad_var = var_g.
struct FormatScales {
  double eps_g = 0.0;        // bias of the gradient cast (round-to-nearest G)
  double var_g = 0.0;        // variance of the gradient cast (stochastic G; linear in the gradient)
  double eps_w_per_L = 0.0;  // bias of the value casts per unit of L (W and the 24-bit residual roles)
  double update_r2 = 0.0;    // the update's rounding (SR on the master grid; fp32: RN, 2u(||x|| + lr ||g||))
};
FormatScales max_of(const FormatScales& a, const FormatScales& b);

// One parameter tensor as observed at a probe.
struct TensorScale {
  Format value_format;  // the format its value is cast to (fp32 in a float run)
  double n = 0.0;       // elements
  double grad_max = 0.0, master_max = 0.0;
};
// x_norm, g_norm: ||x|| and ||g|| over all parameters (fp32 update rounding).
// momentum > 0 adds the buffer's rounding, with |v| estimated as |g| / (1 - beta):
// integer SR onto 31 bits (a variance, in var_g), fp32 a bias (in eps_g).
FormatScales format_scales(const Precision& prec, std::span<const TensorScale> tensors, double lr, double x_norm,
                           double g_norm, double momentum = 0.0);
StepTerms scaled_step_terms(const FormatScales& s, double lr, double L);

// Relative gradient bias of the casts not counted term by term (A, and E
// under round-to-nearest): a model, not a bound (docs §10). 0 for fp32.
double format_delta(const Precision& prec);
// The lr the optimizer applies: float(lr) in fp32, a 24-significant-bit
// multiplier in integer formats (optim/sgd.cpp).
double applied_lr(double lr, bool is_float);
// The momentum the optimizer applies: float(beta), or its Q16 constant (optim/sgd.cpp).
double applied_momentum(double beta, bool is_float);

// What one probe row of a run's probe.csv holds.
struct ProbeSample {
  long step = 0;
  double lr = 0.0, train_loss = 0.0;
  SameBatchProbe::Result measured;
  double master_step_norm = 0.0;  // ||x_{k+1} - x_k|| of the master (information only)
  double grad_max = 0.0, master_max = 0.0;  // largest over tensors (for `intrain bound --from-run`)
  FormatScales scales;
};

// probe.csv: one row per probe, columns named by probe_csv_header().
std::string probe_csv_header();
std::string probe_csv_row(const ProbeSample& s);
// Reads probe.csv; rows cut short by a kill are skipped. Throws naming the
// file if it is missing or its header differs.
std::vector<ProbeSample> read_probe_csv(const std::filesystem::path& p);

struct RunConstants {
  double L = 0.0;       // the L the bound uses: max(L_own, L_floor)
  double L_own = 0.0;   // max over this run's probes of the same-batch smoothness ratio
  double L_floor = 0.0; // an estimate from elsewhere (the fp32 run at the same seed; 0: none)
  double L_q90 = 0.0;   // its 0.9 quantile (information)
  double sigma2 = 0.0;  // max over probes of sigma2_batch
  double gap0 = 0.0;    // f(x_0) - f_inf: the training loss of step 0 (cross-entropy >= 0, f_inf = 0)
  double delta = 0.0;   // format_delta
  double grad_max = 0.0, master_max = 0.0;  // largest over probes
  int probes = 0;
};
// L_floor: a smoothness estimate of the same loss from another trajectory.
// Smoothness belongs to f, not to the format that computes its gradient, and
// every trajectory estimate errs low (it sees only the pairs it visits; an
// integer run's late updates are below a grid step, docs/convergence.md §10),
// so the larger of the two is the better estimate.
RunConstants estimate_constants(std::span<const ProbeSample> probes, const Precision& prec, double L_floor = 0.0);

// The bound of a finished run, evaluated at every step.
struct RunBound {
  std::string status;          // "evaluated", or "n/a (weight decay)", "n/a (no probe)"
  std::string optimizer;       // "sgd" or "heavy ball" (the bound evaluated, analysis/bounds.h)
  double momentum = 0.0;       // the beta the optimizer applied (its Q16 constant in integer runs)
  RunConstants constants;
  std::vector<double> bound;   // K = 1..steps: bound on the weighted mean of E||grad f(x_k)||^2, k < K
  std::vector<double> measured;  // the same weighted mean of the probes' ||g0||^2 (NaN before the first probe)
  bool held = false;           // measured <= bound at every step with a measurement
  long first_violation = -1;   // the first K where it did not hold
  bool vacuous = false;        // final bound >= 2 L gap0, what smoothness alone gives (docs §10)
  double final_bound = NAN, final_measured = NAN;
  nlohmann::json summary() const;  // status, constants, held, vacuous, final values
};
// lr_per_step: the scheduled lr of every step 0..steps-1 (applied_lr is taken here).
// momentum 0: SgdBound::gradient_norm; momentum > 0: heavy_ball_gradient_norm.
RunBound evaluate_run_bound(std::span<const ProbeSample> probes, std::span<const double> lr_per_step,
                            const Precision& prec, double momentum, double weight_decay, double L_floor = 0.0);

// The same for a finished probed run in `run_dir` (its probe.csv), again, with
// an L floor: what `intrain ablate` does for an integer cell with its fp32
// cell's L. Throws naming the file if probe.csv is missing or malformed.
RunBound evaluate_run_bound(const std::filesystem::path& run_dir, std::span<const double> lr_per_step,
                            const Precision& prec, double momentum, double weight_decay, double L_floor);

}  // namespace intrain
