#include "core/tensor.h"

#include <cmath>
#include <cstdlib>
#include <malloc.h>
#include <cstring>
#include <new>
#include <stdexcept>

namespace intrain {

std::string shape_str(const Shape& s) {
  std::string r = "[";
  for (std::size_t i = 0; i < s.size(); ++i) r += (i ? "," : "") + std::to_string(s[i]);
  return r + "]";
}

void Tensor::AlignedFree::operator()(std::byte* p) const { std::free(p); }

static std::int64_t checked_numel(const Shape& shape) {
  if (shape.empty() || shape.size() > 3) {
    throw std::invalid_argument("Tensor: rank " + std::to_string(shape.size()) + " of shape " + shape_str(shape) +
                                " is not supported; use rank 1, 2 or 3");
  }
  std::int64_t n = 1;
  for (auto d : shape) {
    if (d < 0) throw std::invalid_argument("Tensor: negative dimension in shape " + shape_str(shape));
    if (__builtin_mul_overflow(n, d, &n) || n > (std::int64_t{1} << 48)) {
      throw std::invalid_argument("Tensor: shape " + shape_str(shape) + " has more than 2^48 elements");
    }
  }
  return n;
}

Tensor::Tensor(Shape shape, Format format, int exponent)
    : shape_(std::move(shape)), numel_(checked_numel(shape_)), format_(format), exponent_(exponent) {
  if (format_.scaling() == Scaling::Grouped) {
    if (cols() % format_.group_size() != 0) {
      throw std::invalid_argument("Tensor: last dimension " + std::to_string(cols()) +
                                  " is not a multiple of the group size " + std::to_string(format_.group_size()));
    }
    scales_.assign(static_cast<std::size_t>(num_groups()), 1.0f);
    zeros_.assign(static_cast<std::size_t>(num_groups()), 0);
  }
  allocate();
}

// Large tensors are made and freed at every op. glibc serves big blocks with
// mmap and returns them at free, so every new tensor would page-fault its
// memory back in. Raising the mmap and trim thresholds keeps freed blocks in
// the heap for reuse.
namespace {
const bool kHeapTuned = [] {
  mallopt(M_MMAP_THRESHOLD, 1 << 30);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
  return true;
}();
}  // namespace

Tensor Tensor::uninitialized(Shape shape, Format format, int exponent) {
  Tensor t;
  t.shape_ = std::move(shape);
  t.numel_ = checked_numel(t.shape_);
  t.format_ = format;
  t.exponent_ = exponent;
  if (format.scaling() == Scaling::Grouped) return Tensor(t.shape_, format, exponent);
  t.allocate(false);
  return t;
}

void Tensor::allocate(bool zero) {
  const std::size_t bytes = nbytes();
  if (bytes == 0) {
    buf_.reset();
    return;
  }
  const std::size_t rounded = (bytes + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, rounded);
  if (!p) throw std::bad_alloc();
  if (zero) std::memset(p, 0, rounded);
  buf_.reset(static_cast<std::byte*>(p));
}

Tensor::Tensor(const Tensor& o)
    : shape_(o.shape_), numel_(o.numel_), format_(o.format_), exponent_(o.exponent_), saturated_(o.saturated_),
      scales_(o.scales_), zeros_(o.zeros_) {
  allocate(false);
  if (nbytes()) std::memcpy(buf_.get(), o.buf_.get(), nbytes());
}

Tensor& Tensor::operator=(const Tensor& o) {
  if (this != &o) {
    Tensor copy(o);
    *this = std::move(copy);
  }
  return *this;
}

std::int64_t Tensor::dim(int i) const {
  const int r = rank();
  const int j = i < 0 ? r + i : i;
  if (j < 0 || j >= r) throw std::out_of_range("Tensor::dim(" + std::to_string(i) + ") of " + describe());
  return shape_[static_cast<std::size_t>(j)];
}

std::int64_t Tensor::num_groups() const {
  return format_.scaling() == Scaling::Grouped ? numel_ / format_.group_size() : 0;
}

void Tensor::reshape(Shape shape) {
  const std::int64_t n = checked_numel(shape);
  if (n != numel_) {
    throw std::invalid_argument("Tensor::reshape: " + shape_str(shape_) + " has " + std::to_string(numel_) +
                                " elements, " + shape_str(shape) + " has " + std::to_string(n));
  }
  shape_ = std::move(shape);
}

void throw_dtype_mismatch(const Tensor& t, DType wanted) {
  throw std::logic_error(std::string("Tensor: asked for ") + dtype_name(wanted) + " data of " + t.describe());
}

std::int64_t Tensor::mantissa(std::int64_t i) const {
  return visit_int(*this, [&](const auto* p) { return static_cast<std::int64_t>(p[i]); });
}

double Tensor::value(std::int64_t i) const {
  switch (format_.scaling()) {
    case Scaling::Float: return data<float>()[i];
    case Scaling::SharedExponent: return std::ldexp(static_cast<double>(mantissa(i)), exponent_);
    case Scaling::Grouped: {
      const auto g = static_cast<std::size_t>(i / format_.group_size());
      return static_cast<double>(mantissa(i) - zeros_[g]) * scales_[g];
    }
  }
  return 0.0;
}

std::string Tensor::describe() const {
  std::string s = format_.name() + shape_str(shape_);
  if (format_.scaling() == Scaling::SharedExponent) s += " e=" + std::to_string(exponent_);
  return s;
}

}  // namespace intrain
