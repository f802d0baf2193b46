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

class Linear {
 public:
  Linear(Param* w, Param* b) : w_(w), b_(b) {}

  // x must already be in the activation format. Returns x·W + b cast to `out`.
  Tensor forward(const Tensor& x, const Format& out, RngKey key);
  // dy must already be in the error format. Accumulates dW and db into the
  // parameters and returns dx as an exact accumulator (or float).
  Tensor backward(const Tensor& dy);

 private:
  Param* w_;
  Param* b_;
  Tensor x_;
};

}  // namespace intrain
