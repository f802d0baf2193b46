// GELU (tanh form), forward and backward, float and integer side by side.
//
//   gelu(z)  = 0.5 z (1 + tanh(u)),  u = sqrt(2/pi) (z + 0.044715 z^3)
//   gelu'(z) = 0.5 (1 + tanh(u)) + 0.5 z (1 - tanh(u)^2) sqrt(2/pi) (1 + 3 * 0.044715 z^2)
//
// Integer: z is brought to Q16 (exponent -16) and both functions are read
// from tables of Q16 values on [-8, 8) at steps of 2^-6, with linear
// interpolation between neighbours: all integer adds, multiplies and shifts.
// The interpolation error is at most h^2/8 * max|f''| = 2^-15 * 0.8 ~ 2.4e-5
// for gelu and ~4.6e-5 for gelu', below the Q16 step plus one, and far below
// the step of an int8 or int16 activation. Outside [-8, 8) gelu(z) is z or 0
// and gelu'(z) is 1 or 0 to within 1e-14. The tables are built once per
// process from the formulas above; no float touches the data path.
#include <array>
#include <cmath>

#include "core/fixed_point.h"
#include "core/ops.h"
#include "core/parallel.h"
#include "core/quantize.h"

namespace intrain {

namespace {

constexpr double kSqrt2OverPi = 0.7978845608028654;
constexpr double kCubic = 0.044715;

double gelu_exact(double z) { return 0.5 * z * (1.0 + std::tanh(kSqrt2OverPi * (z + kCubic * z * z * z))); }
double gelu_grad_exact(double z) {
  const double t = std::tanh(kSqrt2OverPi * (z + kCubic * z * z * z));
  return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * kSqrt2OverPi * (1.0 + 3.0 * kCubic * z * z);
}

constexpr int kFrac = 16;                        // Q16
constexpr int kStepBits = 10;                    // table step 2^(10-16) = 2^-6
constexpr std::int64_t kRange = 8LL << kFrac;    // |z| < 8
constexpr int kEntries = static_cast<int>((2 * kRange) >> kStepBits) + 1;  // 1025

struct Tables {
  std::array<std::int64_t, kEntries> f{}, df{};
  Tables() {
    for (int i = 0; i < kEntries; ++i) {
      const double z = std::ldexp(static_cast<double>((static_cast<std::int64_t>(i) << kStepBits) - kRange), -kFrac);
      f[static_cast<std::size_t>(i)] = std::llround(std::ldexp(gelu_exact(z), kFrac));
      df[static_cast<std::size_t>(i)] = std::llround(std::ldexp(gelu_grad_exact(z), kFrac));
    }
  }
};
const Tables& tables() {
  static const Tables t;
  return t;
}

// Linear interpolation in a table at zq (Q16, |zq| < 8 * 2^16).
inline std::int64_t lerp(const std::array<std::int64_t, kEntries>& t, std::int64_t zq) {
  const std::int64_t u = zq + kRange;
  const std::int64_t i = u >> kStepBits, frac = u & ((1 << kStepBits) - 1);
  const std::int64_t a = t[static_cast<std::size_t>(i)], b = t[static_cast<std::size_t>(i + 1)];
  return a + shift_round_nearest((b - a) * frac, kStepBits);
}

// z (mantissa m at exponent e) in Q16; `outside` is -1 / +1 when z <= -8 / z >= 8.
inline std::int64_t to_q16(std::int64_t m, int e, int& outside) {
  // |z| >= 2^24 cannot be shifted safely, and is outside the table anyway.
  if (e > -kFrac && bit_length(static_cast<std::uint64_t>(m < 0 ? -m : m)) + (e + kFrac) > 40) {
    outside = m < 0 ? -1 : 1;
    return 0;
  }
  const std::int64_t q = shift_to(m, e, -kFrac);
  outside = q >= kRange ? 1 : (q <= -kRange ? -1 : 0);
  return q;
}

Tensor gelu_forward_int(const Tensor& z, const Format& out, RngKey key) {
  const Tables& tb = tables();
  // Output in Q16; for z >= 8 the output is z itself, which may need more
  // range: keep the output at exponent min(-16, e_z).
  const int eo = std::min(-kFrac, z.exponent());
  Tensor acc = Tensor::uninitialized(z.shape(), Format::accumulator(64), eo);
  std::int64_t* o = acc.data<std::int64_t>();
  visit_int(z, [&](const auto* pz) {
    for_chunks(z.numel(), [&](std::int64_t, std::int64_t i0, std::int64_t i1) {
      for (std::int64_t i = i0; i < i1; ++i) {
        int outside = 0;
        const std::int64_t q = to_q16(pz[i], z.exponent(), outside);
        if (outside > 0) {
          o[i] = shift_to(pz[i], z.exponent(), eo);
        } else if (outside < 0) {
          o[i] = 0;
        } else {
          o[i] = shift_to(lerp(tb.f, q), -kFrac, eo);
        }
      }
    });
  });
  return requantize(acc, out, key);
}

Tensor gelu_backward_int(const Tensor& dy_in, const Tensor& z, const Format& out, RngKey key) {
  const Tables& tb = tables();
  const Tensor dy = cast(dy_in, residual_format(), key.derive(1));  // |dy| < 2^23
  Tensor acc = Tensor::uninitialized(z.shape(), Format::accumulator(64), dy.exponent() - kFrac);
  std::int64_t* o = acc.data<std::int64_t>();
  const std::int32_t* pdy = dy.data<std::int32_t>();
  visit_int(z, [&](const auto* pz) {
    for_chunks(z.numel(), [&](std::int64_t, std::int64_t i0, std::int64_t i1) {
      for (std::int64_t i = i0; i < i1; ++i) {
        int outside = 0;
        const std::int64_t q = to_q16(pz[i], z.exponent(), outside);
        const std::int64_t d = outside > 0 ? (1 << kFrac) : (outside < 0 ? 0 : lerp(tb.df, q));
        o[i] = static_cast<std::int64_t>(pdy[i]) * d;  // < 2^23 * 2^17
      }
    });
  });
  return requantize(acc, out, key.derive(2));
}

}  // namespace

Tensor gelu_forward(const Tensor& z, const Format& out, RngKey key) {
  if (z.format().is_float()) {
    Tensor y(z.shape(), Format::fp32());
    const float* p = z.data<float>();
    float* o = y.data<float>();
    for_chunks(z.numel(), [&](std::int64_t, std::int64_t i0, std::int64_t i1) {
      for (std::int64_t i = i0; i < i1; ++i) o[i] = static_cast<float>(gelu_exact(p[i]));
    });
    return cast(y, out, key);
  }
  return gelu_forward_int(z, out, key);
}

Tensor gelu_backward(const Tensor& dy, const Tensor& z, const Format& out, RngKey key) {
  if (z.numel() != dy.numel()) {
    throw std::invalid_argument("gelu_backward: dy " + dy.describe() + " and z " + z.describe() + " differ in size");
  }
  if (z.format().is_float()) {
    Tensor dz(z.shape(), Format::fp32());
    const float *p = z.data<float>(), *g = dy.data<float>();
    float* o = dz.data<float>();
    for_chunks(z.numel(), [&](std::int64_t, std::int64_t i0, std::int64_t i1) {
      for (std::int64_t i = i0; i < i1; ++i) o[i] = static_cast<float>(g[i] * gelu_grad_exact(p[i]));
    });
    return cast(dz, out, key);
  }
  return gelu_backward_int(dy, z, out, key);
}

}  // namespace intrain
