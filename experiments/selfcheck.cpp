// `intrain selfcheck`: checks every matmul path bit for bit against the
// reference loop on random operands, then times each path against oneDNN f32
// on this machine, in one run (only ratios from one run mean anything: machines
// of this kind differ by 2x).
#include "experiments/selfcheck.h"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "core/matmul.h"

namespace intrain {
namespace {

Tensor random_tensor(Shape shape, const Format& f, std::uint64_t seed) {
  Tensor t(std::move(shape), f);
  std::mt19937_64 rng(seed);
  if (f.is_float()) {
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    for (std::int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = u(rng);
    return t;
  }
  std::uniform_int_distribution<std::int64_t> u(f.qmin(), f.qmax());
  visit_int(t, [&](auto* p) {
    for (std::int64_t i = 0; i < t.numel(); ++i) p[i] = static_cast<std::remove_pointer_t<decltype(p)>>(u(rng));
  });
  return t;
}

bool same_mantissas(const Tensor& a, const Tensor& b) {
  if (a.format() != b.format() || a.exponent() != b.exponent() || a.numel() != b.numel()) return false;
  for (std::int64_t i = 0; i < a.numel(); ++i)
    if (a.mantissa(i) != b.mantissa(i)) return false;
  return true;
}

// Median seconds of `reps` timed runs after one warm-up.
double time_matmul(const Tensor& A, const Tensor& B, int reps) {
  matmul(A, B);
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    matmul(A, B);
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace

int run_selfcheck(const SelfcheckOptions& opt) {
  if (opt.threads > 0) omp_set_num_threads(opt.threads);
  std::printf("intrain selfcheck: %d thread(s)\n\n", omp_get_max_threads());

  // 1. Exactness on small odd shapes, every path and transpose.
  int failures = 0;
  std::printf("exactness against the reference loop (bit for bit):\n");
  const int widths[][2] = {{8, 8}, {4, 8}, {8, 16}, {16, 8}, {12, 12}, {16, 16}};
  std::uint64_t seed = 1;
  for (const auto& w : widths) {
    for (Trans ta : {Trans::N, Trans::T}) {
      for (Trans tb : {Trans::N, Trans::T}) {
        const Format fa = Format::fixed(w[0]), fb = Format::fixed(w[1]);
        const Tensor A = random_tensor(ta == Trans::N ? Shape{3, 33, 71} : Shape{3, 71, 33}, fa, seed++);
        const Tensor B = random_tensor(tb == Trans::N ? Shape{3, 71, 29} : Shape{3, 29, 71}, fb, seed++);
        const bool ok = same_mantissas(matmul(A, B, ta, tb), matmul_reference(A, B, ta, tb));
        failures += !ok;
        if (!ok) std::printf("  MISMATCH int%d x int%d (ta=%d tb=%d)\n", w[0], w[1], int(ta), int(tb));
      }
    }
    std::printf("  int%-2d x int%-2d  %-8s 4 transposes x batch 3: %s\n", w[0], w[1],
                matmul_path_name(matmul_path(random_tensor({1, 1}, Format::fixed(w[0]), 0),
                                             random_tensor({1, 1}, Format::fixed(w[1]), 0))),
                failures ? "FAILED" : "exact");
  }

  // 2. Throughput at a square size.
  const std::int64_t n = opt.size;
  const double ops = 2.0 * static_cast<double>(n) * n * n;
  std::printf("\nthroughput at %lld^3 (median of %d):\n", static_cast<long long>(n), opt.reps);
  struct Row {
    const char* name;
    Format f;
  };
  const Row rows[] = {{"fp32 (oneDNN f32)", Format::fp32()},
                      {"int8 path", Format::fixed(8)},
                      {"int16 split path", Format::fixed(16)}};
  double f32_gops = 0.0;
  for (const Row& r : rows) {
    const Tensor A = random_tensor({n, n}, r.f, 100), B = random_tensor({n, n}, r.f, 101);
    const double gops = ops / time_matmul(A, B, opt.reps) * 1e-9;
    if (r.f.is_float()) f32_gops = gops;
    std::printf("  %-20s %8.1f GOP/s   %5.2fx fp32\n", r.name, gops, gops / f32_gops);
  }
  std::printf("\n%s\n", failures ? "selfcheck FAILED" : "selfcheck passed: every integer path is bit-exact");
  return failures ? 1 : 0;
}

}  // namespace intrain
