#include "optim/sgd.h"

#include <cmath>
#include <stdexcept>

#include "core/fixed_point.h"
#include "core/ops.h"
#include "core/parallel.h"
#include "core/quantize.h"

namespace intrain {

double LrSchedule::at(long step) const {
  if (warmup > 0 && step < warmup) return peak * static_cast<double>(step + 1) / static_cast<double>(warmup);
  const double span = static_cast<double>(std::max(1L, total - warmup));
  const double progress = std::min(1.0, static_cast<double>(step - warmup) / span);
  const double lo = peak * final_fraction;
  return lo + 0.5 * (peak - lo) * (1.0 + std::cos(3.141592653589793 * progress));
}

namespace {

void step_float(Param& p, const SgdConfig& cfg, double lr) {
  float* w = p.master.data<float>();
  const float* g = p.grad.data<float>();
  if (p.momentum.empty()) p.momentum = Tensor(p.master.shape(), Format::fp32());
  float* v = p.momentum.data<float>();
  const float mu = static_cast<float>(cfg.momentum), wd = p.decays() ? static_cast<float>(cfg.weight_decay) : 0.0f;
  const float a = static_cast<float>(lr);
  for_chunks(p.master.numel(), [&](std::int64_t, std::int64_t i0, std::int64_t i1) {
    for (std::int64_t i = i0; i < i1; ++i) {
      const float d = g[i] + wd * w[i];
      v[i] = mu * v[i] + d;
      w[i] -= a * v[i];
    }
  });
}

std::int64_t to_q16(double x) { return std::llround(std::ldexp(x, 16)); }

std::int64_t step_int(Param& p, const SgdConfig& cfg, const Format& G, double lr, RngKey key) {
  const std::int64_t n = p.master.numel();
  const Tensor g = cast(p.grad, G, key.derive(1));
  std::int64_t saturated = g.saturated();
  const std::int64_t mu_q = to_q16(cfg.momentum);
  const std::int64_t wd_q = p.decays() ? to_q16(cfg.weight_decay) : 0;
  if (p.momentum.empty()) p.momentum = Tensor(p.master.shape(), Format::wide(31), g.exponent());

  // v' = mu * v + g + wd * w, exactly, at one exponent. Terms and their
  // exponents: mu*v at e_v - 16, g at e_g, wd*w at e_w - 16.
  const int ev = p.momentum.exponent() - 16, eg = g.exponent(), ew = kMasterExponent - 16;
  const std::uint64_t bound_v = std::uint64_t{1} << std::min(62, bit_length(static_cast<std::uint64_t>(mu_q)) + 31);
  const std::uint64_t bound_w = wd_q ? std::uint64_t{1} << std::min(62, bit_length(static_cast<std::uint64_t>(wd_q)) + 31) : 0;
  int e = common_exponent(bound_v, ev, max_abs_mantissa(g), eg);
  if (wd_q) e = std::max(e, common_exponent(bound_w, ew, bound_v, ev));
  e += 2;  // headroom: a sum of three terms below 2^62 each stays below 2^64 / 2
  Tensor vacc(p.master.shape(), Format::accumulator(64), e);
  std::int64_t* va = vacc.data<std::int64_t>();
  const std::int32_t* v = p.momentum.data<std::int32_t>();
  const std::int32_t* w = p.master.data<std::int32_t>();
  visit_int(g, [&](const auto* pg) {
    for_chunks(n, [&](std::int64_t, std::int64_t i0, std::int64_t i1) {
      for (std::int64_t i = i0; i < i1; ++i) {
        std::int64_t s = shift_to(mu_q * v[i], ev, e) + shift_to(pg[i], eg, e);
        if (wd_q) s += shift_to(wd_q * w[i], ew, e);
        va[i] = s;
      }
    });
  });
  p.momentum = requantize(vacc, Format::wide(31), key.derive(2));
  saturated += p.momentum.saturated();

  // w -= lr * v': lr = lr_q * 2^-k with 24 significant bits.
  if (lr <= 0.0) return saturated;
  const int k = 23 - std::ilogb(lr);
  const std::int64_t lr_q = std::llround(std::ldexp(lr, k));
  const int shift = kMasterExponent - (p.momentum.exponent() - k);  // from lr*v's grid to the master's
  const std::int32_t* vn = p.momentum.data<std::int32_t>();
  std::int32_t* wm = p.master.data<std::int32_t>();
  const std::int64_t hi = Format::wide(31).qmax(), lo = -hi;
  const RngKey k3 = key.derive(3);
  saturated += reduce_chunks(
      n, std::int64_t{0},
      [&](std::int64_t i0, std::int64_t i1) {
        std::int64_t clipped = 0;
        for (std::int64_t i = i0; i < i1; ++i) {
          const std::int64_t delta = lr_q * vn[i];  // < 2^24 * 2^30
          std::int64_t step_m;
          if (shift >= 0) {
            step_m = shift_round_stochastic(delta, shift, k3.bits(static_cast<std::uint32_t>(i)));
          } else {
            const int l = -shift;
            const std::int64_t cap = l >= 62 ? 0 : (std::int64_t{1} << (62 - l));
            step_m = delta > cap ? INT64_MAX / 4 : delta < -cap ? -(INT64_MAX / 4) : delta * (std::int64_t{1} << l);
          }
          wm[i] = static_cast<std::int32_t>(saturate(static_cast<std::int64_t>(wm[i]) - step_m, lo, hi, clipped));
        }
        return clipped;
      },
      std::plus<>());
  return saturated;
}

}  // namespace

std::int64_t Sgd::step(std::vector<Param>& params, const Format& grad_format, double lr, std::uint64_t key_step,
                       std::uint64_t seed) {
  std::vector<Param*> ps;
  ps.reserve(params.size());
  for (Param& p : params) ps.push_back(&p);
  return step(ps, grad_format, lr, key_step, seed);
}

std::int64_t Sgd::step(const std::vector<Param*>& params, const Format& grad_format, double lr, std::uint64_t key_step,
                       std::uint64_t seed) {
  std::int64_t saturated = 0;
  for (std::size_t i = 0; i < params.size(); ++i) {
    Param& p = *params[i];
    if (!p.has_grad) continue;
    if (p.grad.numel() != p.master.numel()) {
      throw std::logic_error("Sgd: gradient " + p.grad.describe() + " does not match parameter " + p.name);
    }
    if (p.master.format().is_float()) {
      step_float(p, cfg_, lr);
    } else {
      saturated += step_int(p, cfg_, grad_format, lr, RngKey(seed, stream_id(key_step, 0x5CD0000 + i)));
    }
    p.zero_grad();
  }
  return saturated;
}

}  // namespace intrain
