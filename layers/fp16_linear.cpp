#include "layers/fp16_linear.h"

#include <stdexcept>

#include "core/matmul.h"
#include "core/ops.h"

namespace intrain {

Fp16Linear::Fp16Linear(std::string name, const Tensor& w, const Param* bias)
    : name_(std::move(name)), in_(w.rows()), out_(w.cols()), b_(bias) {
  if (w.rank() != 2 || w.dtype() != DType::F32) {
    throw std::invalid_argument("Fp16Linear " + name_ + ": needs an fp32 matrix, got " + w.describe());
  }
  w_ = narrow_to_half({w.data<float>(), static_cast<std::size_t>(w.numel())}, name_ + ".weight");
}

Tensor Fp16Linear::widened() const {
  Tensor w = Tensor::uninitialized({in_, out_}, Format::fp32());
  widen_half(w_, w.data<float>());
  return w;
}

Tensor Fp16Linear::forward(const Tensor& x, const Format& out, RngKey key) {
  if (x.dtype() != DType::F32 || x.cols() != in_) {
    throw std::invalid_argument("Fp16Linear " + name_ + ": needs fp32 input with " + std::to_string(in_) +
                                " columns, got " + x.describe());
  }
  return bias_add(matmul(x, widened()), b_ ? &b_->value : nullptr, out, key);
}

Tensor Fp16Linear::backward(const Tensor&, RngKey) {
  throw std::logic_error("Fp16Linear " + name_ + ": forward-only (a teacher layer); it has no backward");
}

}  // namespace intrain
