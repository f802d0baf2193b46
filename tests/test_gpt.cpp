// End-to-end checks of the GPT model: a tiny model learns in every format,
// and integer runs are bit-identical across thread counts.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "layers/gpt.h"
#include "core/ops.h"
#include "test_support.h"
#include "optim/sgd.h"

namespace intrain {
namespace {

// A periodic byte sequence: a model that learns it drives the loss far below
// the uniform ln(256) = 5.55 nats.
struct Batch {
  std::vector<std::int32_t> x, y;
};
Batch periodic_batch(std::int64_t B, std::int64_t T, std::uint64_t step) {
  const std::string text = "the quick brown fox jumps over the lazy dog. ";
  Batch b;
  for (std::int64_t i = 0; i < B; ++i) {
    const std::int64_t off = static_cast<std::int64_t>((step * 7 + static_cast<std::uint64_t>(i) * 13) % text.size());
    for (std::int64_t t = 0; t < T; ++t) {
      b.x.push_back(static_cast<unsigned char>(text[static_cast<std::size_t>(off + t) % text.size()]));
      b.y.push_back(static_cast<unsigned char>(text[static_cast<std::size_t>(off + t + 1) % text.size()]));
    }
  }
  return b;
}

std::vector<double> train_tiny(const std::string& fmt, int steps, std::uint64_t seed = 1) {
  GPTConfig cfg{2, 2, 32, 16, 256};
  GPT model(cfg, Precision::parse(fmt), seed);
  Sgd opt(SgdConfig{0.9, 0.0});
  LrSchedule sched{0.3, 10, steps, 0.1};
  std::vector<double> losses;
  for (int s = 0; s < steps; ++s) {
    const Batch b = periodic_batch(4, 16, static_cast<std::uint64_t>(s));
    losses.push_back(model.forward(b.x.data(), b.y.data(), 4, 16, static_cast<std::uint64_t>(s), seed, true));
    model.backward();
    opt.step(model.params(), model.precision().g, sched.at(s), static_cast<std::uint64_t>(s), seed);
    model.refresh_values(static_cast<std::uint64_t>(s + 1), seed);
  }
  for (int s = 0; s < steps; s += 25) std::printf("  %s step %d loss %.4f\n", fmt.c_str(), s, losses[static_cast<std::size_t>(s)]);
  std::printf("  %s final loss %.4f\n", fmt.c_str(), losses.back());
  return losses;
}

TEST(GptTraining, TinyModelLossFallsFp32) {
  const auto l = train_tiny("fp32", 150);
  EXPECT_NEAR(l.front(), 5.545, 0.05);  // ln 256 at initialisation (small logits)
  EXPECT_LT(l.back(), 2.5) << "fp32 loss did not fall";
}

TEST(GptTraining, TinyModelLossFallsInt8) {
  const auto l = train_tiny("int8", 150);
  EXPECT_NEAR(l.front(), 5.545, 0.05);
  EXPECT_LT(l.back(), 2.5) << "int8 loss did not fall";
}

TEST(GptTraining, TinyModelLossFallsInt16) {
  const auto l = train_tiny("int16", 150);
  EXPECT_LT(l.back(), 2.5) << "int16 loss did not fall";
}

// The whole fp32 model against central differences of its loss, parameter by
// parameter (a few elements of every kind: embeddings, attention, MLP,
// LayerNorm, biases). Step 1e-3 on a loss of ~5.5 in float: rounding error
// ~ 6e-8 * 5.5 / 1e-3 ~ 3e-4 absolute, so elements whose gradient is below
// 3e-3 are compared with an absolute tolerance, the rest relatively (5%).
TEST(GptGradient, Fp32MatchesFiniteDifferences) {
  GPTConfig cfg{2, 2, 16, 8, 256};
  GPT model(cfg, Precision::parse("fp32"), 3);
  const Batch b = periodic_batch(2, 8, 0);
  auto loss = [&] { return model.forward(b.x.data(), b.y.data(), 2, 8, 0, 3, false); };
  model.forward(b.x.data(), b.y.data(), 2, 8, 0, 3, true);
  model.backward();
  int checked = 0;
  for (Param& p : model.params()) {
    ASSERT_TRUE(p.has_grad) << p.name;
    const std::int64_t n = p.master.numel();
    for (std::int64_t i : {std::int64_t{0}, n / 3, n - 1}) {
      if (p.name == "wte.weight") i = b.x[0] * cfg.n_embd + i % cfg.n_embd;  // a row that is used
      float* w = p.master.data<float>();
      const float orig = w[i];
      const float h = 1e-3f;
      w[i] = orig + h;
      model.refresh_values(0, 3);
      const double lp = loss();
      w[i] = orig - h;
      model.refresh_values(0, 3);
      const double lm = loss();
      w[i] = orig;
      model.refresh_values(0, 3);
      const double fd = (lp - lm) / (2.0 * h), an = p.grad.data<float>()[i];
      if (std::abs(an) < 3e-3) {
        EXPECT_NEAR(fd, an, 1e-3) << p.name << "[" << i << "]";
      } else {
        EXPECT_NEAR(fd / an, 1.0, 0.05) << p.name << "[" << i << "] fd " << fd << " analytic " << an;
      }
      ++checked;
    }
  }
  EXPECT_GT(checked, 60);
}

// Every parameter's gradient of an integer model against the fp32 model with
// the same weights (the integer model's values, so both compute with
// identical parameters) on the same batch. The error must shrink from int8
// to int16, and int16 must agree closely: a wrong exponent anywhere would show
// as a factor of 2.
double grad_rel_err(const Tensor& a, const Tensor& b) { return testing::relative_l2_error(a, b); }

TEST(GptGradient, IntegerMatchesFloatAndImprovesWithBits) {
  GPTConfig cfg{2, 2, 32, 16, 256};
  const Batch b = periodic_batch(4, 16, 3);
  std::map<std::string, double> worst;
  for (const char* fmt : {"int8", "int12", "int16"}) {
    GPT qi(cfg, Precision::parse(fmt), 5);
    GPT qf(cfg, Precision::parse("fp32"), 5);
    // The float model takes the integer model's (dequantized) values.
    for (std::size_t i = 0; i < qf.params().size(); ++i) {
      const Tensor v = cast(qi.params()[i].value, Format::fp32(), {});
      qf.params()[i].master = v;
      qf.params()[i].master.reshape(qi.params()[i].master.shape());
    }
    qf.refresh_values(0, 5);
    const double li = qi.forward(b.x.data(), b.y.data(), 4, 16, 0, 5, true);
    const double lf = qf.forward(b.x.data(), b.y.data(), 4, 16, 0, 5, true);
    qi.backward();
    qf.backward();
    double mx = 0.0;
    std::string arg;
    for (std::size_t i = 0; i < qf.params().size(); ++i) {
      const double e = grad_rel_err(qi.params()[i].grad, qf.params()[i].grad);
      if (e > mx) {
        mx = e;
        arg = qf.params()[i].name;
      }
    }
    std::printf("  %-6s loss %.6f vs fp32 %.6f; worst gradient rel. error %.2e (%s)\n", fmt, li, lf, mx, arg.c_str());
    worst[fmt] = mx;
    EXPECT_NEAR(li, lf, 0.02 * lf);
  }
  EXPECT_LT(worst["int12"], worst["int8"]);
  EXPECT_LT(worst["int16"], worst["int12"]);
  // int16: each role's rounding is 2^-15 relative; through ~20 ops of a
  // 2-layer model the worst parameter gradient stays well under 1%.
  EXPECT_LT(worst["int16"], 1e-2);
}

// Outlier tiling of every role (core/outliers.h): the model still learns, and
// outliers() counts the splits of attention as well as of the linears. Per
// block, attention splits q, k, v and P forward and dY ([BH, T, D]) and dS
// ([BH, T, T]) backward: 4·B·T·C + 2·B·H·T² elements, exactly.
TEST(GptTraining, TinyModelLearnsWithOutlierTilingAndCountsAttentionSplits) {
  const auto l = train_tiny("int8+tile-ae@rms:5", 150);
  EXPECT_LT(l.back(), 2.5) << "tiled int8 loss did not fall";

  GPTConfig cfg{2, 2, 32, 16, 256};
  GPT model(cfg, Precision::parse("int8+tile-ae@rms:5"), 1);
  const std::int64_t B = 4, T = 16;
  const Batch b = periodic_batch(B, T, 0);
  model.forward(b.x.data(), b.y.data(), B, T, 0, 1, true);
  model.backward();
  std::int64_t elements = 0, linear_elements = 0, linear_outliers = 0;
  const std::int64_t outliers = model.outliers(&elements);
  model.for_each_linear([&](const std::string&, std::unique_ptr<LinearLayer>& layer) {
    linear_elements += layer->split_elements();
    linear_outliers += layer->outliers();
  });
  const std::int64_t C = cfg.n_embd, H = cfg.n_head, L = cfg.n_layer;
  EXPECT_GT(linear_elements, 0);
  EXPECT_EQ(elements - linear_elements, L * (4 * B * T * C + 2 * B * H * T * T));
  EXPECT_GE(outliers, linear_outliers);
  EXPECT_LE(outliers, elements);
}

}  // namespace
}  // namespace intrain
