// Tile-by-tile matmuls with packed weights. The derivations are in
// core/packed_matmul.h and docs/quantized-weights.md.
#include "core/packed_matmul.h"

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/int16_pieces.h"
#include "core/onednn_gemm.h"
#include "core/parallel.h"
#include "core/rounding.h"
#include "core/simd.h"

namespace intrain {

ScaleMantissas scale_mantissas(const PackedWeights& W) { return scale_mantissas(std::span<const std::uint16_t>(W.scale_bits())); }

ScaleMantissas scale_mantissas(std::span<const std::uint16_t> bits) {
  // binary16: exponent field E, fraction F. Normal: (1024 + F)·2^(E − 25);
  // subnormal (E = 0): F·2^-24. So every scale is m·2^e with m < 2^11.
  std::vector<int> e(bits.size());
  std::vector<std::int64_t> m(bits.size());
  ScaleMantissas s;
  s.exponent = INT_MAX;
  for (std::size_t i = 0; i < bits.size(); ++i) {
    const int E = (bits[i] >> 10) & 0x1F, F = bits[i] & 0x3FF;
    m[i] = E == 0 ? F : (1024 + F);
    e[i] = E == 0 ? -24 : E - 25;
    s.exponent = std::min(s.exponent, e[i]);
  }
  s.c.resize(bits.size());
  for (std::size_t i = 0; i < bits.size(); ++i) {
    s.c[i] = m[i] << (e[i] - s.exponent);  // spread <= 39 binades: < 2^50
    s.max_c = std::max(s.max_c, s.c[i]);
  }
  return s;
}

namespace {

struct Operand {
  std::int64_t R = 0;  // rows
  bool is_float = false;
};

// `wide`: whether 9-16-bit operands (int16 storage) are accepted. The forward
// takes them (split in two int8 pieces); the backward does not, because its
// int32 result would not hold N·2^15·(2^b − 1).
Operand check_operand(const Tensor& t, std::int64_t cols, const char* who, const char* what, bool wide) {
  if (t.rank() < 1 || t.cols() != cols) {
    throw std::invalid_argument(std::string(who) + ": " + what + " " + t.describe() + " must have " +
                                std::to_string(cols) + " columns");
  }
  Operand o;
  o.R = t.numel() / cols;
  o.is_float = t.format().is_float();
  const bool storage_ok = t.dtype() == DType::I8 || (wide && t.dtype() == DType::I16);
  if (!o.is_float && (t.format().scaling() != Scaling::SharedExponent || !storage_ok || !t.format().is_signed())) {
    throw std::invalid_argument(std::string(who) + ": " + what + " " + t.describe() + " must be fp32 or a signed fixed-point format of " +
                                (wide ? "2 to 16 bits" : "2 to 8 bits (int8 storage); use 8-bit errors (e8) with packed weights"));
  }
  return o;
}

Shape with_cols(Shape s, std::int64_t cols) {
  s.back() = cols;
  return s;
}

std::int64_t rows_per_chunk(std::int64_t cols) { return std::max<std::int64_t>(1, kChunk / std::max<std::int64_t>(cols, 1)); }

// One K-group of W as a [N, G] tile: int8 codes minus 2^(b-1), or dequantized floats.
void float_tile(const PackedWeights& W, std::int64_t g, std::vector<std::int8_t>& codes, std::vector<float>& out) {
  const std::int64_t G = W.group(), N = W.N();
  const int off = 1 << (W.bits() - 1);
  W.unpack_group(g, 0, N, off, codes.data());
  for (std::int64_t n = 0; n < N; ++n) {
    const float s = W.scale(n, g);
    const int z = static_cast<int>(W.zero(n, g));
    for (std::int64_t i = 0; i < G; ++i) out[static_cast<std::size_t>(n * G + i)] = s * static_cast<float>(codes[static_cast<std::size_t>(n * G + i)] + off - z);
  }
}

// The per-group passes, multiversioned (core/simd.h). One row each.

// y[n] (+)= c[n]·(p[n] + zc[n]·s): a group's exact partial product, scaled.
INTRAIN_CLONES void scale_accumulate_row(std::int64_t* y, const std::int32_t* p, const std::int64_t* c,
                                         const std::int64_t* zc, std::int64_t s, std::int64_t N, bool first) {
  if (first) {
    for (std::int64_t n = 0; n < N; ++n) y[n] = c[n] * (p[n] + zc[n] * s);
  } else {
    for (std::int64_t n = 0; n < N; ++n) y[n] += c[n] * (p[n] + zc[n] * s);
  }
}

// The same for a split 16-bit X (X = 256·H + L + 128, see packed_matmul):
// y[n] (+)= c[n]·(256·ph[n] + pl[n] + 128·cs[n] + zc[n]·s).
INTRAIN_CLONES void scale_accumulate_split_row(std::int64_t* y, const std::int32_t* ph, const std::int32_t* pl,
                                               const std::int64_t* cs, const std::int64_t* c, const std::int64_t* zc,
                                               std::int64_t s, std::int64_t N, bool first) {
  for (std::int64_t n = 0; n < N; ++n) {
    const std::int64_t t = c[n] * (256 * std::int64_t{ph[n]} + pl[n] + 128 * cs[n] + zc[n] * s);
    y[n] = first ? t : y[n] + t;
  }
}

// E[n] = round(e[n]·c[n] / 2^shift) with bits of `key` at index base + n;
// returns Σ_n E[n]·zc[n] (the zero-point term of the row). For shifts in
// [1, 62] the rounding is written without branches so that it vectorises;
// it is shift_round_{stochastic,nearest} (core/rounding.h) term for term,
// which the tests check against the reference loops bit for bit.
INTRAIN_CLONES std::int64_t scale_round_row(const std::int8_t* e, const std::int64_t* c, const std::int64_t* zc,
                                            std::int64_t N, int shift, bool stochastic, RngKey key, std::uint32_t base,
                                            std::int8_t* E) {
  std::int64_t cs = 0;
  if (shift < 1 || shift > 62) {
    for (std::int64_t n = 0; n < N; ++n) {
      const std::int64_t v = stochastic ? shift_round_stochastic(e[n] * c[n], shift, key.bits(base + static_cast<std::uint32_t>(n)))
                                        : shift_round_nearest(e[n] * c[n], shift);
      E[n] = static_cast<std::int8_t>(v);
      cs += v * zc[n];
    }
    return cs;
  }
  const std::uint64_t mask = (std::uint64_t{1} << shift) - 1, half = std::uint64_t{1} << (shift - 1);
  // frac·2^32 truncated to 32 bits: rem << (32 − s) for s <= 32, rem >> (s − 32) beyond.
  const int left = std::max(0, 32 - shift), right = std::max(0, shift - 32);
  if (stochastic) {
    for (std::int64_t n = 0; n < N; ++n) {
      const std::int64_t v = e[n] * c[n];
      const std::int64_t q = v >> shift;
      const std::uint64_t frac32 = ((static_cast<std::uint64_t>(v) & mask) << left) >> right;
      const std::int64_t r = q + (frac32 > key.bits(base + static_cast<std::uint32_t>(n)));
      E[n] = static_cast<std::int8_t>(r);
      cs += r * zc[n];
    }
  } else {
    for (std::int64_t n = 0; n < N; ++n) {
      const std::int64_t v = e[n] * c[n];
      const std::int64_t q = v >> shift;
      const std::uint64_t rem = static_cast<std::uint64_t>(v) & mask;
      const std::int64_t r = q + ((rem > half) | ((rem == half) & static_cast<std::uint64_t>(q & 1)));
      E[n] = static_cast<std::int8_t>(r);
      cs += r * zc[n];
    }
  }
  return cs;
}

void check_forward_bound(const Tensor& X, const PackedWeights& W, const ScaleMantissas& sm) {
  // |Y| <= K · qmax(X) · (2^b - 1) · max c must fit int64 (docs/quantized-weights.md).
  const int128_t bound = static_cast<int128_t>(W.K()) * X.format().qmax() * W.max_code() * sm.max_c;
  if (bound > INT64_MAX) {
    throw std::invalid_argument("packed_matmul: the scales of this matrix span too many binades for an exact int64 "
                                "accumulation (max scale mantissa " + std::to_string(sm.max_c) +
                                "); quantize it with intrain's quantizers, which floor the scales");
  }
}

}  // namespace

// ---------------------------------------------------------------------------
// Forward: Y = X·Ŵ
// ---------------------------------------------------------------------------

Tensor packed_matmul(const Tensor& X, const PackedWeights& W) {
  const Operand x = check_operand(X, W.K(), "packed_matmul", "input", true);
  const std::int64_t R = x.R, K = W.K(), N = W.N(), G = W.group(), ng = W.groups_per_column();
  std::vector<std::int8_t> codes(static_cast<std::size_t>(G * N));
  const std::int64_t rpc = rows_per_chunk(N);

  if (x.is_float) {
    Tensor Y = Tensor::uninitialized(with_cols(X.shape(), N), Format::fp32());
    std::vector<float> tile(static_cast<std::size_t>(G * N)), P(static_cast<std::size_t>(R * N));
    float* y = Y.data<float>();
    for (std::int64_t g = 0; g < ng; ++g) {
      float_tile(W, g, codes, tile);
      // Batch 1, with batch strides of a whole matrix: oneDNN takes its slow
      // reference kernels when a batch stride is 0.
      GemmDesc d;
      d.M = R, d.K = G, d.N = N;
      d.a = {GemmType::F32, R * K, K, 1};
      d.b = {GemmType::F32, G * N, 1, G};  // B[kk, n] = tile[n·G + kk]
      d.c = {GemmType::F32, R * N, N, 1};
      onednn_gemm(d, X.data<float>() + g * G, tile.data(), g == 0 ? y : P.data());
      if (g == 0) continue;
      for_chunks(R, [&](std::int64_t, std::int64_t r0, std::int64_t r1) {
        for (std::int64_t i = r0 * N; i < r1 * N; ++i) y[i] += P[static_cast<std::size_t>(i)];
      }, rpc);
    }
    return Y;
  }

  const ScaleMantissas sm = scale_mantissas(W);
  check_forward_bound(X, W, sm);
  const int off = 1 << (W.bits() - 1);
  // A 9-16-bit X goes in as two int8 pieces, X = 256·H + L + 128, stacked as
  // the rows [H; L] of one [2R, K] source, so each group is still one oneDNN
  // call (M = 2R). Then X_g·Q'_g = 256·(H_g·Q'_g) + L_g·Q'_g + 128·colsum_g(Q'),
  // Q' = Q − 2^(b−1); each product is exact in int32 and the sum in int64.
  const bool split = X.dtype() == DType::I16;
  std::vector<std::int8_t> pieces;
  if (split) {
    pieces.resize(static_cast<std::size_t>(2 * R * K));
    const std::int16_t* x16 = X.data<std::int16_t>();
    for_chunks(R, [&](std::int64_t, std::int64_t r0, std::int64_t r1) {
      for (std::int64_t r = r0; r < r1; ++r) split_int16_s8(x16 + r * K, pieces.data() + r * K, pieces.data() + (R + r) * K, K);
    }, rows_per_chunk(K));
  }
  const std::int8_t* src = split ? pieces.data() : X.data<std::int8_t>();
  const std::int64_t M = split ? 2 * R : R;
  // Row sums of X per group, for the zero-point term: |.| <= G · 2^15.
  std::vector<std::int32_t> rs(static_cast<std::size_t>(R * ng));
  visit_int(X, [&](const auto* xp) {
    for_chunks(R, [&](std::int64_t, std::int64_t r0, std::int64_t r1) {
      for (std::int64_t r = r0; r < r1; ++r)
        for (std::int64_t g = 0; g < ng; ++g) {
          std::int32_t s = 0;
          for (std::int64_t k = g * G; k < (g + 1) * G; ++k) s += static_cast<std::int32_t>(xp[r * K + k]);
          rs[static_cast<std::size_t>(r * ng + g)] = s;
        }
    }, rows_per_chunk(K));
  });

  Tensor Y = Tensor::uninitialized(with_cols(X.shape(), N), Format::accumulator(64), X.exponent() + sm.exponent);
  std::int64_t* y = Y.data<std::int64_t>();
  std::vector<std::int32_t> P(static_cast<std::size_t>(M * N));
  std::vector<std::int64_t> cz(static_cast<std::size_t>(N)), zc(static_cast<std::size_t>(N)), cs(split ? static_cast<std::size_t>(N) : 0);
  for (std::int64_t g = 0; g < ng; ++g) {
    W.unpack_group(g, 0, N, off, codes.data());
    for (std::int64_t n = 0; n < N; ++n) {
      cz[static_cast<std::size_t>(n)] = sm.c[static_cast<std::size_t>(n * ng + g)];
      zc[static_cast<std::size_t>(n)] = off - static_cast<std::int64_t>(W.zero(n, g));
      if (split) {
        std::int64_t t = 0;
        for (std::int64_t i = 0; i < G; ++i) t += codes[static_cast<std::size_t>(n * G + i)];
        cs[static_cast<std::size_t>(n)] = t;
      }
    }
    // P = src[:, g]·(Q_g − 2^(b−1)): exact in int32 (G · 128 · 128 < 2^31 for G <= 4096).
    GemmDesc d;
    d.M = M, d.K = G, d.N = N;
    d.a = {GemmType::S8, M * K, K, 1};
    d.b = {GemmType::S8, G * N, 1, G};
    d.c = {GemmType::S32, M * N, N, 1};
    onednn_gemm(d, src + g * G, codes.data(), P.data());
    for_chunks(R, [&](std::int64_t, std::int64_t r0, std::int64_t r1) {
      for (std::int64_t r = r0; r < r1; ++r) {
        const std::int64_t s = rs[static_cast<std::size_t>(r * ng + g)];
        if (split) {
          scale_accumulate_split_row(y + r * N, P.data() + r * N, P.data() + (R + r) * N, cs.data(), cz.data(), zc.data(), s, N, g == 0);
        } else {
          scale_accumulate_row(y + r * N, P.data() + r * N, cz.data(), zc.data(), s, N, g == 0);
        }
      }
    }, rpc);
  }
  return Y;
}

Tensor packed_matmul_reference(const Tensor& X, const PackedWeights& W) {
  const Operand x = check_operand(X, W.K(), "packed_matmul_reference", "input", true);
  const std::int64_t R = x.R, K = W.K(), N = W.N(), G = W.group(), ng = W.groups_per_column();
  if (x.is_float) {
    // Y[r, n] = Σ_k X[r, k]·Ŵ[k, n], in double, rounded once.
    Tensor Y(with_cols(X.shape(), N), Format::fp32());
    const float* xp = X.data<float>();
    for (std::int64_t r = 0; r < R; ++r)
      for (std::int64_t n = 0; n < N; ++n) {
        double s = 0.0;
        for (std::int64_t k = 0; k < K; ++k) s += static_cast<double>(xp[r * K + k]) * W.value(k, n);
        Y.data<float>()[r * N + n] = static_cast<float>(s);
      }
    return Y;
  }
  // Y[r, n] = Σ_g c[n, g] · Σ_{k∈g} X[r, k]·(q[k, n] − z[n, g]), exponent eX + Es.
  const ScaleMantissas sm = scale_mantissas(W);
  check_forward_bound(X, W, sm);
  Tensor Y(with_cols(X.shape(), N), Format::accumulator(64), X.exponent() + sm.exponent);
  for (std::int64_t r = 0; r < R; ++r)
    for (std::int64_t n = 0; n < N; ++n) {
      std::int64_t acc = 0;
      for (std::int64_t g = 0; g < ng; ++g) {
        std::int64_t p = 0;
        for (std::int64_t k = g * G; k < (g + 1) * G; ++k)
          p += X.mantissa(r * K + k) * (static_cast<std::int64_t>(W.code(k, n)) - W.zero(n, g));
        acc += sm.c[static_cast<std::size_t>(n * ng + g)] * p;
      }
      Y.data<std::int64_t>()[r * N + n] = acc;
    }
  return Y;
}

// ---------------------------------------------------------------------------
// Backward: dX = dY·Ŵᵀ
// ---------------------------------------------------------------------------

namespace {

struct ErrorScaling {
  int shift = 0;     // E_g = round(dY·c / 2^shift)
  int exponent = 0;  // of dX: e_dY + Es + shift
};

ErrorScaling error_scaling(const Tensor& dY, const PackedWeights& W, const ScaleMantissas& sm, std::int64_t R) {
  const std::int64_t N = W.N(), ng = W.groups_per_column();
  if (static_cast<int128_t>(N) * dY.format().qmax() * W.max_code() > INT32_MAX) {
    throw std::invalid_argument("packed_matmul_t: N = " + std::to_string(N) + " is too large for an int32 result");
  }
  if (R * N > static_cast<std::int64_t>(UINT32_MAX)) {
    throw std::invalid_argument("packed_matmul_t: the error " + dY.describe() + " has more than 2^32 elements");
  }
  // max over (r, n, g) of |dY[r, n]·c[n, g]| = max_n colmax[n] · max_g c[n, g].
  const std::int8_t* e = dY.data<std::int8_t>();
  std::vector<int> colmax(static_cast<std::size_t>(N), 0);
  for (std::int64_t r = 0; r < R; ++r)
    for (std::int64_t n = 0; n < N; ++n) colmax[static_cast<std::size_t>(n)] = std::max(colmax[static_cast<std::size_t>(n)], std::abs(int{e[r * N + n]}));
  std::uint64_t M = 0;
  for (std::int64_t n = 0; n < N; ++n) {
    std::int64_t cmax = 0;
    for (std::int64_t g = 0; g < ng; ++g) cmax = std::max(cmax, sm.c[static_cast<std::size_t>(n * ng + g)]);
    M = std::max(M, static_cast<std::uint64_t>(colmax[static_cast<std::size_t>(n)]) * static_cast<std::uint64_t>(cmax));
  }
  ErrorScaling s;
  s.shift = shift_for_max(M, dY.format().qmax());
  s.exponent = dY.exponent() + sm.exponent + s.shift;
  return s;
}

}  // namespace

Tensor packed_matmul_t(const Tensor& dY, const PackedWeights& W, RngKey key) {
  const Operand o = check_operand(dY, W.N(), "packed_matmul_t", "error", false);
  const std::int64_t R = o.R, K = W.K(), N = W.N(), G = W.group(), ng = W.groups_per_column();
  std::vector<std::int8_t> codes(static_cast<std::size_t>(G * N));

  if (o.is_float) {
    Tensor dX = Tensor::uninitialized(with_cols(dY.shape(), K), Format::fp32());
    std::vector<float> tile(static_cast<std::size_t>(G * N));
    for (std::int64_t g = 0; g < ng; ++g) {
      float_tile(W, g, codes, tile);
      GemmDesc d;
      d.M = R, d.K = N, d.N = G;
      d.a = {GemmType::F32, R * N, N, 1};
      d.b = {GemmType::F32, G * N, G, 1};  // B[n, kk] = tile[n·G + kk]
      d.c = {GemmType::F32, R * K, K, 1};  // written straight into dX[:, g]
      onednn_gemm(d, dY.data<float>(), tile.data(), dX.data<float>() + g * G);
    }
    return dX;
  }

  const ScaleMantissas sm = scale_mantissas(W);
  const ErrorScaling es = error_scaling(dY, W, sm, R);
  const Rounding mode = dY.format().rounding();
  const int off = 1 << (W.bits() - 1);
  const std::int8_t* e = dY.data<std::int8_t>();
  Tensor dX = Tensor::uninitialized(with_cols(dY.shape(), K), Format::accumulator(32), es.exponent);
  std::int32_t* dx = dX.data<std::int32_t>();
  std::vector<std::int8_t> Eg(static_cast<std::size_t>(R * N));
  std::vector<std::int32_t> corr(static_cast<std::size_t>(R));
  std::vector<std::int64_t> cg(static_cast<std::size_t>(N)), zc(static_cast<std::size_t>(N));
  const std::int64_t rpc = rows_per_chunk(N);
  for (std::int64_t g = 0; g < ng; ++g) {
    for (std::int64_t n = 0; n < N; ++n) {
      cg[static_cast<std::size_t>(n)] = sm.c[static_cast<std::size_t>(n * ng + g)];
      zc[static_cast<std::size_t>(n)] = off - static_cast<std::int64_t>(W.zero(n, g));
    }
    const RngKey kg = key.derive(static_cast<std::uint64_t>(g));
    // E_g = round(dY ⊙ c_g / 2^shift) and its zero-point term, in one pass.
    for_chunks(R, [&](std::int64_t, std::int64_t r0, std::int64_t r1) {
      for (std::int64_t r = r0; r < r1; ++r)
        corr[static_cast<std::size_t>(r)] = static_cast<std::int32_t>(
            scale_round_row(e + r * N, cg.data(), zc.data(), N, es.shift, mode == Rounding::Stochastic, kg,
                            static_cast<std::uint32_t>(r * N), Eg.data() + r * N));
    }, rpc);
    W.unpack_group(g, 0, N, off, codes.data());
    GemmDesc d;
    d.M = R, d.K = N, d.N = G;
    d.a = {GemmType::S8, R * N, N, 1};
    d.b = {GemmType::S8, G * N, G, 1};
    d.c = {GemmType::S32, R * K, K, 1};
    onednn_gemm(d, Eg.data(), codes.data(), dx + g * G);
    for_chunks(R, [&](std::int64_t, std::int64_t r0, std::int64_t r1) {
      for (std::int64_t r = r0; r < r1; ++r) {
        const std::int32_t c = corr[static_cast<std::size_t>(r)];
        for (std::int64_t i = 0; i < G; ++i) dx[r * K + g * G + i] += c;
      }
    }, rows_per_chunk(G));
  }
  return dX;
}

Tensor packed_matmul_t_reference(const Tensor& dY, const PackedWeights& W, RngKey key) {
  const Operand o = check_operand(dY, W.N(), "packed_matmul_t_reference", "error", false);
  const std::int64_t R = o.R, K = W.K(), N = W.N(), G = W.group(), ng = W.groups_per_column();
  if (o.is_float) {
    Tensor dX(with_cols(dY.shape(), K), Format::fp32());
    const float* e = dY.data<float>();
    for (std::int64_t r = 0; r < R; ++r)
      for (std::int64_t k = 0; k < K; ++k) {
        double s = 0.0;
        for (std::int64_t n = 0; n < N; ++n) s += static_cast<double>(e[r * N + n]) * W.value(k, n);
        dX.data<float>()[r * K + k] = static_cast<float>(s);
      }
    return dX;
  }
  // dX[r, k] = Σ_n E_g[r, n]·(q[k, n] − z[n, g]), E_g[r, n] = round(dY[r, n]·c[n, g] / 2^shift).
  const ScaleMantissas sm = scale_mantissas(W);
  const ErrorScaling es = error_scaling(dY, W, sm, R);
  Tensor dX(with_cols(dY.shape(), K), Format::accumulator(32), es.exponent);
  const std::int8_t* e = dY.data<std::int8_t>();
  for (std::int64_t r = 0; r < R; ++r)
    for (std::int64_t k = 0; k < K; ++k) {
      const std::int64_t g = k / G;
      const RngKey kg = key.derive(static_cast<std::uint64_t>(g));
      std::int64_t s = 0;
      for (std::int64_t n = 0; n < N; ++n) {
        const std::int64_t i = r * N + n;
        const std::int64_t Eg = shift_round(e[i] * sm.c[static_cast<std::size_t>(n * ng + g)], es.shift,
                                            dY.format().rounding(), kg.bits(static_cast<std::uint32_t>(i)));
        s += Eg * (static_cast<std::int64_t>(W.code(k, n)) - W.zero(n, g));
      }
      dX.data<std::int32_t>()[r * K + k] = static_cast<std::int32_t>(s);
    }
  return dX;
}

}  // namespace intrain
