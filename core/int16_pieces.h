// The exact split of 16-bit integers into two int8 pieces for oneDNN's s8
// operands, shared by the 16-bit matmul (core/matmul.cpp, right operand) and
// the packed-weight matmul's 16-bit activations (core/packed_matmul.cpp):
//
//   x = 256·high + low + 128,   high = x >> 8,   low = (x & 255) − 128,
//
// both pieces in [−128, 127] for every int16 x (arithmetic shift: high is
// the floor of x / 256). The constant 128 is folded back by the caller.
#pragma once

#include <cstdint>

namespace intrain {

void split_int16_s8(const std::int16_t* x, std::int8_t* high, std::int8_t* low, std::int64_t n);

}  // namespace intrain
