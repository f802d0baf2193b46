// Linear layer with bias, in the Hugging Face GPT-2 (Conv1D) layout:
//   y = x · W + b,  x [R, in], W [in, out], b [out]
// backward:
//   dx = dy · Wᵀ,  dW = xᵀ · dy,  db = sum_rows dy
// Forward saves x, in the activation format (int8 mantissas in an int8 run):
// exactly what dW needs and nothing more.
//
// Outlier tiling (core/outliers.h): with tiling.a the layer splits x (a
// 16-bit source) into an int8 bulk and sparse int8 outliers and saves the
// split; with tiling.e it splits dy. The products then run through
// matmul_tiled(): int8 products only, exact for the split values.
#pragma once

#include <functional>
#include <string>

#include "core/outliers.h"
#include "core/rng.h"
#include "layers/param.h"

namespace intrain {

// Called with (weight name, role 'a' or 'e', the 16-bit source, its split)
// for every split a layer makes; for statistics (analysis/outlier_stats).
using SplitObserver = std::function<void(const std::string&, char, const Tensor&, const OutlierSplit&)>;

class Linear {
 public:
  Linear(Param* w, Param* b, OutlierTiling tiling = {}) : w_(w), b_(b), tiling_(tiling) {}

  // x must already be in the activation format (its 16-bit source when A is
  // tiled). Returns x·W + b cast to `out`. `key` also keys the split's rounding.
  Tensor forward(const Tensor& x, const Format& out, RngKey key);
  // dy must already be in the error format (its 16-bit source when E is
  // tiled; `key` keys the split's rounding). Accumulates dW and db into the
  // parameters and returns dx as an exact accumulator (or float).
  Tensor backward(const Tensor& dy, RngKey key = {});

  // Outliers and elements split since the last reset (numerator and
  // denominator of the outlier fraction).
  std::int64_t outliers() const { return outliers_; }
  std::int64_t split_elements() const { return split_elements_; }
  void reset_counts() { outliers_ = split_elements_ = 0; }
  void set_observer(SplitObserver f) { observer_ = std::move(f); }

 private:
  OutlierSplit split(const Tensor& t, char role, RngKey key);

  Param* w_;
  Param* b_;
  OutlierTiling tiling_;
  Tensor x_;
  OutlierSplit sx_;  // the saved input when A is tiled
  std::int64_t outliers_ = 0, split_elements_ = 0;
  SplitObserver observer_;
};

}  // namespace intrain
