// Conversions between float and integer formats, and requantization of
// integer accumulators to narrower formats.
//
// Exponent rule (dynamic fixed point). A tensor quantized "by its maximum"
// gets the smallest exponent e such that max|x| <= qmax * 2^e. Then no element
// can round outside [-qmax, qmax] under either rounding mode, so quantization
// by the maximum never saturates. Requantization of an accumulator uses the
// same rule as a shift (see shift_for_max in rounding.h).
//
// Fixed exponents (the *_at variants) serve delayed scaling and fixed-point
// master weights: values beyond the range saturate, and the count is stored in
// the result's saturated().
//
// Stochastic rounding draws bits from RngKey::bits(i) for flat element index
// i, so the result depends only on (seed, stream, i), never on threads.
//
// Every pass runs in fixed chunks (core/parallel.h) and is multiversioned for
// AVX2/AVX-512 (core/simd.h).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "core/format.h"
#include "core/rng.h"
#include "core/tensor.h"

namespace intrain {

// ---- float -> integer ------------------------------------------------------

// Smallest e with max_abs <= qmax * 2^e (0 for max_abs == 0). Throws
// std::domain_error for a non-finite max_abs.
int exponent_for_max(double max_abs, std::int64_t qmax);

// max |x_i|; throws std::domain_error naming the first NaN/Inf position.
float max_abs(std::span<const float> x);

// Quantizes x (row-major, `shape`) to format f.
//   SharedExponent: exponent from max|x| (never saturates).
//   Grouped: per group of f.group_size() elements, asymmetric min-max over a
//            range widened to include 0 (as GPTQ does), so 0 is exact and the
//            zero point is a valid code: scale = (max - min) / (2^bits - 1),
//            zero = round(-min / scale), q = clamp(round(x / scale) + zero).
//            The scale is stored as a float and kept normal: at least FLT_MIN.
//   Float: a copy.
Tensor quantize(std::span<const float> x, const Shape& shape, const Format& f, RngKey key = {});

// SharedExponent formats of up to 31 bits: quantize at a given exponent, saturating.
Tensor quantize_at(std::span<const float> x, const Shape& shape, const Format& f, int exponent, RngKey key = {});

// ---- integer -> float ------------------------------------------------------

void dequantize_into(const Tensor& t, std::span<float> out);
std::vector<float> dequantize(const Tensor& t);

// ---- integer -> integer ----------------------------------------------------

// max |mantissa| of an integer tensor (exact, as uint64).
std::uint64_t max_abs_mantissa(const Tensor& t);

// Requantizes an integer tensor (typically an int32/int64 accumulator) to the
// fixed-point format f: shift = shift_for_max(max|acc|, qmax), rounding per
// f.rounding(), result exponent = acc.exponent() + shift. Never saturates.
Tensor requantize(const Tensor& acc, const Format& f, RngKey key = {});

// As requantize(), for a caller that already knows max|mantissa| of `acc`
// (computed while producing it), saving a full read of the tensor.
Tensor requantize_with_max(const Tensor& acc, std::uint64_t max_abs, const Format& f, RngKey key = {});

// Requantizes to a given result exponent. shift = exponent - acc.exponent()
// may be negative (a left shift); out-of-range values saturate and are counted.
Tensor requantize_at(const Tensor& acc, const Format& f, int exponent, RngKey key = {});

// Raw kernel: out[i] = saturate(shift_round(in[i], shift)), for in of type
// int8/16/32/64 and out of type int8/16/32. `index_base` offsets the RNG
// index (for sub-ranges of a larger tensor). Returns the saturation count.
template <class In, class Out>
std::int64_t requantize_kernel(const In* in, Out* out, std::int64_t n, int shift, Rounding mode, RngKey key,
                               std::int64_t lo, std::int64_t hi, std::uint32_t index_base = 0);

}  // namespace intrain
