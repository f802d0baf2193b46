// Causal attention softmax and the cross-entropy loss, forward and backward,
// float and integer side by side. Both rest on one integer exponential.
//
// Integer exp. For d = s - max(s) <= 0 at exponent e and a real factor c
// (1/sqrt(d_head) for attention, 1 for the loss), t = d * 2^e * c * log2(e)
// is formed in Q16 with one multiply by the constant M = round(c log2(e) 2^30)
// and a shift. Then 2^t = 2^-q * 2^-f with -t = 2^16 q + 2^16 f: a shift by
// q and a degree-7 polynomial for 2^-f (error ~6e-9, see Exp2Poly). Every
// value is an integer in (0, 2^30]; t < -31 gives 0.
//
// Softmax. p_j = e_j / sum_k e_k, with one division per row:
// inv = floor(2^61 / sum) and p_j = (e_j * inv) >> 31 in Q30 (the sum is at
// least 2^30, since the maximum contributes 2^0, so the product stays below
// 2^61). Backward: dS = c * P (dP - sum_k P_k dP_k), exact in int64 once dP
// is rounded to 24 bits.
//
// Cross-entropy. grad = (softmax - onehot) / R, the 1/R folded in as a
// fixed-point multiplier; the loss itself is computed in double from the
// integer logits, for reporting only: it never feeds the update.
#include <algorithm>
#include <array>
#include <cmath>
#include <stdexcept>
#include <string>

#include "core/collective.h"
#include "core/fixed_point.h"
#include "core/ops.h"
#include "core/parallel.h"
#include "core/quantize.h"
#include "core/simd.h"

namespace intrain {

namespace {

constexpr double kLog2E = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

// 2^-f for a Q16 fraction f in [0, 1), in Q30: a degree-7 Taylor polynomial
// around f = 1/2, 2^-f = 2^-1/2 * sum_k (-(f - 1/2) ln 2)^k / k!, evaluated
// by Horner in integers (x = f - 1/2 in Q16, |x| <= 2^15). Truncation error
// (0.35)^8 / 8! < 5.3e-9, rounding ~7 * 2^-30: about 6e-9 in all. No table,
// so the loop needs no gathers and vectorises.
struct Exp2Poly {
  std::array<std::int64_t, 8> c{};  // Q30
  Exp2Poly() {
    double term = 1.0 / std::sqrt(2.0);
    for (int k = 0; k < 8; ++k) {
      c[static_cast<std::size_t>(k)] = std::llround(std::ldexp(term, 30));
      term *= -kLn2 / (k + 1);
    }
  }
};
const Exp2Poly& exp2_poly() {
  static const Exp2Poly p;
  return p;
}

// 2^(t / 2^16) in Q30 for t <= 0 (t in Q16); 0 below -31.
INTRAIN_INLINE std::int64_t exp2_q30_poly(std::int64_t t, const std::int64_t* c) {
  const std::int64_t a = -t;
  const std::int64_t q = a >> 16;
  const std::int64_t u = (a & 0xFFFF) - (std::int64_t{1} << 15);  // f - 1/2 in Q16, where 2^t = 2^-q 2^-f
  // Horner, written out so the element loop around it vectorises.
  std::int64_t acc = c[7];
  acc = c[6] + ((acc * u) >> 16);
  acc = c[5] + ((acc * u) >> 16);
  acc = c[4] + ((acc * u) >> 16);
  acc = c[3] + ((acc * u) >> 16);
  acc = c[2] + ((acc * u) >> 16);
  acc = c[1] + ((acc * u) >> 16);
  acc = c[0] + ((acc * u) >> 16);
  const std::int64_t qc = q > 40 ? 40 : q;  // 2^-40 * 2^30 rounds to 0, as any larger shift
  return (acc + ((std::int64_t{1} << qc) >> 1)) >> qc;
}

// The multiplier that turns a score difference at exponent e into Q16 log2
// units, and the shift to apply after multiplying: t = round(d * M / 2^shift).
struct ExpScale {
  std::int64_t M;
  int shift;  // may be negative (a left shift)
};
ExpScale exp_scale(double c, int e) { return {std::llround(std::ldexp(c * kLog2E, 30)), 14 - e}; }

// 2^(t / 2^16) in Q30 for t <= 0 (t in Q16).
inline std::int64_t exp2_q30(std::int64_t t) { return exp2_q30_poly(t, exp2_poly().c.data()); }

// The log2-domain argument in Q16 for a difference d <= 0, clamped at -32.
// t = d * M / 2^shift. When the shift exceeds 30, d is first brought down by
// shift - 30 (losing less than one Q16 unit of t, since M < 2^31); then
// |d| <= 2^32 or t is far below -32 (|t| >= 2^32 M / 2^30 >= 2^21 for
// M >= 2^19, i.e. any scale factor c >= 2^-11), so d * M fits in int64.
inline std::int64_t exp_arg(std::int64_t d, const ExpScale& s) {
  constexpr std::int64_t kFloor = -(std::int64_t{32} << 16);
  int sh = s.shift;
  if (sh > 30) {
    d >>= (sh - 30);
    sh = 30;
  }
  if (d < -(std::int64_t{1} << 32)) return kFloor;
  const std::int64_t prod = d * s.M;
  if (sh >= 0) return std::max(kFloor, shift_round_nearest(prod, sh));
  if (prod < (kFloor >> -sh)) return kFloor;
  return prod * (std::int64_t{1} << -sh);
}

// The exp argument transform with its shifts decided once per tensor (see
// exp_arg): d is pre-shifted by `pre`, clamped at -2^32, multiplied by M and
// rounded (half up) by `sh` in [0, 30].
struct ExpArgs {
  std::int64_t M;
  int pre, sh;
  std::int64_t half;
  explicit ExpArgs(const ExpScale& s)
      : M(s.M), pre(std::max(0, s.shift - 30)), sh(std::clamp(s.shift, 0, 30)),
        half(sh > 0 ? std::int64_t{1} << (sh - 1) : 0) {}
  bool valid(const ExpScale& s) const { return s.shift >= 0; }  // else: scalar exp_arg
};

// Softmax of one row of n scores into Q30 probabilities (out[j], j < n), with
// tmp as scratch. Branch-free inner loops; one division per row.
template <class S>
INTRAIN_INLINE void softmax_row_body(const S* __restrict s, std::int64_t n, const ExpArgs& ea,
                                     const std::int64_t* __restrict c, std::int32_t* __restrict out,
                                     std::int64_t* __restrict tmp) {
  constexpr std::int64_t kFloor = -(std::int64_t{32} << 16);
  const std::int64_t M = ea.M, half = ea.half;  // locals: no reloads through ea in the loop
  const int pre = ea.pre, sh = ea.sh;
  std::int64_t mx = s[0];
  for (std::int64_t j = 1; j < n; ++j) mx = s[j] > mx ? static_cast<std::int64_t>(s[j]) : mx;
  std::int64_t sum = 0;
  for (std::int64_t j = 0; j < n; ++j) {
    std::int64_t d = (static_cast<std::int64_t>(s[j]) - mx) >> pre;
    d = d < -(std::int64_t{1} << 32) ? -(std::int64_t{1} << 32) : d;
    std::int64_t t = (d * M + half) >> sh;
    t = t < kFloor ? kFloor : t;
    const std::int64_t e = exp2_q30_poly(t, c);
    tmp[j] = e;
    sum += e;
  }
  const std::int64_t inv = (std::int64_t{1} << 61) / sum;  // sum >= 2^30: the maximum gives 2^0
  for (std::int64_t j = 0; j < n; ++j) out[j] = static_cast<std::int32_t>((tmp[j] * inv) >> 31);
}

template <class S>
INTRAIN_INLINE void softmax_rows_body(const S* s, std::int64_t r0, std::int64_t r1, std::int64_t T, std::int64_t width,
                                      bool causal, const ExpArgs& ea, const std::int64_t* c, std::int32_t* out,
                                      std::int64_t* tmp) {
  for (std::int64_t r = r0; r < r1; ++r) {
    const std::int64_t n = causal ? r % T + 1 : width;
    softmax_row_body(s + r * width, n, ea, c, out + r * width, tmp);
  }
}
INTRAIN_CLONES void softmax_rows(const std::int32_t* s, std::int64_t r0, std::int64_t r1, std::int64_t T,
                                 std::int64_t width, bool causal, const ExpArgs& ea, const std::int64_t* c,
                                 std::int32_t* out, std::int64_t* tmp) {
  softmax_rows_body(s, r0, r1, T, width, causal, ea, c, out, tmp);
}
INTRAIN_CLONES void softmax_rows(const std::int64_t* s, std::int64_t r0, std::int64_t r1, std::int64_t T,
                                 std::int64_t width, bool causal, const ExpArgs& ea, const std::int64_t* c,
                                 std::int32_t* out, std::int64_t* tmp) {
  softmax_rows_body(s, r0, r1, T, width, causal, ea, c, out, tmp);
}

// Softmax of one row of n integer scores into Q30 probabilities (p[j] for j >= n untouched).
// The scalar reference for shifts the vector kernel does not cover.
template <class S>
inline void softmax_row_q30(const S* s, std::int64_t n, const ExpScale& sc, std::int64_t* p) {
  std::int64_t mx = s[0];
  for (std::int64_t j = 1; j < n; ++j) mx = std::max<std::int64_t>(mx, s[j]);
  std::int64_t sum = 0;
  for (std::int64_t j = 0; j < n; ++j) {
    p[j] = exp2_q30(exp_arg(static_cast<std::int64_t>(s[j]) - mx, sc));
    sum += p[j];
  }
  const std::int64_t inv = (std::int64_t{1} << 61) / sum;
  for (std::int64_t j = 0; j < n; ++j) p[j] = (p[j] * inv) >> 31;
}

void check_square(const Tensor& s, const char* who) {
  if (s.rank() != 3 || s.rows() != s.cols()) {
    throw std::invalid_argument(std::string(who) + ": scores " + s.describe() + " must be [BH, T, T]");
  }
}

}  // namespace

// ---------------------------------------------------------------------------
// Causal softmax
// ---------------------------------------------------------------------------

Tensor causal_softmax_forward(const Tensor& scores, double scale, const Format& out, RngKey key) {
  check_square(scores, "causal_softmax_forward");
  const std::int64_t BH = scores.batch(), T = scores.cols();
  if (scores.format().is_float()) {
    Tensor p(scores.shape(), Format::fp32());
    const float* s = scores.data<float>();
    float* o = p.data<float>();
    for_chunks(BH * T, [&](std::int64_t, std::int64_t r0, std::int64_t r1) {
      for (std::int64_t r = r0; r < r1; ++r) {
        const std::int64_t n = r % T + 1;  // causal: row t sees t + 1 keys
        const float* sr = s + r * T;
        float mx = sr[0];
        for (std::int64_t j = 1; j < n; ++j) mx = std::max(mx, sr[j]);
        double sum = 0.0;
        for (std::int64_t j = 0; j < n; ++j) {
          o[r * T + j] = static_cast<float>(std::exp((static_cast<double>(sr[j]) - mx) * scale));
          sum += o[r * T + j];
        }
        const float inv = static_cast<float>(1.0 / sum);
        for (std::int64_t j = 0; j < n; ++j) o[r * T + j] *= inv;
      }
    }, 64);
    return cast(p, out, key);
  }
  const std::int64_t* poly = exp2_poly().c.data();
  const ExpScale sc = exp_scale(scale, scores.exponent());
  const ExpArgs ea(sc);
  Tensor p(scores.shape(), Format::accumulator(32), -30);  // zero above the diagonal
  std::int32_t* o = p.data<std::int32_t>();
  visit_int(scores, [&](const auto* s) {
    for_chunks(BH * T, [&](std::int64_t, std::int64_t r0, std::int64_t r1) {
      std::vector<std::int64_t> row(static_cast<std::size_t>(T));
      using S = std::remove_const_t<std::remove_pointer_t<decltype(s)>>;
      if constexpr (sizeof(S) >= 4) {
        if (ea.valid(sc)) {
          softmax_rows(s, r0, r1, T, T, true, ea, poly, o, row.data());
          return;
        }
      }
      for (std::int64_t r = r0; r < r1; ++r) {
        const std::int64_t n = r % T + 1;
        softmax_row_q30(s + r * T, n, sc, row.data());
        for (std::int64_t j = 0; j < n; ++j) o[r * T + j] = static_cast<std::int32_t>(row[static_cast<std::size_t>(j)]);
      }
    }, 64);
  });
  // The first row of every head attends to one key: its probability is
  // exactly 2^30, the largest possible, so the maximum is known.
  return requantize_with_max(p, std::uint64_t{1} << 30, out, key);
}

Tensor causal_softmax_backward(const Tensor& dP, const Tensor& P, double scale, const Format& out, RngKey key) {
  check_square(P, "causal_softmax_backward");
  const std::int64_t BH = P.batch(), T = P.cols();
  if (P.format().is_float()) {
    Tensor dS(P.shape(), Format::fp32());
    const float *p = P.data<float>(), *g = dP.data<float>();
    float* o = dS.data<float>();
    for_chunks(BH * T, [&](std::int64_t, std::int64_t r0, std::int64_t r1) {
      for (std::int64_t r = r0; r < r1; ++r) {
        const std::int64_t n = r % T + 1;
        double dot = 0.0;
        for (std::int64_t j = 0; j < n; ++j) dot += static_cast<double>(p[r * T + j]) * g[r * T + j];
        for (std::int64_t j = 0; j < n; ++j)
          o[r * T + j] = static_cast<float>(scale * p[r * T + j] * (g[r * T + j] - dot));
      }
    }, 64);
    return cast(dS, out, key);
  }
  // dP * c rounded to 24 bits: c = 1/sqrt(d_head) as a Q20 multiplier.
  const std::int64_t c_q20 = std::llround(std::ldexp(scale, 20));
  Tensor dps = Tensor::uninitialized(P.shape(), Format::accumulator(64), dP.exponent() - 20);
  std::int64_t* pd = dps.data<std::int64_t>();
  visit_int(dP, [&](const auto* g) {
    for_chunks(dP.numel(), [&](std::int64_t, std::int64_t i0, std::int64_t i1) {
      for (std::int64_t i = i0; i < i1; ++i) pd[i] = static_cast<std::int64_t>(g[i]) * c_q20;
    });
  });
  const Tensor g24 = requantize(dps, residual_format(), key.derive(1));
  const std::int32_t* g = g24.data<std::int32_t>();
  // dS = P (g - sum_k P_k g_k) at exponent e_p + e_g + (-e_p) ... all terms
  // at exponent e_p + e_g: g_j is lifted by -e_p (P <= 1, so e_p <= 0).
  const int ep = P.exponent();
  if (ep > 0) throw std::logic_error("causal_softmax_backward: probabilities with a positive exponent");
  Tensor acc(P.shape(), Format::accumulator(64), 2 * ep + g24.exponent());
  std::int64_t* o = acc.data<std::int64_t>();
  visit_int(P, [&](const auto* p) {
    for_chunks(BH * T, [&](std::int64_t, std::int64_t r0, std::int64_t r1) {
      for (std::int64_t r = r0; r < r1; ++r) {
        const std::int64_t n = r % T + 1;
        std::int64_t dot = 0;  // |dot| <= max|g| * sum_k p_k <= 2^23 * 2^(-e_p) (P sums to 1)
        for (std::int64_t j = 0; j < n; ++j) dot += static_cast<std::int64_t>(p[r * T + j]) * g[r * T + j];
        for (std::int64_t j = 0; j < n; ++j) {
          const std::int64_t inner = (static_cast<std::int64_t>(g[r * T + j]) << -ep) - dot;  // < 2^39
          o[r * T + j] = static_cast<std::int64_t>(p[r * T + j]) * inner;                       // < 2^15 * 2^39
        }
      }
    }, 64);
  });
  return requantize(acc, out, key.derive(2));
}

// ---------------------------------------------------------------------------
// Cross-entropy
// ---------------------------------------------------------------------------

namespace {

void check_targets(const std::int32_t* targets, std::int64_t R, std::int64_t V) {
  for (std::int64_t r = 0; r < R; ++r) {
    if (targets[r] < 0 || targets[r] >= V) {
      throw std::invalid_argument("cross_entropy: target " + std::to_string(targets[r]) + " at row " +
                                  std::to_string(r) + " is outside the vocabulary of " + std::to_string(V));
    }
  }
}

}  // namespace

double cross_entropy_loss(const Tensor& logits, const std::int32_t* targets) {
  const std::int64_t V = logits.cols(), R = logits.numel() / V;
  check_targets(targets, R, V);
  // Per-row log-sum-exp in double, for reporting; rows summed in chunk order.
  const double scale = logits.format().is_float() ? 1.0 : std::ldexp(1.0, logits.exponent());
  return reduce_chunks(
             R, 0.0,
             [&](std::int64_t r0, std::int64_t r1) {
               std::vector<double> row(static_cast<std::size_t>(V));
               double s = 0.0;
               for (std::int64_t r = r0; r < r1; ++r) {
                 if (logits.format().is_float()) {
                   const float* l = logits.data<float>() + r * V;
                   for (std::int64_t j = 0; j < V; ++j) row[static_cast<std::size_t>(j)] = l[j];
                 } else {
                   visit_int(logits, [&](const auto* l) {
                     for (std::int64_t j = 0; j < V; ++j)
                       row[static_cast<std::size_t>(j)] = static_cast<double>(l[r * V + j]) * scale;
                   });
                 }
                 const double mx = *std::max_element(row.begin(), row.end());
                 double z = 0.0;
                 for (double v : row) z += std::exp(v - mx);
                 s += mx + std::log(z) - row[static_cast<std::size_t>(targets[r])];
               }
               return s;
             },
             std::plus<>(), 64) /
         static_cast<double>(R);
}

namespace {

// grad = weight * (softmax(logits) - target) / R, cast to grad_format; the
// target rows come from `subtract(r, p)`, which subtracts row r's target from
// p: float probabilities (float logits) or Q30 integers (integer logits).
template <class SubtractFloat, class SubtractQ30>
Tensor softmax_minus_target(const Tensor& logits, double weight, const Format& grad_format, RngKey key,
                            SubtractFloat subtract_float, SubtractQ30 subtract_q30) {
  const std::int64_t V = logits.cols(), R = logits.numel() / V;
  const std::int64_t R_all = slice_rows(key, R);  // the mean is over the global batch
  if (logits.format().is_float()) {
    Tensor g(logits.shape(), Format::fp32());
    const float* l = logits.data<float>();
    float* o = g.data<float>();
    const double w = weight / static_cast<double>(R_all);
    for_chunks(R, [&](std::int64_t, std::int64_t r0, std::int64_t r1) {
      std::vector<double> p(static_cast<std::size_t>(V));
      for (std::int64_t r = r0; r < r1; ++r) {
        const float* lr = l + r * V;
        const float mx = *std::max_element(lr, lr + V);
        double sum = 0.0;
        for (std::int64_t j = 0; j < V; ++j) sum += p[static_cast<std::size_t>(j)] = std::exp(static_cast<double>(lr[j]) - mx);
        for (std::int64_t j = 0; j < V; ++j) p[static_cast<std::size_t>(j)] /= sum;
        subtract_float(r, p.data());
        for (std::int64_t j = 0; j < V; ++j) o[r * V + j] = static_cast<float>(p[static_cast<std::size_t>(j)] * w);
      }
    }, 64);
    return cast(g, grad_format, key);
  }
  const std::int64_t* poly = exp2_poly().c.data();
  const ExpScale sc = exp_scale(1.0, logits.exponent());
  const ExpArgs ea(sc);
  // grad = (p - target) * m at exponent -30 - k, with weight / R = m * 2^-k:
  // k = 30 + bit_length(R) - ilogb(weight) puts m in (2^30, 2^32], so
  // |p - target| <= 2^30 keeps the product below 2^62.
  const int k = 30 + bit_length(static_cast<std::uint64_t>(R_all)) - std::ilogb(weight);
  const std::int64_t m = std::llround(std::ldexp(weight, k) / static_cast<double>(R_all));
  Tensor acc = Tensor::uninitialized(logits.shape(), Format::accumulator(64), -30 - k);
  std::int64_t* o = acc.data<std::int64_t>();
  std::vector<std::uint64_t> mx(static_cast<std::size_t>(num_chunks(R, 64)), 0);
  visit_int(logits, [&](const auto* l) {
    for_chunks(R, [&](std::int64_t c, std::int64_t r0, std::int64_t r1) {
      std::vector<std::int64_t> tmp(static_cast<std::size_t>(V));
      std::vector<std::int32_t> p(static_cast<std::size_t>(V));
      std::uint64_t mc = 0;
      for (std::int64_t r = r0; r < r1; ++r) {
        using S = std::remove_const_t<std::remove_pointer_t<decltype(l)>>;
        bool done = false;
        if constexpr (sizeof(S) >= 4) {
          if (ea.valid(sc)) {
            softmax_rows(l + r * V, 0, 1, 1, V, false, ea, poly, p.data(), tmp.data());
            done = true;
          }
        }
        if (!done) {
          softmax_row_q30(l + r * V, V, sc, tmp.data());
          for (std::int64_t j = 0; j < V; ++j) p[static_cast<std::size_t>(j)] = static_cast<std::int32_t>(tmp[static_cast<std::size_t>(j)]);
        }
        subtract_q30(r, p.data());
        for (std::int64_t j = 0; j < V; ++j) {
          const std::int64_t g = static_cast<std::int64_t>(p[static_cast<std::size_t>(j)]) * m;
          o[r * V + j] = g;
          mc = std::max(mc, abs_u64(g));
        }
      }
      mx[static_cast<std::size_t>(c)] = mc;
    }, 64);
  });
  std::uint64_t mxall = 0;
  for (auto v : mx) mxall = std::max(mxall, v);
  return requantize_with_max(acc, mxall, grad_format, key);
}

}  // namespace

CrossEntropy cross_entropy(const Tensor& logits, const std::int32_t* targets, const Format& grad_format, RngKey key) {
  CrossEntropy ce;
  ce.loss = cross_entropy_loss(logits, targets);  // also checks the targets
  ce.grad = softmax_minus_target(
      logits, 1.0, grad_format, key, [&](std::int64_t r, double* p) { p[targets[r]] -= 1.0; },
      [&](std::int64_t r, std::int32_t* p) { p[targets[r]] -= std::int32_t{1} << 30; });
  return ce;
}

Tensor soft_cross_entropy_grad(const Tensor& logits, const Tensor& target, double weight, const Format& grad_format,
                               RngKey key) {
  const std::int64_t V = logits.cols();
  if (target.numel() != logits.numel() || target.cols() != V) {
    throw std::invalid_argument("soft_cross_entropy_grad: target " + target.describe() + " does not match the logits " +
                                logits.describe());
  }
  if (!(weight > 0.0) || !std::isfinite(weight)) {
    throw std::invalid_argument("soft_cross_entropy_grad: weight must be positive and finite, got " + std::to_string(weight));
  }
  const bool int_logits = logits.format().is_integer();
  if (int_logits != (target.dtype() == DType::I32 && target.exponent() == -30)) {
    throw std::invalid_argument("soft_cross_entropy_grad: integer logits need an int32 Q30 target (exponent -30), float "
                                "logits an fp32 target; got " + target.describe() + " for " + logits.describe());
  }
  return softmax_minus_target(
      logits, weight, grad_format, key,
      [&](std::int64_t r, double* p) {
        const float* t = target.data<float>() + r * V;
        for (std::int64_t j = 0; j < V; ++j) p[j] -= t[j];
      },
      [&](std::int64_t r, std::int32_t* p) {
        const std::int32_t* t = target.data<std::int32_t>() + r * V;
        for (std::int64_t j = 0; j < V; ++j) p[j] -= t[j];
      });
}

}  // namespace intrain
