// Deterministic parallel loops.
//
// Work is cut into chunks of a fixed size that never depends on the thread
// count, and per-chunk partial results are combined in chunk order. Integer
// reductions are exact anyway; the fixed order also keeps float reductions
// (in the fp32 baseline) identical across thread counts.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include <omp.h>

namespace intrain {

// Elements per chunk for memory-bound elementwise passes: 16 Ki elements is
// 16-64 KiB, big enough to amortise scheduling, small enough to balance.
inline constexpr std::int64_t kChunk = 16384;

inline std::int64_t num_chunks(std::int64_t n, std::int64_t chunk = kChunk) { return (n + chunk - 1) / chunk; }

// Calls f(chunk_index, begin, end) for every chunk, in parallel when there is
// more than one chunk.
template <class F> void for_chunks(std::int64_t n, F&& f, std::int64_t chunk = kChunk) {
  const std::int64_t nc = num_chunks(n, chunk);
  if (nc <= 1) {
    if (n > 0) f(std::int64_t{0}, std::int64_t{0}, n);
    return;
  }
#pragma omp parallel for schedule(static)
  for (std::int64_t c = 0; c < nc; ++c) {
    const std::int64_t b = c * chunk;
    f(c, b, std::min(n, b + chunk));
  }
}

// Map-reduce over chunks: partial = map(begin, end); result = combine(...)
// folded in chunk order starting from `init`.
template <class T, class Map, class Combine>
T reduce_chunks(std::int64_t n, T init, Map&& map, Combine&& combine, std::int64_t chunk = kChunk) {
  const std::int64_t nc = num_chunks(n, chunk);
  std::vector<T> part(static_cast<std::size_t>(nc), init);
  for_chunks(
      n, [&](std::int64_t c, std::int64_t b, std::int64_t e) { part[static_cast<std::size_t>(c)] = map(b, e); },
      chunk);
  T acc = init;
  for (const T& p : part) acc = combine(acc, p);
  return acc;
}

}  // namespace intrain
