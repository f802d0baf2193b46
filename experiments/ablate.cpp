#include "experiments/ablate.h"

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <system_error>

#include <nlohmann/json.hpp>

#include "analysis/ablation_report.h"
#include "analysis/trajectory_bound.h"
#include "core/collective.h"
#include "core/precision.h"
#include "experiments/child_process.h"
#include "experiments/run_lock.h"
#include "optim/sgd.h"

namespace intrain {

namespace fs = std::filesystem;
using nlohmann::json;

std::string AblationCell::name() const { return ablation_group_name(bits, rounding, tiling) + "_s" + std::to_string(seed); }

std::string AblationCell::format() const { return bits == 32 ? "fp32" : "int" + std::to_string(bits); }

void apply_quick(AblateOptions& o) {
  // Two blocks of the default width on short windows: an eighth of the
  // default model's work per step, and (unlike a narrower model) past the
  // unigram and bigram plateaus within 400 steps at every seed tried.
  o.bits = {4, 8, 12, 16};
  o.seeds = 2;
  TrainOptions& t = o.train;
  t.layers = 2;
  t.d_model = 128;
  t.heads = 4;
  t.context = 32;
  t.batch = 16;
  t.steps = 400;
  t.warmup = 30;
  t.eval_every = 50;
  t.eval_windows = 16;
  t.final_eval_windows = 512;  // 16k bytes, the same windows for every cell
}

std::vector<AblationCell> ablation_grid(const AblateOptions& o) {
  std::vector<AblationCell> cells;
  for (int s = 1; s <= o.seeds; ++s) cells.push_back({32, "", s});
  for (int b : o.bits) {
    for (const std::string& r : o.roundings) {
      for (const std::string& t : o.tilings) {
        for (int s = 1; s <= o.seeds; ++s) cells.push_back({b, r, s, t});
      }
    }
  }
  return cells;
}

namespace {

// An integer cell's bound with the fp32 cell's L at the same seed as a floor
// (analysis/trajectory_bound.h, estimate_constants): where that L is larger,
// the cell's bound is evaluated again from its probe.csv. The cell's own
// files stay as its run wrote them; the report carries both L.
void use_fp32_smoothness(std::vector<CellResult>& results, const std::vector<AblationCell>& grid,
                         const fs::path& cells_dir, const TrainOptions& t) {
  std::map<int, double> fp32_L;  // seed -> L
  for (const CellResult& r : results)
    if (r.bits == 32 && r.status == "done" && r.bound_status == "evaluated") fp32_L[r.seed] = r.est_L;
  const LrSchedule sched{t.lr, t.warmup, t.steps, t.final_lr_fraction};
  std::vector<double> lr(static_cast<std::size_t>(t.steps));
  for (long k = 0; k < t.steps; ++k) lr[static_cast<std::size_t>(k)] = sched.at(k);
  for (std::size_t i = 0; i < results.size(); ++i) {
    CellResult& r = results[i];
    const auto it = fp32_L.find(r.seed);
    if (r.bits == 32 || r.status != "done" || r.bound_status != "evaluated" || it == fp32_L.end() ||
        !(it->second > r.est_L))
      continue;
    const Precision prec = Precision::parse(grid[i].format(), parse_rounding(r.rounding));
    use_smoothness_floor(r, evaluate_run_bound(cells_dir / r.name, lr, prec, t.momentum, t.weight_decay, it->second));
  }
}


// The training settings every cell shares; also what DIR/sweep.json pins.
json sweep_settings(const TrainOptions& t) {
  return {{"layers", t.layers},   {"d_model", t.d_model},   {"heads", t.heads},       {"context", t.context},
          {"batch", t.batch},     {"steps", t.steps},       {"warmup", t.warmup},     {"lr", t.lr},
          {"momentum", t.momentum}, {"weight_decay", t.weight_decay}, {"init_std", t.init_std},
          {"eval_every", t.eval_every}, {"eval_windows", t.eval_windows}, {"final_eval_windows", t.final_eval_windows},
          {"outlier_threshold", t.outlier_threshold},
          {"data", t.data ? fs::absolute(*t.data).string() : std::string("kjv")}};
}

// What an LREC sweep pins: the template every cell shares.
json lrec_sweep_settings(const LrecOptions& l, const TrainOptions& t) {
  return {{"kind", "lrec"},
          {"teacher", fs::absolute(l.teacher).string()},
          {"quantized", fs::absolute(l.quantized).string()},
          {"rank", l.rank},
          {"alpha", l.alpha},
          {"steps", l.steps},
          {"batch", l.batch},
          {"lr", l.lr},
          {"momentum", l.momentum},
          {"warmup", l.warmup},
          {"ce_weight", l.ce_weight},
          {"eval_windows", l.eval_windows},
          {"data", t.data ? fs::absolute(*t.data).string() : std::string("kjv")}};
}

// One LREC cell: the template with the cell's format, rounding and seed. LREC
// runs have no checkpoint, so an interrupted cell starts again (--overwrite).
std::vector<std::string> lrec_args(const LrecOptions& l, const TrainOptions& t, const AblationCell& c,
                                   const fs::path& dir, int threads) {
  std::vector<std::string> a = {"lrec",          "--teacher",    fs::absolute(l.teacher).string(),
                                "--quantized",   fs::absolute(l.quantized).string(),
                                "--rank",        std::to_string(l.rank),
                                "--alpha",       exact_text(l.alpha),
                                "--steps",       std::to_string(l.steps),
                                "--batch",       std::to_string(l.batch),
                                "--lr",          exact_text(l.lr),
                                "--momentum",    exact_text(l.momentum),
                                "--warmup",      std::to_string(l.warmup),
                                "--ce-weight",   exact_text(l.ce_weight),
                                "--eval-windows", std::to_string(l.eval_windows),
                                "--format",      c.format(),
                                "--seed",        std::to_string(c.seed),
                                "--threads",     std::to_string(threads),
                                "--quiet",       "--overwrite",
                                "--out",         dir.string()};
  if (c.bits == 32) a.insert(a.end(), {"--adapter-format", "fp32"});
  else a.insert(a.end(), {"--rounding", c.rounding});
  if (t.data) a.insert(a.end(), {"--data", fs::absolute(*t.data).string()});
  return a;
}

std::vector<std::string> train_args(const TrainOptions& t, const AblationCell& c, const fs::path& dir, int threads,
                                    bool resume) {
  std::vector<std::string> a = {"train",         "--layers",       std::to_string(t.layers),
                                "--d-model",     std::to_string(t.d_model), "--heads",
                                std::to_string(t.heads),           "--context",
                                std::to_string(t.context),         "--batch",
                                std::to_string(t.batch),           "--steps",
                                std::to_string(t.steps),           "--warmup",
                                std::to_string(t.warmup),          "--lr",
                                exact_text(t.lr),     "--momentum",     exact_text(t.momentum),
                                "--weight-decay", exact_text(t.weight_decay), "--init-std",
                                exact_text(t.init_std), "--format",     c.format(),
                                "--seed",        std::to_string(c.seed), "--eval-every",
                                std::to_string(t.eval_every),      "--eval-windows",
                                std::to_string(t.eval_windows),    "--final-eval-windows",
                                std::to_string(t.final_eval_windows), "--checkpoint-every",
                                std::to_string(t.checkpoint_every), "--threads",
                                std::to_string(threads),           "--quiet",
                                "--out",         dir.string()};
  if (c.bits != 32) a.insert(a.end(), {"--rounding", c.rounding});
  if (c.tiling != "none") {
    std::string roles;  // "ae" -> "a,e"
    for (char r : c.tiling) roles += std::string(roles.empty() ? "" : ",") + r;
    a.insert(a.end(), {"--outlier-tiling", roles, "--outlier-threshold", t.outlier_threshold});
  }
  if (t.data) a.insert(a.end(), {"--data", fs::absolute(*t.data).string()});
  const long probe = t.probe_every < 0 ? std::max(1L, t.steps / 40) : t.probe_every;
  if (probe > 0) {
    a.insert(a.end(), {"--probe-every", std::to_string(probe), "--probe-micro-batches",
                       std::to_string(t.probe_micro_batches)});
  }
  a.push_back(resume ? "--resume" : "--overwrite");
  return a;
}

// Pins the sweep's training settings in DIR/sweep.json, or checks them
// against the ones a previous ablate into DIR recorded.
void pin_settings(const fs::path& dir, const json& settings) {
  const fs::path p = dir / "sweep.json";
  if (fs::exists(p)) {
    std::ifstream in(p);
    json old;
    try {
      old = json::parse(in);
    } catch (const json::exception& e) {
      throw std::runtime_error(p.string() + ": not valid JSON (" + e.what() + "); remove it or choose another --out");
    }
    for (const auto& [k, v] : settings.items()) {
      if (!old.contains(k) || old[k] != v) {
        throw std::runtime_error(dir.string() + " holds a sweep with " + k + " = " +
                                 (old.contains(k) ? old[k].dump() : std::string("(unset)")) + ", not " + v.dump() +
                                 ": its finished cells would not be comparable. Use the same settings to resume it, "
                                 "or choose another --out");
      }
    }
    return;
  }
  fs::create_directories(dir);
  write_text_atomically(p, settings.dump(2) + "\n");
}

}  // namespace

int run_ablate(const AblateOptions& o) {
  if (o.seeds < 1) throw std::invalid_argument("--seeds must be at least 1");
  if (o.jobs < 1) throw std::invalid_argument("--jobs must be at least 1");
  for (int b : o.bits) {
    if (b < 2 || b > 16) throw std::invalid_argument("--bits: " + std::to_string(b) + " is outside 2..16");
  }
  for (const std::string& r : o.roundings) {
    if (r != "nearest" && r != "stochastic")
      throw std::invalid_argument("--rounding: '" + r + "' is not one of nearest, stochastic");
  }
  for (const std::string& t : o.tilings) {
    if (t != "none" && t != "a" && t != "e" && t != "ae")
      throw std::invalid_argument("--outlier-tiling: '" + t + "' is not one of none, a, e, ae");
  }
  if (o.lrec) {
    if (o.lrec->teacher.empty() || o.lrec->quantized.empty())
      throw std::invalid_argument("--lrec-teacher and --lrec-quantized go together: give both for an LREC sweep");
    for (const fs::path& p : {o.lrec->teacher, o.lrec->quantized})
      if (!fs::exists(p)) throw std::invalid_argument("--lrec-teacher/--lrec-quantized: " + p.string() + " does not exist");
    if (o.tilings != std::vector<std::string>{"none"})
      throw std::invalid_argument("--outlier-tiling: LREC cells (--lrec-quantized) have no outlier tiling; drop one of them");
  }
  const SingleProcess one_process;
  const Collective& comm = o.comm ? *o.comm : one_process;
  const json settings = o.lrec ? lrec_sweep_settings(*o.lrec, o.train) : sweep_settings(o.train);
  const fs::path cells_dir = o.out / "cells";
  std::optional<RunLock> lock;
  if (comm.rank() == 0) {
    lock.emplace(o.out, "intrain ablate");
    pin_settings(o.out, settings);
    fs::create_directories(cells_dir);
  }
  comm.barrier();  // the other ranks start once --out is checked and pinned
  const std::vector<AblationCell> grid = ablation_grid(o);

  if (!o.report_only) {
    // Cells still to run: no summary.json; failed ones only with --retry-failed.
    std::vector<AblationCell> pending;
    int skipped = 0;
    for (std::size_t i = 0; i < grid.size(); ++i) {
      const AblationCell& c = grid[i];
      if (static_cast<int>(i % static_cast<std::size_t>(comm.size())) != comm.rank()) continue;  // another rank's
      const fs::path d = cells_dir / c.name();
      if (fs::exists(d / "summary.json") || (fs::exists(d / "failed.json") && !o.retry_failed)) {
        ++skipped;
        continue;
      }
      pending.push_back(c);
    }
    const std::string who = comm.size() > 1 ? "ablate[rank " + std::to_string(comm.rank()) + "]" : "ablate";
    const std::string share = comm.size() > 1 ? " of this rank (" + std::to_string(grid.size()) + " in all)" : "";
    std::fprintf(stderr, "%s: %zu cells%s, %d already finished, %zu to run (%d at a time)\n", who.c_str(),
                 pending.size() + static_cast<std::size_t>(skipped), share.c_str(), skipped, pending.size(), o.jobs);
    const fs::path exe = self_exe();
    const int threads = o.train.threads > 0 ? o.train.threads : (o.jobs > 1 ? 1 : 0);
    std::map<pid_t, AblationCell> running;
    std::size_t next = 0, finished = 0;
    while (next < pending.size() || !running.empty()) {
      while (next < pending.size() && static_cast<int>(running.size()) < o.jobs) {
        const AblationCell& c = pending[next++];
        const fs::path d = cells_dir / c.name();
        fs::remove(d / "failed.json");
        const bool resume = !o.lrec && fs::exists(d / "train_state.safetensors");
        const pid_t pid = spawn(exe, o.lrec ? lrec_args(*o.lrec, o.train, c, d, threads) : train_args(o.train, c, d, threads, resume),
                                cells_dir / (c.name() + ".log"));
        running.emplace(pid, c);
      }
      int status = 0;
      const pid_t pid = waitpid(-1, &status, 0);
      if (pid < 0) throw std::runtime_error(std::string("ablate: waitpid failed: ") + std::strerror(errno));
      const auto it = running.find(pid);
      if (it == running.end()) continue;
      const AblationCell c = it->second;
      running.erase(it);
      ++finished;
      const fs::path d = cells_dir / c.name();
      const bool ok = WIFEXITED(status) && WEXITSTATUS(status) == 0 && fs::exists(d / "summary.json");
      if (!ok) {
        const std::string msg = WIFSIGNALED(status) ? "killed by signal " + std::to_string(WTERMSIG(status))
                                                    : last_line(cells_dir / (c.name() + ".log"));
        fs::create_directories(d);
        write_text_atomically(d / "failed.json", json{{"message", msg}, {"status", status}}.dump(2) + "\n");
        std::fprintf(stderr, "%s: [%zu/%zu] %s FAILED: %s\n", who.c_str(), finished, pending.size(), c.name().c_str(), msg.c_str());
      } else {
        std::ifstream in(d / "summary.json");
        const json s = json::parse(in);
        const double val = o.lrec ? s.at("after").value("kl_mean", 0.0) : s.value("final_val_loss", 0.0);
        std::fprintf(stderr, "%s: [%zu/%zu] %s  %s %.4f  %.0f tok/s  %.0f s\n", who.c_str(), finished, pending.size(),
                     c.name().c_str(), o.lrec ? "KL" : "val", val, s.value("tokens_per_s", 0.0), s.value("wall_s", 0.0));
      }
    }
  }

  comm.barrier();  // every rank's cells are done
  if (comm.rank() != 0) return 0;
  std::vector<CellResult> results;
  int failed = 0;
  for (const AblationCell& c : grid) {
    results.push_back(load_cell(cells_dir / c.name(), c.bits, c.rounding, c.seed, c.tiling));
    failed += results.back().status == "failed";
  }
  if (!o.lrec) use_fp32_smoothness(results, grid, cells_dir, o.train);
  const json report = ablation_report(results, settings);
  write_text_atomically(o.out / "ablation.json", report.dump(2) + "\n");
  const std::string md = ablation_markdown(report);
  write_text_atomically(o.out / "ablation.md", md);
  std::printf("%s", md.c_str());

  if (o.plots) run_plot_script("plot_ablation.py", o.out, "ablate");
  std::fprintf(stderr, "ablate: report in %s/ablation.md and ablation.json\n", o.out.c_str());
  return failed;
}

}  // namespace intrain
