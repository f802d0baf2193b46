// Outlier split and tiled matmul (core/outliers.h).
//
// The split is checked element by element against the definition: every
// element is rounded once to the grid 2^e (compared bit for bit with
// shift_round), the outlier set is exactly what the rule selects (computed
// here independently by sorting), and both pieces are int8. The tiled
// product is compared bit for bit with matmul_reference() of the merged
// operands (int64 loops, themselves checked against cpp_int in
// test_matmul.cpp), on planted outliers in one row, one column and spread
// out, for every transpose and every mix of split and plain operands.
#include <gtest/gtest.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "core/matmul.h"
#include "core/outliers.h"
#include "core/quantize.h"
#include "core/rounding.h"
#include "test_support.h"

namespace intrain {
namespace {

using testing::random_int;

enum class Plant { None, OneRow, OneCol, Spread };

// A 16-bit source: a bulk of roughly N(0, sigma) plus outliers of magnitude
// in [lo, hi] at planted places (one storage row, one storage column, or
// `count` random positions). Returns the tensor and the planted indices.
struct Source {
  Tensor x;
  std::vector<std::int64_t> planted;
};
Source make_source(std::int64_t rows, std::int64_t cols, Plant plant, std::uint64_t seed, double sigma = 40.0,
                   std::int64_t lo = 3000, std::int64_t hi = 32767, std::int64_t count = 20,
                   Rounding rounding = Rounding::Nearest) {
  Source s{Tensor({rows, cols}, Format::fixed(16, rounding), -20), {}};
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> bulk(0.0, sigma);
  std::uniform_int_distribution<std::int64_t> mag(lo, hi);
  std::int16_t* x = s.x.data<std::int16_t>();
  for (std::int64_t i = 0; i < s.x.numel(); ++i)
    x[i] = static_cast<std::int16_t>(std::clamp<double>(std::round(bulk(rng)), -(lo - 1), lo - 1));
  std::vector<std::int64_t> at;
  if (plant == Plant::OneRow) {
    const std::int64_t r = rows / 3;
    for (std::int64_t c = 0; c < cols; c += 2) at.push_back(r * cols + c);
  } else if (plant == Plant::OneCol) {
    const std::int64_t c = cols / 2;
    for (std::int64_t r = 0; r < rows; r += 2) at.push_back(r * cols + c);
  } else if (plant == Plant::Spread) {
    std::uniform_int_distribution<std::int64_t> pos(0, s.x.numel() - 1);
    while (static_cast<std::int64_t>(at.size()) < count) {
      const std::int64_t p = pos(rng);
      if (std::find(at.begin(), at.end(), p) == at.end()) at.push_back(p);
    }
  }
  std::sort(at.begin(), at.end());
  for (std::int64_t p : at) x[p] = static_cast<std::int16_t>(mag(rng) * (rng() & 1 ? 1 : -1));
  s.planted = at;
  return s;
}

// Checks the split of x against the definition in core/outliers.h and
// returns the outlier set it found.
void expect_valid_split(const Tensor& x, const OutlierSplit& s, RngKey key) {
  ASSERT_EQ(s.bulk.shape(), x.shape());
  ASSERT_EQ(s.index.size(), s.high.size());
  EXPECT_TRUE(std::is_sorted(s.index.begin(), s.index.end()));
  EXPECT_TRUE(std::adjacent_find(s.index.begin(), s.index.end()) == s.index.end()) << "an index is listed twice";
  const int shift = s.exponent() - x.exponent();
  ASSERT_GE(shift, 0);
  // The shift rule: the smallest that fits tau in int8 and max|x| in 15 bits.
  const int want = std::max(shift_for_max(static_cast<std::uint64_t>(std::max<std::int64_t>(s.threshold, 0)), 127),
                            shift_for_max(max_abs_mantissa(x), kSplitQmax));
  EXPECT_EQ(shift, want);
  const Tensor v = s.merged();
  std::vector<bool> is_out(static_cast<std::size_t>(x.numel()), false);
  ASSERT_EQ(s.row.size(), s.index.size());
  ASSERT_EQ(s.col.size(), s.index.size());
  const std::int64_t cols = std::max<std::int64_t>(x.cols(), 1);
  for (std::size_t j = 0; j < s.index.size(); ++j) {
    is_out[static_cast<std::size_t>(s.index[j])] = true;
    EXPECT_LE(std::abs(s.high[j]), 127);
    EXPECT_EQ(s.row[j], s.index[j] / cols) << "outlier " << j;
    EXPECT_EQ(s.col[j], s.index[j] % cols) << "outlier " << j;
  }
  std::int64_t bad = 0;
  for (std::int64_t i = 0; i < x.numel(); ++i) {
    const std::int64_t want_v = shift_round(x.mantissa(i), shift, x.format().rounding(), key.bits(static_cast<std::uint32_t>(i)));
    const std::int64_t b = s.bulk.mantissa(i);
    const bool ok = v.mantissa(i) == want_v && b >= -127 && b <= 127 && (is_out[static_cast<std::size_t>(i)] || b == want_v);
    if (!ok && ++bad <= 5) {
      ADD_FAILURE() << "element " << i << ": x " << x.mantissa(i) << " shift " << shift << " wants v " << want_v
                    << ", split has bulk " << b << " merged " << v.mantissa(i);
    }
  }
  EXPECT_EQ(bad, 0);
}

// The outlier set of the SpreadMultiple rule, computed directly.
std::vector<std::int64_t> expected_rms_outliers(const Tensor& x, double gamma) {
  double ss = 0;
  std::int64_t mx = 0;
  for (std::int64_t i = 0; i < x.numel(); ++i) {
    ss += static_cast<double>(x.mantissa(i)) * static_cast<double>(x.mantissa(i));
    mx = std::max(mx, std::abs(x.mantissa(i)));
  }
  const auto tau = static_cast<std::int64_t>(std::min(std::floor(gamma * std::sqrt(ss / static_cast<double>(x.numel()))), static_cast<double>(mx)));
  std::vector<std::int64_t> out;
  for (std::int64_t i = 0; i < x.numel(); ++i)
    if (std::abs(x.mantissa(i)) > tau) out.push_back(i);
  return out;
}

// The k largest |x|, ties to the lowest index: a stable sort by magnitude.
std::vector<std::int64_t> expected_topk(const Tensor& x, std::int64_t k) {
  std::vector<std::int64_t> order(static_cast<std::size_t>(x.numel()));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](std::int64_t a, std::int64_t b) { return std::abs(x.mantissa(a)) > std::abs(x.mantissa(b)); });
  order.resize(static_cast<std::size_t>(k));
  std::sort(order.begin(), order.end());
  return order;
}

TEST(OutlierPolicy, ParsesAndNamesTheRules) {
  EXPECT_EQ(OutlierPolicy::parse("5"), (OutlierPolicy{OutlierRule::SpreadMultiple, 5.0}));
  EXPECT_EQ(OutlierPolicy::parse("rms:3.5"), (OutlierPolicy{OutlierRule::SpreadMultiple, 3.5}));
  EXPECT_EQ(OutlierPolicy::parse("pct:99.9"), (OutlierPolicy{OutlierRule::Percentile, 99.9}));
  EXPECT_EQ(OutlierPolicy::parse("top:64"), (OutlierPolicy{OutlierRule::TopK, 64.0}));
  EXPECT_EQ(OutlierPolicy::parse("rms:5").name(), "rms:5");
  EXPECT_EQ(OutlierPolicy::parse(OutlierPolicy::parse("pct:99.5").name()), OutlierPolicy::parse("pct:99.5"));
  for (const char* bad : {"", "-1", "five", "pct:101", "top:1.5", "rms:", "top:-3"}) {
    const std::string msg = testing::thrown_message<std::invalid_argument>([&] { OutlierPolicy::parse(bad); });
    EXPECT_NE(msg.find("--outlier-threshold"), std::string::npos) << msg;
    EXPECT_NE(msg.find("rms:G"), std::string::npos) << msg;
  }
}

TEST(OutlierSplitTest, RmsRuleFindsPlantedOutliersExactly) {
  for (Plant p : {Plant::OneRow, Plant::OneCol, Plant::Spread}) {
    SCOPED_TRACE(static_cast<int>(p));
    const Source s = make_source(64, 48, p, 7, 40.0, 3000, 6000);
    const OutlierSplit sp = outlier_split(s.x, OutlierPolicy{OutlierRule::SpreadMultiple, 5.0});
    expect_valid_split(s.x, sp, {});
    EXPECT_EQ(sp.index, expected_rms_outliers(s.x, 5.0));
    // The bulk is N(0, 40) clamped below 3000 and the planted values are at
    // least 3000; 5 rms lies between, so the rule finds exactly the planted set.
    EXPECT_EQ(sp.index, s.planted);
  }
}

TEST(OutlierSplitTest, TopKTakesExactlyKWithTiesToTheLowestIndex) {
  Tensor x({4, 8}, Format::fixed(16), 0);
  std::int16_t* p = x.data<std::int16_t>();
  for (int i = 0; i < 32; ++i) p[i] = static_cast<std::int16_t>((i % 3) - 1);
  p[5] = 900;
  p[9] = -700;
  p[12] = 700;
  p[30] = 700;
  p[2] = -700;
  for (std::int64_t k : {0, 1, 2, 3, 4, 5, 7, 31, 32}) {
    SCOPED_TRACE(k);
    const OutlierSplit s = outlier_split(x, OutlierPolicy{OutlierRule::TopK, static_cast<double>(k)});
    expect_valid_split(x, s, {});
    EXPECT_EQ(s.index, expected_topk(x, k));
  }
}

TEST(OutlierSplitTest, PercentileRuleMatchesNearestRank) {
  const Source s = make_source(50, 40, Plant::Spread, 3, 200.0, 3000, 32767, 60);
  std::vector<std::int64_t> mags;
  for (std::int64_t i = 0; i < s.x.numel(); ++i) mags.push_back(std::abs(s.x.mantissa(i)));
  std::sort(mags.begin(), mags.end());
  for (double pct : {0.0, 50.0, 97.0, 99.0, 99.9, 100.0}) {
    SCOPED_TRACE(pct);
    const auto n = static_cast<std::int64_t>(mags.size());
    const std::int64_t rank = std::clamp<std::int64_t>(static_cast<std::int64_t>(std::ceil(pct / 100.0 * n)), 1, n);
    const std::int64_t tau = mags[static_cast<std::size_t>(rank - 1)];
    const OutlierSplit sp = outlier_split(s.x, OutlierPolicy{OutlierRule::Percentile, pct});
    expect_valid_split(s.x, sp, {});
    EXPECT_EQ(sp.threshold, tau);
    std::vector<std::int64_t> want;
    for (std::int64_t i = 0; i < n; ++i)
      if (std::abs(s.x.mantissa(i)) > tau) want.push_back(i);
    EXPECT_EQ(sp.index, want);
  }
}

TEST(OutlierSplitTest, KthLargestMatchesSort) {
  const Source s = make_source(33, 17, Plant::Spread, 11, 3000.0, 20000, 32767, 30);
  std::vector<std::int64_t> mags;
  for (std::int64_t i = 0; i < s.x.numel(); ++i) mags.push_back(std::abs(s.x.mantissa(i)));
  std::sort(mags.rbegin(), mags.rend());
  for (std::int64_t r = 1; r <= s.x.numel(); r += 7) EXPECT_EQ(kth_largest_abs(s.x, r), mags[static_cast<std::size_t>(r - 1)]) << r;
  EXPECT_THROW(kth_largest_abs(s.x, 0), std::invalid_argument);
}

TEST(OutlierSplitTest, EdgeCasesNoneAllZero) {
  const Source s = make_source(16, 24, Plant::None, 5);
  const OutlierSplit none = outlier_split(s.x, OutlierPolicy{OutlierRule::SpreadMultiple, 1000.0});
  expect_valid_split(s.x, none, {});
  EXPECT_TRUE(none.index.empty());
  EXPECT_EQ(none.threshold, static_cast<std::int64_t>(max_abs_mantissa(s.x)));

  const OutlierSplit all = outlier_split(s.x, OutlierPolicy{OutlierRule::TopK, 1e9});
  expect_valid_split(s.x, all, {});
  EXPECT_EQ(all.outliers(), s.x.numel());
  EXPECT_EQ(all.fraction(), 1.0);

  const Tensor z({8, 8}, Format::fixed(16), -3);
  for (const OutlierPolicy& p : {OutlierPolicy{OutlierRule::SpreadMultiple, 5.0}, OutlierPolicy{OutlierRule::Percentile, 99.0},
                                 OutlierPolicy{OutlierRule::TopK, 0.0}}) {
    const OutlierSplit zs = outlier_split(z, p);
    expect_valid_split(z, zs, {});
    EXPECT_TRUE(zs.index.empty());
    EXPECT_EQ(zs.exponent(), -3);
  }
  // top:all of a zero tensor: every element is listed, with zero pieces.
  const OutlierSplit zall = outlier_split(z, OutlierPolicy{OutlierRule::TopK, 64.0});
  expect_valid_split(z, zall, {});
  EXPECT_EQ(zall.outliers(), 64);
}

TEST(OutlierSplitTest, WideRangeCoarsensTheBulkInsteadOfClipping) {
  // Bulk of +-1 with outliers at 32767: tau = 5 rms is tiny, but 32767 does
  // not fit 2^14 - 1 at that exponent, so the shift follows max|x|.
  Tensor x({8, 16}, Format::fixed(16), 0);
  std::int16_t* p = x.data<std::int16_t>();
  for (int i = 0; i < 128; ++i) p[i] = static_cast<std::int16_t>(i % 2 ? 1 : -1);
  p[17] = 32767;
  p[90] = -32767;
  const OutlierSplit s = outlier_split(x, OutlierPolicy{OutlierRule::TopK, 2.0});
  expect_valid_split(x, s, {});
  EXPECT_TRUE(s.range_limited);
  EXPECT_EQ(s.exponent(), 2);  // ceil(32767 / 4) = 8192 <= 16383 < ceil(32767 / 2)
  EXPECT_EQ(s.index, (std::vector<std::int64_t>{17, 90}));
}

TEST(OutlierSplitTest, StochasticSplitIsUnbiasedBoundedAndThreadIndependent) {
  const Source s = make_source(96, 80, Plant::Spread, 9, 40.0, 3000, 32767, 50, Rounding::Stochastic);
  const RngKey key(42, 7);
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  const OutlierSplit one = outlier_split(s.x, OutlierPolicy{}, key);
  omp_set_num_threads(2);
  const OutlierSplit two = outlier_split(s.x, OutlierPolicy{}, key);
  omp_set_num_threads(threads);
  expect_valid_split(s.x, one, key);
  EXPECT_EQ(one.index, two.index);
  EXPECT_EQ(one.high, two.high);
  ASSERT_EQ(0, std::memcmp(one.bulk.raw(), two.bulk.raw(), one.bulk.nbytes()));
}

// ---- tiled product --------------------------------------------------------

Tensor merged_or_plain(const TiledOperand& t) { return t.is_split() ? t.split().merged() : t.dense(); }

// Every way of adding the outlier terms (tiles, outlier by outlier, and the
// cost model's pick) must give the reference bit for bit.
void expect_tiled_exact(const TiledOperand& A, const TiledOperand& B, Trans ta, Trans tb) {
  const Tensor R = matmul_reference(merged_or_plain(A), merged_or_plain(B), ta, tb);
  for (OutlierProduct how : {OutlierProduct::Cheapest, OutlierProduct::Tiles, OutlierProduct::OneByOne}) {
    SCOPED_TRACE(A.dense().describe() + (A.is_split() ? " split" : "") + (ta == Trans::T ? "ᵀ" : "") + " x " +
                 B.dense().describe() + (B.is_split() ? " split" : "") + (tb == Trans::T ? "ᵀ" : "") + " how " +
                 std::to_string(static_cast<int>(how)));
    const Tensor C = matmul_tiled(A, B, ta, tb, how);
    ASSERT_EQ(C.shape(), R.shape());
    EXPECT_EQ(C.format(), R.format());
    EXPECT_EQ(C.exponent(), A.exponent() + B.exponent());
    std::int64_t bad = 0;
    for (std::int64_t i = 0; i < C.numel(); ++i) {
      if (C.mantissa(i) != R.mantissa(i) && ++bad <= 5)
        ADD_FAILURE() << "element " << i << ": tiled " << C.mantissa(i) << ", reference " << R.mantissa(i);
    }
    EXPECT_EQ(bad, 0);
  }
}

// A source stored so that op(X) (with transpose t) is rows x cols, with the
// planted pattern in op(X)'s row or column.
Source make_op_source(std::int64_t rows, std::int64_t cols, Trans t, Plant p, std::uint64_t seed) {
  if (t == Trans::N) return make_source(rows, cols, p, seed);
  const Plant q = p == Plant::OneRow ? Plant::OneCol : p == Plant::OneCol ? Plant::OneRow : p;
  return make_source(cols, rows, q, seed);
}

TEST(MatmulTiled, SplitLeftTimesPlainEveryLayout) {
  const std::int64_t M = 40, K = 56, N = 24;
  for (Trans ta : {Trans::N, Trans::T})
    for (Trans tb : {Trans::N, Trans::T})
      for (Plant p : {Plant::OneRow, Plant::OneCol, Plant::Spread, Plant::None})
        for (int bits : {8, 16}) {
          const Source a = make_op_source(M, K, ta, p, 100 + static_cast<int>(p));
          const OutlierSplit sa = outlier_split(a.x, OutlierPolicy{});
          const Tensor B = random_int(tb == Trans::N ? Shape{K, N} : Shape{N, K}, Format::fixed(bits), 5, testing::Fill::Uniform, -9);
          expect_tiled_exact(sa, B, ta, tb);
        }
}

TEST(MatmulTiled, PlainTimesSplitRightEveryLayout) {
  const std::int64_t M = 36, K = 44, N = 52;
  for (Trans ta : {Trans::N, Trans::T})
    for (Trans tb : {Trans::N, Trans::T})
      for (Plant p : {Plant::OneRow, Plant::OneCol, Plant::Spread})
        for (int bits : {8, 16}) {
          const Source b = make_op_source(K, N, tb, p, 200 + static_cast<int>(p));
          const OutlierSplit sb = outlier_split(b.x, OutlierPolicy{});
          const Tensor A = random_int(ta == Trans::N ? Shape{M, K} : Shape{K, M}, Format::fixed(bits), 6, testing::Fill::Extremes, 3);
          expect_tiled_exact(A, sb, ta, tb);
        }
}

TEST(MatmulTiled, SplitTimesSplitIncludingOutlierOverlaps) {
  // The weight-gradient shape Xᵀ·dY (K = tokens) and the others, with both
  // operands split; planted rows/columns meet, so outlier x outlier terms
  // (shift 14) are exercised. K = 1100 makes the result int64.
  for (std::int64_t K : {64, 1100})
    for (Trans ta : {Trans::N, Trans::T})
      for (Trans tb : {Trans::N, Trans::T})
        for (Plant pa : {Plant::OneRow, Plant::OneCol, Plant::Spread})
          for (Plant pb : {Plant::OneRow, Plant::OneCol, Plant::Spread}) {
            const Source a = make_op_source(24, K, ta, pa, 300 + K);
            const Source b = make_op_source(K, 20, tb, pb, 400 + K);
            expect_tiled_exact(outlier_split(a.x, OutlierPolicy{}), outlier_split(b.x, OutlierPolicy{}), ta, tb);
          }
}

TEST(MatmulTiled, AllOutliersAndZeroTensors) {
  const Source a = make_source(12, 20, Plant::Spread, 21, 40.0, 3000, 32767, 30);
  const Source b = make_source(20, 9, Plant::OneCol, 22);
  const OutlierSplit all_a = outlier_split(a.x, OutlierPolicy{OutlierRule::TopK, 1e9});
  const OutlierSplit all_b = outlier_split(b.x, OutlierPolicy{OutlierRule::TopK, 1e9});
  expect_tiled_exact(all_a, all_b, Trans::N, Trans::N);
  const Tensor z({20, 9}, Format::fixed(16), 0);
  const OutlierSplit zs = outlier_split(z, OutlierPolicy{});
  expect_tiled_exact(all_a, zs, Trans::N, Trans::N);
  const Tensor C = matmul_tiled(outlier_split(Tensor({12, 20}, Format::fixed(16)), OutlierPolicy{}), zs);
  for (std::int64_t i = 0; i < C.numel(); ++i) ASSERT_EQ(C.mantissa(i), 0);
}

TEST(MatmulTiled, Int32ResultAtTheEdgeUsesModularSums) {
  // Every element an outlier of value 16383 (high 127, low 127) times int8
  // 127 over K = 1032: 1032 · 16383 · 127 = 2,147,221,512 < 2^31, so the
  // result is int32, while the shifted outlier term alone
  // (1032 · 127 · 127 · 2^7 = 2.1e9, plus the bulk) is summed modulo 2^32.
  const std::int64_t K = 1032;
  Tensor x({3, K}, Format::fixed(16), 0);
  std::int16_t* p = x.data<std::int16_t>();
  for (std::int64_t i = 0; i < x.numel(); ++i) p[i] = static_cast<std::int16_t>(i % 2 ? 16383 : -16383);
  const OutlierSplit s = outlier_split(x, OutlierPolicy{OutlierRule::TopK, 1e9});
  ASSERT_EQ(s.exponent(), 0);
  const Tensor B = random_int({K, 5}, Format::fixed(8), 1, testing::Fill::Max);
  const Tensor C = matmul_tiled(s, B);
  EXPECT_EQ(C.format(), Format::accumulator(32));
  expect_tiled_exact(s, B, Trans::N, Trans::N);
}

// A 2-D source of `batch` stacked matrices, as a rank-3 batch.
Tensor as_batch(const Tensor& x, std::int64_t batch) {
  Tensor t({batch, x.rows() / batch, x.cols()}, x.format(), x.exponent());
  std::memcpy(t.raw(), x.raw(), static_cast<std::size_t>(x.nbytes()));
  return t;
}

TEST(MatmulTiled, EveryOutlierFindsItsLineAtAwkwardWidths) {
  // The outlier terms find an outlier's row and column from its flat index
  // through a double reciprocal and one correction step. Widths such as 49
  // (49 · fl(1/49) < 1) and 3 are where the reciprocal alone lands one low
  // on exact multiples; with every element an outlier, each index is used,
  // rank 2 and batched (a line over the batch is divided by the rows too).
  for (const std::int64_t w : {3, 7, 49, 97}) {
    const Source a = make_source(2 * w, w, Plant::None, 40 + w);
    const OutlierSplit sa = outlier_split(a.x, OutlierPolicy{OutlierRule::TopK, 1e9});
    ASSERT_EQ(sa.outliers(), a.x.numel());
    for (Trans ta : {Trans::N, Trans::T})
      for (Trans tb : {Trans::N, Trans::T}) {
        const std::int64_t K = ta == Trans::N ? w : 2 * w;
        const Tensor B = random_int(tb == Trans::N ? Shape{K, 5} : Shape{5, K}, Format::fixed(8), 9, testing::Fill::Uniform, -2);
        const std::int64_t Kr = tb == Trans::N ? 2 * w : w;  // op(sa) on the right is Kr x (the other)
        const Tensor A = random_int(ta == Trans::N ? Shape{5, Kr} : Shape{Kr, 5}, Format::fixed(8), 10, testing::Fill::Uniform, 1);
        expect_tiled_exact(sa, B, ta, tb);
        expect_tiled_exact(A, sa, ta, tb);
      }
    const Tensor ab = as_batch(a.x, 2);  // 2 matrices of w x w
    const OutlierSplit sb = outlier_split(ab, OutlierPolicy{OutlierRule::TopK, 1e9});
    const Tensor b8 = random_int({2, w, 4}, Format::fixed(8), 11, testing::Fill::Uniform, 0);
    const Tensor a8 = random_int({2, 4, w}, Format::fixed(8), 12, testing::Fill::Uniform, 0);
    for (Trans t : {Trans::N, Trans::T}) {
      expect_tiled_exact(sb, b8, t, Trans::N);
      expect_tiled_exact(a8, sb, Trans::N, t);
    }
  }
}

TEST(MatmulTiled, BatchedEveryLayoutAndMix) {
  // Rank-3 operands (attention's products), every transpose, split x plain,
  // plain x split and split x split. Planted in one storage row (one matrix
  // of the batch), one storage column (every matrix) or spread, and none.
  // K = 12: split x split needs an int64 result (16383^2 · 12 > 2^31),
  // split x int8 an int32 one.
  const std::int64_t batch = 3, M = 20, K = 12, N = 16;
  for (Trans ta : {Trans::N, Trans::T})
    for (Trans tb : {Trans::N, Trans::T})
      for (Plant p : {Plant::OneRow, Plant::OneCol, Plant::Spread, Plant::None}) {
        const std::int64_t ar = ta == Trans::N ? M : K, ac = ta == Trans::N ? K : M;
        const std::int64_t br = tb == Trans::N ? K : N, bc = tb == Trans::N ? N : K;
        const Tensor a = as_batch(make_source(batch * ar, ac, p, 500 + static_cast<int>(p)).x, batch);
        const Tensor b = as_batch(make_source(batch * br, bc, p, 600 + static_cast<int>(p)).x, batch);
        const OutlierSplit sa = outlier_split(a, OutlierPolicy{}), sb = outlier_split(b, OutlierPolicy{});
        const Tensor a8 = random_int({batch, ar, ac}, Format::fixed(8), 7, testing::Fill::Extremes, 2);
        const Tensor b8 = random_int({batch, br, bc}, Format::fixed(8), 8, testing::Fill::Uniform, -3);
        expect_tiled_exact(sa, b8, ta, tb);
        expect_tiled_exact(a8, sb, ta, tb);
        expect_tiled_exact(sa, sb, ta, tb);
        expect_tiled_exact(sa, b, ta, tb);  // a plain 16-bit operand
      }
}

TEST(MatmulTiled, WithinTheRoundingBoundOfTheSourceProduct) {
  // The tiled product of two splits against the exact product of the 16-bit
  // sources: each element of a split is within 2^(e-1) of its source (round
  // to nearest), so |C - A·B| <= sum_k (dA|B| + |A|dB + dA·dB) per entry.
  const Source a = make_source(32, 64, Plant::OneCol, 31);
  const Source b = make_source(64, 16, Plant::Spread, 32, 40.0, 3000, 32767, 25);
  const OutlierSplit sa = outlier_split(a.x, OutlierPolicy{}), sb = outlier_split(b.x, OutlierPolicy{});
  const Tensor C = matmul_tiled(sa, sb);
  const double da = std::ldexp(0.5, sa.exponent()), db = std::ldexp(0.5, sb.exponent());
  for (std::int64_t m = 0; m < 32; ++m)
    for (std::int64_t n = 0; n < 16; ++n) {
      double exact = 0, bound = 0;
      for (std::int64_t k = 0; k < 64; ++k) {
        const double x = a.x.value(m * 64 + k), y = b.x.value(k * 16 + n);
        exact += x * y;
        bound += da * std::abs(y) + std::abs(x) * db + da * db;
      }
      EXPECT_LE(std::abs(C.value(m * 16 + n) - exact), bound) << m << "," << n;
    }
}

}  // namespace
}  // namespace intrain
