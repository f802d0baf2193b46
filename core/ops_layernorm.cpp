// LayerNorm, forward and backward, float and integer side by side.
//
//   forward:  xhat = (x - mean) / sigma,  sigma = sqrt(var + eps),  y = xhat * gamma + beta
//   backward: g = dy * gamma
//             dx = (1/sigma) * (g - mean(g) - xhat * mean(g * xhat))
//             dgamma = sum_rows dy * xhat,   dbeta = sum_rows dy
//
// Integer arithmetic (x in residual_format(): |x| < 2^23 at exponent e):
//   * y = x - round(sum x / C) and var = sum y^2 are exact in int64
//     (C * 2^48 < 2^62 for C <= 2^14);
//   * eps is 2^-17 (float mode: 1e-5; the difference matters only when the
//     variance is within a factor ~10 of eps), added in x units as
//     C * 2^(-17 - 2e), a shift;
//   * sigma' = isqrt(S * 4^m / C) with S = var + eps term and m chosen so that
//     S * 4^m lies in [2^60, 2^62): sigma' = sigma * 2^m to about 30 bits;
//   * rinv = floor(2^48 / sigma') is 1/sigma in fixed point, and
//     xhat = round(y * rinv / 2^(32 - m)) in Q16 (exponent -16);
//   * y = xhat * gamma + beta is exact in int64 and requantized once.
// The backward pass reuses xhat and rinv (no square root or division by
// sigma again) and keeps every product inside int64 by rounding g to 24 bits.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "core/collective.h"
#include "core/fixed_point.h"
#include "core/ops.h"
#include "core/parallel.h"
#include "core/quantize.h"
#include "core/simd.h"

namespace intrain {

namespace {

constexpr double kEpsFloat = 1e-5;
constexpr int kEpsLog2Int = -17;  // integer eps = 2^-17

void check_ln(const Tensor& x, const Tensor& gamma, const Tensor& beta) {
  if (gamma.numel() != x.cols() || beta.numel() != x.cols()) {
    throw std::invalid_argument("layernorm: gamma " + gamma.describe() + " / beta " + beta.describe() +
                                " do not match the last dimension of " + x.describe());
  }
}

std::int64_t rows_of(const Tensor& x) { return x.numel() / std::max<std::int64_t>(x.cols(), 1); }

// floor(sqrt(v)) by integer Newton iteration from an upper bound: the
// iterates decrease monotonically to the floor of the root.
std::uint64_t isqrt64(std::uint64_t v) {
  if (v < 2) return v;
  std::uint64_t x = std::uint64_t{1} << ((bit_length(v) + 1) / 2);  // >= sqrt(v)
  while (true) {
    const std::uint64_t y = (x + v / x) / 2;
    if (y >= x) return x;
    x = y;
  }
}

std::int64_t round_div(std::int64_t a, std::int64_t b) {  // nearest, ties away from zero; b > 0
  return a >= 0 ? (a + b / 2) / b : -((-a + b / 2) / b);
}

// ---- float ----------------------------------------------------------------

Tensor ln_forward_float(const Tensor& x, const Tensor& gamma, const Tensor& beta, LayerNormCache& cache) {
  const std::int64_t R = rows_of(x), C = x.cols();
  Tensor y(x.shape(), Format::fp32());
  cache.xhat = Tensor(x.shape(), Format::fp32());
  cache.rstd.assign(static_cast<std::size_t>(R), 0.0f);
  const float *px = x.data<float>(), *g = gamma.data<float>(), *b = beta.data<float>();
  float *py = y.data<float>(), *xh = cache.xhat.data<float>();
  for_chunks(R, [&](std::int64_t, std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      const float* xr = px + r * C;
      double mean = 0.0, var = 0.0;
      for (std::int64_t c = 0; c < C; ++c) mean += xr[c];
      mean /= static_cast<double>(C);
      for (std::int64_t c = 0; c < C; ++c) var += (xr[c] - mean) * (xr[c] - mean);
      var /= static_cast<double>(C);
      const float rstd = static_cast<float>(1.0 / std::sqrt(var + kEpsFloat));
      cache.rstd[static_cast<std::size_t>(r)] = rstd;
      for (std::int64_t c = 0; c < C; ++c) {
        const float n = static_cast<float>(xr[c] - mean) * rstd;
        xh[r * C + c] = n;
        py[r * C + c] = n * g[c] + b[c];
      }
    }
  }, 16);
  return y;
}

Tensor ln_backward_float(const Tensor& dy, const Tensor& gamma, const LayerNormCache& cache, Tensor& dgamma,
                         Tensor& dbeta) {
  const std::int64_t R = rows_of(dy), C = dy.cols();
  Tensor dx(dy.shape(), Format::fp32());
  dgamma = Tensor({C}, Format::fp32());
  dbeta = Tensor({C}, Format::fp32());
  const float *pdy = dy.data<float>(), *g = gamma.data<float>(), *xh = cache.xhat.data<float>();
  float* pdx = dx.data<float>();
  for_chunks(R, [&](std::int64_t, std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      double mg = 0.0, mgx = 0.0;
      for (std::int64_t c = 0; c < C; ++c) {
        const double gi = static_cast<double>(pdy[r * C + c]) * g[c];
        mg += gi;
        mgx += gi * xh[r * C + c];
      }
      mg /= static_cast<double>(C);
      mgx /= static_cast<double>(C);
      const float rstd = cache.rstd[static_cast<std::size_t>(r)];
      for (std::int64_t c = 0; c < C; ++c) {
        const double gi = static_cast<double>(pdy[r * C + c]) * g[c];
        pdx[r * C + c] = static_cast<float>(rstd * (gi - mg - xh[r * C + c] * mgx));
      }
    }
  }, 16);
  // Parameter gradients: each column summed by one thread, in row order.
  float *dg = dgamma.data<float>(), *db = dbeta.data<float>();
  for_chunks(C, [&](std::int64_t, std::int64_t c0, std::int64_t c1) {
    for (std::int64_t r = 0; r < R; ++r)
      for (std::int64_t c = c0; c < c1; ++c) {
        dg[c] += pdy[r * C + c] * xh[r * C + c];
        db[c] += pdy[r * C + c];
      }
  }, 64);
  return dx;
}

// ---- integer --------------------------------------------------------------

// ---- integer kernels (one row at a time, multiversioned) -------------------

// Row statistics and xhat (Q16). Returns nothing; writes rinv and m.
INTRAIN_CLONES void ln_row_normalize(const std::int32_t* x, std::int64_t C, std::int64_t eps_c, std::int32_t* xhat,
                                     std::int64_t* rinv_out, std::int32_t* m_out) {
  std::int64_t sum = 0;
  for (std::int64_t c = 0; c < C; ++c) sum += x[c];
  const std::int64_t mean = round_div(sum, C);
  std::int64_t var = 0;
  for (std::int64_t c = 0; c < C; ++c) var += (x[c] - mean) * (x[c] - mean);
  const std::uint64_t S = static_cast<std::uint64_t>(var + eps_c);
  // m: S * 4^m in [2^60, 2^62), so sigma' carries about 30 significant bits.
  const int m = std::clamp((62 - bit_length(S)) / 2, 0, 30);
  const std::uint64_t sigma = isqrt64((S << (2 * m)) / static_cast<std::uint64_t>(C));
  const std::int64_t rinv = static_cast<std::int64_t>((std::uint64_t{1} << 48) / std::max<std::uint64_t>(sigma, 1));
  *rinv_out = rinv;
  *m_out = m;
  const int sh = 32 - m;  // >= 2
  const std::int64_t half = std::int64_t{1} << (sh - 1);
  for (std::int64_t c = 0; c < C; ++c) {
    const std::int64_t p = (x[c] - mean) * rinv;
    xhat[c] = static_cast<std::int32_t>((p + half) >> sh);  // round half up: deterministic
  }
}

// out = xhat * gamma + beta (beta pre-shifted to the output exponent); returns max |out|.
INTRAIN_CLONES std::uint64_t ln_row_affine(const std::int32_t* xhat, const std::int32_t* g, const std::int64_t* beta,
                                           std::int64_t C, ExponentShift sh, std::int64_t* out) {
  std::uint64_t mx = 0;
  for (std::int64_t c = 0; c < C; ++c) {
    const std::int64_t o = sh(static_cast<std::int64_t>(xhat[c]) * g[c]) + beta[c];
    out[c] = o;
    const std::uint64_t a = o < 0 ? 0 - static_cast<std::uint64_t>(o) : static_cast<std::uint64_t>(o);
    mx = a > mx ? a : mx;
  }
  return mx;
}

Tensor ln_forward_int(const Tensor& x, const Tensor& gamma, const Tensor& beta, const Format& out, RngKey key,
                      LayerNormCache& cache) {
  const std::int64_t R = rows_of(x), C = x.cols();
  if (x.format() != residual_format()) {
    throw std::invalid_argument("layernorm: integer input " + x.describe() + " must be in " + residual_format().name());
  }
  if (C > (std::int64_t{1} << 14)) throw std::invalid_argument("layernorm: rows longer than 2^14 are not supported");
  const int e = x.exponent();
  // eps in units of x^2, times C: C * 2^(-17 - 2e).
  const int eps_shift = kEpsLog2Int - 2 * e;
  const std::int64_t eps_c = eps_shift >= 40 ? (std::int64_t{1} << 40) * C
                             : eps_shift >= 0 ? C << eps_shift
                                              : shift_round_nearest(C, -eps_shift);
  cache.xhat = Tensor::uninitialized(x.shape(), Format::accumulator(32), -16);
  cache.rinv.assign(static_cast<std::size_t>(R), 0);
  cache.rshift.assign(static_cast<std::size_t>(R), 0);
  cache.x_exponent = e;
  // y = xhat * gamma + beta at one exponent, exactly, then requantized once.
  // |xhat| <= sqrt(C) * 2^16 (a normalised row has norm sqrt(C)), so the
  // product bound is known before the pass.
  const std::uint64_t xhat_bound = (static_cast<std::uint64_t>(isqrt64(static_cast<std::uint64_t>(C))) + 1) << 16;
  const std::uint64_t max_prod = std::uint64_t{1} << (bit_length(xhat_bound) + bit_length(max_abs_mantissa(gamma)));
  const int ep = -16 + gamma.exponent();
  const int eo = common_exponent(max_prod, ep, max_abs_mantissa(beta), beta.exponent());
  std::vector<std::int64_t> bias(static_cast<std::size_t>(C));
  const std::int32_t *g = gamma.data<std::int32_t>(), *b = beta.data<std::int32_t>();
  for (std::int64_t c = 0; c < C; ++c) bias[static_cast<std::size_t>(c)] = shift_to(b[c], beta.exponent(), eo);
  const ExponentShift sh(ep, eo);
  Tensor acc = Tensor::uninitialized(x.shape(), Format::accumulator(64), eo);
  const std::int32_t* px = x.data<std::int32_t>();
  std::int32_t* xh = cache.xhat.data<std::int32_t>();
  std::int64_t* pa = acc.data<std::int64_t>();
  const std::int64_t rows_per_chunk = std::max<std::int64_t>(1, kChunk / C);
  std::vector<std::uint64_t> mx(static_cast<std::size_t>(num_chunks(R, rows_per_chunk)), 0);
  for_chunks(R, [&](std::int64_t chunk, std::int64_t r0, std::int64_t r1) {
    std::uint64_t m = 0;
    for (std::int64_t r = r0; r < r1; ++r) {
      ln_row_normalize(px + r * C, C, eps_c, xh + r * C, &cache.rinv[static_cast<std::size_t>(r)],
                       &cache.rshift[static_cast<std::size_t>(r)]);
      m = std::max(m, ln_row_affine(xh + r * C, g, bias.data(), C, sh, pa + r * C));
    }
    mx[static_cast<std::size_t>(chunk)] = m;
  }, rows_per_chunk);
  std::uint64_t mxall = 0;
  for (auto v : mx) mxall = std::max(mxall, v);
  return requantize_with_max(acc, mxall, out, key);
}

// One row of the backward pass, in g' units (g' = dy * gamma >> gshift):
//   v_c = (C g'_c - sum g' - xhat_c * sum(g' xhat)) * (rinv * 2^12 / C)
// at exponent e_g' + m - 48 - e_x - 12. Returns max |v|.
INTRAIN_CLONES std::uint64_t ln_row_backward(const std::int32_t* dy, const std::int32_t* gamma,
                                             const std::int32_t* xhat, std::int64_t C, int gshift, std::int64_t mult,
                                             std::int64_t* v, std::int64_t* gbuf) {
  std::int64_t A = 0, Bq = 0;
  const std::int64_t ghalf = gshift > 0 ? std::int64_t{1} << (gshift - 1) : 0;
  for (std::int64_t c = 0; c < C; ++c) {
    const std::int64_t g = (static_cast<std::int64_t>(dy[c]) * gamma[c] + ghalf) >> gshift;  // < 2^24
    gbuf[c] = g;
    A += g;
    Bq += g * xhat[c];
  }
  const std::int64_t B = (Bq + (std::int64_t{1} << 15)) >> 16;  // sum g' xhat, in g' units
  std::uint64_t mx = 0;
  for (std::int64_t c = 0; c < C; ++c) {
    const std::int64_t inner = C * gbuf[c] - A - ((xhat[c] * B + (std::int64_t{1} << 15)) >> 16);
    const std::int64_t o = inner * mult;
    v[c] = o;
    const std::uint64_t a = o < 0 ? 0 - static_cast<std::uint64_t>(o) : static_cast<std::uint64_t>(o);
    mx = a > mx ? a : mx;
  }
  return mx;
}

// dx = v shifted from the row's exponent to the tensor's, stochastically rounded.
INTRAIN_CLONES void ln_row_output(const std::int64_t* v, std::int64_t C, int s, RngKey key, std::uint32_t base,
                                  std::int32_t* dx) {
  if (s <= 0) {
    for (std::int64_t c = 0; c < C; ++c) dx[c] = static_cast<std::int32_t>(v[c] << -s);
    return;
  }
  const std::uint64_t mask = (std::uint64_t{1} << s) - 1;
  for (std::int64_t c = 0; c < C; ++c) {
    const std::uint64_t rem = static_cast<std::uint64_t>(v[c]) & mask;
    const std::uint32_t frac32 = static_cast<std::uint32_t>(s <= 32 ? rem << (32 - s) : rem >> (s - 32));
    dx[c] = static_cast<std::int32_t>((v[c] >> s) + (frac32 > key.bits(base + static_cast<std::uint32_t>(c))));
  }
}

// Column sums: dgamma[c] += dy * xhat, dbeta[c] += dy over rows [r0, r1).
INTRAIN_CLONES void ln_param_grads(const std::int32_t* dy, const std::int32_t* xhat, std::int64_t r0, std::int64_t r1,
                                   std::int64_t C, std::int64_t* dg, std::int64_t* db) {
  for (std::int64_t r = r0; r < r1; ++r)
    for (std::int64_t c = 0; c < C; ++c) {
      dg[c] += static_cast<std::int64_t>(dy[r * C + c]) * xhat[r * C + c];
      db[c] += dy[r * C + c];
    }
}

Tensor ln_backward_int(const Tensor& dy_in, const Tensor& gamma, const LayerNormCache& cache, Tensor& dgamma,
                       Tensor& dbeta, RngKey key) {
  const std::int64_t R = rows_of(dy_in), C = dy_in.cols();
  const Tensor dy = cast(dy_in, residual_format(), key.derive(1));  // |dy| < 2^23
  const std::int32_t *pdy = dy.data<std::int32_t>(), *gm = gamma.data<std::int32_t>();
  const std::int32_t* xh = cache.xhat.data<std::int32_t>();
  // g' = dy * gamma rounded to `gbits` bits (24 for rows of up to 128; one
  // bit fewer per doubling beyond, so that C * g' * (rinv 2^12 / C) stays in
  // int64 for C up to 2^14).
  const int gbits = 24 - std::max(0, bit_length(static_cast<std::uint64_t>(C)) - 8);
  const int gshift =
      std::max(0, bit_length(slice_max(key, max_abs_mantissa(dy))) + bit_length(max_abs_mantissa(gamma)) - gbits);
  const int eg = dy.exponent() + gamma.exponent() + gshift;
  std::vector<std::int64_t> v(static_cast<std::size_t>(R * C));
  std::vector<int> row_exp(static_cast<std::size_t>(R));
  std::vector<int> row_bits(static_cast<std::size_t>(R));
  const std::int64_t rows_per_chunk = std::max<std::int64_t>(1, kChunk / C);
  for_chunks(R, [&](std::int64_t, std::int64_t r0, std::int64_t r1) {
    std::vector<std::int64_t> gbuf(static_cast<std::size_t>(C));
    for (std::int64_t r = r0; r < r1; ++r) {
      const std::int64_t mult = (cache.rinv[static_cast<std::size_t>(r)] << 12) / C;
      const std::uint64_t mx = ln_row_backward(pdy + r * C, gm, xh + r * C, C, gshift, mult,
                                               v.data() + r * C, gbuf.data());
      row_exp[static_cast<std::size_t>(r)] = eg + cache.rshift[static_cast<std::size_t>(r)] - 48 - cache.x_exponent - 12;
      row_bits[static_cast<std::size_t>(r)] = bit_length(mx);
    }
  }, rows_per_chunk);
  // One exponent for the whole tensor: the smallest that keeps every row inside 23 bits.
  int eo = INT32_MIN;
  for (std::int64_t r = 0; r < R; ++r)
    eo = std::max(eo, row_exp[static_cast<std::size_t>(r)] + row_bits[static_cast<std::size_t>(r)] - 23);
  eo = slice_max(key, eo);
  Tensor dx = Tensor::uninitialized(dy_in.shape(), residual_format(), eo);
  std::int32_t* pdx = dx.data<std::int32_t>();
  const RngKey k3 = slice_key(key.derive(3), R * C);
  for_chunks(R, [&](std::int64_t, std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      ln_row_output(v.data() + r * C, C, eo - row_exp[static_cast<std::size_t>(r)], k3,
                    static_cast<std::uint32_t>(r * C), pdx + r * C);
    }
  }, rows_per_chunk);
  // dgamma = sum_r dy * xhat (exponent e_dy - 16), dbeta = sum_r dy: integer
  // partial sums per chunk of rows, added in chunk order (exact anyway).
  const std::int64_t nchunks = num_chunks(R, rows_per_chunk);
  std::vector<std::int64_t> part(static_cast<std::size_t>(nchunks * 2 * C), 0);
  for_chunks(R, [&](std::int64_t chunk, std::int64_t r0, std::int64_t r1) {
    std::int64_t* p = part.data() + chunk * 2 * C;
    ln_param_grads(pdy, xh, r0, r1, C, p, p + C);
  }, rows_per_chunk);
  dgamma = Tensor({C}, Format::accumulator(64), dy.exponent() - 16);
  dbeta = Tensor({C}, Format::accumulator(64), dy.exponent());
  std::int64_t *dg = dgamma.data<std::int64_t>(), *db = dbeta.data<std::int64_t>();
  for (std::int64_t k = 0; k < nchunks; ++k)
    for (std::int64_t c = 0; c < C; ++c) {
      dg[c] += part[static_cast<std::size_t>(k * 2 * C + c)];
      db[c] += part[static_cast<std::size_t>(k * 2 * C + C + c)];
    }
  return dx;
}

}  // namespace

Tensor layernorm_forward(const Tensor& x, const Tensor& gamma, const Tensor& beta, const Format& out, RngKey key,
                         LayerNormCache& cache) {
  check_ln(x, gamma, beta);
  if (x.format().is_float()) return cast(ln_forward_float(x, gamma, beta, cache), out, key);
  return ln_forward_int(x, gamma, beta, out, key, cache);
}

Tensor layernorm_backward(const Tensor& dy, const Tensor& gamma, const LayerNormCache& cache, Tensor& dgamma,
                          Tensor& dbeta, RngKey key) {
  if (dy.format().is_float()) return ln_backward_float(dy, gamma, cache, dgamma, dbeta);
  return ln_backward_int(dy, gamma, cache, dgamma, dbeta, key);
}

}  // namespace intrain
