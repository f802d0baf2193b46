// binary16 storage (core/fp16.h) and the fp16 teacher layer
// (layers/fp16_linear.h): conversions checked against exact arithmetic on
// every half, and the layer against Linear on the widened weights.
#include <gtest/gtest.h>

#include <bit>
#include <filesystem>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "core/fp16.h"
#include "core/matmul.h"
#include "core/ops.h"
#include "layers/fp16_linear.h"
#include "experiments/checkpoint.h"
#include "layers/gpt.h"
#include "run_support.h"
#include "test_support.h"

namespace intrain {
namespace {

// Every one of the 63488 finite halves widens to the value its fields say
// ((-1)^s · 2^(e-15) · (1 + m/1024), or m·2^-24 for e = 0), computed in double,
// and narrows back to itself.
TEST(Fp16, EveryFiniteHalfWidensExactlyAndRoundTrips) {
  std::vector<HalfBits> all;
  for (std::uint32_t h = 0; h < 65536; ++h) {
    const std::uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ff;
    if (e == 0x1f) continue;
    const double mag = e == 0 ? std::ldexp(static_cast<double>(m), -24) : std::ldexp(1.0 + m / 1024.0, static_cast<int>(e) - 15);
    const double expect = (h & 0x8000) ? -mag : mag;
    ASSERT_EQ(static_cast<double>(from_half(static_cast<HalfBits>(h))), expect) << std::hex << h;
    ASSERT_EQ(to_half(from_half(static_cast<HalfBits>(h))), h) << std::hex << h;
    all.push_back(static_cast<HalfBits>(h));
  }
  EXPECT_EQ(all.size(), 63488u);
  std::vector<float> wide(all.size());
  widen_half(all, wide.data());  // the vectorised path, chunked across threads
  for (std::size_t i = 0; i < all.size(); ++i)
    ASSERT_EQ(std::bit_cast<std::uint32_t>(wide[i]), std::bit_cast<std::uint32_t>(from_half(all[i]))) << i;
  EXPECT_EQ(from_half(0x7c00), std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(from_half(0x7e00)));
}

// Narrowing is round to nearest, ties to even: for floats across the whole
// range (normal and subnormal halves, and ties planted exactly halfway),
// the result is the nearer of the two halves around x, and at a tie the one
// with the even mantissa.
TEST(Fp16, NarrowingRoundsToNearestEven) {
  std::mt19937 gen(5);
  std::vector<float> xs = {0.0f, -0.0f, 1.0f, 0x1p-24f, 0x1p-25f, 0x1.8p-25f, 0x1p-26f, 65504.0f, 65519.99f, 0x1p-14f,
                           0x1.ffcp-15f, 1.0f + 0x1p-11f, 1.0f + 0x3p-11f, 3.0e-5f, -7.25e-6f};
  std::uniform_int_distribution<std::uint32_t> half_bits(0, 0x7bfe);
  for (int i = 0; i < 200000; ++i) {
    const HalfBits lo = static_cast<HalfBits>(half_bits(gen));  // x between two adjacent positive halves
    const double a = from_half(lo), b = from_half(static_cast<HalfBits>(lo + 1));
    const double t = i % 10 == 0 ? 0.5 : std::uniform_real_distribution<double>(0.0, 1.0)(gen);
    const float x = static_cast<float>(a + t * (b - a));
    xs.push_back((i & 1) ? -x : x);
  }
  for (float x : xs) {
    const HalfBits h = to_half(x);
    const double v = from_half(h), ax = std::fabs(static_cast<double>(x));
    ASSERT_EQ(std::signbit(v), std::signbit(x)) << x;
    // The neighbours of |h| (its magnitude one step down and up).
    const HalfBits mag = h & 0x7fff;
    const double down = mag > 0 ? from_half(static_cast<HalfBits>(mag - 1)) : -1.0, up = from_half(static_cast<HalfBits>(mag + 1));
    const double err = std::fabs(std::fabs(v) - ax);
    ASSERT_LE(err, std::fabs(up - ax)) << x;
    if (mag > 0) {
      ASSERT_LE(err, std::fabs(down - ax)) << x;
    }
    const bool tie = err == std::fabs(up - ax) || (mag > 0 && err == std::fabs(down - ax));
    if (tie) {
      ASSERT_EQ(mag & 1, 0) << "tie not to even at " << x;
    }
  }
  EXPECT_EQ(to_half(65519.99f), 0x7bff);  // below the midpoint to 65536: 65504
  EXPECT_EQ(to_half(65520.0f), 0x7c00);   // the midpoint ties to the even 65536, which is inf
}

TEST(Fp16, NarrowingATensorRefusesWhatBinary16CannotHold) {
  EXPECT_EQ(narrow_to_half(std::vector<float>{1.0f, -2.0f, 65504.0f}, "w").size(), 3u);
  EXPECT_MESSAGE_HAS(testing::thrown_message<std::range_error>([] { narrow_to_half(std::vector<float>{1.0f, 70000.0f}, "h.0.attn.c_attn.weight"); }),
                     "h.0.attn.c_attn.weight: element 1");
  EXPECT_MESSAGE_HAS(testing::thrown_message<std::range_error>([] { narrow_to_half(std::vector<float>{NAN}, "w"); }), "not finite");
}

// The layer is Linear on the widened weights, bit for bit, and has no backward.
TEST(Fp16Linear, ForwardIsLinearOnTheWidenedWeights) {
  std::mt19937 gen(3);
  std::normal_distribution<float> nd(0.0f, 0.3f);
  Tensor w({48, 40}, Format::fp32()), x({7, 48}, Format::fp32());
  for (std::int64_t i = 0; i < w.numel(); ++i) w.data<float>()[i] = nd(gen);
  for (std::int64_t i = 0; i < x.numel(); ++i) x.data<float>()[i] = nd(gen);
  Param b;
  b.value = Tensor({40}, Format::fp32());
  for (std::int64_t i = 0; i < 40; ++i) b.value.data<float>()[i] = nd(gen);
  Fp16Linear h("m", w, &b);
  EXPECT_EQ(h.bytes(), 48 * 40 * 2);
  const Tensor w16 = h.widened();
  double max_rel = 0.0;
  for (std::int64_t i = 0; i < w.numel(); ++i) {
    const float a = w.data<float>()[i], r = w16.data<float>()[i];
    max_rel = std::max(max_rel, std::fabs(static_cast<double>(r) - a) / std::fabs(a));
  }
  EXPECT_LE(max_rel, std::ldexp(1.0, -11));  // half a unit in the 11-bit significand (normal range here)
  EXPECT_GT(max_rel, 0.0);                   // and the rounding did happen
  const Tensor y = h.forward(x, Format::fp32(), RngKey{});
  const Tensor ref = bias_add(matmul(x, w16), &b.value, Format::fp32(), RngKey{});
  ASSERT_EQ(y.numel(), ref.numel());
  for (std::int64_t i = 0; i < y.numel(); ++i) ASSERT_EQ(y.data<float>()[i], ref.data<float>()[i]) << i;
  EXPECT_THROW(h.backward(y, RngKey{}), std::logic_error);
}

// A float checkpoint loaded with its linears in fp16 keeps no fp32 copy of
// them and computes the logits of the same GPT whose linear weights were
// rounded to fp16; a forward-only load keeps the values and no masters.
TEST(Fp16Linear, AModelLoadedInFp16IsTheModelOfTheRoundedWeights) {
  GPTConfig gc;
  gc.n_layer = 2;
  gc.n_embd = 32;
  gc.n_head = 2;
  gc.n_ctx = 16;
  const std::filesystem::path dir = testing::fresh_dir("fp16_load");
  std::filesystem::create_directories(dir);
  GPT rounded(gc, Precision::parse("fp32"), 7, 0.08f);
  save_model(dir / "m.safetensors", rounded, {});
  for (const std::string& m : rounded.linear_modules()) {
    Param& p = rounded.param(m + ".weight");
    float* v = p.value.data<float>();
    for (std::int64_t i = 0; i < p.value.numel(); ++i) v[i] = from_half(to_half(v[i]));
  }
  GPT held = load_model(dir / "m.safetensors", "", Rounding::Nearest, LoadMode{.linears_fp16 = true});
  GPT plain = load_model(dir / "m.safetensors", "", Rounding::Nearest, LoadMode{.forward_only = true});
  std::int64_t bytes = 0;
  for (const std::string& m : held.linear_modules()) {
    EXPECT_TRUE(held.param(m + ".weight").value.empty()) << m;
    EXPECT_TRUE(held.param(m + ".weight").master.empty()) << m;
  }
  held.for_each_linear([&](const std::string&, std::unique_ptr<LinearLayer>& l) {
    const auto* h = dynamic_cast<const Fp16Linear*>(l.get());
    ASSERT_NE(h, nullptr);
    bytes += h->bytes();
  });
  EXPECT_EQ(bytes, 2 * 2 * (32 * 96 + 32 * 32 + 32 * 128 + 128 * 32));  // 2 blocks, 2 bytes per weight
  for (const Param& p : plain.params()) {
    EXPECT_TRUE(p.master.empty()) << p.name;
    EXPECT_FALSE(p.value.empty()) << p.name;
  }
  std::vector<std::int32_t> x(2 * 16);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<std::int32_t>((i * 7) % 256);
  held.forward(x.data(), nullptr, 2, 16, 0, 1, false);
  rounded.forward(x.data(), nullptr, 2, 16, 0, 1, false);
  const Tensor &a = held.logits(), &r = rounded.logits();
  ASSERT_EQ(a.numel(), r.numel());
  for (std::int64_t i = 0; i < a.numel(); ++i) ASSERT_EQ(a.data<float>()[i], r.data<float>()[i]) << i;
  EXPECT_THROW(load_model(dir / "m.safetensors", "int8", Rounding::Nearest, LoadMode{.linears_fp16 = true}),
               std::invalid_argument);
}

}  // namespace
}  // namespace intrain
