// `intrain quantize`: group-wise weight quantization (RTN or GPTQ) of a
// checkpoint's block linears, written as packed safetensors.
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
// File: the model.safetensors layout (experiments/checkpoint.h) with each
// quantized "<module>.weight" replaced by
//   "<module>.qweight"  U8 [bytes]   the b-bit code stream of W [K, N]
//   "<module>.qzeros"   U8 [bytes]   the b-bit zero-point stream
//   "<module>.scales"   I16 [N, K/G] binary16 bit patterns
// (layouts in core/packed_weights.h; __metadata__ "quant.packing" repeats
// them) and __metadata__ "quant.*": method, bits, group, act_order, damp,
// calib_tokens, calib_seed, calib_split, source, bits_per_weight.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "core/packed_weights.h"
#include "core/safetensors.h"

namespace intrain {

struct QuantizeOptions {
  std::filesystem::path model, out;
  int bits = 4;
  int group = 128;
  std::string method = "gptq";  // "rtn" or "gptq"
  long calib_tokens = 32768;
  bool act_order = false;
  double damp = 0.01;
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

}  // namespace intrain
