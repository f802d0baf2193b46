// AdpQ (Ghaffari et al., arXiv 2405.13358): zero-shot weight quantization
// with salient weights separated by an adaptive-LASSO soft threshold.
// docs/quantized-weights.md ("AdpQ") derives the rule; in short:
//
// The adaptive LASSO for one weight w, with penalty weight 1/|w|^γ,
//     u* = argmin_u ½(w − u)² + λ·|u| / |w|^γ  =  sign(w)·max(|w| − λ/|w|^γ, 0),
// is non-zero exactly when |w| > τ = λ^(1/(1+γ)). Those weights are the
// salient ones. The weight splits as w = u* + r with
//     salient part  u* (sparse: non-zero only above τ),
//     remainder     r = w − u*, and |r| ≤ τ everywhere
// (below τ, r = w; above it, r = sign(w)·λ/|w|^γ < τ). So the dense
// remainder has the range of the bulk of the weights, free of outliers, and
// is quantized group-wise by RTN (core/gptq.h's group parameters); the
// salient part is quantized on its own, in groups of G consecutive entries,
// each group with its own scale and zero (core/salient_weights.h). Ŵ is the
// sum of the two. No data is read: the result is a function of W alone.
//
// λ (per layer) comes from a threshold rule:
//   Fraction   τ = the (m+1)-th largest |w|, m = round(p·K·N), λ = τ^(1+γ):
//              the m largest |w| are salient (fewer if some equal τ: a
//              weight of magnitude exactly τ shrinks to 0 and stays in r).
//   Universal  τ = σ̂·sqrt(2·ln(K·N)), σ̂ = 1.4826·median|w − median w|: the
//              universal threshold of soft-threshold denoising (Donoho and
//              Johnstone) with a robust scale, so the salient fraction
//              adapts to each layer's tails.
#pragma once

#include <cstdint>
#include <span>
#include <string>

#include "core/packed_weights.h"
#include "core/salient_weights.h"

namespace intrain {

enum class SalientRule { Fraction, Universal };
SalientRule parse_salient_rule(const std::string& s);  // "fraction" or "universal"; throws naming --adpq-rule

struct AdpqOptions {
  int bits = 4;
  int group = 128;
  SalientRule rule = SalientRule::Fraction;
  double salient_fraction = 0.005;  // p for SalientRule::Fraction
  double gamma = 1.0;               // γ of the adaptive weights 1/|w|^γ
};

struct AdpqResult {
  PackedWeights base;      // the remainder r, group-wise RTN
  SalientWeights salient;  // u*, sparse
  double threshold = 0.0;  // τ
  double lambda = 0.0;     // λ = τ^(1+γ)
  // base bits + salient bits, per weight of the K·N matrix.
  double bits_per_weight() const { return base.bits_per_weight() + salient.bits_per_weight(); }
};

// W [K, N] row-major (HF Conv1D layout), as for quantize_rtn.
AdpqResult quantize_adpq(std::span<const float> W, std::int64_t K, std::int64_t N, const AdpqOptions& opt);

}  // namespace intrain
