// `intrain train`: trains a GPT on a byte-level corpus and writes, in --out,
// metrics.csv, summary.json, model.safetensors and train_state.safetensors.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>

namespace intrain {

class Collective;

struct TrainOptions {
  int layers = 4, d_model = 128, heads = 4, context = 128, batch = 16;
  long steps = 2000, warmup = 100;
  double lr = 0.1, momentum = 0.9, weight_decay = 0.0, final_lr_fraction = 0.1;
  double init_std = 0.08;     // N(0, init_std) for embeddings and matmul weights (layers/gpt.h); see docs/training.md
  std::string format = "int8";
  std::string rounding = "stochastic";
  std::string outlier_tiling;                // roles split into int8 bulk + outliers: "", "a", "e", "a,e"
  std::string outlier_threshold = "rms:5";   // which elements are outliers (core/outliers.h)
  std::uint64_t seed = 1;
  std::optional<std::filesystem::path> data;
  std::filesystem::path out = "runs/train";
  bool resume = false;
  bool overwrite = false;     // replace a finished or abandoned run in --out
  bool save_init = false;     // also write the initial weights to --out/init.safetensors
  int threads = 0;
  long eval_every = 100;      // validation loss every N steps (and at the end)
  long eval_windows = 64;     // validation windows per periodic evaluation (0: the whole split)
  long final_eval_windows = 0;  // validation windows of the final evaluation (0: the whole split)
  long checkpoint_every = 500;
  // Early stopping (0: off): keep --out/best.safetensors, the model at the
  // best periodic validation loss, and stop after this many evaluations in a
  // row without a new best. Needs --eval-every.
  long early_stop = 0;
  bool quiet = false;         // no live progress line
  long probe_every = 0;       // estimate the bound's constants every N steps and evaluate it (0: off;
                              // experiments/trajectory_probe.h)
  int probe_micro_batches = 4;  // micro-batches per probe (their gcd with --batch is used)
  // Data-parallel run (docs/distributed.md): the ranks split --batch evenly;
  // rank 0 alone writes --out. Null: one process.
  const Collective* comm = nullptr;
};

struct TrainResult {
  double final_train_loss = 0.0, final_val_loss = 0.0, tokens_per_s = 0.0, wall_s = 0.0;
};

TrainResult run_train(const TrainOptions& opt);

// Shortest text that reads back as the same double (a child's flag, a
// checkpoint's metadata): std::to_chars.
std::string exact_text(double x);

// Peak resident set size of this process (VmHWM), in MiB.
double peak_rss_mib();
// The commit the binary was built from ("unknown" outside a git checkout).
const char* build_commit();

}  // namespace intrain
