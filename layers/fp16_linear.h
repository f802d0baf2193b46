// A frozen, forward-only linear layer whose weight is held in IEEE binary16:
//   y = x·W₁₆ + b,   W₁₆ = fp16(W), rounded to nearest even once, at construction.
// It is the LREC teacher's storage option (`lrec --teacher-storage fp16`,
// experiments/checkpoint.h's LoadMode::linears_fp16):
// 2 bytes per weight instead of the 4 of fp32, as INT2.1's fp16 teachers.
//
// forward() widens W₁₆ into a transient fp32 matrix (exact) and runs the same
// fp32 matmul and bias add as Linear, so its output is bit-identical to a
// Linear whose weight is the widened W₁₆. It saves nothing: there is no
// backward (a teacher only runs forward), and calling it is a logic error.
// The bias stays fp32 and is read, never updated; it must outlive the layer.
#pragma once

#include <string>
#include <vector>

#include "core/fp16.h"
#include "layers/linear.h"

namespace intrain {

class Fp16Linear : public LinearLayer {
 public:
  // w: fp32 [in, out]. Throws std::range_error naming the weight if an
  // element does not fit binary16.
  Fp16Linear(std::string name, const Tensor& w, const Param* bias);

  Tensor forward(const Tensor& x, const Format& out, RngKey key) override;
  Tensor backward(const Tensor& dy, RngKey key) override;

  Tensor widened() const;  // W₁₆ as fp32 [in, out]
  std::int64_t bytes() const { return static_cast<std::int64_t>(w_.size() * sizeof(HalfBits)); }
  const std::string& name() const { return name_; }

 private:
  std::string name_;
  std::int64_t in_, out_;
  std::vector<HalfBits> w_;  // row-major [in, out]
  const Param* b_;
};

}  // namespace intrain
