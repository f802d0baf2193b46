// Outlier-aware int8: a dense int8 bulk at a fine exponent plus a sparse int8
// outlier part at a 2^7 coarser one, and a matmul that multiplies it exactly
// with int8 products only. The derivation and the proofs are in
// docs/outliers.md.
//
// Representation (OutlierSplit). For a source tensor x (mantissas of at most
// 16 bits, exponent e_x) and a threshold tau chosen by an OutlierPolicy:
//
//   v_i  = round(x_i / 2^s)           one rounding per element, to the grid 2^e,
//                                     e = e_x + s (the bulk exponent)
//   v_i  = bulk_i + 2^7 · high_i      exactly, for every element
//   x_i ≈ 2^e · bulk_i + 2^(e+7) · high_i     (s_in = 2^e, s_out = 2^(e+7))
//
// with
//   * bulk   dense int8 in [-127, 127]: the value itself for an ordinary
//            element, the low piece v - 2^7·high for an outlier;
//   * high   int8 in [-127, 127], one per outlier, stored sparse by flat
//            index (ascending); zero for every other element.
//
// The shift s is the smallest that maps tau into the int8 range and the
// largest element into the two-piece range:
//   s = max(shift_for_max(tau, 127), shift_for_max(max|x|, kSplitQmax)),
// so no element ever saturates: ordinary ones have |v| <= 127, outliers
// |v| <= kSplitQmax = 127·2^7 + 127 = 2^14 - 1, and every such v is exactly
// high·2^7 + low with both pieces in [-127, 127] (high = v rounded to a
// multiple of 2^7 and clamped to ±127; the remainder then has |low| <= 127).
// The only error is the single rounding of x to the grid 2^e: at most 2^(e-1)
// (round to nearest) or below 2^e (stochastic, unbiased). When the range of
// x exceeds 2^14 times the threshold, s grows with max|x| instead of tau: the
// bulk gets coarser and nothing clips (`range_limited` says so).
//
// Every element's value is thus a 15-bit signed mantissa: the split behaves,
// for result widths, as Format::fixed(15) at exponent e.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/matmul.h"
#include "core/rng.h"
#include "core/tensor.h"

namespace intrain {

inline constexpr int kOutlierShift = 7;                                   // s_out / s_in = 2^7
inline constexpr std::int64_t kSplitQmax = 127 * (1 << kOutlierShift) + 127;  // 16383

// Which elements are outliers.
enum class OutlierRule : std::uint8_t {
  SpreadMultiple,  // |x| > gamma · rms(x)       (the research's fixed threshold, gamma = 5)
  Percentile,      // |x| > the p-th percentile of |x| (nearest rank)
  TopK,            // exactly the k largest |x|; ties go to the lowest flat index
};

struct OutlierPolicy {
  OutlierRule rule = OutlierRule::SpreadMultiple;
  double value = 5.0;  // gamma >= 0; p in [0, 100]; k >= 0 (an element count)

  // "5" or "rms:5" (gamma = 5), "pct:99.9", "top:64". Throws
  // std::invalid_argument naming `flag`, the spelling and the accepted forms.
  static OutlierPolicy parse(const std::string& spec, const std::string& flag = "--outlier-threshold");
  std::string name() const;  // the canonical spelling, "rms:5"
  friend bool operator==(const OutlierPolicy&, const OutlierPolicy&) = default;
};

// The split of one tensor. Owns its data; rank and shape are the source's.
struct OutlierSplit {
  Tensor bulk;                       // Format::fixed(8), exponent e
  std::vector<std::int64_t> index;   // flat indices of the outliers, ascending
  std::vector<std::int8_t> high;     // high piece of each outlier (weight 2^(e+7))
  // Each outlier's storage row, counted over the batch (index / cols), and
  // column (index % cols): found once here, so that the tiled products, each
  // of which groups the outliers by rows or by columns, never divide.
  std::vector<std::int64_t> row, col;
  std::int64_t threshold = 0;        // tau, in units of the source mantissa
  std::uint64_t source_max = 0;      // max |x| of the source mantissas
  int source_exponent = 0;
  bool range_limited = false;        // s was set by max|x|, not by tau (see above)

  int exponent() const { return bulk.exponent(); }
  std::int64_t outliers() const { return static_cast<std::int64_t>(index.size()); }
  double fraction() const { return bulk.numel() ? static_cast<double>(index.size()) / static_cast<double>(bulk.numel()) : 0.0; }
  // v = bulk + 2^7·high as a Format::fixed(15) int16 tensor at exponent e:
  // the exact value of the split, for references and tests.
  Tensor merged() const;
};

// Splits a signed fixed-point tensor of at most 16 bits. Rounds per
// x.format().rounding(), stochastic bits from key.bits(flat index).
// Deterministic: the result does not depend on the thread count.
OutlierSplit outlier_split(const Tensor& x, const OutlierPolicy& policy, RngKey key = {});

// The r-th largest |x| (r in [1, numel]) of an int8/int16 tensor, exact
// (two-level radix select). Used by the Percentile and TopK rules and by the
// statistics (median magnitude).
std::int64_t kth_largest_abs(const Tensor& x, std::int64_t r);

// ---------------------------------------------------------------------------
// Tiled matmul
// ---------------------------------------------------------------------------

// One operand: a plain integer tensor (int8..int16 fixed point) or a split.
class TiledOperand {
 public:
  TiledOperand(const Tensor& t) : plain_(&t) {}               // NOLINT: implicit by design
  TiledOperand(const OutlierSplit& s) : split_(&s) {}         // NOLINT
  bool is_split() const { return split_ != nullptr; }
  const Tensor& dense() const { return split_ ? split_->bulk : *plain_; }  // the plain tensor or the bulk
  const OutlierSplit& split() const { return *split_; }
  Format value_format() const;  // fixed(15) for a split, else the tensor's format
  int exponent() const { return dense().exponent(); }

 private:
  const Tensor* plain_ = nullptr;
  const OutlierSplit* split_ = nullptr;
};

// C = op(A)·op(B) for rank-2 (or rank-3, batched) operands, exact: equal bit for bit to
// matmul_reference() of the merged() operands. Result: exponent eA + eB,
// format matmul_result_format(A.value_format(), B.value_format(), K).
//
// Cost: one dense int8 product of the two bulks, plus, per split operand,
// one product restricted to the tiles that hold its outliers: either the
// rows (columns) of op(A) (op(B)) that hold one, or the slices of K that
// do, whichever touches fewer multiply-adds. Each is a small dense oneDNN
// product (through matmul(), so the K chunking and modular sums of
// core/matmul.cpp apply), scatter-added with a shift of 7 (14 for
// outlier × outlier) in the result's width.
//
// Rank-3 operands are batches of matrices (attention's products), with the
// same contract: one batched int8 product of the bulks, then the outlier
// terms added outlier by outlier (cost: outliers of A times N plus outliers
// of B times M), since tiles gathered per matrix would cost one oneDNN call
// per matrix.
//
// Thinly spread outliers (at 1% almost every row and column holds one) make
// every tile the whole matrix; there the outlier terms are added outlier by
// outlier instead (cost: outliers times the other dimension, vectorised
// along rows). Rank-2 products take, per split operand, whichever of the
// three is cheaper by a cost model (`how` = Cheapest); tests force each.
enum class OutlierProduct : std::uint8_t { Cheapest, Tiles, OneByOne };
Tensor matmul_tiled(const TiledOperand& A, const TiledOperand& B, Trans ta = Trans::N, Trans tb = Trans::N,
                    OutlierProduct how = OutlierProduct::Cheapest);

}  // namespace intrain

namespace intrain {

// Which matmul operands of the linear layers and of attention are split
// (--outlier-tiling), and by which rule (--outlier-threshold). Attention:
// role A splits q, k, v and P, role E splits dY and dS (layers/gpt.cpp). Roles: A, the layer inputs
// (forward, and the weight gradient's left operand); E, the errors dY
// (backward: dX and the weight gradient's right operand). The producers of
// those operands then write 16 bits (the split's source); everything else
// keeps the run's formats.
struct OutlierTiling {
  bool a = false, e = false;
  OutlierPolicy policy;

  bool any() const { return a || e; }
  // roles: "" (off), "a", "e", "a,e" or "e,a". Throws std::invalid_argument
  // naming the flag for a bad role list or threshold.
  static OutlierTiling parse(const std::string& roles, const std::string& threshold);
  std::string name() const;  // "" when off, else "tile-ae@rms:5"
  static OutlierTiling parse_name(const std::string& name);  // the inverse of name(), for checkpoints
};

}  // namespace intrain
