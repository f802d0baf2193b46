// Every op in core/ops.h, two ways:
//  1. float backward against central finite differences of the float forward;
//  2. the integer kernels against the float kernels on the same inputs, with
//     the relative error shrinking as the bit width grows (8 -> 12 -> 16).
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <random>
#include <vector>

#include "core/matmul.h"
#include "core/ops.h"
#include "test_support.h"
#include "core/quantize.h"

namespace intrain {
namespace {

Tensor rand_float(Shape shape, std::uint64_t seed, float scale = 1.0f, float offset = 0.0f) {
  Tensor t(std::move(shape), Format::fp32());
  std::mt19937 rng(static_cast<std::uint32_t>(seed));
  std::normal_distribution<float> n(0.0f, 1.0f);
  for (std::int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = offset + scale * n(rng);
  return t;
}

// ||a - b|| / ||b||
double rel_err(const Tensor& a, const Tensor& b) { return testing::relative_l2_error(a, b); }

// A float tensor as an integer one: matmul-operand formats quantize to
// `bits`; wide (residual) values to residual_format().
Tensor as_int(const Tensor& x, int bits) { return cast(x, Format::fixed(bits, Rounding::Nearest), RngKey{}); }
Tensor as_wide(const Tensor& x) { return cast(x, residual_format(), RngKey{}); }

// Integer error at 8, 12, 16 bits must shrink and end below `tol16`.
void expect_shrinking(const std::function<double(int)>& err_at, double tol16, const char* what) {
  const double e8 = err_at(8), e12 = err_at(12), e16 = err_at(16);
  SCOPED_TRACE(what);
  std::printf("  %-28s rel. error  int8 %.2e  int12 %.2e  int16 %.2e\n", what, e8, e12, e16);
  EXPECT_LT(e12, e8);
  EXPECT_LT(e16, e12 * 1.01 + 1e-7);
  EXPECT_LT(e16, tol16);
}

// Central differences of L(x) = sum(w * f(x)) for float ops, against the
// analytic gradient. Step 1e-2 in float: truncation error O(h^2 f''') and
// rounding error O(eps_f32 * |L| / h) are both ~1e-4 relative here; the
// tolerance 2e-2 leaves room for the worst element of the few tested.
void expect_fd(Tensor x, const std::function<Tensor(const Tensor&)>& f, const Tensor& grad, const Tensor& w,
               const char* what) {
  auto L = [&](const Tensor& xx) {
    const Tensor y = f(xx);
    double s = 0.0;
    for (std::int64_t i = 0; i < y.numel(); ++i) s += static_cast<double>(w.data<float>()[i]) * y.data<float>()[i];
    return s;
  };
  const float h = 1e-2f;
  double num = 0.0, den = 0.0;
  for (std::int64_t i = 0; i < x.numel(); i += std::max<std::int64_t>(1, x.numel() / 24)) {
    const float orig = x.data<float>()[i];
    x.data<float>()[i] = orig + h;
    const double lp = L(x);
    x.data<float>()[i] = orig - h;
    const double lm = L(x);
    x.data<float>()[i] = orig;
    const double fd = (lp - lm) / (2.0 * h), an = grad.data<float>()[i];
    num += (fd - an) * (fd - an);
    den += an * an;
  }
  EXPECT_LT(std::sqrt(num / den), 2e-2) << what;
}

// ---------------------------------------------------------------------------

TEST(OpsFiniteDiff, LayerNorm) {
  const Tensor x = rand_float({6, 16}, 1, 1.0f, 0.3f), g = rand_float({16}, 2, 0.2f, 1.0f), b = rand_float({16}, 3, 0.1f);
  const Tensor w = rand_float({6, 16}, 4);
  LayerNormCache c;
  layernorm_forward(x, g, b, Format::fp32(), {}, c);
  Tensor dg, db;
  const Tensor dx = layernorm_backward(w, g, c, dg, db, {});
  auto fx = [&](const Tensor& xx) { LayerNormCache cc; return layernorm_forward(xx, g, b, Format::fp32(), {}, cc); };
  expect_fd(x, fx, dx, w, "dx");
  auto fg = [&](const Tensor& gg) { LayerNormCache cc; return layernorm_forward(x, gg, b, Format::fp32(), {}, cc); };
  expect_fd(g, fg, dg, w, "dgamma");
  auto fb = [&](const Tensor& bb) { LayerNormCache cc; return layernorm_forward(x, g, bb, Format::fp32(), {}, cc); };
  expect_fd(b, fb, db, w, "dbeta");
}

TEST(OpsFiniteDiff, Gelu) {
  const Tensor z = rand_float({4, 32}, 5, 2.0f), w = rand_float({4, 32}, 6);
  const Tensor dz = gelu_backward(w, z, Format::fp32(), {});
  expect_fd(z, [&](const Tensor& zz) { return gelu_forward(zz, Format::fp32(), {}); }, dz, w, "gelu");
}

TEST(OpsFiniteDiff, CausalSoftmax) {
  const Tensor s = rand_float({2, 8, 8}, 7, 2.0f), w = rand_float({2, 8, 8}, 8);
  const double scale = 0.35;
  const Tensor P = causal_softmax_forward(s, scale, Format::fp32(), {});
  const Tensor dS = causal_softmax_backward(w, P, scale, Format::fp32(), {});
  expect_fd(s, [&](const Tensor& ss) { return causal_softmax_forward(ss, scale, Format::fp32(), {}); }, dS, w,
            "softmax");
}

TEST(OpsFiniteDiff, CrossEntropy) {
  Tensor logits = rand_float({5, 256}, 9, 1.5f);
  std::vector<std::int32_t> t = {3, 200, 17, 255, 0};
  const CrossEntropy ce = cross_entropy(logits, t.data(), Format::fp32(), {});
  const float h = 1e-2f;
  for (std::int64_t i : {0L, 3L, 256L + 200L, 2L * 256L + 17L, 4L * 256L + 9L}) {
    const float o = logits.data<float>()[i];
    logits.data<float>()[i] = o + h;
    const double lp = cross_entropy_loss(logits, t.data());
    logits.data<float>()[i] = o - h;
    const double lm = cross_entropy_loss(logits, t.data());
    logits.data<float>()[i] = o;
    EXPECT_NEAR((lp - lm) / (2 * h), ce.grad.data<float>()[i], 2e-4) << "logit " << i;  // O(h^2) ~ 1e-5
  }
}

TEST(OpsFiniteDiff, BiasAndResidual) {
  const Tensor acc = rand_float({3, 5}, 10), b = rand_float({5}, 11);
  const Tensor y = bias_add(acc, &b, Format::fp32(), {});
  for (std::int64_t i = 0; i < 15; ++i) EXPECT_FLOAT_EQ(y.data<float>()[i], acc.data<float>()[i] + b.data<float>()[i % 5]);
  const Tensor db = sum_rows(acc);
  for (std::int64_t n = 0; n < 5; ++n) {
    double s = 0;
    for (std::int64_t r = 0; r < 3; ++r) s += acc.data<float>()[r * 5 + n];
    EXPECT_NEAR(db.data<float>()[n], s, 1e-6);
  }
}

// ---------------------------------------------------------------------------
// Integer against float. Inputs are drawn in float, converted to the integer
// formats, and both kernels run on the same (dequantized) values.
// ---------------------------------------------------------------------------

TEST(OpsIntegerAgreement, LayerNormForward) {
  const Tensor x = rand_float({32, 64}, 21, 3.0f, 0.5f), g = rand_float({64}, 22, 0.2f, 1.0f),
               b = rand_float({64}, 23, 0.1f);
  const Tensor xi = as_wide(x), gi = as_wide(g), bi = as_wide(b);
  LayerNormCache cf;
  const Tensor yf = layernorm_forward(cast(xi, Format::fp32(), {}), cast(gi, Format::fp32(), {}),
                                      cast(bi, Format::fp32(), {}), Format::fp32(), {}, cf);
  expect_shrinking([&](int bits) {
    LayerNormCache ci;
    return rel_err(layernorm_forward(xi, gi, bi, Format::fixed(bits, Rounding::Nearest), {}, ci), yf);
  }, 1e-4, "layernorm forward");
}

// The backward output is always in residual_format() (24 bits), whatever
// the error format, so this is a fixed tolerance rather than a shrinking one:
// dy enters both kernels as the same int16 values; the integer kernel rounds
// g = dy*gamma and dx to 24 bits (relative 2^-23 each) and xhat to Q16
// (relative ~2^-16 / |xhat|, averaging out over a row), so 1e-5 bounds the
// accumulated error with a margin of ~10x; a lost bit of g shows up as 5e-5.
TEST(OpsIntegerAgreement, LayerNormBackward) {
  const Tensor x = rand_float({32, 64}, 24, 3.0f, 0.5f), g = rand_float({64}, 25, 0.2f, 1.0f),
               b = rand_float({64}, 26, 0.1f), dy = rand_float({32, 64}, 27, 0.01f);
  const Tensor xi = as_wide(x), gi = as_wide(g), bi = as_wide(b), dyi = as_int(dy, 16);
  LayerNormCache cf, ci;
  layernorm_forward(cast(xi, Format::fp32(), {}), cast(gi, Format::fp32(), {}), cast(bi, Format::fp32(), {}),
                    Format::fp32(), {}, cf);
  layernorm_forward(xi, gi, bi, Format::fixed(16), {}, ci);
  Tensor dgf, dbf, dgi, dbi;
  const Tensor dxf = layernorm_backward(cast(dyi, Format::fp32(), {}), cast(gi, Format::fp32(), {}), cf, dgf, dbf, {});
  const Tensor dxi = layernorm_backward(dyi, gi, ci, dgi, dbi, {});
  std::printf("  layernorm backward rel. error: dx %.2e  dgamma %.2e  dbeta %.2e\n", rel_err(dxi, dxf),
              rel_err(dgi, dgf), rel_err(dbi, dbf));
  EXPECT_LT(rel_err(dxi, dxf), 1e-5);
  EXPECT_LT(rel_err(dgi, dgf), 1e-5);
  EXPECT_LT(rel_err(dbi, dbf), 1e-6);  // a sum of the same integers: exact up to float rounding
}

TEST(OpsIntegerAgreement, Gelu) {
  const Tensor z = rand_float({16, 128}, 31, 2.0f);
  const Tensor zi = as_wide(z), zf = cast(zi, Format::fp32(), {});
  const Tensor yf = gelu_forward(zf, Format::fp32(), {});
  expect_shrinking([&](int bits) { return rel_err(gelu_forward(zi, Format::fixed(bits, Rounding::Nearest), {}), yf); },
                   1e-3, "gelu forward");
  const Tensor dy = as_wide(rand_float({16, 128}, 32, 0.1f));
  const Tensor dzf = gelu_backward(cast(dy, Format::fp32(), {}), zf, Format::fp32(), {});
  expect_shrinking([&](int bits) {
    return rel_err(gelu_backward(dy, zi, Format::fixed(bits, Rounding::Nearest), {}), dzf);
  }, 1e-3, "gelu backward");
}

TEST(OpsIntegerAgreement, CausalSoftmax) {
  const double scale = 1.0 / std::sqrt(32.0);
  const Tensor s = rand_float({4, 32, 32}, 41, 20.0f);
  // Scores as an integer matmul would produce them: an int32 accumulator.
  const Tensor si = cast(s, Format::fixed(16, Rounding::Nearest), {});
  Tensor sacc(si.shape(), Format::accumulator(32), si.exponent());
  for (std::int64_t i = 0; i < si.numel(); ++i) sacc.data<std::int32_t>()[i] = si.data<std::int16_t>()[i];
  const Tensor Pf = causal_softmax_forward(cast(si, Format::fp32(), {}), scale, Format::fp32(), {});
  expect_shrinking([&](int bits) {
    return rel_err(causal_softmax_forward(sacc, scale, Format::fixed(bits, Rounding::Nearest), {}), Pf);
  }, 1e-3, "softmax forward");
  const Tensor dP = as_wide(rand_float({4, 32, 32}, 42, 0.5f));
  expect_shrinking([&](int bits) {
    const Tensor Pi = causal_softmax_forward(sacc, scale, Format::fixed(bits, Rounding::Nearest), {});
    const Tensor dSf = causal_softmax_backward(cast(dP, Format::fp32(), {}), cast(Pi, Format::fp32(), {}), scale,
                                               Format::fp32(), {});
    return rel_err(causal_softmax_backward(dP, Pi, scale, Format::fixed(bits, Rounding::Nearest), {}), dSf);
  }, 1e-3, "softmax backward");
}

TEST(OpsIntegerAgreement, CrossEntropyGradient) {
  const Tensor l = rand_float({64, 256}, 51, 3.0f);
  const Tensor li = cast(l, Format::fixed(16, Rounding::Nearest), {});
  Tensor lacc(li.shape(), Format::accumulator(32), li.exponent());
  for (std::int64_t i = 0; i < li.numel(); ++i) lacc.data<std::int32_t>()[i] = li.data<std::int16_t>()[i];
  std::vector<std::int32_t> t(64);
  for (int i = 0; i < 64; ++i) t[static_cast<std::size_t>(i)] = (i * 37) % 256;
  const CrossEntropy cf = cross_entropy(cast(li, Format::fp32(), {}), t.data(), Format::fp32(), {});
  EXPECT_NEAR(cross_entropy_loss(lacc, t.data()), cf.loss, 1e-5);
  expect_shrinking([&](int bits) {
    return rel_err(cross_entropy(lacc, t.data(), Format::fixed(bits, Rounding::Nearest), {}).grad, cf.grad);
  }, 1e-3, "cross-entropy gradient");
}

TEST(OpsIntegerAgreement, BiasAddAndSums) {
  const Tensor acc = rand_float({8, 24}, 61, 4.0f), b = rand_float({24}, 62, 0.5f);
  const Tensor ai = as_int(acc, 16), bi = as_wide(b);
  const Tensor yf = bias_add(cast(ai, Format::fp32(), {}), &b, Format::fp32(), {});
  const Tensor bf = cast(bi, Format::fp32(), {});
  const Tensor yf2 = bias_add(cast(ai, Format::fp32(), {}), &bf, Format::fp32(), {});
  expect_shrinking([&](int bits) {
    return rel_err(bias_add(ai, &bi, Format::fixed(bits, Rounding::Nearest), {}), yf2);
  }, 1e-4, "bias add");
  (void)yf;
  // sum_rows is exact for integers.
  const Tensor s = sum_rows(ai);
  const Tensor sf = sum_rows(cast(ai, Format::fp32(), {}));
  EXPECT_LT(rel_err(s, sf), 1e-6);
}

}  // namespace
}  // namespace intrain
