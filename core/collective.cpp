#include "core/collective.h"

#include <omp.h>

#include <algorithm>
#include <bit>
#include <thread>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace intrain {

std::uint64_t Collective::max(std::uint64_t x) const {
  max(std::span<std::uint64_t>(&x, 1));
  return x;
}

int Collective::max(int x) const {
  std::int64_t v = x;
  max(std::span<std::int64_t>(&v, 1));
  return static_cast<int>(v);
}

int Collective::min(int x) const { return -max(-x); }

double Collective::sum(double x) const {
  sum(std::span<double>(&x, 1));
  return x;
}

std::int64_t Collective::sum(std::int64_t x) const {
  sum(std::span<std::int64_t>(&x, 1));
  return x;
}

int threads_per_rank(const Collective& comm) {
  const int usable = omp_get_num_procs();  // the affinity mask
  const int machine = static_cast<int>(std::thread::hardware_concurrency());
  const bool bound = machine > 0 && usable < machine;
  return std::max(1, bound ? usable : usable / std::max(1, comm.node_size()));
}

void SingleProcess::abort(int code) const { std::exit(code); }

bool launched_by_mpi() {
  const char* single = std::getenv("INTRAIN_SINGLE_PROCESS");
  if (single && std::string(single) == "1") return false;
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK"}) {
    if (std::getenv(v)) return true;
  }
  return false;
}

#ifndef INTRAIN_HAVE_MPI
bool built_with_mpi() { return false; }

std::unique_ptr<Collective> init_collective(int*, char***) {
  if (launched_by_mpi()) {
    const char* n = std::getenv("OMPI_COMM_WORLD_SIZE");
    if (!n) n = std::getenv("PMI_SIZE");
    if (!n || std::string(n) != "1") {
      throw std::runtime_error(
          "this intrain was built without MPI, but it was started by an MPI launcher: every rank would train alone. "
          "Install libopenmpi-dev (./scripts/setup.sh) and rebuild, or run without mpirun");
    }
  }
  return std::make_unique<SingleProcess>();
}
#endif

// ---- batch slices ------------------------------------------------------------

std::uint64_t slice_max(const RngKey& key, std::uint64_t local) {
  return key.batch_shard ? key.batch_shard->max(local) : local;
}

int slice_max(const RngKey& key, int local) { return key.batch_shard ? key.batch_shard->max(local) : local; }

float slice_max(const RngKey& key, float local_nonnegative) {
  if (!key.batch_shard) return local_nonnegative;
  // Non-negative IEEE floats order as their bit patterns.
  const std::uint64_t bits = std::bit_cast<std::uint32_t>(local_nonnegative);
  return std::bit_cast<float>(static_cast<std::uint32_t>(key.batch_shard->max(bits)));
}

std::int64_t slice_rows(const RngKey& key, std::int64_t local_rows) {
  return key.batch_shard ? local_rows * key.batch_shard->size() : local_rows;
}

RngKey slice_key(RngKey key, std::int64_t local_numel) {
  if (key.batch_shard) {
    // Modulo 2^32, as the single-process index is.
    key.index_offset = static_cast<std::uint32_t>(static_cast<std::uint64_t>(key.batch_shard->rank()) *
                                                  static_cast<std::uint64_t>(local_numel));
  }
  return key;
}

}  // namespace intrain
