// The formats of one training run, one per tensor role:
//   W  weights as matmul operands
//   A  activations as matmul operands (inputs of linears, Q, K, V, attention probabilities)
//   E  errors: gradients flowing backward, as matmul operands
//   G  weight gradients, as handed to the optimizer
// In fp32 mode all four are Format::fp32() and the same engine runs in float.
#pragma once

#include <string>

#include "core/format.h"
#include "core/outliers.h"

namespace intrain {

struct Precision {
  Format w = Format::fp32(), a = Format::fp32(), e = Format::fp32(), g = Format::fp32();
  OutlierTiling tiling;  // off by default (core/outliers.h); integer formats only

  // The format in which ops write the inputs (role A) or errors (role E) of
  // the linear layers: the role's format, or its 16-bit source when that
  // role is outlier-tiled (the layer splits it).
  Format linear_a() const { return tiling.a ? Format::fixed(16, a.rounding()) : a; }
  Format linear_e() const { return tiling.e ? Format::fixed(16, e.rounding()) : e; }

  bool is_float() const { return w.is_float(); }
  // "fp32", or "w8a8e8g8" (with "-sr"/"-rn" for the rounding mode), with
  // "+tile-ae@rms:5" before the rounding suffix when outlier tiling is on.
  std::string name() const;

  // Parses "fp32", "int8", "int16", "intB" (B in 2..16) and "wXaYeZgV", each
  // optionally followed by name()'s "+tile-..." part; all
  // integer roles get `rounding`. Throws std::invalid_argument that names the
  // spelling and the accepted forms.
  static Precision parse(const std::string& spec, Rounding rounding = Rounding::Stochastic);
};

}  // namespace intrain
