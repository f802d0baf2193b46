// Helpers for exact fixed-point arithmetic across exponents.
#pragma once

#include <algorithm>
#include <cstdint>

#include "core/rounding.h"

namespace intrain {

// The finest exponent at which two fixed-point values, |a| <= max_a at
// exponent e_a and |b| <= max_b at e_b, can both be represented in 62 bits,
// so that their sum fits in int64. Never finer than the finer input.
inline int common_exponent(std::uint64_t max_a, int e_a, std::uint64_t max_b, int e_b) {
  int e = std::min(e_a, e_b);
  e = std::max(e, e_a - (62 - bit_length(max_a)));
  e = std::max(e, e_b - (62 - bit_length(max_b)));
  return e;
}

// v (at exponent from) expressed at exponent `to`: an exact left shift when
// to <= from (the caller guarantees it fits, see common_exponent), else a
// right shift rounded to nearest even.
inline std::int64_t shift_to(std::int64_t v, int from, int to) {
  if (to <= from) return static_cast<std::int64_t>(static_cast<std::uint64_t>(v) << (from - to));
  return shift_round_nearest(v, to - from);
}

}  // namespace intrain
