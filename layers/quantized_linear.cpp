#include "layers/quantized_linear.h"

#include <stdexcept>

#include "core/ops.h"
#include "core/packed_matmul.h"

namespace intrain {

QuantizedLinear::QuantizedLinear(std::string name, PackedWeights weights, const Param* bias)
    : name_(std::move(name)), w_(std::move(weights)), b_(bias) {
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
  return bias_add(packed_matmul(x, w_), b_ ? &b_->value : nullptr, out, key);
}

Tensor QuantizedLinear::backward(const Tensor& dy, RngKey /*key*/) {
  if (!has_forward_) throw std::logic_error("QuantizedLinear " + name_ + ": backward without a forward pass");
  has_forward_ = false;
  return packed_matmul_t(dy, w_, backward_key_);  // dx = dy·Ŵᵀ; nothing else: the base is frozen
}

}  // namespace intrain
