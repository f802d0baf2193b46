// Integer (and float) matrix multiplication: C = op(A) · op(B).
//
// One dispatch point picks the kernel path from the operands' formats:
//
//   Float    both fp32                    -> one oneDNN f32 matmul
//   Int8     both stored in int8 (<= 8 b) -> one oneDNN s8 x s8 -> s32 matmul
//   Split    either stored in int16       -> 9-16-bit operands are split into
//            (9..16 bits)                    int8 pieces; 2-4 oneDNN int8
//                                            products are combined exactly
//
// Every path has the same contract and the same plain-loop reference,
// matmul_reference(), which the tests compare against bit for bit.
//
// Shapes: A is [M, K] ([K, M] if ta == Trans::T), B is [K, N] ([N, K] if
// tb == Trans::T). Rank-3 operands are batches of matrices with equal batch
// size; the result is [M, N] or [batch, M, N].
//
// Integer results are exact. The result is an accumulator tensor with
// exponent eA + eB, 32-bit when the worst case K * qmax(A) * qmax(B) fits in
// int32 and 64-bit otherwise. The choice depends only on the formats and K,
// never on the data, so a caller knows the result type before it runs.
//
// Overflow by design:
//   * split pieces: a = 256·hi + lo + c, with both pieces in int8 or uint8
//     (the derivation is in matmul.cpp); each int8 product is exact in int32
//     as long as K' * max|piece_a| * max|piece_b| <= 2^31 - 1, and K is cut into
//     chunks that satisfy this bound; chunk results are summed in int64.
//   * the Int8 path is chunked the same way when K > 133,144.
#pragma once

#include <cstdint>

#include "core/tensor.h"

namespace intrain {

enum class Trans : std::uint8_t { N, T };

enum class MatmulPath : std::uint8_t { Float, Int8, Split };
const char* matmul_path_name(MatmulPath p);

// The path matmul() takes for these operands; throws std::invalid_argument for
// unsupported combinations (mixed float/integer, grouped formats).
MatmulPath matmul_path(const Tensor& A, const Tensor& B);

// The logical problem size after validation (throws with both shapes named).
struct MatmulDims {
  std::int64_t batch = 1, M = 0, K = 0, N = 0;
};
MatmulDims matmul_dims(const Tensor& A, const Tensor& B, Trans ta, Trans tb);

// The accumulator format of an integer product of these operands over K.
Format matmul_result_format(const Format& a, const Format& b, std::int64_t K);

Tensor matmul(const Tensor& A, const Tensor& B, Trans ta = Trans::N, Trans tb = Trans::N);

// Plain loops: int64 accumulation for integers (exact: |sum| <= K * 2^30 < 2^63
// for any K < 2^33), double accumulation rounded once for floats.
Tensor matmul_reference(const Tensor& A, const Tensor& B, Trans ta = Trans::N, Trans tb = Trans::N);

}  // namespace intrain
