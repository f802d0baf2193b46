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

// What a model needs from any linear layer: a plain trainable Linear, a
// frozen QuantizedLinear (layers/quantized_linear.h), or a wrapper that
// observes its inputs (GPTQ calibration). Calls are per layer, not per element.
class LinearLayer {
 public:
  virtual ~LinearLayer() = default;
  // x must already be in the activation format (its 16-bit source when the
  // layer tiles A). Returns x·W + b cast to `out`; `key` keys its roundings.
  virtual Tensor forward(const Tensor& x, const Format& out, RngKey key) = 0;
  // dy must already be in the error format (its 16-bit source when the layer
  // tiles E; `key` keys the split's rounding). Accumulates whatever parameter
  // gradients the layer has and returns dx as an exact accumulator (or float).
  virtual Tensor backward(const Tensor& dy, RngKey key) = 0;

  // Outlier tiling statistics: outliers and elements split since the last
  // reset (numerator and denominator of the outlier fraction). Layers that
  // never split report zeros.
  virtual std::int64_t outliers() const { return 0; }
  virtual std::int64_t split_elements() const { return 0; }
  virtual void reset_counts() {}
  virtual void set_observer(SplitObserver) {}
  // Frees what forward() saved for backward() (an evaluation pass).
  virtual void drop_saved() {}
};

class Linear : public LinearLayer {
 public:
  Linear(Param* w, Param* b, OutlierTiling tiling = {}) : w_(w), b_(b), tiling_(tiling) {}

  Tensor forward(const Tensor& x, const Format& out, RngKey key) override;
  // Accumulates dW and db into the parameters.
  Tensor backward(const Tensor& dy, RngKey key) override;

  std::int64_t outliers() const override { return outliers_; }
  std::int64_t split_elements() const override { return split_elements_; }
  void reset_counts() override { outliers_ = split_elements_ = 0; }
  void set_observer(SplitObserver f) override { observer_ = std::move(f); }
  void drop_saved() override {
    x_ = Tensor();
    sx_ = OutlierSplit();
  }

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
