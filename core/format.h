// Number formats: how a tensor's stored numbers map to real values.
//
// A Format is one of
//   * fixed point with a shared power-of-two exponent (dynamic fixed point):
//       value = mantissa * 2^exponent, one exponent per tensor;
//   * group-wise affine, for frozen quantized weights:
//       value = (q - zero[g]) * scale[g], one (scale, zero) per group of
//       `group_size` consecutive elements along the last dimension;
//   * float32, the baseline: value = the stored float.
//
// Invariants of a fixed-point or grouped Format:
//   2 <= bits <= 16 for operands. Accumulators are 32- or 64-bit and are made
//   only by Format::accumulator(); they never go through a user-facing parser.
//   Signed mantissas lie in the symmetric range [-(2^(bits-1) - 1), 2^(bits-1) - 1]:
//   the most negative code is unused, so negation and transposition never
//   overflow and the range is the same on both sides of zero.
//   Unsigned mantissas lie in [0, 2^bits - 1].
#pragma once

#include <cstdint>
#include <string>

namespace intrain {

enum class Rounding : std::uint8_t {
  Nearest,     // round half to even: deterministic, biased on average over a grid
  Stochastic,  // round up with probability equal to the discarded fraction: unbiased
};

enum class Scaling : std::uint8_t {
  SharedExponent,  // one power-of-two exponent per tensor
  Grouped,         // per-group float scale and integer zero point
  Float,           // float32 storage, no scaling
};

// The storage element type that holds a format's numbers.
enum class DType : std::uint8_t { I8, I16, I32, I64, F32 };

int dtype_size(DType t);
const char* dtype_name(DType t);

class Format {
 public:
  // Dynamic fixed point: `bits` in [2, 16], signed by default.
  static Format fixed(int bits, Rounding rounding = Rounding::Nearest, bool is_signed = true);
  // Group-wise affine quantization, unsigned codes in [0, 2^bits - 1].
  static Format grouped(int bits, int group_size, Rounding rounding = Rounding::Nearest);
  // Exact integer accumulator of an integer matmul: 32 or 64 bits, signed.
  static Format accumulator(int bits);
  // Wide fixed point, 17-31 bits in int32 storage, for values that never
  // enter a matmul (the residual stream, LayerNorm and bias parameters,
  // master weights). A product of two 24-bit values fits in 48 bits, so a row
  // sum of up to 2^14 such products cannot overflow int64.
  static Format wide(int bits, Rounding rounding = Rounding::Stochastic);
  static Format fp32();

  int bits() const { return bits_; }
  bool is_signed() const { return signed_; }
  Scaling scaling() const { return scaling_; }
  Rounding rounding() const { return rounding_; }
  int group_size() const { return group_size_; }
  bool is_float() const { return scaling_ == Scaling::Float; }
  bool is_integer() const { return !is_float(); }

  // Largest and smallest representable mantissa (see the range invariant above).
  std::int64_t qmax() const;
  std::int64_t qmin() const;
  // Smallest storage type that holds every mantissa of this format.
  DType storage() const;

  Format with_rounding(Rounding r) const;

  // "int8", "int12-sr", "uint4-g128", "acc32", "fp32".
  std::string name() const;

  friend bool operator==(const Format&, const Format&) = default;

 private:
  Format(int bits, bool is_signed, Scaling scaling, Rounding rounding, int group_size)
      : bits_(bits), signed_(is_signed), scaling_(scaling), rounding_(rounding), group_size_(group_size) {}

  int bits_ = 32;
  bool signed_ = true;
  Scaling scaling_ = Scaling::Float;
  Rounding rounding_ = Rounding::Nearest;
  int group_size_ = 0;
};

const char* rounding_name(Rounding r);
// Parses "nearest"/"rn" and "stochastic"/"sr"; throws std::invalid_argument otherwise.
Rounding parse_rounding(const std::string& s);

}  // namespace intrain
