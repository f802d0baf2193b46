// Weight quantizers that produce PackedWeights: round-to-nearest (RTN) and
// GPTQ (Frantar et al., arXiv 2210.17323). docs/quantized-weights.md derives
// both and states what the tests check.
//
// Input: a float weight W [K, N], row-major, in the HF Conv1D layout (in,
// out); groups of G consecutive k per output column (core/packed_weights.h).
//
// Group parameters (shared by RTN and GPTQ): asymmetric min-max over the
// group with the range widened to include 0 (so 0 is exact and the zero point
// is a valid code), maxq = 2^b − 1:
//     scale = max((max − min) / maxq, floor), rounded to binary16 (nearest);
//     zero  = clamp(round(−min / scale), 0, maxq);
//     q     = clamp(round(w / scale) + zero, 0, maxq)      (round: half to even, in double)
// The codes are computed from the binary16 scale that is stored, so Ŵ is
// exactly what the file holds. `floor` = max(2^-16 · the largest raw scale of
// the matrix, 2^-24): it bounds the spread of scales within one matrix to
// 2^17, which the integer kernels' int64 accumulation relies on
// (core/packed_matmul.h); a group whose range is below 2^-16 of the largest
// group's loses nothing that matters (its error stays below 2^-17 of the
// largest group's step). A group of all zeros gets the scale of range [−1, 1].
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "core/packed_weights.h"

namespace intrain {

struct GroupParams {
  float scale = 1.0f;  // a binary16 value
  std::uint32_t zero = 0;
};

// Scale floor of a matrix (see above): from the largest raw group scale.
float scale_floor(std::span<const float> W, std::int64_t K, std::int64_t N, int bits, int group);
// Parameters of one group given as `n` values with stride `stride`.
GroupParams group_params(const float* w, std::int64_t n, std::int64_t stride, int bits, float floor);
std::uint32_t quantize_code(double w, const GroupParams& p, int bits);

// Round to nearest, group by group.
PackedWeights quantize_rtn(std::span<const float> W, std::int64_t K, std::int64_t N, int bits, int group);

// Sum of x·xᵀ over calibration rows x [K] (inputs of one linear layer), in
// double; H = 2·sum / rows is GPTQ's Hessian of the layer's squared error.
class HessianAccumulator {
 public:
  explicit HessianAccumulator(std::int64_t K) : K_(K), xtx_(static_cast<std::size_t>(K * K), 0.0) {}
  // Adds R rows of x, row-major [R, K].
  void add(const float* x, std::int64_t R);
  std::int64_t K() const { return K_; }
  std::int64_t rows() const { return rows_; }
  // H = 2/rows · Σ x·xᵀ, [K, K] row-major. Throws if no rows were added.
  std::vector<double> hessian() const;

 private:
  std::int64_t K_;
  std::int64_t rows_ = 0;
  std::vector<double> xtx_;
};

struct GptqOptions {
  int bits = 4;
  int group = 128;
  double damp = 0.01;      // fraction of mean(diag H) added to the diagonal (0: plain Cholesky first)
  bool act_order = false;  // quantize inputs by decreasing H[k, k] (static groups)
};

// Raises of the damping before quantize_gptq gives up: from 1e-6 that is up
// to 1e6 of the mean diagonal, which makes any finite positive semidefinite
// H positive definite; only a NaN or a negative eigenvalue gets that far.
inline constexpr int kMaxDampRaises = 12;

struct GptqResult {
  PackedWeights weights;
  double damp = 0.0;      // the damping fraction finally used
  int damp_raises = 0;    // times it was raised (×10, or 0 -> 1e-6) because a Cholesky failed
  int dead_inputs = 0;    // inputs with H[k, k] = 0 (never active): their weights are set to 0
};

// GPTQ: quantizes input rows k of W one at a time (in natural or act order)
// and spreads each row's error over the rows not yet quantized through the
// upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU): with d = U[k, k],
//     err = (W[k, :] − Ŵ[k, :]) / d;   W[j, :] −= U[k, j] · err   for later j.
// Without act order the group parameters are found when a group's first row
// is reached (from the updated weights, as the reference code does); with act
// order they are found from the original W before the loop ("static groups"),
// so the groups stay contiguous K-blocks in storage. H is [K, K] row-major.
GptqResult quantize_gptq(std::span<const float> W, std::int64_t K, std::int64_t N, std::span<const double> H,
                         const GptqOptions& opt);

// ||X·W − X·Ŵ||² / rows computed from H (= 2/rows XᵀX): tr(Δᵀ H Δ) / 2,
// Δ = W − Ŵ. The layer output error the quantizers are judged by.
double layer_output_error(std::span<const float> W, const PackedWeights& Wq, std::span<const double> H);

}  // namespace intrain
