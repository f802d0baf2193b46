#include "layers/linear.h"

#include <stdexcept>

#include "core/matmul.h"
#include "core/ops.h"

namespace intrain {

Tensor Linear::forward(const Tensor& x, const Format& out, RngKey key) {
  if (x.cols() != w_->value.rows()) {
    throw std::invalid_argument("Linear " + w_->name + ": input " + x.describe() + " does not match weight " +
                                w_->value.describe());
  }
  x_ = x;
  return bias_add(matmul(x, w_->value), &b_->value, out, key);
}

Tensor Linear::backward(const Tensor& dy) {
  w_->accumulate(matmul(x_, dy, Trans::T, Trans::N));  // dW = xᵀ·dy  [in, out]
  b_->accumulate(sum_rows(dy));                        // db = Σ_rows dy
  Tensor dx = matmul(dy, w_->value, Trans::N, Trans::T);  // dx = dy·Wᵀ  [R, in]
  x_ = Tensor();
  return dx;
}

}  // namespace intrain
