// SGD: the integer update against the float update on the same parameter and
// gradients, and the learning-rate schedule.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "core/ops.h"
#include "core/quantize.h"
#include "optim/grad_clip.h"
#include "optim/sgd.h"

namespace intrain {
namespace {

std::vector<float> randn(std::size_t n, std::uint32_t seed, float scale) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// Runs `steps` updates on one matrix parameter in float and in integer
// formats (G = grad_bits), with the same gradients; returns the relative L2
// distance of the final weights' change (w_int - w0 vs w_float - w0).
double update_error(int grad_bits, Rounding r, double wd) {
  const Shape shape{64, 96};
  const std::size_t n = 64 * 96;
  const std::vector<float> w0 = randn(n, 1, 0.05f);
  Param pf, pi;
  pf.kind = pi.kind = ParamKind::MatmulWeight;
  pf.master = quantize(w0, shape, Format::fp32());
  pi.master = quantize_at(w0, shape, Format::wide(31), kMasterExponent);
  // The float run starts from exactly the integer master's values.
  pf.master = cast(pi.master, Format::fp32(), {});
  pf.master.reshape(shape);
  const std::vector<float> w0f(pf.master.data<float>(), pf.master.data<float>() + n);
  Sgd opt(SgdConfig{0.9, wd});
  const Format G = Format::fixed(grad_bits, r);
  for (int s = 0; s < 20; ++s) {
    // The gradient as an exact accumulator (as a matmul would give it); the
    // float run gets the same values.
    const Tensor gq = quantize(randn(n, 100 + s, 0.01f), shape, Format::fixed(16, Rounding::Nearest));
    Tensor acc(shape, Format::accumulator(32), gq.exponent());
    for (std::size_t i = 0; i < n; ++i) acc.data<std::int32_t>()[i] = gq.data<std::int16_t>()[i];
    pi.accumulate(acc);
    pf.accumulate(cast(acc, Format::fp32(), {}));
    std::vector<Param> vi(1), vf(1);
    vi[0] = std::move(pi);
    vf[0] = std::move(pf);
    const double lr = 0.05;
    opt.step(vi, G, lr, static_cast<std::uint64_t>(s), 7);
    opt.step(vf, Format::fp32(), lr, static_cast<std::uint64_t>(s), 7);
    pi = std::move(vi[0]);
    pf = std::move(vf[0]);
  }
  const Tensor wi = cast(pi.master, Format::fp32(), {});
  double num = 0.0, den = 0.0;
  for (std::size_t i = 0; i < n; ++i) {
    const double di = wi.data<float>()[i] - w0f[i], df = pf.master.data<float>()[i] - w0f[i];
    num += (di - df) * (di - df);
    den += df * df;
  }
  return std::sqrt(num / den);
}

// The integer update follows the float one, and more closely with wider
// gradients. Tolerances: G = int16 rounds each gradient to 2^-15 of its max,
// momentum to 2^-30, the update onto a 2^-24 grid (SR): 1e-3 is ~10x the
// expected error of the weight change; int8 gradients (2^-7) give ~1e-2.
TEST(SgdInteger, FollowsFloatUpdate) {
  for (Rounding r : {Rounding::Nearest, Rounding::Stochastic}) {
    for (double wd : {0.0, 0.1}) {
      const double e8 = update_error(8, r, wd), e16 = update_error(16, r, wd);
      std::printf("  rounding %-10s wd %.1f: weight-change rel. error  G=int8 %.2e  G=int16 %.2e\n", rounding_name(r),
                  wd, e8, e16);
      EXPECT_LT(e16, e8);
      EXPECT_LT(e16, 1e-3);
      EXPECT_LT(e8, 5e-2);
    }
  }
}

// Clipping by a power of two: the norm is exact on a 3-4-5 triangle split
// over two parameters (one integer, one float), clipping lowers the integer
// gradient's exponent without touching its mantissas and scales the float
// one by the same 2^-k, and a norm at or under the limit changes nothing.
TEST(GradClip, PowerOfTwoFactorSameInBothEngines) {
  auto int_param = [](std::int64_t m, int e) {
    Param p;
    Tensor g(Shape{1}, Format::accumulator(64), e);
    g.data<std::int64_t>()[0] = m;
    p.accumulate(std::move(g));
    return p;
  };
  auto float_param = [](float v) {
    Param p;
    Tensor g(Shape{1}, Format::fp32());
    g.data<float>()[0] = v;
    p.accumulate(std::move(g));
    return p;
  };
  // 3 * 2^-2 = 0.75 and 1.0: norm 1.25.
  Param a = int_param(3, -2), b = float_param(1.0f), unused;
  std::vector<Param*> ps{&a, &b, &unused};
  EXPECT_DOUBLE_EQ(grad_norm(ps), 1.25);

  // At or above the norm: nothing moves.
  GradClip c = clip_grad_norm(ps, 1.25);
  EXPECT_EQ(c.shift, 0);
  EXPECT_EQ(a.grad.exponent(), -2);
  EXPECT_EQ(b.grad.data<float>()[0], 1.0f);

  // 1.25 / 0.3 = 4.17: k = 3, norm 1.25 / 8 = 0.15625 in (0.15, 0.3].
  c = clip_grad_norm(ps, 0.3);
  EXPECT_DOUBLE_EQ(c.norm, 1.25);
  EXPECT_EQ(c.shift, 3);
  EXPECT_EQ(a.grad.data<std::int64_t>()[0], 3);
  EXPECT_EQ(a.grad.exponent(), -5);
  EXPECT_EQ(b.grad.data<float>()[0], 0.125f);
  EXPECT_DOUBLE_EQ(grad_norm(ps), 0.15625);

  // A limit exactly one octave below the norm is reached with k = 1, not 2.
  c = clip_grad_norm(ps, 0.078125);
  EXPECT_EQ(c.shift, 1);
  EXPECT_DOUBLE_EQ(grad_norm(ps), 0.078125);

  // 0 only measures; a non-finite limit is refused.
  EXPECT_EQ(clip_grad_norm(ps, 0.0).shift, 0);
  EXPECT_THROW(clip_grad_norm(ps, std::nan("")), std::invalid_argument);
}

TEST(LrScheduleTest, WarmupThenCosine) {
  const LrSchedule s{0.1, 10, 110, 0.1};
  EXPECT_NEAR(s.at(0), 0.01, 1e-12);
  EXPECT_NEAR(s.at(9), 0.1, 1e-12);
  EXPECT_NEAR(s.at(10), 0.1, 1e-12);
  EXPECT_NEAR(s.at(60), 0.055, 1e-12);  // halfway: (0.1 + 0.01) / 2
  EXPECT_NEAR(s.at(110), 0.01, 1e-12);
  for (long t = 11; t < 110; ++t) EXPECT_LE(s.at(t), s.at(t - 1));
}

}  // namespace
}  // namespace intrain
