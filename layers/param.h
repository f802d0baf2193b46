// A trainable parameter: its master copy, the value the forward pass uses,
// its gradient and its optimizer state.
//
// Float mode: master, value and grad are fp32; value is a copy of master.
// Integer mode:
//   master   Format::wide(31) at a fixed exponent (kMasterExponent): the
//            optimizer's 31-bit fixed-point copy, saturating at +-64;
//   value    the run's W format for matmul weights and embeddings, or
//            residual_format() (24 bits) for biases and LayerNorm parameters,
//            re-cast from master after every update with stochastic rounding;
//   grad     an exact accumulator (acc64) summed over all uses in a step;
//   momentum Format::wide(31) at a dynamic exponent.
#pragma once

#include <string>
#include <vector>

#include "core/collective.h"
#include "core/tensor.h"

namespace intrain {

inline constexpr int kMasterExponent = -24;

enum class ParamKind { MatmulWeight, Embedding, Bias, Norm };

struct Param {
  std::string name;  // Hugging Face GPT-2 name, e.g. "h.0.attn.c_attn.weight"
  ParamKind kind = ParamKind::MatmulWeight;
  // The declared shape (set by GPT for its parameters), kept when master and
  // value are empty: a weight held as packed codes, a forward-only model
  // without masters, a model being loaded.
  Shape shape;
  Tensor master, value, grad, momentum;
  bool has_grad = false;
  // A frozen parameter takes no gradient: accumulate() drops it (LoRA and
  // LREC train adapters on a frozen base). Layers may skip computing it.
  bool frozen = false;

  bool decays() const { return kind == ParamKind::MatmulWeight; }
  // Adds g to the gradient of this step (the first call sets it); no-op when frozen.
  void accumulate(Tensor g);
  void zero_grad() { has_grad = false; grad = Tensor(); }
};

// Data-parallel training: replaces every gradient by its sum over the ranks
// of `comm` (a no-op for one rank). Integer gradients are exact accumulators,
// so the sum is exact and order-free: each rank's mantissas are brought to the
// finest exponent any rank has (exact left shifts), and a parameter whose
// sum over the ranks fits in 31 bits travels as int32, any other as int64
// (in int8 runs only the LayerNorm gains need int64). A sum that could leave int64 throws
// std::overflow_error naming the parameter, before anything is sent. Float
// gradients are summed in float (MPI's order: not bit-exact).
// Returns the payload bytes this rank sent.
std::int64_t all_reduce_gradients(std::vector<Param>& params, const Collective& comm);

}  // namespace intrain
