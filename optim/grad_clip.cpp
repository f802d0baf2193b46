#include "optim/grad_clip.h"

#include <cmath>
#include <functional>
#include <stdexcept>
#include <string>

#include "core/parallel.h"

namespace intrain {

namespace {

// sum_i g_i^2 of one gradient, in units of 2^(2*exponent) for integer tensors.
double sum_squares(const Tensor& g) {
  const std::int64_t n = g.numel();
  if (g.format().is_float()) {
    const float* p = g.data<float>();
    return reduce_chunks(
        n, 0.0,
        [&](std::int64_t i0, std::int64_t i1) {
          double s = 0.0;
          for (std::int64_t i = i0; i < i1; ++i) s += static_cast<double>(p[i]) * p[i];
          return s;
        },
        std::plus<>());
  }
  return visit_int(g, [&](const auto* p) {
    return reduce_chunks(
        n, 0.0,
        [&](std::int64_t i0, std::int64_t i1) {
          double s = 0.0;
          for (std::int64_t i = i0; i < i1; ++i) {
            const double v = static_cast<double>(p[i]);
            s += v * v;
          }
          return s;
        },
        std::plus<>());
  });
}

}  // namespace

double grad_norm(const std::vector<Param*>& params) {
  double total = 0.0;
  for (const Param* p : params) {
    if (!p->has_grad) continue;
    const double s = sum_squares(p->grad);
    total += p->grad.format().is_float() ? s : std::ldexp(s, 2 * p->grad.exponent());
  }
  return std::sqrt(total);
}

GradClip clip_grad_norm(const std::vector<Param*>& params, double max_norm) {
  if (!std::isfinite(max_norm)) throw std::invalid_argument("clip_grad_norm: max_norm must be finite");
  GradClip c;
  c.norm = grad_norm(params);
  if (!std::isfinite(c.norm)) throw std::runtime_error("clip_grad_norm: the gradient norm is not finite (" + std::to_string(c.norm) + ")");
  if (max_norm <= 0.0 || c.norm <= max_norm) return c;
  c.shift = static_cast<int>(std::ceil(std::log2(c.norm / max_norm)));
  // log2 may round a ratio just above a power of two down onto it.
  while (std::ldexp(c.norm, -c.shift) > max_norm) ++c.shift;
  for (Param* p : params) {
    if (!p->has_grad) continue;
    Tensor& g = p->grad;
    if (g.format().is_float()) {
      float* v = g.data<float>();
      const float f = std::ldexp(1.0f, -c.shift);
      for_chunks(g.numel(), [&](std::int64_t, std::int64_t i0, std::int64_t i1) {
        for (std::int64_t i = i0; i < i1; ++i) v[i] *= f;
      });
    } else {
      g.set_exponent(g.exponent() - c.shift);
    }
  }
  return c;
}

}  // namespace intrain
