// `intrain quantize`: group-wise weight quantization (RTN, GPTQ, AdpQ or OAC)
// of a checkpoint's block linears, written as packed safetensors.
//
// Quantized: every attention and MLP linear weight (h.<l>.attn.c_attn,
// attn.c_proj, mlp.c_fc, mlp.c_proj). Kept in float: embeddings (and so the
// tied head), LayerNorms and biases.
//
// GPTQ calibration: windows of n_ctx bytes from the corpus' *train* split
// (experiments/corpus.h), drawn by sample_batch(seed, step) until at least
// --calib-tokens tokens; blocks are processed in order, each calibrated on the
// inputs produced by the blocks already quantized (as the GPTQ reference code
// does); the four linears of a block see one pass of the block in float.
//
// AdpQ (core/adpq.h) reads no data at all: --data, --calib-tokens and --seed
// are ignored, and the file is a function of the model and the AdpQ flags.
//
// OAC calibration (core/oac.h, docs/oac.md): the same train-split windows; one
// forward and backward pass of the *float* model per batch (cross-entropy on
// the next byte), every linear wrapped by a probe that keeps its input x and
// accumulates the per-sequence gradients Xᵀ·dY into the output-adaptive
// Hessian; then every linear is solved by GPTQ's column loop with that
// Hessian (independence across layers: no sequential re-calibration).
//
// Damping (GPTQ, OAC): a failed Cholesky raises the damping step by step
// (core/gptq.h), the run finishes, a warning names the layer, and the final
// damping of every layer is in __metadata__ "quant.damp.<module>" (and
// "quant.damp_raises.<module>"). The calibration set is recorded too:
// quant.calib_file, quant.calib_offsets (the byte offsets of the windows in
// the file; the train split is its first bytes), quant.calib_tokens,
// quant.calib_seed.
//
// File: the model.safetensors layout (experiments/checkpoint.h) with each
// quantized "<module>.weight" replaced by
//   "<module>.qweight"  U8 [bytes]   the b-bit code stream of W [K, N]
//   "<module>.qzeros"   U8 [bytes]   the b-bit zero-point stream
//   "<module>.scales"   I16 [N, K/G] binary16 bit patterns
// (layouts in core/packed_weights.h; __metadata__ "quant.packing" repeats
// them) and __metadata__ "quant.*": method, bits, group, act_order, damp,
// calib_tokens, calib_seed, calib_split, source, bits_per_weight.
// AdpQ adds its salient part (core/salient_weights.h) per module:
//   "<module>.salient_positions"  U8   the position bit stream
//   "<module>.salient_codes"      U8   the b-bit code stream
//   "<module>.salient_zeros"      U8   the b-bit zero-point stream
//   "<module>.salient_scales"     I16  binary16 bit patterns, one per salient group
// with the entry count in __metadata__ "quant.salient_count.<module>" (no
// tensors when it is 0), and quant.adpq_rule, quant.salient_fraction,
// quant.adpq_gamma, quant.adpq_threshold.<module>.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "core/packed_weights.h"
#include "core/salient_weights.h"
#include "core/safetensors.h"

namespace intrain {

struct QuantizeOptions {
  std::filesystem::path model, out;
  int bits = 4;
  int group = 128;
  std::string method = "gptq";  // "rtn", "gptq", "adpq" or "oac"
  long calib_tokens = 32768;
  bool act_order = false;
  double damp = 0.01;
  // AdpQ (core/adpq.h)
  std::string adpq_rule = "fraction";
  double salient_fraction = 0.005;
  double adpq_gamma = 1.0;
  std::optional<std::filesystem::path> data;  // default: the KJV
  std::uint64_t seed = 1;
  int threads = 0;
};

// Quantizes, writes opt.out, and returns a summary: per-module output errors
// ||X·W − X·Ŵ||² / ||X·W||² on the calibration data (GPTQ and, for
// comparison, RTN), bits per weight, damping raises.
nlohmann::json run_quantize(const QuantizeOptions& opt);

// The packed weight of `module` ([K, N]) from a file written by run_quantize.
PackedWeights read_packed(const SafeTensorsFile& f, const std::string& module, std::int64_t K, std::int64_t N);
// Its salient part, if the file has one for `module` (AdpQ files).
std::optional<SalientWeights> read_salient(const SafeTensorsFile& f, const std::string& module, std::int64_t K, std::int64_t N);

}  // namespace intrain
