#include "layers/linear.h"

#include <stdexcept>

#include "core/matmul.h"
#include "core/ops.h"

namespace intrain {

OutlierSplit Linear::split(const Tensor& t, char role, RngKey key) {
  OutlierSplit s = outlier_split(t, tiling_.policy, key.derive(role == 'a' ? 0xA0 : 0xE0));
  outliers_ += s.outliers();
  split_elements_ += t.numel();
  if (observer_) observer_(w_->name, role, t, s);
  return s;
}

Tensor Linear::forward(const Tensor& x, const Format& out, RngKey key) {
  if (x.cols() != w_->value.rows()) {
    throw std::invalid_argument("Linear " + w_->name + ": input " + x.describe() + " does not match weight " +
                                w_->value.describe());
  }
  if (tiling_.a && x.format().is_integer()) {
    sx_ = split(x, 'a', key);
    x_ = Tensor();
    return bias_add(matmul_tiled(sx_, w_->value), &b_->value, out, key);
  }
  x_ = x;
  return bias_add(matmul(x, w_->value), &b_->value, out, key);
}

Tensor Linear::backward(const Tensor& dy, RngKey key) {
  const bool a_split = sx_.bulk.rank() > 0;  // forward saved a split
  const bool e_split = tiling_.e && dy.format().is_integer();
  Tensor dx;
  if (a_split || e_split) {
    OutlierSplit sd;
    if (e_split) sd = split(dy, 'e', key);
    const TiledOperand x_op = a_split ? TiledOperand(sx_) : TiledOperand(x_);
    const TiledOperand dy_op = e_split ? TiledOperand(sd) : TiledOperand(dy);
    w_->accumulate(matmul_tiled(x_op, dy_op, Trans::T, Trans::N));  // dW = xᵀ·dy  [in, out]
    b_->accumulate(sum_rows(dy));                                     // db = Σ_rows dy
    dx = matmul_tiled(dy_op, w_->value, Trans::N, Trans::T);          // dx = dy·Wᵀ  [R, in]
  } else {
    w_->accumulate(matmul(x_, dy, Trans::T, Trans::N));  // dW = xᵀ·dy  [in, out]
    b_->accumulate(sum_rows(dy));                        // db = Σ_rows dy
    dx = matmul(dy, w_->value, Trans::N, Trans::T);      // dx = dy·Wᵀ  [R, in]
  }
  x_ = Tensor();
  sx_ = OutlierSplit();
  return dx;
}

}  // namespace intrain
