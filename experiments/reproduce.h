// `intrain reproduce int21`: the INT2.1 table on CPU (docs/int21.md).
//
// Stages, each an ordinary intrain subcommand run as a child process in DIR
// (experiments/child_process.h), skipped when its output exists, so an
// interrupted run resumes where it stopped:
//   1. teacher/      `train --format fp32` (unless --teacher names one)
//   2. quantized/    `quantize` per method and bit width
//   3. lrec/         `lrec` per method and bit width at --rank, and the INT2
//                    rank sweep (GPTQ, or the first method) at --sweep-ranks
//   4. memory/       the same few steps of fp32 full fine-tuning (`train
//                    --format fp32`), fp32 LoRA (`lrec --format fp32`) and
//                    integer LREC, each in its own process for its peak RSS
// then DIR/int21.json, DIR/int21.md and DIR/int21.png
// (analysis/plot_int21.py).
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "experiments/lrec.h"

namespace intrain {

struct ReproduceOptions {
  std::filesystem::path out = "runs/int21";
  std::optional<std::filesystem::path> teacher;  // reuse a float model.safetensors instead of training one
  std::optional<std::filesystem::path> data;
  // The teacher (when trained here).
  int layers = 6, d_model = 256, heads = 8, context = 128;
  long teacher_steps = 3000;
  double teacher_lr = 0.1;
  // Early stopping of the teacher on the validation split (0: off): validate
  // every teacher_steps / 30 steps on --eval-windows windows, keep the best
  // model, stop after this many evaluations without a new best. The teacher
  // is then teacher/best.safetensors.
  long teacher_early_stop = 5;
  // Quantization.
  std::vector<std::string> methods{"rtn", "gptq", "adpq", "oac"};
  std::vector<int> bits{2, 3, 4, 8};
  int group = 128;
  long calib_tokens = 32768;
  // LREC.
  int rank = 2;
  double alpha = 0.0;  // 0: 4 * rank
  std::vector<int> sweep_ranks{1, 2, 4, 8, 16, 32};
  long lrec_steps = 1200;  // 600 leaves RTN INT4 at 0.79 of its gap (docs/int21.md)
  int batch = 16;
  double lr = 0.5;
  double ce_weight = 0.06;
  double clip_grad_norm = 1.0;  // LREC's gradient clipping (experiments/lrec.h; 0: off)
  std::string format = kLrecDefaultFormat;  // of the integer LREC student (experiments/lrec.h)
  // Bit widths that also get the two references of docs/fidelity.md, for the
  // rank-sweep method (GPTQ): the float LoRA (`lrec --adapter-format fp32`) and
  // a KL-only run (--ce-weight 0), both at the same steps, data and seed.
  std::vector<int> reference_bits{2, 4};
  long eval_windows = 0;   // 0: the whole validation split
  long memory_steps = 10;  // steps of each memory-comparison run
  // Memory against model size (reproduce.cpp): float models of these widths
  // at the teacher's depth, at these batches. No widths: no such stage.
  std::vector<int> memory_widths{1024, 2048};
  std::vector<int> memory_batches{1, 4};
  int jobs = 1;
  int threads = 0;         // per child; 0: 1 when jobs > 1, else all
  std::uint64_t seed = 1;
  bool plots = true;
};

// The settings of --quick: a small teacher and short runs, under 3 minutes on 2 cores.
void apply_quick(ReproduceOptions& o);

// Runs the missing stages and writes the report. Returns the number of failed stages.
int run_reproduce_int21(const ReproduceOptions& o);

}  // namespace intrain
