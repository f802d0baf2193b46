#include "layers/param.h"

#include "core/ops.h"

namespace intrain {

void Param::accumulate(Tensor g) {
  if (frozen) return;
  if (!has_grad) {
    grad = std::move(g);
    has_grad = true;
    return;
  }
  Tensor sum = add_accumulators(grad, g);
  sum.reshape(grad.shape());
  grad = std::move(sum);
}

}  // namespace intrain
