// The MPI communicator (compiled only when CMake finds MPI). MPI's default
// error handler on MPI_COMM_WORLD is MPI_ERRORS_ARE_FATAL: a failed call ends
// every rank, so a broken run stops instead of hanging.
#include <mpi.h>

#include <algorithm>
#include <stdexcept>

#include "core/collective.h"

namespace intrain {

namespace {

class MpiWorld final : public Collective {
 public:
  MpiWorld(int* argc, char*** argv) {
    int provided = 0;
    // Only the main thread calls MPI; OpenMP threads never do.
    MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &size_);
    MPI_Comm node;
    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node);
    MPI_Comm_size(node, &node_size_);
    MPI_Comm_free(&node);
  }
  ~MpiWorld() override { MPI_Finalize(); }
  MpiWorld(const MpiWorld&) = delete;
  MpiWorld& operator=(const MpiWorld&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  int node_size() const override { return node_size_; }
  void max(std::span<std::uint64_t> v) const override { reduce(v.data(), v.size(), MPI_UINT64_T, MPI_MAX); }
  void max(std::span<std::int64_t> v) const override { reduce(v.data(), v.size(), MPI_INT64_T, MPI_MAX); }
  void sum(std::span<std::int64_t> v) const override { reduce(v.data(), v.size(), MPI_INT64_T, MPI_SUM); }
  void sum(std::span<std::int32_t> v) const override { reduce(v.data(), v.size(), MPI_INT32_T, MPI_SUM); }
  void sum(std::span<float> v) const override { reduce(v.data(), v.size(), MPI_FLOAT, MPI_SUM); }
  void sum(std::span<double> v) const override { reduce(v.data(), v.size(), MPI_DOUBLE, MPI_SUM); }
  void barrier() const override { MPI_Barrier(MPI_COMM_WORLD); }
  [[noreturn]] void abort(int code) const override {
    MPI_Abort(MPI_COMM_WORLD, code);
    std::abort();  // MPI_Abort does not return
  }
  using Collective::max;
  using Collective::sum;

 private:
  template <class T>
  void reduce(T* p, std::size_t n, MPI_Datatype type, MPI_Op op) const {
    if (size_ == 1 || n == 0) return;
    const double t0 = MPI_Wtime();
    // Large buffers go in pieces: MPI counts are int.
    constexpr std::size_t kPiece = std::size_t{1} << 28;
    for (std::size_t i = 0; i < n; i += kPiece) {
      const int c = static_cast<int>(std::min(kPiece, n - i));
      MPI_Allreduce(MPI_IN_PLACE, p + i, c, type, op, MPI_COMM_WORLD);
    }
    count(n * sizeof(T), MPI_Wtime() - t0);
  }
  int rank_ = 0, size_ = 1, node_size_ = 1;
};

}  // namespace

bool built_with_mpi() { return true; }

std::unique_ptr<Collective> init_collective(int* argc, char*** argv) {
  if (!launched_by_mpi()) return std::make_unique<SingleProcess>();
  return std::make_unique<MpiWorld>(argc, argv);
}

}  // namespace intrain
