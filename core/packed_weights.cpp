#include "core/packed_weights.h"

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

namespace intrain {

std::uint32_t read_bits(const std::uint8_t* s, std::int64_t i, int b) {
  const std::int64_t bit = i * b;
  const std::int64_t byte = bit >> 3;
  const int sh = static_cast<int>(bit & 7);
  std::uint32_t v = static_cast<std::uint32_t>(s[byte]) >> sh;
  if (sh + b > 8) v |= static_cast<std::uint32_t>(s[byte + 1]) << (8 - sh);  // b <= 8: at most two bytes
  return v & ((1u << b) - 1);
}

void write_bits(std::uint8_t* s, std::int64_t i, int b, std::uint32_t v) {
  const std::int64_t bit = i * b;
  const std::int64_t byte = bit >> 3;
  const int sh = static_cast<int>(bit & 7);
  const std::uint32_t mask = (1u << b) - 1;
  v &= mask;
  s[byte] = static_cast<std::uint8_t>((s[byte] & ~(mask << sh)) | (v << sh));
  if (sh + b > 8) {
    const int hi = 8 - sh;  // bits already written
    s[byte + 1] = static_cast<std::uint8_t>((s[byte + 1] & ~(mask >> hi)) | (v >> hi));
  }
}

namespace {

std::size_t stream_bytes(std::int64_t n, int b) { return static_cast<std::size_t>((n * b + 7) / 8); }

[[noreturn]] void bad(const std::string& what) { throw std::invalid_argument("PackedWeights: " + what); }

}  // namespace

void PackedWeights::validate() const {
  if (bits_ < 2 || bits_ > 8) bad("bits must be in 2..8, got " + std::to_string(bits_));
  if (group_ < 8 || group_ > 4096 || group_ % 8 != 0) {
    bad("group size must be a multiple of 8 in 8..4096, got " + std::to_string(group_));
  }
  if (K_ < 1 || N_ < 1) bad("shape [" + std::to_string(K_) + ", " + std::to_string(N_) + "] is empty");
  if (K_ % group_ != 0) {
    bad("K = " + std::to_string(K_) + " (the input dimension) is not a multiple of the group size " +
        std::to_string(group_) + "; choose a group size that divides it");
  }
  const std::int64_t ng = N_ * groups_per_column();
  if (codes_.size() != stream_bytes(K_ * N_, bits_)) bad("code storage has the wrong size");
  if (zeros_.size() != stream_bytes(ng, bits_)) bad("zero-point storage has the wrong size");
  if (scales_.size() != static_cast<std::size_t>(ng)) bad("scale storage has the wrong size");
  for (std::size_t i = 0; i < scales_.size(); ++i) {
    const float s = half_to_float(scales_[i]);
    if (!(s > 0.0f) || !std::isfinite(s)) bad("scale " + std::to_string(i) + " = " + std::to_string(s) + " is not positive and finite");
  }
}

PackedWeights PackedWeights::from_storage(std::int64_t K, std::int64_t N, int bits, int group,
                                          std::vector<std::uint8_t> codes, std::vector<std::uint8_t> zeros,
                                          std::vector<std::uint16_t> scales) {
  PackedWeights p;
  p.bits_ = bits;
  p.group_ = group;
  p.K_ = K;
  p.N_ = N;
  p.codes_ = std::move(codes);
  p.zeros_ = std::move(zeros);
  p.scales_ = std::move(scales);
  p.validate();
  return p;
}

PackedWeights PackedWeights::pack(std::int64_t K, std::int64_t N, int bits, int group, std::span<const std::uint8_t> q,
                                  std::span<const std::uint8_t> zeros, std::span<const float> scales) {
  if (bits < 2 || bits > 8) bad("bits must be in 2..8, got " + std::to_string(bits));
  if (group < 1 || K < 1 || N < 1 || K % group != 0) {
    bad("K = " + std::to_string(K) + " is not a positive multiple of the group size " + std::to_string(group));
  }
  const std::int64_t ng = N * (K / group);
  if (static_cast<std::int64_t>(q.size()) != K * N || static_cast<std::int64_t>(zeros.size()) != ng ||
      static_cast<std::int64_t>(scales.size()) != ng) {
    bad("got " + std::to_string(q.size()) + " codes, " + std::to_string(zeros.size()) + " zeros and " +
        std::to_string(scales.size()) + " scales for K = " + std::to_string(K) + ", N = " + std::to_string(N) +
        ", group " + std::to_string(group));
  }
  const std::uint32_t maxq = (1u << bits) - 1;
  std::vector<std::uint8_t> codes(stream_bytes(K * N, bits), 0), zs(stream_bytes(ng, bits), 0);
  std::vector<std::uint16_t> ss(static_cast<std::size_t>(ng));
  for (std::int64_t i = 0; i < K * N; ++i) {
    if (q[static_cast<std::size_t>(i)] > maxq) bad("code " + std::to_string(q[static_cast<std::size_t>(i)]) + " exceeds 2^b - 1");
    write_bits(codes.data(), i, bits, q[static_cast<std::size_t>(i)]);
  }
  for (std::int64_t i = 0; i < ng; ++i) {
    const auto u = static_cast<std::size_t>(i);
    if (zeros[u] > maxq) bad("zero point " + std::to_string(zeros[u]) + " exceeds 2^b - 1");
    write_bits(zs.data(), i, bits, zeros[u]);
    ss[u] = float_to_half(scales[u]);
    if (half_to_float(ss[u]) != scales[u]) bad("scale " + std::to_string(scales[u]) + " is not a binary16 value");
  }
  return from_storage(K, N, bits, group, std::move(codes), std::move(zs), std::move(ss));
}

float PackedWeights::value(std::int64_t k, std::int64_t n) const {
  const std::int64_t g = k / group_;
  return scale(n, g) * static_cast<float>(static_cast<int>(code(k, n)) - static_cast<int>(zero(n, g)));
}

void PackedWeights::unpack_group(std::int64_t g, std::int64_t n0, std::int64_t n1, int offset, std::int8_t* out) const {
  const int b = bits_;
  const std::uint64_t mask = (std::uint64_t{1} << b) - 1;
  const std::int64_t G = group_;
  for (std::int64_t n = n0; n < n1; ++n) {
    // The group starts on a byte boundary (G % 8 == 0); 8 codes are b bytes.
    const std::uint8_t* src = codes_.data() + (n * K_ + g * G) * b / 8;
    std::int8_t* dst = out + (n - n0) * G;
    for (std::int64_t i = 0; i < G; i += 8, src += b) {
      std::uint64_t word = 0;
      std::memcpy(&word, src, static_cast<std::size_t>(b));  // little-endian host
      for (int j = 0; j < 8; ++j) dst[i + j] = static_cast<std::int8_t>(static_cast<int>((word >> (j * b)) & mask) - offset);
    }
  }
}

std::vector<float> PackedWeights::dequantize() const {
  std::vector<float> w(static_cast<std::size_t>(K_ * N_));
  for (std::int64_t k = 0; k < K_; ++k)
    for (std::int64_t n = 0; n < N_; ++n) w[static_cast<std::size_t>(k * N_ + n)] = value(k, n);
  return w;
}

std::int64_t PackedWeights::storage_bytes() const {
  return static_cast<std::int64_t>(codes_.size() + zeros_.size() + 2 * scales_.size());
}

double PackedWeights::bits_per_weight() const {
  // Exact bit counts (not rounded up to whole bytes): b per code, b per zero, 16 per scale.
  const double ng = static_cast<double>(N_ * groups_per_column());
  return (static_cast<double>(K_ * N_) * bits_ + ng * (bits_ + 16)) / static_cast<double>(K_ * N_);
}

}  // namespace intrain
