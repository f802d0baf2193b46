// `intrain ablate`: the report's statistics against hand-computed values,
// and a sweep killed part-way that resumes without recomputing finished cells.
#include <gtest/gtest.h>

#include <csignal>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "analysis/ablation_report.h"
#include "tests/run_support.h"

namespace intrain {
namespace {

namespace fs = std::filesystem;
using namespace intrain::testing;  // tiny_corpus, fresh_dir, run_cli, file_bytes

CellResult done(int bits, const std::string& rounding, int seed, double val, double tps = 1000.0) {
  CellResult c;
  c.bits = bits;
  c.rounding = rounding;
  c.seed = seed;
  c.status = "done";
  c.final_val_loss = val;
  c.tokens_per_s = tps;
  return c;
}

TEST(AblationReport, StudentQuantileMatchesTables) {
  // Two-sided 95% critical values from any t table; 1e-9 covers Boost's
  // double-precision inverse (exact to a few ulps).
  EXPECT_NEAR(student_t_quantile(0.975, 1), 12.706204736174698, 1e-9);
  EXPECT_NEAR(student_t_quantile(0.975, 2), 4.302652729749464, 1e-9);
  EXPECT_NEAR(student_t_quantile(0.975, 9), 2.262157162798205, 1e-9);
}

TEST(AblationReport, PairedGapByHand) {
  // d = (2.1-2.0, 2.4-2.2, 1.9-1.9) = (0.1, 0.2, 0.0): mean 0.1, sd 0.1,
  // half-width 4.302653 * 0.1 / sqrt(3) = 0.248414; seed 4 has no baseline.
  const std::vector<CellResult> base = {done(32, "", 1, 2.0), done(32, "", 2, 2.2), done(32, "", 3, 1.9)};
  const std::vector<CellResult> cell = {done(8, "stochastic", 1, 2.1), done(8, "stochastic", 2, 2.4),
                                        done(8, "stochastic", 3, 1.9), done(8, "stochastic", 4, 9.9)};
  const GapStatistics g = paired_gap(cell, base);
  EXPECT_EQ(g.n, 3);
  // Tolerances: sums of three doubles; 1e-12 is far above their rounding.
  EXPECT_NEAR(g.mean, 0.1, 1e-12);
  EXPECT_NEAR(g.sd, 0.1, 1e-12);
  ASSERT_TRUE(g.ci_lo && g.ci_hi);
  EXPECT_NEAR(*g.ci_hi - g.mean, 0.2484139, 1e-6);
  EXPECT_NEAR(g.relative_mean, (0.1 / 2.0 + 0.2 / 2.2 + 0.0) / 3.0, 1e-12);
  // One seed: a mean but no interval.
  const GapStatistics one = paired_gap({cell[0]}, base);
  EXPECT_EQ(one.n, 1);
  EXPECT_FALSE(one.ci_lo.has_value());
}

TEST(AblationReport, ParetoListsWhatNothingBeatsOnAllThree) {
  // tokens/s sets seconds per step (batch 1 x context 100 tokens per step).
  std::vector<CellResult> cells = {
      done(32, "", 1, 2.00, 1000.0),           // best loss: listed
      done(16, "stochastic", 1, 2.01, 500.0),  // beaten by int8-sr on all three
      done(8, "stochastic", 1, 2.005, 2000.0), // listed
      done(8, "nearest", 1, 2.10, 1500.0),     // beaten by int8-sr? bits equal: not strictly: listed
      done(4, "stochastic", 1, 3.00, 1800.0),  // fewest bits: listed
  };
  const nlohmann::json r = ablation_report(cells, {{"batch", 1}, {"context", 100}});
  std::vector<std::string> pareto;
  for (const auto& n : r["pareto"]) pareto.push_back(n.get<std::string>());
  EXPECT_EQ(pareto, (std::vector<std::string>{"fp32", "int8-sr", "int8-rn", "int4-sr"}));
  // The markdown names every group and the gap of int16-sr (+0.01).
  const std::string md = ablation_markdown(r);
  EXPECT_NE(md.find("| int16-sr | 1/1 | 2.0100"), std::string::npos) << md;
  EXPECT_NE(md.find("+0.0100"), std::string::npos) << md;
}

// Starts `intrain args` in its own process group, output to `log`.
pid_t start_cli(const std::vector<std::string>& args, const fs::path& log) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::setpgid(0, 0);
    std::freopen(log.c_str(), "w", stdout);
    ::dup2(::fileno(stdout), STDERR_FILENO);
    std::vector<std::string> a = {std::string(INTRAIN_BINARY_DIR) + "/intrain"};
    a.insert(a.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (std::string& s : a) argv.push_back(s.data());
    argv.push_back(nullptr);
    ::execv(argv[0], argv.data());
    std::_Exit(127);
  }
  ::setpgid(pid, pid);
  return pid;
}

std::vector<std::string> sweep_flags(const fs::path& dir) {
  return {"ablate",       "--bits",    "8",        "--rounding",    "stochastic,nearest", "--seeds", "2",
          "--jobs",       "1",         "--threads", "1",            "--layers", "1",      "--d-model", "16",
          "--heads",      "1",         "--context", "16",           "--batch", "2",       "--steps", "150",
          "--warmup",     "2",         "--eval-every", "0",         "--eval-windows", "4", "--no-plots",
          "--momentum",   "0",  // SGD: a finite bound, so the fp32 L floor shows in it
          "--data",       tiny_corpus().string(), "--out", dir.string()};
}

long mtime_ns(const fs::path& p) {
  struct stat st {};
  ::stat(p.c_str(), &st);
  return st.st_mtim.tv_sec * 1000000000L + st.st_mtim.tv_nsec;
}

// The acceptance test of resuming: kill the whole sweep (ablate and its
// running cell) once some cells have finished; the rerun must leave every
// finished cell untouched and complete the rest.
TEST(Ablate, KilledSweepResumesWithoutRecomputingFinishedCells) {
  const fs::path dir = fresh_dir("ablate_resume");
  const fs::path cells = dir / "cells";
  const pid_t pid = start_cli(sweep_flags(dir), fs::temp_directory_path() / "intrain_ablate_kill.log");
  // 6 cells (fp32, int8-sr, int8-rn at seeds 1 and 2) run one at a time; kill
  // after the second finishes.
  auto finished = [&] {
    int n = 0;
    if (fs::exists(cells)) {
      for (const auto& e : fs::directory_iterator(cells)) n += fs::exists(e.path() / "summary.json");
    }
    return n;
  };
  for (int i = 0; i < 120000 && finished() < 2; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  ASSERT_GE(finished(), 2) << "the sweep did not get going";
  ::kill(-pid, SIGKILL);
  int status = 0;
  ::waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFSIGNALED(status));
  // Orphaned cells die with the group; give the kernel a moment to reap them.
  std::this_thread::sleep_for(std::chrono::milliseconds(200));

  std::map<std::string, std::pair<std::string, long>> before;
  for (const auto& e : fs::directory_iterator(cells)) {
    const fs::path s = e.path() / "summary.json";
    if (fs::exists(s)) before[e.path().filename().string()] = {file_bytes(s), mtime_ns(s)};
  }
  ASSERT_GE(before.size(), 2u);
  ASSERT_LT(before.size(), 6u) << "the kill came too late to interrupt anything";

  std::vector<std::string> args = sweep_flags(dir);
  std::string cmd;
  for (const std::string& a : std::vector<std::string>(args.begin(), args.end())) cmd += a + " ";
  std::string out;
  ASSERT_EQ(run_cli(cmd, &out), 0) << out;
  EXPECT_NE(out.find(std::to_string(before.size()) + " already finished"), std::string::npos) << out;
  for (const auto& [name, v] : before) {
    const fs::path s = cells / name / "summary.json";
    EXPECT_EQ(file_bytes(s), v.first) << name << " was recomputed";
    EXPECT_EQ(mtime_ns(s), v.second) << name << " was rewritten";
  }
  std::ifstream in(dir / "ablation.json");
  const nlohmann::json r = nlohmann::json::parse(in);
  int n_done = 0;
  for (const auto& c : r["cells"]) n_done += c["status"] == "done";
  EXPECT_EQ(n_done, 6);
  EXPECT_EQ(r["groups"].size(), 3u);  // fp32, int8-rn, int8-sr

  // Every integer cell's bound uses max(its own L, the fp32 cell's L at its
  // seed); its own L is the one its run wrote. Where the fp32 L is the larger,
  // the bound was evaluated again with it, so its final value differs from the
  // run's own.
  std::map<int, double> fp32_L;
  for (const auto& c : r["cells"])
    if (c["bits"] == 32) fp32_L[c["seed"].get<int>()] = c["bound"]["L"].get<double>();
  int floored = 0;
  for (const auto& c : r["cells"]) {
    if (c["bits"] == 32) continue;
    const nlohmann::json own = nlohmann::json::parse(file_bytes(cells / c["name"].get<std::string>() / "summary.json"));
    const double L_own = own["probe"]["constants"]["L"].get<double>(), L_fp32 = fp32_L.at(c["seed"].get<int>());
    EXPECT_EQ(c["bound"]["L_own"].get<double>(), L_own) << c["name"];
    EXPECT_EQ(c["bound"]["L"].get<double>(), std::max(L_own, L_fp32)) << c["name"];
    EXPECT_EQ(c["bound"]["L_source"], L_fp32 > L_own ? "fp32 cell" : "own") << c["name"];
    if (L_fp32 > L_own) {
      ++floored;
      EXPECT_NE(c["bound"]["final_bound"], own["probe"]["final_bound"]) << c["name"];
    } else {
      EXPECT_EQ(c["bound"]["final_bound"], own["probe"]["final_bound"]) << c["name"];
    }
    std::printf("%s: L own %.3f, fp32 %.3f; final bound %s (run's own %s)\n", c["name"].get<std::string>().c_str(),
                L_own, L_fp32, c["bound"]["final_bound"].dump().c_str(), own["probe"]["final_bound"].dump().c_str());
  }
  EXPECT_GT(floored, 0) << "no integer cell's L was below the fp32 cell's: the floor went untested";

  // A rerun with other training settings is refused: its cells would not compare.
  EXPECT_NE(run_cli(cmd + "--lr 0.2", &out), 0);
  EXPECT_NE(out.find("holds a sweep with lr"), std::string::npos) << out;
  fs::remove_all(dir);
}

}  // namespace
}  // namespace intrain
