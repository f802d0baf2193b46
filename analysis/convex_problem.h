// A convex sanity problem on which every assumption of the bounds holds
// exactly (docs/convergence.md §9), trained by the integer engine's pieces.
//
// Least squares f(x) = (1/2n) ||A x - b||^2 with a designed A:
//   A = H[:, 0:d] diag(s),  H the n x n Sylvester-Hadamard matrix (entries +-1,
//   H^T H = n I), s_j small positive integers. Then
//     A^T A / n = diag(s_j^2):   L = max s_j^2, mu = min s_j^2, exactly;
//     every row has ||a_i||^2 = sum_j s_j^2 =: L_max;
//     x*_j = (H^T b)_j / (n s_j), and f(x) - f* = (1/2) sum_j s_j^2 (x_j - x*_j)^2,
//     which is how suboptimality is measured (no cancellation against f*).
//   Entries of A are +-s_j, exact in every fixed-point format with
//   qmax >= max s_j (the cast by the maximum puts them on its grid), so the A
//   format adds no error and L, mu are those of the problem actually trained.
//   b = A x_true + noise, on the grid 2^-8 (exact in an int64 accumulator).
//
// Training (one replicate, x_0 = 0, momentum beta (default 0), no weight decay):
//   w   = cast(master, W)                 (core/ops.h; fp32: the master itself)
//   y   = X_B w                           (core/matmul.h; exact int32/int64)
//   r   = y - b_B                         (add_accumulators: exact int64)
//   r_E = cast(r, E)
//   g   = X_B^T r_E                       (core/matmul.h; the SUM over the batch)
//   Sgd::step(G, lr / B)                  (optim/sgd.h: g cast to G, v = beta v + g, SR onto the master grid 2^-24)
// so the step is x+ = Q(x - lr * mean gradient) (beta = 0) with the 1/B folded
// exactly into the optimizer's fixed-point lr (B and lr powers of two).
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "analysis/bounds.h"
#include "core/precision.h"

namespace intrain {

struct LeastSquaresConfig {
  int log2_rows = 8;                            // n = 2^log2_rows
  std::vector<int> scales{1, 1, 1, 1, 2, 2, 2, 2};  // s_j, d = scales.size() <= n
  double noise_std = 0.5;                       // std of the (uniform) noise in b
  std::uint64_t seed = 1;
};

struct LeastSquares {
  int n = 0, d = 0;
  std::vector<float> A;  // [n, d] row-major
  std::vector<double> b, x_star, s;
  double L = 0, mu = 0, L_max = 0, f_star = 0;
  double sigma_star2 = 0;  // (1/n) sum_i ||grad f_i(x*)||^2 = L_max * 2 f*

  double suboptimality(std::span<const double> x) const;  // f(x) - f*
  double gradient_norm2(std::span<const double> x) const;  // ||grad f(x)||^2 = sum_j s_j^4 (x_j - x*_j)^2
  // Constants of minibatch SGD with replacement from x_0 = 0 (docs §9):
  // E||g_B - grad f||^2 <= 2 sigma*^2 / B + (4 L_max / B) (f - f*)  (Gower et al. 2019).
  ProblemConstants constants(int batch) const;
};

LeastSquares make_least_squares(const LeastSquaresConfig& cfg);

struct ConvexRunConfig {
  int batch = 32;          // power of two
  int steps = 300;
  double lr = 1.0 / 16;    // power of two, <= 1/L
  double momentum = 0.0;   // heavy ball: then the bound is heavy_ball_gradient_norm, not the PL one
  int replicates = 16;     // the bound is on an expectation: compare the replicate mean
  std::uint64_t seed = 7;
};

struct ConvexRun {
  std::string format;                  // Precision::name()
  std::vector<double> suboptimality;   // replicate mean of f(x_k) - f*, k = 0..steps
  std::vector<StepTerms> terms;        // per step, the envelope over replicates of the observed scales
  std::vector<BoundPoint> bound;       // momentum 0: the PL bound, k = 0..steps; else empty
  std::vector<double> grad_norm2;      // replicate mean of ||grad f(x_k)||^2, k = 0..steps-1
  std::vector<BoundPoint> hb_bound;    // momentum > 0: the heavy-ball bound on the weighted mean, K = 1..steps
  std::vector<double> hb_measured;     // the same weighted mean of grad_norm2, K = 1..steps
  std::int64_t saturated = 0;          // elements the optimizer clipped (must be 0 for the bound to apply)
  double flushed_fraction = 0.0;       // gradient coordinates the G cast rounds to 0 (RN only)
  double max_ratio = 0.0;              // max_k suboptimality / bound (PL), or hb_measured / hb_bound (heavy ball)
};

// Trains the problem in `prec` (fp32, or integer formats with their rounding)
// and evaluates the bound from the observed scales. `constants`, if given,
// replace ls.constants(batch) in the bound (to show that a wrong constant
// breaks it).
ConvexRun run_least_squares(const LeastSquares& ls, const Precision& prec, const ConvexRunConfig& cfg,
                            const ProblemConstants* constants = nullptr);

}  // namespace intrain
