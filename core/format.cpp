#include "core/format.h"

#include <stdexcept>
#include <string>

namespace intrain {

int dtype_size(DType t) {
  switch (t) {
    case DType::I8: return 1;
    case DType::I16: return 2;
    case DType::I32: return 4;
    case DType::I64: return 8;
    case DType::F32: return 4;
  }
  return 0;
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::I8: return "int8";
    case DType::I16: return "int16";
    case DType::I32: return "int32";
    case DType::I64: return "int64";
    case DType::F32: return "float32";
  }
  return "?";
}

Format Format::fixed(int bits, Rounding rounding, bool is_signed) {
  if (bits < 2 || bits > 16) {
    throw std::invalid_argument("Format::fixed: bits = " + std::to_string(bits) +
                                " is out of range; operand formats have 2 to 16 bits");
  }
  return Format(bits, is_signed, Scaling::SharedExponent, rounding, 0);
}

Format Format::grouped(int bits, int group_size, Rounding rounding) {
  if (bits < 2 || bits > 8) {
    throw std::invalid_argument("Format::grouped: bits = " + std::to_string(bits) +
                                " is out of range; grouped weight formats have 2 to 8 bits");
  }
  if (group_size < 1) {
    throw std::invalid_argument("Format::grouped: group size " + std::to_string(group_size) +
                                " must be positive");
  }
  return Format(bits, false, Scaling::Grouped, rounding, group_size);
}

Format Format::accumulator(int bits) {
  if (bits != 32 && bits != 64) {
    throw std::invalid_argument("Format::accumulator: bits = " + std::to_string(bits) +
                                "; accumulators have 32 or 64 bits");
  }
  return Format(bits, true, Scaling::SharedExponent, Rounding::Nearest, 0);
}

Format Format::wide(int bits, Rounding rounding) {
  if (bits < 17 || bits > 31) {
    throw std::invalid_argument("Format::wide: bits = " + std::to_string(bits) + "; wide formats have 17 to 31 bits");
  }
  return Format(bits, true, Scaling::SharedExponent, rounding, 0);
}

Format Format::fp32() { return Format(32, true, Scaling::Float, Rounding::Nearest, 0); }

std::int64_t Format::qmax() const {
  if (is_float()) throw std::logic_error("Format::qmax: fp32 has no integer range");
  if (!signed_) return (std::int64_t{1} << bits_) - 1;
  if (bits_ == 64) return INT64_MAX;
  return (std::int64_t{1} << (bits_ - 1)) - 1;
}

std::int64_t Format::qmin() const { return signed_ ? -qmax() : 0; }

DType Format::storage() const {
  if (is_float()) return DType::F32;
  // Unsigned grouped codes of up to 8 bits are kept in int8-sized storage only when
  // they fit as signed; 8-bit unsigned codes need int16.
  const int needed = signed_ ? bits_ : bits_ + 1;
  if (needed <= 8) return DType::I8;
  if (needed <= 16) return DType::I16;
  if (needed <= 32) return DType::I32;
  return DType::I64;
}

Format Format::with_rounding(Rounding r) const {
  Format f = *this;
  f.rounding_ = r;
  return f;
}

std::string Format::name() const {
  switch (scaling_) {
    case Scaling::Float: return "fp32";
    case Scaling::Grouped:
      return "uint" + std::to_string(bits_) + "-g" + std::to_string(group_size_) +
             (rounding_ == Rounding::Stochastic ? "-sr" : "");
    case Scaling::SharedExponent:
      if (bits_ == 32 || bits_ == 64) return "acc" + std::to_string(bits_);
      return std::string(signed_ ? "int" : "uint") + std::to_string(bits_) +
             (rounding_ == Rounding::Stochastic ? "-sr" : "");
  }
  return "?";
}

const char* rounding_name(Rounding r) { return r == Rounding::Nearest ? "nearest" : "stochastic"; }

Rounding parse_rounding(const std::string& s) {
  if (s == "nearest" || s == "rn") return Rounding::Nearest;
  if (s == "stochastic" || s == "sr") return Rounding::Stochastic;
  throw std::invalid_argument("unknown rounding mode '" + s + "': use 'nearest' or 'stochastic'");
}

}  // namespace intrain
