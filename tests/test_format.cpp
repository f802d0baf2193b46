// Number formats (core/format.h) and the Tensor that carries one (core/tensor.h):
// ranges, storage types, names, argument checking and its messages, and the
// Tensor's shape rules, typed access, deep copies and description.
#include <gtest/gtest.h>

#include "test_support.h"

#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/format.h"
#include "core/tensor.h"

namespace intrain {
namespace {


// 2^k computed by repeated doubling, independently of the shifts in format.cpp.
std::int64_t pow2(int k) {
  std::int64_t p = 1;
  for (int i = 0; i < k; ++i) p *= 2;
  return p;
}

// The range of each storage type, to check that storage() holds the format.
std::int64_t storage_min(DType t) {
  switch (t) {
    case DType::I8:
      return std::numeric_limits<std::int8_t>::min();
    case DType::I16:
      return std::numeric_limits<std::int16_t>::min();
    case DType::I32:
      return std::numeric_limits<std::int32_t>::min();
    case DType::I64:
      return std::numeric_limits<std::int64_t>::min();
    case DType::F32:
      break;
  }
  return 0;
}
std::int64_t storage_max(DType t) {
  switch (t) {
    case DType::I8:
      return std::numeric_limits<std::int8_t>::max();
    case DType::I16:
      return std::numeric_limits<std::int16_t>::max();
    case DType::I32:
      return std::numeric_limits<std::int32_t>::max();
    case DType::I64:
      return std::numeric_limits<std::int64_t>::max();
    case DType::F32:
      break;
  }
  return 0;
}

// ---------------------------------------------------------------------------
// Format
// ---------------------------------------------------------------------------

TEST(FormatFixed, SignedEveryBitWidth) {
  for (int b = 2; b <= 16; ++b) {
    SCOPED_TRACE("bits " + std::to_string(b));
    const Format f = Format::fixed(b);
    EXPECT_EQ(f.bits(), b);
    EXPECT_TRUE(f.is_signed());
    EXPECT_EQ(f.scaling(), Scaling::SharedExponent);
    EXPECT_EQ(f.rounding(), Rounding::Nearest);
    EXPECT_TRUE(f.is_integer());
    EXPECT_FALSE(f.is_float());
    EXPECT_EQ(f.group_size(), 0);
    EXPECT_EQ(f.qmax(), pow2(b - 1) - 1);
    EXPECT_EQ(f.qmin(), -(pow2(b - 1) - 1));  // symmetric: the most negative code is unused
    EXPECT_EQ(f.qmin(), -f.qmax());
    EXPECT_EQ(f.storage(), b <= 8 ? DType::I8 : DType::I16);
    EXPECT_EQ(f.name(), "int" + std::to_string(b));
    EXPECT_EQ(Format::fixed(b, Rounding::Stochastic).name(), "int" + std::to_string(b) + "-sr");
    EXPECT_EQ(Format::fixed(b, Rounding::Stochastic).rounding(), Rounding::Stochastic);
  }
}

TEST(FormatFixed, UnsignedEveryBitWidth) {
  for (int b = 2; b <= 16; ++b) {
    SCOPED_TRACE("bits " + std::to_string(b));
    const Format f = Format::fixed(b, Rounding::Nearest, false);
    EXPECT_EQ(f.bits(), b);
    EXPECT_FALSE(f.is_signed());
    EXPECT_EQ(f.qmax(), pow2(b) - 1);
    EXPECT_EQ(f.qmin(), 0);
    // The storage types are signed, so uint8 needs int16 and uint16 needs int32.
    EXPECT_EQ(f.storage(), b <= 7 ? DType::I8 : (b <= 15 ? DType::I16 : DType::I32));
    EXPECT_EQ(f.name(), "uint" + std::to_string(b));
    EXPECT_EQ(Format::fixed(b, Rounding::Stochastic, false).name(), "uint" + std::to_string(b) + "-sr");
  }
}

// storage() is the smallest of int8/16/32/64 that holds [qmin, qmax].
TEST(FormatFixed, StorageIsTheSmallestThatHoldsTheRange) {
  std::vector<Format> formats;
  for (int b = 2; b <= 16; ++b) {
    formats.push_back(Format::fixed(b));
    formats.push_back(Format::fixed(b, Rounding::Nearest, false));
  }
  for (int b = 2; b <= 8; ++b) formats.push_back(Format::grouped(b, 32));
  for (int b = 17; b <= 31; ++b) formats.push_back(Format::wide(b));
  formats.push_back(Format::accumulator(32));
  formats.push_back(Format::accumulator(64));
  const DType order[] = {DType::I8, DType::I16, DType::I32, DType::I64};
  for (const Format& f : formats) {
    SCOPED_TRACE(f.name());
    DType smallest = DType::F32;
    for (DType t : order) {
      if (storage_min(t) <= f.qmin() && f.qmax() <= storage_max(t)) {
        smallest = t;
        break;
      }
    }
    EXPECT_EQ(f.storage(), smallest);
    EXPECT_EQ(dtype_size(f.storage()) * 8, f.storage() == DType::I8    ? 8
                                           : f.storage() == DType::I16 ? 16
                                           : f.storage() == DType::I32 ? 32
                                                                       : 64);
  }
}

TEST(FormatFixed, BitsOutOfRangeThrowWithTheValue) {
  for (int bad : {1, 17, 0, -3, 32, 64, std::numeric_limits<int>::min()}) {
    const std::string msg = testing::thrown_message<std::invalid_argument>([&] { (void)Format::fixed(bad); });
    EXPECT_MESSAGE_HAS(msg, "bits = " + std::to_string(bad));
    // Unsigned and stochastic variants go through the same check.
    testing::thrown_message<std::invalid_argument>([&] { (void)Format::fixed(bad, Rounding::Stochastic, false); });
  }
}

TEST(FormatWide, SeventeenToThirtyOneBits) {
  for (int b = 17; b <= 31; ++b) {
    SCOPED_TRACE("bits " + std::to_string(b));
    const Format f = Format::wide(b);
    EXPECT_EQ(f.bits(), b);
    EXPECT_TRUE(f.is_signed());
    EXPECT_EQ(f.scaling(), Scaling::SharedExponent);
    EXPECT_EQ(f.rounding(), Rounding::Stochastic);  // the documented default
    EXPECT_EQ(f.qmax(), pow2(b - 1) - 1);
    EXPECT_EQ(f.qmin(), -(pow2(b - 1) - 1));
    EXPECT_EQ(f.storage(), DType::I32);
    EXPECT_EQ(f.name(), "int" + std::to_string(b) + "-sr");
    EXPECT_EQ(Format::wide(b, Rounding::Nearest).name(), "int" + std::to_string(b));
    EXPECT_NE(f, Format::accumulator(32));
  }
  for (int bad : {16, 32, 0, -3, 64}) {
    const std::string msg = testing::thrown_message<std::invalid_argument>([&] { (void)Format::wide(bad); });
    EXPECT_MESSAGE_HAS(msg, "bits = " + std::to_string(bad));
  }
}

TEST(FormatGrouped, RangeStorageAndNames) {
  for (int b = 2; b <= 8; ++b) {
    for (int g : {1, 32, 128, 4096}) {
      SCOPED_TRACE("bits " + std::to_string(b) + " group " + std::to_string(g));
      const Format f = Format::grouped(b, g);
      EXPECT_EQ(f.bits(), b);
      EXPECT_EQ(f.group_size(), g);
      EXPECT_FALSE(f.is_signed());
      EXPECT_EQ(f.scaling(), Scaling::Grouped);
      EXPECT_TRUE(f.is_integer());
      EXPECT_EQ(f.qmin(), 0);
      EXPECT_EQ(f.qmax(), pow2(b) - 1);
      EXPECT_EQ(f.storage(), b <= 7 ? DType::I8 : DType::I16);
      EXPECT_EQ(f.name(), "uint" + std::to_string(b) + "-g" + std::to_string(g));
      EXPECT_EQ(Format::grouped(b, g, Rounding::Stochastic).name(),
                "uint" + std::to_string(b) + "-g" + std::to_string(g) + "-sr");
    }
  }
  EXPECT_EQ(Format::grouped(4, 128).name(), "uint4-g128");
}

TEST(FormatGrouped, OutOfRangeThrowsWithTheValue) {
  for (int bad : {1, 0, -3, 9, 16, 17}) {
    const std::string msg = testing::thrown_message<std::invalid_argument>([&] { (void)Format::grouped(bad, 64); });
    EXPECT_MESSAGE_HAS(msg, "bits = " + std::to_string(bad));
  }
  for (int bad : {0, -1, -128}) {
    const std::string msg = testing::thrown_message<std::invalid_argument>([&] { (void)Format::grouped(4, bad); });
    EXPECT_MESSAGE_HAS(msg, "group size " + std::to_string(bad));
  }
}

TEST(FormatAccumulator, ThirtyTwoAndSixtyFourBits) {
  const Format a32 = Format::accumulator(32), a64 = Format::accumulator(64);
  EXPECT_EQ(a32.qmax(), std::numeric_limits<std::int32_t>::max());
  EXPECT_EQ(a32.qmin(), -std::numeric_limits<std::int32_t>::max());
  EXPECT_EQ(a64.qmax(), std::numeric_limits<std::int64_t>::max());
  EXPECT_EQ(a64.qmin(), -std::numeric_limits<std::int64_t>::max());
  EXPECT_EQ(a32.storage(), DType::I32);
  EXPECT_EQ(a64.storage(), DType::I64);
  EXPECT_EQ(a32.name(), "acc32");
  EXPECT_EQ(a64.name(), "acc64");
  EXPECT_TRUE(a32.is_signed());
  EXPECT_EQ(a32.scaling(), Scaling::SharedExponent);
  for (int bad : {8, 16, 31, 33, 0, -32, 128}) {
    const std::string msg = testing::thrown_message<std::invalid_argument>([&] { (void)Format::accumulator(bad); });
    EXPECT_MESSAGE_HAS(msg, "bits = " + std::to_string(bad));
  }
}

TEST(FormatFp32, IsFloatWithoutIntegerRange) {
  const Format f = Format::fp32();
  EXPECT_TRUE(f.is_float());
  EXPECT_FALSE(f.is_integer());
  EXPECT_EQ(f.scaling(), Scaling::Float);
  EXPECT_EQ(f.storage(), DType::F32);
  EXPECT_EQ(f.name(), "fp32");
  EXPECT_THROW((void)f.qmax(), std::logic_error);
  EXPECT_THROW((void)f.qmin(), std::logic_error);
}

TEST(FormatEquality, WithRoundingChangesOnlyTheRounding) {
  const Format a = Format::fixed(8);
  const Format b = a.with_rounding(Rounding::Stochastic);
  EXPECT_NE(a, b);
  EXPECT_EQ(b.rounding(), Rounding::Stochastic);
  EXPECT_EQ(b.bits(), 8);
  EXPECT_EQ(b.qmax(), a.qmax());
  EXPECT_EQ(b.storage(), a.storage());
  EXPECT_EQ(b, Format::fixed(8, Rounding::Stochastic));
  EXPECT_EQ(b.with_rounding(Rounding::Nearest), a);
  EXPECT_EQ(Format::grouped(4, 64).with_rounding(Rounding::Stochastic), Format::grouped(4, 64, Rounding::Stochastic));
  EXPECT_NE(Format::fixed(8), Format::fixed(8, Rounding::Nearest, false));
  EXPECT_NE(Format::fixed(8), Format::fixed(9));
  EXPECT_NE(Format::grouped(4, 64), Format::grouped(4, 32));
  EXPECT_NE(Format::accumulator(32), Format::fp32());
}

TEST(Rounding, ParseAndName) {
  EXPECT_EQ(parse_rounding("nearest"), Rounding::Nearest);
  EXPECT_EQ(parse_rounding("rn"), Rounding::Nearest);
  EXPECT_EQ(parse_rounding("stochastic"), Rounding::Stochastic);
  EXPECT_EQ(parse_rounding("sr"), Rounding::Stochastic);
  for (Rounding r : {Rounding::Nearest, Rounding::Stochastic}) EXPECT_EQ(parse_rounding(rounding_name(r)), r);
  EXPECT_STREQ(rounding_name(Rounding::Nearest), "nearest");
  EXPECT_STREQ(rounding_name(Rounding::Stochastic), "stochastic");
}

TEST(Rounding, ParseErrorsNameTheInput) {
  // The documented spellings are exact: anything else is an error.
  for (const std::string bad : {"", "round", "nearest ", " sr", "Nearest", "SR", "stoch", "r"}) {
    const std::string msg = testing::thrown_message<std::invalid_argument>([&] { (void)parse_rounding(bad); });
    EXPECT_MESSAGE_HAS(msg, "'" + bad + "'");
  }
}

TEST(DTypeInfo, SizesAndNames) {
  EXPECT_EQ(dtype_size(DType::I8), 1);
  EXPECT_EQ(dtype_size(DType::I16), 2);
  EXPECT_EQ(dtype_size(DType::I32), 4);
  EXPECT_EQ(dtype_size(DType::I64), 8);
  EXPECT_EQ(dtype_size(DType::F32), 4);
  EXPECT_STREQ(dtype_name(DType::I8), "int8");
  EXPECT_STREQ(dtype_name(DType::I16), "int16");
  EXPECT_STREQ(dtype_name(DType::I32), "int32");
  EXPECT_STREQ(dtype_name(DType::I64), "int64");
  EXPECT_STREQ(dtype_name(DType::F32), "float32");
}

// ---------------------------------------------------------------------------
// Tensor
// ---------------------------------------------------------------------------

TEST(TensorShape, RankMustBeOneToThree) {
  const std::string m0 = testing::thrown_message<std::invalid_argument>([] { Tensor t(Shape{}, Format::fixed(8)); });
  EXPECT_MESSAGE_HAS(m0, "rank 0");
  const std::string m4 = testing::thrown_message<std::invalid_argument>([] { Tensor t({2, 3, 4, 5}, Format::fixed(8)); });
  EXPECT_MESSAGE_HAS(m4, "rank 4");
  EXPECT_MESSAGE_HAS(m4, "[2,3,4,5]");
  for (const Shape& ok : {Shape{5}, Shape{2, 3}, Shape{2, 3, 4}}) {
    const Tensor t(ok, Format::fixed(8));
    EXPECT_EQ(t.rank(), static_cast<int>(ok.size()));
  }
}

TEST(TensorShape, NegativeDimensionsThrow) {
  for (const Shape& bad : {Shape{-1}, Shape{3, -1}, Shape{-2, 4}, Shape{1, 2, -3}}) {
    const std::string msg = testing::thrown_message<std::invalid_argument>([&] { Tensor t(bad, Format::fixed(8)); });
    EXPECT_MESSAGE_HAS(msg, "negative");
    EXPECT_MESSAGE_HAS(msg, shape_str(bad));
  }
}

// A shape whose element count overflows int64 must be rejected, not wrap.
// Documents a bug: checked_numel (core/tensor.cpp) multiplies without an
// overflow check, so {2^32, 2^32} wraps to numel 0 and constructs an "empty"
// tensor whose shape claims 2^64 elements (and is signed-overflow UB).
TEST(TensorShape, ElementCountOverflowIsRejected) {
  const std::int64_t big = std::int64_t{1} << 32;
  EXPECT_THROW(Tensor t({big, big}, Format::fixed(8)), std::exception);
  EXPECT_THROW(Tensor t({big, big, 4}, Format::fixed(8)), std::exception);
}

TEST(TensorShape, ZeroSizedDimensionsAreEmpty) {
  const Tensor t({0, 5}, Format::fixed(8));
  EXPECT_EQ(t.numel(), 0);
  EXPECT_TRUE(t.empty());
  EXPECT_EQ(t.nbytes(), 0u);
  const Tensor c = t;  // copying an empty tensor is fine
  EXPECT_TRUE(c.empty());
}

TEST(TensorShape, DimsRowsColsBatch) {
  const Tensor t({2, 3, 4}, Format::fixed(12));
  EXPECT_EQ(t.numel(), 24);
  EXPECT_EQ(t.dim(0), 2);
  EXPECT_EQ(t.dim(-1), 4);
  EXPECT_EQ(t.dim(-3), 2);
  EXPECT_EQ(t.batch(), 2);
  EXPECT_EQ(t.rows(), 3);
  EXPECT_EQ(t.cols(), 4);
  EXPECT_EQ(t.nbytes(), 48u);  // int12 is stored in int16
  EXPECT_THROW((void)t.dim(3), std::out_of_range);
  EXPECT_THROW((void)t.dim(-4), std::out_of_range);
  const Tensor v({7}, Format::fixed(8));
  EXPECT_EQ(v.rows(), 1);
  EXPECT_EQ(v.cols(), 7);
  EXPECT_EQ(v.batch(), 1);
}

TEST(TensorShape, NewTensorIsZeroFilledWithItsExponent) {
  for (const Format& f : {Format::fixed(4), Format::fixed(16), Format::accumulator(32), Format::accumulator(64),
                          Format::fixed(8, Rounding::Nearest, false)}) {
    const Tensor t({3, 50}, f, -9);
    EXPECT_EQ(t.exponent(), -9);
    EXPECT_EQ(t.saturated(), 0);
    EXPECT_EQ(t.dtype(), f.storage());
    EXPECT_EQ(t.format(), f);
    for (std::int64_t i = 0; i < t.numel(); ++i) ASSERT_EQ(t.mantissa(i), 0) << f.name();
  }
  const Tensor f({4}, Format::fp32());
  for (std::int64_t i = 0; i < 4; ++i) EXPECT_EQ(f.value(i), 0.0);
}

TEST(TensorShape, GroupedLastDimMustBeMultipleOfGroupSize) {
  const std::string msg = testing::thrown_message<std::invalid_argument>([] { Tensor t({4, 100}, Format::grouped(4, 32)); });
  EXPECT_MESSAGE_HAS(msg, "100");
  EXPECT_MESSAGE_HAS(msg, "32");
  EXPECT_THROW(Tensor t({2, 16}, Format::grouped(4, 32)), std::invalid_argument);  // group wider than a row
  const Tensor t({3, 96}, Format::grouped(4, 32));
  EXPECT_EQ(t.num_groups(), 9);
  EXPECT_EQ(t.group_scales().size(), 9u);
  EXPECT_EQ(t.group_zeros().size(), 9u);
  EXPECT_EQ(Tensor({3, 96}, Format::fixed(8)).num_groups(), 0);
}

TEST(TensorReshape, ElementCountMismatchMessage) {
  Tensor t({2, 3}, Format::fixed(8));
  const std::string msg = testing::thrown_message<std::invalid_argument>([&] { t.reshape({4, 2}); });
  EXPECT_EQ(msg, "Tensor::reshape: [2,3] has 6 elements, [4,2] has 8");
  EXPECT_EQ(t.shape(), (Shape{2, 3}));  // unchanged after the failed reshape
  EXPECT_THROW(t.reshape({1, 1, 2, 3}), std::invalid_argument);
  EXPECT_THROW(t.reshape({-2, -3}), std::invalid_argument);
}

TEST(TensorReshape, KeepsTheData) {
  Tensor t({2, 3}, Format::fixed(8), 4);
  for (int i = 0; i < 6; ++i) t.data<std::int8_t>()[i] = static_cast<std::int8_t>(i - 3);
  t.reshape({3, 2});
  EXPECT_EQ(t.shape(), (Shape{3, 2}));
  t.reshape({6});
  EXPECT_EQ(t.rank(), 1);
  t.reshape({1, 2, 3});
  EXPECT_EQ(t.exponent(), 4);
  for (int i = 0; i < 6; ++i) EXPECT_EQ(t.mantissa(i), i - 3);
}

TEST(TensorData, WrongTypeThrowsLogicError) {
  Tensor t8({4}, Format::fixed(8));
  const Tensor& c8 = t8;
  EXPECT_NO_THROW((void)t8.data<std::int8_t>());
  EXPECT_NO_THROW((void)c8.data<std::int8_t>());
  const std::string msg = testing::thrown_message<std::logic_error>([&] { (void)t8.data<std::int16_t>(); });
  EXPECT_MESSAGE_HAS(msg, "int16");
  EXPECT_MESSAGE_HAS(msg, t8.describe());
  EXPECT_THROW((void)c8.data<std::int32_t>(), std::logic_error);
  EXPECT_THROW((void)t8.data<float>(), std::logic_error);
  EXPECT_THROW((void)t8.data<std::int64_t>(), std::logic_error);

  Tensor t12({4}, Format::fixed(12));
  EXPECT_NO_THROW((void)t12.data<std::int16_t>());
  EXPECT_THROW((void)t12.data<std::int8_t>(), std::logic_error);
  Tensor u8({4}, Format::fixed(8, Rounding::Nearest, false));
  EXPECT_NO_THROW((void)u8.data<std::int16_t>());
  EXPECT_THROW((void)u8.data<std::int8_t>(), std::logic_error);
  Tensor a32({4}, Format::accumulator(32));
  EXPECT_NO_THROW((void)a32.data<std::int32_t>());
  EXPECT_THROW((void)a32.data<std::int64_t>(), std::logic_error);
  Tensor f({4}, Format::fp32());
  EXPECT_NO_THROW((void)f.data<float>());
  EXPECT_THROW((void)f.data<std::int32_t>(), std::logic_error);
  EXPECT_THROW((void)f.mantissa(0), std::logic_error);  // visit_int refuses float storage
}

TEST(TensorData, BufferIs64ByteAligned) {
  for (std::int64_t n : {1, 3, 64, 1000}) {
    const Tensor t({n}, Format::fixed(8));
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(t.raw()) % 64, 0u) << n;
  }
}

TEST(TensorCopy, IsDeep) {
  Tensor a({2, 64}, Format::grouped(4, 32), 0);
  a.set_exponent(3);
  a.set_saturated(7);
  for (std::int64_t i = 0; i < a.numel(); ++i) a.data<std::int8_t>()[i] = static_cast<std::int8_t>(i % 16);
  a.group_scales()[1] = 0.25f;
  a.group_zeros()[2] = 5;

  Tensor b = a;  // copy constructor
  EXPECT_NE(b.raw(), a.raw());
  EXPECT_EQ(std::memcmp(b.raw(), a.raw(), a.nbytes()), 0);
  EXPECT_EQ(b.exponent(), 3);
  EXPECT_EQ(b.saturated(), 7);
  EXPECT_EQ(b.group_scales(), a.group_scales());
  EXPECT_EQ(b.group_zeros(), a.group_zeros());
  EXPECT_EQ(b.format(), a.format());
  EXPECT_EQ(b.shape(), a.shape());

  b.data<std::int8_t>()[0] = 15;
  b.group_scales()[1] = 9.0f;
  b.group_zeros()[2] = 1;
  EXPECT_EQ(a.mantissa(0), 0);
  EXPECT_EQ(a.group_scales()[1], 0.25f);
  EXPECT_EQ(a.group_zeros()[2], 5);

  Tensor c({1}, Format::fp32());
  c = a;  // copy assignment replaces shape, format and data
  EXPECT_EQ(c.shape(), a.shape());
  EXPECT_EQ(c.format(), a.format());
  EXPECT_NE(c.raw(), a.raw());
  c.data<std::int8_t>()[5] = 0;
  EXPECT_EQ(a.mantissa(5), 5);

  const Tensor& self = c;
  c = self;  // self-assignment keeps the data
  EXPECT_EQ(c.mantissa(6), 6);

  Tensor moved = std::move(c);
  EXPECT_EQ(moved.mantissa(6), 6);
}

TEST(TensorValue, SharedExponentAndGrouped) {
  Tensor t({3}, Format::fixed(8), -2);
  t.data<std::int8_t>()[0] = 5;
  t.data<std::int8_t>()[1] = -127;
  t.data<std::int8_t>()[2] = 0;
  EXPECT_EQ(t.value(0), 1.25);
  EXPECT_EQ(t.value(1), -31.75);
  EXPECT_EQ(t.value(2), 0.0);
  t.set_exponent(40);
  EXPECT_EQ(t.value(0), 5.0 * 1099511627776.0);  // 5 * 2^40

  Tensor g({1, 4}, Format::grouped(4, 2));
  g.data<std::int8_t>()[0] = 3;
  g.data<std::int8_t>()[1] = 15;
  g.data<std::int8_t>()[2] = 0;
  g.data<std::int8_t>()[3] = 7;
  g.group_zeros() = {3, 7};
  g.group_scales() = {0.5f, 0.125f};
  EXPECT_EQ(g.value(0), 0.0);
  EXPECT_EQ(g.value(1), 6.0);
  EXPECT_EQ(g.value(2), -0.875);
  EXPECT_EQ(g.value(3), 0.0);
}

TEST(TensorDescribe, FormatShapeAndExponent) {
  EXPECT_EQ(Tensor({4, 16}, Format::fixed(8), -7).describe(), "int8[4,16] e=-7");
  EXPECT_EQ(Tensor({1, 2, 3}, Format::fixed(12, Rounding::Stochastic)).describe(), "int12-sr[1,2,3] e=0");
  EXPECT_EQ(Tensor({2, 3}, Format::accumulator(32), 5).describe(), "acc32[2,3] e=5");
  EXPECT_EQ(Tensor({2, 3}, Format::accumulator(64), -20).describe(), "acc64[2,3] e=-20");
  EXPECT_EQ(Tensor({3}, Format::fp32()).describe(), "fp32[3]");
  EXPECT_EQ(Tensor({2, 64}, Format::grouped(4, 32)).describe(), "uint4-g32[2,64]");
  EXPECT_EQ(Tensor({5}, Format::fixed(8, Rounding::Nearest, false), 1).describe(), "uint8[5] e=1");
  EXPECT_EQ(shape_str({}), "[]");
  EXPECT_EQ(shape_str({7}), "[7]");
}

}  // namespace
}  // namespace intrain
