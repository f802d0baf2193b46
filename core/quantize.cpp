#include "core/quantize.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "core/collective.h"
#include "core/parallel.h"
#include "core/rounding.h"
#include "core/simd.h"

namespace intrain {

// ---------------------------------------------------------------------------
// float -> integer
// ---------------------------------------------------------------------------

int exponent_for_max(double max_abs, std::int64_t qmax) {
  if (!std::isfinite(max_abs)) throw std::domain_error("exponent_for_max: the maximum is not finite");
  if (max_abs == 0.0) return 0;
  // Start from the estimate log2(max / qmax), then fix it with exact tests:
  // ldexp of a small integer is exact in double.
  int e = std::ilogb(max_abs) - std::ilogb(static_cast<double>(qmax));
  const auto q = static_cast<double>(qmax);
  while (std::ldexp(q, e) < max_abs) ++e;
  while (std::ldexp(q, e - 1) >= max_abs) --e;
  return e;
}

namespace {

struct MaxAndBad {
  float max = 0.0f;
  std::int64_t bad = 0;
};

INTRAIN_CLONES MaxAndBad max_abs_chunk(const float* x, std::int64_t n) {
  float m = 0.0f;
  std::int64_t bad = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    const float a = std::fabs(x[i]);
    bad += !(a <= FLT_MAX);  // NaN and Inf both fail this test
    m = a > m ? a : m;
  }
  return {m, bad};
}

}  // namespace

float max_abs(std::span<const float> x) {
  const auto n = static_cast<std::int64_t>(x.size());
  const MaxAndBad r = reduce_chunks(
      n, MaxAndBad{}, [&](std::int64_t b, std::int64_t e) { return max_abs_chunk(x.data() + b, e - b); },
      [](MaxAndBad a, MaxAndBad b) { return MaxAndBad{std::max(a.max, b.max), a.bad + b.bad}; });
  if (r.bad) {
    for (std::size_t i = 0; i < x.size(); ++i) {
      if (!std::isfinite(x[i])) {
        throw std::domain_error("quantize: element " + std::to_string(i) + " is " + std::to_string(x[i]) +
                                "; a tensor to be quantized must be finite (" + std::to_string(r.bad) +
                                " non-finite elements)");
      }
    }
  }
  return r.max;
}

namespace {

// y = x * 2^-e in double (exact), rounded to an integer, clamped to [lo, hi].
template <class Out>
INTRAIN_INLINE std::int64_t quantize_body(const float* x, Out* out, std::int64_t n, int e, Rounding mode, RngKey key,
                                          std::int64_t lo, std::int64_t hi, std::uint32_t base) {
  // 2^-e overflows double below e = -1023; any non-zero float then saturates,
  // and 0 stays 0 (0 * inf would be NaN): use the largest finite scale, whose
  // product with the smallest float (2^-149) still exceeds every range.
  const double scale = std::min(std::ldexp(1.0, -e), std::ldexp(1.0, 1000));
  const auto dlo = static_cast<double>(lo), dhi = static_cast<double>(hi);
  std::int64_t clipped = 0;
  if (mode == Rounding::Nearest) {
    for (std::int64_t i = 0; i < n; ++i) {
      double y = __builtin_roundeven(static_cast<double>(x[i]) * scale);
      clipped += (y > dhi) | (y < dlo);
      y = y > dhi ? dhi : (y < dlo ? dlo : y);
      out[i] = static_cast<Out>(y);
    }
  } else {
    for (std::int64_t i = 0; i < n; ++i) {
      const double y = static_cast<double>(x[i]) * scale;
      const double fl = std::floor(y);
      // Round up with probability frac: P(r < frac * 2^32) = ceil(frac * 2^32) / 2^32.
      const double r = static_cast<double>(key.bits(base + static_cast<std::uint32_t>(i)));
      double q = fl + ((y - fl) * 4294967296.0 > r ? 1.0 : 0.0);
      clipped += (q > dhi) | (q < dlo);
      q = q > dhi ? dhi : (q < dlo ? dlo : q);
      out[i] = static_cast<Out>(q);
    }
  }
  return clipped;
}

INTRAIN_CLONES std::int64_t quantize_i8(const float* x, std::int8_t* o, std::int64_t n, int e, Rounding m, RngKey k,
                                        std::int64_t lo, std::int64_t hi, std::uint32_t b) {
  return quantize_body(x, o, n, e, m, k, lo, hi, b);
}
INTRAIN_CLONES std::int64_t quantize_i16(const float* x, std::int16_t* o, std::int64_t n, int e, Rounding m,
                                         RngKey k, std::int64_t lo, std::int64_t hi, std::uint32_t b) {
  return quantize_body(x, o, n, e, m, k, lo, hi, b);
}

INTRAIN_CLONES std::int64_t quantize_i32(const float* x, std::int32_t* o, std::int64_t n, int e, Rounding m,
                                         RngKey k, std::int64_t lo, std::int64_t hi, std::uint32_t b) {
  return quantize_body(x, o, n, e, m, k, lo, hi, b);
}

std::int64_t quantize_fixed_into(std::span<const float> x, Tensor& t, RngKey key) {
  const Format& f = t.format();
  const int e = t.exponent();
  const std::int64_t lo = f.qmin(), hi = f.qmax();
  return reduce_chunks(
      t.numel(), std::int64_t{0},
      [&](std::int64_t b, std::int64_t end) -> std::int64_t {
        const auto base = static_cast<std::uint32_t>(b);
        if (t.dtype() == DType::I8)
          return quantize_i8(x.data() + b, t.data<std::int8_t>() + b, end - b, e, f.rounding(), key, lo, hi, base);
        if (t.dtype() == DType::I32)
          return quantize_i32(x.data() + b, t.data<std::int32_t>() + b, end - b, e, f.rounding(), key, lo, hi, base);
        return quantize_i16(x.data() + b, t.data<std::int16_t>() + b, end - b, e, f.rounding(), key, lo, hi, base);
      },
      std::plus<>());
}

void check_size(std::span<const float> x, const Shape& shape, const char* who) {
  std::int64_t n = 1;
  for (auto d : shape) n *= d;
  if (static_cast<std::int64_t>(x.size()) != n) {
    throw std::invalid_argument(std::string(who) + ": " + std::to_string(x.size()) + " values do not fill shape " +
                                shape_str(shape));
  }
}

void quantize_grouped_into(std::span<const float> x, Tensor& t, RngKey key) {
  const Format& f = t.format();
  const std::int64_t G = f.group_size();
  const double maxq = static_cast<double>(f.qmax());
  auto& scales = t.group_scales();
  auto& zeros = t.group_zeros();
  const std::int64_t ngroups = t.num_groups();
  const std::int64_t saturated = reduce_chunks(
      ngroups, std::int64_t{0},
      [&](std::int64_t gb, std::int64_t ge) {
        std::int64_t clipped = 0;
        for (std::int64_t g = gb; g < ge; ++g) {
          const float* xg = x.data() + g * G;
          float mn = 0.0f, mx = 0.0f;  // the range always includes 0
          for (std::int64_t i = 0; i < G; ++i) {
            mn = std::min(mn, xg[i]);
            mx = std::max(mx, xg[i]);
          }
          if (mn == mx) {  // an all-zero group: any scale is exact
            mn = -1.0f;
            mx = 1.0f;
          }
          // The scale is stored as a float: keep it a normal float, so a group
          // of denormals gets a scale of FLT_MIN (error at most half of it)
          // rather than 0 or a rounded-up denormal step.
          const float scale = std::max(static_cast<float>((static_cast<double>(mx) - mn) / maxq), FLT_MIN);
          const double zero = std::clamp(std::nearbyint(-static_cast<double>(mn) / scale), 0.0, maxq);
          scales[static_cast<std::size_t>(g)] = scale;
          zeros[static_cast<std::size_t>(g)] = static_cast<std::int32_t>(zero);
          visit_int(t, [&](auto* q) {
            for (std::int64_t i = 0; i < G; ++i) {
              const double y = static_cast<double>(xg[i]) / scale;
              double r;
              if (f.rounding() == Rounding::Nearest) {
                r = std::nearbyint(y);
              } else {
                const double fl = std::floor(y);
                const auto idx = static_cast<std::uint32_t>(g * G + i);
                r = fl + ((y - fl) * 4294967296.0 > key.bits(idx) ? 1.0 : 0.0);
              }
              double v = r + zero;
              if (v < 0.0 || v > maxq) {
                ++clipped;
                v = std::clamp(v, 0.0, maxq);
              }
              q[g * G + i] = static_cast<std::remove_pointer_t<decltype(q)>>(v);
            }
          });
        }
        return clipped;
      },
      std::plus<>(), 64);
  t.set_saturated(saturated);
}

}  // namespace

Tensor quantize(std::span<const float> x, const Shape& shape, const Format& f, RngKey key) {
  check_size(x, shape, "quantize");
  key = slice_key(key, static_cast<std::int64_t>(x.size()));
  Tensor t = Tensor::uninitialized(shape, f);
  switch (f.scaling()) {
    case Scaling::Float: std::copy(x.begin(), x.end(), t.data<float>()); break;
    case Scaling::Grouped:
      max_abs(x);  // finiteness check
      quantize_grouped_into(x, t, key);
      break;
    case Scaling::SharedExponent:
      if (f.bits() > 31) throw std::invalid_argument("quantize: " + f.name() + " is not a fixed-point format");
      t.set_exponent(exponent_for_max(slice_max(key, max_abs(x)), f.qmax()));
      t.set_saturated(quantize_fixed_into(x, t, key));
      break;
  }
  return t;
}

Tensor quantize_at(std::span<const float> x, const Shape& shape, const Format& f, int exponent, RngKey key) {
  check_size(x, shape, "quantize_at");
  if (f.scaling() != Scaling::SharedExponent || f.bits() > 31) {
    throw std::invalid_argument("quantize_at: " + f.name() + " is not a fixed-point format of at most 31 bits");
  }
  max_abs(x);  // finiteness check
  key = slice_key(key, static_cast<std::int64_t>(x.size()));
  Tensor t = Tensor::uninitialized(shape, f, exponent);
  t.set_saturated(quantize_fixed_into(x, t, key));
  return t;
}

// ---------------------------------------------------------------------------
// integer -> float
// ---------------------------------------------------------------------------

void dequantize_into(const Tensor& t, std::span<float> out) {
  if (static_cast<std::int64_t>(out.size()) != t.numel()) {
    throw std::invalid_argument("dequantize: output has " + std::to_string(out.size()) + " elements, tensor " +
                                t.describe() + " has " + std::to_string(t.numel()));
  }
  switch (t.format().scaling()) {
    case Scaling::Float: std::copy_n(t.data<float>(), t.numel(), out.data()); return;
    case Scaling::SharedExponent: {
      const double scale = std::ldexp(1.0, t.exponent());
      visit_int(t, [&](const auto* m) {
        for_chunks(t.numel(), [&](std::int64_t, std::int64_t b, std::int64_t e) {
          // Values beyond float's range saturate at +-FLT_MAX (a mantissa rounded
          // up at the top of the range may dequantize to 2^128).
          for (std::int64_t i = b; i < e; ++i)
            out[i] = static_cast<float>(std::clamp(static_cast<double>(m[i]) * scale, -double{FLT_MAX}, double{FLT_MAX}));
        });
      });
      return;
    }
    case Scaling::Grouped: {
      const std::int64_t G = t.format().group_size();
      visit_int(t, [&](const auto* q) {
        for (std::int64_t g = 0; g < t.num_groups(); ++g) {
          const float s = t.group_scales()[static_cast<std::size_t>(g)];
          const std::int32_t z = t.group_zeros()[static_cast<std::size_t>(g)];
          for (std::int64_t i = g * G; i < (g + 1) * G; ++i) out[i] = static_cast<float>(q[i] - z) * s;
        }
      });
      return;
    }
  }
}

std::vector<float> dequantize(const Tensor& t) {
  std::vector<float> out(static_cast<std::size_t>(t.numel()));
  dequantize_into(t, out);
  return out;
}

// ---------------------------------------------------------------------------
// integer -> integer
// ---------------------------------------------------------------------------

namespace {

template <class T> INTRAIN_INLINE std::uint64_t max_abs_body(const T* x, std::int64_t n) {
  using U = std::make_unsigned_t<std::conditional_t<(sizeof(T) < 4), std::int32_t, T>>;
  U m = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    const auto v = static_cast<std::conditional_t<(sizeof(T) < 4), std::int32_t, T>>(x[i]);
    const U a = v < 0 ? U(0) - static_cast<U>(v) : static_cast<U>(v);
    m = a > m ? a : m;
  }
  return m;
}
INTRAIN_CLONES std::uint64_t max_abs_i8(const std::int8_t* x, std::int64_t n) { return max_abs_body(x, n); }
INTRAIN_CLONES std::uint64_t max_abs_i16(const std::int16_t* x, std::int64_t n) { return max_abs_body(x, n); }
INTRAIN_CLONES std::uint64_t max_abs_i32(const std::int32_t* x, std::int64_t n) { return max_abs_body(x, n); }
INTRAIN_CLONES std::uint64_t max_abs_i64(const std::int64_t* x, std::int64_t n) { return max_abs_body(x, n); }

std::uint64_t max_abs_range(const std::int8_t* x, std::int64_t n) { return max_abs_i8(x, n); }
std::uint64_t max_abs_range(const std::int16_t* x, std::int64_t n) { return max_abs_i16(x, n); }
std::uint64_t max_abs_range(const std::int32_t* x, std::int64_t n) { return max_abs_i32(x, n); }
std::uint64_t max_abs_range(const std::int64_t* x, std::int64_t n) { return max_abs_i64(x, n); }

// The requantization loop. W is the working integer type: 32-bit for inputs of
// up to 32 bits (16 lanes per AVX-512 instruction), 64-bit otherwise.
// Preconditions: 1 <= shift < bits of W.
template <class In, class Out>
INTRAIN_INLINE std::int64_t requant_right_body(const In* in, Out* out, std::int64_t n, int s, Rounding mode,
                                               RngKey key, std::int64_t lo64, std::int64_t hi64, std::uint32_t base) {
  using W = std::conditional_t<(sizeof(In) <= 4), std::int32_t, std::int64_t>;
  using UW = std::make_unsigned_t<W>;
  const W lo = static_cast<W>(lo64), hi = static_cast<W>(hi64);
  const UW mask = (UW(1) << s) - 1;
  // q clips when it leaves [lo, hi]: one unsigned compare, q - lo > hi - lo
  // (lo <= hi; the difference wraps modulo 2^bits(W) exactly as the range).
  const UW span = static_cast<UW>(static_cast<UW>(hi) - static_cast<UW>(lo));
  // The clip count runs in W per block of at most 2^30 elements, and the
  // stochastic bits' counter in 32 bits: 64-bit lanes in a 32-bit loop
  // would halve them.
  constexpr std::int64_t kBlock = std::int64_t{1} << 30;
  std::int64_t clipped = 0;
  for (std::int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const std::int64_t b1 = std::min(n, b0 + kBlock);
    W clip = 0;
    if (mode == Rounding::Nearest) {
      const UW half = UW(1) << (s - 1);
      for (std::int64_t i = b0; i < b1; ++i) {
        const W v = in[i];
        W q = v >> s;
        const UW rem = static_cast<UW>(v) & mask;
        q += static_cast<W>((rem > half) | ((rem == half) & static_cast<UW>(q & 1)));
        clip += static_cast<W>(static_cast<UW>(static_cast<UW>(q) - static_cast<UW>(lo)) > span);
        q = q > hi ? hi : (q < lo ? lo : q);
        out[i] = static_cast<Out>(q);
      }
    } else {
      std::uint32_t counter = base + static_cast<std::uint32_t>(b0);  // the element's index, modulo 2^32 as bits() takes it
      for (std::int64_t i = b0; i < b1; ++i, ++counter) {
        const W v = in[i];
        W q = v >> s;
        const UW rem = static_cast<UW>(v) & mask;
        std::uint32_t frac32;
        if constexpr (sizeof(W) == 4) {
          frac32 = static_cast<std::uint32_t>(rem << (32 - s));
        } else {
          frac32 = static_cast<std::uint32_t>(s <= 32 ? rem << (32 - s) : rem >> (s - 32));
        }
        q += static_cast<W>(frac32 > key.bits(counter));
        clip += static_cast<W>(static_cast<UW>(static_cast<UW>(q) - static_cast<UW>(lo)) > span);
        q = q > hi ? hi : (q < lo ? lo : q);
        out[i] = static_cast<Out>(q);
      }
    }
    clipped += clip;
  }
  return clipped;
}

// shift <= 0: an exact left shift with saturation.
template <class In, class Out>
std::int64_t requant_left(const In* in, Out* out, std::int64_t n, int k, std::int64_t lo, std::int64_t hi) {
  const std::int64_t lim_hi = k >= 63 ? 0 : hi >> k;
  const std::int64_t lim_lo = k >= 63 ? 0 : -((-lo) >> k);
  std::int64_t clipped = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int64_t v = in[i];
    std::int64_t q;
    if (v > lim_hi) {
      q = hi;
      ++clipped;
    } else if (v < lim_lo) {
      q = lo;
      ++clipped;
    } else {
      q = k >= 63 ? 0 : v * (std::int64_t{1} << k);
    }
    out[i] = static_cast<Out>(q);
  }
  return clipped;
}

// Shifts too wide for the working type (32..63 on 32-bit inputs, 63+ on
// 64-bit ones): the scalar reference rule.
template <class In, class Out>
std::int64_t requant_generic(const In* in, Out* out, std::int64_t n, int s, Rounding mode, RngKey key,
                             std::int64_t lo, std::int64_t hi, std::uint32_t base) {
  std::int64_t clipped = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int64_t q = shift_round(in[i], s, mode, key.bits(base + static_cast<std::uint32_t>(i)));
    out[i] = static_cast<Out>(saturate(q, lo, hi, clipped));
  }
  return clipped;
}

#define INTRAIN_REQUANT_CLONE(IN, OUT, NAME)                                                                    \
  INTRAIN_CLONES std::int64_t NAME(const IN* in, OUT* out, std::int64_t n, int s, Rounding mode, RngKey key, \
                                   std::int64_t lo, std::int64_t hi, std::uint32_t base) {                      \
    return requant_right_body(in, out, n, s, mode, key, lo, hi, base);                                          \
  }                                                                                                             \
  std::int64_t requant_right(const IN* in, OUT* out, std::int64_t n, int s, Rounding mode, RngKey key,         \
                             std::int64_t lo, std::int64_t hi, std::uint32_t base) {                            \
    return NAME(in, out, n, s, mode, key, lo, hi, base);                                                        \
  }
INTRAIN_REQUANT_CLONE(std::int8_t, std::int8_t, rq_i8_i8)
INTRAIN_REQUANT_CLONE(std::int8_t, std::int16_t, rq_i8_i16)
INTRAIN_REQUANT_CLONE(std::int8_t, std::int32_t, rq_i8_i32)
INTRAIN_REQUANT_CLONE(std::int16_t, std::int8_t, rq_i16_i8)
INTRAIN_REQUANT_CLONE(std::int16_t, std::int16_t, rq_i16_i16)
INTRAIN_REQUANT_CLONE(std::int16_t, std::int32_t, rq_i16_i32)
INTRAIN_REQUANT_CLONE(std::int32_t, std::int8_t, rq_i32_i8)
INTRAIN_REQUANT_CLONE(std::int32_t, std::int16_t, rq_i32_i16)
INTRAIN_REQUANT_CLONE(std::int32_t, std::int32_t, rq_i32_i32)
INTRAIN_REQUANT_CLONE(std::int64_t, std::int8_t, rq_i64_i8)
INTRAIN_REQUANT_CLONE(std::int64_t, std::int16_t, rq_i64_i16)
INTRAIN_REQUANT_CLONE(std::int64_t, std::int32_t, rq_i64_i32)
#undef INTRAIN_REQUANT_CLONE

}  // namespace

template <class In, class Out>
std::int64_t requantize_kernel(const In* in, Out* out, std::int64_t n, int shift, Rounding mode, RngKey key,
                               std::int64_t lo, std::int64_t hi, std::uint32_t index_base) {
  if (shift <= 0) return requant_left(in, out, n, -shift, lo, hi);
  const int wbits = sizeof(In) <= 4 ? 32 : 64;
  if (shift >= wbits - 1) return requant_generic(in, out, n, shift, mode, key, lo, hi, index_base);
  return requant_right(in, out, n, shift, mode, key, lo, hi, index_base);
}

#define INTRAIN_INSTANTIATE(IN, OUT)                                                                             \
  template std::int64_t requantize_kernel<IN, OUT>(const IN*, OUT*, std::int64_t, int, Rounding, RngKey,        \
                                                   std::int64_t, std::int64_t, std::uint32_t);
INTRAIN_INSTANTIATE(std::int8_t, std::int8_t)
INTRAIN_INSTANTIATE(std::int8_t, std::int16_t)
INTRAIN_INSTANTIATE(std::int8_t, std::int32_t)
INTRAIN_INSTANTIATE(std::int16_t, std::int8_t)
INTRAIN_INSTANTIATE(std::int16_t, std::int16_t)
INTRAIN_INSTANTIATE(std::int16_t, std::int32_t)
INTRAIN_INSTANTIATE(std::int32_t, std::int8_t)
INTRAIN_INSTANTIATE(std::int32_t, std::int16_t)
INTRAIN_INSTANTIATE(std::int32_t, std::int32_t)
INTRAIN_INSTANTIATE(std::int64_t, std::int8_t)
INTRAIN_INSTANTIATE(std::int64_t, std::int16_t)
INTRAIN_INSTANTIATE(std::int64_t, std::int32_t)
#undef INTRAIN_INSTANTIATE

std::uint64_t max_abs_mantissa(const Tensor& t) {
  return visit_int(t, [&](const auto* p) {
    return reduce_chunks(
        t.numel(), std::uint64_t{0}, [&](std::int64_t b, std::int64_t e) { return max_abs_range(p + b, e - b); },
        [](std::uint64_t a, std::uint64_t b) { return std::max(a, b); });
  });
}

Tensor requantize_at(const Tensor& acc, const Format& f, int exponent, RngKey key) {
  if (acc.format().scaling() != Scaling::SharedExponent) {
    throw std::invalid_argument("requantize: input " + acc.describe() + " is not a fixed-point tensor");
  }
  if (f.scaling() != Scaling::SharedExponent || f.bits() > 32) {
    throw std::invalid_argument("requantize: target " + f.name() + " is not a fixed-point format of <= 32 bits");
  }
  key = slice_key(key, acc.numel());
  Tensor out = Tensor::uninitialized(acc.shape(), f, exponent);
  const int shift = exponent - acc.exponent();
  const std::int64_t lo = f.qmin(), hi = f.qmax();
  const std::int64_t clipped = visit_int(acc, [&](const auto* in) {
    return visit_int(out, [&](auto* o) -> std::int64_t {
      using Out = std::remove_pointer_t<decltype(o)>;
      if constexpr (sizeof(Out) == 8) {
        throw std::logic_error("requantize: 64-bit targets are not supported");
      } else {
        return reduce_chunks(
            acc.numel(), std::int64_t{0},
            [&](std::int64_t b, std::int64_t e) {
              return requantize_kernel(in + b, o + b, e - b, shift, f.rounding(), key, lo, hi,
                                       static_cast<std::uint32_t>(b));
            },
            std::plus<>());
      }
    });
  });
  out.set_saturated(clipped);
  return out;
}

Tensor requantize(const Tensor& acc, const Format& f, RngKey key) {
  if (acc.format().scaling() != Scaling::SharedExponent) {
    throw std::invalid_argument("requantize: input " + acc.describe() + " is not a fixed-point tensor");
  }
  return requantize_with_max(acc, max_abs_mantissa(acc), f, key);
}

Tensor requantize_with_max(const Tensor& acc, std::uint64_t max_abs, const Format& f, RngKey key) {
  if (f.scaling() != Scaling::SharedExponent) {
    throw std::invalid_argument("requantize: target " + f.name() + " is not a fixed-point format");
  }
  // A batch slice takes the exponent of the whole tensor.
  const int shift = shift_for_max(slice_max(key, max_abs), f.qmax());
  return requantize_at(acc, f, acc.exponent() + shift, key);
}

}  // namespace intrain
