#include "core/fp16.h"

#include <bit>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <cmath>
#include <stdexcept>

#include "core/parallel.h"
#include "core/simd.h"

namespace intrain {

// Bit manipulation, not _Float16: the conversions must be the same on every
// compiler, and these two are short enough to check against all 65536 halves.
HalfBits to_half(float x) {
  const std::uint32_t u = std::bit_cast<std::uint32_t>(x);
  const std::uint32_t sign = (u >> 16) & 0x8000u;
  const std::uint32_t a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) return static_cast<HalfBits>(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0u));  // inf, NaN
  if (a >= 0x477ff000u) return static_cast<HalfBits>(sign | 0x7c00u);  // rounds past 65504: inf
  if (a < 0x38800000u) {
    // Subnormal half (|x| < 2^-14): the result is round(|x| / 2^-24), an
    // integer in [0, 1024]; 1024 is the smallest normal, which is correct.
    if (a < 0x33000000u) return static_cast<HalfBits>(sign);  // below 2^-25: rounds to zero
    const std::uint32_t m = (a & 0x7fffffu) | 0x800000u;       // 24-bit significand
    const int shift = 126 - static_cast<int>(a >> 23);          // |x| = m·2^(e-150); want m·2^(e-150+24)
    const std::uint32_t q = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    return static_cast<HalfBits>(sign | (q + (rem > half || (rem == half && (q & 1u)))));
  }
  // Normal: rebias the exponent and round the 23-bit mantissa to 10 bits; a
  // carry out of the mantissa correctly bumps the exponent.
  const std::uint32_t r = a - 0x38000000u;  // exponent 127 → 15
  const std::uint32_t q = r >> 13, rem = r & 0x1fffu;
  return static_cast<HalfBits>(sign | (q + (rem > 0x1000u || (rem == 0x1000u && (q & 1u)))));
}

float from_half(HalfBits h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0x1f) return std::bit_cast<float>(sign | 0x7f800000u | (m << 13));  // inf, NaN
  if (e == 0) {
    // Subnormal or zero: m·2^-24, exact in float.
    const float v = static_cast<float>(m) * 0x1p-24f;
    return sign ? -v : v;
  }
  return std::bit_cast<float>(sign | ((e + 112) << 23) | (m << 13));
}

std::vector<HalfBits> narrow_to_half(std::span<const float> x, const std::string& what) {
  std::vector<HalfBits> h(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    h[i] = to_half(x[i]);
    if ((h[i] & 0x7c00u) == 0x7c00u) {
      throw std::range_error(what + ": element " + std::to_string(i) + " = " + std::to_string(x[i]) +
                             (std::isfinite(x[i]) ? " is outside binary16's range (|x| <= 65504)" : " is not finite") +
                             "; hold this model in fp32");
    }
  }
  return h;
}

namespace {

// Branch-free widening of finite halves (narrow_to_half admits no others):
// normal halves rebias their exponent; subnormals are m·2^-24, done in float
// arithmetic. The portable path, for CPUs without F16C.
INTRAIN_INLINE void widen_body(const HalfBits* h, float* out, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i) {
    const std::uint32_t v = h[i];
    const std::uint32_t sign = (v & 0x8000u) << 16, e = (v >> 10) & 0x1fu, m = v & 0x3ffu;
    const float normal = std::bit_cast<float>(sign | ((e + 112) << 23) | (m << 13));
    const float sub = std::bit_cast<float>(sign | std::bit_cast<std::uint32_t>(static_cast<float>(m) * 0x1p-24f));
    out[i] = e == 0 ? sub : normal;
  }
}

void widen_portable(const HalfBits* h, float* out, std::int64_t n) { widen_body(h, out, n); }

#if defined(__x86_64__) && defined(__GNUC__)
// F16C's vcvtph2ps: 8 halves per instruction, exact (subnormal halves
// included; MXCSR's DAZ does not apply to half inputs). The tests compare it
// with from_half on every finite half.
__attribute__((target("avx2,f16c"))) void widen_f16c(const HalfBits* h, float* out, std::int64_t n) {
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
  }
  widen_body(h + i, out + i, n - i);
}
bool has_f16c() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return yes;
}
#else
void widen_f16c(const HalfBits* h, float* out, std::int64_t n) { widen_body(h, out, n); }
bool has_f16c() { return false; }
#endif

}  // namespace

void widen_half(std::span<const HalfBits> h, float* out) {
  const auto widen = has_f16c() ? widen_f16c : widen_portable;
  for_chunks(static_cast<std::int64_t>(h.size()),
             [&](std::int64_t, std::int64_t b, std::int64_t e) { widen(h.data() + b, out + b, e - b); });
}

}  // namespace intrain
