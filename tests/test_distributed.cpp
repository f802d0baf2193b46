// Data-parallel training and sharded sweeps under `mpirun` (docs/distributed.md).
//
// The claims tested are exact: an N-rank integer run that splits the global
// batch writes the same checkpoint bytes as one process; a sharded sweep
// reports the same cells. Each test skips, saying why, when mpirun is absent
// or this build has no MPI.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "core/collective.h"
#include "layers/param.h"
#include "run_support.h"

namespace intrain {
namespace {

using namespace intrain::testing;

// mpirun's path, or "" if it is not on PATH.
std::string find_mpirun() {
  const char* path = std::getenv("PATH");
  std::string dirs = path ? path : "/usr/bin:/bin";
  std::size_t at = 0;
  while (at <= dirs.size()) {
    const std::size_t end = std::min(dirs.find(':', at), dirs.size());
    const fs::path p = fs::path(dirs.substr(at, end - at)) / "mpirun";
    if (::access(p.c_str(), X_OK) == 0) return p.string();
    at = end + 1;
  }
  return "";
}

// `mpirun -np N` with the flags CI needs: --oversubscribe (more ranks than
// cores) and, in a container that runs as root, OpenMPI's explicit consent.
// Under the sanitizer build the ranks keep ASan's and UBSan's checks but not
// LeakSanitizer's: OpenMPI's plugins leak at MPI_Finalize and are unloaded
// before the report, so their stacks cannot be suppressed by name. The same
// code of ours is leak-checked by the single-process runs of every suite.
std::string mpirun_prefix(int ranks) {
  std::string env = "env OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 ";
#ifdef INTRAIN_SANITIZE
  const char* asan = std::getenv("ASAN_OPTIONS");
  env += "ASAN_OPTIONS=" + std::string(asan ? asan : "") + (asan && *asan ? ":" : "") + "detect_leaks=0 ";
#endif
  return env + find_mpirun() + " --oversubscribe -np " + std::to_string(ranks) + " ";
}

#define SKIP_WITHOUT_MPI()                                                                                    \
  do {                                                                                                        \
    if (find_mpirun().empty()) GTEST_SKIP() << "mpirun not found: install openmpi-bin (./scripts/setup.sh)"; \
    if (!built_with_mpi()) GTEST_SKIP() << "this build has no MPI: install libopenmpi-dev and reconfigure";  \
  } while (0)

std::string intrain_exe() { return std::string(INTRAIN_BINARY_DIR) + "/intrain"; }

// A small model that still has every op of the default one (2 blocks, 2
// heads, tied head), a global batch of 8 and a checkpoint every 10 steps.
std::string train_flags(const fs::path& out, const std::string& format, long steps) {
  return "train --format " + format + " --layers 2 --d-model 32 --heads 2 --context 16 --batch 8 --steps " +
         std::to_string(steps) + " --warmup 3 --eval-every 10 --eval-windows 4 --final-eval-windows 4 " +
         "--checkpoint-every 10 --quiet --threads 1 --data " + tiny_corpus().string() + " --out " + out.string();
}

// The files a finished run leaves, and that the ranks must agree on.
void expect_same_checkpoint(const fs::path& a, const fs::path& b, const std::string& what) {
  for (const char* f : {"train_state.safetensors", "model.safetensors"}) {
    ASSERT_TRUE(fs::exists(a / f)) << a / f;
    ASSERT_TRUE(fs::exists(b / f)) << b / f;
    EXPECT_TRUE(file_bytes(a / f) == file_bytes(b / f)) << what << ": " << f << " differs";
  }
}

// ---- the gradient all-reduce, in one process ------------------------------

// N ranks that all hold this rank's data: a sum is N times the value, a
// maximum the value itself. Enough to test the all-reduce's arithmetic and
// its overflow guard without MPI.
class MirroredRanks final : public Collective {
 public:
  explicit MirroredRanks(int n) : n_(n) {}
  int rank() const override { return 0; }
  int size() const override { return n_; }
  int node_size() const override { return n_; }
  void max(std::span<std::uint64_t>) const override {}
  void max(std::span<std::int64_t>) const override {}
  void sum(std::span<std::int64_t> v) const override { scale(v); }
  void sum(std::span<std::int32_t> v) const override { scale(v); }
  void sum(std::span<float> v) const override { scale(v); }
  void sum(std::span<double> v) const override { scale(v); }
  void barrier() const override {}
  [[noreturn]] void abort(int) const override { std::abort(); }
  using Collective::max;
  using Collective::sum;

  mutable int int32_words = 0, int64_words = 0;

 private:
  template <class T>
  void scale(std::span<T> v) const {
    if constexpr (std::is_same_v<T, std::int32_t>) int32_words += static_cast<int>(v.size());
    if constexpr (std::is_same_v<T, std::int64_t>) int64_words += static_cast<int>(v.size());
    for (T& x : v) x = static_cast<T>(x * n_);
  }
  int n_;
};

Param with_grad(const std::string& name, Tensor g) {
  Param p;
  p.name = name;
  p.grad = std::move(g);
  p.has_grad = true;
  return p;
}

TEST(AllReduceGradients, SumsExactlyAndPicksTheWordPerParameter) {
  std::vector<Param> ps;
  Tensor small({3}, Format::accumulator(32), -7);
  small.data<std::int32_t>()[0] = -5;
  small.data<std::int32_t>()[1] = (1 << 20) + 3;
  small.data<std::int32_t>()[2] = 0;
  Tensor big({2}, Format::accumulator(64), 4);
  big.data<std::int64_t>()[0] = std::int64_t{1} << 40;
  big.data<std::int64_t>()[1] = -((std::int64_t{1} << 40) + 1);
  ps.push_back(with_grad("small", small));
  ps.push_back(with_grad("big", big));
  const MirroredRanks three(3);
  const std::int64_t bytes = all_reduce_gradients(ps, three);
  // 21 bits + ceil(log2 3) = 23 <= 31: int32; 41 + 2 = 43 bits: int64.
  EXPECT_EQ(three.int32_words, 3);
  EXPECT_EQ(three.int64_words, 2);
  EXPECT_EQ(bytes, 3 * 4 + 2 * 8);
  ASSERT_EQ(ps[0].grad.dtype(), DType::I64);
  EXPECT_EQ(ps[0].grad.exponent(), -7);  // the single-process exponent is kept
  EXPECT_EQ(ps[0].grad.data<std::int64_t>()[0], -15);
  EXPECT_EQ(ps[0].grad.data<std::int64_t>()[1], 3 * ((1 << 20) + 3));
  EXPECT_EQ(ps[0].grad.data<std::int64_t>()[2], 0);
  EXPECT_EQ(ps[1].grad.exponent(), 4);
  EXPECT_EQ(ps[1].grad.data<std::int64_t>()[1], -3 * ((std::int64_t{1} << 40) + 1));
}

TEST(AllReduceGradients, RefusesASumThatCouldLeaveInt64) {
  std::vector<Param> ps;
  Tensor g({1}, Format::accumulator(64), 0);
  g.data<std::int64_t>()[0] = (std::int64_t{1} << 62) - 1;  // 62 bits
  ps.push_back(with_grad("h.0.mlp.c_fc.weight", g));
  // 62 bits + 1 for two ranks = 63: still fits.
  EXPECT_NO_THROW(all_reduce_gradients(ps, MirroredRanks(2)));
  ps[0].grad = g;
  try {
    all_reduce_gradients(ps, MirroredRanks(3));  // 62 + 2 = 64 bits
    FAIL() << "no overflow error";
  } catch (const std::overflow_error& e) {
    EXPECT_NE(std::string(e.what()).find("h.0.mlp.c_fc.weight"), std::string::npos) << e.what();
  }
  EXPECT_EQ(ps[0].grad.data<std::int64_t>()[0], (std::int64_t{1} << 62) - 1) << "the refused sum changed the gradient";
}

// ---- through mpirun -------------------------------------------------------

TEST(Distributed, TwoRankIntegerRunsWriteTheSingleProcessCheckpoint) {
  SKIP_WITHOUT_MPI();
  const fs::path dir = fresh_dir("mpi_bitexact");
  std::string out;
  // int8 with stochastic rounding (every rounding keyed by global element
  // index), and int16 with round-to-nearest.
  for (const std::string format : {"int8", "int16 --rounding nearest"}) {
    const std::string tag = format.substr(0, format.find(' '));
    const fs::path one = dir / (tag + "_1"), two = dir / (tag + "_2"), four = dir / (tag + "_4");
    ASSERT_EQ(run_cli(train_flags(one, format, 25), &out), 0) << out;
    ASSERT_EQ(run_command(mpirun_prefix(2) + intrain_exe() + " " + train_flags(two, format, 25), &out), 0) << out;
    expect_same_checkpoint(one, two, format + " on 2 ranks");
    // Rank 0 alone writes: the metrics are one file with one row per step.
    std::ifstream m(two / "metrics.csv");
    int rows = 0;
    for (std::string line; std::getline(m, line);) rows += !line.empty();
    EXPECT_EQ(rows, 26) << "metrics.csv of the 2-rank run";
    // The same global batch over 4 ranks (2 rows each) is the same run too.
    ASSERT_EQ(run_command(mpirun_prefix(4) + intrain_exe() + " " + train_flags(four, format, 25), &out), 0) << out;
    expect_same_checkpoint(one, four, format + " on 4 ranks");
  }
  fs::remove_all(dir);
}

TEST(Distributed, Fp32RunsAgreeWithinFloatSummationOrder) {
  SKIP_WITHOUT_MPI();
  const fs::path dir = fresh_dir("mpi_fp32");
  std::string out;
  ASSERT_EQ(run_cli(train_flags(dir / "one", "fp32", 20), &out), 0) << out;
  ASSERT_EQ(run_command(mpirun_prefix(2) + intrain_exe() + " " + train_flags(dir / "two", "fp32", 20), &out), 0) << out;
  auto val = [](const fs::path& d) {
    std::ifstream in(d / "summary.json");
    return nlohmann::json::parse(in).at("final_val_loss").get<double>();
  };
  // The all-reduce adds float gradients in another order than one process's
  // column sums: after 20 steps the losses differ by float rounding only.
  // 1e-3 relative is ~100x the drift measured (docs/distributed.md).
  EXPECT_NEAR(val(dir / "two"), val(dir / "one"), 1e-3 * val(dir / "one"));
  fs::remove_all(dir);
}

TEST(Distributed, UnevenBatchIsRefusedOnEveryRank) {
  SKIP_WITHOUT_MPI();
  const fs::path dir = fresh_dir("mpi_uneven");
  std::string out;
  const int rc = run_command(mpirun_prefix(3) + intrain_exe() + " " + train_flags(dir, "int8", 5), &out);
  EXPECT_NE(rc, 0);
  EXPECT_NE(out.find("--batch 8 does not split evenly over 3 ranks"), std::string::npos) << out;
  EXPECT_FALSE(fs::exists(dir / "metrics.csv")) << "a refused run wrote metrics";
  fs::remove_all(dir);
}

// Kill one rank mid-run: mpirun must end the others (no hang), and the last
// checkpoint must resume, on 2 ranks, to the checkpoint of an uninterrupted run.
TEST(Distributed, KilledRankEndsTheRunAndTheCheckpointResumes) {
  SKIP_WITHOUT_MPI();
  const fs::path dir = fresh_dir("mpi_kill");
  const long steps = 1000;  // long enough that the kill, after the first checkpoint, comes mid-run
  std::string out;
  ASSERT_EQ(run_cli(train_flags(dir / "whole", "int8", steps), &out), 0) << out;

  const fs::path run = dir / "killed";
  const std::string cmd = mpirun_prefix(2) + intrain_exe() + " " + train_flags(run, "int8", steps);
  const pid_t launcher = ::fork();
  if (launcher == 0) {
    ::setpgid(0, 0);
    ::execl("/bin/sh", "sh", "-c", ("exec " + cmd + " > " + (dir / "killed.log").string() + " 2>&1").c_str(),
            static_cast<char*>(nullptr));
    std::_Exit(127);
  }
  ::setpgid(launcher, launcher);
  // Wait for a checkpoint, then kill the rank with the highest pid.
  const auto t0 = std::chrono::steady_clock::now();
  while (!fs::exists(run / "train_state.safetensors") && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(60))
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  ASSERT_TRUE(fs::exists(run / "train_state.safetensors")) << "the 2-rank run wrote no checkpoint";
  std::string pids;
  run_command("pgrep -P " + std::to_string(launcher) + " -x intrain", &pids);
  ASSERT_FALSE(pids.empty()) << "no rank found to kill";
  const pid_t victim = static_cast<pid_t>(std::stol(pids.substr(pids.rfind('\n', pids.size() - 2) + 1)));
  ASSERT_EQ(::kill(victim, SIGKILL), 0);
  // mpirun must notice and end the other rank: wait at most 60 s.
  int status = 0;
  pid_t done = 0;
  for (int i = 0; i < 6000 && done == 0; ++i) {
    done = ::waitpid(launcher, &status, WNOHANG);
    if (done == 0) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  if (done == 0) ::kill(-launcher, SIGKILL);
  ASSERT_NE(done, 0) << "mpirun hung after a rank was killed";
  EXPECT_FALSE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "a killed run exited 0";
  ASSERT_FALSE(fs::exists(run / "summary.json")) << "the kill came too late: the run had finished";

  ASSERT_EQ(run_command(cmd + " --resume", &out), 0) << out;
  expect_same_checkpoint(dir / "whole", run, "resumed 2-rank run");
  fs::remove_all(dir);
}

// A sharded sweep (cells dealt round-robin over 2 ranks) reports the same
// cells as the single-process sweep; only the timings may differ.
TEST(Distributed, ShardedSweepReportsTheSingleProcessCells) {
  SKIP_WITHOUT_MPI();
  const fs::path dir = fresh_dir("mpi_sweep");
  auto sweep = [&](const fs::path& out) {
    return "ablate --bits 8 --rounding stochastic,nearest --seeds 1 --jobs 1 --threads 1 --layers 1 --d-model 16 "
           "--heads 1 --context 16 --batch 2 --steps 40 --warmup 2 --eval-every 20 --eval-windows 4 --no-plots "
           "--data " + tiny_corpus().string() + " --out " + out.string();
  };
  std::string out;
  ASSERT_EQ(run_cli(sweep(dir / "one"), &out), 0) << out;
  ASSERT_EQ(run_command(mpirun_prefix(2) + intrain_exe() + " " + sweep(dir / "two"), &out), 0) << out;
  auto cells = [](const fs::path& d) {
    std::ifstream in(d / "ablation.json");
    nlohmann::json c = nlohmann::json::parse(in).at("cells");
    for (auto& cell : c)
      for (const char* timing : {"tokens_per_s", "peak_rss_mib", "wall_s"}) cell.erase(timing);
    return c;
  };
  const nlohmann::json a = cells(dir / "one"), b = cells(dir / "two");
  ASSERT_EQ(a.size(), 3u);  // fp32, int8-sr, int8-rn
  EXPECT_EQ(a, b) << "single:\n" << a.dump(1) << "\nsharded:\n" << b.dump(1);
  fs::remove_all(dir);
}

}  // namespace
}  // namespace intrain
