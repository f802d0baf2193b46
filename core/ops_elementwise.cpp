// Elementwise and layout ops: cast, bias, residual, embedding, head layouts.
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "core/collective.h"
#include "core/fixed_point.h"
#include "core/ops.h"
#include "core/parallel.h"
#include "core/quantize.h"
#include "core/simd.h"

namespace intrain {

namespace {

void check(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}

// Mantissa i of an integer tensor as int64.
template <class F> void for_int(const Tensor& t, F&& f) { visit_int(t, std::forward<F>(f)); }

// An acc64 tensor of the given shape and exponent; zero-filled only when the
// caller accumulates into it.
Tensor acc64(Shape shape, int exponent, bool zero = false) {
  return zero ? Tensor(std::move(shape), Format::accumulator(64), exponent)
              : Tensor::uninitialized(std::move(shape), Format::accumulator(64), exponent);
}

// out[r, n] = shift(acc[r, n]) + bias[n]; returns max |out|.
template <class A>
INTRAIN_INLINE std::uint64_t bias_rows_body(const A* acc, std::int64_t R, std::int64_t N, const std::int64_t* bias,
                                            ExponentShift sh, std::int64_t* out) {
  std::uint64_t mx = 0;
  for (std::int64_t r = 0; r < R; ++r)
    for (std::int64_t n = 0; n < N; ++n) {
      const std::int64_t o = sh(acc[r * N + n]) + bias[n];
      out[r * N + n] = o;
      const std::uint64_t a = o < 0 ? 0 - static_cast<std::uint64_t>(o) : static_cast<std::uint64_t>(o);
      mx = a > mx ? a : mx;
    }
  return mx;
}
INTRAIN_CLONES std::uint64_t bias_rows(const std::int32_t* acc, std::int64_t R, std::int64_t N, const std::int64_t* bias,
                                       ExponentShift sh, std::int64_t* out) {
  return bias_rows_body(acc, R, N, bias, sh, out);
}
INTRAIN_CLONES std::uint64_t bias_rows(const std::int64_t* acc, std::int64_t R, std::int64_t N, const std::int64_t* bias,
                                       ExponentShift sh, std::int64_t* out) {
  return bias_rows_body(acc, R, N, bias, sh, out);
}
template <class A>
std::uint64_t bias_rows(const A* acc, std::int64_t R, std::int64_t N, const std::int64_t* bias, ExponentShift sh,
                        std::int64_t* out) {
  return bias_rows_body(acc, R, N, bias, sh, out);
}

// out = shift_a(a) + shift_b(b), elementwise; returns max |out|.
template <class A, class B>
INTRAIN_INLINE std::uint64_t add_body(const A* a, ExponentShift sa, const B* b, ExponentShift sb, std::int64_t n,
                                      std::int64_t* out) {
  std::uint64_t mx = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int64_t o = sa(a[i]) + sb(b[i]);
    out[i] = o;
    const std::uint64_t u = o < 0 ? 0 - static_cast<std::uint64_t>(o) : static_cast<std::uint64_t>(o);
    mx = u > mx ? u : mx;
  }
  return mx;
}
INTRAIN_CLONES std::uint64_t add_kernel(const std::int32_t* a, ExponentShift sa, const std::int32_t* b, ExponentShift sb,
                                        std::int64_t n, std::int64_t* out) {
  return add_body(a, sa, b, sb, n, out);
}
INTRAIN_CLONES std::uint64_t add_kernel(const std::int32_t* a, ExponentShift sa, const std::int64_t* b, ExponentShift sb,
                                        std::int64_t n, std::int64_t* out) {
  return add_body(a, sa, b, sb, n, out);
}
template <class A, class B>
std::uint64_t add_kernel(const A* a, ExponentShift sa, const B* b, ExponentShift sb, std::int64_t n, std::int64_t* out) {
  return add_body(a, sa, b, sb, n, out);
}

// sums[n] += x[r, n] over rows [r0, r1).
template <class T>
INTRAIN_INLINE void column_sums_body(const T* x, std::int64_t r0, std::int64_t r1, std::int64_t N, std::int64_t* sums) {
  for (std::int64_t r = r0; r < r1; ++r)
    for (std::int64_t n = 0; n < N; ++n) sums[n] += x[r * N + n];
}
INTRAIN_CLONES void column_sums(const std::int8_t* x, std::int64_t r0, std::int64_t r1, std::int64_t N, std::int64_t* s) {
  column_sums_body(x, r0, r1, N, s);
}
INTRAIN_CLONES void column_sums(const std::int16_t* x, std::int64_t r0, std::int64_t r1, std::int64_t N, std::int64_t* s) {
  column_sums_body(x, r0, r1, N, s);
}
template <class T> void column_sums(const T* x, std::int64_t r0, std::int64_t r1, std::int64_t N, std::int64_t* s) {
  column_sums_body(x, r0, r1, N, s);
}

std::uint64_t max_all(const std::vector<std::uint64_t>& v) {
  std::uint64_t m = 0;
  for (auto x : v) m = std::max(m, x);
  return m;
}

}  // namespace

Tensor cast(const Tensor& x, const Format& f, RngKey key) {
  const bool xf = x.format().is_float();
  if (xf && f.is_float()) return x;
  if (xf) {
    return quantize(std::span<const float>(x.data<float>(), static_cast<std::size_t>(x.numel())), x.shape(), f, key);
  }
  if (f.is_float()) {
    Tensor y(x.shape(), Format::fp32());
    dequantize_into(x, std::span<float>(y.data<float>(), static_cast<std::size_t>(y.numel())));
    return y;
  }
  // (A batch slice skips the saturation test: requantizing would be a no-op
  // here, and the ranks must agree on whether to call it.)
  if (x.format() == f && (x.saturated() == 0 || is_batch_slice(key))) return x;
  return requantize(x, f, key);
}

// ---------------------------------------------------------------------------
// bias_add: y = acc + bias (broadcast over rows), then cast.
// Integer: both are brought to one exponent in int64 (exact left shifts of
// the coarser one, see common_exponent), added, and requantized once.
// ---------------------------------------------------------------------------
Tensor bias_add(const Tensor& acc, const Tensor* bias, const Format& out, RngKey key) {
  if (!bias) return cast(acc, out, key);
  const std::int64_t R = acc.numel() / std::max<std::int64_t>(acc.cols(), 1), N = acc.cols();
  check(bias->numel() == N, "bias_add: bias " + bias->describe() + " does not match the columns of " + acc.describe());
  if (acc.format().is_float()) {
    Tensor y = acc;
    float* p = y.data<float>();
    const float* b = bias->data<float>();
    for_chunks(R, [&](std::int64_t, std::int64_t r0, std::int64_t r1) {
      for (std::int64_t r = r0; r < r1; ++r)
        for (std::int64_t n = 0; n < N; ++n) p[r * N + n] += b[n];
    }, std::max<std::int64_t>(1, kChunk / std::max<std::int64_t>(N, 1)));
    return cast(y, out, key);
  }
  const int e =
      common_exponent(slice_max(key, max_abs_mantissa(acc)), acc.exponent(), max_abs_mantissa(*bias), bias->exponent());
  std::vector<std::int64_t> b(static_cast<std::size_t>(N));
  for_int(*bias, [&](const auto* p) {
    for (std::int64_t n = 0; n < N; ++n) b[static_cast<std::size_t>(n)] = shift_to(p[n], bias->exponent(), e);
  });
  Tensor sum = acc64(acc.shape(), e);
  std::int64_t* s = sum.data<std::int64_t>();
  const ExponentShift sh(acc.exponent(), e);
  const std::int64_t rows_per_chunk = std::max<std::int64_t>(1, kChunk / std::max<std::int64_t>(N, 1));
  std::vector<std::uint64_t> mx(static_cast<std::size_t>(num_chunks(R, rows_per_chunk)), 0);
  for_int(acc, [&](const auto* a) {
    for_chunks(R, [&](std::int64_t c, std::int64_t r0, std::int64_t r1) {
      mx[static_cast<std::size_t>(c)] = bias_rows(a + r0 * N, r1 - r0, N, b.data(), sh, s + r0 * N);
    }, rows_per_chunk);
  });
  return requantize_with_max(sum, max_all(mx), out, key);
}

Tensor sum_rows(const Tensor& dy) {
  const std::int64_t N = dy.cols(), R = dy.numel() / std::max<std::int64_t>(N, 1);
  if (dy.format().is_float()) {
    Tensor out({N}, Format::fp32());
    float* o = out.data<float>();
    const float* p = dy.data<float>();
    // Each column is summed by one thread in row order: deterministic.
    for_chunks(N, [&](std::int64_t, std::int64_t n0, std::int64_t n1) {
      for (std::int64_t r = 0; r < R; ++r)
        for (std::int64_t n = n0; n < n1; ++n) o[n] += p[r * N + n];
    }, 64);
    return out;
  }
  // Partial column sums per chunk of rows, added in chunk order (exact).
  Tensor out = acc64({N}, dy.exponent(), true);
  std::int64_t* o = out.data<std::int64_t>();
  const std::int64_t rows_per_chunk = std::max<std::int64_t>(1, kChunk / std::max<std::int64_t>(N, 1));
  const std::int64_t nc = num_chunks(R, rows_per_chunk);
  std::vector<std::int64_t> part(static_cast<std::size_t>(nc * N), 0);
  for_int(dy, [&](const auto* p) {
    for_chunks(R, [&](std::int64_t c, std::int64_t r0, std::int64_t r1) {
      column_sums(p, r0, r1, N, part.data() + c * N);
    }, rows_per_chunk);
  });
  for (std::int64_t c = 0; c < nc; ++c)
    for (std::int64_t n = 0; n < N; ++n) o[n] += part[static_cast<std::size_t>(c * N + n)];
  return out;
}

// Elementwise sum of two same-shape tensors into an exact acc64 (integer);
// also returns max |sum|. `key` marks batch slices (their exponent is global).
static Tensor aligned_sum(const Tensor& a, const Tensor& b, RngKey key, std::uint64_t* max_out = nullptr) {
  const int e = common_exponent(slice_max(key, max_abs_mantissa(a)), a.exponent(), slice_max(key, max_abs_mantissa(b)),
                                b.exponent());
  Tensor s = acc64(a.shape(), e);
  std::int64_t* o = s.data<std::int64_t>();
  const ExponentShift sa(a.exponent(), e), sb(b.exponent(), e);
  std::vector<std::uint64_t> mx(static_cast<std::size_t>(num_chunks(a.numel())), 0);
  for_int(a, [&](const auto* pa) {
    for_int(b, [&](const auto* pb) {
      for_chunks(a.numel(), [&](std::int64_t c, std::int64_t i0, std::int64_t i1) {
        mx[static_cast<std::size_t>(c)] = add_kernel(pa + i0, sa, pb + i0, sb, i1 - i0, o + i0);
      });
    });
  });
  if (max_out) *max_out = max_all(mx);
  return s;
}

void residual_add(Tensor& h, const Tensor& x, RngKey key) {
  check(h.numel() == x.numel(), "residual_add: " + h.describe() + " and " + x.describe() + " differ in size");
  if (h.format().is_float()) {
    float* p = h.data<float>();
    const float* q = x.data<float>();
    for_chunks(h.numel(), [&](std::int64_t, std::int64_t i0, std::int64_t i1) {
      for (std::int64_t i = i0; i < i1; ++i) p[i] += q[i];
    });
    return;
  }
  std::uint64_t mx = 0;
  Tensor s = aligned_sum(h, x, key, &mx);
  s.reshape(h.shape());
  h = requantize_with_max(s, mx, residual_format(), key);
}

Tensor add_accumulators(const Tensor& a, const Tensor& b) {
  check(a.numel() == b.numel(), "add_accumulators: " + a.describe() + " and " + b.describe() + " differ in size");
  if (a.format().is_float()) {
    Tensor s = a;
    float* p = s.data<float>();
    const float* q = b.data<float>();
    for (std::int64_t i = 0; i < s.numel(); ++i) p[i] += q[i];
    return s;
  }
  return aligned_sum(a, b, RngKey{});
}

Tensor scale_accumulator(const Tensor& acc, double s) {
  check(std::isfinite(s) && s != 0.0, "scale_accumulator: the factor must be finite and non-zero, got " + std::to_string(s));
  if (acc.format().is_float()) {
    Tensor y = acc;
    float* p = y.data<float>();
    const float f = static_cast<float>(s);
    for (std::int64_t i = 0; i < y.numel(); ++i) p[i] *= f;
    return y;
  }
  // s = m * 2^-k with |m| in [2^15, 2^16): 16 significant bits.
  const int k = 15 - std::ilogb(s);
  const std::int64_t m = std::llround(std::ldexp(s, k));
  const std::uint64_t mx = max_abs_mantissa(acc);
  check(bit_length(mx) + bit_length(abs_u64(m)) <= 62,
        "scale_accumulator: " + acc.describe() + " times " + std::to_string(s) + " would overflow int64");
  Tensor y = acc64(acc.shape(), acc.exponent() - k);
  std::int64_t* o = y.data<std::int64_t>();
  for_int(acc, [&](const auto* a) {
    for_chunks(acc.numel(), [&](std::int64_t, std::int64_t i0, std::int64_t i1) {
      for (std::int64_t i = i0; i < i1; ++i) o[i] = static_cast<std::int64_t>(a[i]) * m;
    });
  });
  return y;
}

// ---------------------------------------------------------------------------
// Embedding: h = wte[token] + wpe[position].
// ---------------------------------------------------------------------------
Tensor embedding_forward(const std::int32_t* tokens, std::int64_t B, std::int64_t T, const Tensor& wte,
                         const Tensor& wpe) {
  const std::int64_t C = wte.cols(), V = wte.rows();
  check(wpe.cols() == C && wpe.rows() >= T, "embedding: wte " + wte.describe() + " and wpe " + wpe.describe() +
                                                " do not fit T = " + std::to_string(T));
  for (std::int64_t i = 0; i < B * T; ++i) {
    if (tokens[i] < 0 || tokens[i] >= V) {
      throw std::invalid_argument("embedding: token " + std::to_string(tokens[i]) + " at " + std::to_string(i) +
                                  " is outside the vocabulary of " + std::to_string(V));
    }
  }
  if (wte.format().is_float()) {
    Tensor h({B * T, C}, Format::fp32());
    float* o = h.data<float>();
    const float *te = wte.data<float>(), *pe = wpe.data<float>();
    for (std::int64_t i = 0; i < B * T; ++i)
      for (std::int64_t c = 0; c < C; ++c) o[i * C + c] = te[tokens[i] * C + c] + pe[(i % T) * C + c];
    return h;
  }
  const int e = common_exponent(max_abs_mantissa(wte), wte.exponent(), max_abs_mantissa(wpe), wpe.exponent());
  Tensor s = acc64({B * T, C}, e);
  std::int64_t* o = s.data<std::int64_t>();
  for_int(wte, [&](const auto* te) {
    for_int(wpe, [&](const auto* pe) {
      for (std::int64_t i = 0; i < B * T; ++i)
        for (std::int64_t c = 0; c < C; ++c)
          o[i * C + c] = shift_to(te[tokens[i] * C + c], wte.exponent(), e) +
                         shift_to(pe[(i % T) * C + c], wpe.exponent(), e);
    });
  });
  // The sum of two 16-bit values needs at most 17 bits: exact in wide(24).
  return requantize(s, residual_format(), RngKey{});
}

void embedding_backward(const std::int32_t* tokens, std::int64_t B, std::int64_t T, const Tensor& dh, Tensor& dwte,
                        Tensor& dwpe, std::int64_t vocab, std::int64_t n_ctx) {
  const std::int64_t C = dh.cols();
  // Serial scatter-add in row order: exact for integers and deterministic for floats.
  if (dh.format().is_float()) {
    dwte = Tensor({vocab, C}, Format::fp32());
    dwpe = Tensor({n_ctx, C}, Format::fp32());
    float *te = dwte.data<float>(), *pe = dwpe.data<float>();
    const float* g = dh.data<float>();
    for (std::int64_t i = 0; i < B * T; ++i)
      for (std::int64_t c = 0; c < C; ++c) {
        te[tokens[i] * C + c] += g[i * C + c];
        pe[(i % T) * C + c] += g[i * C + c];
      }
    return;
  }
  dwte = acc64({vocab, C}, dh.exponent(), true);
  dwpe = acc64({n_ctx, C}, dh.exponent(), true);
  std::int64_t *te = dwte.data<std::int64_t>(), *pe = dwpe.data<std::int64_t>();
  for_int(dh, [&](const auto* g) {
    for (std::int64_t i = 0; i < B * T; ++i)
      for (std::int64_t c = 0; c < C; ++c) {
        te[tokens[i] * C + c] += g[i * C + c];
        pe[(i % T) * C + c] += g[i * C + c];
      }
  });
}

// ---------------------------------------------------------------------------
// Head layouts. [B*T, H*D] rows are (b, t); head tensors are [B*H, T, D].
// ---------------------------------------------------------------------------
namespace {

// dst[(b*H + h)*T*D + t*D + d] = src[(b*T + t)*stride + offset + h*D + d]
template <class E>
void gather_heads(const E* src, E* dst, std::int64_t B, std::int64_t T, std::int64_t H, std::int64_t D,
                  std::int64_t stride, std::int64_t offset) {
  for_chunks(B * H, [&](std::int64_t, std::int64_t i0, std::int64_t i1) {
    for (std::int64_t bh = i0; bh < i1; ++bh) {
      const std::int64_t b = bh / H, h = bh % H;
      for (std::int64_t t = 0; t < T; ++t)
        std::memcpy(dst + (bh * T + t) * D, src + (b * T + t) * stride + offset + h * D, sizeof(E) * D);
    }
  }, 1);
}

template <class E>
void scatter_heads(const E* src, E* dst, std::int64_t B, std::int64_t T, std::int64_t H, std::int64_t D,
                   std::int64_t stride, std::int64_t offset) {
  for_chunks(B * H, [&](std::int64_t, std::int64_t i0, std::int64_t i1) {
    for (std::int64_t bh = i0; bh < i1; ++bh) {
      const std::int64_t b = bh / H, h = bh % H;
      for (std::int64_t t = 0; t < T; ++t)
        std::memcpy(dst + (b * T + t) * stride + offset + h * D, src + (bh * T + t) * D, sizeof(E) * D);
    }
  }, 1);
}

template <class F> void visit_any(const Tensor& t, F&& f) {
  if (t.format().is_float()) {
    f(t.data<float>());
  } else {
    visit_int(t, std::forward<F>(f));
  }
}

}  // namespace

void split_heads(const Tensor& qkv, std::int64_t B, std::int64_t T, std::int64_t H, const Format& f, RngKey key,
                 Tensor& q, Tensor& k, Tensor& v) {
  const std::int64_t C3 = qkv.cols(), C = C3 / 3, D = C / H;
  check(C3 == 3 * C && C == H * D && qkv.numel() == B * T * C3,
        "split_heads: " + qkv.describe() + " is not [B*T, 3C] with C divisible by " + std::to_string(H) + " heads");
  const Tensor x = cast(qkv, f, key);
  Tensor* outs[3] = {&q, &k, &v};
  for (int part = 0; part < 3; ++part) {
    *outs[part] = Tensor({B * H, T, D}, x.format(), x.exponent());
    Tensor& o = *outs[part];
    visit_any(x, [&](const auto* src) {
      using E = std::remove_const_t<std::remove_pointer_t<decltype(src)>>;
      gather_heads(src, o.template data<E>(), B, T, H, D, C3, part * C);
    });
  }
}

Tensor split_heads_one(const Tensor& x_in, std::int64_t B, std::int64_t T, std::int64_t H, const Format& f,
                       RngKey key) {
  const Tensor x = cast(x_in, f, key);
  const std::int64_t C = x.cols(), D = C / H;
  Tensor o({B * H, T, D}, x.format(), x.exponent());
  visit_any(x, [&](const auto* src) {
    using E = std::remove_const_t<std::remove_pointer_t<decltype(src)>>;
    gather_heads(src, o.template data<E>(), B, T, H, D, C, 0);
  });
  return o;
}

Tensor merge_heads(const Tensor& y_in, std::int64_t B, std::int64_t T, std::int64_t H, const Format& f, RngKey key) {
  const Tensor y = cast(y_in, f, key);
  const std::int64_t D = y.cols();
  Tensor o({B * T, H * D}, y.format(), y.exponent());
  visit_any(y, [&](const auto* src) {
    using E = std::remove_const_t<std::remove_pointer_t<decltype(src)>>;
    scatter_heads(src, o.template data<E>(), B, T, H, D, H * D, 0);
  });
  return o;
}

Tensor merge_qkv(const Tensor& dq, const Tensor& dk, const Tensor& dv, std::int64_t B, std::int64_t T,
                 std::int64_t H, const Format& f, RngKey key) {
  // The three parts must share one exponent: bring them to one accumulator
  // first (integer), then cast once.
  const std::int64_t D = dq.cols(), C = H * D;
  const Tensor* parts[3] = {&dq, &dk, &dv};
  if (dq.format().is_float()) {
    Tensor o({B * T, 3 * C}, Format::fp32());
    for (int p = 0; p < 3; ++p) scatter_heads(parts[p]->data<float>(), o.data<float>(), B, T, H, D, 3 * C, p * C);
    return cast(o, f, key);
  }
  // The finest exponent at which all three fit in 62 bits.
  int e = INT32_MAX;
  for (const Tensor* p : parts) {
    e = std::min(e, p->exponent());
  }
  for (const Tensor* p : parts) {
    const std::uint64_t m = max_abs_mantissa(*p);
    e = std::max(e, p->exponent() - (62 - bit_length(m)));
  }
  e = slice_max(key, e);
  Tensor o = acc64({B * T, 3 * C}, e);
  for (int p = 0; p < 3; ++p) {
    Tensor aligned = acc64(parts[p]->shape(), e);
    std::int64_t* a = aligned.data<std::int64_t>();
    for_int(*parts[p], [&](const auto* src) {
      for (std::int64_t i = 0; i < aligned.numel(); ++i) a[i] = shift_to(src[i], parts[p]->exponent(), e);
    });
    scatter_heads(a, o.data<std::int64_t>(), B, T, H, D, 3 * C, p * C);
  }
  return cast(o, f, key);
}

}  // namespace intrain
