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
#include "core/simd.h"

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

// The integer kernels. z is in residual_format() (int32, |z| < 2^23) at
// exponent ez. zq = z in Q16, computed once per element by a hoisted shift;
// values beyond the table (|z| >= 8) are flagged by comparing z itself with
// 8 * 2^-ez, so no shift can overflow. Branch-free bodies, multiversioned.
struct Q16View {
  ExponentShift to_q16;
  std::int64_t lim;  // |z| >= lim  <=>  |z_real| >= 8
  explicit Q16View(int ez) : to_q16(ez, -kFrac), lim(ez >= 3 ? 1 : (ez >= -40 ? (std::int64_t{8} << -ez) : INT64_MAX)) {}
};

INTRAIN_INLINE std::int64_t lerp_clamped(const std::int64_t* t, std::int64_t zq) {
  std::int64_t u = zq + kRange;
  u = u < 0 ? 0 : (u > 2 * kRange - 1 ? 2 * kRange - 1 : u);
  const std::int64_t i = u >> kStepBits, frac = u & ((1 << kStepBits) - 1);
  const std::int64_t a = t[i], b = t[i + 1];
  return a + (((b - a) * frac + (1 << (kStepBits - 1))) >> kStepBits);
}

// out = gelu(z) at exponent eo = max(-16, ez); returns max |out|.
INTRAIN_CLONES std::uint64_t gelu_fwd_kernel(const std::int32_t* z, std::int64_t* out, std::int64_t n, int ez, int eo,
                                             const std::int64_t* table) {
  const Q16View q(ez);
  const ExponentShift from_q16(-kFrac, eo), from_z(ez, eo);
  std::uint64_t mx = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int64_t v = z[i];
    const bool hi = v >= q.lim, lo = v <= -q.lim;
    const std::int64_t zq = (hi | lo) ? 0 : q.to_q16(v);
    const std::int64_t inside = from_q16(lerp_clamped(table, zq));
    const std::int64_t o = hi ? from_z(v) : (lo ? 0 : inside);
    out[i] = o;
    const std::uint64_t a = o < 0 ? 0 - static_cast<std::uint64_t>(o) : static_cast<std::uint64_t>(o);
    mx = a > mx ? a : mx;
  }
  return mx;
}

// out = dy * gelu'(z) at exponent e_dy - 16; returns max |out|.
INTRAIN_CLONES std::uint64_t gelu_bwd_kernel(const std::int32_t* dy, const std::int32_t* z, std::int64_t* out,
                                             std::int64_t n, int ez, const std::int64_t* table) {
  const Q16View q(ez);
  std::uint64_t mx = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int64_t v = z[i];
    const bool hi = v >= q.lim, lo = v <= -q.lim;
    const std::int64_t zq = (hi | lo) ? 0 : q.to_q16(v);
    const std::int64_t d = hi ? (std::int64_t{1} << kFrac) : (lo ? 0 : lerp_clamped(table, zq));
    const std::int64_t o = static_cast<std::int64_t>(dy[i]) * d;  // < 2^23 * 2^17
    out[i] = o;
    const std::uint64_t a = o < 0 ? 0 - static_cast<std::uint64_t>(o) : static_cast<std::uint64_t>(o);
    mx = a > mx ? a : mx;
  }
  return mx;
}

std::uint64_t max_of(const std::vector<std::uint64_t>& v) {
  std::uint64_t m = 0;
  for (auto x : v) m = std::max(m, x);
  return m;
}

Tensor gelu_forward_int(const Tensor& z_in, const Format& out, RngKey key) {
  const Tensor z = z_in.dtype() == DType::I32 ? z_in : cast(z_in, residual_format(), key.derive(3));
  const int eo = std::max(-kFrac, z.exponent());
  Tensor acc = Tensor::uninitialized(z.shape(), Format::accumulator(64), eo);
  std::vector<std::uint64_t> mx(static_cast<std::size_t>(num_chunks(z.numel())));
  const std::int32_t* pz = z.data<std::int32_t>();
  std::int64_t* o = acc.data<std::int64_t>();
  for_chunks(z.numel(), [&](std::int64_t c, std::int64_t i0, std::int64_t i1) {
    mx[static_cast<std::size_t>(c)] = gelu_fwd_kernel(pz + i0, o + i0, i1 - i0, z.exponent(), eo, tables().f.data());
  });
  return requantize_with_max(acc, max_of(mx), out, key);
}

Tensor gelu_backward_int(const Tensor& dy_in, const Tensor& z_in, const Format& out, RngKey key) {
  const Tensor dy = cast(dy_in, residual_format(), key.derive(1));  // |dy| < 2^23
  const Tensor z = z_in.dtype() == DType::I32 ? z_in : cast(z_in, residual_format(), key.derive(3));
  Tensor acc = Tensor::uninitialized(z.shape(), Format::accumulator(64), dy.exponent() - kFrac);
  std::vector<std::uint64_t> mx(static_cast<std::size_t>(num_chunks(z.numel())));
  const std::int32_t *pz = z.data<std::int32_t>(), *pdy = dy.data<std::int32_t>();
  std::int64_t* o = acc.data<std::int64_t>();
  for_chunks(z.numel(), [&](std::int64_t c, std::int64_t i0, std::int64_t i1) {
    mx[static_cast<std::size_t>(c)] = gelu_bwd_kernel(pdy + i0, pz + i0, o + i0, i1 - i0, z.exponent(), tables().df.data());
  });
  return requantize_with_max(acc, max_of(mx), out, key.derive(2));
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
