// Group-wise asymmetric quantized weights in bit-packed storage: the frozen
// base of an INT2.1 / GPTQ model. (docs/quantized-weights.md has the math.)
//
// Logical matrix: W [K, N] in the Hugging Face Conv1D layout (in, out), so a
// linear layer computes y = x·W. Groups run along K, the contraction dimension
// of the forward matmul: group g of output column n is the G consecutive
// weights W[g·G .. g·G + G − 1, n]. Each group has its own scale and zero:
//
//     Ŵ[k, n] = scale[n, g] · (q[k, n] − zero[n, g]),   g = k / G
//
// Invariants (checked by the constructor; a PackedWeights is always valid):
//   * bits b in [2, 8]; codes q and zero points lie in [0, 2^b − 1];
//   * group size G in [8, 4096] and a multiple of 8, and K a multiple of G
//     (a K that is not is rejected: choose another G). So every group is
//     G·b/8 whole bytes and starts on a byte boundary, for every b;
//   * scales are positive, finite IEEE binary16 values (stored as their bit
//     patterns): 16 bits per group, not 32.
//
// Storage (owned by the object, little-endian, LSB first):
//   codes   one bit stream of N·K codes of b bits, column by column: the code of
//           (k, n) is element n·K + k and occupies bits [(n·K + k)·b, +b).
//           Hence 2-bit: 4 codes per byte; 4-bit: 2 per byte, low nibble first;
//           8-bit: 1 per byte; 3-bit: 8 codes in 3 bytes, packed across bytes.
//   zeros   a second b-bit stream of N·(K/G) zero points, element n·(K/G) + g.
//   scales  N·(K/G) binary16 bit patterns, element n·(K/G) + g.
// Storage cost per weight: b + (16 + b) / G bits (2.14 bits at b = 2, G = 128).
#pragma once

#include <bit>
#include <cstdint>
#include <span>
#include <vector>

namespace intrain {

// IEEE binary16 <-> float, exact in the widening direction; narrowing rounds
// to nearest, ties to even (overflow gives infinity).
inline float half_to_float(std::uint16_t h) { return static_cast<float>(std::bit_cast<_Float16>(h)); }
inline std::uint16_t float_to_half(float f) { return std::bit_cast<std::uint16_t>(static_cast<_Float16>(f)); }

// Reads / writes element i of a b-bit little-endian stream (b in [1, 8]).
std::uint32_t read_bits(const std::uint8_t* stream, std::int64_t i, int b);
void write_bits(std::uint8_t* stream, std::int64_t i, int b, std::uint32_t v);

class PackedWeights {
 public:
  PackedWeights() = default;
  // From unpacked parts, column by column: q[n·K + k], zeros[n·(K/G) + g],
  // scales[n·(K/G) + g] (floats that must be exact binary16 values: round
  // them with float_to_half first). Throws std::invalid_argument naming the
  // broken invariant.
  static PackedWeights pack(std::int64_t K, std::int64_t N, int bits, int group, std::span<const std::uint8_t> q,
                            std::span<const std::uint8_t> zeros, std::span<const float> scales);

  int bits() const { return bits_; }
  int group() const { return group_; }
  std::int64_t K() const { return K_; }
  std::int64_t N() const { return N_; }
  std::int64_t groups_per_column() const { return K_ / group_; }
  std::int64_t max_code() const { return (std::int64_t{1} << bits_) - 1; }

  std::uint32_t code(std::int64_t k, std::int64_t n) const { return read_bits(codes_.data(), n * K_ + k, bits_); }
  std::uint32_t zero(std::int64_t n, std::int64_t g) const {
    return read_bits(zeros_.data(), n * groups_per_column() + g, bits_);
  }
  std::uint16_t scale_bits(std::int64_t n, std::int64_t g) const {
    return scales_[static_cast<std::size_t>(n * groups_per_column() + g)];
  }
  float scale(std::int64_t n, std::int64_t g) const { return half_to_float(scale_bits(n, g)); }
  // Ŵ[k, n] (exact in float: an 11-bit scale times a 9-bit integer).
  float value(std::int64_t k, std::int64_t n) const;

  // The G codes of group g of columns [n0, n1), minus `offset`, as int8:
  // out[(n − n0)·G + i] = q[g·G + i, n] − offset. The tile unpack of the
  // matmul kernels (offset 2^(b−1) puts every width in int8's range).
  void unpack_group(std::int64_t g, std::int64_t n0, std::int64_t n1, int offset, std::int8_t* out) const;

  // The whole dequantized matrix [K, N] row-major: for tests and references
  // only; the kernels never call it.
  std::vector<float> dequantize() const;

  // Raw storage, for files.
  const std::vector<std::uint8_t>& packed_codes() const { return codes_; }
  const std::vector<std::uint8_t>& packed_zeros() const { return zeros_; }
  const std::vector<std::uint16_t>& scale_bits() const { return scales_; }
  // Rebuilds from raw storage (as written by a file); validates everything.
  static PackedWeights from_storage(std::int64_t K, std::int64_t N, int bits, int group, std::vector<std::uint8_t> codes,
                                    std::vector<std::uint8_t> zeros, std::vector<std::uint16_t> scales);

  // Bytes of codes + zeros + scales, and the same in bits per weight.
  std::int64_t storage_bytes() const;
  double bits_per_weight() const;

  friend bool operator==(const PackedWeights&, const PackedWeights&) = default;

 private:
  void validate() const;

  int bits_ = 0, group_ = 0;
  std::int64_t K_ = 0, N_ = 0;
  std::vector<std::uint8_t> codes_, zeros_;
  std::vector<std::uint16_t> scales_;
};

}  // namespace intrain
