// A frozen linear layer whose weight stays bit-packed (INT2.1's EMEF):
//   y = x·Ŵ + b,   dx = dy·Ŵᵀ,
// with Ŵ the group-quantized weight of core/packed_weights.h. Both passes run
// tile by tile from the packed codes (core/packed_matmul.h): no float or
// int8 copy of the whole weight exists at any time.
//
// Frozen: no weight gradient and no bias gradient (the whole base is frozen,
// as in INT2.1), so the forward saves no input: only the RngKey that keys the
// rounding of the backward pass (16 bytes).
//
// AdpQ models add a sparse salient part S (core/salient_weights.h):
// y = x·(Ŵ + S) + b, dx = dy·(Ŵ + S)ᵀ, with S applied entry by entry after
// the tile products, so the dense Ŵ + S is never built either.
//
// Formats: x fp32 (the same code in float) or a fixed-point format of 2 to 8
// bits (int8 storage); dy likewise. In integer mode the forward product is an
// exact int64 accumulator; the backward's one rounding (of the error scaled
// by the group scales) uses dy's own format and rounding mode.
#pragma once

#include <string>

#include <optional>

#include "core/packed_weights.h"
#include "core/salient_weights.h"
#include "layers/linear.h"

namespace intrain {

class QuantizedLinear : public LinearLayer {
 public:
  // `bias` (may be null) is read, never updated; it must outlive the layer.
  QuantizedLinear(std::string name, PackedWeights weights, const Param* bias,
                  std::optional<SalientWeights> salient = std::nullopt);

  Tensor forward(const Tensor& x, const Format& out, RngKey key) override;
  Tensor backward(const Tensor& dy, RngKey key) override;  // the split key is unused: the forward saved its own

  const PackedWeights& weights() const { return w_; }
  const std::optional<SalientWeights>& salient() const { return s_; }
  const std::string& name() const { return name_; }

 private:
  std::string name_;
  PackedWeights w_;
  std::optional<SalientWeights> s_;
  const Param* b_;
  RngKey backward_key_;
  bool has_forward_ = false;
};

}  // namespace intrain
