// Outlier split and tiled matmul (see core/outliers.h and docs/outliers.md).
#include "core/outliers.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <regex>
#include <sstream>
#include <stdexcept>

#include "core/parallel.h"
#include "core/quantize.h"
#include "core/rounding.h"
#include "core/simd.h"

namespace intrain {

// ---------------------------------------------------------------------------
// Policy
// ---------------------------------------------------------------------------

OutlierPolicy OutlierPolicy::parse(const std::string& spec, const std::string& flag) {
  auto fail = [&](const std::string& why) -> OutlierPolicy {
    throw std::invalid_argument(flag + " '" + spec + "': " + why +
                                "; use rms:G or G (outliers above G times the RMS, e.g. 5), pct:P (above the P-th "
                                "percentile of |x|, 0..100) or top:K (the K largest per tensor)");
  };
  std::smatch m;
  const std::string num = R"(([0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?))";
  OutlierPolicy p;
  if (std::regex_match(spec, m, std::regex("(?:rms:)?" + num))) {
    p.rule = OutlierRule::SpreadMultiple;
  } else if (std::regex_match(spec, m, std::regex("pct:" + num))) {
    p.rule = OutlierRule::Percentile;
  } else if (std::regex_match(spec, m, std::regex(R"(top:([0-9]+))"))) {
    p.rule = OutlierRule::TopK;
  } else {
    return fail("not a known spelling");
  }
  p.value = std::stod(m[1]);
  if (!std::isfinite(p.value)) return fail("the number is not finite");
  if (p.rule == OutlierRule::Percentile && p.value > 100.0) return fail("a percentile must be at most 100");
  return p;
}

std::string OutlierPolicy::name() const {
  std::ostringstream s;
  switch (rule) {
    case OutlierRule::SpreadMultiple: s << "rms:" << value; break;
    case OutlierRule::Percentile: s << "pct:" << value; break;
    case OutlierRule::TopK: s << "top:" << static_cast<std::int64_t>(value); break;
  }
  return s.str();
}

OutlierTiling OutlierTiling::parse(const std::string& roles, const std::string& threshold) {
  OutlierTiling t;
  t.policy = OutlierPolicy::parse(threshold);
  std::stringstream ss(roles);
  std::string role;
  while (std::getline(ss, role, ',')) {
    if (role == "a") {
      t.a = true;
    } else if (role == "e") {
      t.e = true;
    } else {
      throw std::invalid_argument("--outlier-tiling '" + roles + "': unknown role '" + role +
                                  "'; give a comma list of a (layer inputs) and e (errors), e.g. a,e");
    }
  }
  return t;
}

OutlierTiling OutlierTiling::parse_name(const std::string& name) {
  std::smatch m;
  if (!std::regex_match(name, m, std::regex(R"(tile-(a?)(e?)@(.+))")) || (m[1].length() + m[2].length() == 0)) {
    throw std::invalid_argument("format suffix '+" + name + "': not an outlier tiling name such as +tile-ae@rms:5");
  }
  OutlierTiling t;
  t.a = m[1].length() > 0;
  t.e = m[2].length() > 0;
  t.policy = OutlierPolicy::parse(m[3], "format suffix '+" + name + "'");
  return t;
}

std::string OutlierTiling::name() const {
  if (!any()) return "";
  return std::string("tile-") + (a ? "a" : "") + (e ? "e" : "") + "@" + policy.name();
}

// ---------------------------------------------------------------------------
// Selection and statistics
// ---------------------------------------------------------------------------

namespace {

void require_narrow(const Tensor& x, const char* who) {
  if (!x.format().is_integer() || x.format().scaling() != Scaling::SharedExponent || !x.format().is_signed() ||
      x.format().bits() > 16) {
    throw std::invalid_argument(std::string(who) + ": " + x.describe() +
                                " must be a signed fixed-point tensor of at most 16 bits");
  }
}

// n / d for 0 <= n < 2^51 (the remainder is then n - q·d) without a 64-bit
// divide (tens of cycles, and scalar): a double reciprocal gives the quotient
// within one, and one step corrects it.
struct LineDivider {
  std::int64_t d;
  double inv;
  explicit LineDivider(std::int64_t divisor) : d(divisor), inv(1.0 / static_cast<double>(divisor)) {}
  std::int64_t quot(std::int64_t n) const {
    std::int64_t q = static_cast<std::int64_t>(static_cast<double>(n) * inv);
    const std::int64_t r = n - q * d;
    q += static_cast<std::int64_t>(r >= d) - static_cast<std::int64_t>(r < 0);
    return q;
  }
};

// row[q] = index[q] / cols, col[q] = index[q] % cols: a separate pass over
// the outliers, which vectorises (the divider is branch-free).
INTRAIN_CLONES void line_coordinates(const std::int64_t* __restrict index, std::int64_t n, std::int64_t cols,
                                     std::int64_t* __restrict row, std::int64_t* __restrict col) {
  const LineDivider by_cols(cols);
  for (std::int64_t q = 0; q < n; ++q) {
    row[q] = by_cols.quot(index[q]);
    col[q] = index[q] - row[q] * cols;
  }
}

template <class T> INTRAIN_INLINE std::int32_t abs32(T v) { return v < 0 ? -static_cast<std::int32_t>(v) : v; }

struct AbsStats {
  std::uint64_t max = 0;
  std::int64_t sumsq = 0;  // |x| <= 2^15: a chunk of 2^14 squares is < 2^44, the total < 2^63 below 2^33 elements
};
template <class T> INTRAIN_INLINE AbsStats abs_stats_body(const T* x, std::int64_t n) {
  std::int32_t m = 0;
  std::int64_t s = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int32_t a = abs32(x[i]);
    m = a > m ? a : m;
    s += a * a;  // in 32 bits (a <= 2^15): a 64-bit multiply is three times the uops
  }
  return {static_cast<std::uint64_t>(m), s};
}
INTRAIN_CLONES AbsStats abs_stats(const std::int8_t* x, std::int64_t n) { return abs_stats_body(x, n); }
INTRAIN_CLONES AbsStats abs_stats(const std::int16_t* x, std::int64_t n) { return abs_stats_body(x, n); }

// flag[i] = |x[i]| >= t; returns how many are set (branch-free, vectorises).
template <class T>
INTRAIN_INLINE std::int32_t flag_at_least_body(const T* __restrict x, std::int64_t n, std::int32_t t,
                                               std::uint8_t* __restrict flag) {
  std::int32_t count = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int32_t f = abs32(x[i]) >= t;
    flag[i] = static_cast<std::uint8_t>(f);
    count += f;
  }
  return count;
}
INTRAIN_CLONES std::int32_t flag_at_least(const std::int8_t* x, std::int64_t n, std::int32_t t, std::uint8_t* f) {
  return flag_at_least_body(x, n, t, f);
}
INTRAIN_CLONES std::int32_t flag_at_least(const std::int16_t* x, std::int64_t n, std::int32_t t, std::uint8_t* f) {
  return flag_at_least_body(x, n, t, f);
}

template <class F> decltype(auto) visit_narrow(const Tensor& x, F&& f) {
  if (x.dtype() == DType::I8) return f(x.data<std::int8_t>());
  return f(x.data<std::int16_t>());
}

// The r-th largest |x| (1-based) and how many elements are strictly larger.
// |x| <= 32767: a histogram of |x| >> 7 (256 bins) finds the bucket, a
// histogram of |x| & 127 inside that bucket finds the value. Exact.
struct Selected {
  std::int64_t value = 0, greater = 0;
};
Selected select_abs(const Tensor& x, std::int64_t r) {
  using Hist = std::array<std::int64_t, 256>;
  const std::int64_t n = x.numel();
  auto histogram = [&](auto bin_of) {
    return visit_narrow(x, [&](const auto* p) {
      return reduce_chunks(
          n, Hist{},
          [&](std::int64_t b, std::int64_t e) {
            Hist h{};
            for (std::int64_t i = b; i < e; ++i) {
              const int bin = bin_of(abs32(p[i]));
              if (bin >= 0) ++h[static_cast<std::size_t>(bin)];
            }
            return h;
          },
          [](Hist a, const Hist& b) {
            for (std::size_t i = 0; i < a.size(); ++i) a[i] += b[i];
            return a;
          });
    });
  };
  // Walks bins from the top; returns the bin holding rank `rank` and the count above it.
  auto walk = [](const Hist& h, std::int64_t rank, std::int64_t& above) {
    above = 0;
    for (int b = 255; b >= 0; --b) {
      if (above + h[static_cast<std::size_t>(b)] >= rank) return b;
      above += h[static_cast<std::size_t>(b)];
    }
    return 0;
  };
  std::int64_t above1 = 0, above2 = 0;
  const int hi = walk(histogram([](std::int32_t a) { return a >> 7; }), r, above1);
  const int lo = walk(histogram([hi](std::int32_t a) { return (a >> 7) == hi ? (a & 127) : -1; }), r - above1, above2);
  return {static_cast<std::int64_t>(hi) * 128 + lo, above1 + above2};
}

}  // namespace

std::int64_t kth_largest_abs(const Tensor& x, std::int64_t r) {
  require_narrow(x, "kth_largest_abs");
  if (r < 1 || r > x.numel()) {
    throw std::invalid_argument("kth_largest_abs: rank " + std::to_string(r) + " is outside 1.." +
                                std::to_string(x.numel()));
  }
  return select_abs(x, r).value;
}

// ---------------------------------------------------------------------------
// Split
// ---------------------------------------------------------------------------

Tensor OutlierSplit::merged() const {
  // Every element is written: the widening in parallel chunks (it is a whole
  // pass over the operand, which the one-by-one product of dW needs), then
  // the few outliers.
  Tensor v = Tensor::uninitialized(bulk.shape(), Format::fixed(15), bulk.exponent());
  const std::int8_t* b = bulk.data<std::int8_t>();
  std::int16_t* o = v.data<std::int16_t>();
  for_chunks(bulk.numel(), [&](std::int64_t, std::int64_t i0, std::int64_t i1) {
    for (std::int64_t i = i0; i < i1; ++i) o[i] = b[i];
  });
  for (std::size_t j = 0; j < index.size(); ++j)
    o[index[j]] = static_cast<std::int16_t>(o[index[j]] + high[j] * (1 << kOutlierShift));
  return v;
}

OutlierSplit outlier_split(const Tensor& x, const OutlierPolicy& policy, RngKey key) {
  require_narrow(x, "outlier_split");
  if (!(policy.value >= 0.0)) throw std::invalid_argument("outlier_split: policy " + policy.name() + " is negative");
  const std::int64_t n = x.numel();
  const AbsStats st = visit_narrow(x, [&](const auto* p) {
    return reduce_chunks(
        n, AbsStats{}, [&](std::int64_t b, std::int64_t e) { return abs_stats(p + b, e - b); },
        [](AbsStats a, const AbsStats& b) { return AbsStats{std::max(a.max, b.max), a.sumsq + b.sumsq}; });
  });
  const auto max_abs = static_cast<std::int64_t>(st.max);

  // Outliers: |x| > tau, plus the elements with |x| == tau and flat index
  // below tie_end (only TopK, to take exactly k).
  std::int64_t tau = max_abs, tie_end = 0;
  switch (policy.rule) {
    case OutlierRule::SpreadMultiple: {
      const double rms = n ? std::sqrt(static_cast<double>(st.sumsq) / static_cast<double>(n)) : 0.0;
      tau = static_cast<std::int64_t>(std::min(std::floor(policy.value * rms), static_cast<double>(max_abs)));
      break;
    }
    case OutlierRule::Percentile: {
      if (n == 0) break;
      const auto rank_up = static_cast<std::int64_t>(std::ceil(policy.value / 100.0 * static_cast<double>(n)));
      tau = select_abs(x, n - std::clamp<std::int64_t>(rank_up, 1, n) + 1).value;
      break;
    }
    case OutlierRule::TopK: {
      const auto k = static_cast<std::int64_t>(std::min(policy.value, static_cast<double>(n)));
      if (k == 0) break;
      if (k == n) {
        tau = -1;  // every element
        break;
      }
      const Selected s = select_abs(x, k + 1);  // the largest ordinary element
      tau = s.value;
      std::int64_t ties = k - s.greater;
      visit_narrow(x, [&](const auto* p) {
        for (std::int64_t i = 0; i < n && ties > 0; ++i) {
          if (abs32(p[i]) == tau) {
            --ties;
            tie_end = i + 1;
          }
        }
      });
      break;
    }
  }

  OutlierSplit out;
  out.threshold = tau;
  out.source_max = st.max;
  out.source_exponent = x.exponent();
  const int s_tau = shift_for_max(static_cast<std::uint64_t>(std::max<std::int64_t>(tau, 0)), 127);
  const int s_max = shift_for_max(st.max, kSplitQmax);
  const int shift = std::max(s_tau, s_max);
  out.range_limited = s_max > s_tau;
  out.bulk = Tensor::uninitialized(x.shape(), Format::fixed(8), x.exponent() + shift);
  const Rounding mode = x.format().rounding();

  // One pass per chunk: round every element into the bulk (saturating at
  // ±127, which only outliers can reach), then find the outliers block by
  // block and rewrite them as (low, high).
  struct Found {
    std::vector<std::int64_t> index;
    std::vector<std::int8_t> high;
  };
  std::vector<Found> found(static_cast<std::size_t>(num_chunks(n)));
  std::int8_t* bulk = out.bulk.data<std::int8_t>();
  visit_narrow(x, [&](const auto* p) {
    for_chunks(n, [&](std::int64_t c, std::int64_t b, std::int64_t e) {
      requantize_kernel(p + b, bulk + b, e - b, shift, mode, key, -127, 127, static_cast<std::uint32_t>(b));
      if (tau >= max_abs && tie_end <= b) return;  // no outlier can be in this chunk
      Found& f = found[static_cast<std::size_t>(c)];
      // Flags per block, then a word-at-a-time scan of the flags: the cost
      // per element is two vector passes, plus scalar work per outlier only.
      constexpr std::int64_t kBlock = 1024;
      alignas(64) std::uint8_t flag[kBlock];
      for (std::int64_t b0 = b; b0 < e; b0 += kBlock) {
        const std::int64_t n0 = std::min(e, b0 + kBlock) - b0;
        const std::int64_t t = tie_end > b0 ? tau : tau + 1;  // a tie may count below tie_end
        if (flag_at_least(p + b0, n0, static_cast<std::int32_t>(std::max<std::int64_t>(t, 0)), flag) == 0) continue;
        std::fill(flag + n0, flag + (n0 + 63) / 64 * 64, std::uint8_t{0});  // whole words of 64 below
        for (std::int64_t w = 0; w < n0; w += 64) {
          // The flags of 64 elements as one bit each: each 8-byte word of
          // 0/1 flags gathers into one byte (the multiply puts byte i's bit at
          // bit 56 + i, all partial products at distinct bits).
          std::uint64_t bits = 0;
          for (int q = 0; q < 8; ++q) {
            std::uint64_t word;
            std::memcpy(&word, flag + w + 8 * q, 8);
            bits |= ((word * 0x0102040810204080ULL) >> 56) << (8 * q);
          }
          for (; bits != 0; bits &= bits - 1) {
            const std::int64_t i = b0 + w + __builtin_ctzll(bits);
            const std::int32_t a = abs32(p[i]);
            if (!(a > tau || (a == tau && i < tie_end))) continue;
            const std::int64_t v = shift_round(p[i], shift, mode, key.bits(static_cast<std::uint32_t>(i)));
            const std::int64_t h = std::clamp<std::int64_t>(shift_round_nearest(v, kOutlierShift), -127, 127);
            bulk[i] = static_cast<std::int8_t>(v - h * (1 << kOutlierShift));  // |low| <= 127: see the header
            f.index.push_back(i);
            f.high.push_back(static_cast<std::int8_t>(h));
          }
        }
      }
    });
  });
  for (Found& f : found) {
    out.index.insert(out.index.end(), f.index.begin(), f.index.end());
    out.high.insert(out.high.end(), f.high.begin(), f.high.end());
  }
  out.row.resize(out.index.size());
  out.col.resize(out.index.size());
  line_coordinates(out.index.data(), out.outliers(), std::max<std::int64_t>(x.cols(), 1),  // a scalar: 1 x 1
                   out.row.data(), out.col.data());
  return out;
}

// ---------------------------------------------------------------------------
// Tiled matmul
// ---------------------------------------------------------------------------

Format TiledOperand::value_format() const { return split_ ? Format::fixed(15) : plain_->format(); }

namespace {

// Where a partial product goes: C[rows[i], cols[j]] += P[i, j] << shift.
// A null map is the identity; a -1 entry is padding and is skipped.
struct Dest {
  Tensor* C;
  const std::vector<std::int64_t>* rows = nullptr;
  const std::vector<std::int64_t>* cols = nullptr;
};

// Sums run in the unsigned type of C's width, modulo 2^32 or 2^64: the final
// value is known to fit C (matmul_result_format of the merged operands), so
// the modular sum is exact even where a partial sum would not fit.
template <class U, class TP>
INTRAIN_INLINE void add_row_body(U* __restrict c, const TP* __restrict p, std::int64_t n, int shift) {
  for (std::int64_t j = 0; j < n; ++j) c[j] += static_cast<U>(static_cast<U>(static_cast<std::int64_t>(p[j])) << shift);
}
INTRAIN_CLONES void add_row(std::uint32_t* c, const std::int32_t* p, std::int64_t n, int s) { add_row_body(c, p, n, s); }
INTRAIN_CLONES void add_row(std::uint64_t* c, const std::int32_t* p, std::int64_t n, int s) { add_row_body(c, p, n, s); }
INTRAIN_CLONES void add_row(std::uint32_t* c, const std::int64_t* p, std::int64_t n, int s) { add_row_body(c, p, n, s); }
INTRAIN_CLONES void add_row(std::uint64_t* c, const std::int64_t* p, std::int64_t n, int s) { add_row_body(c, p, n, s); }

void add_into(const Dest& d, const Tensor& P, int shift) {
  const std::int64_t pr = P.rows(), pc = P.cols(), N = d.C->cols();
  auto run = [&](auto* c, const auto* p) {
    for_chunks(pr, [&](std::int64_t, std::int64_t rb, std::int64_t re) {
      for (std::int64_t i = rb; i < re; ++i) {
        const std::int64_t r = d.rows ? (*d.rows)[static_cast<std::size_t>(i)] : i;
        if (r < 0) continue;
        auto* crow = c + r * N;
        const auto* prow = p + i * pc;
        if (!d.cols) {
          add_row(crow, prow, pc, shift);
          continue;
        }
        using U = std::remove_pointer_t<decltype(c)>;
        for (std::int64_t j = 0; j < pc; ++j) {
          const std::int64_t col = (*d.cols)[static_cast<std::size_t>(j)];
          if (col >= 0) crow[col] += static_cast<U>(static_cast<U>(static_cast<std::int64_t>(prow[j])) << shift);
        }
      }
    }, std::max<std::int64_t>(1, kChunk / std::max<std::int64_t>(pc, 1)));
  };
  auto with_p = [&](auto* c) {
    if (P.dtype() == DType::I32) {
      run(c, P.data<std::int32_t>());
    } else {
      run(c, P.data<std::int64_t>());
    }
  };
  if (d.C->dtype() == DType::I32) {
    with_p(reinterpret_cast<std::uint32_t*>(d.C->data<std::int32_t>()));
  } else {
    with_p(reinterpret_cast<std::uint64_t*>(d.C->data<std::int64_t>()));
  }
}

// Gathered block sizes are rounded up to two steps per octave (16, 24, 32,
// 48, ...), capped at the full dimension: the outlier count changes every
// step, and each new shape would cost a oneDNN primitive creation.
std::int64_t padded(std::int64_t n, std::int64_t full) {
  std::int64_t p = 16;
  while (p < n) p = (p & (p - 1)) == 0 ? p + p / 2 : (p / 3) * 4;
  return std::min(p, full);
}

// The outliers of a split in the coordinates of op(S): (i, j, high).
struct Entry {
  std::int64_t i, j;
  std::int8_t high;
};
std::vector<Entry> entries(const OutlierSplit& s, Trans t) {
  std::vector<Entry> e(s.index.size());
  for (std::size_t q = 0; q < e.size(); ++q)
    e[q] = t == Trans::N ? Entry{s.row[q], s.col[q], s.high[q]} : Entry{s.col[q], s.row[q], s.high[q]};
  return e;
}

// The distinct values of one coordinate, ascending, and each one's position.
struct Selection {
  std::vector<std::int64_t> list;  // distinct indices
  std::vector<std::int64_t> pos;   // index -> position in list, or -1
};
template <class Get> Selection select(const std::vector<Entry>& e, std::int64_t dim, Get get) {
  Selection s;
  s.pos.assign(static_cast<std::size_t>(dim), -1);
  for (const Entry& x : e) s.pos[static_cast<std::size_t>(get(x))] = 0;
  for (std::int64_t i = 0; i < dim; ++i) {
    if (s.pos[static_cast<std::size_t>(i)] == 0) {
      s.pos[static_cast<std::size_t>(i)] = static_cast<std::int64_t>(s.list.size());
      s.list.push_back(i);
    }
  }
  return s;
}

// A map from the rows (or columns) of a gathered block into the destination's.
std::vector<std::int64_t> compose(const std::vector<std::int64_t>* outer, const std::vector<std::int64_t>& inner,
                                  std::int64_t pad) {
  std::vector<std::int64_t> m(static_cast<std::size_t>(pad), -1);
  for (std::size_t q = 0; q < inner.size(); ++q) m[q] = outer ? (*outer)[static_cast<std::size_t>(inner[q])] : inner[q];
  return m;
}

// Rows (`rows_of_op`) or columns of op(X) at `idx`, padded with zeros to
// `pad` lines, in format f (for a split X, the merged values: f = fixed(15)).
// The block keeps X's orientation, so every copy reads and writes along
// storage rows: op_t(block) is the gathered op(X)[idx, :] or op(X)[:, idx].
struct Gathered {
  Tensor block;
  Trans t;
};
Gathered gather(const TiledOperand& X, Trans t, bool rows_of_op, const std::vector<std::int64_t>& idx,
                std::int64_t pad, const Format& f) {
  const Tensor& D = X.dense();
  const std::int64_t rows = D.rows(), cols = D.cols();
  const bool storage_rows = rows_of_op == (t == Trans::N);  // the lines are storage rows
  Gathered g{Tensor(storage_rows ? Shape{pad, cols} : Shape{rows, pad}, f), t};
  const std::int64_t gc = g.block.cols();
  std::vector<std::int64_t> pos(static_cast<std::size_t>(storage_rows ? rows : cols), -1);
  for (std::size_t q = 0; q < idx.size(); ++q) pos[static_cast<std::size_t>(idx[q])] = static_cast<std::int64_t>(q);
  visit_int(D, [&](const auto* x) {
    visit_int(g.block, [&](auto* o) {
      using TO = std::remove_pointer_t<decltype(o)>;
      if (storage_rows) {
        for (std::size_t q = 0; q < idx.size(); ++q) {
          const auto* src = x + idx[q] * cols;
          TO* dst = o + static_cast<std::int64_t>(q) * gc;
          for (std::int64_t j = 0; j < cols; ++j) dst[j] = static_cast<TO>(src[j]);
        }
      } else {
        for (std::int64_t r = 0; r < rows; ++r) {
          const auto* src = x + r * cols;
          TO* dst = o + r * gc;
          for (std::size_t q = 0; q < idx.size(); ++q) dst[q] = static_cast<TO>(src[idx[q]]);
        }
      }
    });
  });
  if (X.is_split()) {
    const OutlierSplit& s = X.split();
    std::int16_t* o = g.block.data<std::int16_t>();
    for (std::size_t j = 0; j < s.index.size(); ++j) {
      const std::int64_t r = s.row[j], c = s.col[j];
      const std::int64_t q = pos[static_cast<std::size_t>(storage_rows ? r : c)];
      if (q < 0) continue;
      const std::int64_t at = storage_rows ? q * gc + c : r * gc + q;
      o[at] = static_cast<std::int16_t>(o[at] + s.high[j] * (1 << kOutlierShift));
    }
  }
  return g;
}

// How many distinct storage rows and columns of a rank-2 split hold an
// outlier: all the cost model needs, without building the entries (the
// scatter does not use them).
struct Distinct {
  std::int64_t rows = 0, cols = 0;
};
Distinct distinct_lines(const OutlierSplit& s) {
  std::vector<std::uint8_t> seen_row(static_cast<std::size_t>(s.bulk.rows()), 0), seen_col(static_cast<std::size_t>(s.bulk.cols()), 0);
  Distinct d;
  for (std::size_t q = 0; q < s.index.size(); ++q) {
    const std::int64_t r = s.row[q], c = s.col[q];
    d.rows += seen_row[static_cast<std::size_t>(r)] == 0;
    d.cols += seen_col[static_cast<std::size_t>(c)] == 0;
    seen_row[static_cast<std::size_t>(r)] = 1;
    seen_col[static_cast<std::size_t>(c)] = 1;
  }
  return d;
}

Format gathered_format(const TiledOperand& X) { return X.is_split() ? Format::fixed(15) : X.dense().format(); }

// ---- outlier by outlier ----------------------------------------------------
//
// C += 2^7·op(A_o)·op(B) + 2^7·op(A_b)·op(B_o) one outlier at a time, for
// outliers spread so thinly that every gathered tile would be the whole
// matrix (docs/outliers.md, "Speed"), and for batches of matrices (rank 3,
// attention's products), where tiles gathered per matrix would cost one
// oneDNN call per matrix. B is taken merged in the first term, so the
// outlier x outlier products are in it.
//   An outlier (i, k, h) of op(A) adds 2^7·h·op(B)[k, :] into row i of C.
//   An outlier (k, j, h) of op(B) adds 2^7·h·op(A_b)[:, k] into column j;
//   the column is summed in a buffer of M first, so that every inner loop
//   runs along contiguous memory (op(A)ᵀ's rows).
// Every term is an int8 times a value of at most 16 bits, shifted by 7:
// |term| < 2^29, formed in int32; sums are modular in C's unsigned width,
// exact because the final value fits C. Cost: outliers of A times N plus
// outliers of B times M vectorised multiply-adds, plus a transposed copy of
// an operand whose lines are not rows in storage.

// The outliers of a split grouped by lines of op(S) (its rows, or its
// columns), over a batch of matrices: line q is matrix line[q] / L, row or
// column line[q] % L, and holds the outliers [start[q], start[q + 1]) with
// their other coordinate of op(S) and their high piece.
struct OutlierLines {
  std::vector<std::int64_t> line, start, other;
  std::vector<std::int8_t> high;
};
OutlierLines group_by_line(const OutlierSplit& S, Trans t, bool rows_of_op) {
  const std::int64_t r = S.bulk.rows(), c = S.bulk.cols();
  const bool storage_rows = rows_of_op == (t == Trans::N);  // the lines are storage rows
  const std::int64_t L = storage_rows ? r : c;               // lines per matrix
  const std::size_t n = S.index.size();
  OutlierLines g;
  if (storage_rows) {
    // The flat indices ascend, so the outliers already come line by line
    // (a storage row counted over the batch is b·r + row: the line itself).
    for (std::size_t q = 0; q < n; ++q) {
      if (g.line.empty() || g.line.back() != S.row[q]) {
        g.line.push_back(S.row[q]);
        g.start.push_back(static_cast<std::int64_t>(q));
      }
    }
    g.other.assign(S.col.begin(), S.col.end());
    g.high.assign(S.high.begin(), S.high.end());
    g.start.push_back(static_cast<std::int64_t>(n));
    return g;
  }
  // Lines are columns: each outlier's line (b·c + column) and its row, then
  // a counting sort by line (stable: each line keeps the index order).
  std::vector<std::int64_t> key(n), other(n);
  if (S.bulk.batch() == 1) {
    key.assign(S.col.begin(), S.col.end());
    other.assign(S.row.begin(), S.row.end());
  } else {
    const LineDivider by_rows(r);
    for (std::size_t q = 0; q < n; ++q) {
      const std::int64_t b = by_rows.quot(S.row[q]);  // the row counts over the batch
      key[q] = b * c + S.col[q];
      other[q] = S.row[q] - b * r;
    }
  }
  std::vector<std::int64_t> count(static_cast<std::size_t>(S.bulk.batch() * L) + 1, 0);
  g.other.resize(n);
  for (const std::int64_t k : key) ++count[static_cast<std::size_t>(k) + 1];
  g.high.resize(n);
  for (std::size_t q = 1; q < count.size(); ++q) {
    if (count[q] > 0) {
      g.line.push_back(static_cast<std::int64_t>(q) - 1);
      g.start.push_back(count[q - 1]);
    }
    count[q] += count[q - 1];
  }
  g.start.push_back(static_cast<std::int64_t>(n));
  for (std::size_t q = 0; q < n; ++q) {
    const auto at = static_cast<std::size_t>(count[static_cast<std::size_t>(key[q])]++);
    g.other[at] = other[q];
    g.high[at] = S.high[q];
  }
  return g;
}

// Each matrix of a batch transposed, in the same format.
Tensor transposed(const Tensor& X) {
  const std::int64_t r = X.rows(), c = X.cols();
  Tensor T = Tensor::uninitialized(X.rank() == 3 ? Shape{X.batch(), c, r} : Shape{c, r}, X.format(), X.exponent());
  // Tiles of kTile x kTile: each reads kTile rows and writes kTile rows, so
  // the strided side stays within a few cache lines per tile.
  constexpr std::int64_t kTile = 32;
  const std::int64_t row_tiles = (r + kTile - 1) / kTile;
  visit_int(X, [&](const auto* x) {
    using TX = std::remove_const_t<std::remove_pointer_t<decltype(x)>>;
    TX* o = T.data<TX>();
    for_chunks(X.batch() * row_tiles, [&](std::int64_t, std::int64_t t0, std::int64_t t1) {
      for (std::int64_t t = t0; t < t1; ++t) {
        const std::int64_t b = t / row_tiles, i0 = (t % row_tiles) * kTile, i1 = std::min(r, i0 + kTile);
        const TX* xb = x + b * r * c;
        TX* ob = o + b * r * c;
        for (std::int64_t j0 = 0; j0 < c; j0 += kTile) {
          const std::int64_t j1 = std::min(c, j0 + kTile);
          for (std::int64_t j = j0; j < j1; ++j)
            for (std::int64_t i = i0; i < i1; ++i) ob[j * r + i] = xb[i * c + j];
        }
      }
    }, std::max<std::int64_t>(1, kChunk / std::max<std::int64_t>(kTile * c, 1)));
  });
  return T;
}

// A tensor whose rows are the lines an outlier term reads: a view of an
// operand that already has them in storage, or a copy.
struct RowSource {
  Tensor owned;
  const Tensor* view = nullptr;
  const Tensor& get() const { return view ? *view : owned; }
};
// The rows of op(X), merged if X is split.
RowSource op_rows_source(const TiledOperand& X, Trans t) {
  if (!X.is_split()) return t == Trans::N ? RowSource{{}, &X.dense()} : RowSource{transposed(X.dense())};
  return RowSource{t == Trans::N ? X.split().merged() : transposed(X.split().merged())};
}
// The columns of op(X) as rows, from X's plain values or bulk.
RowSource op_cols_source(const TiledOperand& X, Trans t) {
  return t == Trans::T ? RowSource{{}, &X.dense()} : RowSource{transposed(X.dense())};
}
// One multiply-add of the scatter against one of a gathered int8 tile
// product (oneDNN, VNNI): the rank-2 products pick the cheaper (bench_outlier).
constexpr double kScatterCost = 8.0;
// Elements a RowSource copies (the scatter's setup cost).
std::int64_t copied_elements(const TiledOperand& X, Trans t, bool rows) {
  return (rows ? (X.is_split() || t == Trans::T) : t == Trans::N) ? X.dense().numel() : 0;
}

// c[j] += (h·v[j]) << shift, modulo C's width (see above).
// With int8 v the product fits int16 (|h·v| <= 127²), which vectorises
// with twice the lanes of a 32-bit multiply.
template <class U, class V>
INTRAIN_INLINE void add_scaled_body(U* __restrict c, const V* __restrict v, std::int64_t n, std::int32_t h, int shift) {
  using P = std::conditional_t<sizeof(V) == 1, std::int16_t, std::int32_t>;
  const P hp = static_cast<P>(h);
  for (std::int64_t j = 0; j < n; ++j) {
    const P prod = static_cast<P>(hp * static_cast<P>(v[j]));
    c[j] += static_cast<U>(static_cast<U>(static_cast<std::int64_t>(prod)) << shift);
  }
}
INTRAIN_CLONES void add_scaled(std::uint32_t* c, const std::int8_t* v, std::int64_t n, std::int32_t h, int s) { add_scaled_body(c, v, n, h, s); }
INTRAIN_CLONES void add_scaled(std::uint32_t* c, const std::int16_t* v, std::int64_t n, std::int32_t h, int s) { add_scaled_body(c, v, n, h, s); }
INTRAIN_CLONES void add_scaled(std::uint64_t* c, const std::int8_t* v, std::int64_t n, std::int32_t h, int s) { add_scaled_body(c, v, n, h, s); }
INTRAIN_CLONES void add_scaled(std::uint64_t* c, const std::int16_t* v, std::int64_t n, std::int32_t h, int s) { add_scaled_body(c, v, n, h, s); }

template <class F> void visit_unsigned(Tensor& C, F&& f) {
  if (C.dtype() == DType::I32) {
    f(reinterpret_cast<std::uint32_t*>(C.data<std::int32_t>()));
  } else {
    f(reinterpret_cast<std::uint64_t*>(C.data<std::int64_t>()));
  }
}
template <class F> void visit_narrow_values(const Tensor& X, F&& f) {
  if (X.dtype() == DType::I8) {
    f(X.data<std::int8_t>());
  } else {
    f(X.data<std::int16_t>());
  }
}

// Lines per parallel chunk of a scatter: about kChunk multiply-adds each.
// A line costs its outliers times `len`, so chunks sized by lines alone
// (kChunk / len) would leave a 1%-outlier layer one chunk: serial. The size
// depends on the split only, never on the thread count, and the sums are
// exact, so the result is the same for any chunking.
std::int64_t lines_per_chunk(const OutlierSplit& S, std::int64_t lines, std::int64_t len) {
  const std::int64_t per_line = (S.outliers() + lines - 1) / std::max<std::int64_t>(lines, 1);
  return std::max<std::int64_t>(1, kChunk / std::max<std::int64_t>(per_line * len, 1));
}

// Under a 64-bit C a line's terms h·v are summed unshifted in 32 bits when
// at most this many meet: |h·v| <= 127·2^(bits of V - 1) per term, so 516
// terms of int16 values or 132,104 of int8 ones stay below 2^31.
template <class V> constexpr std::int64_t terms_that_fit_int32() {
  return std::numeric_limits<std::int32_t>::max() / (127 * (std::int64_t{1} << (8 * sizeof(V) - 1)));
}
static_assert(terms_that_fit_int32<std::int16_t>() == 516 && terms_that_fit_int32<std::int8_t>() == 132104);

// C += 2^7·op(A_o)·op(B), A_o the outliers of S (op(S) is [batch,] M x K).
void scatter_left(const OutlierSplit& S, Trans ta, const TiledOperand& B, Trans tb, const MatmulDims& dm, Tensor& C) {
  if (S.index.empty()) return;
  const OutlierLines g = group_by_line(S, ta, /*rows_of_op=*/true);
  const RowSource rows = op_rows_source(B, tb);  // [batch,] K x N
  const std::int64_t M = dm.M, K = dm.K, N = dm.N, nl = static_cast<std::int64_t>(g.line.size());
  visit_unsigned(C, [&](auto* c) {
    using U = std::remove_pointer_t<decltype(c)>;
    visit_narrow_values(rows.get(), [&](const auto* v) {
      using V = std::remove_const_t<std::remove_pointer_t<decltype(v)>>;
      // A 64-bit C (wide products, dW) sums each line's terms in 32 bits
      // first, twice the vector lanes, when they provably fit.
      constexpr std::int64_t fits32 = terms_that_fit_int32<V>();
      for_chunks(nl, [&](std::int64_t, std::int64_t l0, std::int64_t l1) {
        std::vector<std::uint32_t> line32;
        for (std::int64_t l = l0; l < l1; ++l) {
          const std::int64_t b = g.line[static_cast<std::size_t>(l)] / M;
          U* crow = c + g.line[static_cast<std::size_t>(l)] * N;
          const std::int64_t q0 = g.start[static_cast<std::size_t>(l)], q1 = g.start[static_cast<std::size_t>(l) + 1];
          auto src = [&](std::int64_t q) { return v + (b * K + g.other[static_cast<std::size_t>(q)]) * N; };
          if (sizeof(U) == 8 && q1 - q0 > 1 && q1 - q0 <= fits32) {
            line32.assign(static_cast<std::size_t>(N), 0u);
            for (std::int64_t q = q0; q < q1; ++q) add_scaled(line32.data(), src(q), N, g.high[static_cast<std::size_t>(q)], 0);
            add_row(crow, reinterpret_cast<const std::int32_t*>(line32.data()), N, kOutlierShift);
            continue;
          }
          for (std::int64_t q = q0; q < q1; ++q) add_scaled(crow, src(q), N, g.high[static_cast<std::size_t>(q)], kOutlierShift);
        }
      }, lines_per_chunk(S, nl, N));
    });
  });
}

// C += 2^7·op(A)·op(B_o), B_o the outliers of S (op(S) is [batch,] K x N),
// A plain or the bulk of a split.
void scatter_right(const TiledOperand& A, Trans ta, const OutlierSplit& S, Trans tb, const MatmulDims& dm, Tensor& C) {
  if (S.index.empty()) return;
  const OutlierLines g = group_by_line(S, tb, /*rows_of_op=*/false);
  const RowSource cols = op_cols_source(A, ta);  // [batch,] K x M: the columns of op(A)
  const std::int64_t M = dm.M, K = dm.K, N = dm.N, nl = static_cast<std::int64_t>(g.line.size());
  visit_unsigned(C, [&](auto* c) {
    using U = std::remove_pointer_t<decltype(c)>;
    visit_narrow_values(cols.get(), [&](const auto* v) {
      using V = std::remove_const_t<std::remove_pointer_t<decltype(v)>>;
      // As in scatter_left: with a 64-bit C the columns are summed in 32
      // bits when every line's terms provably fit.
      constexpr std::int64_t fits32 = terms_that_fit_int32<V>();
      for_chunks(nl, [&](std::int64_t, std::int64_t l0, std::int64_t l1) {
        // The chunk's columns, one per row of `cols` (l-major), then added
        // into C row by row: a column written element by element would
        // stride by N and thrash the cache sets.
        const std::int64_t n = l1 - l0;
        std::vector<std::int64_t> at(static_cast<std::size_t>(n));  // where column l starts in C
        bool narrow = sizeof(U) == 8;
        for (std::int64_t l = l0; l < l1; ++l) {
          const std::int64_t b = g.line[static_cast<std::size_t>(l)] / N, j = g.line[static_cast<std::size_t>(l)] % N;
          at[static_cast<std::size_t>(l - l0)] = b * M * N + j;
          narrow = narrow && g.start[static_cast<std::size_t>(l) + 1] - g.start[static_cast<std::size_t>(l)] <= fits32;
        }
        auto sum_and_add = [&](auto zero, int shift) {
          using Sum = decltype(zero);
          std::vector<Sum> sums(static_cast<std::size_t>(n * M), zero);
          for (std::int64_t l = l0; l < l1; ++l) {
            const std::int64_t b = g.line[static_cast<std::size_t>(l)] / N;
            Sum* column = sums.data() + (l - l0) * M;
            for (std::int64_t q = g.start[static_cast<std::size_t>(l)]; q < g.start[static_cast<std::size_t>(l) + 1]; ++q)
              add_scaled(column, v + (b * K + g.other[static_cast<std::size_t>(q)]) * M, M, g.high[static_cast<std::size_t>(q)], shift);
          }
          // Distinct lines write distinct columns of C: no two chunks meet.
          // Narrow sums are signed 32-bit values, widened and shifted here.
          for (std::int64_t i = 0; i < M; ++i)
            for (std::int64_t l = 0; l < n; ++l) {
              const Sum x = sums[static_cast<std::size_t>(l * M + i)];
              c[at[static_cast<std::size_t>(l)] + i * N] +=
                  sizeof(Sum) == sizeof(U) ? static_cast<U>(x)
                                         : static_cast<U>(static_cast<U>(static_cast<std::int64_t>(static_cast<std::int32_t>(x))) << kOutlierShift);
            }
        };
        if (narrow) {
          sum_and_add(std::uint32_t{0}, 0);
        } else {
          sum_and_add(U{0}, kOutlierShift);
        }
      }, lines_per_chunk(S, nl, M));
    });
  });
}

void sparse_right(const Tensor& A, Trans ta, const OutlierSplit& S, Trans tb, const Dest& d, int shift,
                  OutlierProduct how = OutlierProduct::Tiles);

// Whether a rank-2 outlier term goes outlier by outlier: forced, or cheaper.
// Only for a whole result (the nested terms of a gathered tile stay tiles).
bool one_by_one(OutlierProduct how, double cost_scatter, double cost_tiles, const Dest& d, int shift) {
  if (d.rows || d.cols || shift != kOutlierShift || how == OutlierProduct::Tiles) return false;
  return how == OutlierProduct::OneByOne || cost_scatter < cost_tiles;
}

// d += (op(A_o)·op(B)) << shift, A_o the outlier part of S (op(A) is M x K).
void sparse_left(const OutlierSplit& S, Trans ta, const TiledOperand& B, Trans tb, const Dest& d, int shift,
                 OutlierProduct how) {
  if (S.index.empty()) return;
  const std::int64_t M = ta == Trans::N ? S.bulk.rows() : S.bulk.cols();
  const std::int64_t K = ta == Trans::N ? S.bulk.cols() : S.bulk.rows();
  const std::int64_t N = tb == Trans::N ? B.dense().cols() : B.dense().rows();
  const Distinct dl = distinct_lines(S);
  const std::int64_t nr = ta == Trans::N ? dl.rows : dl.cols, nk = ta == Trans::N ? dl.cols : dl.rows;
  const double cost_rows = static_cast<double>(nr) * K * N;
  const double cost_k = static_cast<double>(M) * nk * N * (B.is_split() ? 2 : 1);  // int8 x int16 is two products
  const double cost_scatter = kScatterCost * (static_cast<double>(S.outliers()) * N + copied_elements(B, tb, true));
  if (one_by_one(how, cost_scatter, std::min(cost_rows, cost_k), d, shift)) {
    scatter_left(S, ta, B, tb, MatmulDims{1, M, K, N}, *d.C);
    return;
  }
  const std::vector<Entry> e = entries(S, ta);
  const Selection rows = select(e, M, [](const Entry& x) { return x.i; });
  const Selection ks = select(e, K, [](const Entry& x) { return x.j; });
  if (cost_rows <= cost_k) {
    // The rows of op(A) that hold an outlier, times all of op(B).
    const std::int64_t pad = padded(nr, M);
    Tensor G({pad, K}, Format::fixed(8));
    std::int8_t* g = G.data<std::int8_t>();
    for (const Entry& x : e) g[rows.pos[static_cast<std::size_t>(x.i)] * K + x.j] = x.high;
    const std::vector<std::int64_t> map = compose(d.rows, rows.list, pad);
    const Dest sub{d.C, &map, d.cols};
    add_into(sub, matmul(G, B.dense(), Trans::N, tb), shift);
    if (B.is_split()) sparse_right(G, Trans::N, B.split(), tb, sub, shift + kOutlierShift);
  } else {
    // The slices of K that hold an outlier: op(A_o)[:, ks] · op(B)[ks, :].
    const std::int64_t pad = padded(nk, K);
    Tensor G({M, pad}, Format::fixed(8));
    std::int8_t* g = G.data<std::int8_t>();
    for (const Entry& x : e) g[x.i * pad + ks.pos[static_cast<std::size_t>(x.j)]] = x.high;
    const Gathered Bg = gather(B, tb, /*rows_of_op=*/true, ks.list, pad, gathered_format(B));
    add_into(d, matmul(G, Bg.block, Trans::N, Bg.t), shift);
  }
}

// d += (op(A)·op(B_o)) << shift, B_o the outlier part of S, A plain (op(B) is K x N).
void sparse_right(const Tensor& A, Trans ta, const OutlierSplit& S, Trans tb, const Dest& d, int shift,
                  OutlierProduct how) {
  if (S.index.empty()) return;
  const std::int64_t K = tb == Trans::N ? S.bulk.rows() : S.bulk.cols();
  const std::int64_t N = tb == Trans::N ? S.bulk.cols() : S.bulk.rows();
  const std::int64_t M = ta == Trans::N ? A.rows() : A.cols();
  const Distinct dl = distinct_lines(S);
  const std::int64_t nc = tb == Trans::N ? dl.cols : dl.rows, nk = tb == Trans::N ? dl.rows : dl.cols;
  const double cost_cols = static_cast<double>(M) * K * nc, cost_k = static_cast<double>(M) * nk * N;
  const double cost_scatter = kScatterCost * (static_cast<double>(S.outliers()) * M + copied_elements(A, ta, false));
  if (one_by_one(how, cost_scatter, std::min(cost_cols, cost_k), d, shift)) {
    scatter_right(A, ta, S, tb, MatmulDims{1, M, K, N}, *d.C);
    return;
  }
  const std::vector<Entry> e = entries(S, tb);
  const Selection cols = select(e, N, [](const Entry& x) { return x.j; });
  const Selection ks = select(e, K, [](const Entry& x) { return x.i; });
  if (cost_cols <= cost_k) {
    // The columns of op(B) that hold an outlier.
    const std::int64_t pad = padded(nc, N);
    Tensor G({K, pad}, Format::fixed(8));
    std::int8_t* g = G.data<std::int8_t>();
    for (const Entry& x : e) g[x.i * pad + cols.pos[static_cast<std::size_t>(x.j)]] = x.high;
    const std::vector<std::int64_t> map = compose(d.cols, cols.list, pad);
    add_into(Dest{d.C, d.rows, &map}, matmul(A, G, ta, Trans::N), shift);
  } else {
    // The slices of K that hold an outlier: op(A)[:, ks] · op(B_o)[ks, :].
    const std::int64_t pad = padded(nk, K);
    Tensor G({pad, N}, Format::fixed(8));
    std::int8_t* g = G.data<std::int8_t>();
    for (const Entry& x : e) g[ks.pos[static_cast<std::size_t>(x.i)] * N + x.j] = x.high;
    const Gathered Ag = gather(TiledOperand(A), ta, /*rows_of_op=*/false, ks.list, pad, A.format());
    add_into(d, matmul(Ag.block, G, Ag.t, Trans::N), shift);
  }
}

}  // namespace

Tensor matmul_tiled(const TiledOperand& A, const TiledOperand& B, Trans ta, Trans tb, OutlierProduct how) {
  const MatmulDims dims = matmul_dims(A.dense(), B.dense(), ta, tb);
  if (A.dense().rank() != B.dense().rank() || A.dense().rank() < 2 || A.dense().rank() > 3) {
    throw std::invalid_argument("matmul_tiled: operands must both be matrices (rank 2) or batches of matrices "
                                "(rank 3), got " + A.dense().describe() + " and " + B.dense().describe());
  }
  const Format rf = matmul_result_format(A.value_format(), B.value_format(), dims.K);
  const int exponent = A.exponent() + B.exponent();
  // The bulk product; oneDNN writes it straight into C when it has C's width.
  Tensor C = matmul(A.dense(), B.dense(), ta, tb);
  if (C.format() != rf) {
    Tensor wide(C.shape(), rf);
    visit_int(C, [&](const auto* x) {
      visit_int(wide, [&](auto* w) {
        using TW = std::remove_pointer_t<decltype(w)>;
        for (std::int64_t i = 0; i < C.numel(); ++i) w[i] = static_cast<TW>(x[i]);
      });
    });
    C = std::move(wide);
  }
  C.set_exponent(exponent);
  if (A.dense().rank() == 3) {
    if (A.is_split()) scatter_left(A.split(), ta, B, tb, dims, C);
    if (B.is_split()) scatter_right(A, ta, B.split(), tb, dims, C);
    return C;
  }
  if (A.is_split()) sparse_left(A.split(), ta, B, tb, Dest{&C}, kOutlierShift, how);
  if (B.is_split()) sparse_right(A.dense(), ta, B.split(), tb, Dest{&C}, kOutlierShift, how);
  return C;
}

}  // namespace intrain
