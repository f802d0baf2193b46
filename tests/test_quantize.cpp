// Quantization (float -> integer), dequantization, requantization of integer
// accumulators, grouped quantization, and determinism across thread counts
// (core/quantize.h), against element-wise references.
//
// Exactness: a float times a power of two is exact in double (no test below
// leaves the double exponent range unless it says so), std::nearbyint under
// the default rounding mode rounds half to even, and floor/subtraction of a
// double's integer part are exact. So the fixed-point references below are
// exact, and the comparisons are bit for bit, not within a tolerance.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <boost/multiprecision/cpp_int.hpp>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/format.h"
#include "core/parallel.h"
#include "core/quantize.h"
#include "core/rng.h"
#include "core/rounding.h"
#include "core/tensor.h"
#include "test_support.h"

namespace intrain {
namespace {

using boost::multiprecision::cpp_int;

constexpr double k2p32 = 4294967296.0;  // 2^32


// Sets the OpenMP thread count for a scope and restores it afterwards.
class ThreadCount {
 public:
  explicit ThreadCount(int n) : saved_(omp_get_max_threads()) { omp_set_num_threads(n); }
  ~ThreadCount() { omp_set_num_threads(saved_); }
  ThreadCount(const ThreadCount&) = delete;
  ThreadCount& operator=(const ThreadCount&) = delete;

 private:
  int saved_;
};

std::vector<Format> signed_widths(Rounding r) {
  std::vector<Format> f;
  for (int b = 2; b <= 16; ++b) f.push_back(Format::fixed(b, r));
  return f;
}

// ---------------------------------------------------------------------------
// References
// ---------------------------------------------------------------------------

// The quantization of one float at exponent e. For stochastic rounding the rule
// is "round up iff frac * 2^32 > r" (P(up) = frac exactly whenever the fraction
// has at most 32 bits). When frac * 2^32 is not an integer, truncating it first
// (as shift_round does) is an equally valid rule with a bias below 2^-32; the
// two differ only when r == floor(frac * 2^32). `alt` is the truncating answer.
struct QuantRef {
  std::int64_t q;    // the expected mantissa
  std::int64_t alt;  // an equally valid mantissa (== q except in the case above)
  bool clipped;
};

QuantRef ref_quantize(float x, int e, Rounding mode, std::uint32_t r, std::int64_t lo, std::int64_t hi) {
  const double y = std::ldexp(static_cast<double>(x), -e);  // exact (or +-inf / 0 at absurd exponents)
  double q, alt;
  if (mode == Rounding::Nearest) {
    q = alt = std::nearbyint(y);
  } else {
    const double fl = std::floor(y);
    const double F = std::isfinite(y) ? (y - fl) * k2p32 : 0.0;
    q = fl + (F > r ? 1.0 : 0.0);
    alt = fl + (std::floor(F) > r ? 1.0 : 0.0);
  }
  const auto clamp = [&](double v, bool& c) {
    c = v > static_cast<double>(hi) || v < static_cast<double>(lo);
    return v > static_cast<double>(hi) ? hi : v < static_cast<double>(lo) ? lo : static_cast<std::int64_t>(v);
  };
  bool c1 = false, c2 = false;
  QuantRef out;
  out.q = clamp(q, c1);
  out.alt = clamp(alt, c2);
  out.clipped = c1;
  return out;
}

// Checks every mantissa of t against ref_quantize at t's exponent; returns the
// reference saturation count.
std::int64_t expect_matches_quant_ref(const Tensor& t, const std::vector<float>& x, RngKey key) {
  const Format& f = t.format();
  std::int64_t clipped = 0, bad = 0;
  for (std::int64_t i = 0; i < t.numel(); ++i) {
    const QuantRef r = ref_quantize(x[static_cast<std::size_t>(i)], t.exponent(), f.rounding(),
                                    key.bits(static_cast<std::uint32_t>(i)), f.qmin(), f.qmax());
    clipped += r.clipped;
    const std::int64_t m = t.mantissa(i);
    if (m != r.q && m != r.alt && ++bad <= 5) {
      ADD_FAILURE() << t.describe() << " element " << i << " x=" << x[static_cast<std::size_t>(i)] << ": got " << m
                    << ", expected " << r.q;
    }
  }
  EXPECT_EQ(bad, 0);
  return clipped;
}

// The requantization of one integer by shift s (negative: a left shift), saturated.
std::int64_t ref_requant(std::int64_t v, int s, Rounding mode, std::uint32_t r, std::int64_t lo, std::int64_t hi,
                         std::int64_t& clipped) {
  if (s >= 0) return saturate(shift_round(v, s, mode, r), lo, hi, clipped);
  const cpp_int w = cpp_int(v) << (-s);  // exact left shift
  if (w > hi) {
    ++clipped;
    return hi;
  }
  if (w < lo) {
    ++clipped;
    return lo;
  }
  return w.convert_to<std::int64_t>();
}

// The smallest s >= 0 with ceil(max_abs / 2^s) <= qmax, by exhaustive search.
int ref_shift_for_max(std::uint64_t max_abs, std::int64_t qmax) {
  for (int s = 0; s <= 80; ++s) {
    if (((cpp_int(max_abs) + (cpp_int(1) << s) - 1) >> s) <= qmax) return s;
  }
  return -1;
}

// Random floats: mostly N(0, scale), with exact zeros, negative zeros, tiny
// values, and a few outliers, so that mantissas of every size appear.
std::vector<float> random_floats(std::size_t n, std::uint64_t seed, float scale = 1.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.0f, scale);
  std::vector<float> x(n);
  for (std::size_t i = 0; i < n; ++i) {
    switch (rng() % 16) {
      case 0:
        x[i] = 0.0f;
        break;
      case 1:
        x[i] = -0.0f;
        break;
      case 2:
        x[i] = nd(rng) * 1e-6f;
        break;
      case 3:
        x[i] = nd(rng) * 8.0f;
        break;
      default:
        x[i] = nd(rng);
        break;
    }
  }
  return x;
}

Tensor make_int(const Shape& shape, const Format& f, const std::vector<std::int64_t>& v, int exponent = 0) {
  Tensor t(shape, f, exponent);
  visit_int(t, [&](auto* p) {
    using T = std::remove_pointer_t<decltype(p)>;
    for (std::int64_t i = 0; i < t.numel(); ++i) p[i] = static_cast<T>(v[static_cast<std::size_t>(i)]);
  });
  return t;
}

// ---------------------------------------------------------------------------
// exponent_for_max and max_abs
// ---------------------------------------------------------------------------

TEST(ExponentForMax, SmallestExponentForEveryWidth) {
  std::mt19937_64 rng(1);
  std::vector<float> maxima = {1.0f,   0.5f, 3.0f, FLT_MAX, FLT_MIN, std::numeric_limits<float>::denorm_min(),
                               1e-30f, 1e30f};
  for (int i = 0; i < 300; ++i) {  // random positive finite floats over the whole exponent range
    std::uint32_t bits = static_cast<std::uint32_t>(rng()) & 0x7FFFFFFFu;
    if ((bits >> 23) == 0xFF) bits &= ~(1u << 30);  // NaN/Inf -> finite
    float f;
    std::memcpy(&f, &bits, 4);
    if (f > 0) maxima.push_back(f);
  }
  for (int b = 2; b <= 16; ++b) {
    const std::int64_t qmax = Format::fixed(b).qmax();
    std::vector<float> m = maxima;
    for (int k = -140; k <= 100; k += 7) {  // qmax * 2^k and its float neighbours: the boundaries
      const float p = std::ldexp(static_cast<float>(qmax), k);
      m.push_back(p);
      m.push_back(std::nextafter(p, 0.0f));
      m.push_back(std::nextafter(p, FLT_MAX));
    }
    for (float mx : m) {
      if (!(mx > 0) || !std::isfinite(mx)) continue;
      const int e = exponent_for_max(mx, qmax);
      const double q = static_cast<double>(qmax);
      EXPECT_LE(static_cast<double>(mx), std::ldexp(q, e)) << "bits " << b << " max " << mx;
      EXPECT_GT(static_cast<double>(mx), std::ldexp(q, e - 1)) << "bits " << b << " max " << mx << ": e-1 works";
    }
  }
  EXPECT_EQ(exponent_for_max(0.0, 127), 0);
  EXPECT_EQ(exponent_for_max(127.0, 127), 0);
  EXPECT_EQ(exponent_for_max(127.5, 127), 1);
  EXPECT_EQ(exponent_for_max(63.5, 127), -1);
  EXPECT_THROW((void)exponent_for_max(std::numeric_limits<double>::infinity(), 127), std::domain_error);
  EXPECT_THROW((void)exponent_for_max(std::numeric_limits<double>::quiet_NaN(), 127), std::domain_error);
}

TEST(MaxAbs, ExactAndNamesTheFirstNonFinite) {
  std::vector<float> x = random_floats(50000, 3);
  float want = 0;
  for (float v : x) want = std::max(want, std::fabs(v));
  EXPECT_EQ(max_abs(x), want);
  x[40000] = -1e9f;  // in a later chunk
  EXPECT_EQ(max_abs(x), 1e9f);
  EXPECT_EQ(max_abs(std::vector<float>{}), 0.0f);
  x[45000] = std::numeric_limits<float>::quiet_NaN();
  x[30000] = -std::numeric_limits<float>::infinity();
  const std::string msg = testing::thrown_message<std::domain_error>([&] { (void)max_abs(x); });
  EXPECT_MESSAGE_HAS(msg, "element 30000 ");
  EXPECT_MESSAGE_HAS(msg, "2 non-finite");
}

// ---------------------------------------------------------------------------
// quantize, Rounding::Nearest
// ---------------------------------------------------------------------------

// Every element is within half a step of its input, exactly (in double), the
// exponent is the smallest that covers max|x|, nothing saturates, and every
// mantissa equals round-half-even(x / 2^e).
void check_nearest_by_max(const std::vector<float>& x, const Shape& shape, const Format& f) {
  SCOPED_TRACE(f.name() + shape_str(shape));
  const Tensor t = quantize(x, shape, f);
  ASSERT_EQ(t.format(), f);
  ASSERT_EQ(t.shape(), shape);
  EXPECT_EQ(t.dtype(), f.storage());
  EXPECT_EQ(t.saturated(), 0);
  const int e = t.exponent();
  double mx = 0;
  for (float v : x) mx = std::max(mx, std::fabs(static_cast<double>(v)));
  const double qmax = static_cast<double>(f.qmax());
  if (mx > 0) {
    EXPECT_LE(mx, std::ldexp(qmax, e));
    EXPECT_GT(mx, std::ldexp(qmax, e - 1)) << "exponent " << e << " is not the smallest";
  } else {
    EXPECT_EQ(e, 0);
  }
  const double half_step = std::ldexp(1.0, e - 1);
  const std::vector<float> d = dequantize(t);
  std::int64_t bad = 0;
  for (std::int64_t i = 0; i < t.numel(); ++i) {
    const auto xi = static_cast<double>(x[static_cast<std::size_t>(i)]);
    const std::int64_t m = t.mantissa(i);
    // Within [qmin, qmax], and the exact reference.
    bool ok = m >= f.qmin() && m <= f.qmax() && m == static_cast<std::int64_t>(std::nearbyint(std::ldexp(xi, -e)));
    // |dequant - x| <= step / 2, with no slack: both sides are exact doubles.
    ok = ok && std::fabs(t.value(i) - xi) <= half_step;
    // The float dequantization is the exact value when the mantissa has at most
    // 24 bits (a float's precision; the data stays in the normal float range);
    // wider mantissas are rounded once to float, a relative error <= 2^-24.
    const double dv = d[static_cast<std::size_t>(i)];
    ok = ok && (f.bits() <= 24 ? dv == t.value(i) : std::fabs(dv - t.value(i)) <= std::fabs(t.value(i)) * 0x1p-24);
    if (!ok && ++bad <= 5) {
      ADD_FAILURE() << "element " << i << " x=" << xi << " mantissa " << m << " value " << t.value(i) << " dequant "
                    << d[static_cast<std::size_t>(i)] << " e=" << e;
    }
  }
  EXPECT_EQ(bad, 0);
}

TEST(QuantizeNearest, EveryBitWidthWithinHalfStep) {
  std::uint64_t seed = 100;
  for (const Format& f : signed_widths(Rounding::Nearest)) {
    check_nearest_by_max(random_floats(64 * 48, ++seed), {64, 48}, f);
    check_nearest_by_max(random_floats(3 * 5 * 7, ++seed, 1e-20f), {3, 5, 7}, f);
    check_nearest_by_max(random_floats(1000, ++seed, 3e4f), {1000}, f);
    // A negative maximum, and a maximum that sits exactly on qmax * 2^k.
    std::vector<float> x = random_floats(256, ++seed);
    x[17] = -40.0f;
    check_nearest_by_max(x, {16, 16}, f);
    x[17] = std::ldexp(static_cast<float>(f.qmax()), -5);
    check_nearest_by_max(x, {16, 16}, f);
    x[17] = std::nextafter(std::ldexp(static_cast<float>(f.qmax()), -5), 1.0f);  // just above: next exponent
    check_nearest_by_max(x, {16, 16}, f);
  }
}

// Wide formats (17-31 bits, int32 storage) follow the same rule.
TEST(QuantizeNearest, WideFormatsWithinHalfStep) {
  for (int b = 17; b <= 31; ++b) {
    check_nearest_by_max(random_floats(2000, 300 + static_cast<std::uint64_t>(b)), {40, 50},
                         Format::wide(b, Rounding::Nearest));
  }
}

TEST(QuantizeNearest, ExactTiesGoToEven) {
  for (const Format& f : signed_widths(Rounding::Nearest)) {
    SCOPED_TRACE(f.name());
    // max = qmax * 2^-3 fixes e = -3; then (k + 1/2) * 2^-3 are exact ties.
    std::vector<float> x = {std::ldexp(static_cast<float>(f.qmax()), -3)};
    const std::int64_t kmax = f.qmax() - 1;
    for (std::int64_t k : {std::int64_t{0}, std::int64_t{1}, std::int64_t{2}, std::int64_t{3}, kmax / 2, kmax}) {
      if (k < 0 || k > kmax) continue;
      const float t = std::ldexp(static_cast<float>(k) + 0.5f, -3);
      x.push_back(t);
      x.push_back(-t);
    }
    const Tensor q = quantize(x, {static_cast<std::int64_t>(x.size())}, f);
    ASSERT_EQ(q.exponent(), -3);
    EXPECT_EQ(q.mantissa(0), f.qmax());
    for (std::int64_t i = 1; i < q.numel(); ++i) {
      const double y = std::ldexp(static_cast<double>(x[static_cast<std::size_t>(i)]), 3);
      const std::int64_t m = q.mantissa(i);
      EXPECT_EQ(m % 2, 0) << "tie " << y << " went to odd " << m;
      EXPECT_EQ(std::fabs(static_cast<double>(m) - y), 0.5) << y;
    }
  }
}

TEST(QuantizeNearest, ZeroAndEmptyTensors) {
  for (const Format& f : signed_widths(Rounding::Nearest)) {
    const std::vector<float> z(100, 0.0f);
    const Tensor t = quantize(z, {10, 10}, f);
    EXPECT_EQ(t.exponent(), 0);
    EXPECT_EQ(t.saturated(), 0);
    for (std::int64_t i = 0; i < 100; ++i) ASSERT_EQ(t.mantissa(i), 0);
    for (float v : dequantize(t)) ASSERT_EQ(v, 0.0f);
    std::vector<float> nz(100, -0.0f);
    const Tensor n = quantize(nz, {100}, f);
    for (std::int64_t i = 0; i < 100; ++i) ASSERT_EQ(n.mantissa(i), 0);
    const Tensor e = quantize(std::vector<float>{}, {0, 4}, f);
    EXPECT_EQ(e.numel(), 0);
    EXPECT_EQ(e.exponent(), 0);
    EXPECT_TRUE(dequantize(e).empty());
  }
}

TEST(QuantizeUnsigned, NonNegativeInputsUpTo15Bits) {
  for (int b = 2; b <= 15; ++b) {
    std::vector<float> x = random_floats(512, 7 + static_cast<std::uint64_t>(b));
    for (float& v : x) v = std::fabs(v);
    check_nearest_by_max(x, {512}, Format::fixed(b, Rounding::Nearest, false));
  }
}

// uint16 is a valid Format::fixed stored in int32: the int32 quantize path.
// (Before commit 24eae17 this threw "Tensor: asked for int16 data of uint16".)
TEST(QuantizeUnsigned, Uint16Quantizes) {
  std::vector<float> x = random_floats(512, 77);
  for (float& v : x) v = std::fabs(v);
  try {
    check_nearest_by_max(x, {512}, Format::fixed(16, Rounding::Nearest, false));
  } catch (const std::exception& e) {
    ADD_FAILURE() << "quantize to uint16 threw: " << e.what();
  }
}

TEST(Quantize, NonFiniteInputThrowsNamingThePosition) {
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  struct Case {
    std::size_t n, pos;
    float bad;
  };
  for (const Case& c : {Case{64, 7, nan}, Case{64, 0, inf}, Case{40000, 20000, -inf}, Case{40000, 39999, nan}}) {
    std::vector<float> x = random_floats(c.n, 5);
    x[c.pos] = c.bad;
    const Shape shape = {static_cast<std::int64_t>(c.n) / 32, 32};
    const std::string at = "element " + std::to_string(c.pos) + " ";
    const std::string m1 = testing::thrown_message<std::domain_error>([&] { (void)quantize(x, shape, Format::fixed(8)); });
    EXPECT_MESSAGE_HAS(m1, at);
    const std::string m2 = testing::thrown_message<std::domain_error>(
        [&] { (void)quantize(x, shape, Format::fixed(12, Rounding::Stochastic), RngKey(1, 2)); });
    EXPECT_MESSAGE_HAS(m2, at);
    const std::string m3 = testing::thrown_message<std::domain_error>([&] { (void)quantize_at(x, shape, Format::fixed(8), 0); });
    EXPECT_MESSAGE_HAS(m3, at);
    const std::string m4 = testing::thrown_message<std::domain_error>([&] { (void)quantize(x, shape, Format::grouped(4, 32)); });
    EXPECT_MESSAGE_HAS(m4, at);
  }
}

TEST(Quantize, ArgumentErrors) {
  const std::vector<float> x(12, 1.0f);
  const std::string m = testing::thrown_message<std::invalid_argument>([&] { (void)quantize(x, {5, 2}, Format::fixed(8)); });
  EXPECT_MESSAGE_HAS(m, "[5,2]");
  EXPECT_MESSAGE_HAS(m, "12");
  EXPECT_THROW((void)quantize_at(x, {13}, Format::fixed(8), 0), std::invalid_argument);
  EXPECT_THROW((void)quantize(x, {12}, Format::accumulator(32)), std::invalid_argument);
  EXPECT_THROW((void)quantize_at(x, {12}, Format::accumulator(32), 0), std::invalid_argument);
  EXPECT_THROW((void)quantize_at(x, {12}, Format::grouped(4, 4), 0), std::invalid_argument);
  EXPECT_THROW((void)quantize_at(x, {12}, Format::fp32(), 0), std::invalid_argument);
  EXPECT_THROW((void)quantize(x, {3, 4}, Format::grouped(4, 8)), std::invalid_argument);  // 4 % 8 != 0
}

TEST(Quantize, Fp32IsAnExactCopy) {
  const std::vector<float> x = random_floats(1000, 9);
  const Tensor t = quantize(x, {10, 100}, Format::fp32());
  EXPECT_EQ(t.dtype(), DType::F32);
  EXPECT_EQ(dequantize(t), x);
}

// ---------------------------------------------------------------------------
// dequantize
// ---------------------------------------------------------------------------

TEST(Dequantize, AccumulatorsAndSizeCheck) {
  const Tensor a = make_int({4}, Format::accumulator(32), {std::numeric_limits<std::int32_t>::max(), -5, 0, 1}, -4);
  const std::vector<float> d = dequantize(a);
  EXPECT_EQ(d[0], static_cast<float>(std::ldexp(2147483647.0, -4)));
  EXPECT_EQ(d[1], -0.3125f);
  EXPECT_EQ(d[2], 0.0f);
  EXPECT_EQ(d[3], 0.0625f);
  const Tensor b = make_int({2}, Format::accumulator(64), {std::int64_t{1} << 50, -(std::int64_t{3} << 40)}, -50);
  EXPECT_EQ(dequantize(b), (std::vector<float>{1.0f, -3.0f / 1024.0f}));
  std::vector<float> wrong(3);
  const std::string m = testing::thrown_message<std::invalid_argument>([&] { dequantize_into(a, wrong); });
  EXPECT_MESSAGE_HAS(m, a.describe());
}

// Values near FLT_MAX round up to 2^128 at every width (e.g. int8: FLT_MAX /
// 2^122 = 63.99999 -> 64, and 64 * 2^122 = 2^128). Documents a bug:
// dequantize_into (core/quantize.cpp, SharedExponent case) converts the exact value to float
// without saturating, so finite inputs dequantize to +-inf.
TEST(Dequantize, NearFltMaxStaysFinite) {
  for (const Format& f : {Format::fixed(8), Format::fixed(16), Format::fixed(2)}) {
    const std::vector<float> x = {FLT_MAX, -FLT_MAX, 1.0f};
    const Tensor t = quantize(x, {3}, f);
    const std::vector<float> d = dequantize(t);
    for (std::size_t i = 0; i < 2; ++i) {
      EXPECT_TRUE(std::isfinite(d[i])) << f.name() << ": dequantize(quantize(" << x[i] << ")) = " << d[i]
                                       << " (exact value " << t.value(static_cast<std::int64_t>(i)) << ")";
    }
  }
}

// ---------------------------------------------------------------------------
// quantize, Rounding::Stochastic
// ---------------------------------------------------------------------------

TEST(QuantizeStochastic, EveryBitWidthWithinOneStepAndOnTheRule) {
  std::uint64_t seed = 500;
  for (const Format& f : signed_widths(Rounding::Stochastic)) {
    SCOPED_TRACE(f.name());
    const std::vector<float> x = random_floats(4096, ++seed);
    const RngKey key(seed, stream_id(1, 2));
    const Tensor t = quantize(x, {64, 64}, f, key);
    EXPECT_EQ(t.saturated(), 0);
    EXPECT_EQ(expect_matches_quant_ref(t, x, key), 0);
    const double step = std::ldexp(1.0, t.exponent());
    for (std::int64_t i = 0; i < t.numel(); ++i) {
      const auto xi = static_cast<double>(x[static_cast<std::size_t>(i)]);
      const double y = std::ldexp(xi, -t.exponent());
      const std::int64_t m = t.mantissa(i);
      // Never more than one step: floor or ceil, so |error| < step (strictly).
      ASSERT_TRUE(m == static_cast<std::int64_t>(std::floor(y)) || m == static_cast<std::int64_t>(std::ceil(y)))
          << "element " << i << " y=" << y << " m=" << m;
      ASSERT_LT(std::fabs(t.value(i) - xi), step);
      if (y == std::floor(y)) {
        ASSERT_EQ(static_cast<double>(m), y) << "grid value moved";
      }
    }
  }
}

// The mean of N stochastically rounded copies of one value v is v up to
// sampling noise. With p = frac(v / 2^e), the number of round-ups is
// Binomial(N, p), sd sqrt(N p (1-p)); we accept |ups - N p| <= 5 sd, a
// two-sided false-failure probability of 5.7e-7 per case for independent
// uniform bits (normal approximation; every checked case has N p (1-p) >= 300).
// Each copy sits at a different element index, so this is the mean over
// independent index draws. Negative values are included: NITI's rule (floor,
// then a step of sign(x) = -1 for negatives) is biased there and fails this.
TEST(QuantizeStochastic, UnbiasedInMean) {
  constexpr std::int64_t N = 30000;
  int c = 0, checked = 0;
  for (float v : {100.3f, -100.3f, 0.7f, -0.7f, 3.140625f + 1.0f / 3.0f, -2.5f, 77.77f, -0.001f}) {
    for (const Format& f : {Format::fixed(8, Rounding::Stochastic), Format::fixed(4, Rounding::Stochastic),
                            Format::fixed(16, Rounding::Stochastic)}) {
      const RngKey key(11, stream_id(3, static_cast<std::uint64_t>(c++)));
      // By the maximum: the exponent follows v itself, so v/2^e is in (qmax/2, qmax].
      // At a fixed exponent: one chosen so v/2^e has a fractional part.
      for (int mode = 0; mode < 2; ++mode) {
        const std::vector<float> x(static_cast<std::size_t>(N), v);
        const Tensor t = mode == 0 ? quantize(x, {N}, f, key)
                                   : quantize_at(x, {N}, f, exponent_for_max(4 * std::fabs(v), f.qmax()), key);
        const double y = std::ldexp(static_cast<double>(v), -t.exponent());
        const double fl = std::floor(y), p = y - fl;
        if (N * p * (1 - p) < 300) continue;  // (nearly) on the grid: nothing to average
        std::int64_t ups = 0;
        for (std::int64_t i = 0; i < N; ++i) ups += t.mantissa(i) - static_cast<std::int64_t>(fl);
        const double sd = std::sqrt(static_cast<double>(N) * p * (1 - p));
        ++checked;
        EXPECT_LE(std::fabs(static_cast<double>(ups) - static_cast<double>(N) * p), 5 * sd)
            << f.name() << " v=" << v << " e=" << t.exponent() << " p=" << p << " mean mantissa "
            << fl + static_cast<double>(ups) / N << " vs " << y;
      }
    }
  }
  EXPECT_GE(checked, 30);  // most of the 48 cases have a fractional part to average
}

// Over a tensor of different values, the total error sum(value_i - x_i) has
// mean 0 and variance sum p_i (1 - p_i) step^2 (independent roundings). Accept
// |sum| <= 5 sd (false-failure probability 5.7e-7 per width, by the central
// limit theorem over 50,000 independent terms).
TEST(QuantizeStochastic, TotalErrorUnbiasedOverRandomValues) {
  for (const Format& f : signed_widths(Rounding::Stochastic)) {
    std::vector<float> x = random_floats(50000, 900 + static_cast<std::uint64_t>(f.bits()));
    for (float& v : x) v = std::fabs(v) * 0.1f + 0.3f;  // all positive, so a floor-bias would add up
    const Tensor t = quantize(x, {50000}, f, RngKey(4, 4));
    const double step = std::ldexp(1.0, t.exponent());
    double err = 0, var = 0;
    for (std::int64_t i = 0; i < t.numel(); ++i) {
      const auto xi = static_cast<double>(x[static_cast<std::size_t>(i)]);
      const double y = xi / step, p = y - std::floor(y);
      err += t.value(i) - xi;
      var += p * (1 - p) * step * step;
    }
    if (var == 0) continue;
    EXPECT_LE(std::fabs(err), 5 * std::sqrt(var)) << f.name() << " total error " << err << " sd " << std::sqrt(var);
  }
}

// ---------------------------------------------------------------------------
// quantize_at: fixed exponent, saturation
// ---------------------------------------------------------------------------

TEST(QuantizeAt, SaturationCountedByHandNearest) {
  // int8 at e = -2: the range is [-127, 127] * 0.25 = [-31.75, 31.75].
  const Format f = Format::fixed(8);
  const std::vector<float> x = {
      31.75f,    // 127: in range
      31.874f,   // 127.496 -> 127: in range
      31.875f,   // 127.5 -> tie to even 128 -> saturates to 127   [1]
      31.876f,   // 127.504 -> 128 -> saturates                    [2]
      -31.75f,   // -127: in range
      -31.875f,  // -127.5 -> -128 -> saturates (qmin is -127)     [3]
      -31.874f,  // -127.496 -> -127: in range
      0.0f,     1.0f, -1.0f, 0.125f /* 0.5 -> 0 */, 0.375f /* 1.5 -> 2 */,
      1e6f,      // saturates                                      [4]
      -1e6f,     // [5]
      1e30f,     // 4e30, far beyond int64: must clip, not wrap     [6]
      -FLT_MAX,  // [7]
      FLT_MAX,   // [8]
  };
  const Tensor t = quantize_at(x, {static_cast<std::int64_t>(x.size())}, f, -2);
  EXPECT_EQ(t.exponent(), -2);
  EXPECT_EQ(t.saturated(), 8);
  const std::vector<std::int64_t> want = {127, 127, 127, 127, -127, -127, -127, 0,  4,
                                          -4,  0,   2,   127, -127, 127,  -127, 127};
  for (std::size_t i = 0; i < x.size(); ++i) EXPECT_EQ(t.mantissa(static_cast<std::int64_t>(i)), want[i]) << x[i];
}

TEST(QuantizeAt, SaturationCountedByHandStochastic) {
  // int4 at e = 0: range [-7, 7]. Values at least one step outside saturate
  // whatever the random bits; values at most 6.x round to 6 or 7 and never
  // saturate; exact grid values are unchanged.
  const Format f = Format::fixed(4, Rounding::Stochastic);
  const std::vector<float> x = {7.0f, -7.0f, 8.0f, -8.0f, 8.5f, -9.25f, 6.5f, -6.99f, 100.0f, -1e20f, 0.0f, 3.0f};
  const std::vector<std::int64_t> lo = {7, -7, 7, -7, 7, -7, 6, -7, 7, -7, 0, 3};
  const std::vector<std::int64_t> hi = {7, -7, 7, -7, 7, -7, 7, -6, 7, -7, 0, 3};
  for (std::uint64_t seed = 0; seed < 20; ++seed) {
    const Tensor t = quantize_at(x, {12}, f, 0, RngKey(seed, 0));
    EXPECT_EQ(t.saturated(), 6);
    for (std::size_t i = 0; i < x.size(); ++i) {
      const std::int64_t m = t.mantissa(static_cast<std::int64_t>(i));
      EXPECT_TRUE(m >= lo[i] && m <= hi[i]) << x[i] << " -> " << m;
    }
  }
}

// Bit-exact against the reference for every width, both modes, exponents
// from "nothing saturates" to "most saturates", over 2 chunks (so the RNG
// index of every chunk is its global index).
TEST(QuantizeAt, MatchesReferenceEveryWidthBothModes) {
  const std::size_t n = kChunk + 1234;  // two chunks
  const std::vector<float> x = random_floats(n, 31, 2.0f);
  for (Rounding r : {Rounding::Nearest, Rounding::Stochastic}) {
    for (const Format& f : signed_widths(r)) {
      const int e0 = exponent_for_max(max_abs(x), f.qmax());
      for (int e : {e0 + 2, e0, e0 - 9}) {
        SCOPED_TRACE(f.name() + " e=" + std::to_string(e));
        const RngKey key(static_cast<std::uint64_t>(e + 1000), stream_id(static_cast<std::uint64_t>(f.bits()), 0));
        const Tensor t = quantize_at(x, {static_cast<std::int64_t>(n)}, f, e, key);
        EXPECT_EQ(t.exponent(), e);
        EXPECT_EQ(t.saturated(), expect_matches_quant_ref(t, x, key));
        if (e == e0 - 9) {
          EXPECT_GT(t.saturated(), 0);  // the case really saturates
        }
        if (e >= e0) {
          EXPECT_EQ(t.saturated(), 0);
        }
      }
    }
  }
}

// Exponents beyond the double range: 2^1100 overflows and 2^-1100 underflows
// in double. The answer is still defined: nonzero inputs saturate at
// e = -1100 and round to 0 at e = +1100, and 0 stays 0.
//
// Documents a bug for 32-bit storage: quantize_body (core/quantize.cpp) computes
// y = x * ldexp(1.0, -e) = 0 * inf = NaN for x = 0 at e < -1074, and casts the
// NaN to the storage type (undefined behaviour; GCC's UBSan does not check
// float casts). On x86 that gives INT32_MIN, which int8/int16 storage happens
// to truncate to 0 but int32 storage (Format::wide) keeps: mantissa -2^31,
// outside [qmin, qmax].
TEST(QuantizeAt, ExtremeExponents) {
  const std::vector<float> x = {0.0f, 1.0f, -1.0f, FLT_MAX, -std::numeric_limits<float>::denorm_min(), -0.0f};
  for (Rounding r : {Rounding::Nearest, Rounding::Stochastic}) {
    for (const Format& f : {Format::fixed(8, r), Format::fixed(16, r), Format::wide(24, r)}) {
      SCOPED_TRACE(f.name());
      const Tensor lo = quantize_at(x, {6}, f, -1100, RngKey(1, 1));
      EXPECT_EQ(lo.saturated(), 4);
      const std::vector<std::int64_t> want_lo = {0, f.qmax(), -f.qmax(), f.qmax(), -f.qmax(), 0};
      for (std::int64_t i = 0; i < 6; ++i) EXPECT_EQ(lo.mantissa(i), want_lo[static_cast<std::size_t>(i)]) << i;
    }
    const Format f = Format::fixed(8, r);
    const Tensor hi = quantize_at(x, {6}, f, 1100, RngKey(1, 1));
    EXPECT_EQ(hi.saturated(), 0);
    // Nearest: all 0. Stochastic: 0, or 1 for a positive input with probability 2^-32.
    for (std::int64_t i = 0; i < 6; ++i) EXPECT_EQ(hi.mantissa(i), 0) << i;
    const Tensor mid = quantize_at(x, {6}, f, -300, RngKey(1, 1));  // 2^300 is a finite double
    EXPECT_EQ(mid.saturated(), 4);
  }
}

// ---------------------------------------------------------------------------
// requantize_at / requantize: integer -> integer
// ---------------------------------------------------------------------------

TEST(RequantizeAt, SaturationCountedByHand) {
  // acc32 at e = 0 to int8 at e = 4: a right shift by 4, range [-127, 127].
  const Format f = Format::fixed(8);
  const std::vector<std::int64_t> v = {
      2032,                                          // 127: in range
      2039,                                          // 127.4375 -> 127
      2040,                                          // 127.5 -> tie to even 128 -> saturates             [1]
      2041,                                          // 127.5625 -> 128 -> saturates                      [2]
      -2039,                                         // -127.4375 -> -127
      -2040,                                         // -127.5 -> -128 -> saturates (qmin is -127)        [3]
      -2056,                                         // -128.5 -> -128 -> saturates                       [4]
      8,                                             // 0.5 -> 0
      24,                                            // 1.5 -> 2
      -24,                                           // -1.5 -> -2
      std::numeric_limits<std::int32_t>::max(),      //               [5]
      std::numeric_limits<std::int32_t>::min() + 1,  //               [6]
      0,
  };
  const Tensor acc = make_int({13}, Format::accumulator(32), v, 0);
  const Tensor t = requantize_at(acc, f, 4);
  EXPECT_EQ(t.exponent(), 4);
  EXPECT_EQ(t.format(), f);
  EXPECT_EQ(t.saturated(), 6);
  const std::vector<std::int64_t> want = {127, 127, 127, 127, -127, -127, -127, 0, 2, -2, 127, -127, 0};
  for (std::int64_t i = 0; i < 13; ++i) EXPECT_EQ(t.mantissa(i), want[static_cast<std::size_t>(i)]) << v[i];
}

TEST(RequantizeAt, LeftShiftsSaturate) {
  const Format f = Format::fixed(8);
  // Shift -3: v * 8 must lie in [-127, 127], so |v| <= 15.
  {
    const std::vector<std::int64_t> v = {15,
                                         16,
                                         -15,
                                         -16,
                                         0,
                                         1,
                                         -1,
                                         std::numeric_limits<std::int32_t>::max(),
                                         std::numeric_limits<std::int32_t>::min() + 1};
    const Tensor t = requantize_at(make_int({9}, Format::accumulator(32), v, 5), f, 2);
    EXPECT_EQ(t.saturated(), 4);
    const std::vector<std::int64_t> want = {120, 127, -120, -127, 0, 8, -8, 127, -127};
    for (std::int64_t i = 0; i < 9; ++i) EXPECT_EQ(t.mantissa(i), want[static_cast<std::size_t>(i)]) << v[i];
  }
  // Shifts -40, -62, -63, -70 on acc64: only 0 survives; shift 0 just clamps.
  const std::vector<std::int64_t> v = {
      0, 1, -1, std::numeric_limits<std::int64_t>::max(), -std::numeric_limits<std::int64_t>::max(), 100, -128};
  for (int shift : {-40, -62, -63, -70}) {
    for (Rounding r : {Rounding::Nearest, Rounding::Stochastic}) {
      const Tensor t = requantize_at(make_int({7}, Format::accumulator(64), v, 0), f.with_rounding(r), shift);
      EXPECT_EQ(t.saturated(), 6) << shift;
      const std::vector<std::int64_t> want = {0, 127, -127, 127, -127, 127, -127};
      for (std::int64_t i = 0; i < 7; ++i) EXPECT_EQ(t.mantissa(i), want[static_cast<std::size_t>(i)]) << shift;
    }
  }
  const Tensor t0 = requantize_at(make_int({7}, Format::accumulator(64), v, 0), f, 0);
  EXPECT_EQ(t0.saturated(), 3);
  const std::vector<std::int64_t> want0 = {0, 1, -1, 127, -127, 100, -127};
  for (std::int64_t i = 0; i < 7; ++i) EXPECT_EQ(t0.mantissa(i), want0[static_cast<std::size_t>(i)]);
}

// Random and adversarial values of an accumulator with `bits` bits (32 or 64):
// the symmetric extremes and the storage minimum, powers of two and their
// neighbours, exact ties for `shift`, and random values of every bit length.
std::vector<std::int64_t> adversarial(int bits, int shift, std::size_t n_random, std::mt19937_64& rng) {
  const std::int64_t hi =
      bits == 64 ? std::numeric_limits<std::int64_t>::max() : std::int64_t{std::numeric_limits<std::int32_t>::max()};
  const std::int64_t lo_storage =
      bits == 64 ? std::numeric_limits<std::int64_t>::min() : std::int64_t{std::numeric_limits<std::int32_t>::min()};
  std::vector<std::int64_t> v = {0, 1, -1, 2, -2, hi, -hi, hi - 1, -hi + 1, lo_storage};
  for (int k = 1; k < bits - 1; ++k) {
    const std::int64_t p = std::int64_t{1} << k;
    for (std::int64_t d : {-1, 0, 1}) {
      v.push_back(p + d);
      v.push_back(-(p + d));
    }
  }
  if (shift >= 1 && shift <= bits - 1) {
    const int room = bits - 1 - shift;  // (2m+1) * 2^(shift-1) <= hi
    for (int i = 0; i < 40; ++i) {
      const std::uint64_t m = room == 0 ? 0 : (rng() >> (64 - room));
      const auto t = static_cast<std::int64_t>((2 * m + 1) << (shift - 1));
      v.push_back(t);
      v.push_back(-t);
    }
  }
  for (std::size_t i = 0; i < n_random; ++i) {
    const int len = static_cast<int>(rng() % static_cast<std::uint64_t>(bits));  // 0 .. bits-1
    const std::int64_t mag = len == 0 ? 0 : static_cast<std::int64_t>(rng() >> (64 - len));
    v.push_back(rng() & 1 ? -mag : mag);
  }
  return v;
}

// Every element of requantize_at equals the scalar reference
// saturate(shift_round(v, s, mode, key.bits(i))), for acc32 and acc64 inputs,
// int8/int16 (and int4/int12/acc32) targets, both modes, every shift from -4
// to 66 (which reaches the 32-bit fast path, the 64-bit path, the generic
// path for shifts >= 31 on 32-bit inputs and the 128-bit branch).
TEST(RequantizeAt, BitIdenticalToScalarReference) {
  std::mt19937_64 rng(2025);
  const std::vector<Format> targets = {Format::fixed(8),  Format::fixed(16), Format::fixed(4),
                                       Format::fixed(12), Format::wide(24),  Format::accumulator(32)};
  std::int64_t checked = 0;
  for (int in_bits : {32, 64}) {
    for (int shift = -4; shift <= 66; ++shift) {
      const std::vector<std::int64_t> v = adversarial(in_bits, shift, 300, rng);
      const int acc_e = -7;
      const Tensor acc = make_int({static_cast<std::int64_t>(v.size())}, Format::accumulator(in_bits), v, acc_e);
      for (const Format& base : targets) {
        for (Rounding r : {Rounding::Nearest, Rounding::Stochastic}) {
          const Format f = base.with_rounding(r);
          SCOPED_TRACE("acc" + std::to_string(in_bits) + " -> " + f.name() + " shift " + std::to_string(shift));
          const RngKey key(static_cast<std::uint64_t>(shift + 100), stream_id(static_cast<std::uint64_t>(in_bits), 1));
          const Tensor t = requantize_at(acc, f, acc_e + shift, key);
          ASSERT_EQ(t.format(), f);
          ASSERT_EQ(t.exponent(), acc_e + shift);
          std::int64_t clipped = 0, bad = 0;
          for (std::int64_t i = 0; i < t.numel(); ++i) {
            const std::int64_t want = ref_requant(v[static_cast<std::size_t>(i)], shift, r,
                                                  key.bits(static_cast<std::uint32_t>(i)), f.qmin(), f.qmax(), clipped);
            ++checked;
            if (t.mantissa(i) != want && ++bad <= 3) {
              ADD_FAILURE() << "element " << i << " v=" << v[static_cast<std::size_t>(i)] << ": got " << t.mantissa(i)
                            << ", reference " << want;
            }
          }
          EXPECT_EQ(bad, 0);
          EXPECT_EQ(t.saturated(), clipped);
        }
      }
    }
  }
  EXPECT_GT(checked, 2 * 71 * 6 * 2 * 300);
}

// The raw kernel with an index_base: element i draws key.bits(index_base + i),
// so a sub-range processed on its own equals that slice of the whole.
TEST(RequantizeKernel, IndexBaseOffsetsTheRngIndex) {
  std::mt19937_64 rng(8);
  const std::vector<std::int64_t> v64 = adversarial(32, 9, 2000, rng);
  std::vector<std::int32_t> in(v64.begin(), v64.end());
  const auto n = static_cast<std::int64_t>(in.size());
  const RngKey key(3, 4);
  for (int shift : {1, 9, 17, 30, 31, 40}) {
    for (std::uint32_t base : {0u, 1u, 123456789u, 0xFFFF0000u}) {
      std::vector<std::int8_t> out(in.size());
      const std::int64_t sat =
          requantize_kernel(in.data(), out.data(), n, shift, Rounding::Stochastic, key, -127, 127, base);
      std::int64_t clipped = 0;
      for (std::int64_t i = 0; i < n; ++i) {
        const std::int64_t want = ref_requant(in[static_cast<std::size_t>(i)], shift, Rounding::Stochastic,
                                              key.bits(base + static_cast<std::uint32_t>(i)), -127, 127, clipped);
        ASSERT_EQ(out[static_cast<std::size_t>(i)], want) << "shift " << shift << " base " << base << " i " << i;
      }
      EXPECT_EQ(sat, clipped);
      // A slice [b, n) with index_base base + b matches the whole.
      const std::int64_t b = 777;
      std::vector<std::int8_t> part(static_cast<std::size_t>(n - b));
      requantize_kernel(in.data() + b, part.data(), n - b, shift, Rounding::Stochastic, key, -127, 127,
                        base + static_cast<std::uint32_t>(b));
      EXPECT_TRUE(std::equal(part.begin(), part.end(), out.begin() + b));
    }
  }
  // int64 input, int16 output, nearest ignores the bits entirely.
  std::vector<std::int64_t> in64 = adversarial(64, 20, 500, rng);
  std::vector<std::int16_t> o1(in64.size()), o2(in64.size());
  const auto n64 = static_cast<std::int64_t>(in64.size());
  requantize_kernel(in64.data(), o1.data(), n64, 20, Rounding::Nearest, key, -32767, 32767, 0);
  requantize_kernel(in64.data(), o2.data(), n64, 20, Rounding::Nearest, RngKey(9, 9), -32767, 32767, 5555);
  EXPECT_EQ(o1, o2);
}

// requantize picks the smallest shift with ceil(max|acc| / 2^s) <= qmax, so it
// never saturates, and every element is shift_round(v, s) (no clipping needed).
TEST(Requantize, AutomaticShiftNeverSaturatesAndMatchesReference) {
  std::mt19937_64 rng(77);
  std::int64_t cases = 0;
  for (int in_bits : {8, 16, 32, 64}) {
    const Format in_f = in_bits <= 16 ? Format::fixed(in_bits) : Format::accumulator(in_bits);
    for (int scale_bits : {1, 5, 12, 20, 31, 47, 63}) {
      if (scale_bits >= in_bits) continue;
      // Random values below 2^scale_bits, plus the extremes of that range.
      std::vector<std::int64_t> v;
      const std::int64_t top =
          scale_bits == 63 ? std::numeric_limits<std::int64_t>::max() : (std::int64_t{1} << scale_bits) - 1;
      v.push_back(top);
      v.push_back(-top);
      for (int i = 0; i < 700; ++i) {
        const auto mag = static_cast<std::int64_t>(rng() >> (64 - scale_bits));
        v.push_back(rng() & 1 ? -mag : mag);
      }
      const Tensor acc = make_int({static_cast<std::int64_t>(v.size())}, in_f, v, 3);
      std::uint64_t mx = 0;
      for (std::int64_t x : v)
        mx = std::max(mx, x < 0 ? std::uint64_t(0) - static_cast<std::uint64_t>(x) : static_cast<std::uint64_t>(x));
      EXPECT_EQ(max_abs_mantissa(acc), mx);
      for (Rounding r : {Rounding::Nearest, Rounding::Stochastic}) {
        for (int b = 2; b <= 31; b += b < 16 ? 1 : 5) {  // 2..16, then wide 21, 26, 31
          const Format f = b <= 16 ? Format::fixed(b, r) : Format::wide(b, r);
          SCOPED_TRACE(acc.describe() + " -> " + f.name());
          const int s = ref_shift_for_max(mx, f.qmax());
          const RngKey key(static_cast<std::uint64_t>(b), stream_id(static_cast<std::uint64_t>(scale_bits), 5));
          const Tensor t = requantize(acc, f, key);
          ++cases;
          ASSERT_EQ(t.exponent(), 3 + s);
          EXPECT_EQ(t.saturated(), 0);
          for (std::int64_t i = 0; i < t.numel(); ++i) {
            const std::int64_t want =
                shift_round(v[static_cast<std::size_t>(i)], s, r, key.bits(static_cast<std::uint32_t>(i)));
            ASSERT_LE(std::abs(want), f.qmax()) << "the reference itself left the range";
            ASSERT_EQ(t.mantissa(i), want) << "element " << i << " v=" << v[static_cast<std::size_t>(i)];
          }
        }
      }
    }
  }
  EXPECT_GT(cases, 100);
}

TEST(Requantize, ExtremeAccumulatorsToTwoBits) {
  // acc64 extremes to int2 (qmax 1): shift 63, the 128-bit branch.
  const std::vector<std::int64_t> v = {std::numeric_limits<std::int64_t>::max(),
                                       -std::numeric_limits<std::int64_t>::max(),
                                       std::int64_t{1} << 62,
                                       -(std::int64_t{1} << 62),
                                       0,
                                       12345};
  for (Rounding r : {Rounding::Nearest, Rounding::Stochastic}) {
    const Tensor t = requantize(make_int({6}, Format::accumulator(64), v, 0), Format::fixed(2, r), RngKey(1, 2));
    EXPECT_EQ(t.exponent(), 63);
    EXPECT_EQ(t.saturated(), 0);
    EXPECT_EQ(t.mantissa(0), 1);
    EXPECT_EQ(t.mantissa(1), -1);
    if (r == Rounding::Nearest) {
      EXPECT_EQ(t.mantissa(2), 0);  // 0.5 -> even
      EXPECT_EQ(t.mantissa(3), 0);
      EXPECT_EQ(t.mantissa(5), 0);
    }
    EXPECT_EQ(t.mantissa(4), 0);
  }
  // An int64 tensor may hold INT64_MIN (outside the symmetric acc64 range):
  // |INT64_MIN| = 2^63 is still handled exactly.
  const Tensor m = make_int({2}, Format::accumulator(64), {std::numeric_limits<std::int64_t>::min(), 1}, 0);
  EXPECT_EQ(max_abs_mantissa(m), std::uint64_t{1} << 63);
  const Tensor q = requantize(m, Format::fixed(8));
  EXPECT_EQ(q.exponent(), ref_shift_for_max(std::uint64_t{1} << 63, 127));
  EXPECT_EQ(q.mantissa(0), -64);
  EXPECT_EQ(q.saturated(), 0);
  const Tensor m32 = make_int({1}, Format::accumulator(32), {std::numeric_limits<std::int32_t>::min()}, 0);
  EXPECT_EQ(max_abs_mantissa(m32), std::uint64_t{1} << 31);
  const Tensor m8 = make_int({1}, Format::fixed(8), {-128}, 0);  // storage minimum
  EXPECT_EQ(max_abs_mantissa(m8), 128u);
  EXPECT_EQ(max_abs_mantissa(Tensor({0}, Format::accumulator(32))), 0u);
}

TEST(Requantize, AllZeroKeepsTheExponent) {
  const Tensor acc({4, 4}, Format::accumulator(32), -12);
  const Tensor t = requantize(acc, Format::fixed(8, Rounding::Stochastic), RngKey(1, 1));
  EXPECT_EQ(t.exponent(), -12);
  EXPECT_EQ(t.saturated(), 0);
  for (std::int64_t i = 0; i < 16; ++i) EXPECT_EQ(t.mantissa(i), 0);
}

// Right shifts far beyond 64 (a target exponent far above the accumulator's)
// must give 0 (or -1 for negatives under stochastic rounding), never garbage.
// Documents a bug: requantize_at passes any shift to shift_round, whose
// 128-bit branch (shift_round_wide, core/rounding.h) is undefined for shifts >= 128.
TEST(RequantizeAt, HugeRightShiftGivesZero) {
  const std::vector<std::int64_t> v = {std::numeric_limits<std::int32_t>::max(),
                                       -std::numeric_limits<std::int32_t>::max(), 1, 0};
  const Tensor acc = make_int({4}, Format::accumulator(32), v, 0);
  for (int shift : {70, 127, 128, 200}) {
    const Tensor t = requantize_at(acc, Format::fixed(8), shift);
    for (std::int64_t i = 0; i < 4; ++i)
      EXPECT_EQ(t.mantissa(i), 0) << "shift " << shift << " v " << v[static_cast<std::size_t>(i)];
    EXPECT_EQ(t.saturated(), 0) << shift;
  }
}

TEST(Requantize, RejectsFormatsThatAreNotFixedPoint) {
  const Tensor acc({4}, Format::accumulator(32));
  EXPECT_THROW((void)requantize(acc, Format::grouped(4, 4)), std::invalid_argument);
  EXPECT_THROW((void)requantize(acc, Format::fp32()), std::invalid_argument);
  EXPECT_THROW((void)requantize_at(acc, Format::fp32(), 0), std::invalid_argument);
  EXPECT_THROW((void)requantize_at(acc, Format::accumulator(64), 0), std::invalid_argument);
  const Tensor fl({4}, Format::fp32());
  const std::string m1 = testing::thrown_message<std::invalid_argument>([&] { (void)requantize_at(fl, Format::fixed(8), 0); });
  EXPECT_MESSAGE_HAS(m1, fl.describe());
  // requantize (automatic shift) must reject a float input the same way.
  // Documents a minor inconsistency: requantize (core/quantize.cpp) computes
  // max_abs_mantissa(acc) before requantize_at checks the input, so a float
  // input throws std::logic_error "Tensor: asked for int32 data of fp32[4]".
  const std::string m2 = testing::thrown_message<std::invalid_argument>([&] { (void)requantize(fl, Format::fixed(8)); });
  EXPECT_MESSAGE_HAS(m2, fl.describe());
}

// ---------------------------------------------------------------------------
// Determinism: threads, seeds, streams
// ---------------------------------------------------------------------------

// The bytes, exponent and saturation count of a tensor, for comparison.
struct Snapshot {
  std::vector<unsigned char> bytes;
  int exponent;
  std::int64_t saturated;
  std::vector<float> scales;
  std::vector<std::int32_t> zeros;
  bool operator==(const Snapshot&) const = default;
};
Snapshot snap(const Tensor& t) {
  const auto* p = static_cast<const unsigned char*>(t.raw());
  return {std::vector<unsigned char>(p, p + t.nbytes()), t.exponent(), t.saturated(), t.group_scales(),
          t.group_zeros()};
}

std::int64_t count_differing(const Tensor& a, const Tensor& b) {
  std::int64_t n = 0;
  for (std::int64_t i = 0; i < a.numel(); ++i) n += a.mantissa(i) != b.mantissa(i);
  return n;
}

constexpr std::int64_t kBig = 200000;  // 13 chunks of kChunk = 16384

TEST(Determinism, StochasticPassesIdenticalAcrossThreadCounts) {
  ASSERT_GT(num_chunks(kBig), 4);
  const std::vector<float> x = random_floats(static_cast<std::size_t>(kBig), 12);
  std::mt19937_64 rng(13);
  std::vector<std::int64_t> av(static_cast<std::size_t>(kBig));
  for (auto& a : av) a = static_cast<std::int64_t>(static_cast<std::int32_t>(rng() >> 32)) / 3;
  const Tensor acc = make_int({400, 500}, Format::accumulator(32), av, -9);
  const RngKey key(2024, stream_id(10, 3));
  const Format sr8 = Format::fixed(8, Rounding::Stochastic);
  const Format g4 = Format::grouped(4, 100, Rounding::Stochastic);

  const auto run_all = [&] {
    std::vector<Snapshot> r;
    r.push_back(snap(quantize(x, {400, 500}, sr8, key)));
    r.push_back(snap(quantize_at(x, {400, 500}, sr8, -6, key)));  // saturates some
    r.push_back(snap(quantize(x, {400, 500}, Format::fixed(8), key)));
    r.push_back(snap(requantize(acc, sr8, key)));
    r.push_back(snap(requantize_at(acc, Format::fixed(12, Rounding::Stochastic), 8, key)));
    r.push_back(snap(requantize_at(acc, sr8, 12, key)));
    r.push_back(snap(quantize(x, {400, 500}, g4, key)));
    return r;
  };
  std::vector<Snapshot> one, two, three;
  {
    ThreadCount tc(1);
    one = run_all();
  }
  {
    ThreadCount tc(2);
    two = run_all();
  }
  {
    ThreadCount tc(3);
    three = run_all();
  }
  ASSERT_EQ(one.size(), two.size());
  for (std::size_t i = 0; i < one.size(); ++i) {
    EXPECT_TRUE(one[i] == two[i]) << "pass " << i << " differs between 1 and 2 threads";
    EXPECT_TRUE(one[i] == three[i]) << "pass " << i << " differs between 1 and 3 threads";
  }
  EXPECT_GT(one[1].saturated, 0);  // the saturating pass really saturated
  EXPECT_GT(one[5].saturated, 0);

  // And every thread count agrees with the element-wise references.
  {
    ThreadCount tc(2);
    const Tensor q = quantize_at(x, {400, 500}, sr8, -6, key);
    EXPECT_EQ(q.saturated(), expect_matches_quant_ref(q, x, key));
    const Tensor r = requantize_at(acc, sr8, 12, key);
    std::int64_t clipped = 0;
    for (std::int64_t i = 0; i < kBig; ++i) {
      ASSERT_EQ(r.mantissa(i), ref_requant(av[static_cast<std::size_t>(i)], 21, Rounding::Stochastic,
                                           key.bits(static_cast<std::uint32_t>(i)), -127, 127, clipped))
          << i;
    }
    EXPECT_EQ(r.saturated(), clipped);
  }
}

// The same key reproduces a result bit for bit; another seed or stream does
// not. For these inputs about a third of the elements have a fractional part
// that an independent draw rounds the other way (2 p (1-p) averaged over
// p ~ U(0,1) is 1/3), so we require at least 10% to differ: with 200,000
// elements the count's sd is ~0.1%, so this fails only if the draws are
// (nearly) the same.
TEST(Determinism, SameSeedSameResultOtherSeedOrStreamDiffers) {
  const std::vector<float> x = random_floats(static_cast<std::size_t>(kBig), 21);
  std::mt19937_64 rng(22);
  std::vector<std::int64_t> av(static_cast<std::size_t>(kBig));
  for (auto& a : av) a = static_cast<std::int64_t>(static_cast<std::int32_t>(rng() >> 32));
  const Tensor acc = make_int({kBig}, Format::accumulator(32), av, 0);
  const Format sr8 = Format::fixed(8, Rounding::Stochastic);
  const RngKey k(7, stream_id(1, 1)), k_seed(8, stream_id(1, 1)), k_stream(7, stream_id(2, 1));

  const Tensor q1 = quantize(x, {kBig}, sr8, k), q2 = quantize(x, {kBig}, sr8, k);
  EXPECT_TRUE(snap(q1) == snap(q2));
  EXPECT_GT(count_differing(q1, quantize(x, {kBig}, sr8, k_seed)), kBig / 10);
  EXPECT_GT(count_differing(q1, quantize(x, {kBig}, sr8, k_stream)), kBig / 10);
  EXPECT_GT(count_differing(q1, quantize(x, {kBig}, sr8, k.derive(0))), kBig / 10);

  const Tensor r1 = requantize(acc, sr8, k), r2 = requantize(acc, sr8, k);
  EXPECT_TRUE(snap(r1) == snap(r2));
  EXPECT_GT(count_differing(r1, requantize(acc, sr8, k_seed)), kBig / 10);
  EXPECT_GT(count_differing(r1, requantize(acc, sr8, k_stream)), kBig / 10);

  // Nearest does not depend on the key at all.
  EXPECT_TRUE(snap(quantize(x, {kBig}, Format::fixed(8), k)) == snap(quantize(x, {kBig}, Format::fixed(8), k_seed)));
}

// ---------------------------------------------------------------------------
// Grouped quantization
// ---------------------------------------------------------------------------

// Tolerance for the grouped error bound. The scale is stored as a float,
// s = fl((max - min) / qmax) with relative error <= 2^-24, so (max - min) / s
// can exceed qmax by delta <= qmax 2^-24 <= 2^-16; the top element can then
// round one code past qmax and be clipped, with error (1/2 + delta) s. The
// division x / s in double adds a relative 2^-53. So nearest is within
// s (1/2 + 2^-15) and stochastic within s (1 + 2^-15).
constexpr double kGroupSlack = 1.0 / 32768.0;  // 2^-15

struct GroupCheck {
  std::int64_t clipped = 0;  // reference count of codes outside [0, qmax] before clamping
};

GroupCheck check_grouped(const Tensor& t, const std::vector<float>& x, RngKey key) {
  const Format& f = t.format();
  const std::int64_t G = f.group_size(), qmax = f.qmax();
  GroupCheck gc;
  EXPECT_EQ(t.num_groups(), t.numel() / G);
  EXPECT_EQ(static_cast<std::int64_t>(t.group_scales().size()), t.num_groups());
  const std::vector<float> d = dequantize(t);
  std::int64_t bad = 0;
  for (std::int64_t g = 0; g < t.num_groups(); ++g) {
    const double s = t.group_scales()[static_cast<std::size_t>(g)];
    const std::int64_t z = t.group_zeros()[static_cast<std::size_t>(g)];
    if (!(s > 0 && std::isfinite(s)) || z < 0 || z > qmax) {
      ADD_FAILURE() << t.describe() << " group " << g << ": scale " << s << ", zero point " << z
                    << " (want a positive finite scale and a zero point in [0, " << qmax << "])";
      continue;
    }
    double mn = 0, mx = 0;  // the range always includes 0
    for (std::int64_t i = g * G; i < (g + 1) * G; ++i) {
      mn = std::min(mn, static_cast<double>(x[static_cast<std::size_t>(i)]));
      mx = std::max(mx, static_cast<double>(x[static_cast<std::size_t>(i)]));
    }
    if (mx > mn) {
      // The documented parameters: scale = max((max - min) / qmax, FLT_MIN), zero = round(-min / scale).
      EXPECT_EQ(static_cast<float>(s), std::max(static_cast<float>((mx - mn) / static_cast<double>(qmax)), std::numeric_limits<float>::min())) << "group " << g;
      EXPECT_EQ(z, std::clamp(static_cast<std::int64_t>(std::nearbyint(-mn / s)), std::int64_t{0}, qmax));
      // The code range covers [mn, mx] up to the slack above, and includes 0.
      EXPECT_LE(-static_cast<double>(z) * s, mn + s * (0.5 + kGroupSlack));
      EXPECT_GE(static_cast<double>(qmax - z) * s, mx - s * (0.5 + kGroupSlack));
    }
    for (std::int64_t i = g * G; i < (g + 1) * G; ++i) {
      const auto xi = static_cast<double>(x[static_cast<std::size_t>(i)]);
      const std::int64_t q = t.mantissa(i);
      const double y = xi / s;
      double r;
      if (f.rounding() == Rounding::Nearest) {
        r = std::nearbyint(y);
      } else {
        r = std::floor(y) + ((y - std::floor(y)) * k2p32 > key.bits(static_cast<std::uint32_t>(i)) ? 1.0 : 0.0);
      }
      const double code = r + static_cast<double>(z);
      gc.clipped += code < 0 || code > static_cast<double>(qmax);
      const double err = std::fabs(t.value(i) - xi);
      const double bound = s * ((f.rounding() == Rounding::Nearest ? 0.5 : 1.0) + kGroupSlack);
      bool ok = q >= 0 && q <= qmax && err <= bound;
      if (f.rounding() == Rounding::Stochastic) {
        // Never more than one step away: floor or ceil of y (before clipping).
        const std::int64_t k = q - z;
        ok = ok &&
             (static_cast<double>(k) == std::floor(y) || static_cast<double>(k) == std::ceil(y) || q == qmax || q == 0);
      }
      if (xi == 0) ok = ok && t.value(i) == 0.0;  // 0 is always exact
      // The float dequantization agrees with the exact value to float rounding
      // (one rounding of a product: relative 2^-24).
      ok = ok && std::fabs(static_cast<double>(d[static_cast<std::size_t>(i)]) - t.value(i)) <=
                     std::fabs(t.value(i)) * 0x1p-24;
      if (!ok && ++bad <= 5) {
        ADD_FAILURE() << t.describe() << " group " << g << " element " << i << " x=" << xi << " code " << q << " zero "
                      << z << " scale " << s << " value " << t.value(i) << " err " << err << " bound " << bound;
      }
    }
  }
  EXPECT_EQ(bad, 0);
  return gc;
}

// Rows with different characters: mixed signs, all positive, all negative,
// an all-zero stretch, one outlier, tiny values, exact zeros.
std::vector<float> grouped_data(std::int64_t rows, std::int64_t cols, std::uint64_t seed) {
  std::vector<float> x = random_floats(static_cast<std::size_t>(rows * cols), seed);
  for (std::int64_t r = 0; r < rows; ++r) {
    float* row = x.data() + r * cols;
    for (std::int64_t c = 0; c < cols; ++c) {
      switch (r % 6) {
        case 1:
          row[c] = std::fabs(row[c]) + 5.0f;
          break;  // all positive, away from 0
        case 2:
          row[c] = -std::fabs(row[c]) * 1e-3f;
          break;  // all negative
        case 3:
          row[c] = 0.0f;
          break;  // all zero
        case 4:
          row[c] = c == cols / 2 ? 1e4f : row[c];
          break;  // one outlier
        default:
          break;
      }
    }
  }
  return x;
}

TEST(GroupedNearest, WithinHalfScaleStepEveryWidthAndGroupSize) {
  const std::int64_t rows = 6, cols = 384;
  for (int b = 2; b <= 8; ++b) {
    for (int G : {1, 3, 32, 128, 384}) {
      const Format f = Format::grouped(b, G);
      SCOPED_TRACE(f.name());
      const std::vector<float> x = grouped_data(rows, cols, static_cast<std::uint64_t>(b * 1000 + G));
      const Tensor t = quantize(x, {rows, cols}, f);
      EXPECT_EQ(t.dtype(), f.storage());
      const GroupCheck gc = check_grouped(t, x, {});
      EXPECT_EQ(t.saturated(), gc.clipped);
    }
  }
}

TEST(GroupedNearest, SpecialGroups) {
  const Format f = Format::grouped(4, 8);
  const std::vector<float> x = {
      0,  0,    0,  0,     -0.0f, 0,     0,      0,      // all zero
      5,  5.5f, 6,  5.25f, 5,     6,     5.75f,  5.1f,   // all positive: range [0, 6], zero point 0
      -1, -2,   -3, -4,    -0.5f, -1.5f, -2.5f,  -3.5f,  // all negative: range [-4, 0], zero point 15
      -1, 1,    0,  0.5f,  -0.5f, 0.25f, -0.25f, 0,      // symmetric
  };
  const Tensor t = quantize(x, {4, 8}, f);
  check_grouped(t, x, {});
  for (std::int64_t i = 0; i < 8; ++i) EXPECT_EQ(t.value(i), 0.0);
  EXPECT_EQ(t.group_zeros()[1], 0);
  EXPECT_EQ(t.group_scales()[1], static_cast<float>(6.0 / 15.0));
  EXPECT_EQ(t.group_zeros()[2], 15);
  EXPECT_EQ(t.group_scales()[2], static_cast<float>(4.0 / 15.0));
  EXPECT_EQ(t.value(11), 0.4f * 13.0);  // 5.25 / 0.4 = 13.125 -> 13, and (13 - 0) * fl(0.4)
  EXPECT_EQ(t.saturated(), 0);
}

TEST(GroupedNearest, LastDimNotAMultipleOfTheGroupThrows) {
  const std::vector<float> x(300, 1.0f);
  const std::string m = testing::thrown_message<std::invalid_argument>([&] {
    (void)quantize(x, {3, 100}, Format::grouped(4, 32));
  });
  EXPECT_MESSAGE_HAS(m, "100");
  EXPECT_MESSAGE_HAS(m, "32");
  EXPECT_THROW((void)quantize(x, {300}, Format::grouped(4, 128)), std::invalid_argument);
  EXPECT_THROW((void)quantize(x, {3, 10, 10}, Format::grouped(4, 20)), std::invalid_argument);
  EXPECT_NO_THROW((void)quantize(x, {3, 10, 10}, Format::grouped(4, 5)));
}

// A group whose range is below the float normal range (about qmax * 2^-126)
// must still be quantized within half a step. Documents a bug: the scale is
// computed in float (quantize_grouped_into, core/quantize.cpp), so for a range of 20 * 2^-149 at
// 4 bits it is fl(1.33 * 2^-149) = 2^-149 and the top element clips from code
// 20 to 15 (an error of 5 steps), and for a range below qmax * 2^-150 the
// scale is 0, the zero point is NaN cast to int32 (undefined behaviour) and
// the codes are garbage.
TEST(GroupedNearest, DenormalRangeGroup) {
  const float tiny = std::numeric_limits<float>::denorm_min();  // 2^-149
  const Format f = Format::grouped(4, 4);
  const std::vector<float> x = {20 * tiny, 0, 7 * tiny, 3 * tiny,  // range 20 * 2^-149
                                tiny,      0, 0,        0};        // range 2^-149: scale 2^-149 / 15 underflows
  const Tensor t = quantize(x, {2, 4}, f);
  check_grouped(t, x, {});
}

TEST(GroupedStochastic, WithinOneStepEveryWidth) {
  const std::int64_t rows = 6, cols = 256;
  for (int b = 2; b <= 8; ++b) {
    for (int G : {1, 64, 256}) {
      const Format f = Format::grouped(b, G, Rounding::Stochastic);
      SCOPED_TRACE(f.name());
      const std::vector<float> x = grouped_data(rows, cols, static_cast<std::uint64_t>(b * 77 + G));
      const RngKey key(static_cast<std::uint64_t>(b), static_cast<std::uint64_t>(G));
      const Tensor t = quantize(x, {rows, cols}, f, key);
      const GroupCheck gc = check_grouped(t, x, key);
      EXPECT_EQ(t.saturated(), gc.clipped);
    }
  }
}

// Each group: endpoints -1 and +1 fix the scale, and 1022 copies of one value
// c. Their mean dequantized value is c up to sampling noise: with y = c / s
// and p = frac(y), the round-ups are Binomial(1022, p), so the mean is within
// 5 s sqrt(p (1-p) / 1022) of y s (false-failure probability 5.7e-7 per group;
// every checked case has 1022 p (1-p) >= 90, enough for the normal
// approximation). y s differs from c only by double rounding (~1e-16 relative).
// Values whose floor or ceiling code falls outside [0, qmax] are skipped: the
// zero point is rounded, so the code range can miss the group's minimum by up
// to half a step, and clipping there biases SR by design.
TEST(GroupedStochastic, UnbiasedInMean) {
  const std::int64_t G = 1024;
  const std::vector<float> cs = {0.3f, -0.3f, 0.77f, -0.123f, 0.05f, -0.61f, 0.9f, -0.95f};
  int checked = 0;
  for (int b : {2, 4, 8}) {
    const Format f = Format::grouped(b, static_cast<int>(G), Rounding::Stochastic);
    std::vector<float> x;
    for (float c : cs) {
      x.push_back(-1.0f);
      x.push_back(1.0f);
      for (std::int64_t i = 2; i < G; ++i) x.push_back(c);
    }
    const Tensor t =
        quantize(x, {static_cast<std::int64_t>(cs.size()), G}, f, RngKey(31, static_cast<std::uint64_t>(b)));
    for (std::size_t g = 0; g < cs.size(); ++g) {
      const double s = t.group_scales()[g];
      const double y = static_cast<double>(cs[g]) / s, p = y - std::floor(y);
      const double n = static_cast<double>(G - 2);
      if (n * p * (1 - p) < 90) continue;  // too close to the grid for a mean test at this width
      const double z = t.group_zeros()[g];
      if (std::floor(y) + z < 0 || std::floor(y) + 1 + z > static_cast<double>(f.qmax())) continue;
      ++checked;
      double sum = 0;
      for (std::int64_t i = static_cast<std::int64_t>(g) * G + 2; i < static_cast<std::int64_t>(g + 1) * G; ++i)
        sum += t.value(i);
      const double mean = sum / n;
      EXPECT_LE(std::fabs(mean - static_cast<double>(cs[g])), 5 * s * std::sqrt(p * (1 - p) / n))
          << f.name() << " c=" << cs[g] << " scale " << s << " p=" << p << " mean " << mean;
    }
  }
  EXPECT_GE(checked, 12);  // most of the 24 (width, value) cases are testable
}

}  // namespace
}  // namespace intrain
