// `intrain ablate`: a bit-width x rounding x seed grid of training runs, each
// beside an fp32 baseline at the same seed, summarised in DIR/ablation.json,
// DIR/ablation.md and plots.
//
// Every cell is an ordinary `intrain train` run in DIR/cells/<name>/, started
// as a child process of this binary. That gives each cell its own peak RSS
// (VmHWM only grows within a process), lets cells run side by side (--jobs),
// and makes the sweep resumable with the same machinery as a single run:
//   - a cell with summary.json is finished and is never recomputed;
//   - a cell with a checkpoint continues with `train --resume` (bit-identical);
//   - a cell that failed (for example diverged) leaves failed.json and is
//     reported as such; --retry-failed runs it again.
// DIR/sweep.json records the training settings; a second `ablate` into the
// same DIR must use the same settings (the grid itself may grow).
#pragma once

#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "experiments/lrec.h"
#include "experiments/train.h"

namespace intrain {

struct AblateOptions {
  std::vector<int> bits{4, 6, 8, 10, 12, 16};
  std::vector<std::string> roundings{"nearest", "stochastic"};
  // Outlier tiling of integer cells (docs/outliers.md): "none", or the roles
  // split, "a", "e" or "ae". Each entry is a grid dimension of its own.
  std::vector<std::string> tilings{"none"};
  int seeds = 3;               // seeds 1..seeds
  // Model, schedule and data of every cell (format, seed, out are per cell).
  // Cells probe the bound's constants by default: probe_every -1 means
  // max(1, steps / 40), 0 turns it off (experiments/trajectory_probe.h).
  TrainOptions train = [] {
    TrainOptions t;
    t.probe_every = -1;
    return t;
  }();
  // LREC cells (`--lrec-teacher T --lrec-quantized Q`): every cell is an
  // `intrain lrec` run of this template on the same packed model, with the
  // cell's --format intB, --rounding and --seed; the fp32 baseline trains the
  // float LoRA reference (--format fp32 --adapter-format fp32). The report's
  // loss is then the validation KL(teacher || student) after LREC, per token.
  // `train` is not used for such a sweep (apart from --threads and --data).
  std::optional<LrecOptions> lrec;
  std::filesystem::path out = "runs/ablate";
  int jobs = 1;                // cells run side by side
  bool retry_failed = false;
  bool report_only = false;    // rebuild the report from the cells present; run nothing
  bool plots = true;           // run analysis/plot_ablation.py if python3 + matplotlib are present
  // Sharded sweep (`mpirun -np N intrain ablate`): rank r runs the cells whose
  // grid index i has i % N == r; rank 0 writes the report once all are done.
  const Collective* comm = nullptr;
};

// The settings of `--quick`: a small model and grid that finishes in minutes on 2 cores.
void apply_quick(AblateOptions& o);

// Runs the missing cells, then writes the report. Returns the number of failed cells.
int run_ablate(const AblateOptions& o);

// One cell of the grid; `bits` 32 is the fp32 baseline.
struct AblationCell {
  int bits = 32;
  std::string rounding;  // "nearest", "stochastic"; empty for fp32
  int seed = 1;
  std::string tiling = "none";  // "none", "a", "e", "ae"; "none" for fp32
  std::string name() const;    // e.g. "int8-sr_s2", "int8-sr+ae_s2", "fp32_s2"
  std::string format() const;  // "fp32" or "int8"
};

std::vector<AblationCell> ablation_grid(const AblateOptions& o);

}  // namespace intrain
