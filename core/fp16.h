// IEEE 754 binary16 ("half") storage for frozen float weights: the LREC
// teacher held at 2 bytes per weight, as INT2.1's fp16 LLaMA teachers are.
//
// Only storage is 16-bit. Values are widened to fp32 before any arithmetic,
// and widening is exact (every binary16 value is a float). Narrowing rounds to
// nearest, ties to even, keeps subnormals (down to 2^-24) and flushes nothing;
// a finite value that would round past the largest half (65504) is an error,
// never a silent infinity.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace intrain {

using HalfBits = std::uint16_t;  // the raw binary16 pattern

inline constexpr float kHalfMax = 65504.0f;

// Plain scalar conversions (the reference the tests check exhaustively).
HalfBits to_half(float x);     // round to nearest even; ±inf past the range, NaN stays NaN
float from_half(HalfBits h);   // exact

// Narrows a whole tensor. Throws std::range_error naming `what` (a parameter
// name) if an element is not finite or would round past ±65504.
std::vector<HalfBits> narrow_to_half(std::span<const float> x, const std::string& what);

// out[i] = from_half(h[i]) for finite halves; vectorised (F16C where the CPU
// has it, a portable branch-free loop elsewhere).
void widen_half(std::span<const HalfBits> h, float* out);

}  // namespace intrain
