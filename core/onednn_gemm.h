// The one place intrain calls oneDNN: C = A · B for strided, optionally
// batched matrices of int8/uint8 (-> int32) or float32 (-> float32).
//
// Primitives are cached per descriptor (shape, strides, types) and OpenMP
// thread count (oneDNN fixes a primitive's threading at creation): creating a
// oneDNN matmul costs far more than running a small one. The cache is
// thread-safe and lives for the whole process.
//
// Exactness: for integer types oneDNN accumulates in int32 and the caller must
// guarantee that K * max|a| * max|b| fits in int32 (core/matmul.cpp splits K
// otherwise). This relies on VNNI (vpdpbusd, exact and wrapping). On CPUs
// without VNNI oneDNN uses vpmaddubsw, whose int16 intermediate can saturate;
// the bit-exactness tests would catch that.
#pragma once

#include <cstdint>

namespace intrain {

enum class GemmType : std::uint8_t { S8, U8, S32, F32 };

// One matrix operand: element (b, i, j) lives at base[b*batch_stride + i*row_stride + j*col_stride].
struct GemmMatrix {
  GemmType type = GemmType::S8;
  std::int64_t batch_stride = 0, row_stride = 0, col_stride = 1;
};

struct GemmDesc {
  std::int64_t batch = 1, M = 0, K = 0, N = 0;
  GemmMatrix a, b, c;  // a: M x K, b: K x N, c: M x N

  friend bool operator==(const GemmDesc&, const GemmDesc&) = default;
};

// C = A · B (overwrites C). Throws std::runtime_error with oneDNN's message
// if the primitive cannot be created.
void onednn_gemm(const GemmDesc& d, const void* A, const void* B, void* C);

// Number of distinct primitives created so far (for tests and benchmarks).
std::int64_t onednn_cache_size();

}  // namespace intrain
