#include "analysis/bounds.h"

#include <algorithm>
#include <boost/multiprecision/cpp_bin_float.hpp>
#include <cmath>
#include <limits>
#include <stdexcept>

#include "core/quantize.h"

namespace intrain {

namespace {

// 50 decimal digits and a 32-bit binary exponent: gap0 * prod rho over a
// million steps (1e-40000 and below) stays representable, where double
// underflows to 0 after ~1e-308.
using Wide = boost::multiprecision::cpp_bin_float_50;

constexpr double kInf = std::numeric_limits<double>::infinity();

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("SgdBound: " + what);
}

double log10_of(double x) { return x > 0.0 ? std::log10(x) : -kInf; }
double log10_of(const Wide& x) { return x > 0 ? static_cast<double>(boost::multiprecision::log10(x)) : -kInf; }

// The contraction of one PL step: with c >= 0 the PL inequality
// ||grad f||^2 >= 2 mu F bounds the descent term; with c < 0 (a step too long
// for the descent lemma) smoothness ||grad f||^2 <= 2 L F bounds the growth.
double pl_rho(const StepConstants& s, double lr, double L, double mu) {
  return s.c >= 0.0 ? 1.0 - 2.0 * mu * lr * s.c + s.kappa : 1.0 + 2.0 * L * lr * (-s.c) + s.kappa;
}

// PL recursion B_{k+1} = rho_k B_k + N_k. Every candidate (SR or RN-A for a
// tuning, or RN-B) gives a valid one-step inequality F_{k+1} <= rho F_k + N
// with rho >= 0, so F_k <= B_k implies F_{k+1} <= min over candidates of
// (rho B_k + N): the candidate is chosen per step.
template <class Real>
std::vector<BoundPoint> pl_recursion(const SgdBound& b, std::span<const StepTerms> steps) {
  const ProblemConstants& pc = b.constants();
  std::vector<BoundPoint> out(steps.size() + 1);
  Real transient = pc.gap0, noise = 0;
  for (std::size_t k = 0;; ++k) {
    BoundPoint& p = out[k];
    p.step = static_cast<long>(k);
    p.noise = static_cast<double>(noise);
    p.log10_transient = log10_of(transient);
    p.value = static_cast<double>(transient + noise);
    if (k == steps.size()) break;
    double best = kInf, rho = 1.0, N = 0.0;
    for (const StepConstants& s : b.step_candidates(steps[k])) {
      const double r = pl_rho(s, steps[k].lr, pc.L, pc.mu);
      const double v = r * p.value + s.N;
      if (v < best) best = v, rho = r, N = s.N;
    }
    transient *= rho;
    noise = noise * rho + N;
  }
  return out;
}

// Non-convex (docs §6). With Phi_k = E f(x_k) - f_inf and P_{k+1} = prod_{j<=k} (1 + kappa'_j):
//   sum_{k<K} (lr_k c+_k / P_{k+1}) E||grad f_k||^2 <= Phi_0 + sum_{k<K} N_k / P_{k+1}.
// Any per-step choice of tuning keeps this valid; each step takes the one
// that minimises the running bound.
template <class Real>
std::vector<BoundPoint> nc_recursion(const SgdBound& b, std::span<const StepTerms> steps) {
  const ProblemConstants& pc = b.constants();
  std::vector<BoundPoint> out(steps.size());
  Real P = 1, numer = pc.gap0, denom = 0;
  for (std::size_t k = 0; k < steps.size(); ++k) {
    const double lr = steps[k].lr;
    // The candidates are ranked in double through the scale-free form
    // (U (1 + kappa) + N) / (V (1 + kappa) + lr c+), U = numer P, V = denom P;
    // only the chosen one is applied in Real.
    const double U = static_cast<double>(numer * P), V = static_cast<double>(denom * P);
    double best = kInf, kappa_best = 0.0, N_best = 0.0, c_best = 0.0;
    for (const StepConstants& s : b.step_candidates(steps[k])) {
      const double c_plus = std::max(s.c, 0.0);
      const double kappa = s.c >= 0.0 ? s.kappa : s.kappa + 2.0 * pc.L * lr * (-s.c);
      const double den = V * (1.0 + kappa) + lr * c_plus;
      const double v = den > 0.0 ? (U * (1.0 + kappa) + s.N) / den : kInf;
      if (v < best || (best == kInf && v == kInf)) best = v, kappa_best = kappa, N_best = s.N, c_best = c_plus;
    }
    P *= 1.0 + kappa_best;
    numer += N_best / P;
    denom += lr * c_best / P;
    BoundPoint& p = out[k];
    p.step = static_cast<long>(k + 1);
    p.value = denom > 0 ? static_cast<double>(numer / denom) : kInf;
    p.noise = static_cast<double>(numer - pc.gap0);
    p.log10_transient = -log10_of(P);  // log10 (1 / P_K): how much gap-driven growth discounts the steps
    // ln w_k = ln(lr c+) - ln P_{k+1}, with ln P = -log10_transient * ln 10.
    p.log_weight = lr * c_best > 0.0 ? std::log(lr * c_best) + p.log10_transient * std::log(10.0) : -kInf;
  }
  return out;
}

}  // namespace

// A log-spaced grid: the best Young parameters range from ~1e-3 (a tiny
// rounding term, e.g. fp32's update) to ~1 (a format-dominated floor).
std::vector<Tuning> default_tunings() {
  std::vector<Tuning> out;
  const double grid[] = {1.0 / 64, 1.0 / 8, 0.5, 1.0};
  for (double e : {0.125, 0.5})
    for (double eps2 : grid)
      for (double zeta : {0.125, 0.5, 2.0})
        for (double beta : {1.0 / 1024, 1.0 / 32, 0.5})
          for (double eta : {1.0 / 64, 0.25, 1.0}) out.push_back(Tuning{e, eps2, zeta, beta, eta});
  return out;
}

SgdBound::SgdBound(ProblemConstants pc, Rounding update_rounding, std::vector<Tuning> tunings)
    : pc_(pc), rounding_(update_rounding), tunings_(std::move(tunings)) {
  require(std::isfinite(pc.L) && pc.L > 0.0, "L must be positive and finite, got " + std::to_string(pc.L));
  require(pc.mu >= 0.0 && pc.mu <= pc.L, "mu must lie in [0, L], got mu = " + std::to_string(pc.mu));
  require(std::isfinite(pc.gap0) && pc.gap0 >= 0.0, "gap0 = f(x0) - f* must be >= 0 and finite");
  require(pc.sigma2 >= 0.0 && pc.noise_grad >= 0.0 && pc.noise_gap >= 0.0, "noise constants must be >= 0");
  require(pc.delta >= 0.0 && pc.delta < 1.0, "delta (relative gradient error) must lie in [0, 1)");
  require(!tunings_.empty(), "no tuning given");
  for (const Tuning& t : tunings_) {
    require(t.eps1 > 0 && t.eps2 > 0 && t.zeta > 0 && t.beta > 0 && t.eta > 0, "tuning parameters must be > 0");
    if (std::find(etas_.begin(), etas_.end(), t.eta) == etas_.end()) etas_.push_back(t.eta);
  }
}

// docs/convergence.md §3: the constants of the two gradient inequalities.
GradientConstants SgdBound::gradient_constants(const StepTerms& t, const Tuning& tu) const {
  const double d = pc_.delta, eps = t.eps_abs;
  const double m0 = 1.0 + pc_.noise_grad, q0 = pc_.noise_gap, s0 = pc_.sigma2;
  GradientConstants g;
  // (i) E[grad f . gh] >= a ||grad f||^2 - b - bF (f - f*)
  g.a = 1.0 - d * std::sqrt(m0);
  if (d > 0.0) {
    g.a -= tu.eps1 / 2.0;
    g.b += d * d * s0 / (2.0 * tu.eps1);
    g.bF += d * d * q0 / (2.0 * tu.eps1);
  }
  if (eps > 0.0) {
    g.a -= tu.eps2 / 2.0;
    g.b += eps * eps / (2.0 * tu.eps2);
  }
  // (ii) E||gh||^2 <= m ||grad f||^2 + q (f - f*) + s
  const double grow = (eps > 0.0 ? 1.0 + tu.zeta : 1.0) * (1.0 + d) * (1.0 + d);
  g.m = grow * m0;
  g.q = grow * q0;
  g.s = grow * s0 + (eps > 0.0 ? (1.0 + 1.0 / tu.zeta) * eps * eps : 0.0) + t.grad_var;
  return g;
}

// docs/convergence.md §4-5: one step.
StepConstants SgdBound::step_constants(const StepTerms& t, const Tuning& tu) const {
  StepConstants out;
  const double lr = t.lr;
  if (lr == 0.0) return StepConstants{0.0, 0.0, 0.0};  // x on the grid and no step: x+ = Q(x) = x
  const double L = pc_.L;
  const GradientConstants g = gradient_constants(t, tu);
  const double a = g.a, b = g.b, bF = g.bF, m = g.m, q = g.q, s = g.s;
  const double r2 = t.update_r2;
  if (rounding_ == Rounding::Stochastic) {
    out.c = a - L * lr * m / 2.0;
    out.kappa = lr * bF + L * lr * lr * q / 2.0;
    out.N = lr * b + L * lr * lr * s / 2.0 + L * r2 / 2.0;
  } else {
    const double beta = r2 > 0.0 ? tu.beta : 0.0, eta = tu.eta;
    out.c = a - beta / 2.0 - (1.0 + eta) * L * lr * m / 2.0;
    out.kappa = lr * bF + (1.0 + eta) * L * lr * lr * q / 2.0;
    out.N = lr * b + (1.0 + eta) * L * lr * lr * s / 2.0;
    if (r2 > 0.0) out.N += r2 / (2.0 * lr * beta) + (1.0 + 1.0 / eta) * L * r2 / 2.0;
  }
  return out;
}

// docs/convergence.md §5b: RN-B. With alpha <= 1/L the descent lemma at
// x+ = x - alpha (grad f + u), u = (gh - grad f) - r / alpha, gives per realisation
//   f(x+) <= f(x) - (alpha/2) ||grad f||^2 + (alpha/2) ||u||^2,
// and with delta = 0 the bias is deterministic (||e_b|| <= eps), so
//   E||u||^2 <= (1+eta) (sigma2 + M_V ||grad f||^2 + M_F F + V) + (1 + 1/eta) (eps + R/alpha)^2.
StepConstants SgdBound::rn_b_constants(const StepTerms& t, double eta) const {
  const double lr = t.lr, E = t.eps_abs + std::sqrt(t.update_r2) / lr;
  StepConstants out;
  if (std::isinf(eta)) {  // the limit eta -> inf, used only when no variance term is left
    out.c = 0.5;
    out.N = lr * E * E / 2.0;
    return out;
  }
  out.c = (1.0 - (1.0 + eta) * pc_.noise_grad) / 2.0;
  out.kappa = lr * (1.0 + eta) * pc_.noise_gap / 2.0;
  out.N = lr / 2.0 * ((1.0 + eta) * (pc_.sigma2 + t.grad_var) + (1.0 + 1.0 / eta) * E * E);
  return out;
}

std::vector<StepConstants> SgdBound::step_candidates(const StepTerms& t) const {
  std::vector<StepConstants> out;
  out.reserve(tunings_.size() + 8);
  for (const Tuning& tu : tunings_) out.push_back(step_constants(t, tu));
  // RN-B needs a deterministic bias (delta = 0) and a step the descent lemma
  // can take with L alpha^2 <= alpha.
  if (rounding_ != Rounding::Nearest || pc_.delta != 0.0 || !(t.lr > 0.0) || t.lr * pc_.L > 1.0) return out;
  const double V = pc_.sigma2 + t.grad_var, E = t.eps_abs + std::sqrt(t.update_r2) / t.lr;
  const bool variance_free = pc_.noise_grad == 0.0 && pc_.noise_gap == 0.0;
  if (V == 0.0 && variance_free) {
    out.push_back(rn_b_constants(t, std::numeric_limits<double>::infinity()));
    return out;
  }
  // eta = E / sqrt(V) minimises N: (sqrt(V) + E)^2, Minkowski's form (the research note's headline).
  if (variance_free && E > 0.0) out.push_back(rn_b_constants(t, E / std::sqrt(V)));
  for (double eta : etas_) out.push_back(rn_b_constants(t, eta));
  return out;
}

std::vector<double> default_taus() { return {1.0 / 256, 1.0 / 16, 0.5, 4.0, 64.0}; }

// docs/convergence.md §6b. With gamma_k = a_k + beta gamma_{k+1} (gamma_K = 0)
// and c_k = beta gamma_k, the point z_k = x_k - c_k v_k moves as SGD does:
//   z_{k+1} = z_k - gamma_k (gh_k + s_k) + r_k,   z_0 = x_0,
// with the gradient taken at x_k, ||grad f(z_k) - grad f(x_k)|| <= L c_k ||v_k||.
// The descent lemma at z_k, summed over k < K, with
//   E||v_k||^2 <= B_k sum_{j<k} beta^{k-1-j} (m_j E||grad f_j||^2 + s_j),  B_k = (1 - beta^k) / (1 - beta),
// gives  sum_{k<K} w_k E||grad f(x_k)||^2 <= Phi_0 + sum_{k<K} (N_k + theta_k B_k h_k),
//   w_j = gamma_j ct_j - m_j sum_{k>j} theta_k B_k beta^{k-1-j},   h_k = sum_{j<k} beta^{k-1-j} s_j.
// The sum over k > j runs to the end of the schedule (a smaller weight than
// the prefix's, hence valid for every K), computed backwards in O(K).
std::vector<BoundPoint> SgdBound::heavy_ball_gradient_norm(std::span<const StepTerms> steps, double beta,
                                                           std::span<const double> taus) const {
  require(beta >= 0.0 && beta < 1.0, "heavy ball needs 0 <= beta < 1, got " + std::to_string(beta));
  require(!taus.empty(), "no tau given");
  for (double t : taus) require(t > 0.0, "tau must be > 0");
  for (const StepTerms& t : steps)
    require(t.lr >= 0.0 && t.eps_abs >= 0.0 && t.grad_var >= 0.0 && t.update_r2 >= 0.0,
            "step terms must be >= 0");
  ProblemConstants pc = pc_;
  if (pc.noise_gap > 0.0) {
    require(pc.mu > 0.0, "heavy ball needs noise_gap = 0, or mu > 0 to fold it into noise_grad (PL)");
    pc.noise_grad += pc.noise_gap / (2.0 * pc.mu);  // M_F (f - f*) <= M_F ||grad f||^2 / (2 mu)
    pc.noise_gap = 0.0;
  }
  const SgdBound folded(pc, rounding_, tunings_);
  const std::size_t K = steps.size();
  const double L = pc.L;
  std::vector<double> gamma(K + 1, 0.0), Bk(K + 1, 0.0);
  for (std::size_t k = K; k-- > 0;) gamma[k] = steps[k].lr + beta * gamma[k + 1];
  for (std::size_t k = 1; k <= K; ++k) Bk[k] = beta * Bk[k - 1] + 1.0;  // sum_{i<k} beta^i

  std::vector<double> cw(K), theta(K), N(K), m(K), s(K), w(K), best_w, best_value(K, kInf), best_noise(K, 0.0);
  double best_final = kInf;
  bool have = false;
  for (const Tuning& tu : tunings_) {
    for (double tau : taus) {
      for (std::size_t k = 0; k < K; ++k) {
        const GradientConstants g = folded.gradient_constants(steps[k], tu);
        const double ga = gamma[k], c = beta * ga, r2 = steps[k].update_r2;
        m[k] = g.m;
        s[k] = g.s;
        if (ga == 0.0) {  // no step from here on: z stays, nothing to bound
          cw[k] = theta[k] = N[k] = 0.0;
          continue;
        }
        const bool drift = c > 0.0;       // otherwise grad f(z) = grad f(x): no Young on the drift
        const double t = drift ? tau : 0.0;
        double ct = g.a - t * g.m / 2.0, th = drift ? ga * L * L * c * c / (2.0 * tau) : 0.0;
        double n = ga * g.b + ga * t * g.s / 2.0;
        if (rounding_ == Rounding::Stochastic) {
          ct -= L * ga * g.m / 2.0;
          n += L * ga * ga * g.s / 2.0 + L * r2 / 2.0;
        } else {
          // grad f(z) . r <= (ga b'/2) ||grad f(z)||^2 + r2 / (2 ga b'), and with drift
          // ||grad f(z)||^2 <= 2 ||grad f(x)||^2 + 2 ||D||^2.
          const double bp = r2 > 0.0 ? tu.beta : 0.0, eta = tu.eta;
          ct -= (drift ? bp : bp / 2.0) + (1.0 + eta) * L * ga * g.m / 2.0;
          if (drift) th += ga * bp * L * L * c * c;
          n += (1.0 + eta) * L * ga * ga * g.s / 2.0;
          if (r2 > 0.0) n += r2 / (2.0 * ga * bp) + (1.0 + 1.0 / eta) * L * r2 / 2.0;
        }
        cw[k] = ga * ct;
        theta[k] = th;
        N[k] = n;
      }
      double A = 0.0;  // sum_{k>j} theta_k B_k beta^{k-1-j}
      for (std::size_t j = K; j-- > 0;) {
        if (j + 1 < K) A = theta[j + 1] * Bk[j + 1] + beta * A;
        w[j] = cw[j] - m[j] * A;
      }
      std::vector<double> value(K), noise(K);
      double numer = pc.gap0, denom = 0.0, h = 0.0;
      bool valid = true;
      for (std::size_t k = 0; k < K; ++k) {
        numer += N[k] + theta[k] * Bk[k] * h;
        h = beta * h + s[k];
        if (w[k] < 0.0) valid = false;
        denom += std::max(w[k], 0.0);
        value[k] = valid && denom > 0.0 ? numer / denom : kInf;
        noise[k] = numer - pc.gap0;
      }
      const double final = K ? value[K - 1] : kInf;
      if (!have || final < best_final) {
        have = true;
        best_final = final;
        best_value = value;
        best_noise = noise;
        best_w = w;
      }
    }
  }
  std::vector<BoundPoint> out(K);
  for (std::size_t k = 0; k < K; ++k) {
    BoundPoint& p = out[k];
    p.step = static_cast<long>(k + 1);
    p.value = best_value[k];
    p.noise = best_noise[k];
    p.log10_transient = 0.0;
    p.log_weight = best_w[k] > 0.0 ? std::log(best_w[k]) : -kInf;
  }
  return out;
}

std::vector<BoundPoint> SgdBound::suboptimality(std::span<const StepTerms> steps, Arithmetic arith) const {
  require(pc_.mu > 0.0, "suboptimality() needs mu > 0 (PL); use gradient_norm() for a non-convex bound");
  for (const StepTerms& t : steps)
    require(t.lr >= 0.0 && t.eps_abs >= 0.0 && t.grad_var >= 0.0 && t.update_r2 >= 0.0,
            "step terms must be >= 0");
  return arith == Arithmetic::Double ? pl_recursion<double>(*this, steps)
                                     : pl_recursion<Wide>(*this, steps);
}

std::vector<BoundPoint> SgdBound::gradient_norm(std::span<const StepTerms> steps, Arithmetic arith) const {
  for (const StepTerms& t : steps)
    require(t.lr >= 0.0 && t.eps_abs >= 0.0 && t.grad_var >= 0.0 && t.update_r2 >= 0.0,
            "step terms must be >= 0");
  return arith == Arithmetic::Double ? nc_recursion<double>(*this, steps)
                                     : nc_recursion<Wide>(*this, steps);
}

double pl_closed_form(double rho, double N, double F0, long k) {
  const double rk = std::pow(rho, static_cast<double>(k));
  return rk * F0 + (rho == 1.0 ? N * static_cast<double>(k) : N * (1.0 - rk) / (1.0 - rho));
}

double format_grid(const Format& f, double observed_max) {
  if (!(observed_max >= 0.0) || !std::isfinite(observed_max)) {
    throw std::invalid_argument("format_grid: observed maximum must be finite and >= 0");
  }
  if (observed_max == 0.0) return 0.0;
  if (f.is_float()) return std::ldexp(1.0, std::ilogb(observed_max) - 23);
  if (f.scaling() != Scaling::SharedExponent) {
    throw std::invalid_argument("format_grid: " + f.name() + " is grouped; the bounds cover shared-exponent formats");
  }
  return std::ldexp(1.0, exponent_for_max(observed_max, f.qmax()));
}

double unit_roundoff(const Format& f) {
  if (f.is_float()) return std::ldexp(1.0, -24);
  return 1.0 / static_cast<double>(f.qmax());
}

CastError cast_error(Rounding r, double n, double grid) {
  if (r == Rounding::Nearest) return CastError{std::sqrt(n) * grid / 2.0, 0.0};
  return CastError{0.0, n * grid * grid / 4.0};
}

StepTerms step_terms(double lr, std::span<const CastObservation> casts, Rounding update_rounding, double d_update,
                     double update_grid) {
  StepTerms t;
  t.lr = lr;
  for (const CastObservation& c : casts) {
    const double grid = format_grid(c.format, c.observed_max);
    const Rounding r = c.format.is_float() ? Rounding::Nearest : c.format.rounding();
    if (r == Rounding::Stochastic && !c.linear) {
      t.eps_abs += c.gain * std::sqrt(c.n) * grid;  // |e_i| < grid, counted as a bias
      continue;
    }
    const CastError e = cast_error(r, c.n, grid);
    t.eps_abs += c.gain * e.bias;
    t.grad_var += c.gain * c.gain * e.variance;
  }
  const CastError u = cast_error(update_rounding, d_update, update_grid);
  t.update_r2 = update_rounding == Rounding::Nearest ? u.bias * u.bias : u.variance;
  return t;
}

bool rn_update_stagnates(double lr, double grad_inf, double grid) { return lr * grad_inf < grid / 2.0; }

double rn_move_threshold(double lr, double grid) { return lr > 0.0 ? grid / (2.0 * lr) : kInf; }

double rn_stall_level(double d, double grid, double mu, double lr, double delta) {
  if (mu <= 0.0 || lr <= 0.0) return kInf;
  return d * grid * grid / (8.0 * mu * lr * lr * (1.0 - delta) * (1.0 - delta));
}

StagnationReport rn_stagnation(std::span<const double> lr, std::span<const double> grad_inf, double grid, double d,
                               double mu, double delta) {
  if (lr.size() != grad_inf.size()) throw std::invalid_argument("rn_stagnation: lr and grad_inf differ in length");
  StagnationReport r;
  for (std::size_t k = 0; k < lr.size(); ++k) {
    if (!rn_update_stagnates(lr[k], grad_inf[k], grid)) continue;
    ++r.stuck_steps;
    if (r.first_step < 0) {
      r.first_step = static_cast<long>(k);
      r.stall_level = rn_stall_level(d, grid, mu, lr[k], delta);
    }
  }
  return r;
}

}  // namespace intrain
