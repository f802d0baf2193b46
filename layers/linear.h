// Linear layer with bias, in the Hugging Face GPT-2 (Conv1D) layout:
//   y = x · W + b,  x [R, in], W [in, out], b [out]
// backward:
//   dx = dy · Wᵀ,  dW = xᵀ · dy,  db = sum_rows dy
// Forward saves x, in the activation format (int8 mantissas in an int8 run):
// exactly what dW needs and nothing more.
#pragma once

#include "core/rng.h"
#include "layers/param.h"

namespace intrain {

// What a model needs from any linear layer: a plain trainable Linear, a
// frozen QuantizedLinear (layers/quantized_linear.h), or a wrapper that
// observes its inputs (GPTQ calibration). Calls are per layer, not per element.
class LinearLayer {
 public:
  virtual ~LinearLayer() = default;
  // x must already be in the activation format. Returns x·W + b cast to `out`.
  virtual Tensor forward(const Tensor& x, const Format& out, RngKey key) = 0;
  // dy must already be in the error format. Accumulates whatever parameter
  // gradients the layer has and returns dx as an exact accumulator (or float).
  virtual Tensor backward(const Tensor& dy) = 0;
};

class Linear : public LinearLayer {
 public:
  Linear(Param* w, Param* b) : w_(w), b_(b) {}

  Tensor forward(const Tensor& x, const Format& out, RngKey key) override;
  // Accumulates dW and db into the parameters.
  Tensor backward(const Tensor& dy) override;

 private:
  Param* w_;
  Param* b_;
  Tensor x_;
};

}  // namespace intrain
