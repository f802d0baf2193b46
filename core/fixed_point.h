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

// A fixed change of exponent applied to many values, with the direction and
// amount decided once, outside the loop: an exact left shift, or a right
// shift rounded to nearest even. Branch-free per element, so loops over it
// vectorise. Preconditions as for shift_to; right shifts are at most 62.
struct ExponentShift {
  int left = 0, right = 0;
  std::uint64_t mask = 0, half = 0;  // of the right shift; both 0 when right == 0
  ExponentShift(int from, int to) {
    if (to <= from) {
      left = from - to;
    } else {
      right = std::min(to - from, 62);
      mask = (std::uint64_t{1} << right) - 1;
      half = std::uint64_t{1} << (right - 1);
    }
  }
  // Branch-free: at most one of left and right is non-zero. With right == 0,
  // rem = half = 0 and no rounding happens. (Left shifts of negative values
  // are defined in C++20.)
  std::int64_t operator()(std::int64_t v) const {
    const std::int64_t q = (v << left) >> right;
    const std::uint64_t rem = static_cast<std::uint64_t>(v) & mask;
    return q + static_cast<std::int64_t>((rem > half) | ((rem == half) & (half != 0) & static_cast<std::uint64_t>(q & 1)));
  }
};

inline std::uint64_t abs_u64(std::int64_t v) { return v < 0 ? 0 - static_cast<std::uint64_t>(v) : static_cast<std::uint64_t>(v); }

}  // namespace intrain
