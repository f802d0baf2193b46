// The `intrain` command line: one binary, one subcommand per experiment.
#include <CLI/CLI.hpp>

#include <cstdio>
#include <exception>
#include <iostream>
#include <string>

#include "experiments/evaluate.h"
#include "experiments/quantize.h"
#include "experiments/selfcheck.h"
#include "experiments/train.h"

namespace {

void add_format_flags(CLI::App* app, std::string& format, std::string& rounding) {
  app->add_option("--format", format, "Number formats: fp32, int8, int16, intB (B = 2..16) or wXaYeZgV");
  app->add_option("--rounding", rounding, "Rounding of integer formats: stochastic or nearest")
      ->check(CLI::IsMember({"stochastic", "nearest", "sr", "rn"}));
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"intrain: training neural networks in integer arithmetic"};
  app.require_subcommand(1);

  intrain::SelfcheckOptions sc;
  auto* selfcheck = app.add_subcommand("selfcheck", "Check every matmul path bit for bit and print its throughput");
  selfcheck->add_option("--threads", sc.threads, "OpenMP threads (0: default)")->check(CLI::NonNegativeNumber);
  selfcheck->add_option("--size", sc.size, "Square matrix size for the throughput table")->check(CLI::Range(16, 8192));
  selfcheck->add_option("--reps", sc.reps, "Timed repetitions (the median is printed)")->check(CLI::Range(1, 1000));

  intrain::TrainOptions tr;
  std::string train_data;
  auto* train = app.add_subcommand("train", "Train a GPT on a byte-level corpus (default: the King James Bible)");
  train->add_option("--layers", tr.layers, "Transformer blocks")->check(CLI::Range(1, 64));
  train->add_option("--d-model", tr.d_model, "Model width")->check(CLI::Range(8, 4096));
  train->add_option("--heads", tr.heads, "Attention heads (must divide --d-model)")->check(CLI::Range(1, 256));
  train->add_option("--context", tr.context, "Context length in bytes")->check(CLI::Range(2, 4096));
  train->add_option("--batch", tr.batch, "Sequences per step")->check(CLI::Range(1, 4096));
  train->add_option("--steps", tr.steps, "Optimizer steps")->check(CLI::Range(1L, 100000000L));
  train->add_option("--lr", tr.lr, "Peak learning rate")->check(CLI::PositiveNumber);
  train->add_option("--warmup", tr.warmup, "Linear warmup steps")->check(CLI::NonNegativeNumber);
  train->add_option("--momentum", tr.momentum, "SGD momentum")->check(CLI::Range(0.0, 0.9999));
  train->add_option("--init-std", tr.init_std, "Std of the initial embeddings and matmul weights (GPT-2 uses 0.02; see docs/training.md)")
      ->check(CLI::Range(1e-6, 1.0));
  train->add_option("--weight-decay", tr.weight_decay, "Weight decay on matmul weights")->check(CLI::Range(0.0, 1.0));
  add_format_flags(train, tr.format, tr.rounding);
  train->add_option("--seed", tr.seed, "Seed of the initialisation, the batches and the rounding");
  train->add_option("--data", train_data, "Training text file (default: the KJV)");
  train->add_option("--out", tr.out, "Output folder");
  train->add_flag("--resume", tr.resume, "Continue the run in --out from its last checkpoint");
  train->add_flag("--overwrite", tr.overwrite, "Replace a run already in --out");
  train->add_flag("--save-init", tr.save_init, "Also write the initial weights to --out/init.safetensors");
  train->add_option("--threads", tr.threads, "OpenMP threads (0: default)")->check(CLI::NonNegativeNumber);
  train->add_option("--eval-every", tr.eval_every, "Validation loss every N steps (0: only at the end)")
      ->check(CLI::NonNegativeNumber);
  train->add_option("--eval-windows", tr.eval_windows, "Validation windows per periodic evaluation")
      ->check(CLI::NonNegativeNumber);
  train->add_option("--checkpoint-every", tr.checkpoint_every, "Checkpoint every N steps (and at the end)")
      ->check(CLI::NonNegativeNumber);
  train->add_flag("--quiet", tr.quiet, "No progress line");

  intrain::EvalOptions ev;
  std::string eval_data;
  auto* eval = app.add_subcommand("eval", "Validation loss of a checkpoint, as one JSON object");
  eval->add_option("--model", ev.model, "model.safetensors written by intrain")->required();
  eval->add_option("--data", eval_data, "Text file whose validation split (last 10%) is evaluated");
  add_format_flags(eval, ev.format, ev.rounding);
  eval->add_option("--batch", ev.batch, "Windows per forward pass")->check(CLI::Range(1, 4096));
  eval->add_option("--max-windows", ev.max_windows, "Cap on validation windows (0: all)")->check(CLI::NonNegativeNumber);
  eval->add_option("--threads", ev.threads, "OpenMP threads (0: default)")->check(CLI::NonNegativeNumber);

  intrain::SampleOptions sa;
  auto* sample = app.add_subcommand("sample", "Generate text from a checkpoint");
  sample->add_option("--model", sa.model, "model.safetensors written by intrain")->required();
  sample->add_option("--prompt", sa.prompt, "Text to continue")->required();
  sample->add_option("--tokens", sa.tokens, "Bytes to generate")->check(CLI::Range(1, 100000));
  sample->add_option("--temperature", sa.temperature, "Sampling temperature")->check(CLI::PositiveNumber);
  add_format_flags(sample, sa.format, sa.rounding);
  sample->add_option("--seed", sa.seed, "Sampling seed");
  sample->add_option("--threads", sa.threads, "OpenMP threads (0: default)")->check(CLI::NonNegativeNumber);

  intrain::QuantizeOptions qu;
  std::string quant_data;
  auto* quant = app.add_subcommand("quantize", "Group-wise RTN or GPTQ quantization of a checkpoint's block linears");
  quant->add_option("--model", qu.model, "model.safetensors written by intrain train")->required();
  quant->add_option("--out", qu.out, "The quantized model file to write (packed safetensors)")->required();
  quant->add_option("--bits", qu.bits, "Bits per weight code")->check(CLI::Range(2, 8));
  quant->add_option("--group", qu.group, "Weights per group along the input dimension (a multiple of 8 dividing it)")
      ->check(CLI::Range(8, 4096));
  quant->add_option("--method", qu.method, "rtn or gptq")->check(CLI::IsMember({"rtn", "gptq"}));
  quant->add_option("--calib-tokens", qu.calib_tokens, "GPTQ calibration tokens from the train split")
      ->check(CLI::Range(1L, 100000000L));
  quant->add_flag("--act-order", qu.act_order, "GPTQ: quantize inputs by decreasing Hessian diagonal (static groups)");
  quant->add_option("--damp", qu.damp, "GPTQ damping, a fraction of the mean Hessian diagonal")->check(CLI::PositiveNumber);
  quant->add_option("--data", quant_data, "Calibration text file (default: the KJV); its train split is used");
  quant->add_option("--seed", qu.seed, "Seed of the calibration windows");
  quant->add_option("--threads", qu.threads, "OpenMP threads (0: default)")->check(CLI::NonNegativeNumber);

  CLI11_PARSE(app, argc, argv);
  try {
    if (*selfcheck) return intrain::run_selfcheck(sc);
    if (*train) {
      if (!train_data.empty()) tr.data = train_data;
      const auto r = intrain::run_train(tr);
      std::printf("%s: final train loss %.4f, validation loss %.4f (nats/byte), %.0f tokens/s, %.1f s\n",
                  tr.format.c_str(), r.final_train_loss, r.final_val_loss, r.tokens_per_s, r.wall_s);
      return 0;
    }
    if (*eval) {
      if (!eval_data.empty()) ev.data = eval_data;
      std::cout << intrain::run_eval(ev).dump() << std::endl;
      return 0;
    }
    if (*quant) {
      if (!quant_data.empty()) qu.data = quant_data;
      std::cout << intrain::run_quantize(qu).dump() << std::endl;
      return 0;
    }
    if (*sample) {
      std::cout << intrain::run_sample(sa) << std::endl;
      return 0;
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "intrain: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
