// `intrain lrec`: low-rank error correction (INT2.1, Chai et al. 2023) on CPU.
//
// A quantized model (written by `intrain quantize`: packed, frozen block
// linears) gets LoRA adapters (layers/lora.h) that the integer engine trains
// so that the student's next-byte distribution matches the float teacher's:
//
//   loss = KL(teacher || student) + ce_weight * CE(student, next byte),
//
// both per token (mean over the B*T positions of a batch), in nats. INT2.1's
// code sums the KL over a sequence and divides by the batch size only; its
// per-token balance kl 1 : ce 120 at 2048 tokens is kl 1 : ce 0.06 per token
// (research/int21-reference.md §4, §12), hence the default ce_weight 0.06.
//
// The gradient w.r.t. the student's logits is (1 + w) * (softmax - target) / R
// with target = (p_teacher + w * onehot) / (1 + w): one soft-target
// cross-entropy (core/ops.h soft_cross_entropy_grad), exact on the integer
// softmax's Q30 grid. The teacher runs in fp32 on every batch (no cache of
// logits); its probabilities are the only float input of the student's
// integer training, formed in double and rounded once to Q30.
//
// Data: batches from the corpus' train split only (sample_batch, keyed by
// (seed, step)); evaluation on the validation split.
//
// Outputs in --out:
//   model.safetensors  the quantized file's tensors and metadata, plus
//                      "<module>.lora_A" [in, r] and "<module>.lora_B" [r, out]
//                      (I8 mantissas with "lora.exponent.<name>" in integer
//                      runs, F32 in float runs) and "lora.*" metadata;
//                      `intrain eval` loads it with its adapters.
//   metrics.csv        step, loss, kl, ce, lr, grad_norm (before clipping),
//                      clip_shift (gradients scaled by 2^-clip_shift), tokens_per_s
//   summary.json       before/after evaluation, effective bits, memory
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace intrain {

// The default --format of `intrain lrec` and `intrain reproduce int21`.
inline constexpr const char* kLrecDefaultFormat = "w8a16e8g8";

struct LrecOptions {
  std::filesystem::path teacher, quantized, out = "runs/lrec";
  int rank = 2;
  double alpha = 8.0;       // s = alpha / rank; alpha = 4 rank as in INT2.1's defaults (r 32, alpha 128)
  std::vector<std::string> targets;  // module suffixes; empty: all four block linears
  long steps = 300;
  int batch = 16;
  double lr = 0.5, momentum = 0.9;
  long warmup = 20;
  double ce_weight = 0.06;  // per-token CE weight beside the per-token KL
  // The gradients' global L2 norm is clipped to this by a power of two
  // (optim/grad_clip.h) before every step; 0: no clipping. At lr 0.5 RTN and
  // AdpQ INT2 students (starting KL ~1) diverge without it: their norm grows
  // from 0.5 to 1.5 over the warmup and then explodes, while GPTQ's stays
  // near 0.2-0.4 (docs/int21.md, "Gradient clipping").
  double clip_grad_norm = 1.0;
  // The student's (and its adapters') formats. The default keeps weights,
  // adapters, errors and gradients at 8 bits but activations at 16 (split in
  // int8 pieces for every product): with 8-bit activations the engine's own
  // rounding is a KL floor above INT4's weight error (docs/int21.md, "The
  // full run").
  std::string format = kLrecDefaultFormat;
  // "int": the adapters train in --format (the integer engine); "fp32": the
  // float reference in the same engine: the student's activations, errors and
  // adapters in fp32 on the same packed base, same data, steps and seed.
  std::string adapter_format = "int";
  // How the teacher holds its block linears' weights: fp32 (the checkpoint as
  // it is) or fp16 (layers/fp16_linear.h: 2 bytes per weight, the INT2.1
  // setting; the target logits then come from the fp16-rounded weights).
  std::string teacher_storage = "fp32";
  std::string rounding = "stochastic";
  std::optional<std::filesystem::path> data;
  std::uint64_t seed = 1;
  int threads = 0;
  long eval_windows = 0;    // validation windows of the before/after evaluation (0: the whole split)
  bool overwrite = false;
  bool quiet = false;
};

// Where the bytes of a model file go (docs/int21.md, "Effective bits"), by
// tensor name: "packed_codes" (*.qweight), "scales_and_zeros" (*.scales,
// *.qzeros), "adapters" (*.lora_A, *.lora_B), and what stays in float:
// "embeddings" (wte, wpe; the head is tied to wte), "norms" (ln_*), "biases"
// (*.bias), "other". Returns {"bytes": {category: bytes}, "header_bytes",
// "file_bytes", and, per base weight (base_weights > 0), "bits_per_base_weight"}.
// The categories and the header add up to the file size exactly.
nlohmann::json storage_breakdown(const std::filesystem::path& model, double base_weights);

// Trains the adapters, evaluates before and after, writes --out, and returns
// summary.json's contents.
nlohmann::json run_lrec(const LrecOptions& opt);

}  // namespace intrain
