// LoRA adapters (layers/lora.h), the distillation gradient
// (soft_cross_entropy_grad) and scale_accumulator (core/ops.h).
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "core/matmul.h"
#include "core/ops.h"
#include "core/quantize.h"
#include "layers/gpt.h"
#include "layers/lora.h"
#include "layers/quantized_linear.h"
#include "core/gptq.h"
#include "test_support.h"

namespace intrain {
namespace {

using testing::normal_floats;

// ---------------------------------------------------------------------------
// soft_cross_entropy_grad
// ---------------------------------------------------------------------------

// Rows of probabilities from random logits, in double.
std::vector<double> softmax_rows(const std::vector<float>& l, std::int64_t R, std::int64_t V) {
  std::vector<double> p(l.size());
  for (std::int64_t r = 0; r < R; ++r) {
    double mx = -1e300, z = 0.0;
    for (std::int64_t j = 0; j < V; ++j) mx = std::max(mx, static_cast<double>(l[static_cast<std::size_t>(r * V + j)]));
    for (std::int64_t j = 0; j < V; ++j) z += std::exp(l[static_cast<std::size_t>(r * V + j)] - mx);
    for (std::int64_t j = 0; j < V; ++j)
      p[static_cast<std::size_t>(r * V + j)] = std::exp(l[static_cast<std::size_t>(r * V + j)] - mx) / z;
  }
  return p;
}

// Logits as the model makes them: an int32 accumulator (here at exponent -12).
Tensor int32_logits(const std::vector<float>& l, Shape shape) {
  Tensor t(std::move(shape), Format::accumulator(32), -12);
  for (std::size_t i = 0; i < l.size(); ++i) t.data<std::int32_t>()[i] = static_cast<std::int32_t>(std::lround(std::ldexp(l[i], 12)));
  return t;
}

TEST(SoftCrossEntropy, FloatGradientIsWeightTimesSoftmaxMinusTargetOverRows) {
  const std::int64_t R = 6, V = 32;
  const std::vector<float> l = normal_floats(R * V, 1, 2.0f);
  const std::vector<double> t = softmax_rows(normal_floats(R * V, 2, 1.0f), R, V);
  const std::vector<double> p = softmax_rows(l, R, V);
  const Tensor logits = quantize(l, {R, V}, Format::fp32());
  const Tensor target = quantize(std::vector<float>(t.begin(), t.end()), {R, V}, Format::fp32());
  const double w = 3.5;
  const Tensor g = soft_cross_entropy_grad(logits, target, w, Format::fp32(), RngKey(1, 1));
  // fp32 storage of p, t and g: relative 2^-24 each, so 1e-6 absolute on
  // entries below w / R < 1.
  for (std::int64_t i = 0; i < R * V; ++i)
    EXPECT_NEAR(g.value(i), w * (p[static_cast<std::size_t>(i)] - static_cast<float>(t[static_cast<std::size_t>(i)])) / R, 1e-6);
}

// A one-hot soft target is the hard cross-entropy: bit for bit, in both modes
// (the same kernel; this pins the weight-1 multiplier to the old one).
TEST(SoftCrossEntropy, OneHotTargetEqualsHardCrossEntropyBitForBit) {
  const std::int64_t R = 40, V = 256;
  std::vector<std::int32_t> y(static_cast<std::size_t>(R));
  for (std::int64_t r = 0; r < R; ++r) y[static_cast<std::size_t>(r)] = static_cast<std::int32_t>((r * 37) % V);
  const std::vector<float> l = normal_floats(R * V, 3, 3.0f);
  for (bool integer : {false, true}) {
    const Tensor logits = integer ? int32_logits(l, {R, V}) : quantize(l, {R, V}, Format::fp32());
    Tensor target = integer ? Tensor({R, V}, Format::wide(31), -30) : Tensor({R, V}, Format::fp32());
    for (std::int64_t r = 0; r < R; ++r) {
      if (integer) target.data<std::int32_t>()[r * V + y[static_cast<std::size_t>(r)]] = std::int32_t{1} << 30;
      else target.data<float>()[r * V + y[static_cast<std::size_t>(r)]] = 1.0f;
    }
    const Format E = integer ? Format::fixed(8) : Format::fp32();
    const CrossEntropy hard = cross_entropy(logits, y.data(), E, RngKey(7, 9));
    const Tensor soft = soft_cross_entropy_grad(logits, target, 1.0, E, RngKey(7, 9));
    ASSERT_EQ(soft.exponent(), hard.grad.exponent());
    for (std::int64_t i = 0; i < R * V; ++i) ASSERT_EQ(soft.value(i), hard.grad.value(i)) << integer << " " << i;
  }
}

TEST(SoftCrossEntropy, IntegerGradientMatchesFloatWithinTheFormatsRounding) {
  const std::int64_t R = 16, V = 64;
  const std::vector<float> l = normal_floats(R * V, 4, 2.0f);
  const std::vector<double> t = softmax_rows(normal_floats(R * V, 5, 1.0f), R, V);
  const Tensor li = int32_logits(l, {R, V});
  std::vector<float> lq(l.size());
  for (std::int64_t i = 0; i < R * V; ++i) lq[static_cast<std::size_t>(i)] = static_cast<float>(li.value(i));
  const std::vector<double> p = softmax_rows(lq, R, V);
  Tensor target({R, V}, Format::wide(31), -30);
  for (std::int64_t i = 0; i < R * V; ++i)
    target.data<std::int32_t>()[i] = static_cast<std::int32_t>(std::llround(std::ldexp(t[static_cast<std::size_t>(i)], 30)));
  const double w = 2.0;
  const Tensor g = soft_cross_entropy_grad(li, target, w, Format::fixed(16, Rounding::Nearest), RngKey(1, 2));
  // Tolerance: half a step of the 16-bit output grid (max|g| / 2^15), plus the
  // integer softmax's error (< 2^-20 per probability, docs/engine.md) and the
  // Q30 target's 2^-31, both times w / R.
  double mx = 0.0;
  for (std::int64_t i = 0; i < R * V; ++i) mx = std::max(mx, std::abs(w * (p[static_cast<std::size_t>(i)] - t[static_cast<std::size_t>(i)]) / R));
  const double tol = mx / 32768.0 + std::ldexp(w / R, -19);
  for (std::int64_t i = 0; i < R * V; ++i)
    EXPECT_NEAR(g.value(i), w * (p[static_cast<std::size_t>(i)] - t[static_cast<std::size_t>(i)]) / R, tol) << i;
}

TEST(SoftCrossEntropy, RejectsMismatchedTargets) {
  const Tensor logits = quantize(normal_floats(8, 1, 1.0f), {2, 4}, Format::fixed(16));
  const Tensor wrong_grid({2, 4}, Format::wide(31), -20);
  EXPECT_MESSAGE_HAS(testing::thrown_message<std::invalid_argument>(
                         [&] { soft_cross_entropy_grad(logits, wrong_grid, 1.0, Format::fixed(8), RngKey(1, 1)); }),
                     "Q30");
  const Tensor wrong_shape({2, 5}, Format::wide(31), -30);
  EXPECT_MESSAGE_HAS(testing::thrown_message<std::invalid_argument>(
                         [&] { soft_cross_entropy_grad(logits, wrong_shape, 1.0, Format::fixed(8), RngKey(1, 1)); }),
                     "does not match");
}

// ---------------------------------------------------------------------------
// scale_accumulator
// ---------------------------------------------------------------------------

TEST(ScaleAccumulator, PowerOfTwoIsExactAndOtherFactorsWithin2ToMinus16) {
  Tensor acc({3, 5}, Format::accumulator(32), -7);
  for (std::int64_t i = 0; i < acc.numel(); ++i) acc.data<std::int32_t>()[i] = static_cast<std::int32_t>(i * 1234567 - 9000000);
  const Tensor two = scale_accumulator(acc, 4.0);
  for (std::int64_t i = 0; i < acc.numel(); ++i) ASSERT_EQ(two.value(i), 4.0 * acc.value(i));
  const Tensor third = scale_accumulator(acc, 1.0 / 3.0);
  for (std::int64_t i = 0; i < acc.numel(); ++i)
    ASSERT_LE(std::abs(third.value(i) - acc.value(i) / 3.0), std::ldexp(std::abs(acc.value(i) / 3.0), -16));
}

TEST(ScaleAccumulator, DetectsOverflowInsteadOfWrapping) {
  Tensor acc({1, 2}, Format::accumulator(64), 0);
  acc.data<std::int64_t>()[0] = std::int64_t{1} << 60;
  EXPECT_MESSAGE_HAS(testing::thrown_message<std::invalid_argument>([&] { scale_accumulator(acc, 3.0); }), "overflow");
}

// ---------------------------------------------------------------------------
// LoraLinear
// ---------------------------------------------------------------------------

struct Base {
  Param w, b;
  Base(std::int64_t K, std::int64_t N, const Precision& prec) {
    w.name = "w";
    b.name = "b";
    b.kind = ParamKind::Bias;
    const std::vector<float> wv = normal_floats(K * N, 11, 0.2f), bv = normal_floats(N, 12, 0.1f);
    const Format wf = prec.is_float() ? Format::fp32() : prec.w;
    const Format bf = prec.is_float() ? Format::fp32() : residual_format();
    w.value = quantize(wv, {K, N}, wf);
    b.value = quantize(bv, {N}, bf);
    w.frozen = b.frozen = true;
  }
};

// A LoRA of `rank` (and alpha) around a plain Linear holding base's weights.
LoraLinear make_lora(Base& base, std::int64_t K, std::int64_t N, std::int64_t rank, double alpha, const Precision& prec) {
  LoraConfig cfg;
  cfg.rank = static_cast<int>(rank);
  cfg.alpha = alpha;
  return LoraLinear("m", std::make_unique<Linear>(&base.w, &base.b), K, N, cfg, prec, 3);
}

// Sets A and B to given float values (masters and values).
void set_adapter(LoraLinear& l, const std::vector<float>& a, const std::vector<float>& b, const Precision& prec) {
  auto [pa, pb] = l.params();
  for (auto [p, v] : {std::pair{pa, &a}, std::pair{pb, &b}}) {
    p->master = prec.is_float() ? quantize(*v, p->master.shape(), Format::fp32())
                                : quantize_at(*v, p->master.shape(), Format::wide(31), kMasterExponent);
  }
  l.refresh_values(0, 1);
}

TEST(LoraLinear, StartsAsExactlyItsBase) {
  const std::int64_t R = 8, K = 32, N = 16;
  for (const char* f : {"fp32", "int8"}) {
    const Precision prec = Precision::parse(f);
    Base base(K, N, prec);
    Linear plain(&base.w, &base.b);
    LoraLinear lora = make_lora(base, K, N, 4, 32.0, prec);
    const Tensor x = prec.is_float() ? quantize(normal_floats(R * K, 1, 1.0f), {R, K}, Format::fp32())
                                     : quantize(normal_floats(R * K, 1, 1.0f), {R, K}, prec.a);
    const Format out = prec.is_float() ? Format::fp32() : Format::wide(24, Rounding::Nearest);
    const Tensor y0 = plain.forward(x, out, RngKey(5, 5));
    const Tensor y1 = lora.forward(x, out, RngKey(5, 5));
    // B = 0: the correction is exactly zero. The base output passes through
    // the 24-bit format twice (nearest), which is idempotent on its grid.
    for (std::int64_t i = 0; i < y0.numel(); ++i) ASSERT_EQ(y0.value(i), y1.value(i)) << f << " " << i;
  }
}

// The float LoRA reference (lrec --adapter-format fp32) and the integer
// adapters of one seed start from the same numbers, bit for bit: the float
// master holds exactly the values of the integer master's 2^-24 grid.
TEST(LoraLinear, FloatAndIntegerAdaptersStartFromTheSameValues) {
  const std::int64_t K = 48, N = 20, r = 4;
  const Precision pf = Precision::parse("fp32"), pi = Precision::parse("int8");
  Base bf(K, N, pf), bi(K, N, pi);
  LoraLinear lf = make_lora(bf, K, N, r, 16.0, pf), li = make_lora(bi, K, N, r, 16.0, pi);
  for (int which = 0; which < 2; ++which) {
    const Tensor& mf = lf.params()[static_cast<std::size_t>(which)]->master;
    const Tensor& mi = li.params()[static_cast<std::size_t>(which)]->master;
    ASSERT_EQ(mf.numel(), mi.numel());
    ASSERT_TRUE(mf.format().is_float());
    ASSERT_FALSE(mi.format().is_float());
    const std::vector<float> vi = dequantize(mi);
    bool nonzero = false;
    for (std::int64_t i = 0; i < mf.numel(); ++i) {
      ASSERT_EQ(mf.data<float>()[i], vi[static_cast<std::size_t>(i)]) << (which ? "B" : "A") << " " << i;
      nonzero |= vi[static_cast<std::size_t>(i)] != 0.0f;
    }
    EXPECT_EQ(nonzero, which == 0) << "A is random, B starts at zero";
  }
}

// Float mode: forward and backward equal the formulas in double.
TEST(LoraLinear, FloatForwardAndBackwardMatchTheFormulas) {
  const std::int64_t R = 5, K = 12, N = 7, r = 3;
  const Precision prec = Precision::parse("fp32");
  Base base(K, N, prec);
  LoraLinear lora = make_lora(base, K, N, r, 6.0, prec);  // s = alpha / r = 2
  const std::vector<float> A = normal_floats(K * r, 21, 0.3f), B = normal_floats(r * N, 22, 0.3f);
  set_adapter(lora, A, B, prec);
  const std::vector<float> xv = normal_floats(R * K, 23, 1.0f), dyv = normal_floats(R * N, 24, 1.0f);
  const Tensor y = lora.forward(quantize(xv, {R, K}, Format::fp32()), Format::fp32(), RngKey(1, 1));
  const Tensor dx = lora.backward(quantize(dyv, {R, N}, Format::fp32()), RngKey(1, 2));
  const double s = 2.0;
  auto X = [&](std::int64_t i, std::int64_t k) { return static_cast<double>(xv[static_cast<std::size_t>(i * K + k)]); };
  auto W = [&](std::int64_t k, std::int64_t n) { return base.w.value.value(k * N + n); };
  auto Aa = [&](std::int64_t k, std::int64_t j) { return static_cast<double>(A[static_cast<std::size_t>(k * r + j)]); };
  auto Bb = [&](std::int64_t j, std::int64_t n) { return static_cast<double>(B[static_cast<std::size_t>(j * N + n)]); };
  auto DY = [&](std::int64_t i, std::int64_t n) { return static_cast<double>(dyv[static_cast<std::size_t>(i * N + n)]); };
  std::vector<double> u(static_cast<std::size_t>(R * r), 0.0), du(u.size(), 0.0);
  for (std::int64_t i = 0; i < R; ++i)
    for (std::int64_t j = 0; j < r; ++j) {
      for (std::int64_t k = 0; k < K; ++k) u[static_cast<std::size_t>(i * r + j)] += X(i, k) * Aa(k, j);
      for (std::int64_t n = 0; n < N; ++n) du[static_cast<std::size_t>(i * r + j)] += s * DY(i, n) * Bb(j, n);
    }
  // fp32 arithmetic over sums of <= 12 terms of size ~1: 1e-4 absolute.
  for (std::int64_t i = 0; i < R; ++i)
    for (std::int64_t n = 0; n < N; ++n) {
      double e = base.b.value.value(n);
      for (std::int64_t k = 0; k < K; ++k) e += X(i, k) * W(k, n);
      for (std::int64_t j = 0; j < r; ++j) e += s * u[static_cast<std::size_t>(i * r + j)] * Bb(j, n);
      EXPECT_NEAR(y.value(i * N + n), e, 1e-4);
    }
  for (std::int64_t i = 0; i < R; ++i)
    for (std::int64_t k = 0; k < K; ++k) {
      double e = 0.0;
      for (std::int64_t n = 0; n < N; ++n) e += DY(i, n) * W(k, n);
      for (std::int64_t j = 0; j < r; ++j) e += du[static_cast<std::size_t>(i * r + j)] * Aa(k, j);
      EXPECT_NEAR(dx.value(i * K + k), e, 1e-4);
    }
  auto [pa, pb] = lora.params();
  for (std::int64_t j = 0; j < r; ++j)
    for (std::int64_t n = 0; n < N; ++n) {
      double e = 0.0;
      for (std::int64_t i = 0; i < R; ++i) e += s * u[static_cast<std::size_t>(i * r + j)] * DY(i, n);
      EXPECT_NEAR(pb->grad.value(j * N + n), e, 1e-4);
    }
  for (std::int64_t k = 0; k < K; ++k)
    for (std::int64_t j = 0; j < r; ++j) {
      double e = 0.0;
      for (std::int64_t i = 0; i < R; ++i) e += X(i, k) * du[static_cast<std::size_t>(i * r + j)];
      EXPECT_NEAR(pa->grad.value(k * r + j), e, 1e-4);
    }
  EXPECT_FALSE(base.w.has_grad);  // the base is frozen
}

// A finite-difference check of the float layer on L = sum(y * c).
TEST(LoraLinear, FloatGradientsMatchFiniteDifferences) {
  const std::int64_t R = 4, K = 8, N = 6, r = 2;
  const Precision prec = Precision::parse("fp32");
  Base base(K, N, prec);
  LoraLinear lora = make_lora(base, K, N, r, 3.0, prec);
  std::vector<float> A = normal_floats(K * r, 31, 0.5f), B = normal_floats(r * N, 32, 0.5f);
  const std::vector<float> xv = normal_floats(R * K, 33, 1.0f), c = normal_floats(R * N, 34, 1.0f);
  auto loss = [&] {
    set_adapter(lora, A, B, prec);
    const Tensor y = lora.forward(quantize(xv, {R, K}, Format::fp32()), Format::fp32(), RngKey(1, 1));
    double L = 0.0;
    for (std::int64_t i = 0; i < y.numel(); ++i) L += y.value(i) * c[static_cast<std::size_t>(i)];
    return L;
  };
  loss();
  lora.backward(quantize(c, {R, N}, Format::fp32()), RngKey(1, 2));
  auto [pa, pb] = lora.params();
  const Tensor gA = pa->grad, gB = pb->grad;
  // Central differences with h = 1e-2 on a function quadratic in (A, B):
  // exact up to float rounding of L (~1e-6 * |L| / h), so 2e-3 absolute.
  const float h = 1e-2f;
  for (auto [vec, grad] : {std::pair{&A, &gA}, std::pair{&B, &gB}}) {
    for (std::size_t i = 0; i < vec->size(); ++i) {
      const float keep = (*vec)[i];
      (*vec)[i] = keep + h;
      const double lp = loss();
      (*vec)[i] = keep - h;
      const double lm = loss();
      (*vec)[i] = keep;
      EXPECT_NEAR(grad->value(static_cast<std::int64_t>(i)), (lp - lm) / (2 * h), 2e-3) << i;
    }
  }
}

// The integer layer against the float engine on the same values: int8
// operands carry ~2^-7 relative error each, so the outputs and gradients
// agree to a few percent in relative L2.
TEST(LoraLinear, IntegerEngineTracksTheFloatEngine) {
  const std::int64_t R = 64, K = 64, N = 48, r = 8;
  const Precision pf = Precision::parse("fp32"), pi = Precision::parse("int8", Rounding::Nearest);
  const std::vector<float> A = normal_floats(K * r, 41, 0.1f), B = normal_floats(r * N, 42, 0.1f);
  const std::vector<float> xv = normal_floats(R * K, 43, 1.0f), dyv = normal_floats(R * N, 44, 0.01f);
  std::vector<Tensor> results[2];
  for (int mode = 0; mode < 2; ++mode) {
    const Precision& prec = mode ? pi : pf;
    Base base(K, N, prec);
    LoraLinear lora = make_lora(base, K, N, r, 16.0, prec);
    set_adapter(lora, A, B, prec);
    const Format in = mode ? prec.a : Format::fp32(), err = mode ? prec.e : Format::fp32();
    const Tensor y = lora.forward(quantize(xv, {R, K}, in), mode ? residual_format() : Format::fp32(), RngKey(1, 1));
    const Tensor dx = lora.backward(quantize(dyv, {R, N}, err), RngKey(1, 2));
    auto [pa, pb] = lora.params();
    results[mode] = {y, dx, pa->grad, pb->grad};
  }
  const char* names[] = {"y", "dx", "dA", "dB"};
  for (int i = 0; i < 4; ++i)
    EXPECT_LT(testing::relative_l2_error(results[1][static_cast<std::size_t>(i)], results[0][static_cast<std::size_t>(i)]), 0.03)
        << names[i];
}

TEST(LoraLinear, WrapsAFrozenQuantizedLinear) {
  const std::int64_t R = 16, K = 64, N = 32;
  const PackedWeights pw = quantize_rtn(normal_floats(K * N, 51, 0.05f), K, N, 2, 32);
  const Precision prec = Precision::parse("fp32");
  Base bias(K, N, prec);
  LoraConfig cfg;
  cfg.rank = 2;
  LoraLinear lora("m", std::make_unique<QuantizedLinear>("m", pw, &bias.b), K, N, cfg, prec, 3);
  set_adapter(lora, normal_floats(K * 2, 52, 0.1f), normal_floats(2 * N, 53, 0.1f), prec);
  lora.forward(quantize(normal_floats(R * K, 54, 1.0f), {R, K}, Format::fp32()), Format::fp32(), RngKey(1, 1));
  const Tensor dx = lora.backward(quantize(normal_floats(R * N, 55, 1.0f), {R, N}, Format::fp32()), RngKey(1, 2));
  EXPECT_EQ(dx.numel(), R * K);
  auto [pa, pb] = lora.params();
  EXPECT_TRUE(pa->has_grad);
  EXPECT_TRUE(pb->has_grad);
}

TEST(LoraTargets, SuffixMatchingAndErrors) {
  LoraConfig cfg;
  EXPECT_TRUE(cfg.targets_module("h.0.attn.c_attn"));
  cfg.targets = {"attn.c_attn", "h.1.mlp.c_fc"};
  EXPECT_TRUE(cfg.targets_module("h.3.attn.c_attn"));
  EXPECT_TRUE(cfg.targets_module("h.1.mlp.c_fc"));
  EXPECT_FALSE(cfg.targets_module("h.11.mlp.c_fc"));
  EXPECT_FALSE(cfg.targets_module("h.0.attn.c_proj"));
  cfg.rank = 0;
  EXPECT_MESSAGE_HAS(testing::thrown_message<std::invalid_argument>([&] { cfg.validate(); }), "--rank");
  GPTConfig gc;
  gc.n_layer = 2;
  gc.n_embd = 32;
  gc.n_ctx = 16;
  GPT model(gc, Precision::parse("fp32"), 1);
  LoraConfig none;
  none.targets = {"mlp.c_nothing"};
  EXPECT_MESSAGE_HAS(testing::thrown_message<std::invalid_argument>([&] { attach_lora(model, none, 1); }), "--lora-targets");
}

// In a GPT: only the adapters take gradients, and with B = 0 the model's
// logits are those of the model without adapters.
TEST(LoraGpt, AdaptersAloneTrainAndStartAsTheBase) {
  GPTConfig gc;
  gc.n_layer = 2;
  gc.n_embd = 32;
  gc.n_head = 2;
  gc.n_ctx = 16;
  for (const char* f : {"fp32", "int8"}) {
    GPT plain(gc, Precision::parse(f, Rounding::Nearest), 7, 0.08f);
    GPT model(gc, Precision::parse(f, Rounding::Nearest), 7, 0.08f);
    LoraConfig cfg;
    cfg.rank = 2;
    cfg.targets = {"attn.c_attn", "mlp.c_fc"};
    const std::vector<LoraLinear*> layers = attach_lora(model, cfg, 3);
    ASSERT_EQ(layers.size(), 4u);
    std::vector<std::int32_t> x(2 * 16), y(2 * 16);
    for (std::size_t i = 0; i < x.size(); ++i) {
      x[i] = static_cast<std::int32_t>((i * 7) % 256);
      y[i] = static_cast<std::int32_t>((i * 11) % 256);
    }
    const double l0 = plain.forward(x.data(), y.data(), 2, 16, 0, 1, false);
    const double l1 = model.forward(x.data(), y.data(), 2, 16, 0, 1, true);
    if (std::string(f) == "fp32") EXPECT_NEAR(l0, l1, 1e-6);  // float: the same sums
    else EXPECT_NEAR(l0, l1, 1e-2);  // integer: the base passes one more 24-bit rounding before its int8 cast
    model.backward();
    for (const Param& p : model.params()) EXPECT_FALSE(p.has_grad) << p.name;
    for (Param* p : lora_params(layers)) EXPECT_TRUE(p->has_grad) << p->name;
  }
}

}  // namespace
}  // namespace intrain
