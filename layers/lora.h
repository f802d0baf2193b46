// LoRA: a trainable low-rank correction beside a frozen linear layer
// (Hu et al. 2021; INT2.1's correctors on quantized layers):
//
//   y  = base(x) + s · (x·A)·B,        s = alpha / rank,
//   x [R, in], A [in, r], B [r, out]   (the HF Conv1D layout of layers/linear.h)
//
// backward, with u = x·A saved by the forward and dy the output error:
//   dB = s · uᵀ·dy          [r, out]
//   du = s · dy·Bᵀ          [R, r]   (cast to the E format: it is a matmul operand)
//   dA = xᵀ·du              [in, r]
//   dx = base.backward(dy) + du·Aᵀ
//
// Initialisation as in PEFT: A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0, so the
// wrapped layer starts as exactly its base.
//
// Formats. Float mode: everything fp32. Integer mode: A and B are ordinary
// Params (31-bit masters, values in the run's W format, refreshed by
// refresh_values()); x arrives in the A format, u is cast to the A format, du
// to the E format; every product is an exact accumulator. The base output is
// taken in the 24-bit wide format (with the output's rounding mode), the
// correction added to it exactly, and the sum cast once to the requested
// format, so the adapter's contribution is not lost under an int8 rounding of
// the base alone.
//
// Memory: the layer saves x and u for the backward (the base saves what it
// needs itself; a frozen QuantizedLinear saves nothing).
//
// Ownership: the layer owns its base and its two Params; pointers to the
// Params (params()) stay valid for the layer's lifetime.
#pragma once

#include <array>
#include <memory>
#include <string>
#include <vector>

#include "core/precision.h"
#include "layers/linear.h"

namespace intrain {

struct LoraConfig {
  int rank = 8;
  double alpha = 32.0;  // s = alpha / rank; INT2.1 and the float reference use alpha = 4 rank
  // Which block linears get adapters: module-name suffixes such as
  // "attn.c_attn" or "h.0.mlp.c_fc". Empty: all four linears of every block.
  std::vector<std::string> targets;
  void validate() const;  // throws std::invalid_argument naming the bad flag
  bool targets_module(const std::string& module) const;
};

class LoraLinear : public LinearLayer {
 public:
  // A fresh adapter of `cfg.rank` around `base` (in x out), initialised from
  // (seed, module name).
  LoraLinear(std::string module, std::unique_ptr<LinearLayer> base, std::int64_t in, std::int64_t out,
             const LoraConfig& cfg, const Precision& prec, std::uint64_t seed);

  Tensor forward(const Tensor& x, const Format& out, RngKey key) override;
  Tensor backward(const Tensor& dy, RngKey key) override;

  std::int64_t outliers() const override { return base_->outliers(); }
  std::int64_t split_elements() const override { return base_->split_elements(); }
  void reset_counts() override { base_->reset_counts(); }
  void set_observer(SplitObserver f) override { base_->set_observer(std::move(f)); }
  void drop_saved() override {
    base_->drop_saved();
    x_ = u_ = Tensor();
  }

  const std::string& module() const { return module_; }
  const LinearLayer& base() const { return *base_; }
  double scale() const { return scale_; }
  int rank() const { return rank_; }
  // A ("<module>.lora_A", [in, r]) and B ("<module>.lora_B", [r, out]).
  std::array<Param*, 2> params() { return {&a_, &b_}; }
  std::array<const Param*, 2> params() const { return {&a_, &b_}; }
  // Re-derives A's and B's values from their masters (after an update or a load).
  void refresh_values(std::uint64_t step, std::uint64_t seed);

 private:
  std::string module_;
  std::unique_ptr<LinearLayer> base_;
  Param a_, b_;
  Precision prec_;
  int rank_;
  double scale_;
  Tensor x_, u_;  // saved by forward
};

// Wraps every targeted block linear of `model` in a fresh LoraLinear, freezes
// the rest of the model, and returns the adapters in linear_modules() order.
// The returned pointers are owned by the model.
class GPT;
std::vector<LoraLinear*> attach_lora(GPT& model, const LoraConfig& cfg, std::uint64_t seed);
// The LoraLinear layers a model already holds (e.g. loaded from a file).
std::vector<LoraLinear*> lora_layers(GPT& model);
// Every adapter parameter, in a fixed order (the optimizer's list).
std::vector<Param*> lora_params(const std::vector<LoraLinear*>& layers);

}  // namespace intrain
