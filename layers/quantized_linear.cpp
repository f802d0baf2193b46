#include "layers/quantized_linear.h"

#include <stdexcept>

#include "core/ops.h"
#include "core/packed_matmul.h"

namespace intrain {

QuantizedLinear::QuantizedLinear(std::string name, PackedWeights weights, const Param* bias,
                                 std::optional<SalientWeights> salient)
    : name_(std::move(name)), w_(std::move(weights)), s_(std::move(salient)), b_(bias) {
  if (s_ && (s_->K() != w_.K() || s_->N() != w_.N())) {
    throw std::invalid_argument("QuantizedLinear " + name_ + ": salient part [" + std::to_string(s_->K()) + ", " +
                                std::to_string(s_->N()) + "] does not match the weight");
  }
  if (b_ && b_->value.numel() != w_.N()) {
    throw std::invalid_argument("QuantizedLinear " + name_ + ": bias " + b_->value.describe() + " does not match " +
                                std::to_string(w_.N()) + " output features");
  }
}

Tensor QuantizedLinear::forward(const Tensor& x, const Format& out, RngKey key) {
  if (x.cols() != w_.K()) {
    throw std::invalid_argument("QuantizedLinear " + name_ + ": input " + x.describe() + " does not match the weight [" +
                                std::to_string(w_.K()) + ", " + std::to_string(w_.N()) + "]");
  }
  backward_key_ = key.derive(0xBAC);  // a stream of its own for the backward's rounding
  has_forward_ = true;
  Tensor y = packed_matmul(x, w_);
  if (s_) salient_matmul_add(y, x, *s_);
  return bias_add(y, b_ ? &b_->value : nullptr, out, key);
}

Tensor QuantizedLinear::backward(const Tensor& dy, RngKey /*key*/) {
  if (!has_forward_) throw std::logic_error("QuantizedLinear " + name_ + ": backward without a forward pass");
  has_forward_ = false;
  Tensor dx = packed_matmul_t(dy, w_, backward_key_);  // dx = dy·Ŵᵀ; nothing else: the base is frozen
  if (s_) salient_matmul_t_add(dx, dy, *s_);
  return dx;
}

}  // namespace intrain
