#include "analysis/convex_problem.h"

#include "analysis/trajectory_bound.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <omp.h>
#include <stdexcept>

#include "core/matmul.h"
#include "core/ops.h"
#include "core/quantize.h"
#include "core/rng.h"
#include "layers/param.h"
#include "optim/sgd.h"

namespace intrain {

namespace {

// Uniform in [-1, 1) from 32 counter-based bits.
double uniform_pm1(const RngKey& k, std::uint32_t i) { return std::ldexp(static_cast<double>(k.bits(i)), -31) - 1.0; }

double max_abs_value(const Tensor& t) {
  if (t.format().is_float()) return max_abs(std::span<const float>(t.data<float>(), static_cast<std::size_t>(t.numel())));
  return std::ldexp(static_cast<double>(max_abs_mantissa(t)), t.exponent());
}

std::vector<double> values(const Tensor& t) {
  std::vector<double> v(static_cast<std::size_t>(t.numel()));
  for (std::int64_t i = 0; i < t.numel(); ++i) v[static_cast<std::size_t>(i)] = t.value(i);
  return v;
}

double norm2(const std::vector<double>& v) {
  double s = 0.0;
  for (double x : v) s += x * x;
  return std::sqrt(s);
}

// gamma_n = n u / (1 - n u): the relative error bound of an n-term float sum (Higham, Thm 3.1).
double gamma_n(double n) {
  const double u = std::ldexp(1.0, -24);
  return n * u / (1.0 - n * u);
}

// What one step showed, as the envelope (max) over replicates.
struct StepObservation {
  double master_max = 0, resid_max = 0, grad_sum_max = 0;  // max |x_k|, max |r|, max |X^T r_E|
  double w_max = 0, x_next_norm = 0, step_norm = 0;        // fp32 terms: max |w|, ||x_{k+1}||, lr ||v_{k+1}||
  double v_max = 0, buffer_err = 0;  // heavy ball: max |v_{k+1}| (integer); fp32: 2u (2 beta ||v_k|| + ||g||)
  void merge(const StepObservation& o) {
    master_max = std::max(master_max, o.master_max);
    resid_max = std::max(resid_max, o.resid_max);
    grad_sum_max = std::max(grad_sum_max, o.grad_sum_max);
    w_max = std::max(w_max, o.w_max);
    x_next_norm = std::max(x_next_norm, o.x_next_norm);
    step_norm = std::max(step_norm, o.step_norm);
    v_max = std::max(v_max, o.v_max);
    buffer_err = std::max(buffer_err, o.buffer_err);
  }
};

// The problem's tensors have at most 32 x 8 elements: an OpenMP team costs far
// more than the work (40x slower on a loaded 2-core machine), so the run uses
// one thread and restores the caller's setting. Results do not depend on it.
struct OneThread {
  int saved = omp_get_max_threads();
  OneThread() { omp_set_num_threads(1); }
  ~OneThread() { omp_set_num_threads(saved); }
  OneThread(const OneThread&) = delete;
  OneThread& operator=(const OneThread&) = delete;
};

bool is_power_of_two(double x) {
  int e = 0;
  return x > 0 && std::frexp(x, &e) == 0.5;
}

}  // namespace

double LeastSquares::suboptimality(std::span<const double> x) const {
  if (static_cast<int>(x.size()) != d) throw std::invalid_argument("LeastSquares: x has the wrong length");
  double f = 0.0;
  for (int j = 0; j < d; ++j) {
    const double e = x[static_cast<std::size_t>(j)] - x_star[static_cast<std::size_t>(j)];
    f += s[static_cast<std::size_t>(j)] * s[static_cast<std::size_t>(j)] * e * e;
  }
  return 0.5 * f;
}

double LeastSquares::gradient_norm2(std::span<const double> x) const {
  if (static_cast<int>(x.size()) != d) throw std::invalid_argument("LeastSquares: x has the wrong length");
  double g2 = 0.0;
  for (int j = 0; j < d; ++j) {
    const double sj2 = s[static_cast<std::size_t>(j)] * s[static_cast<std::size_t>(j)];
    const double g = sj2 * (x[static_cast<std::size_t>(j)] - x_star[static_cast<std::size_t>(j)]);
    g2 += g * g;
  }
  return g2;
}

ProblemConstants LeastSquares::constants(int batch) const {
  ProblemConstants pc;
  pc.L = L;
  pc.mu = mu;
  pc.gap0 = suboptimality(std::vector<double>(static_cast<std::size_t>(d), 0.0));
  pc.sigma2 = 2.0 * sigma_star2 / batch;
  pc.noise_gap = 4.0 * L_max / batch;
  return pc;
}

LeastSquares make_least_squares(const LeastSquaresConfig& cfg) {
  if (cfg.log2_rows < 1 || cfg.log2_rows > 16) throw std::invalid_argument("LeastSquares: log2_rows must lie in 1..16");
  LeastSquares ls;
  ls.n = 1 << cfg.log2_rows;
  ls.d = static_cast<int>(cfg.scales.size());
  if (ls.d < 1 || ls.d > ls.n) throw std::invalid_argument("LeastSquares: need 1 <= d <= n columns");
  const auto n = static_cast<std::size_t>(ls.n), d = static_cast<std::size_t>(ls.d);
  ls.s.assign(cfg.scales.begin(), cfg.scales.end());
  ls.L = 0;
  ls.mu = std::numeric_limits<double>::infinity();
  for (double sj : ls.s) {
    if (!(sj >= 1.0)) throw std::invalid_argument("LeastSquares: scales must be positive integers");
    ls.L = std::max(ls.L, sj * sj);
    ls.mu = std::min(ls.mu, sj * sj);
    ls.L_max += sj * sj;
  }
  // A = H[:, 0:d] diag(s), H_ij = (-1)^popcount(i & j) (Sylvester).
  ls.A.resize(n * d);
  for (std::size_t i = 0; i < n; ++i)
    for (std::size_t j = 0; j < d; ++j)
      ls.A[i * d + j] = static_cast<float>((__builtin_popcountll(i & j) & 1 ? -1.0 : 1.0) * ls.s[j]);
  // b = A x_true + noise, rounded to the grid 2^-8.
  const RngKey kx(cfg.seed, 0x7A2), kn(cfg.seed, 0x7A3);
  std::vector<double> x_true(d);
  for (std::size_t j = 0; j < d; ++j) x_true[j] = uniform_pm1(kx, static_cast<std::uint32_t>(j));
  ls.b.resize(n);
  for (std::size_t i = 0; i < n; ++i) {
    double y = std::sqrt(3.0) * cfg.noise_std * uniform_pm1(kn, static_cast<std::uint32_t>(i));
    for (std::size_t j = 0; j < d; ++j) y += static_cast<double>(ls.A[i * d + j]) * x_true[j];
    ls.b[i] = std::ldexp(std::nearbyint(std::ldexp(y, 8)), -8);
  }
  // x* = (A^T A)^-1 A^T b = diag(1 / (n s_j^2)) A^T b; f* = f(x*) from the residual.
  ls.x_star.assign(d, 0.0);
  for (std::size_t j = 0; j < d; ++j) {
    double t = 0.0;
    for (std::size_t i = 0; i < n; ++i) t += static_cast<double>(ls.A[i * d + j]) * ls.b[i];
    ls.x_star[j] = t / (static_cast<double>(n) * ls.s[j] * ls.s[j]);
  }
  double rss = 0.0;
  for (std::size_t i = 0; i < n; ++i) {
    double r = -ls.b[i];
    for (std::size_t j = 0; j < d; ++j) r += static_cast<double>(ls.A[i * d + j]) * ls.x_star[j];
    rss += r * r;
  }
  ls.f_star = rss / (2.0 * static_cast<double>(n));
  ls.sigma_star2 = ls.L_max * rss / static_cast<double>(n);  // ||a_i||^2 = L_max for every row
  return ls;
}

ConvexRun run_least_squares(const LeastSquares& ls, const Precision& prec, const ConvexRunConfig& cfg,
                            const ProblemConstants* constants) {
  const int B = cfg.batch, d = ls.d;
  if (!is_power_of_two(B) || !is_power_of_two(cfg.lr)) {
    throw std::invalid_argument("run_least_squares: batch and lr must be powers of two (1/B folds exactly into lr)");
  }
  if (cfg.steps < 1 || cfg.replicates < 1) throw std::invalid_argument("run_least_squares: steps, replicates >= 1");
  if (!(cfg.momentum >= 0.0 && cfg.momentum < 1.0)) throw std::invalid_argument("run_least_squares: momentum in [0, 1)");
  const bool fp = prec.is_float();
  {  // The design is exact in the A format: check it rather than assume it.
    const Tensor q = quantize(ls.A, {ls.n, d}, prec.a);
    for (std::int64_t i = 0; i < q.numel(); ++i) {
      if (q.value(i) != static_cast<double>(ls.A[static_cast<std::size_t>(i)])) {
        throw std::invalid_argument("run_least_squares: the design matrix is not exact in " + prec.a.name() +
                                    "; use smaller scales");
      }
    }
  }
  const OneThread one_thread;
  const double lr_sgd = cfg.lr / B;  // the optimizer's lr: exact in its 24-bit multiplier and in float
  const std::size_t K = static_cast<std::size_t>(cfg.steps);

  ConvexRun run;
  run.format = prec.name();
  run.suboptimality.assign(K + 1, 0.0);
  run.grad_norm2.assign(K, 0.0);
  std::vector<StepObservation> obs(K);
  std::int64_t flushed = 0, grad_coords = 0;
  const double beta = cfg.momentum;
  Sgd sgd(SgdConfig{beta, 0.0});

  for (int rep = 0; rep < cfg.replicates; ++rep) {
    const std::uint64_t seed = mix64(cfg.seed + static_cast<std::uint64_t>(rep));
    std::vector<Param> params(1);
    Param& p = params[0];
    p.name = "x";
    p.kind = ParamKind::MatmulWeight;
    p.master = fp ? Tensor({d, 1}, Format::fp32()) : Tensor({d, 1}, Format::wide(31), kMasterExponent);
    run.suboptimality[0] += ls.suboptimality(values(p.master));

    std::vector<float> xb(static_cast<std::size_t>(B) * static_cast<std::size_t>(d));
    for (std::size_t k = 0; k < K; ++k) {
      StepObservation o;
      const RngKey key(seed, stream_id(k, 0xC0));
      // Minibatch of B rows, drawn uniformly with replacement (n is a power of two).
      Tensor neg_b = fp ? Tensor({B, 1}, Format::fp32()) : Tensor({B, 1}, Format::accumulator(64), -8);
      for (int i = 0; i < B; ++i) {
        const std::size_t row = key.derive(0).bits(static_cast<std::uint32_t>(i)) & static_cast<std::uint32_t>(ls.n - 1);
        std::copy_n(&ls.A[row * static_cast<std::size_t>(d)], d, &xb[static_cast<std::size_t>(i * d)]);
        if (fp) {
          neg_b.data<float>()[i] = static_cast<float>(-ls.b[row]);
        } else {
          neg_b.data<std::int64_t>()[i] = -std::llround(std::ldexp(ls.b[row], 8));
        }
      }
      const Tensor X = quantize(xb, {B, d}, prec.a, key.derive(1));
      o.master_max = max_abs_value(p.master);
      const Tensor w = cast(p.master, prec.w, key.derive(2));
      o.w_max = max_abs_value(w);
      const Tensor r = add_accumulators(matmul(X, w), neg_b);  // X w - b
      o.resid_max = max_abs_value(r);
      const Tensor rE = cast(r, prec.e, key.derive(3));
      Tensor g = matmul(X, rE, Trans::T, Trans::N);  // sum over the batch of x_i r_i
      o.grad_sum_max = max_abs_value(g);
      if (!fp && prec.g.rounding() == Rounding::Nearest) {  // coordinates the G cast rounds to 0
        const double half = format_grid(prec.g, o.grad_sum_max) / 2.0;
        for (std::int64_t i = 0; i < g.numel(); ++i) flushed += std::abs(g.value(i)) < half && g.value(i) != 0.0;
        grad_coords += g.numel();
      }
      run.grad_norm2[k] += ls.gradient_norm2(values(p.master));
      if (fp && beta > 0.0) {
        // v+ = fl(fl(beta v) + g): per element <= u |beta v| + u |beta v + g| (1 + u); in mean-gradient units.
        const double v_norm = p.momentum.empty() ? 0.0 : norm2(values(p.momentum));
        o.buffer_err = 2.0 * std::ldexp(1.0, -24) * (2.0 * beta * v_norm + norm2(values(g))) / B;
      }
      p.accumulate(std::move(g));
      run.saturated += sgd.step(params, prec.g, lr_sgd, k, seed);
      if (fp) o.step_norm = lr_sgd * norm2(values(p.momentum));  // ||lr v_{k+1}|| (v = g when beta = 0)
      else o.v_max = max_abs_value(p.momentum);
      const std::vector<double> x = values(p.master);
      o.x_next_norm = norm2(x);
      run.suboptimality[k + 1] += ls.suboptimality(x);
      obs[k].merge(o);
    }
  }
  for (double& v : run.suboptimality) v /= cfg.replicates;
  for (double& v : run.grad_norm2) v /= cfg.replicates;
  run.flushed_fraction = grad_coords ? static_cast<double>(flushed) / static_cast<double>(grad_coords) : 0.0;

  // Per-step terms of the bound from the observed scales (docs §9).
  const double Lmax = ls.L_max;
  double s_sum = 0, b_max = 0;
  for (double sj : ls.s) s_sum += sj;
  for (double bi : ls.b) b_max = std::max(b_max, std::abs(bi));
  run.terms.resize(K);
  for (std::size_t k = 0; k < K; ++k) {
    const StepObservation& o = obs[k];
    if (fp) {
      // Float gradient: r_i = fl(sum_j x_ij w_j - b_i) within gamma_{d+1} (sum |x_ij w_j| + |b_i|);
      // g_j = fl(sum_i x_ij r_i) / B within s_j (dr + gamma_B max|r|); ||s|| = sqrt(L_max).
      const double dr = gamma_n(d + 1) * (s_sum * o.w_max + b_max);
      StepTerms t;
      t.lr = cfg.lr;
      t.eps_abs = std::sqrt(Lmax) * (dr + gamma_n(B) * o.resid_max);
      // Float update x+ = fl(x - fl(a v)): ||r|| <= u ||a v|| + u ||x+|| / (1 - u) <= 2u (||a v|| + ||x+||).
      const double R = 2.0 * std::ldexp(1.0, -24) * (o.step_norm + o.x_next_norm);
      t.update_r2 = R * R;
      t.eps_abs += o.buffer_err;  // heavy ball: the buffer's float rounding is a bias (0 without momentum)
      run.terms[k] = t;
    } else {
      std::vector<CastObservation> casts = {
          {prec.w, static_cast<double>(d), o.master_max, Lmax, true},  // H_B (w - x), ||H_B|| <= L_max
          {prec.e, static_cast<double>(B), o.resid_max, std::sqrt(Lmax / B), true},  // X^T e / B
          {prec.g, static_cast<double>(d), o.grad_sum_max, 1.0 / B, true},  // the sum's cast, then 1/B
      };
      // Heavy ball: the buffer (a sum over the batch) is requantized to 31 bits with SR, mean zero.
      if (beta > 0.0) casts.push_back({Format::wide(31), static_cast<double>(d), o.v_max, 1.0 / B, true});
      run.terms[k] = step_terms(cfg.lr, casts, Rounding::Stochastic, d, std::ldexp(1.0, kMasterExponent));
    }
  }
  const SgdBound bound(constants ? *constants : ls.constants(B), fp ? Rounding::Nearest : Rounding::Stochastic);
  if (beta == 0.0) {
    run.bound = bound.suboptimality(run.terms);
    for (std::size_t k = 1; k <= K; ++k) {  // k = 0 is F0 against F0
      run.max_ratio = std::max(run.max_ratio, run.suboptimality[k] / run.bound[k].value);
    }
    return run;
  }
  // Heavy ball: the bound on the weighted mean of E||grad f(x_k)||^2, k < K,
  // against the same weighted mean of the replicates' exact gradient norms.
  // The momentum the optimizer applies: float(beta), or its Q16 constant.
  run.hb_bound = bound.heavy_ball_gradient_norm(run.terms, applied_momentum(beta, fp));
  run.hb_measured.assign(K, 0.0);
  double num = 0.0, den = 0.0;
  for (std::size_t k = 0; k < K; ++k) {
    const double w = std::exp(run.hb_bound[k].log_weight);  // weights here are O(lr): no log-domain shift needed
    num += w * run.grad_norm2[k];
    den += w;
    run.hb_measured[k] = den > 0.0 ? num / den : run.grad_norm2[k];
    run.max_ratio = std::max(run.max_ratio, run.hb_measured[k] / run.hb_bound[k].value);
  }
  return run;
}

}  // namespace intrain
