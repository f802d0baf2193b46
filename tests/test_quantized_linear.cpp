// QuantizedLinear: forward and backward against the dequantized reference,
// and inside a GPT (the layer-swap hook).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "core/gptq.h"
#include "core/ops.h"
#include "core/quantize.h"
#include "layers/gpt.h"
#include "layers/quantized_linear.h"
#include "test_support.h"

namespace intrain {
namespace {

using testing::normal_floats;

Param bias_param(std::int64_t N, bool integer) {
  Param b;
  b.name = "bias";
  b.kind = ParamKind::Bias;
  const std::vector<float> v = normal_floats(N, 99, 0.1f);
  b.value = integer ? quantize(v, {N}, residual_format()) : quantize(v, {N}, Format::fp32());
  return b;
}

TEST(QuantizedLinear, IntegerForwardEqualsDequantizedProductPlusBias) {
  // x·Ŵ is exact (int64); bias_add then requantizes x·Ŵ + b to int8 with
  // round-to-nearest, so the result is the nearest int8 grid point of the
  // exact value: |y − (x·Ŵ + b)| <= half a step, plus at most one step of
  // the residual bias' own 24-bit rounding (2^-23 relative, negligible).
  const std::int64_t R = 24, K = 128, N = 64;
  for (int bits : {2, 4}) {
    const std::vector<float> W = normal_floats(K * N, static_cast<std::uint64_t>(bits), 0.05f);
    const PackedWeights pw = quantize_rtn(W, K, N, bits, 64);
    const Param b = bias_param(N, true);
    QuantizedLinear layer("test", pw, &b);
    const Tensor x = quantize(normal_floats(R * K, 5, 1.0f), {R, K}, Format::fixed(8));
    const Tensor y = layer.forward(x, Format::fixed(8, Rounding::Nearest), RngKey(1, 2));
    const std::vector<float> Wd = pw.dequantize();
    const double step = std::ldexp(1.0, y.exponent());
    for (std::int64_t r = 0; r < R; ++r)
      for (std::int64_t n = 0; n < N; ++n) {
        double s = b.value.value(n);
        for (std::int64_t k = 0; k < K; ++k) s += x.value(r * K + k) * Wd[static_cast<std::size_t>(k * N + n)];
        ASSERT_LE(std::abs(y.value(r * N + n) - s), 0.5 * step + 1e-6 * std::abs(s)) << r << ", " << n;
      }
  }
}

TEST(QuantizedLinear, BackwardGivesOnlyTheInputGradient) {
  const std::int64_t R = 16, K = 64, N = 32;
  const PackedWeights pw = quantize_rtn(normal_floats(K * N, 1, 0.05f), K, N, 3, 32);
  Param b = bias_param(N, false);
  QuantizedLinear layer("test", pw, &b);
  const Tensor x = quantize(normal_floats(R * K, 2, 1.0f), {R, K}, Format::fp32());
  const Tensor dy = quantize(normal_floats(R * N, 3, 1.0f), {R, N}, Format::fp32());
  (void)layer.forward(x, Format::fp32(), {});
  const Tensor dx = layer.backward(dy, RngKey{});
  EXPECT_FALSE(b.has_grad);  // frozen: the bias gets no gradient either
  // fp32: dx = dy·Ŵᵀ in float sums, within 4·N·2^-24 of Σ|dy·ŵ| (summation bound, with slack for reassociation).
  const std::vector<float> Wd = pw.dequantize();
  for (std::int64_t r = 0; r < R; ++r)
    for (std::int64_t k = 0; k < K; ++k) {
      double s = 0, a = 0;
      for (std::int64_t n = 0; n < N; ++n) {
        s += dy.value(r * N + n) * Wd[static_cast<std::size_t>(k * N + n)];
        a += std::abs(dy.value(r * N + n) * Wd[static_cast<std::size_t>(k * N + n)]);
      }
      ASSERT_NEAR(dx.value(r * K + k), s, 4.0 * N * std::ldexp(a, -24));
    }
  EXPECT_THROW((void)layer.backward(dy, RngKey{}), std::logic_error);  // one backward per forward
}

// A GPT whose c_fc weight is replaced by its RTN quantization, against the
// same GPT with Ŵ written into the float parameter: the same function.
TEST(QuantizedLinear, InsideGptMatchesTheDequantizedWeight) {
  GPTConfig cfg{2, 2, 32, 16, 256};
  std::vector<std::int32_t> x(2 * 16), y(2 * 16);
  for (std::size_t i = 0; i < x.size(); ++i) {
    x[i] = static_cast<std::int32_t>((i * 37) % 256);
    y[i] = static_cast<std::int32_t>((i * 11 + 3) % 256);
  }
  // w8a16e8g8: the 16-bit activations enter packed_matmul split in int8 pieces.
  for (const char* fmt : {"fp32", "int8", "w8a16e8g8"}) {
    GPT quantized(cfg, Precision::parse(fmt, Rounding::Nearest), 7, 0.08f);
    GPT reference(cfg, Precision::parse("fp32"), 7, 0.08f);
    const std::string module = "h.1.mlp.c_fc";
    Param& w = reference.param(module + ".weight");
    const PackedWeights pw = quantize_rtn(std::vector<float>(w.value.data<float>(), w.value.data<float>() + w.value.numel()),
                                          w.value.rows(), w.value.cols(), 4, 32);
    const std::vector<float> Wd = pw.dequantize();
    w.master = quantize(Wd, w.master.shape(), Format::fp32());
    reference.refresh_values(0, 7);
    const std::unique_ptr<LinearLayer> old =
        quantized.replace_linear(module, std::make_unique<QuantizedLinear>(module, pw, &quantized.param(module + ".bias")));
    EXPECT_NE(old, nullptr);
    const double lq = quantized.forward(x.data(), y.data(), 2, 16, 0, 7, true);
    const double lr = reference.forward(x.data(), y.data(), 2, 16, 0, 7, true);
    std::printf("  %s: loss with QuantizedLinear %.6f, with the dequantized float weight %.6f\n", fmt, lq, lr);
    // fp32: only the order of float sums differs (1e-5 relative). int8: the
    // run's own int8 rounding of every weight and activation, which moved
    // this loss by 3.3e-4 relative when written; 2e-3 allowed, for
    // w8a16e8g8 as well (its 8-bit weights are rounded the same way).
    EXPECT_NEAR(lq, lr, (std::string(fmt) == "fp32" ? 1e-5 : 2e-3) * lr) << fmt;
    quantized.backward();
    EXPECT_FALSE(quantized.param(module + ".weight").has_grad) << fmt;
    EXPECT_FALSE(quantized.param(module + ".bias").has_grad) << fmt;
    EXPECT_TRUE(quantized.param("h.1.mlp.c_proj.weight").has_grad) << fmt;
    EXPECT_TRUE(quantized.param("h.0.attn.c_attn.weight").has_grad) << fmt;  // the gradient flows through
  }
  GPT g(cfg, Precision::parse("fp32"), 1);
  EXPECT_THROW((void)g.replace_linear("h.9.mlp.c_fc", nullptr), std::out_of_range);
}

}  // namespace
}  // namespace intrain
