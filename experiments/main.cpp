// The `intrain` command line: one binary, one subcommand per experiment.
#include <CLI/CLI.hpp>

#include <cstdio>
#include <exception>
#include <iostream>
#include <string>

#include "core/collective.h"
#include "experiments/ablate.h"
#include "experiments/bound.h"
#include "experiments/evaluate.h"
#include "experiments/lrec.h"
#include "experiments/quantize.h"
#include "experiments/reproduce.h"
#include "experiments/selfcheck.h"
#include "experiments/train.h"

namespace {

void add_format_flags(CLI::App* app, std::string& format, std::string& rounding) {
  app->add_option("--format", format, "Number formats: fp32, int8, int16, intB (B = 2..16) or wXaYeZgV");
  app->add_option("--rounding", rounding, "Rounding of integer formats: stochastic or nearest")
      ->check(CLI::IsMember({"stochastic", "nearest", "sr", "rn"}));
}

// Model, schedule and evaluation flags shared by `train` and `ablate`.
void add_training_flags(CLI::App* app, intrain::TrainOptions& t) {
  app->add_option("--layers", t.layers, "Transformer blocks")->check(CLI::Range(1, 64));
  app->add_option("--d-model", t.d_model, "Model width")->check(CLI::Range(8, 4096));
  app->add_option("--heads", t.heads, "Attention heads (must divide --d-model)")->check(CLI::Range(1, 256));
  app->add_option("--context", t.context, "Context length in bytes")->check(CLI::Range(2, 4096));
  app->add_option("--batch", t.batch, "Sequences per step")->check(CLI::Range(1, 4096));
  app->add_option("--steps", t.steps, "Optimizer steps")->check(CLI::Range(1L, 100000000L));
  app->add_option("--lr", t.lr, "Peak learning rate")->check(CLI::PositiveNumber);
  app->add_option("--warmup", t.warmup, "Linear warmup steps")->check(CLI::NonNegativeNumber);
  app->add_option("--momentum", t.momentum, "SGD momentum")->check(CLI::Range(0.0, 0.9999));
  app->add_option("--init-std", t.init_std, "Std of the initial embeddings and matmul weights (GPT-2 uses 0.02; see docs/training.md)")
      ->check(CLI::Range(1e-6, 1.0));
  app->add_option("--weight-decay", t.weight_decay, "Weight decay on matmul weights")->check(CLI::Range(0.0, 1.0));
  app->add_option("--eval-every", t.eval_every, "Validation loss every N steps (0: only at the end)")
      ->check(CLI::NonNegativeNumber);
  app->add_option("--eval-windows", t.eval_windows, "Validation windows per periodic evaluation")
      ->check(CLI::NonNegativeNumber);
  app->add_option("--final-eval-windows", t.final_eval_windows,
                  "Validation windows of the final evaluation (0: the whole validation split)")
      ->check(CLI::NonNegativeNumber);
  app->add_option("--early-stop", t.early_stop,
                  "Keep best.safetensors (best periodic validation loss) and stop after N evaluations without a new "
                  "best (0: off)")
      ->check(CLI::NonNegativeNumber);
  app->add_option("--checkpoint-every", t.checkpoint_every, "Checkpoint every N steps (and at the end)")
      ->check(CLI::NonNegativeNumber);
  app->add_option("--probe-every", t.probe_every,
                  "Estimate the convergence bound's constants every N steps and evaluate the bound (0: off; "
                  "ablate's default -1: steps/40; docs/convergence.md)")
      ->check(CLI::Range(-1L, 100000000L));
  app->add_option("--probe-micro-batches", t.probe_micro_batches, "Micro-batches per probe, for the gradient noise")
      ->check(CLI::Range(1, 4096));
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
  add_training_flags(train, tr);
  add_format_flags(train, tr.format, tr.rounding);
  train->add_option("--seed", tr.seed, "Seed of the initialisation, the batches and the rounding");
  train->add_option("--data", train_data, "Training text file (default: the KJV)");
  train->add_option("--out", tr.out, "Output folder");
  train->add_flag("--resume", tr.resume, "Continue the run in --out from its last checkpoint");
  train->add_flag("--overwrite", tr.overwrite, "Replace a run already in --out");
  train->add_flag("--save-init", tr.save_init, "Also write the initial weights to --out/init.safetensors");
  train->add_option("--threads", tr.threads, "OpenMP threads (0: default)")->check(CLI::NonNegativeNumber);
  train->add_flag("--quiet", tr.quiet, "No progress line");
  train->add_option("--outlier-tiling", tr.outlier_tiling,
                    "Split these linear-layer operands into an int8 bulk and int8 outliers: a (inputs), e (errors), or a,e");
  train->add_option("--outlier-threshold", tr.outlier_threshold,
                    "Outliers for --outlier-tiling: rms:G (above G x rms, default rms:5), pct:P or top:K");

  intrain::EvalOptions ev;
  std::string eval_data, eval_teacher;
  auto* eval = app.add_subcommand("eval", "Validation loss of a checkpoint, as one JSON object");
  eval->add_option("--model", ev.model, "model.safetensors written by intrain")->required();
  eval->add_option("--teacher", eval_teacher,
                   "A reference model.safetensors (in its own format): adds KL, top-1/top-5 agreement and "
                   "delta-p against it (docs/fidelity.md)");
  eval->add_option("--data", eval_data, "Text file whose validation split (last 10%) is evaluated");
  add_format_flags(eval, ev.format, ev.rounding);
  eval->add_option("--storage", ev.storage,
                   "fp16: hold a float model's block linears in binary16 (as lrec --teacher-storage fp16)")
      ->check(CLI::IsMember({"fp32", "fp16"}));
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

  intrain::AblateOptions ab;
  std::string ablate_data;
  bool ablate_quick = false;
  auto* ablate = app.add_subcommand("ablate", "Bit-width x rounding x seed sweep against fp32 baselines (docs/ablation.md)");
  ablate->add_option("--bits", ab.bits, "Operand bits of every role, comma separated (2..16)")->delimiter(',');
  ablate->add_option("--rounding", ab.roundings, "Rounding modes, comma separated: nearest, stochastic")
      ->delimiter(',')
      ->check(CLI::IsMember({"nearest", "stochastic"}));
  ablate->add_option("--outlier-tiling", ab.tilings,
                     "Outlier tiling of integer cells, comma separated: none, a, e, ae (each a grid dimension)")
      ->delimiter(',')
      ->check(CLI::IsMember({"none", "a", "e", "ae"}));
  ablate->add_option("--outlier-threshold", ab.train.outlier_threshold, "Outlier rule of tiled cells (rms:G, pct:P, top:K)");
  ablate->add_option("--seeds", ab.seeds, "Seeds 1..N per cell")->check(CLI::Range(1, 1000));
  ablate->add_option("--jobs", ab.jobs, "Cells run side by side (each with --threads threads, default 1)")
      ->check(CLI::Range(1, 256));
  ablate->add_option("--threads", ab.train.threads, "OpenMP threads per cell (0: 1 with --jobs > 1, else all)")
      ->check(CLI::NonNegativeNumber);
  ablate->add_option("--out", ab.out, "Sweep folder (cells, ablation.json, ablation.md, plots)");
  ablate->add_option("--data", ablate_data, "Training text file (default: the KJV)");
  ablate->add_flag("--quick", ablate_quick,
                   "Small model and grid (2 layers, context 32, bits 4,8,12,16, 2 seeds, 400 steps); explicit flags override it");
  ablate->add_flag("--retry-failed", ab.retry_failed, "Run cells that failed before again");
  ablate->add_flag("--report-only", ab.report_only, "Rebuild the report from the cells present; run nothing");
  ablate->add_flag("!--no-plots", ab.plots, "Do not run the plotting script");
  // LREC cells: each an `intrain lrec` run of this template (experiments/ablate.h).
  intrain::LrecOptions ablate_lrec;
  ablate->add_option("--lrec-teacher", ablate_lrec.teacher, "LREC sweep: the float teacher (with --lrec-quantized)");
  ablate->add_option("--lrec-quantized", ablate_lrec.quantized,
                     "LREC sweep: the packed model whose correctors every cell trains, at the cell's bits");
  ablate->add_option("--lrec-rank", ablate_lrec.rank, "LREC sweep: LoRA rank")->check(CLI::Range(1, 4096));
  ablate->add_option("--lrec-alpha", ablate_lrec.alpha, "LREC sweep: LoRA alpha (default 4 x rank)")->check(CLI::PositiveNumber);
  ablate->add_option("--lrec-steps", ablate_lrec.steps, "LREC sweep: steps per cell")->check(CLI::Range(1L, 100000000L));
  ablate->add_option("--lrec-lr", ablate_lrec.lr, "LREC sweep: peak learning rate")->check(CLI::PositiveNumber);
  ablate->add_option("--lrec-ce-weight", ablate_lrec.ce_weight, "LREC sweep: cross-entropy weight beside the KL")
      ->check(CLI::NonNegativeNumber);
  ablate->add_option("--lrec-eval-windows", ablate_lrec.eval_windows,
                     "LREC sweep: validation windows of each cell's KL (0: all)")->check(CLI::NonNegativeNumber);
  ablate_lrec.eval_windows = 256;
  add_training_flags(ablate, ab.train);
  intrain::BoundOptions bo;
  auto* bound = app.add_subcommand("bound", "Convergence bound of a planned SGD run, before it is spent (docs/convergence.md)");
  add_format_flags(bound, bo.format, bo.rounding);
  bound->add_option("--lr", bo.lr, "Peak learning rate")->check(CLI::PositiveNumber);
  bound->add_option("--steps", bo.steps, "Optimizer steps")->check(CLI::Range(1L, 100000000L));
  bound->add_option("--warmup", bo.warmup, "Linear warmup steps")->check(CLI::NonNegativeNumber);
  bound->add_option("--momentum", bo.momentum, "Heavy-ball momentum of the planned run (default 0.9, as train; 0: SGD)")
      ->check(CLI::Range(0.0, 0.9999));
  bound->add_option("--final-lr-fraction", bo.final_lr_fraction, "Cosine floor as a fraction of --lr")->check(CLI::Range(0.0, 1.0));
  std::string bound_run;
  bound->add_option("--from-run", bound_run,
                    "Take L, sigma2, gap, scales, format and schedule from a run trained with --probe-every "
                    "(flags given explicitly win)");
  bound->add_option("--L", bo.L, "Smoothness constant (required unless --from-run)");
  bound->add_option("--sigma2", bo.sigma2, "Minibatch gradient variance (required unless --from-run)");
  bound->add_option("--mu", bo.mu, "PL constant; 0 (default): non-convex bound only")->check(CLI::NonNegativeNumber);
  bound->add_option("--gap", bo.gap, "f(x0) - f_inf (default ln 256: a byte model's initial loss, f_inf = 0)");
  bound->add_option("--grad-max", bo.grad_max, "Typical per-tensor max |gradient| (required for integer formats)");
  bound->add_option("--weight-max", bo.weight_max, "Typical per-tensor max |weight| (required for integer formats)");
  bound->add_option("--delta", bo.delta, "Relative gradient bias (default: from the A and E formats)");
  bound->add_option("--params", bo.params, "Parameter count (default: the GPT of --layers, --d-model)");
  bound->add_option("--layers", bo.layers, "Transformer blocks, for the parameter count")->check(CLI::Range(1, 64));
  bound->add_option("--d-model", bo.d_model, "Model width, for the parameter count")->check(CLI::Range(8, 4096));
  bound->add_option("--log-every", bo.log_every, "Print every N steps")->check(CLI::PositiveNumber);

  intrain::QuantizeOptions qu;
  std::string quant_data;
  auto* quant = app.add_subcommand("quantize", "Group-wise RTN, GPTQ, AdpQ or OAC quantization of a checkpoint's block linears");
  quant->add_option("--model", qu.model, "model.safetensors written by intrain train")->required();
  quant->add_option("--out", qu.out, "The quantized model file to write (packed safetensors)")->required();
  quant->add_option("--bits", qu.bits, "Bits per weight code")->check(CLI::Range(2, 8));
  quant->add_option("--group", qu.group, "Weights per group along the input dimension (a multiple of 8 dividing it)")
      ->check(CLI::Range(8, 4096));
  quant->add_option("--method", qu.method, "rtn, gptq, adpq (zero-shot, salient weights apart) or oac (output-adaptive GPTQ)")
      ->check(CLI::IsMember({"rtn", "gptq", "adpq", "oac"}));
  quant->add_option("--calib-tokens", qu.calib_tokens, "GPTQ/OAC calibration tokens from the train split")
      ->check(CLI::Range(1L, 100000000L));
  quant->add_flag("--act-order", qu.act_order, "GPTQ: quantize inputs by decreasing Hessian diagonal (static groups)");
  quant->add_option("--damp", qu.damp, "GPTQ/OAC damping, a fraction of the mean Hessian diagonal (0: plain Cholesky; "
                    "raised step by step when a factorisation fails)")->check(CLI::NonNegativeNumber);
  quant->add_option("--adpq-rule", qu.adpq_rule, "AdpQ threshold rule: fraction (the --salient-fraction largest |w| per "
                    "layer) or universal (robust sigma * sqrt(2 ln n))")->check(CLI::IsMember({"fraction", "universal"}));
  quant->add_option("--salient-fraction", qu.salient_fraction, "AdpQ: fraction of each layer's weights kept as salient")
      ->check(CLI::Range(0.0, 0.5));
  quant->add_option("--adpq-gamma", qu.adpq_gamma, "AdpQ: exponent of the adaptive-LASSO weights 1/|w|^gamma")
      ->check(CLI::Range(0.0, 16.0));
  quant->add_option("--data", quant_data, "Calibration text file (default: the KJV); its train split is used");
  quant->add_option("--seed", qu.seed, "Seed of the calibration windows");
  quant->add_option("--threads", qu.threads, "OpenMP threads (0: default)")->check(CLI::NonNegativeNumber);

  intrain::LrecOptions lr;
  std::string lrec_data;
  auto* lrec = app.add_subcommand("lrec", "Train LoRA correctors of a quantized model against its float teacher (docs/int21.md)");
  lrec->add_option("--teacher", lr.teacher, "The float model.safetensors the quantized model came from")->required();
  lrec->add_option("--quantized", lr.quantized, "The packed model written by intrain quantize")->required();
  lrec->add_option("--out", lr.out, "Output folder (model.safetensors with adapters, metrics.csv, summary.json)");
  lrec->add_option("--rank", lr.rank, "LoRA rank")->check(CLI::Range(1, 4096));
  lrec->add_option("--alpha", lr.alpha, "LoRA alpha: the correction is scaled by alpha / rank")->check(CLI::PositiveNumber);
  lrec->add_option("--lora-targets", lr.targets,
                   "Block linears that get adapters, comma separated suffixes (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj, "
                   "or h.N.<name>); default: all four of every block")
      ->delimiter(',');
  lrec->add_option("--steps", lr.steps, "Optimizer steps")->check(CLI::Range(1L, 100000000L));
  lrec->add_option("--batch", lr.batch, "Sequences per step")->check(CLI::Range(1, 4096));
  lrec->add_option("--lr", lr.lr, "Peak learning rate of the adapters' SGD")->check(CLI::PositiveNumber);
  lrec->add_option("--momentum", lr.momentum, "SGD momentum")->check(CLI::Range(0.0, 0.9999));
  lrec->add_option("--warmup", lr.warmup, "Linear warmup steps")->check(CLI::NonNegativeNumber);
  lrec->add_option("--clip-grad-norm", lr.clip_grad_norm,
                   "Clip the adapters' global gradient norm to this by a power of two before each step (default 1; 0: off)")
      ->check(CLI::NonNegativeNumber);
  lrec->add_option("--ce-weight", lr.ce_weight, "Weight of the per-token cross-entropy beside the per-token KL")
      ->check(CLI::NonNegativeNumber);
  add_format_flags(lrec, lr.format, lr.rounding);
  lrec->add_option("--adapter-format", lr.adapter_format,
                   "int: train the adapters in --format (integer engine); fp32: the float LoRA reference on the same "
                   "packed base (activations, errors and adapters in fp32)")
      ->check(CLI::IsMember({"int", "fp32"}));
  lrec->add_option("--teacher-storage", lr.teacher_storage,
                   "fp32: the teacher's weights as the checkpoint holds them; fp16: its block linears held in "
                   "binary16 (2 bytes per weight, as INT2.1's fp16 teachers; the target logits change slightly)")
      ->check(CLI::IsMember({"fp32", "fp16"}));
  lrec->add_option("--data", lrec_data, "Text file (default: the KJV); training uses its train split only");
  lrec->add_option("--seed", lr.seed, "Seed of the adapters' initialisation, the batches and the rounding");
  lrec->add_option("--eval-windows", lr.eval_windows, "Validation windows of the before/after evaluation (0: all)")
      ->check(CLI::NonNegativeNumber);
  lrec->add_option("--threads", lr.threads, "OpenMP threads (0: default)")->check(CLI::NonNegativeNumber);
  lrec->add_flag("--overwrite", lr.overwrite, "Replace an LREC run already in --out");
  lrec->add_flag("--quiet", lr.quiet, "No progress line");

  intrain::ReproduceOptions rp;
  std::string rp_teacher, rp_data;
  bool rp_quick = false;
  auto* reproduce = app.add_subcommand("reproduce", "Reproduce a paper's table");
  reproduce->require_subcommand(1);
  auto* int21 = reproduce->add_subcommand("int21", "INT2.1: quantize at 2-8 bits, correct with LREC, report (docs/int21.md)");
  int21->add_option("--out", rp.out, "Output folder (stages, int21.json, int21.md, int21.png)");
  int21->add_flag("--quick", rp_quick, "A small teacher and short runs (under 3 minutes on 2 cores); explicit flags override it");
  int21->add_option("--teacher", rp_teacher, "Reuse this float model.safetensors instead of training a teacher");
  int21->add_option("--data", rp_data, "Text file (default: the KJV)");
  int21->add_option("--layers", rp.layers, "Teacher blocks (when trained here)")->check(CLI::Range(1, 64));
  int21->add_option("--d-model", rp.d_model, "Teacher width")->check(CLI::Range(8, 4096));
  int21->add_option("--heads", rp.heads, "Teacher heads")->check(CLI::Range(1, 256));
  int21->add_option("--context", rp.context, "Teacher context")->check(CLI::Range(2, 4096));
  int21->add_option("--teacher-steps", rp.teacher_steps, "Teacher training steps")->check(CLI::Range(1L, 100000000L));
  int21->add_option("--teacher-early-stop", rp.teacher_early_stop,
                    "Stop the teacher after N validations (every steps/30) without a new best, and use the best "
                    "(0: off, the last model)")
      ->check(CLI::NonNegativeNumber);
  int21->add_option("--methods", rp.methods, "Quantizers, comma separated: rtn, gptq, adpq, oac")->delimiter(',');
  int21->add_option("--bits", rp.bits, "Bit widths, comma separated (2..8)")->delimiter(',');
  int21->add_option("--group", rp.group, "Quantization group size")->check(CLI::Range(8, 4096));
  int21->add_option("--calib-tokens", rp.calib_tokens, "GPTQ calibration tokens")->check(CLI::Range(1L, 100000000L));
  int21->add_option("--rank", rp.rank, "LoRA rank of the main table")->check(CLI::Range(1, 4096));
  int21->add_option("--alpha", rp.alpha, "LoRA alpha at --rank (default 4 x rank; the sweep keeps alpha / rank)")
      ->check(CLI::PositiveNumber);
  int21->add_option("--sweep-ranks", rp.sweep_ranks, "Ranks of the INT2 rank sweep, comma separated")->delimiter(',');
  int21->add_option("--reference-bits", rp.reference_bits,
                    "Bit widths that also get a float-LoRA and a KL-only run (GPTQ), comma separated")
      ->delimiter(',');
  int21->add_option("--lrec-steps", rp.lrec_steps, "LREC steps per run")->check(CLI::Range(1L, 100000000L));
  int21->add_option("--batch", rp.batch, "Sequences per step (teacher, LREC, memory runs)")->check(CLI::Range(1, 4096));
  int21->add_option("--lr", rp.lr, "LREC learning rate")->check(CLI::PositiveNumber);
  int21->add_option("--clip-grad-norm", rp.clip_grad_norm, "LREC gradient clipping: global norm limit (0: off)")
      ->check(CLI::NonNegativeNumber);
  int21->add_option("--ce-weight", rp.ce_weight, "LREC cross-entropy weight (per token)")->check(CLI::NonNegativeNumber);
  int21->add_option("--format", rp.format, "Formats of the integer LREC student and adapters (default w8a16e8g8: 16-bit activations; int8, ...)");
  int21->add_option("--eval-windows", rp.eval_windows, "Validation windows per evaluation (0: all)")->check(CLI::NonNegativeNumber);
  int21->add_option("--memory-widths", rp.memory_widths,
                    "Widths of the memory-against-model-size runs, comma separated (0: none; --quick: none)")
      ->delimiter(',')
      ->check(CLI::Range(0, 16384));
  int21->add_option("--memory-batches", rp.memory_batches, "Batches of the memory-against-model-size runs, comma separated")
      ->delimiter(',')
      ->check(CLI::Range(1, 4096));
  int21->add_option("--jobs", rp.jobs, "Stages run side by side")->check(CLI::Range(1, 256));
  int21->add_option("--threads", rp.threads, "OpenMP threads per stage (0: 1 with --jobs > 1, else all)")->check(CLI::NonNegativeNumber);
  int21->add_option("--seed", rp.seed, "Seed of every stage");
  int21->add_flag("!--no-plots", rp.plots, "Do not run the plotting script");

  CLI11_PARSE(app, argc, argv);
  // Under mpirun every rank parses the same flags, so a flag error ends all
  // of them above, before MPI starts.
  std::unique_ptr<intrain::Collective> comm;
  try {
    comm = intrain::init_collective(&argc, &argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "intrain: error: %s\n", e.what());
    return 1;
  }
  const bool parallel = comm->size() > 1;
  try {
    if (parallel && !*train && !*ablate) {
      throw std::invalid_argument("intrain " + app.get_subcommands().front()->get_name() +
                                  " runs in one process; under mpirun only `train` (data-parallel) and `ablate` "
                                  "(sharded) run on several ranks (docs/distributed.md)");
    }
    tr.comm = ab.comm = comm.get();
    if (*selfcheck) return intrain::run_selfcheck(sc);
    if (*train) {
      if (!train_data.empty()) tr.data = train_data;
      const auto r = intrain::run_train(tr);
      if (comm->rank() == 0)
        std::printf("%s: final train loss %.4f, validation loss %.4f (nats/byte), %.0f tokens/s, %.1f s\n",
                  tr.format.c_str(), r.final_train_loss, r.final_val_loss, r.tokens_per_s, r.wall_s);
      return 0;
    }
    if (*ablate) {
      if (ablate_quick) {
        // --quick sets defaults; flags given explicitly win.
        intrain::AblateOptions q = ab;
        intrain::apply_quick(q);
        auto keep = [&](const char* flag, auto& dst, const auto& src) {
          if (ablate->count(flag) == 0) dst = src;
        };
        keep("--bits", ab.bits, q.bits);
        keep("--seeds", ab.seeds, q.seeds);
        keep("--layers", ab.train.layers, q.train.layers);
        keep("--d-model", ab.train.d_model, q.train.d_model);
        keep("--heads", ab.train.heads, q.train.heads);
        keep("--context", ab.train.context, q.train.context);
        keep("--batch", ab.train.batch, q.train.batch);
        keep("--steps", ab.train.steps, q.train.steps);
        keep("--warmup", ab.train.warmup, q.train.warmup);
        keep("--eval-every", ab.train.eval_every, q.train.eval_every);
        keep("--eval-windows", ab.train.eval_windows, q.train.eval_windows);
        keep("--final-eval-windows", ab.train.final_eval_windows, q.train.final_eval_windows);
        keep("--jobs", ab.jobs, 2);
      }
      if (!ablate_data.empty()) ab.train.data = ablate_data;
      if (ablate->count("--lrec-teacher") || ablate->count("--lrec-quantized")) {
        if (!ablate->count("--lrec-alpha")) ablate_lrec.alpha = 4.0 * ablate_lrec.rank;
        ab.lrec = ablate_lrec;
      } else {
        for (const char* f : {"--lrec-rank", "--lrec-alpha", "--lrec-steps", "--lrec-lr", "--lrec-ce-weight", "--lrec-eval-windows"})
          if (ablate->count(f))
            throw std::invalid_argument(std::string(f) + " belongs to an LREC sweep: add --lrec-teacher T --lrec-quantized Q");
      }
      return intrain::run_ablate(ab) == 0 ? 0 : 2;
    }
    if (*eval) {
      if (!eval_data.empty()) ev.data = eval_data;
      if (!eval_teacher.empty()) ev.teacher = eval_teacher;
      std::cout << intrain::run_eval(ev).dump() << std::endl;
      return 0;
    }
    if (*bound) {
      if (!bound_run.empty()) {
        intrain::load_run_constants(bo, bound_run, [&](const char* flag) { return bound->count(flag) > 0; });
      }
      intrain::run_bound(bo);
      return 0;
    }
    if (*quant) {
      if (!quant_data.empty()) qu.data = quant_data;
      std::cout << intrain::run_quantize(qu).dump() << std::endl;
      return 0;
    }
    if (*lrec) {
      if (!lrec_data.empty()) lr.data = lrec_data;
      std::cout << intrain::run_lrec(lr).dump(2) << std::endl;
      return 0;
    }
    if (*reproduce) {
      if (rp_quick) {
        intrain::ReproduceOptions q = rp;
        intrain::apply_quick(q);
        auto keep = [&](const char* flag, auto& dst, const auto& src) {
          if (int21->count(flag) == 0) dst = src;
        };
        keep("--layers", rp.layers, q.layers);
        keep("--d-model", rp.d_model, q.d_model);
        keep("--heads", rp.heads, q.heads);
        keep("--context", rp.context, q.context);
        keep("--teacher-steps", rp.teacher_steps, q.teacher_steps);
        keep("--teacher-early-stop", rp.teacher_early_stop, q.teacher_early_stop);
        keep("--group", rp.group, q.group);
        keep("--calib-tokens", rp.calib_tokens, q.calib_tokens);
        keep("--sweep-ranks", rp.sweep_ranks, q.sweep_ranks);
        keep("--lrec-steps", rp.lrec_steps, q.lrec_steps);
        keep("--eval-windows", rp.eval_windows, q.eval_windows);
        keep("--jobs", rp.jobs, q.jobs);
        rp.memory_steps = q.memory_steps;
        keep("--memory-widths", rp.memory_widths, q.memory_widths);
      }
      if (!rp_teacher.empty()) rp.teacher = rp_teacher;
      if (!rp_data.empty()) rp.data = rp_data;
      return intrain::run_reproduce_int21(rp) == 0 ? 0 : 2;
    }
    if (*sample) {
      std::cout << intrain::run_sample(sa) << std::endl;
      return 0;
    }
  } catch (const std::exception& e) {
    if (parallel) {
      // The other ranks may be waiting in a collective: end them all rather than hang.
      std::fprintf(stderr,
                   "intrain: rank %d of %d: error: %s\nintrain: stopping every rank; the last checkpoint in --out "
                   "(if any) resumes with --resume\n",
                   comm->rank(), comm->size(), e.what());
      std::fflush(stderr);
      comm->abort(1);
    }
    std::fprintf(stderr, "intrain: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
