// Sparse salient weights kept beside a packed base (AdpQ's outliers): the
// layer's weight is
//
//     Ŵ = Ŵ_base + S,   S[k, n] = s[j / Gs]·(q_j − z[j / Gs])  at entry j's position, 0 elsewhere,
//
// with Ŵ_base the group-quantized PackedWeights of core/packed_weights.h and
// S a sparse matrix of m entries, each quantized to b bits. Entries are sorted
// by position p = n·K + k (column by column, like the base codes); entry j
// belongs to salient group j / Gs (Gs consecutive entries in that order), and
// every salient group has its own binary16 scale and b-bit zero point, found
// by the same min-max rule as the base groups (core/gptq.h).
//
// Invariants (checked; a SalientWeights is always valid):
//   * bits in [2, 8], group Gs in [1, 4096]; codes and zeros in [0, 2^b − 1];
//   * positions strictly increasing and below K·N (so no duplicates);
//   * scales positive finite binary16 values.
//
// Storage (little-endian, LSB first bit streams, as in packed_weights.h):
//   positions  m elements of P = bit_width(K·N − 1) bits (P >= 1): 9 + 9 bits
//              at K = 512, N = 512, for example, 16 bits at 128 × 384;
//   codes      m elements of b bits;
//   zeros      ceil(m / Gs) elements of b bits;
//   scales     ceil(m / Gs) binary16 bit patterns.
// Bits counted: m·(P + b) + groups·(b + 16) + 32 (the entry count m, which a
// reader needs to parse the streams). bits_per_weight() divides by K·N, so it
// adds directly to the base's bits per weight.
//
// The matmul terms (salient_matmul_add, salient_matmul_t_add) loop over the
// m entries: no dense S is ever built, so a QuantizedLinear keeps its
// "never the whole matrix" invariant.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "core/rng.h"
#include "core/tensor.h"

namespace intrain {

// Element i of a stream of w-bit elements, w in [1, 32] (LSB first).
std::uint32_t read_bits_wide(const std::uint8_t* stream, std::int64_t i, int w);
void write_bits_wide(std::uint8_t* stream, std::int64_t i, int w, std::uint32_t v);

class SalientWeights {
 public:
  SalientWeights() = default;
  // From unpacked parts: positions (n·K + k, strictly increasing), codes
  // q_j, and per-group zeros and scales (floats that are exact binary16
  // values). Throws std::invalid_argument naming the broken invariant.
  static SalientWeights pack(std::int64_t K, std::int64_t N, int bits, int group, std::span<const std::uint32_t> positions,
                             std::span<const std::uint8_t> codes, std::span<const std::uint8_t> zeros,
                             std::span<const float> scales);
  // Rebuilds from raw storage (as a file holds it); validates everything.
  static SalientWeights from_storage(std::int64_t K, std::int64_t N, int bits, int group, std::int64_t count,
                                     std::vector<std::uint8_t> positions, std::vector<std::uint8_t> codes,
                                     std::vector<std::uint8_t> zeros, std::vector<std::uint16_t> scales);

  std::int64_t K() const { return K_; }
  std::int64_t N() const { return N_; }
  int bits() const { return bits_; }
  int group() const { return group_; }
  std::int64_t count() const { return m_; }
  std::int64_t groups() const { return (m_ + group_ - 1) / group_; }
  int position_bits() const;

  std::uint32_t position(std::int64_t j) const { return read_bits_wide(pos_.data(), j, position_bits()); }
  std::int64_t row(std::int64_t j) const { return position(j) % K_; }     // k
  std::int64_t column(std::int64_t j) const { return position(j) / K_; }  // n
  std::uint32_t code(std::int64_t j) const;
  std::uint32_t zero(std::int64_t g) const;
  std::uint16_t scale_bits(std::int64_t g) const { return scales_[static_cast<std::size_t>(g)]; }
  float scale(std::int64_t g) const;
  // The value of entry j: s·(q − z), exact in float.
  float value(std::int64_t j) const;

  // Dense S [K, N] row-major: for tests and references only.
  std::vector<float> dequantize() const;

  const std::vector<std::uint8_t>& packed_positions() const { return pos_; }
  const std::vector<std::uint8_t>& packed_codes() const { return codes_; }
  const std::vector<std::uint8_t>& packed_zeros() const { return zeros_; }
  const std::vector<std::uint16_t>& scale_bits() const { return scales_; }

  // Every stored bit (see above), and the same per weight of the K·N matrix.
  std::int64_t storage_bits() const;
  double bits_per_weight() const;

  friend bool operator==(const SalientWeights&, const SalientWeights&) = default;

 private:
  void validate() const;

  std::int64_t K_ = 0, N_ = 0, m_ = 0;
  int bits_ = 0, group_ = 0;
  std::vector<std::uint8_t> pos_, codes_, zeros_;
  std::vector<std::uint16_t> scales_;
};

// Y += X·S, for Y the output of packed_matmul(X, base) (the same X):
//   fp32 X, fp32 Y: Y[r, n] += X[r, k]·S[k, n] entry by entry, in entry order
//     (each row independently: the same bits whatever the thread count);
//   integer X, acc64 Y at exponent eY: exact. S's values are integers v_j
//     times 2^Es (Es the smallest salient scale exponent); Y and the term are
//     brought to the smaller of eY and eX + Es by exact left shifts, and the
//     sum is checked against int64 (std::overflow_error if it would not fit).
void salient_matmul_add(Tensor& Y, const Tensor& X, const SalientWeights& S);

// dX += dY·Sᵀ, for dX the output of packed_matmul_t(dY, base):
//   fp32: dX[r, k] += dY[r, n]·S[k, n], entry by entry;
//   integer dY, acc32 dX at exponent eE: the term Σ_j dY[r, n_j]·v_j is exact
//     in int64 at exponent e_dY + Es, then brought to eE: a left shift
//     (exact) or one rounding to nearest, ties to even (|error| ≤ 2^(eE−1)
//     per element, on top of the base's rounding). The sum is checked
//     against int32 (std::overflow_error if it would not fit).
void salient_matmul_t_add(Tensor& dX, const Tensor& dY, const SalientWeights& S);

}  // namespace intrain
