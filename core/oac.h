// OAC (Edalati et al., arXiv 2405.15025): the output-adaptive Hessian that
// replaces GPTQ's layer-wise one. docs/oac.md derives it and lists every
// approximation; in short, for a linear layer Y = X·W (W [K, N]) inside a
// model with output cross-entropy L:
//
//   * Fisher identity: the Hessian of E[L] w.r.t. the weights is approximated
//     by the expected outer product of per-sample gradients, E[g gᵀ];
//   * independence across layers (one layer's block of the Hessian) and
//     across output columns n of W (one K×K block per column);
//   * aggregation over columns: the N blocks are summed into one K×K
//     matrix, so that GPTQ's solver (one H for all columns) applies.
//
// With the per-sample weight gradient G_s = X_sᵀ·dY_s ([K, N]; X_s, dY_s the
// layer's inputs and output gradients on sample s, a sequence of T tokens),
//
//     H_OAC = 2/S · Σ_s Σ_n G_s[:, n]·G_s[:, n]ᵀ = 2/S · Σ_s G_s·G_sᵀ
//
// (the factor 2/S only mirrors HessianAccumulator: GPTQ's solution does not
// depend on H's scale, its relative damping neither).
#pragma once

#include <cstdint>
#include <vector>

namespace intrain {

class OutputAdaptiveHessian {
 public:
  OutputAdaptiveHessian(std::int64_t K, std::int64_t N);
  // Adds S = R / T samples: x [R, K] and dy [R, N] row-major, rows grouped in
  // consecutive samples of T rows. `dy_scale` multiplies dy (to undo a mean
  // over the batch, so every sample's gradient is of its own loss).
  void add(const float* x, const float* dy, std::int64_t R, std::int64_t T, double dy_scale = 1.0);
  std::int64_t K() const { return K_; }
  std::int64_t samples() const { return samples_; }
  // H_OAC [K, K] row-major. Throws if no samples were added.
  std::vector<double> hessian() const;

 private:
  std::int64_t K_, N_;
  std::int64_t samples_ = 0;
  std::vector<double> ggt_;  // Σ_s G_s G_sᵀ, lower triangle
};

}  // namespace intrain
