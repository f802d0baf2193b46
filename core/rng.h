// Counter-based random bits for stochastic rounding.
//
// A random number is a pure function of (seed, stream, element index): there is
// no generator state to advance. So a result cannot depend on the thread count,
// on how a loop is chunked, or on how elements are split across MPI ranks.
//
// `stream` names one use of randomness, typically (training step, tensor id);
// use stream_id() to build it. Two different streams under one seed are
// independent for all practical purposes (their keys differ after a 64-bit mix).
//
// The per-element hash is two rounds of a 32-bit multiply-xorshift permutation
// ("lowbias32", Wellons 2020) keyed by the two halves of the stream key. Only
// 32-bit multiplies and shifts are used, so the loop vectorises on AVX2 and
// AVX-512 (vpmulld). Each distinct index < 2^32 maps to a distinct output, so
// over a full period the bits are exactly uniform.
#pragma once

#include <cstdint>

namespace intrain {

class Collective;

// 64-bit finaliser (splitmix64): turns structured inputs into a well-mixed key.
constexpr std::uint64_t mix64(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// A stream id from the training step and a tensor id (both small integers).
constexpr std::uint64_t stream_id(std::uint64_t step, std::uint64_t tensor_id) {
  return mix64(step * 0x100000001B3ull ^ mix64(tensor_id));
}

// A 32-bit bijection with low bias (Chris Wellons' "lowbias32").
constexpr std::uint32_t lowbias32(std::uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// Key for one stream under one seed. Cheap to copy; pass by value.
struct RngKey {
  std::uint32_t k0 = 0, k1 = 0;
  // Data-parallel training only (core/collective.h): the tensor rounded with
  // this key is one rank's batch slice of a larger logical tensor, and
  // index_offset (set by slice_key()) moves its element indices to their
  // global positions. Null and 0 everywhere else, so the bits are unchanged.
  const Collective* batch_shard = nullptr;
  std::uint32_t index_offset = 0;

  RngKey() = default;
  constexpr RngKey(std::uint64_t seed, std::uint64_t stream) {
    const std::uint64_t k = mix64(seed ^ mix64(stream));
    k0 = static_cast<std::uint32_t>(k);
    k1 = static_cast<std::uint32_t>(k >> 32);
  }

  // Uniform 32 random bits for element `index`.
  constexpr std::uint32_t bits(std::uint32_t index) const {
    return lowbias32(lowbias32((index + index_offset) ^ k0) + k1);
  }

  // A key for a sub-stream, e.g. one piece of a split tensor. It keeps the
  // batch slice (the sub-stream rounds another tensor of the same pass) but
  // not the offset, which belongs to one tensor's size.
  constexpr RngKey derive(std::uint64_t sub) const {
    RngKey r;
    r.batch_shard = batch_shard;
    const std::uint64_t k = mix64((std::uint64_t{k1} << 32 | k0) ^ mix64(sub + 1));
    r.k0 = static_cast<std::uint32_t>(k);
    r.k1 = static_cast<std::uint32_t>(k >> 32);
    return r;
  }
};

}  // namespace intrain
