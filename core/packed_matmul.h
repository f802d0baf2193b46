// Matmuls with a packed group-quantized weight (core/packed_weights.h),
// computed tile by tile: the full dequantized matrix is never built. A tile
// is one K-group of W across all N columns (G·N int8 codes, or G·N floats in
// the fp32 path); docs/quantized-weights.md derives both directions.
//
// Notation: W [K, N], Ŵ[k, n] = s[n, g]·(q[k, n] − z[n, g]), g = k / G, and
// each binary16 scale written exactly as s = c·2^Es with Es the smallest
// scale exponent of the matrix and c a positive integer.
//
// Forward  Y = X·Ŵ, X [R, K]:
//   fp32 X      -> fp32 Y [R, N] (per tile: X[:, g]·Ŵ_g by oneDNN f32, summed over g in order).
//   integer X   -> exact acc64 Y [R, N], exponent eX + Es:
//   (2-16 bits)      Y[r, n] = Σ_g c[n, g] · P_g[r, n],
//                    P_g = X[:, g]·(Q_g − 2^(b−1)) + (2^(b−1) − z[n, g])·Σ_{k∈g} X[r, k]
//                  P_g is exact in int32 (oneDNN s8·s8), the sum exact in int64:
//                  |Y| ≤ K·qmax(X)·(2^b − 1)·max c, checked before running.
//                  A 9-16-bit X (int16 storage) is split, X = 256·H + L + 128
//                  with H, L in int8, and X_g·Q'_g is rebuilt exactly from the
//                  two int8 products and the column sums of Q'_g.
// Backward dX = dY·Ŵᵀ, dY [R, N]:
//   fp32 dY     -> fp32 dX [R, K] (per tile: dY·Ŵ_gᵀ, written into dX[:, g]).
//   integer dY  -> acc32 dX [R, K], exponent eE. 2-8 bits only: an int32 dX
//   (int8 storage)   could not hold N·2^15·(2^b − 1) for 16-bit errors.
//                  The scale varies along N (the contraction), so it goes into
//                  the error: E_g[r, n] = round(dY[r, n]·c[n, g] / 2^sh), in
//                  dY's own format and rounding mode, with one shift sh for all
//                  groups (from max_n max|dY[:, n]|·max_g c[n, g], so nothing
//                  saturates); eE = e_dY + Es + sh. Then
//                  dX[:, g] = E_g·(Q_g − 2^(b−1))ᵀ + Σ_n E_g[:, n]·(2^(b−1) − z[n, g])
//                  exactly. The one rounding is E_g's: |error| ≤ 2^eE·ρ·Σ_n |q − z|,
//                  ρ = 1/2 (nearest) or 1 (stochastic). Stochastic bits for
//                  E_g[r, n] come from key.derive(g).bits(r·N + n).
// Results are bit-identical to the *_reference loops whatever the thread count.
#pragma once

#include "core/packed_weights.h"
#include "core/rng.h"
#include "core/tensor.h"

namespace intrain {

// c[n·(K/G) + g] and Es, so that s[n, g] = c·2^Es exactly (see above).
struct ScaleMantissas {
  std::vector<std::int64_t> c;
  int exponent = 0;
  std::int64_t max_c = 0;
};
ScaleMantissas scale_mantissas(const PackedWeights& W);
// The same for any list of binary16 scales (the salient part of AdpQ, core/salient_weights.h).
ScaleMantissas scale_mantissas(std::span<const std::uint16_t> scale_bits);

Tensor packed_matmul(const Tensor& X, const PackedWeights& W);
Tensor packed_matmul_t(const Tensor& dY, const PackedWeights& W, RngKey key);

// Plain loops over the same math (int64 sums; double sums rounded once for fp32).
Tensor packed_matmul_reference(const Tensor& X, const PackedWeights& W);
Tensor packed_matmul_t_reference(const Tensor& dY, const PackedWeights& W, RngKey key);

}  // namespace intrain
