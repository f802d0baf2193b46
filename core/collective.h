// Collective operations across the ranks of a data-parallel run.
//
// A Collective is the communicator of one run: MPI's world (core/
// collective_mpi.cpp, built when CMake finds MPI) or a single process, where
// every reduction is the identity. Every rank must call the same reductions in
// the same order with the same lengths (MPI's rule); the engine guarantees it
// because no collective call depends on a rank's data, only on shapes and formats.
//
// Batch slices. In a data-parallel training pass, rank r of N holds rows
// [r*B/N, (r+1)*B/N) of the global batch, so every batch-leading tensor of the
// pass is the r-th of N equal, contiguous slices of the tensor a single
// process would hold. An op that is given such a slice (RngKey::batch_shard
// set) makes every data-dependent choice from global values: a tensor's
// exponent from the all-reduced maximum, the loss normalisation from the
// global row count, and the stochastic-rounding index of element i as
// r * (local elements) + i. So each rank's slice is bit-identical to the same
// rows of the single-process tensor (docs/distributed.md).
#pragma once

#include <cstdint>
#include <memory>
#include <span>

#include "core/rng.h"

namespace intrain {

class Collective {
 public:
  virtual ~Collective() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Ranks on this machine (they share its cores).
  virtual int node_size() const = 0;

  // In-place elementwise all-reduce. Integer sums are exact; the caller
  // guards against overflow (int64 wraps in MPI as in C++).
  virtual void max(std::span<std::uint64_t> v) const = 0;
  virtual void max(std::span<std::int64_t> v) const = 0;
  virtual void sum(std::span<std::int64_t> v) const = 0;
  virtual void sum(std::span<std::int32_t> v) const = 0;
  // Float sums: the order of additions is MPI's, so not bit-reproducible
  // against one process.
  virtual void sum(std::span<float> v) const = 0;
  virtual void sum(std::span<double> v) const = 0;
  virtual void barrier() const = 0;
  // Ends every rank of the run (MPI_Abort), with exit status `code`.
  [[noreturn]] virtual void abort(int code) const = 0;

  // Traffic so far: payload bytes this rank passed to all-reduces (a ring
  // all-reduce sends 2 (N-1)/N times this), the number of all-reduce calls,
  // and the wall time spent in them (waiting for slower ranks included).
  struct Traffic {
    std::int64_t bytes = 0, calls = 0;
    double seconds = 0.0;
  };
  const Traffic& traffic() const { return traffic_; }

  // Scalar forms.
  std::uint64_t max(std::uint64_t x) const;
  int max(int x) const;
  int min(int x) const;
  double sum(double x) const;
  std::int64_t sum(std::int64_t x) const;

 protected:
  void count(std::size_t bytes, double seconds) const {
    traffic_.bytes += static_cast<std::int64_t>(bytes);
    ++traffic_.calls;
    traffic_.seconds += seconds;
  }

 private:
  mutable Traffic traffic_;
};

// One process: rank 0 of 1, every reduction the identity.
class SingleProcess final : public Collective {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  int node_size() const override { return 1; }
  void max(std::span<std::uint64_t>) const override {}
  void max(std::span<std::int64_t>) const override {}
  void sum(std::span<std::int64_t>) const override {}
  void sum(std::span<std::int32_t>) const override {}
  void sum(std::span<float>) const override {}
  void sum(std::span<double>) const override {}
  void barrier() const override {}
  [[noreturn]] void abort(int code) const override;
  using Collective::max;
  using Collective::sum;
};

// True when this process was started by an MPI launcher (mpirun, mpiexec,
// srun): OMPI_COMM_WORLD_SIZE, PMIX_RANK or PMI_RANK is set. A child that
// intrain spawns itself (ablate's cells) sets INTRAIN_SINGLE_PROCESS=1 and
// counts as not launched.
bool launched_by_mpi();

// MPI's world when launched by MPI and built with it; otherwise one process.
// Throws std::runtime_error when launched by MPI with more than one rank but
// built without MPI (the ranks would each train alone, unknowingly).
// The returned object finalises MPI when destroyed.
std::unique_ptr<Collective> init_collective(int* argc, char*** argv);

// Whether this build has MPI support.
bool built_with_mpi();

// OpenMP threads for one rank when --threads is not given: the cores this
// process may use, shared by the ranks of its machine unless the launcher
// bound each rank to its own cores (then the affinity mask is already its share).
int threads_per_rank(const Collective& comm);

// ---- helpers for ops that may receive a batch slice ------------------------

inline bool is_batch_slice(const RngKey& key) { return key.batch_shard != nullptr; }
// The global maximum of a per-rank value (the value itself without a slice).
std::uint64_t slice_max(const RngKey& key, std::uint64_t local);
int slice_max(const RngKey& key, int local);
float slice_max(const RngKey& key, float local_nonnegative);
// Rows of the global tensor: local_rows * ranks.
std::int64_t slice_rows(const RngKey& key, std::int64_t local_rows);
// The key with index_offset = rank * local_numel: element i of this slice
// draws the bits of element rank * local_numel + i of the global tensor.
RngKey slice_key(RngKey key, std::int64_t local_numel);

}  // namespace intrain
