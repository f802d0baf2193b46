// SGD with momentum and weight decay, in the PyTorch convention:
//   d = g + wd * w;   v = mu * v + d;   w = w - lr * v
// Float mode: exactly that, in float32.
// Integer mode (every quantity is an integer with a power-of-two exponent):
//   g   the parameter's gradient, requantized to the run's G format (SR);
//   wd  and mu are Q16 fixed-point constants; lr is a fixed-point multiplier
//       with 24 significant bits, derived once per step from the schedule;
//   d, v are formed exactly in int64 at a common exponent, and v is stored in
//       Format::wide(31) with a dynamic exponent (requantized with SR);
//   w   the master (Format::wide(31), exponent kMasterExponent) moves by
//       lr * v rounded stochastically onto its grid, saturating at +-64;
//   the forward value is then re-cast from the master with SR.
// No float touches the tensors; the schedule's scalar lr is computed in double.
#pragma once

#include <cstdint>
#include <vector>

#include "layers/param.h"

namespace intrain {

struct SgdConfig {
  double momentum = 0.9;
  double weight_decay = 0.0;  // applied to matmul weights only
};

// Warmup from 0 to `peak` over `warmup` steps, then a cosine from `peak` down
// to `peak * final_fraction` at `total` steps.
struct LrSchedule {
  double peak = 0.1;
  long warmup = 100;
  long total = 2000;
  double final_fraction = 0.1;
  double at(long step) const;
};

class Sgd {
 public:
  explicit Sgd(SgdConfig cfg) : cfg_(cfg) {}
  // Updates every parameter that has a gradient, then clears the gradients.
  // `key_step` and `seed` key the stochastic rounding of this update.
  // Returns the number of saturated elements (master clipping included).
  std::int64_t step(std::vector<Param>& params, const Format& grad_format, double lr, std::uint64_t key_step,
                    std::uint64_t seed);
  // The same for parameters held elsewhere (LoRA adapters); the position in
  // the list keys each parameter's rounding, as the index does above.
  std::int64_t step(const std::vector<Param*>& params, const Format& grad_format, double lr, std::uint64_t key_step,
                    std::uint64_t seed);

 private:
  SgdConfig cfg_;
};

}  // namespace intrain
