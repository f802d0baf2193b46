// Every integer matmul path against an exact Boost.Multiprecision cpp_int
// reference, bit for bit; the float path against a double reference.
#include <gtest/gtest.h>

#include <boost/multiprecision/cpp_int.hpp>
#include <random>
#include <stdexcept>
#include <vector>

#include "core/matmul.h"
#include "core/onednn_gemm.h"
#include "test_support.h"

namespace intrain {
namespace {

using boost::multiprecision::cpp_int;
using testing::Fill;
using testing::random_int;

// C = op(A)·op(B) in arbitrary precision, straight from the definition.
std::vector<cpp_int> exact_product(const Tensor& A, const Tensor& B, Trans ta, Trans tb) {
  const MatmulDims d = matmul_dims(A, B, ta, tb);
  std::vector<cpp_int> C(static_cast<std::size_t>(d.batch * d.M * d.N));
  for (std::int64_t z = 0; z < d.batch; ++z)
    for (std::int64_t m = 0; m < d.M; ++m)
      for (std::int64_t n = 0; n < d.N; ++n) {
        cpp_int s = 0;
        for (std::int64_t k = 0; k < d.K; ++k) {
          const std::int64_t ia = ta == Trans::N ? (z * d.M + m) * d.K + k : (z * d.K + k) * d.M + m;
          const std::int64_t ib = tb == Trans::N ? (z * d.K + k) * d.N + n : (z * d.N + n) * d.K + k;
          s += cpp_int(A.mantissa(ia)) * cpp_int(B.mantissa(ib));
        }
        C[static_cast<std::size_t>((z * d.M + m) * d.N + n)] = s;
      }
  return C;
}

void expect_exact(const Tensor& A, const Tensor& B, Trans ta, Trans tb) {
  SCOPED_TRACE(A.describe() + (ta == Trans::T ? "ᵀ" : "") + " x " + B.describe() + (tb == Trans::T ? "ᵀ" : ""));
  const Tensor C = matmul(A, B, ta, tb);
  const Tensor R = matmul_reference(A, B, ta, tb);
  const std::vector<cpp_int> E = exact_product(A, B, ta, tb);
  ASSERT_EQ(C.numel(), static_cast<std::int64_t>(E.size()));
  EXPECT_EQ(C.format(), R.format());
  EXPECT_EQ(C.exponent(), A.exponent() + B.exponent());
  EXPECT_EQ(C.format(), matmul_result_format(A.format(), B.format(), matmul_dims(A, B, ta, tb).K));
  std::int64_t bad = 0;
  for (std::int64_t i = 0; i < C.numel(); ++i) {
    if (cpp_int(C.mantissa(i)) != E[static_cast<std::size_t>(i)] ||
        cpp_int(R.mantissa(i)) != E[static_cast<std::size_t>(i)]) {
      if (++bad <= 5) {
        ADD_FAILURE() << "element " << i << ": fast " << C.mantissa(i) << ", reference " << R.mantissa(i)
                      << ", exact " << E[static_cast<std::size_t>(i)];
      }
    }
  }
  EXPECT_EQ(bad, 0);
}

struct Case {
  int bits_a, bits_b;
};

class MatmulExact : public ::testing::TestWithParam<Case> {};

TEST_P(MatmulExact, RandomAllTransposes) {
  const auto [ba, bb] = GetParam();
  const Format fa = Format::fixed(ba), fb = Format::fixed(bb);
  const std::int64_t M = 13, K = 37, N = 11;  // odd sizes: no alignment luck
  std::uint64_t seed = 1;
  for (Trans ta : {Trans::N, Trans::T})
    for (Trans tb : {Trans::N, Trans::T}) {
      const Tensor A = random_int(ta == Trans::N ? Shape{M, K} : Shape{K, M}, fa, seed++, Fill::Uniform, -3);
      const Tensor B = random_int(tb == Trans::N ? Shape{K, N} : Shape{N, K}, fb, seed++, Fill::Uniform, 5);
      expect_exact(A, B, ta, tb);
    }
}

TEST_P(MatmulExact, ExtremeValues) {
  const auto [ba, bb] = GetParam();
  const Format fa = Format::fixed(ba), fb = Format::fixed(bb);
  for (Fill fill : {Fill::Extremes, Fill::Max, Fill::Min}) {
    const Tensor A = random_int({9, 64}, fa, 11, fill);
    const Tensor B = random_int({64, 7}, fb, 12, fill == Fill::Min ? Fill::Max : fill);
    expect_exact(A, B, Trans::N, Trans::N);
    expect_exact(A, random_int({7, 64}, fb, 13, fill), Trans::N, Trans::T);
  }
}

TEST_P(MatmulExact, Batched) {
  const auto [ba, bb] = GetParam();
  const Tensor A = random_int({3, 5, 16}, Format::fixed(ba), 21);
  const Tensor B = random_int({3, 16, 6}, Format::fixed(bb), 22);
  expect_exact(A, B, Trans::N, Trans::N);
  const Tensor Bt = random_int({3, 6, 16}, Format::fixed(bb), 23);
  expect_exact(A, Bt, Trans::N, Trans::T);
  const Tensor At = random_int({3, 16, 5}, Format::fixed(ba), 24);
  expect_exact(At, B, Trans::T, Trans::N);
}

std::string case_name(const ::testing::TestParamInfo<Case>& i) {
  return "a" + std::to_string(i.param.bits_a) + "_b" + std::to_string(i.param.bits_b);
}

INSTANTIATE_TEST_SUITE_P(Formats, MatmulExact,
                         ::testing::Values(Case{2, 2}, Case{4, 8}, Case{8, 8}, Case{8, 12}, Case{12, 8}, Case{9, 9},
                                           Case{16, 16}, Case{16, 8}, Case{8, 16}, Case{13, 16}, Case{16, 3}),
                         case_name);

TEST(MatmulPathTest, DispatchByFormat) {
  const Tensor a8 = random_int({2, 2}, Format::fixed(8), 1), a16 = random_int({2, 2}, Format::fixed(16), 2);
  const Tensor f({2, 2}, Format::fp32());
  EXPECT_EQ(matmul_path(a8, a8), MatmulPath::Int8);
  EXPECT_EQ(matmul_path(a8, a16), MatmulPath::Split);
  EXPECT_EQ(matmul_path(a16, a16), MatmulPath::Split);
  EXPECT_EQ(matmul_path(f, f), MatmulPath::Float);
  EXPECT_THROW(matmul_path(f, a8), std::invalid_argument);
}

// Result width depends only on the formats and K: int8 x int8 stays in int32
// up to K = floor((2^31 - 1) / 127^2) = 133,144.
TEST(MatmulOverflow, ResultWidthRule) {
  const Format i8 = Format::fixed(8), i16 = Format::fixed(16);
  EXPECT_EQ(matmul_result_format(i8, i8, 133144).bits(), 32);
  EXPECT_EQ(matmul_result_format(i8, i8, 133145).bits(), 64);
  EXPECT_EQ(matmul_result_format(i16, i16, 2).bits(), 32);
  EXPECT_EQ(matmul_result_format(i16, i16, 3).bits(), 64);
}

// K beyond the int32 bound forces K to be split into exact int32 chunks that
// are summed in int64. All-max inputs make every partial sum the worst case.
TEST(MatmulOverflow, LongKSplitsExactly8Bit) {
  const std::int64_t K = 133144 * 2 + 17;
  for (Fill fill : {Fill::Max, Fill::Uniform}) {
    const Tensor A = random_int({2, K}, Format::fixed(8), 31, fill);
    const Tensor B = random_int({K, 3}, Format::fixed(8), 32, fill);
    const Tensor C = matmul(A, B);
    ASSERT_EQ(C.format().bits(), 64);
    expect_exact(A, B, Trans::N, Trans::N);
    if (fill == Fill::Max) {
      EXPECT_EQ(C.mantissa(0), K * 127 * 127);
    }
  }
}

TEST(MatmulOverflow, LongKSplitsExactly16Bit) {
  const std::int64_t K = 70001;  // > 65793, the u8 x s8 piece bound, and 2K > it too
  const Tensor A = random_int({2, K}, Format::fixed(16), 41, Fill::Extremes);
  const Tensor B = random_int({K, 2}, Format::fixed(16), 42, Fill::Extremes);
  expect_exact(A, B, Trans::N, Trans::N);
  const Tensor Am = random_int({2, K}, Format::fixed(16), 43, Fill::Min);
  const Tensor Bm = random_int({K, 2}, Format::fixed(16), 44, Fill::Min);
  const Tensor C = matmul(Am, Bm);
  EXPECT_EQ(C.mantissa(0), K * 32767LL * 32767LL);
}

// 16 x 16 bits at K = 2, and 8 x 16 bits at K = 516, have a final worst case
// inside int32 while a shifted partial term (65536·Ah·Bh, 256·A·Bh) alone can
// exceed it: the modular int32 accumulation must still give the exact result.
TEST(MatmulOverflow, Int32ResultWithWidePartialTerms) {
  const Format f8 = Format::fixed(8), f16 = Format::fixed(16);
  const std::int64_t K = 2;
  ASSERT_EQ(matmul_result_format(f16, f16, K).bits(), 32);
  expect_exact(random_int({4, K}, f16, 51, Fill::Max), random_int({K, 4}, f16, 52, Fill::Max), Trans::N, Trans::N);
  expect_exact(random_int({4, K}, f16, 53, Fill::Min), random_int({K, 4}, f16, 54, Fill::Max), Trans::N, Trans::N);
  const std::int64_t K8 = 516;
  ASSERT_EQ(matmul_result_format(f8, f16, K8).bits(), 32);
  expect_exact(random_int({3, K8}, f8, 55, Fill::Max), random_int({K8, 3}, f16, 56, Fill::Max), Trans::N, Trans::N);
  expect_exact(random_int({3, K8}, f8, 57, Fill::Min), random_int({K8, 3}, f16, 58, Fill::Max), Trans::N, Trans::N);
}

TEST(MatmulShapes, EmptyAndDegenerate) {
  const Format f = Format::fixed(8);
  const Tensor C0 = matmul(random_int({3, 0}, f, 1), random_int({0, 4}, f, 2));
  EXPECT_EQ(C0.shape(), (Shape{3, 4}));
  for (std::int64_t i = 0; i < C0.numel(); ++i) EXPECT_EQ(C0.mantissa(i), 0);
  expect_exact(random_int({1, 1}, f, 3), random_int({1, 1}, f, 4), Trans::N, Trans::N);
  expect_exact(random_int({1, 300}, Format::fixed(16), 5), random_int({300, 1}, f, 6), Trans::N, Trans::N);
}

TEST(MatmulShapes, MismatchNamesBothShapes) {
  const Format f = Format::fixed(8);
  try {
    matmul(random_int({3, 5}, f, 1), random_int({4, 2}, f, 2));
    FAIL() << "expected std::invalid_argument";
  } catch (const std::invalid_argument& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("[3,5]"), std::string::npos) << msg;
    EXPECT_NE(msg.find("[4,2]"), std::string::npos) << msg;
  }
  EXPECT_THROW(matmul(random_int({2, 3, 5}, f, 1), random_int({3, 5, 2}, f, 2)), std::invalid_argument);
  EXPECT_THROW(matmul(random_int({2, 3, 5}, f, 1), random_int({5, 2}, f, 2)), std::invalid_argument);
}

// The float path against a double-accumulated reference. Tolerance: oneDNN
// sums in float32 in blocked order; for K = 64 terms of magnitude <= 1 the
// rounding error is below K * 2^-24 * sum|a||b| <= 64 * 6e-8 * 64 ~ 2.4e-4.
TEST(MatmulFloat, MatchesReference) {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (Trans ta : {Trans::N, Trans::T})
    for (Trans tb : {Trans::N, Trans::T}) {
      Tensor A(ta == Trans::N ? Shape{2, 9, 64} : Shape{2, 64, 9}, Format::fp32());
      Tensor B(tb == Trans::N ? Shape{2, 64, 5} : Shape{2, 5, 64}, Format::fp32());
      for (std::int64_t i = 0; i < A.numel(); ++i) A.data<float>()[i] = u(rng);
      for (std::int64_t i = 0; i < B.numel(); ++i) B.data<float>()[i] = u(rng);
      const Tensor C = matmul(A, B, ta, tb), R = matmul_reference(A, B, ta, tb);
      for (std::int64_t i = 0; i < C.numel(); ++i) EXPECT_NEAR(C.data<float>()[i], R.data<float>()[i], 2.4e-4);
    }
}

TEST(MatmulCache, PrimitivesAreReused) {
  const Tensor A = random_int({7, 19}, Format::fixed(8), 1), B = random_int({19, 3}, Format::fixed(8), 2);
  matmul(A, B);
  const std::int64_t n = onednn_cache_size();
  for (int i = 0; i < 3; ++i) matmul(A, B);
  EXPECT_EQ(onednn_cache_size(), n);
}

}  // namespace
}  // namespace intrain
