// A GPT-2-style byte-level language model: learned token and position
// embeddings, pre-LayerNorm blocks (causal self-attention, GELU MLP),
// a final LayerNorm and an output head tied to the token embedding.
//
// The same code runs in float32 and in integer formats; only the kernels
// behind core/ops.h and core/matmul.h differ. Forward and backward are
// written out explicitly, block by block (see docs/engine.md for why this
// engine uses explicit forward/backward pairs rather than a tape).
//
// Parameters use Hugging Face GPT-2 names and layouts (Conv1D weights are
// [in, out]), so checkpoints load into transformers-style code unchanged.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/collective.h"
#include "core/ops.h"
#include "core/precision.h"
#include "layers/linear.h"
#include "layers/param.h"

namespace intrain {

struct GPTConfig {
  int n_layer = 4, n_head = 4, n_embd = 128, n_ctx = 128, vocab_size = 256;
  void validate() const;  // throws std::invalid_argument naming the bad field
};

class GPT {
 public:
  // Parameters initialised as GPT-2 does (N(0, init_std) with GPT-2's 0.02 by
  // default; residual projections N(0, init_std/sqrt(2 n_layer)); LayerNorm
  // 1 and 0; biases 0) from a counter-based generator keyed by `seed`.
  GPT(const GPTConfig& cfg, const Precision& prec, std::uint64_t seed, float init_std = 0.02f);
  // Parameters with names, kinds and shapes but no data (empty master and
  // value): for a loader that fills them (experiments/checkpoint.h), so that
  // a load never holds a random model beside the file's.
  struct Unfilled {};
  GPT(const GPTConfig& cfg, const Precision& prec, Unfilled);
  // Layers hold pointers into params_: a move keeps them valid, a copy would not.
  GPT(GPT&&) noexcept = default;
  GPT& operator=(GPT&&) noexcept = default;
  GPT(const GPT&) = delete;
  GPT& operator=(const GPT&) = delete;

  const GPTConfig& config() const { return cfg_; }
  const Precision& precision() const { return prec_; }
  std::vector<Param>& params() { return params_; }
  const std::vector<Param>& params() const { return params_; }
  Param& param(const std::string& name);
  bool has_param(const std::string& name) const;

  // Runs the model on tokens [B, T] (T <= n_ctx). With targets, returns the
  // mean cross-entropy and, if `train`, keeps what backward() needs. With
  // `train` and no targets it keeps the same state and returns 0: the caller
  // forms the logits' gradient itself and calls backward(dlogits) (LREC's
  // distillation loss). `step` and `seed` key the stochastic rounding of this pass.
  double forward(const std::int32_t* tokens, const std::int32_t* targets, std::int64_t B, std::int64_t T,
                 std::uint64_t step, std::uint64_t seed, bool train);
  // Accumulates every parameter's gradient for the last training forward
  // (the cross-entropy of its targets).
  void backward();
  // The same from a given gradient of the loss w.r.t. logits() [B*T, V], in
  // the run's E format (or fp32).
  void backward(Tensor dlogits);
  // Data-parallel training (docs/distributed.md): from now on the `tokens` of
  // a training forward are this rank's slice of a global batch split evenly
  // over `comm`, and every op of the pass rounds and scales as the
  // single-process pass over the global batch would (core/collective.h).
  // Evaluation passes (train = false) stay local. Gradients are the local
  // sums; the caller all-reduces them. `comm` must outlive the model's use.
  // Throws std::invalid_argument for outlier tiling on more than one rank
  // (its thresholds come from whole-tensor statistics that are not all-reduced).
  void set_batch_shard(const Collective* comm);

  // Freezes every parameter of the model (LoRA/LREC: only adapters train).
  // Frozen weights take no gradient, and the tied head's dW is not computed.
  void freeze();
  // Calls f(module name, layer) for every block linear, in linear_modules() order.
  template <class F>
  void for_each_linear(F&& f) {
    const std::vector<std::string> names = linear_modules();
    for (std::size_t i = 0; i < names.size(); ++i) f(names[i], *linear_slot(i));
  }
  // Logits of the last forward pass, [B*T, V] (accumulator or float).
  const Tensor& logits() const { return logits_; }

  // Re-derives every parameter's value from its master copy (after an
  // update, or after loading a checkpoint).
  void refresh_values(std::uint64_t step, std::uint64_t seed);
  // Sum of saturated() over the tensors of the last step: forward, backward
  // and the value casts. Numerator of the saturated fraction.
  std::int64_t saturated() const { return saturated_; }
  std::int64_t elements_cast() const { return cast_elements_; }
  // Outliers split since the last forward, by the linear layers and by
  // attention (q, k, v, P in the forward pass, dY and dS in the backward; 0
  // unless outlier tiling is on); `elements`, if given, receives the elements split.
  std::int64_t outliers(std::int64_t* elements = nullptr) const;
  // Calls f for every split the linear layers make (statistics).
  void observe_splits(const SplitObserver& f);
  std::int64_t num_parameters() const;

  // The block linears by Hugging Face module name: "h.<l>.attn.c_attn",
  // "h.<l>.attn.c_proj", "h.<l>.mlp.c_fc", "h.<l>.mlp.c_proj" (in that order).
  std::vector<std::string> linear_modules() const;
  // [in, out] of a block linear (from the configuration; valid for packed layers too).
  std::pair<std::int64_t, std::int64_t> linear_dims(const std::string& module) const;
  // Puts `layer` in place of the named linear and returns the one it replaces
  // (throws std::out_of_range for an unknown name). The parameters stay in
  // params(); a caller that drops a weight for good may empty its tensors
  // (refresh_values() skips a parameter without a master).
  std::unique_ptr<LinearLayer> replace_linear(const std::string& module, std::unique_ptr<LinearLayer> layer);

 private:
  struct Block {
    Param *ln1_g, *ln1_b, *ln2_g, *ln2_b;
    std::unique_ptr<LinearLayer> c_attn, c_proj, c_fc, mlp_proj;
    LayerNormCache ln1, ln2;
    Tensor q, k, v, P, z;  // saved for backward
  };

  RngKey key(std::uint64_t op) const;
  std::unique_ptr<LinearLayer>* linear_slot(std::size_t i);
  void note(const Tensor& t);
  void note_split(const OutlierSplit& s);
  Tensor block_forward(Block& b, int layer, Tensor h);
  Tensor block_backward(Block& b, int layer, Tensor dh);
  Format residual() const { return prec_.is_float() ? Format::fp32() : residual_format(); }

  GPTConfig cfg_;
  Precision prec_;
  std::vector<Param> params_;
  std::vector<Block> blocks_;
  Param *wte_, *wpe_, *lnf_g_, *lnf_b_;

  // State of the current pass.
  std::uint64_t step_ = 0, seed_ = 0;
  const Collective* batch_shard_ = nullptr;
  bool sliced_pass_ = false;  // the current pass is a batch slice
  std::int64_t B_ = 0, T_ = 0;
  std::vector<std::int32_t> tokens_;
  LayerNormCache lnf_;
  Tensor xf_, logits_, dlogits_;
  std::int64_t saturated_ = 0, cast_elements_ = 0;
  std::int64_t attention_outliers_ = 0, attention_split_elements_ = 0;
};

}  // namespace intrain
