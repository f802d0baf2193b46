// The table of operations. Every layer is written once against these
// functions; each dispatches on its operands' formats to a float kernel
// (core/kernels_float.cpp) or an integer kernel (core/kernels_int.cpp). An op
// is added here, in ops.cpp's dispatch, and in the two kernel files, plus its
// test. Shapes are row-major; "rows" means the flattened leading dimensions.
//
// Integer conventions (see docs/engine.md for the derivations):
//   * matmul operands are in the run's W/A/E formats (int8..int16);
//   * values that never enter a matmul (the residual stream and its gradient,
//     LayerNorm and bias parameters) are Format::wide(24): int32 storage,
//     |mantissa| < 2^23, so products fit in 48 bits and row sums in int64;
//   * accumulators (int32/int64) come from matmuls and reductions;
//   * every narrowing is a requantization with the target format's rounding,
//     keyed by an RngKey, so results are bit-identical across thread counts.
#pragma once

#include <cstdint>

#include "core/rng.h"
#include "core/tensor.h"

namespace intrain {

// The format of the residual stream and other non-matmul integer values.
inline Format residual_format() { return Format::wide(24); }

// x in any format -> format f. Float -> float copies; float -> integer
// quantizes by the maximum; integer -> integer requantizes by the maximum.
Tensor cast(const Tensor& x, const Format& f, RngKey key);

// y[r, n] = acc[r, n] + bias[n], then cast to `out`. acc is a matmul result;
// bias (may be null) is a parameter value (wide or float).
Tensor bias_add(const Tensor& acc, const Tensor* bias, const Format& out, RngKey key);

// Sum over rows: out[n] = sum_r dy[r, n] (bias gradients). Integer: int64.
Tensor sum_rows(const Tensor& dy);

// h += x, elementwise, same shape. Integer: exact in int64 at the finer
// exponent, then requantized to residual_format(); h may change exponent.
void residual_add(Tensor& h, const Tensor& x, RngKey key);

// h[b*T + t, :] = wte[tok[b*T + t], :] + wpe[t, :], in residual_format()
// (integer) or float.
Tensor embedding_forward(const std::int32_t* tokens, std::int64_t B, std::int64_t T, const Tensor& wte,
                         const Tensor& wpe);
// dwte[tok, :] += dh[b*T + t, :]; dwpe[t, :] += dh[b*T + t, :]. Outputs are
// accumulators (acc64 with dh's exponent, or float), zero-initialised here.
void embedding_backward(const std::int32_t* tokens, std::int64_t B, std::int64_t T, const Tensor& dh, Tensor& dwte,
                        Tensor& dwpe, std::int64_t vocab, std::int64_t n_ctx);

// a + b for two accumulators of the same shape (gradients of a shared
// parameter): exact in int64 at a common exponent (integer), or float.
Tensor add_accumulators(const Tensor& a, const Tensor& b);
// s * acc for an accumulator (or float). Integer: s is rounded once to
// m * 2^-k with 16 significant bits (exact for a power of two; relative error
// <= 2^-16 otherwise) and the mantissas are multiplied by m exactly in int64;
// a product that could reach 2^62 throws instead of wrapping.
Tensor scale_accumulator(const Tensor& acc, double s);

// What LayerNorm's backward needs: the normalised input and 1/sigma per row.
struct LayerNormCache {
  Tensor xhat;                      // [rows, C]: float, or int32 in Q16 (exponent -16)
  std::vector<float> rstd;          // float mode: 1/sigma per row
  std::vector<std::int64_t> rinv;   // integer mode: floor(2^48 / sigma'), sigma' = sigma * 2^m
  std::vector<std::int32_t> rshift; // integer mode: m per row
  int x_exponent = 0;               // integer mode: exponent of the input (sigma is in its units)
};

// y = (x - mean) / sqrt(var + eps) * gamma + beta over the last dim, cast to `out`.
Tensor layernorm_forward(const Tensor& x, const Tensor& gamma, const Tensor& beta, const Format& out, RngKey key,
                         LayerNormCache& cache);
// dx = (1/sigma) (g - mean(g) - xhat * mean(g * xhat)), g = dy * gamma, in
// residual_format() or float; dgamma = sum_r dy * xhat, dbeta = sum_r dy.
Tensor layernorm_backward(const Tensor& dy, const Tensor& gamma, const LayerNormCache& cache, Tensor& dgamma,
                          Tensor& dbeta, RngKey key);

// GELU, tanh form: 0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3))).
// z is the pre-activation (saved by the caller for the backward pass).
Tensor gelu_forward(const Tensor& z, const Format& out, RngKey key);
// dz = dy * gelu'(z), cast to `out`.
Tensor gelu_backward(const Tensor& dy, const Tensor& z, const Format& out, RngKey key);

// Causal softmax of scale * scores over the last dim of [BH, T, T]; entries
// above the diagonal are 0. Cast to `out`.
Tensor causal_softmax_forward(const Tensor& scores, double scale, const Format& out, RngKey key);
// dS = scale * P * (dP - sum_j P dP), cast to `out`.
Tensor causal_softmax_backward(const Tensor& dP, const Tensor& P, double scale, const Format& out, RngKey key);

// Mean cross-entropy over rows of logits [R, V] against targets; the loss is
// computed in double for reporting only. grad = (softmax - onehot) / R, cast
// to `grad_format`.
struct CrossEntropy {
  double loss = 0.0;  // mean nats per row
  Tensor grad;
};
CrossEntropy cross_entropy(const Tensor& logits, const std::int32_t* targets, const Format& grad_format, RngKey key);
// Loss only (evaluation): no gradient.
double cross_entropy_loss(const Tensor& logits, const std::int32_t* targets);
// Cross-entropy against soft targets (distillation): the gradient of
//   weight * mean_r H(target_r, softmax(logits_r)),  i.e.  weight * (softmax - target) / R,
// cast to `grad_format`. `target` [R, V] holds probability rows: fp32 for float
// logits; int32 mantissas at exponent -30 (Q30, rows summing to 2^30) for
// integer logits, the integer softmax's own grid, so the difference is exact.
Tensor soft_cross_entropy_grad(const Tensor& logits, const Tensor& target, double weight, const Format& grad_format,
                               RngKey key);

// qkv [B*T, 3C] -> q, k, v, each [B*H, T, C/H], cast to `f`.
void split_heads(const Tensor& qkv, std::int64_t B, std::int64_t T, std::int64_t H, const Format& f, RngKey key,
                 Tensor& q, Tensor& k, Tensor& v);
// The inverse layout: dq, dk, dv [B*H, T, C/H] -> [B*T, 3C], cast to `f`.
Tensor merge_qkv(const Tensor& dq, const Tensor& dk, const Tensor& dv, std::int64_t B, std::int64_t T,
                 std::int64_t H, const Format& f, RngKey key);
// y [B*H, T, D] -> [B*T, H*D], cast to `f`; and back.
Tensor merge_heads(const Tensor& y, std::int64_t B, std::int64_t T, std::int64_t H, const Format& f, RngKey key);
Tensor split_heads_one(const Tensor& x, std::int64_t B, std::int64_t T, std::int64_t H, const Format& f, RngKey key);

}  // namespace intrain
