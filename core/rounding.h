// Scalar rounding primitives, shared by every kernel and by the references.
//
// shift_round(v, s, mode, r) computes round(v / 2^s) for an integer v and
// shift s >= 0:
//   Nearest:    round half to even.
//   Stochastic: floor(v / 2^s) + 1 with probability frac, where frac is the
//               discarded low part as a fraction of 2^s. With 32 random bits
//               r this is exactly unbiased for s <= 32: P(up) = F / 2^32 where
//               F = frac * 2^32 is an integer. For s > 32 the fraction is
//               truncated to 32 bits, a bias below 2^-32 of one step.
//               floor() rounds negative values toward -inf, so the rule is the
//               same on both sides of zero (NITI's sign-magnitude variant is
//               biased for negative inputs; this one is not).
// Arithmetic right shift of negative signed integers is defined in C++20.
#pragma once

#include <cstdint>

#include "core/format.h"

namespace intrain {

// Shifts of 63 or more (only reachable for 64-bit accumulators rounded to a
// 2-bit format): the same rules, computed in 128 bits. Rarely taken.
__extension__ typedef __int128 int128_t;
__extension__ typedef unsigned __int128 uint128_t;

inline std::int64_t shift_round_wide(std::int64_t v, int s, std::uint32_t r, bool stochastic) {
  // |v| < 2^63, so every shift beyond 126 rounds exactly as 126 does (to 0,
  // or for stochastic rounding of a negative v, to -1 or 0 by the top 32
  // bits of the fraction, which are all ones): clamp to keep the 128-bit
  // shifts defined.
  if (s > 126) s = 126;
  const int128_t w = v;
  const int128_t q = w >> s;
  const uint128_t rem = static_cast<uint128_t>(w - (q << s));
  if (stochastic) return static_cast<std::int64_t>(q + ((rem >> (s - 32)) > r));
  const uint128_t half = static_cast<uint128_t>(1) << (s - 1);
  return static_cast<std::int64_t>(q + ((rem > half) || (rem == half && (q & 1))));
}

inline std::int64_t shift_round_nearest(std::int64_t v, int s) {
  if (s <= 0) return v;
  if (s >= 63) return shift_round_wide(v, s, 0, false);
  const std::int64_t q = v >> s;
  const std::uint64_t mask = (std::uint64_t{1} << s) - 1;
  const std::uint64_t rem = static_cast<std::uint64_t>(v) & mask;
  const std::uint64_t half = std::uint64_t{1} << (s - 1);
  return q + ((rem > half) | ((rem == half) & static_cast<std::uint64_t>(q & 1)));
}

inline std::int64_t shift_round_stochastic(std::int64_t v, int s, std::uint32_t r) {
  if (s <= 0) return v;
  if (s >= 63) return shift_round_wide(v, s, r, true);
  const std::int64_t q = v >> s;
  const std::uint64_t mask = (std::uint64_t{1} << s) - 1;
  const std::uint64_t rem = static_cast<std::uint64_t>(v) & mask;
  // frac * 2^32, truncated to 32 bits when s > 32.
  const std::uint64_t frac32 = s <= 32 ? rem << (32 - s) : rem >> (s - 32);
  return q + (frac32 > r);
}

inline std::int64_t shift_round(std::int64_t v, int s, Rounding mode, std::uint32_t r) {
  return mode == Rounding::Nearest ? shift_round_nearest(v, s) : shift_round_stochastic(v, s, r);
}

// Clamp to [lo, hi] and count the clip.
inline std::int64_t saturate(std::int64_t v, std::int64_t lo, std::int64_t hi, std::int64_t& clipped) {
  if (v > hi) {
    ++clipped;
    return hi;
  }
  if (v < lo) {
    ++clipped;
    return lo;
  }
  return v;
}

// Number of bits needed for |v|: bitlen(0) = 0, bitlen(1) = 1, bitlen(255) = 8.
inline int bit_length(std::uint64_t v) { return v == 0 ? 0 : 64 - __builtin_clzll(v); }

// The smallest shift s >= 0 such that ceil(max_abs / 2^s) <= qmax, i.e. no
// element with |v| <= max_abs can round outside [-qmax, qmax] under either
// rounding mode. This is the requantization rule: it never saturates.
inline int shift_for_max(std::uint64_t max_abs, std::int64_t qmax) {
  int s = bit_length(max_abs) - bit_length(static_cast<std::uint64_t>(qmax));
  if (s < 0) s = 0;
  // ceil(max_abs / 2^s) without the overflow of max_abs + 2^s - 1.
  auto ceil_shift = [&](int k) {
    return k >= 64 ? std::uint64_t{max_abs != 0} : (max_abs >> k) + ((max_abs & ((std::uint64_t{1} << k) - 1)) != 0);
  };
  while (s < 64 && ceil_shift(s) > static_cast<std::uint64_t>(qmax)) ++s;
  return s;
}

}  // namespace intrain
