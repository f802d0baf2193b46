// Tensor: a dense, row-major array of numbers together with the Format that
// says what they mean.
//
// Ownership: a Tensor owns its buffer (64-byte aligned, so AVX-512 loads of a
// row start never split a cache line). Copying a Tensor copies the data;
// moving it moves the buffer. Raw pointers from data<T>() are valid until the
// tensor is destroyed, moved from, or reshaped to a larger size.
//
// Invariants:
//   * rank is 1, 2 or 3; shape[i] >= 0; the last two dimensions are the matrix
//     (rows, cols), a leading third dimension is a batch (attention heads).
//   * the element type is format().storage(): int8/int16 for operand formats,
//     int32/int64 for accumulators, float for fp32.
//   * for Scaling::SharedExponent, real value = mantissa * 2^exponent();
//     every mantissa lies in [format().qmin(), format().qmax()].
//   * for Scaling::Grouped, real value = (q - zero[g]) * scale[g] with
//     g = flat_index / group_size; the last dimension is a multiple of the
//     group size, so a group never spans two rows.
//   * saturated() is the number of elements the operation that produced this
//     tensor had to clip to the format's range (0 for a tensor made directly).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "core/format.h"

namespace intrain {

using Shape = std::vector<std::int64_t>;
std::string shape_str(const Shape& s);

class Tensor {
 public:
  Tensor() = default;
  // Zero-filled tensor of the given shape and format.
  Tensor(Shape shape, Format format, int exponent = 0);
  // A tensor whose elements the caller overwrites before reading: no zero
  // fill (a memory-bound pass saved on every op output).
  static Tensor uninitialized(Shape shape, Format format, int exponent = 0);

  Tensor(const Tensor& other);
  Tensor& operator=(const Tensor& other);
  Tensor(Tensor&&) noexcept = default;
  Tensor& operator=(Tensor&&) noexcept = default;
  ~Tensor() = default;

  const Shape& shape() const { return shape_; }
  int rank() const { return static_cast<int>(shape_.size()); }
  std::int64_t numel() const { return numel_; }
  std::int64_t dim(int i) const;  // negative i counts from the end
  // Matrix view of the last two dims; a rank-1 tensor is one row.
  std::int64_t rows() const { return rank() >= 2 ? shape_[rank() - 2] : 1; }
  std::int64_t cols() const { return rank() >= 1 ? shape_[rank() - 1] : 0; }
  std::int64_t batch() const { return rank() == 3 ? shape_[0] : 1; }

  const Format& format() const { return format_; }
  DType dtype() const { return format_.storage(); }
  bool empty() const { return numel_ == 0; }

  int exponent() const { return exponent_; }
  void set_exponent(int e) { exponent_ = e; }

  std::int64_t saturated() const { return saturated_; }
  void set_saturated(std::int64_t n) { saturated_ = n; }

  // Group-wise scales and zero points (Scaling::Grouped only): one per group.
  std::vector<float>& group_scales() { return scales_; }
  const std::vector<float>& group_scales() const { return scales_; }
  std::vector<std::int32_t>& group_zeros() { return zeros_; }
  const std::vector<std::int32_t>& group_zeros() const { return zeros_; }
  std::int64_t num_groups() const;

  // Typed access; throws std::logic_error if T is not the storage type.
  template <class T> T* data();
  template <class T> const T* data() const;
  void* raw() { return buf_.get(); }
  const void* raw() const { return buf_.get(); }
  std::size_t nbytes() const { return static_cast<std::size_t>(numel_) * dtype_size(dtype()); }

  // Same data, new shape with the same number of elements.
  void reshape(Shape shape);

  // Mantissa i widened to int64 (slow path for tests and references).
  std::int64_t mantissa(std::int64_t i) const;
  // Real value of element i, in double (exact for every integer format).
  double value(std::int64_t i) const;

  std::string describe() const;  // "int8[4,16] e=-7"

 private:
  struct AlignedFree {
    void operator()(std::byte* p) const;
  };
  void allocate(bool zero = true);

  Shape shape_;
  std::int64_t numel_ = 0;
  Format format_ = Format::fp32();
  int exponent_ = 0;
  std::int64_t saturated_ = 0;
  std::vector<float> scales_;
  std::vector<std::int32_t> zeros_;
  std::unique_ptr<std::byte[], AlignedFree> buf_;
};

template <class T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<std::int8_t>() { return DType::I8; }
template <> constexpr DType dtype_of<std::int16_t>() { return DType::I16; }
template <> constexpr DType dtype_of<std::int32_t>() { return DType::I32; }
template <> constexpr DType dtype_of<std::int64_t>() { return DType::I64; }
template <> constexpr DType dtype_of<float>() { return DType::F32; }

void throw_dtype_mismatch(const Tensor& t, DType wanted);

template <class T> T* Tensor::data() {
  if (dtype() != dtype_of<T>()) throw_dtype_mismatch(*this, dtype_of<T>());
  return reinterpret_cast<T*>(buf_.get());
}
template <class T> const T* Tensor::data() const {
  if (dtype() != dtype_of<T>()) throw_dtype_mismatch(*this, dtype_of<T>());
  return reinterpret_cast<const T*>(buf_.get());
}

// Calls f(T* data) with the tensor's storage type. The one place that turns a
// runtime DType into a static type, so kernels are written once as templates.
// (Tn is Tensor or const Tensor: the pointer passed to f has the same constness.)
template <class Tn, class F>
  requires std::is_same_v<std::remove_const_t<Tn>, Tensor>
decltype(auto) visit_int(Tn& t, F&& f) {
  switch (t.dtype()) {
    case DType::I8: return f(t.template data<std::int8_t>());
    case DType::I16: return f(t.template data<std::int16_t>());
    case DType::I32: return f(t.template data<std::int32_t>());
    case DType::I64: return f(t.template data<std::int64_t>());
    case DType::F32: break;
  }
  throw_dtype_mismatch(t, DType::I32);
  return f(t.template data<std::int32_t>());  // not reached: the line above throws
}

}  // namespace intrain
