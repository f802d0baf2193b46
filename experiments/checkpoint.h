// Checkpoints: the model file and the training state, both safetensors.
//
// model.safetensors
//   Hugging Face GPT-2 names and layouts ("wte.weight", "h.0.attn.c_attn.weight"
//   [d, 3d], ...), float32 values of the weights the forward pass uses: the
//   parameter values (exactly representable in float32: at most 24 significant
//   bits). __metadata__: n_layer, n_head, n_embd, n_ctx, vocab_size, format,
//   rounding, step, and "intrain": the format version.
//
// train_state.safetensors (everything needed to continue bit-identically)
//   "master.<name>"   the optimizer's master copy (F32, or I32 mantissas at
//                     exponent kMasterExponent);
//   "momentum.<name>" the momentum buffer (F32, or I32 mantissas; exponent in
//                     metadata "momentum_exponent.<name>"), absent before the
//                     first update;
//   __metadata__: step (the next step to run), seed, and the run's settings,
//   so --resume can refuse a run whose configuration differs.
// Random numbers and batches are pure functions of (seed, step), so the step
// is the whole RNG and data position.
//
// Both files are written atomically (temporary file, then rename).
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>

#include "core/safetensors.h"
#include "layers/gpt.h"
#include "layers/lora.h"

namespace intrain {

using Metadata = std::map<std::string, std::string>;

void save_model(const std::filesystem::path& path, const GPT& model, const Metadata& extra);
// The contents save_model() writes, for writers that change some tensors
// (intrain quantize replaces block weights by packed codes).
SafeTensorsFile model_file(const GPT& model, const Metadata& extra);
void save_train_state(const std::filesystem::path& path, const GPT& model, std::uint64_t next_step,
                      const Metadata& settings);

// Reads model.safetensors: its configuration and format (from metadata, or
// `format_override` if non-empty) and a model whose values are the file's
// weights (cast to the format). A file written by `intrain quantize` holds a
// block weight as packed codes ("<module>.qweight", ".qzeros", ".scales"; see
// experiments/quantize.h; AdpQ files add a sparse salient part): that module
// becomes a frozen QuantizedLinear and its float weight parameter is left
// empty (no float copy is kept). A file with "lora.rank" metadata (written by
// `intrain lrec`) also wraps each module that has "<module>.lora_A"/"lora_B"
// in a LoraLinear holding them. Throws std::runtime_error naming the file and
// what is wrong: a missing tensor, a shape that does not match the metadata,
// metadata missing or malformed.
//
// The file is read one tensor at a time into a model built without data
// (GPT::Unfilled), so the load's peak is the model plus one tensor.
// A forward-only load (a teacher) keeps no masters, only the values forward
// reads; with `linears_fp16` its block linears are also held in binary16
// (layers/fp16_linear.h) as they are read, so their fp32 copy is never whole.
struct LoadMode {
  bool forward_only = false;  // float models only
  bool linears_fp16 = false;  // implies forward_only
};
GPT load_model(const std::filesystem::path& path, const std::string& format_override, Rounding rounding,
               LoadMode mode = {});

// Adds every adapter's A and B ("<module>.lora_A" [in, r], "<module>.lora_B"
// [r, out]) to `f`, with metadata "lora.rank", "lora.alpha", "lora.targets".
// Integer adapters are stored as their values' I8..I16 mantissas (the run's W
// format; the shared exponent in "lora.exponent.<name>"), float ones as F32.
void add_lora_tensors(SafeTensorsFile& f, const std::vector<LoraLinear*>& lora, const LoraConfig& cfg);

// Restores masters and momentum into `model` from train_state.safetensors and
// returns its metadata. The caller checks the settings and refreshes values.
Metadata load_train_state(const std::filesystem::path& path, GPT& model);

}  // namespace intrain
