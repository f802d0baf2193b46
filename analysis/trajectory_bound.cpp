#include "analysis/trajectory_bound.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>
#include <sstream>
#include <stdexcept>

#include "layers/param.h"

namespace intrain {

namespace fs = std::filesystem;

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

double norm_of_difference(std::span<const double> a, std::span<const double> b) {
  double s = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) s += (a[i] - b[i]) * (a[i] - b[i]);
  return std::sqrt(s);
}

}  // namespace

void SameBatchProbe::add_micro(int point, std::span<const double> g) { (point == 0 ? at0_ : at1_).add(g); }

SameBatchProbe::Result SameBatchProbe::finish(std::span<const double> w0, std::span<const double> w1,
                                              double grad_norm2) const {
  if (w0.size() != at0_.mean().size() || w1.size() != w0.size()) {
    throw std::invalid_argument("SameBatchProbe: points and gradients differ in length");
  }
  if (at0_.count() < 1 || at1_.count() != at0_.count()) {
    throw std::logic_error("SameBatchProbe: needs the same micro-batches (at least one) at both points");
  }
  Result r;
  r.grad_norm2 = grad_norm2;
  r.dw_norm = norm_of_difference(w1, w0);
  // The micro-batches split the batch evenly, so their means are the batch gradients.
  const double dg = norm_of_difference(at1_.mean(), at0_.mean());
  r.smoothness = r.dw_norm > 0.0 ? dg / r.dw_norm : 0.0;
  // Each micro-batch gradient is a mean of B/m samples: its covariance trace is
  // m times that of the full batch's. Two estimates, one per point: their mean.
  const auto m = static_cast<double>(at0_.count());
  if (at0_.count() >= 2) r.sigma2_batch = (at0_.variance() + at1_.variance()) / (2.0 * m);
  return r;
}

FormatScales max_of(const FormatScales& a, const FormatScales& b) {
  return {std::max(a.eps_g, b.eps_g), std::max(a.var_g, b.var_g), std::max(a.eps_w_per_L, b.eps_w_per_L),
          std::max(a.update_r2, b.update_r2)};
}

FormatScales format_scales(const Precision& prec, std::span<const TensorScale> tensors, double lr, double x_norm,
                           double g_norm, double momentum) {
  FormatScales s;
  const double v_gain = 1.0 / (1.0 - momentum);  // |v| <= sum_i beta^i |g| (an estimate from this step's g)
  if (prec.is_float()) {
    // Float update x+ = fl(x - fl(lr v)): ||r|| <= 2u (||x+|| + lr ||v||) to first order (docs §8).
    const double u = unit_roundoff(Format::fp32());
    s.update_r2 = std::pow(2.0 * u * (x_norm + lr * g_norm * v_gain), 2);
    // Heavy ball: v+ = fl(fl(beta v) + g), per element <= u |beta v| + u |beta v + g| (1 + u): a bias.
    if (momentum > 0.0) s.eps_g = 2.0 * u * (2.0 * momentum * v_gain + 1.0) * g_norm;
    return s;
  }
  std::vector<CastObservation> g_casts, w_casts;
  double d = 0.0;
  for (const TensorScale& t : tensors) {
    d += t.n;
    g_casts.push_back({prec.g, t.n, t.grad_max, 1.0, true});  // the gradient's own cast: linear
    // Heavy ball: the buffer is requantized to 31 bits with SR, mean zero (optim/sgd.cpp).
    if (momentum > 0.0) g_casts.push_back({Format::wide(31), t.n, t.grad_max * v_gain, 1.0, true});
    // The value cast enters a nonlinear model: SR counts as a bias; gain 1 here, times L later.
    if (!t.value_format.is_float()) w_casts.push_back({t.value_format, t.n, t.master_max, 1.0, false});
  }
  const StepTerms g = step_terms(0.0, g_casts, Rounding::Stochastic, d, std::ldexp(1.0, kMasterExponent));
  const StepTerms w = step_terms(0.0, w_casts, Rounding::Stochastic, d, std::ldexp(1.0, kMasterExponent));
  s.eps_g = g.eps_abs;
  s.var_g = g.grad_var;
  s.eps_w_per_L = w.eps_abs;
  s.update_r2 = g.update_r2;  // the master update: SR on the master grid, d coordinates
  return s;
}

StepTerms scaled_step_terms(const FormatScales& s, double lr, double L) {
  return StepTerms{lr, s.eps_g + L * s.eps_w_per_L, s.var_g, s.update_r2};
}

double format_delta(const Precision& prec) {
  if (prec.is_float()) return 0.0;
  return unit_roundoff(prec.a) + (prec.e.rounding() == Rounding::Nearest ? unit_roundoff(prec.e) : 0.0);
}

double applied_momentum(double beta, bool is_float) {
  if (is_float) return static_cast<float>(beta);
  return std::ldexp(static_cast<double>(std::llround(std::ldexp(beta, 16))), -16);
}

double applied_lr(double lr, bool is_float) {
  if (lr <= 0.0) return 0.0;
  if (is_float) return static_cast<float>(lr);
  const int k = 23 - std::ilogb(lr);
  return std::ldexp(static_cast<double>(std::llround(std::ldexp(lr, k))), -k);
}

// ---- probe.csv -------------------------------------------------------------------

std::string probe_csv_header() {
  return "step,lr,train_loss,grad_norm2,sigma2_batch,smoothness,dw_norm,master_step_norm,grad_max,master_max,"
         "eps_g,var_g,eps_w_per_L,update_r2";
}

std::string probe_csv_row(const ProbeSample& s) {
  std::ostringstream o;
  o.precision(17);
  o << s.step << ',' << s.lr << ',' << s.train_loss << ',' << s.measured.grad_norm2 << ',' << s.measured.sigma2_batch
    << ',' << s.measured.smoothness << ',' << s.measured.dw_norm << ',' << s.master_step_norm << ',' << s.grad_max
    << ',' << s.master_max << ',' << s.scales.eps_g << ',' << s.scales.var_g << ',' << s.scales.eps_w_per_L << ','
    << s.scales.update_r2;
  return o.str();
}

std::vector<ProbeSample> read_probe_csv(const fs::path& p) {
  std::ifstream in(p);
  if (!in) throw std::runtime_error(p.string() + ": cannot open (was the run trained with --probe-every?)");
  std::string line;
  if (!std::getline(in, line) || line != probe_csv_header()) {
    throw std::runtime_error(p.string() + ": not a probe file of this version (header '" + line + "')");
  }
  std::vector<ProbeSample> out;
  while (std::getline(in, line)) {
    std::vector<double> f;
    std::stringstream ss(line);
    std::string item;
    while (std::getline(ss, item, ',')) f.push_back(item == "nan" || item == "-nan" ? NAN : std::stod(item));
    if (f.size() != 14) continue;  // a row cut short by a kill
    ProbeSample s;
    s.step = static_cast<long>(f[0]);
    s.lr = f[1];
    s.train_loss = f[2];
    s.measured = {f[5], f[4], f[3], f[6]};
    s.master_step_norm = f[7];
    s.grad_max = f[8];
    s.master_max = f[9];
    s.scales = {f[10], f[11], f[12], f[13]};
    out.push_back(s);
  }
  return out;
}

// ---- constants and the bound -------------------------------------------------------

RunConstants estimate_constants(std::span<const ProbeSample> probes, const Precision& prec, double L_floor) {
  RunConstants c;
  SmoothnessEstimator L;
  c.delta = format_delta(prec);
  for (const ProbeSample& s : probes) {
    if (s.measured.dw_norm > 0.0) L.add_norms(s.measured.dw_norm, s.measured.smoothness * s.measured.dw_norm);
    if (std::isfinite(s.measured.sigma2_batch)) c.sigma2 = std::max(c.sigma2, s.measured.sigma2_batch);
    if (s.step == 0) c.gap0 = std::max(0.0, s.train_loss);
    c.grad_max = std::max(c.grad_max, s.grad_max);
    c.master_max = std::max(c.master_max, s.master_max);
  }
  c.L_own = L.max();
  c.L_floor = L_floor;
  // No probe with a step: nothing to bound, whatever the floor (evaluate_run_bound says "no probe").
  c.L = c.L_own > 0.0 ? std::max(c.L_own, L_floor) : 0.0;
  c.L_q90 = L.quantile(0.9);
  c.probes = static_cast<int>(probes.size());
  return c;
}

nlohmann::json RunBound::summary() const {
  auto num = [](double x) { return std::isfinite(x) ? nlohmann::json(x) : nlohmann::json(nullptr); };
  nlohmann::json j = {{"status", status},
                      {"constants",
                       {{"L", constants.L},
                        {"L_own", constants.L_own},
                        {"L_floor", constants.L_floor},
                        {"L_q90", constants.L_q90},
                        {"sigma2", constants.sigma2},
                        {"gap0", constants.gap0},
                        {"delta", constants.delta},
                        {"grad_max", constants.grad_max},
                        {"master_max", constants.master_max},
                        {"probes", constants.probes}}}};
  if (status == "evaluated") {
    j["optimizer"] = optimizer;
    j["momentum"] = momentum;
    j["held"] = held;
    j["first_violation"] = first_violation;
    j["vacuous"] = vacuous;
    j["final_bound"] = num(final_bound);
    j["final_measured"] = num(final_measured);
  }
  return j;
}

RunBound evaluate_run_bound(std::span<const ProbeSample> probes, std::span<const double> lr_per_step,
                            const Precision& prec, double momentum, double weight_decay, double L_floor) {
  RunBound r;
  r.constants = estimate_constants(probes, prec, L_floor);
  if (probes.empty() || r.constants.L <= 0.0) {
    r.status = "n/a (no probe)";
    return r;
  }
  // The bounds are derived for SGD and heavy ball without decay (docs §1).
  if (weight_decay != 0.0) {
    r.status = "n/a (weight decay)";
    return r;
  }
  r.status = "evaluated";
  const RunConstants& c = r.constants;
  const bool fp = prec.is_float();
  // Scales between two probes: the larger of the two observations around the step.
  std::vector<StepTerms> terms(lr_per_step.size());
  std::size_t j = 0;  // the last probe at or before step k
  for (std::size_t k = 0; k < terms.size(); ++k) {
    while (j + 1 < probes.size() && probes[j + 1].step <= static_cast<long>(k)) ++j;
    FormatScales s = probes[j].scales;
    if (j + 1 < probes.size()) s = max_of(s, probes[j + 1].scales);
    terms[k] = scaled_step_terms(s, applied_lr(lr_per_step[k], fp), c.L);
  }
  const ProblemConstants pc{c.L, 0.0, c.gap0, c.sigma2, 0.0, 0.0, c.delta};
  const SgdBound bound(pc, fp ? Rounding::Nearest : Rounding::Stochastic);
  r.momentum = momentum == 0.0 ? 0.0 : applied_momentum(momentum, fp);
  r.optimizer = r.momentum == 0.0 ? "sgd" : "heavy ball";
  const std::vector<BoundPoint> nc =
      r.momentum == 0.0 ? bound.gradient_norm(terms) : bound.heavy_ball_gradient_norm(terms, r.momentum);

  // The measured counterpart of the bound at K: the same weighted mean
  // sum w_k E||grad f_k||^2 / sum w_k, over the probed k < K only, with the
  // probe's ||g0||^2 (a minibatch gradient: E||g_B||^2 >= ||grad f||^2, so
  // this errs high). Weights in logs, shifted by their running maximum.
  r.bound.resize(nc.size());
  r.measured.assign(nc.size(), NAN);
  r.held = true;
  double max_lw = -kInf, num = 0.0, den = 0.0, plain = 0.0;
  int n = 0;
  std::size_t p = 0;
  for (std::size_t K = 1; K <= nc.size(); ++K) {
    r.bound[K - 1] = nc[K - 1].value;
    while (p < probes.size() && probes[p].step < static_cast<long>(K)) {
      const double lw = nc[static_cast<std::size_t>(probes[p].step)].log_weight;
      const double g2 = probes[p].measured.grad_norm2;
      plain += g2;
      ++n;
      if (lw > -kInf) {
        if (lw > max_lw) {
          const double f = std::exp(max_lw - lw);  // rescale the sums to the new maximum
          num *= f;
          den *= f;
          max_lw = lw;
        }
        num += std::exp(lw - max_lw) * g2;
        den += std::exp(lw - max_lw);
      }
      ++p;
    }
    if (n == 0) continue;
    // No weight (every probed step too long for the descent lemma): the plain mean.
    const double m = den > 0.0 ? num / den : plain / n;
    r.measured[K - 1] = m;
    if (!(m <= r.bound[K - 1]) && r.held) {
      r.held = false;
      r.first_violation = static_cast<long>(K);
    }
  }
  r.final_bound = r.bound.empty() ? NAN : r.bound.back();
  r.final_measured = r.measured.empty() ? NAN : r.measured.back();
  // By smoothness alone ||grad f(x)||^2 <= 2 L (f(x) - f_inf); a bound at or
  // above 2 L gap0 says nothing more about a run that does not climb above its start.
  r.vacuous = !(r.final_bound < 2.0 * c.L * c.gap0);
  return r;
}

RunBound evaluate_run_bound(const std::filesystem::path& run_dir, std::span<const double> lr_per_step,
                            const Precision& prec, double momentum, double weight_decay, double L_floor) {
  const std::vector<ProbeSample> probes = read_probe_csv(run_dir / "probe.csv");
  return evaluate_run_bound(probes, lr_per_step, prec, momentum, weight_decay, L_floor);
}

}  // namespace intrain
