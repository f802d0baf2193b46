#include "core/salient_weights.h"

#include <algorithm>
#include <atomic>
#include <bit>
#include <climits>
#include <cmath>
#include <stdexcept>
#include <string>

#include "core/packed_matmul.h"
#include "core/packed_weights.h"
#include "core/parallel.h"
#include "core/rounding.h"

namespace intrain {

std::uint32_t read_bits_wide(const std::uint8_t* s, std::int64_t i, int w) {
  std::uint64_t v = 0;
  const std::int64_t bit = i * w;
  // At most 5 bytes hold a 32-bit element starting at any bit offset.
  for (int done = 0; done < w;) {
    const std::int64_t b = bit + done;
    const int sh = static_cast<int>(b & 7);
    const int take = std::min(8 - sh, w - done);
    v |= static_cast<std::uint64_t>((s[b >> 3] >> sh) & ((1u << take) - 1)) << done;
    done += take;
  }
  return static_cast<std::uint32_t>(v);
}

void write_bits_wide(std::uint8_t* s, std::int64_t i, int w, std::uint32_t v) {
  const std::int64_t bit = i * w;
  for (int done = 0; done < w;) {
    const std::int64_t b = bit + done;
    const int sh = static_cast<int>(b & 7);
    const int take = std::min(8 - sh, w - done);
    const std::uint32_t mask = (1u << take) - 1;
    std::uint8_t& byte = s[b >> 3];
    byte = static_cast<std::uint8_t>((byte & ~(mask << sh)) | (((v >> done) & mask) << sh));
    done += take;
  }
}

namespace {

[[noreturn]] void bad(const std::string& what) { throw std::invalid_argument("SalientWeights: " + what); }

std::size_t stream_bytes(std::int64_t n, int w) { return static_cast<std::size_t>((n * w + 7) / 8); }

}  // namespace

int SalientWeights::position_bits() const {
  return std::max(1, static_cast<int>(std::bit_width(static_cast<std::uint64_t>(K_ * N_ - 1))));
}

std::uint32_t SalientWeights::code(std::int64_t j) const { return read_bits(codes_.data(), j, bits_); }
std::uint32_t SalientWeights::zero(std::int64_t g) const { return read_bits(zeros_.data(), g, bits_); }
float SalientWeights::scale(std::int64_t g) const { return half_to_float(scale_bits(g)); }

float SalientWeights::value(std::int64_t j) const {
  const std::int64_t g = j / group_;
  return scale(g) * static_cast<float>(static_cast<int>(code(j)) - static_cast<int>(zero(g)));
}

void SalientWeights::validate() const {
  if (bits_ < 2 || bits_ > 8) bad("bits must be in 2..8, got " + std::to_string(bits_));
  if (group_ < 1 || group_ > 4096) bad("group size must be in 1..4096, got " + std::to_string(group_));
  if (K_ < 1 || N_ < 1) bad("shape [" + std::to_string(K_) + ", " + std::to_string(N_) + "] is empty");
  if (K_ * N_ > (std::int64_t{1} << 32)) bad("the matrix has more than 2^32 weights");
  if (m_ < 0 || m_ > K_ * N_) bad("entry count " + std::to_string(m_) + " is out of range");
  if (pos_.size() != stream_bytes(m_, position_bits())) bad("position storage has the wrong size");
  if (codes_.size() != stream_bytes(m_, bits_)) bad("code storage has the wrong size");
  if (zeros_.size() != stream_bytes(groups(), bits_)) bad("zero-point storage has the wrong size");
  if (scales_.size() != static_cast<std::size_t>(groups())) bad("scale storage has the wrong size");
  std::int64_t prev = -1;
  for (std::int64_t j = 0; j < m_; ++j) {
    const std::int64_t p = position(j);
    if (p <= prev || p >= K_ * N_) bad("position " + std::to_string(p) + " of entry " + std::to_string(j) + " is out of order or range");
    prev = p;
  }
  for (std::size_t i = 0; i < scales_.size(); ++i) {
    const float s = half_to_float(scales_[i]);
    if (!(s > 0.0f) || !std::isfinite(s)) bad("scale " + std::to_string(i) + " = " + std::to_string(s) + " is not positive and finite");
  }
}

SalientWeights SalientWeights::from_storage(std::int64_t K, std::int64_t N, int bits, int group, std::int64_t count,
                                            std::vector<std::uint8_t> positions, std::vector<std::uint8_t> codes,
                                            std::vector<std::uint8_t> zeros, std::vector<std::uint16_t> scales) {
  SalientWeights s;
  s.K_ = K;
  s.N_ = N;
  s.m_ = count;
  s.bits_ = bits;
  s.group_ = group;
  s.pos_ = std::move(positions);
  s.codes_ = std::move(codes);
  s.zeros_ = std::move(zeros);
  s.scales_ = std::move(scales);
  s.validate();
  return s;
}

SalientWeights SalientWeights::pack(std::int64_t K, std::int64_t N, int bits, int group, std::span<const std::uint32_t> positions,
                                    std::span<const std::uint8_t> codes, std::span<const std::uint8_t> zeros,
                                    std::span<const float> scales) {
  if (bits < 2 || bits > 8) bad("bits must be in 2..8, got " + std::to_string(bits));
  if (group < 1 || K < 1 || N < 1 || K * N > (std::int64_t{1} << 32)) bad("bad shape or group size");
  const auto m = static_cast<std::int64_t>(positions.size());
  const std::int64_t ng = (m + group - 1) / group;
  if (static_cast<std::int64_t>(codes.size()) != m || static_cast<std::int64_t>(zeros.size()) != ng ||
      static_cast<std::int64_t>(scales.size()) != ng) {
    bad("got " + std::to_string(m) + " positions, " + std::to_string(codes.size()) + " codes, " + std::to_string(zeros.size()) +
        " zeros and " + std::to_string(scales.size()) + " scales for groups of " + std::to_string(group));
  }
  SalientWeights tmp;
  tmp.K_ = K;
  tmp.N_ = N;
  const int pb = tmp.position_bits();
  const std::uint32_t maxq = (1u << bits) - 1;
  std::vector<std::uint8_t> pos(stream_bytes(m, pb), 0), cs(stream_bytes(m, bits), 0), zs(stream_bytes(ng, bits), 0);
  std::vector<std::uint16_t> ss(static_cast<std::size_t>(ng));
  for (std::int64_t j = 0; j < m; ++j) {
    const auto u = static_cast<std::size_t>(j);
    if (positions[u] >= static_cast<std::uint64_t>(K * N)) bad("position " + std::to_string(positions[u]) + " is outside the matrix");
    if (codes[u] > maxq) bad("code " + std::to_string(codes[u]) + " exceeds 2^b - 1");
    write_bits_wide(pos.data(), j, pb, positions[u]);
    write_bits(cs.data(), j, bits, codes[u]);
  }
  for (std::int64_t g = 0; g < ng; ++g) {
    const auto u = static_cast<std::size_t>(g);
    if (zeros[u] > maxq) bad("zero point " + std::to_string(zeros[u]) + " exceeds 2^b - 1");
    write_bits(zs.data(), g, bits, zeros[u]);
    ss[u] = float_to_half(scales[u]);
    if (half_to_float(ss[u]) != scales[u]) bad("scale " + std::to_string(scales[u]) + " is not a binary16 value");
  }
  return from_storage(K, N, bits, group, m, std::move(pos), std::move(cs), std::move(zs), std::move(ss));
}

std::vector<float> SalientWeights::dequantize() const {
  std::vector<float> s(static_cast<std::size_t>(K_ * N_), 0.0f);
  for (std::int64_t j = 0; j < m_; ++j) s[static_cast<std::size_t>(row(j) * N_ + column(j))] = value(j);
  return s;
}

std::int64_t SalientWeights::storage_bits() const {
  return m_ * (position_bits() + bits_) + groups() * (bits_ + 16) + 32;
}

double SalientWeights::bits_per_weight() const {
  return static_cast<double>(storage_bits()) / static_cast<double>(K_ * N_);
}

// ---------------------------------------------------------------------------
// Matmul terms
// ---------------------------------------------------------------------------

namespace {

// The entries unpacked once per call: row k, column n, and the value either as
// a float or as the integer v_j = c·(q − z) at exponent Es.
struct Entries {
  std::vector<std::int64_t> k, n, v;
  std::vector<float> f;
  int exponent = 0;
};

Entries unpack_entries(const SalientWeights& S, bool integer) {
  Entries e;
  const auto m = static_cast<std::size_t>(S.count());
  e.k.resize(m);
  e.n.resize(m);
  ScaleMantissas sm;
  if (integer && m > 0) {
    sm = scale_mantissas(std::span<const std::uint16_t>(S.scale_bits()));
    e.exponent = sm.exponent;
    e.v.resize(m);
  } else {
    e.f.resize(m);
  }
  for (std::size_t j = 0; j < m; ++j) {
    const auto jj = static_cast<std::int64_t>(j);
    e.k[j] = S.row(jj);
    e.n[j] = S.column(jj);
    const std::int64_t g = jj / S.group();
    if (integer) {
      e.v[j] = sm.c[static_cast<std::size_t>(g)] * (static_cast<std::int64_t>(S.code(jj)) - S.zero(g));
    } else {
      e.f[j] = S.value(jj);
    }
  }
  return e;
}

void check_shapes(const Tensor& out, const Tensor& in, std::int64_t out_cols, std::int64_t in_cols, const char* who) {
  if (in.rank() < 1 || in.cols() != in_cols || out.cols() != out_cols || out.numel() / out_cols != in.numel() / in_cols) {
    throw std::invalid_argument(std::string(who) + ": shapes " + out.describe() + " and " + in.describe() +
                                " do not match the salient weights");
  }
}

}  // namespace

void salient_matmul_add(Tensor& Y, const Tensor& X, const SalientWeights& S) {
  const std::int64_t K = S.K(), N = S.N();
  check_shapes(Y, X, N, K, "salient_matmul_add");
  if (S.count() == 0) return;
  const std::int64_t R = X.numel() / K;
  const bool is_float = X.format().is_float();
  if (is_float != Y.format().is_float()) throw std::invalid_argument("salient_matmul_add: X and Y must both be fp32 or both integer");
  const Entries e = unpack_entries(S, !is_float);
  const auto m = static_cast<std::int64_t>(e.k.size());
  const std::int64_t rpc = std::max<std::int64_t>(1, kChunk / std::max<std::int64_t>(m, 1));
  if (is_float) {
    const float* x = X.data<float>();
    float* y = Y.data<float>();
    for_chunks(R, [&](std::int64_t, std::int64_t r0, std::int64_t r1) {
      for (std::int64_t r = r0; r < r1; ++r)
        for (std::int64_t j = 0; j < m; ++j) y[r * N + e.n[j]] += x[r * K + e.k[j]] * e.f[j];
    }, rpc);
    return;
  }
  // Integer: the term T[r, n] = Σ_j X[r, k_j]·v_j at exponent eX + Es, exact
  // in int128 (|X| <= 2^15, |v| < 2^62, m < 2^32 terms per element at most).
  const int eT = X.exponent() + e.exponent, eY = Y.exponent();
  const int e_out = std::min(eT, eY);
  std::int64_t* y = Y.data<std::int64_t>();
  // No exception may leave a parallel region: overflow is flagged and thrown after it.
  std::atomic<bool> overflow{false};
  visit_int(X, [&](const auto* x) {
  for_chunks(R, [&](std::int64_t, std::int64_t r0, std::int64_t r1) {
    std::vector<int128_t> t(static_cast<std::size_t>(N));
    for (std::int64_t r = r0; r < r1; ++r) {
      std::fill(t.begin(), t.end(), int128_t{0});
      for (std::int64_t j = 0; j < m; ++j) t[static_cast<std::size_t>(e.n[j])] += static_cast<int128_t>(x[r * K + e.k[j]]) * e.v[j];
      for (std::int64_t n = 0; n < N; ++n) {
        const int128_t sum = (static_cast<int128_t>(y[r * N + n]) << (eY - e_out)) + (t[static_cast<std::size_t>(n)] << (eT - e_out));
        if (eY - e_out > 62 || eT - e_out > 62 || sum > INT64_MAX || sum < INT64_MIN) {
          overflow = true;
          return;
        }
        y[r * N + n] = static_cast<std::int64_t>(sum);
      }
    }
  }, rpc);
  });
  if (overflow) throw std::overflow_error("salient_matmul_add: the exact sum does not fit int64");
  Y.set_exponent(e_out);
}

void salient_matmul_t_add(Tensor& dX, const Tensor& dY, const SalientWeights& S) {
  const std::int64_t K = S.K(), N = S.N();
  check_shapes(dX, dY, K, N, "salient_matmul_t_add");
  if (S.count() == 0) return;
  const std::int64_t R = dY.numel() / N;
  const bool is_float = dY.format().is_float();
  if (is_float != dX.format().is_float()) throw std::invalid_argument("salient_matmul_t_add: dY and dX must both be fp32 or both integer");
  const Entries e = unpack_entries(S, !is_float);
  const auto m = static_cast<std::int64_t>(e.k.size());
  const std::int64_t rpc = std::max<std::int64_t>(1, kChunk / std::max<std::int64_t>(m, 1));
  if (is_float) {
    const float* dy = dY.data<float>();
    float* dx = dX.data<float>();
    for_chunks(R, [&](std::int64_t, std::int64_t r0, std::int64_t r1) {
      for (std::int64_t r = r0; r < r1; ++r)
        for (std::int64_t j = 0; j < m; ++j) dx[r * K + e.k[j]] += dy[r * N + e.n[j]] * e.f[j];
    }, rpc);
    return;
  }
  const int eT = dY.exponent() + e.exponent, eX = dX.exponent();
  const int shift = eX - eT;  // > 0: round the term down to dX's exponent; <= 0: exact left shift
  const std::int8_t* dy = dY.data<std::int8_t>();
  std::int32_t* dx = dX.data<std::int32_t>();
  std::atomic<bool> overflow{false};  // thrown after the parallel region
  for_chunks(R, [&](std::int64_t, std::int64_t r0, std::int64_t r1) {
    std::vector<std::int64_t> t(static_cast<std::size_t>(K));
    std::vector<char> touched(static_cast<std::size_t>(K));
    for (std::int64_t r = r0; r < r1; ++r) {
      std::fill(t.begin(), t.end(), 0);
      std::fill(touched.begin(), touched.end(), 0);
      for (std::int64_t j = 0; j < m; ++j) {
        // |dY·v| < 2^7·2^61; the per-element sum is checked below through int128.
        const int128_t s = static_cast<int128_t>(t[static_cast<std::size_t>(e.k[j])]) + static_cast<int128_t>(dy[r * N + e.n[j]]) * e.v[j];
        if (s > INT64_MAX || s < INT64_MIN) {
          overflow = true;
          return;
        }
        t[static_cast<std::size_t>(e.k[j])] = static_cast<std::int64_t>(s);
        touched[static_cast<std::size_t>(e.k[j])] = 1;
      }
      for (std::int64_t k = 0; k < K; ++k) {
        if (!touched[static_cast<std::size_t>(k)]) continue;
        const std::int64_t v = t[static_cast<std::size_t>(k)];
        const int128_t term = shift > 0 ? int128_t{shift_round_nearest(v, shift)}
                                        : (-shift > 62 ? int128_t{INT64_MAX} * 4 : static_cast<int128_t>(v) << -shift);
        const int128_t sum = static_cast<int128_t>(dx[r * K + k]) + term;
        if (sum > INT32_MAX || sum < INT32_MIN) {
          overflow = true;
          return;
        }
        dx[r * K + k] = static_cast<std::int32_t>(sum);
      }
    }
  }, rpc);
  if (overflow) throw std::overflow_error("salient_matmul_t_add: dX does not fit int32 (or an exact term int64)");
}

}  // namespace intrain
