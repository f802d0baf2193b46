// Integer matmul: dispatch, exact split of wide operands, and the reference.
//
// The split (9-16-bit operands)
// -----------------------------
// oneDNN multiplies a uint8 or int8 "src" (left operand) by an int8 "weights"
// (right operand). A 16-bit mantissa x in [-32767, 32767] is cut into two
// 8-bit pieces that fit those types:
//
//   left  operand:  x = 256·h + l - 32768,  h = (x >> 8) + 128 in [0, 255] (u8),
//                                           l = x & 255          in [0, 255] (u8)
//   right operand:  x = 256·h + l + 128,    h = x >> 8           in [-128, 127] (s8),
//                                           l = (x & 255) - 128  in [-128, 127] (s8)
//
// i.e. x = x' + c with x' = 256·h + l and a constant offset c (cA = -32768,
// cB = 128; an unsplit 8-bit operand has x' = x, c = 0). Then, over K:
//
//   A·B = A'·B' + cB·rowsum(A)·1ᵀ + cA·1·colsum(B)ᵀ - cA·cB·K
//   A'·B' = 65536·(Ah·Bh) + 256·(Ah·Bl + Al·Bh) + (Al·Bl)
//
// The middle term is one product over 2K: the left pieces are stored side by
// side along K as [Ah | Al] and the right ones as [Bl ; Bh], so
// [Ah | Al]·[Bl ; Bh] = Ah·Bl + Al·Bh. A 16 x 16 product is thus three oneDNN
// calls (K, 2K and K long): the work of four int8 products, which is what
// makes it as fast as one f32 product on VNNI hardware.
//
// Each int8 product is exact in int32 while K' * max|left piece| * max|right
// piece| <= 2^31 - 1; longer products are cut into K chunks. Terms are summed
// in int64, or in uint32 arithmetic (modulo 2^32) when the worst case of the
// final result fits in int32: then the final sum is exact even if a partial
// term alone would not fit.
#include "core/matmul.h"

#include <algorithm>
#include <climits>
#include <cstring>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/int16_pieces.h"
#include "core/onednn_gemm.h"
#include "core/parallel.h"
#include "core/rounding.h"
#include "core/simd.h"

namespace intrain {

const char* matmul_path_name(MatmulPath p) {
  switch (p) {
    case MatmulPath::Float: return "float";
    case MatmulPath::Int8: return "int8";
    case MatmulPath::Split: return "split16";
  }
  return "?";
}

MatmulPath matmul_path(const Tensor& A, const Tensor& B) {
  const Format &fa = A.format(), &fb = B.format();
  if (fa.is_float() && fb.is_float()) return MatmulPath::Float;
  if (fa.is_float() || fb.is_float()) {
    throw std::invalid_argument("matmul: cannot multiply " + A.describe() + " by " + B.describe() +
                                "; quantize the float operand first");
  }
  for (const Tensor* t : {&A, &B}) {
    if (t->format().scaling() != Scaling::SharedExponent || t->format().bits() > 16 || !t->format().is_signed()) {
      throw std::invalid_argument("matmul: operand " + t->describe() +
                                  " must be a signed fixed-point format of 2 to 16 bits");
    }
  }
  return (A.dtype() == DType::I8 && B.dtype() == DType::I8) ? MatmulPath::Int8 : MatmulPath::Split;
}

MatmulDims matmul_dims(const Tensor& A, const Tensor& B, Trans ta, Trans tb) {
  auto fail = [&](const std::string& why) {
    throw std::invalid_argument("matmul: " + why + ": A " + A.describe() + (ta == Trans::T ? "ᵀ" : "") + ", B " +
                                B.describe() + (tb == Trans::T ? "ᵀ" : ""));
  };
  if (A.rank() < 2 || B.rank() < 2) fail("operands must be matrices (rank 2) or batches of them (rank 3)");
  if (A.rank() != B.rank()) fail("both operands must have the same rank");
  if (A.batch() != B.batch()) fail("batch sizes differ");
  MatmulDims d;
  d.batch = A.batch();
  d.M = ta == Trans::N ? A.rows() : A.cols();
  d.K = ta == Trans::N ? A.cols() : A.rows();
  const std::int64_t kb = tb == Trans::N ? B.rows() : B.cols();
  d.N = tb == Trans::N ? B.cols() : B.rows();
  if (d.K != kb) fail("inner dimensions differ (" + std::to_string(d.K) + " vs " + std::to_string(kb) + ")");
  return d;
}

Format matmul_result_format(const Format& a, const Format& b, std::int64_t K) {
  if (a.is_float() || b.is_float()) return Format::fp32();
  const auto worst = static_cast<uint128_t>(K) * static_cast<std::uint64_t>(a.qmax()) *
                     static_cast<std::uint64_t>(b.qmax());
  return Format::accumulator(worst <= INT32_MAX ? 32 : 64);
}

namespace {

Shape result_shape(const Tensor& A, const MatmulDims& d) {
  return A.rank() == 3 ? Shape{d.batch, d.M, d.N} : Shape{d.M, d.N};
}

// Strides of a row-major storage [batch, r, c] (c columns), seen as the logical op(X).
GemmMatrix logical(GemmType t, std::int64_t c, std::int64_t batch_stride, Trans tr) {
  return tr == Trans::N ? GemmMatrix{t, batch_stride, c, 1} : GemmMatrix{t, batch_stride, 1, c};
}

// ---------------------------------------------------------------------------
// Reference
// ---------------------------------------------------------------------------

template <class TA, class TB, class Acc>
void reference_loops(const TA* a, const TB* b, const MatmulDims& d, Trans ta, Trans tb, std::int64_t ar,
                     std::int64_t ac, std::int64_t br, std::int64_t bc, Acc* c, bool as_double) {
  for (std::int64_t z = 0; z < d.batch; ++z) {
    const TA* az = a + z * ar * ac;
    const TB* bz = b + z * br * bc;
    for (std::int64_t m = 0; m < d.M; ++m) {
      for (std::int64_t n = 0; n < d.N; ++n) {
        std::int64_t si = 0;
        double sd = 0.0;
        for (std::int64_t k = 0; k < d.K; ++k) {
          const auto x = ta == Trans::N ? az[m * ac + k] : az[k * ac + m];
          const auto y = tb == Trans::N ? bz[k * bc + n] : bz[n * bc + k];
          if (as_double) {
            sd += static_cast<double>(x) * static_cast<double>(y);
          } else {
            si += static_cast<std::int64_t>(x) * static_cast<std::int64_t>(y);
          }
        }
        c[(z * d.M + m) * d.N + n] = as_double ? static_cast<Acc>(sd) : static_cast<Acc>(si);
      }
    }
  }
}

}  // namespace

Tensor matmul_reference(const Tensor& A, const Tensor& B, Trans ta, Trans tb) {
  const MatmulPath path = matmul_path(A, B);
  const MatmulDims d = matmul_dims(A, B, ta, tb);
  if (path == MatmulPath::Float) {
    Tensor C(result_shape(A, d), Format::fp32());
    reference_loops(A.data<float>(), B.data<float>(), d, ta, tb, A.rows(), A.cols(), B.rows(), B.cols(),
                    C.data<float>(), true);
    return C;
  }
  Tensor C(result_shape(A, d), matmul_result_format(A.format(), B.format(), d.K), A.exponent() + B.exponent());
  visit_int(A, [&](const auto* a) {
    visit_int(B, [&](const auto* b) {
      visit_int(C, [&](auto* c) {
        reference_loops(a, b, d, ta, tb, A.rows(), A.cols(), B.rows(), B.cols(), c, false);
      });
    });
  });
  return C;
}

// ---------------------------------------------------------------------------
// Fast paths
// ---------------------------------------------------------------------------

namespace {

// Per-thread scratch memory reused across calls: a fresh multi-megabyte
// allocation per matmul costs page faults and zero-filling on every call.
// Regions are carved out with take(); release() returns them all at once.
class Workspace {
 public:
  static Workspace& local() {
    thread_local Workspace w;
    return w;
  }
  void reserve(std::size_t bytes) {
    if (bytes > cap_) {
      buf_.reset(static_cast<std::byte*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64)));
      if (!buf_) throw std::bad_alloc();
      cap_ = bytes;
    }
    used_ = 0;
  }
  template <class T> T* take(std::int64_t n) {
    const std::size_t bytes = (static_cast<std::size_t>(n) * sizeof(T) + 63) / 64 * 64;
    if (used_ + bytes > cap_) throw std::logic_error("matmul workspace: reserve() was too small");
    T* p = reinterpret_cast<T*>(buf_.get() + used_);
    used_ += bytes;
    return p;
  }
  static std::size_t padded(std::int64_t n, std::size_t elem) { return (static_cast<std::size_t>(n) * elem + 63) / 64 * 64; }

 private:
  struct Free {
    void operator()(std::byte* p) const { std::free(p); }
  };
  std::unique_ptr<std::byte[], Free> buf_;
  std::size_t cap_ = 0, used_ = 0;
};

// An operand as oneDNN will see it. oneDNN's fast (brgemm) int8 kernels need
// dense operands, so each piece of a split operand gets its own dense buffer
// in the operand's layout; the K-concatenation of the two pieces, used by the
// middle term of a 16 x 16 product, is a third dense buffer, built only then.
struct Pieces {
  const void* piece[2] = {nullptr, nullptr};  // piece 1 is null when unsplit
  GemmMatrix view;                            // logical strides of a piece
  const void* cat = nullptr;                  // [piece 0 | piece 1] along K
  GemmMatrix cat_view;
  int count = 1;
  std::int64_t max_piece = 0;  // max |piece value|
  std::int64_t offset_c = 0;   // x = x' + c
};

// Writes the two pieces of every element of a 16-bit operand.
//   left:  h = (x >> 8) + 128, l = x & 255  (both u8), piece order [h, l]
//   right: h = x >> 8, l = (x & 255) - 128  (both s8), piece order [l, h]
INTRAIN_CLONES void split_rows_left(const std::int16_t* x, std::uint8_t* p0, std::uint8_t* p1, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int32_t v = x[i];
    p0[i] = static_cast<std::uint8_t>((v >> 8) + 128);
    p1[i] = static_cast<std::uint8_t>(v & 255);
  }
}
void split_rows_right(const std::int16_t* x, std::int8_t* p0, std::int8_t* p1, std::int64_t n) {
  split_int16_s8(x, /*high=*/p1, /*low=*/p0, n);
}

// Bytes of workspace the split of X needs (0 when X is not split).
std::size_t split_bytes(const Tensor& X, bool with_cat) {
  return X.dtype() == DType::I8 ? 0 : (with_cat ? 4 : 2) * Workspace::padded(X.numel(), 1);
}

// Builds the pieces of one operand. `k_is_cols`: whether K runs along the
// storage columns (left operand not transposed, right operand transposed).
Pieces make_pieces(const Tensor& X, Trans tr, bool left, bool k_is_cols, bool with_cat, Workspace& ws) {
  Pieces p;
  const std::int64_t batch = X.batch(), r = X.rows(), c = X.cols(), n = X.numel();
  if (X.dtype() == DType::I8) {
    p.piece[0] = X.raw();
    p.view = logical(GemmType::S8, c, r * c, tr);
    p.max_piece = X.format().qmax();
    return p;
  }
  const GemmType type = left ? GemmType::U8 : GemmType::S8;
  std::int8_t* d0 = ws.take<std::int8_t>(n);
  std::int8_t* d1 = ws.take<std::int8_t>(n);
  p.piece[0] = d0;
  p.piece[1] = d1;
  p.count = 2;
  p.offset_c = left ? -32768 : 128;
  p.max_piece = left ? 255 : 128;
  p.view = logical(type, c, r * c, tr);
  const std::int16_t* x = X.data<std::int16_t>();
  for_chunks(
      n, [&](std::int64_t, std::int64_t b, std::int64_t e) {
        if (left) {
          split_rows_left(x + b, reinterpret_cast<std::uint8_t*>(d0) + b, reinterpret_cast<std::uint8_t*>(d1) + b, e - b);
        } else {
          split_rows_right(x + b, d0 + b, d1 + b, e - b);
        }
      });
  if (with_cat) {
    // Storage [batch, r, 2c] (K along columns) or [batch, 2r, c] (K along rows).
    std::int8_t* cat = ws.take<std::int8_t>(2 * n);
    p.cat = cat;
    if (k_is_cols) {
      for_chunks(batch * r, [&](std::int64_t, std::int64_t rb, std::int64_t re) {
        for (std::int64_t row = rb; row < re; ++row) {
          std::memcpy(cat + row * 2 * c, d0 + row * c, static_cast<std::size_t>(c));
          std::memcpy(cat + row * 2 * c + c, d1 + row * c, static_cast<std::size_t>(c));
        }
      }, std::max<std::int64_t>(1, kChunk / std::max<std::int64_t>(c, 1)));
      p.cat_view = logical(type, 2 * c, 2 * r * c, tr);
    } else {
      for (std::int64_t z = 0; z < batch; ++z) {
        std::memcpy(cat + z * 2 * r * c, d0 + z * r * c, static_cast<std::size_t>(r * c));
        std::memcpy(cat + z * 2 * r * c + r * c, d1 + z * r * c, static_cast<std::size_t>(r * c));
      }
      p.cat_view = logical(type, c, 2 * r * c, tr);
    }
  }
  return p;
}

// Sum over K of every row of op(A) (sum_k A[m,k]) or every column of op(B),
// in int64: row sums of a storage row, or column sums accumulated row by row.
template <class T> INTRAIN_INLINE std::int64_t row_sum_body(const T* __restrict x, std::int64_t n) {
  std::int64_t acc = 0;
  for (std::int64_t j = 0; j < n; ++j) acc += x[j];
  return acc;
}
template <class T> INTRAIN_INLINE void col_add_body(const T* __restrict x, std::int64_t n, std::int64_t* __restrict s) {
  for (std::int64_t j = 0; j < n; ++j) s[j] += x[j];
}
INTRAIN_CLONES std::int64_t row_sum(const std::int8_t* x, std::int64_t n) { return row_sum_body(x, n); }
INTRAIN_CLONES std::int64_t row_sum(const std::int16_t* x, std::int64_t n) { return row_sum_body(x, n); }
INTRAIN_CLONES void col_add(const std::int8_t* x, std::int64_t n, std::int64_t* s) { col_add_body(x, n, s); }
INTRAIN_CLONES void col_add(const std::int16_t* x, std::int64_t n, std::int64_t* s) { col_add_body(x, n, s); }
template <class T> std::int64_t row_sum(const T* x, std::int64_t n) { return row_sum_body(x, n); }
template <class T> void col_add(const T* x, std::int64_t n, std::int64_t* s) { col_add_body(x, n, s); }

std::vector<std::int64_t> k_sums(const Tensor& X, bool k_is_cols) {
  const std::int64_t batch = X.batch(), r = X.rows(), c = X.cols();
  const std::int64_t outer = k_is_cols ? r : c;
  std::vector<std::int64_t> s(static_cast<std::size_t>(batch * outer), 0);
  visit_int(X, [&](const auto* x) {
    if (k_is_cols) {
      for_chunks(batch * r, [&](std::int64_t, std::int64_t rb, std::int64_t re) {
        for (std::int64_t row = rb; row < re; ++row) s[static_cast<std::size_t>(row)] = row_sum(x + row * c, c);
      }, std::max<std::int64_t>(1, kChunk / std::max<std::int64_t>(c, 1)));
    } else {
      for_chunks(batch, [&](std::int64_t, std::int64_t zb, std::int64_t ze) {
        for (std::int64_t z = zb; z < ze; ++z)
          for (std::int64_t i = 0; i < r; ++i) col_add(x + (z * r + i) * c, c, s.data() + z * outer);
      }, 1);
    }
  });
  return s;
}

// One product of pieces: left piece(s) [pa, pa + na) x right piece(s), over
// K' = count * K, shifted left by `shift` before it is added.
struct Term {
  const void* a;
  GemmMatrix av;
  const void* b;
  GemmMatrix bv;
  std::int64_t k_len;
  int shift;
};

// One row of C from up to three int32 term results:
//   C[n] = (first ? 0 : C[n]) + sum_t (S_t[n] << shift_t) + row_c + col_c[n]
// Out is uint64 (int64 storage) or uint32 (int32 storage, arithmetic modulo
// 2^32 whose final value is known to fit): unsigned types make wrap-around
// and shifts of negative values well defined, with two's complement bits.
struct TermRows {
  const std::int32_t* s[3] = {nullptr, nullptr, nullptr};
  int shift[3] = {0, 0, 0};
  int count = 0;
};

template <class Out, int kTerms>
INTRAIN_INLINE void combine_fixed(const TermRows& t, Out* __restrict C, std::int64_t n, bool first, std::int64_t row_c,
                                  const std::int64_t* __restrict col_c) {
  const auto rc = static_cast<Out>(row_c);
  const std::int32_t* __restrict s0 = t.s[0];
  const std::int32_t* __restrict s1 = t.s[kTerms > 1 ? 1 : 0];
  const std::int32_t* __restrict s2 = t.s[kTerms > 2 ? 2 : 0];
  const int h0 = t.shift[0], h1 = t.shift[1], h2 = t.shift[2];
  for (std::int64_t i = 0; i < n; ++i) {
    Out v = static_cast<Out>(static_cast<Out>(static_cast<std::int64_t>(s0[i])) << h0);
    if constexpr (kTerms > 1) v += static_cast<Out>(static_cast<Out>(static_cast<std::int64_t>(s1[i])) << h1);
    if constexpr (kTerms > 2) v += static_cast<Out>(static_cast<Out>(static_cast<std::int64_t>(s2[i])) << h2);
    if (!first) v += C[i];
    if (col_c) v += rc + static_cast<Out>(col_c[i]);
    C[i] = v;
  }
}
// The number of terms is fixed per call, so each loop below has a constant
// body and vectorises.
template <class Out>
INTRAIN_INLINE void combine_body(const TermRows& t, Out* C, std::int64_t n, bool first, std::int64_t row_c,
                                 const std::int64_t* col_c) {
  if (t.count == 3) {
    combine_fixed<Out, 3>(t, C, n, first, row_c, col_c);
  } else if (t.count == 2) {
    combine_fixed<Out, 2>(t, C, n, first, row_c, col_c);
  } else {
    combine_fixed<Out, 1>(t, C, n, first, row_c, col_c);
  }
}
INTRAIN_CLONES void combine64(const TermRows& t, std::int64_t* C, std::int64_t n, bool first, std::int64_t rc,
                              const std::int64_t* cc) {
  combine_body(t, reinterpret_cast<std::uint64_t*>(C), n, first, rc, cc);
}
INTRAIN_CLONES void combine32(const TermRows& t, std::int32_t* C, std::int64_t n, bool first, std::int64_t rc,
                              const std::int64_t* cc) {
  combine_body(t, reinterpret_cast<std::uint32_t*>(C), n, first, rc, cc);
}

Tensor matmul_float(const Tensor& A, const Tensor& B, Trans ta, Trans tb, const MatmulDims& d) {
  if (d.K == 0) return Tensor(result_shape(A, d), Format::fp32());
  Tensor C = Tensor::uninitialized(result_shape(A, d), Format::fp32());
  GemmDesc g;
  g.batch = d.batch;
  g.M = d.M;
  g.K = d.K;
  g.N = d.N;
  g.a = logical(GemmType::F32, A.cols(), A.rows() * A.cols(), ta);
  g.b = logical(GemmType::F32, B.cols(), B.rows() * B.cols(), tb);
  g.c = {GemmType::F32, d.M * d.N, d.N, 1};
  onednn_gemm(g, A.raw(), B.raw(), C.raw());
  return C;
}

Tensor matmul_integer(const Tensor& A, const Tensor& B, Trans ta, Trans tb, const MatmulDims& d) {
  const Format rf = matmul_result_format(A.format(), B.format(), d.K);
  if (d.K == 0 || d.M == 0 || d.N == 0 || d.batch == 0) return Tensor(result_shape(A, d), rf, A.exponent() + B.exponent());
  Tensor C = Tensor::uninitialized(result_shape(A, d), rf, A.exponent() + B.exponent());

  // Workspace: the split pieces, then one int32 result per term.
  const std::int64_t MN = d.batch * d.M * d.N;
  const bool both_split = A.dtype() != DType::I8 && B.dtype() != DType::I8;
  Workspace& ws = Workspace::local();
  ws.reserve(split_bytes(A, both_split) + split_bytes(B, both_split) + 3 * Workspace::padded(MN, sizeof(std::int32_t)));
  const Pieces pa = make_pieces(A, ta, /*left=*/true, /*k_is_cols=*/ta == Trans::N, both_split, ws);
  const Pieces pb = make_pieces(B, tb, /*left=*/false, /*k_is_cols=*/tb == Trans::T, both_split, ws);

  // The terms of A'·B' (see the file comment). Left pieces are [h, l], right
  // pieces [l, h].
  std::vector<Term> terms;
  if (pa.count == 1 && pb.count == 1) {
    terms.push_back({pa.piece[0], pa.view, pb.piece[0], pb.view, d.K, 0});
  } else if (pa.count == 2 && pb.count == 1) {
    terms.push_back({pa.piece[0], pa.view, pb.piece[0], pb.view, d.K, 8});
    terms.push_back({pa.piece[1], pa.view, pb.piece[0], pb.view, d.K, 0});
  } else if (pa.count == 1 && pb.count == 2) {
    terms.push_back({pa.piece[0], pa.view, pb.piece[1], pb.view, d.K, 8});
    terms.push_back({pa.piece[0], pa.view, pb.piece[0], pb.view, d.K, 0});
  } else {
    terms.push_back({pa.piece[0], pa.view, pb.piece[1], pb.view, d.K, 16});     // Ah·Bh
    terms.push_back({pa.cat, pa.cat_view, pb.cat, pb.cat_view, 2 * d.K, 8});    // [Ah|Al]·[Bl;Bh]
    terms.push_back({pa.piece[1], pa.view, pb.piece[0], pb.view, d.K, 0});      // Al·Bl
  }

  // Exactness of each int8 product in int32: cut K' into chunks.
  const std::int64_t k_max = INT32_MAX / (pa.max_piece * pb.max_piece);

  // Corrections for the offsets (none when neither operand was split).
  std::vector<std::int64_t> row_c, col_c;
  if (pa.offset_c != 0 || pb.offset_c != 0) {
    row_c.assign(static_cast<std::size_t>(d.batch * d.M), -pa.offset_c * pb.offset_c * d.K);
    col_c.assign(static_cast<std::size_t>(d.batch * d.N), 0);
    if (pb.offset_c != 0) {
      const auto rs = k_sums(A, ta == Trans::N);
      for (std::size_t i = 0; i < rs.size(); ++i) row_c[i] += pb.offset_c * rs[i];
    }
    if (pa.offset_c != 0) {
      const auto cs = k_sums(B, tb == Trans::T);
      for (std::size_t i = 0; i < cs.size(); ++i) col_c[i] += pa.offset_c * cs[i];
    }
  }

  GemmDesc g;
  g.batch = d.batch;
  g.M = d.M;
  g.N = d.N;
  g.c = {GemmType::S32, d.M * d.N, d.N, 1};
  const bool chunked = std::any_of(terms.begin(), terms.end(), [&](const Term& t) { return t.k_len > k_max; });
  if (terms.size() == 1 && !chunked && row_c.empty() && rf.bits() == 32) {
    g.K = d.K;  // the plain int8 product: oneDNN writes the result directly
    g.a = terms[0].av;
    g.b = terms[0].bv;
    onednn_gemm(g, terms[0].a, terms[0].b, C.raw());
    return C;
  }

  // Each pass runs every (term, K chunk) product into its own int32 buffer,
  // then one fused pass adds them, shifted, into C. Unchunked products (the
  // usual case) take a single pass: C is written once.
  struct Job {
    const void* a;
    GemmMatrix av;
    const void* b;
    GemmMatrix bv;
    std::int64_t k;
    int shift;
  };
  std::vector<Job> jobs;
  for (const Term& t : terms) {
    // One step along K moves col_stride in the left view and row_stride in the right one.
    for (std::int64_t k0 = 0; k0 < t.k_len; k0 += k_max) {
      jobs.push_back({static_cast<const std::int8_t*>(t.a) + k0 * t.av.col_stride, t.av,
                      static_cast<const std::int8_t*>(t.b) + k0 * t.bv.row_stride, t.bv,
                      std::min(k_max, t.k_len - k0), t.shift});
    }
  }
  std::int32_t* scratch[3] = {ws.take<std::int32_t>(MN), ws.take<std::int32_t>(MN), ws.take<std::int32_t>(MN)};
  for (std::size_t j0 = 0; j0 < jobs.size(); j0 += 3) {
    TermRows tr;
    tr.count = static_cast<int>(std::min<std::size_t>(3, jobs.size() - j0));
    for (int k = 0; k < tr.count; ++k) {
      const Job& job = jobs[j0 + static_cast<std::size_t>(k)];
      g.K = job.k;
      g.a = job.av;
      g.b = job.bv;
      onednn_gemm(g, job.a, job.b, scratch[k]);
      tr.shift[k] = job.shift;
    }
    const bool first = j0 == 0, last = j0 + 3 >= jobs.size();
    const bool correct = last && !row_c.empty();
    for_chunks(
        d.batch * d.M,
        [&](std::int64_t, std::int64_t rb, std::int64_t re) {
          for (std::int64_t row = rb; row < re; ++row) {
            const std::int64_t off = row * d.N;
            TermRows rows = tr;
            for (int k = 0; k < rows.count; ++k) rows.s[k] = scratch[k] + off;
            const std::int64_t rc = correct ? row_c[static_cast<std::size_t>(row)] : 0;
            const std::int64_t* cc = correct ? col_c.data() + (row / d.M) * d.N : nullptr;
            if (rf.bits() == 64) {
              combine64(rows, C.data<std::int64_t>() + off, d.N, first, rc, cc);
            } else {
              combine32(rows, C.data<std::int32_t>() + off, d.N, first, rc, cc);
            }
          }
        },
        std::max<std::int64_t>(1, kChunk / d.N));
  }
  return C;
}

}  // namespace

Tensor matmul(const Tensor& A, const Tensor& B, Trans ta, Trans tb) {
  const MatmulPath path = matmul_path(A, B);
  const MatmulDims d = matmul_dims(A, B, ta, tb);
  if (path == MatmulPath::Float) return matmul_float(A, B, ta, tb, d);
  return matmul_integer(A, B, ta, tb, d);
}

// Declared in core/int16_pieces.h.
INTRAIN_CLONES void split_int16_s8(const std::int16_t* x, std::int8_t* high, std::int8_t* low, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int32_t v = x[i];
    high[i] = static_cast<std::int8_t>(v >> 8);
    low[i] = static_cast<std::int8_t>((v & 255) - 128);
  }
}

}  // namespace intrain
