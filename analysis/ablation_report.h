// The report of a bit-width ablation (`intrain ablate`): reads the cells'
// run folders and summarises them per (bits, rounding) against the fp32
// baseline at the same seeds.
//
// Statistics, per group of seeds (see docs/ablation.md):
//   - final validation loss: mean and sample standard deviation over seeds;
//   - gap to fp32: the paired difference d_s = L(cell, s) - L(fp32, s) over
//     the seeds where both finished, its mean, and a 95% Student-t interval
//     mean +- t(0.975, n-1) * sd / sqrt(n) (absent for n < 2). Pairing by seed
//     removes the part of the seed-to-seed spread the two runs share
//     (initialisation and batches are the same for a given seed);
//   - Pareto: a group is listed when no other group is strictly better on all
//     three of (mean validation loss, bits, seconds per step).
#pragma once

#include <array>
#include <filesystem>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

namespace intrain {

struct RunBound;  // analysis/trajectory_bound.h

struct CellResult {
  std::string name;       // folder name under DIR/cells
  int bits = 32;          // 32: fp32
  std::string rounding;   // "nearest" / "stochastic"; empty for fp32
  int seed = 1;
  std::string tiling = "none";  // outlier tiling of the run: "none", "a", "e", "ae"
  std::string status;     // "done", "failed" or "missing"
  std::string failure;    // the failure message, when status == "failed"
  double final_val_loss = 0.0, final_train_loss = 0.0;
  double saturated_fraction = 0.0;  // mean over steps of metrics.csv's saturated_fraction
  double tokens_per_s = 0.0, peak_rss_mib = 0.0, wall_s = 0.0;
  std::vector<std::pair<long, double>> val_curve;  // (step, validation loss) at every evaluation
  // The convergence bound of the run (summary.json "probe", bound.csv; analysis/trajectory_bound.h).
  // bound_status: "evaluated", "n/a (momentum)", "n/a (weight decay)", "n/a (no probe)" (also when the
  // run was not probed).
  std::string bound_status = "n/a (no probe)";
  bool bound_held = false, bound_vacuous = false;
  double bound_final = 0.0, bound_measured = 0.0;  // at the last step (evaluated runs)
  double est_L = 0.0, est_sigma2 = 0.0;           // the constants the bound used (probed runs)
  double own_L = 0.0;                              // the run's own L estimate (est_L may be the fp32 cell's)
  std::string L_source = "own";                    // "own", or "fp32 cell" (use_smoothness_floor)
  std::vector<std::array<double, 3>> bound_curve;  // (step, bound, measured), at most ~100 points
};

// Reads DIR/cells/<name>/{summary.json, metrics.csv, failed.json}. A cell
// with neither summary.json nor failed.json is "missing".
CellResult load_cell(const std::filesystem::path& cell_dir, int bits, const std::string& rounding, int seed,
                     const std::string& tiling = "none");

// Replaces the cell's bound by `rb`, evaluated again with the L of another
// run (the fp32 cell at the same seed) as a floor: status, held, vacuous,
// final values, L and the curve (kept to ~100 points, as load_cell does).
void use_smoothness_floor(CellResult& c, const RunBound& rb);

// "fp32", "int8-sr", "int8-rn+ae": one group of the grid (all its seeds).
std::string ablation_group_name(int bits, const std::string& rounding, const std::string& tiling);

// Student-t quantile t(p, df), e.g. t(0.975, 2) = 4.3027.
double student_t_quantile(double p, int df);

struct GapStatistics {
  int n = 0;                           // seeds with both runs finished
  double mean = 0.0, sd = 0.0;         // of the paired differences (nats)
  std::optional<double> ci_lo, ci_hi;  // 95% interval of the mean difference (n >= 2)
  double relative_mean = 0.0;          // mean of d_s / L(fp32, s)
};
// Paired differences cell - baseline over the seeds present in both.
GapStatistics paired_gap(const std::vector<CellResult>& cells, const std::vector<CellResult>& baseline);

// The report as JSON: `settings` (copied), `cells`, `groups` (one per
// (bits, rounding, tiling), fp32 first), `pareto` (group names, by mean loss).
nlohmann::json ablation_report(const std::vector<CellResult>& cells, const nlohmann::json& settings);
// The same report as a Markdown document.
std::string ablation_markdown(const nlohmann::json& report);

}  // namespace intrain
