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

// Q16 values fit in int32: |gelu| < 8 * 2^16, |gelu'| < 1.2 * 2^16.
struct Tables {
  std::array<std::int32_t, kEntries + 1> f{}, df{};  // one spare entry: index kEntries-1 reads i + 1
  Tables() {
    for (int i = 0; i < kEntries; ++i) {
      const double z = std::ldexp(static_cast<double>((static_cast<std::int64_t>(i) << kStepBits) - kRange), -kFrac);
      f[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(std::llround(std::ldexp(gelu_exact(z), kFrac)));
      df[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(std::llround(std::ldexp(gelu_grad_exact(z), kFrac)));
    }
    f[kEntries] = f[kEntries - 1];
    df[kEntries] = df[kEntries - 1];
  }
};
const Tables& tables() {
  static const Tables t;
  return t;
}

// The integer kernels, all in 32-bit lanes. z is in residual_format()
// (int32, |z| < 2^23) at exponent ez. Values with |z_real| >= 8 are flagged
// by comparing z with lim = 8 * 2^-ez; the others are shifted to Q16 after
// clamping to +-lim, so no shift can overflow 32 bits (|zq| < 2^19); right
// shifts are capped at 30, which rounds every |z| < 2^23 to 0 as a longer
// shift would. The
// interpolation (b - a) * frac < 2^11 * 2^10 fits too.
struct Q16View {
  int left, right;  // z -> Q16: one of them is 0
  std::int32_t half, lim;
  explicit Q16View(int ez)
      : left(std::max(0, ez + kFrac)), right(std::min(30, std::max(0, -kFrac - ez))),
        half(right > 0 ? std::int32_t{1} << (right - 1) : 0),
        lim(ez >= 3 ? 1 : (ez >= -20 ? static_cast<std::int32_t>(std::int64_t{8} << -ez) : INT32_MAX)) {}
};

// Table value at z (Q16, linear interpolation); inside-table lanes only.
INTRAIN_INLINE std::int32_t lerp32(const std::int32_t* __restrict t, std::int32_t v, const Q16View& q) {
  const std::int32_t c = v > q.lim ? q.lim : (v < -q.lim ? -q.lim : v);
  const std::int32_t zq = ((c << q.left) + q.half) >> q.right;
  std::int32_t u = zq + static_cast<std::int32_t>(kRange);
  u = u < 0 ? 0 : u;
  u = u > 2 * static_cast<std::int32_t>(kRange) - 1 ? 2 * static_cast<std::int32_t>(kRange) - 1 : u;
  const std::int32_t i = u >> kStepBits, frac = u & ((1 << kStepBits) - 1);
  const std::int32_t a = t[i], b = t[i + 1];
  return a + (((b - a) * frac + (1 << (kStepBits - 1))) >> kStepBits);
}

// out = gelu(z) at exponent eo = max(-16, ez), in int32; returns max |out|.
INTRAIN_CLONES std::uint32_t gelu_fwd_kernel(const std::int32_t* __restrict z, std::int32_t* __restrict out,
                                             std::int64_t n, int ez, const std::int32_t* __restrict table) {
  const Q16View q(ez);
  // The output shifts: table values (Q16) right by ez + 16 when ez > -16;
  // z itself right by -16 - ez when ez < -16. One of the two is 0. Both are
  // capped at 30: every value is below 2^24, so a rounded shift by 30 gives 0,
  // as any longer one would.
  const int tr = std::min(30, std::max(0, ez + kFrac)), zr = std::min(30, std::max(0, -kFrac - ez));
  const std::int32_t th = tr > 0 ? std::int32_t{1} << (tr - 1) : 0;
  const std::int32_t zh = zr > 0 ? std::int32_t{1} << (zr - 1) : 0;
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int32_t v = z[i];
    const std::int32_t inside = (lerp32(table, v, q) + th) >> tr;
    const std::int32_t big = (v + zh) >> zr;
    out[i] = v >= q.lim ? big : (v <= -q.lim ? 0 : inside);
  }
  std::uint32_t mx = 0;  // a second, cache-resident pass: fused, the loop does not vectorise
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int32_t o = out[i];
    const std::uint32_t a = o < 0 ? 0u - static_cast<std::uint32_t>(o) : static_cast<std::uint32_t>(o);
    mx = a > mx ? a : mx;
  }
  return mx;
}

// d = gelu'(z) in Q16 (int32); the product with dy is formed by the caller.
INTRAIN_CLONES void gelu_grad_kernel(const std::int32_t* __restrict z, std::int32_t* __restrict d, std::int64_t n,
                                     int ez, const std::int32_t* __restrict table) {
  const Q16View q(ez);
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int32_t v = z[i];
    const std::int32_t inside = lerp32(table, v, q);
    d[i] = v >= q.lim ? (std::int32_t{1} << kFrac) : (v <= -q.lim ? 0 : inside);
  }
}

// out = dy * d (int64); returns max |out|.
INTRAIN_CLONES std::uint64_t mul_wide_kernel(const std::int32_t* __restrict dy, const std::int32_t* __restrict d,
                                             std::int64_t* __restrict out, std::int64_t n) {
  std::uint64_t mx = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int64_t o = static_cast<std::int64_t>(dy[i]) * d[i];  // < 2^23 * 2^17
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
  Tensor acc = Tensor::uninitialized(z.shape(), Format::accumulator(32), eo);
  std::vector<std::uint64_t> mx(static_cast<std::size_t>(num_chunks(z.numel())));
  const std::int32_t* pz = z.data<std::int32_t>();
  std::int32_t* o = acc.data<std::int32_t>();
  for_chunks(z.numel(), [&](std::int64_t c, std::int64_t i0, std::int64_t i1) {
    mx[static_cast<std::size_t>(c)] = gelu_fwd_kernel(pz + i0, o + i0, i1 - i0, z.exponent(), tables().f.data());
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
    std::vector<std::int32_t> d(static_cast<std::size_t>(i1 - i0));
    gelu_grad_kernel(pz + i0, d.data(), i1 - i0, z.exponent(), tables().df.data());
    mx[static_cast<std::size_t>(c)] = mul_wide_kernel(pdy + i0, d.data(), o + i0, i1 - i0);
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
