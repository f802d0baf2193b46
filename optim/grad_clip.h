// Gradient-norm clipping by a power of two, the same in the float and the
// integer engine.
//
//   norm = sqrt(sum over every parameter with a gradient of sum_i g_i^2)
//   if norm > max_norm:  g <- g * 2^-k,  k = ceil(log2(norm / max_norm)) >= 1
//
// so the clipped norm lies in (max_norm / 2, max_norm]. PyTorch's
// clip_grad_norm_ scales by max_norm / norm exactly; a power of two is chosen
// here because it is exact in both engines: an integer gradient (an acc64
// mantissa tensor with a shared exponent) only has its exponent lowered by
// k, and a float gradient is multiplied by 2^-k (exact unless it underflows).
// No rounding is added, so a run that never clips is bit-identical to one
// without clipping, and the float baseline clips at the same steps by the
// same factor whenever its norm falls in the same octave.
//
// The norm is formed in double from the exact mantissas, in a fixed order
// (core/parallel.h), so it and the decision are the same at any thread count.
#pragma once

#include <vector>

#include "layers/param.h"

namespace intrain {

struct GradClip {
  double norm = 0.0;  // the L2 norm before clipping
  int shift = 0;      // k: the gradients were multiplied by 2^-k (0: unclipped)
};

// The global L2 norm of the gradients of `params` (those with has_grad).
double grad_norm(const std::vector<Param*>& params);

// Clips as above; max_norm <= 0 only measures. Throws std::invalid_argument
// on a non-finite max_norm, and std::runtime_error on a non-finite norm (a
// float gradient that overflowed) before changing any gradient.
GradClip clip_grad_norm(const std::vector<Param*>& params, double max_norm);

}  // namespace intrain
