#include "layers/param.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "core/ops.h"
#include "core/quantize.h"
#include "core/rounding.h"

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

namespace {

// Smallest k with 2^k >= n: the bits a sum of n terms can add.
int ceil_log2(int n) { return n <= 1 ? 0 : bit_length(static_cast<std::uint64_t>(n - 1)); }

std::int64_t all_reduce_float(const std::vector<Param*>& ps, const Collective& comm) {
  std::vector<float> buf;
  for (const Param* p : ps) buf.insert(buf.end(), p->grad.data<float>(), p->grad.data<float>() + p->grad.numel());
  comm.sum(std::span<float>(buf));
  std::size_t at = 0;
  for (Param* p : ps) {
    std::copy_n(buf.data() + at, p->grad.numel(), p->grad.data<float>());
    at += static_cast<std::size_t>(p->grad.numel());
  }
  return static_cast<std::int64_t>(buf.size() * sizeof(float));
}

// Sums the gradients over the ranks, each at exponent e_min[i]: those whose
// sum fits in int32 (wide32[i]) travel as int32, the rest as int64.
std::int64_t sum_aligned(const std::vector<Param*>& ps, const std::vector<std::int64_t>& e_min,
                         const std::vector<bool>& wide32, const Collective& comm) {
  std::vector<std::int32_t> w32;
  std::vector<std::int64_t> w64;
  for (std::size_t i = 0; i < ps.size(); ++i) {
    const int left = ps[i]->grad.exponent() - static_cast<int>(e_min[i]);
    visit_int(ps[i]->grad, [&](const auto* g) {
      for (std::int64_t j = 0; j < ps[i]->grad.numel(); ++j) {
        const std::int64_t v = static_cast<std::int64_t>(static_cast<std::uint64_t>(static_cast<std::int64_t>(g[j])) << left);
        if (wide32[i]) {
          w32.push_back(static_cast<std::int32_t>(v));
        } else {
          w64.push_back(v);
        }
      }
    });
  }
  comm.sum(std::span<std::int32_t>(w32));
  comm.sum(std::span<std::int64_t>(w64));
  std::size_t at32 = 0, at64 = 0;
  for (std::size_t i = 0; i < ps.size(); ++i) {
    Tensor g(ps[i]->grad.shape(), Format::accumulator(64), static_cast<int>(e_min[i]));
    std::int64_t* o = g.data<std::int64_t>();
    for (std::int64_t j = 0; j < g.numel(); ++j) o[j] = wide32[i] ? w32[at32++] : w64[at64++];
    ps[i]->grad = std::move(g);
  }
  return static_cast<std::int64_t>(w32.size() * sizeof(std::int32_t) + w64.size() * sizeof(std::int64_t));
}

}  // namespace

std::int64_t all_reduce_gradients(std::vector<Param>& params, const Collective& comm) {
  if (comm.size() == 1) return 0;
  std::vector<Param*> ps;
  for (Param& p : params)
    if (p.has_grad) ps.push_back(&p);
  if (ps.empty()) return 0;
  if (ps.front()->grad.format().is_float()) return all_reduce_float(ps, comm);

  // Round 1: the finest exponent of each gradient over all ranks.
  std::vector<std::int64_t> neg_e(ps.size());
  for (std::size_t i = 0; i < ps.size(); ++i) neg_e[i] = -ps[i]->grad.exponent();
  comm.max(std::span<std::int64_t>(neg_e));
  std::vector<std::int64_t> e_min(ps.size());
  for (std::size_t i = 0; i < ps.size(); ++i) e_min[i] = -neg_e[i];
  // Round 2: the bits each aligned gradient needs on its widest rank.
  std::vector<std::int64_t> bits(ps.size());
  for (std::size_t i = 0; i < ps.size(); ++i) {
    const int left = ps[i]->grad.exponent() - static_cast<int>(e_min[i]);
    bits[i] = bit_length(max_abs_mantissa(ps[i]->grad)) + left;
  }
  comm.max(std::span<std::int64_t>(bits));
  // |sum of N terms below 2^b| < 2^(b + ceil_log2 N): the word must hold that.
  const int grow = ceil_log2(comm.size());
  std::vector<bool> wide32(ps.size());
  for (std::size_t i = 0; i < ps.size(); ++i) {
    const int need = static_cast<int>(bits[i]) + grow;
    if (need > 63) {
      throw std::overflow_error("all-reduce: the gradient of " + ps[i]->name + " needs " + std::to_string(bits[i]) +
                                " bits on some rank; its sum over " + std::to_string(comm.size()) +
                                " ranks could leave int64; use fewer ranks");
    }
    wide32[i] = need <= 31;
  }
  return sum_aligned(ps, e_min, wide32, comm);
}

}  // namespace intrain
