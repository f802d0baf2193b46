// Shared helpers for the GoogleTest suites: deterministic random tensors.
#pragma once

#include <cstdint>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace intrain::testing {

enum class Fill { Uniform, Extremes, Max, Min, Zero };

// A fixed-point tensor with mantissas drawn from `fill`:
//   Uniform: uniform over [qmin, qmax]; Extremes: only qmin, 0, qmax;
//   Max / Min: every element qmax / qmin; Zero: all zero.
inline Tensor random_int(Shape shape, const Format& f, std::uint64_t seed, Fill fill = Fill::Uniform,
                         int exponent = 0) {
  Tensor t(std::move(shape), f, exponent);
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<std::int64_t> uni(f.qmin(), f.qmax());
  std::uniform_int_distribution<int> pick(0, 2);
  visit_int(t, [&](auto* p) {
    using T = std::remove_pointer_t<decltype(p)>;
    for (std::int64_t i = 0; i < t.numel(); ++i) {
      std::int64_t v = 0;
      switch (fill) {
        case Fill::Uniform: v = uni(rng); break;
        case Fill::Extremes: v = (pick(rng) - 1) * f.qmax(); break;
        case Fill::Max: v = f.qmax(); break;
        case Fill::Min: v = f.qmin(); break;
        case Fill::Zero: v = 0; break;
      }
      p[i] = static_cast<T>(v);
    }
  });
  return t;
}

// n floats drawn from N(0, std²) by a seeded mt19937_64.
inline std::vector<float> normal_floats(std::int64_t n, std::uint64_t seed, float std) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, std);
  std::vector<float> v(static_cast<std::size_t>(n));
  for (float& x : v) x = d(rng);
  return v;
}

// Runs f, expects it to throw E, and returns the message (empty on failure).
template <class E, class F>
std::string thrown_message(F&& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "threw the wrong exception type: " << e.what();
    return {};
  }
  ADD_FAILURE() << "did not throw";
  return {};
}

#define EXPECT_MESSAGE_HAS(msg, needle) \
  EXPECT_NE(std::string(msg).find(needle), std::string::npos) << "message: '" << (msg) << "' lacks '" << (needle) << "'"

// ||a - b|| / ||b|| over the real values of two tensors of any formats.
inline double relative_l2_error(const Tensor& a, const Tensor& b) {
  EXPECT_EQ(a.numel(), b.numel());
  double num = 0.0, den = 0.0;
  for (std::int64_t i = 0; i < a.numel(); ++i) {
    const double d = a.value(i) - b.value(i);
    num += d * d;
    den += b.value(i) * b.value(i);
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

}  // namespace intrain::testing
