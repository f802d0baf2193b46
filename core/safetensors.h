// Reading and writing the safetensors format (https://github.com/huggingface/safetensors).
//
// File layout (all integers little-endian; this code assumes a little-endian host):
//   bytes [0, 8)        N, the header length, as an unsigned 64-bit integer
//   bytes [8, 8+N)      the header: a UTF-8 JSON object
//                         {"__metadata__": {"key": "value", ...},          (optional)
//                          "name": {"dtype": "F32", "shape": [2, 3],
//                                   "data_offsets": [begin, end]}, ...}
//                       padded at the end with spaces (0x20).
//   bytes [8+N, EOF)    the data section: every tensor's raw elements, row-major,
//                       at [begin, end) relative to the start of the data section.
//
// What write_safetensors() produces:
//   * "__metadata__" first (only when metadata is non-empty), then the tensors in
//     the order of SafeTensorsFile::tensors, each entry's keys in the order
//     dtype, shape, data_offsets; compact JSON (no spaces outside strings).
//   * N is a multiple of 8, so the data section starts 8-byte aligned.
//   * tensors are stored contiguously, in header order, without gaps:
//     the first begins at 0, each begins where the previous ended, and the last
//     ends at the end of the file.
//   * the write is atomic: the bytes go to "<path>.tmp.<pid>", which is fsync'ed
//     and renamed over `path` (then the directory is fsync'ed, best effort). On any error the
//     temporary file is removed and an exception is thrown; an existing file at
//     `path` is left untouched. The new file gets mode 0644 (less the umask).
//     Two threads of one process must not write the same path at once (they
//     would share the temporary name).
//
// What read_safetensors() accepts (anything else throws std::runtime_error whose
// message names the file and says what is wrong; a corrupt file never makes it
// read out of bounds):
//   * a file of at least 8 bytes; 0 < N <= 100 MB (kMaxHeaderBytes) and
//     8 + N <= file size;
//   * a header that is one JSON object (trailing spaces allowed), no duplicate
//     keys; "__metadata__", if present, maps strings to strings;
//   * every other entry an object with exactly the keys dtype, shape,
//     data_offsets; dtype one of F32, I8, I16, I32, I64, U8 (other safetensors
//     dtypes such as F16/BF16 are rejected as unsupported); shape an array of
//     non-negative integers (empty = scalar, one element); data_offsets two
//     integers with begin <= end and end - begin == numel(shape) * dtype size;
//   * the tensors, sorted by begin, tile the data section exactly: no overlap, no
//     gap, no trailing bytes. (The header order need not equal the data order,
//     so files from other writers that order entries differently are read too;
//     SafeTensorsFile::tensors keeps the header order.)
//   * N need not be a multiple of 8 when reading (the data is copied out).
//
// Storing intrain Tensors: to_safetensor()/from_safetensor() convert the stored
// elements only (floats for fp32, integer mantissas for fixed-point/grouped
// formats; dtypes F32/I8/I16/I32/I64 follow Format::storage()). The Format, the
// shared exponent of a fixed-point tensor, and the group scales/zero points of
// a grouped tensor are NOT part of a SafeTensor: they are the caller's business
// (e.g. metadata {"w.exponent": "-7", "w.format": "int8"}, or separate F32/I32
// tensors for group scales and zero points).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <span>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"

namespace intrain {

// Largest header read_safetensors() accepts (the reference implementation's limit).
inline constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;

// Size in bytes of one element of a safetensors dtype ("F32" -> 4, "U8" -> 1);
// 0 if the dtype is not one of the supported F32, I8, I16, I32, I64, U8.
std::size_t safetensors_dtype_size(const std::string& dtype);

// The safetensors dtype string of a C++ element type.
template <class T> constexpr const char* safetensors_dtype_of();
template <> constexpr const char* safetensors_dtype_of<float>() { return "F32"; }
template <> constexpr const char* safetensors_dtype_of<std::int8_t>() { return "I8"; }
template <> constexpr const char* safetensors_dtype_of<std::int16_t>() { return "I16"; }
template <> constexpr const char* safetensors_dtype_of<std::int32_t>() { return "I32"; }
template <> constexpr const char* safetensors_dtype_of<std::int64_t>() { return "I64"; }
template <> constexpr const char* safetensors_dtype_of<std::uint8_t>() { return "U8"; }

// One tensor as stored in a file: raw little-endian bytes.
// Invariant checked by write_safetensors() and guaranteed by read_safetensors():
//   dtype is supported, every shape[i] >= 0, data.size() == numel() * element size.
struct SafeTensor {
  std::string dtype;
  std::vector<std::int64_t> shape;
  std::vector<std::byte> data;

  // Product of the shape (1 for a scalar, shape == {}). Throws std::invalid_argument
  // on a negative dimension or on overflow.
  std::int64_t numel() const;

  // Builds a tensor from typed values; throws std::invalid_argument if
  // values.size() != numel(shape).
  template <class T> static SafeTensor from_values(std::vector<std::int64_t> shape, std::span<const T> values);
  template <class T> static SafeTensor from_values(std::vector<std::int64_t> shape, const std::vector<T>& values) {
    return from_values<T>(std::move(shape), std::span<const T>(values));
  }
  // The elements as T; throws std::invalid_argument if dtype is not T's dtype
  // or the data size is not a whole number of elements.
  template <class T> std::vector<T> values() const;
};

// A whole file: string metadata and named tensors in header order.
struct SafeTensorsFile {
  std::map<std::string, std::string> metadata;
  std::vector<std::pair<std::string, SafeTensor>> tensors;  // order preserved
  // The file this was read from (set by read_safetensors; used in error messages).
  std::filesystem::path source;
  // Where each tensor's data starts in `source` (parallel to `tensors`; set by
  // both readers, used by load_tensor_data).
  std::vector<std::uint64_t> file_offsets;

  bool contains(const std::string& name) const { return find(name) != nullptr; }
  // nullptr if there is no tensor of that name.
  const SafeTensor* find(const std::string& name) const;
  SafeTensor* find(const std::string& name);
  // Throws std::runtime_error naming the file and listing the tensors it has.
  const SafeTensor& at(const std::string& name) const;
  // Appends a tensor; throws std::invalid_argument if the name is already present.
  void add(std::string name, SafeTensor t);
};

// Writes atomically (see the top of this file). Throws std::invalid_argument if
// `file` breaks an invariant (empty, duplicate or "__metadata__" tensor name,
// unsupported dtype, negative dimension, data size not numel * element size,
// a string that is not valid UTF-8) before any file is created, and
// std::runtime_error (naming the path and the OS error) if the I/O fails.
void write_safetensors(const std::filesystem::path& path, const SafeTensorsFile& file);

// Reads and validates a whole file (see the top of this file for the rules).
SafeTensorsFile read_safetensors(const std::filesystem::path& path);

// Reads and validates the header only, with the same rules: every tensor has
// its dtype and shape and empty data. load_tensor_data() then reads one
// tensor at a time, so a loader never holds the whole file beside what it
// builds from it.
SafeTensorsFile read_safetensors_header(const std::filesystem::path& path);
// Reads the data of tensor `name` (of a file from read_safetensors_header)
// from f.source; no-op if it is already read. Throws std::runtime_error
// naming the file if there is no such tensor or the read falls short (the
// file changed since its header was read).
void load_tensor_data(SafeTensorsFile& f, const std::string& name);

// The safetensors dtype that holds a storage type: F32, I8, I16, I32, I64.
const char* safetensors_dtype(DType t);

// Copies a tensor's stored elements (floats or integer mantissas) and shape.
// Format, exponent and group scales/zeros are not stored (see above).
SafeTensor to_safetensor(const Tensor& t);

// Builds a Tensor of `format` from a SafeTensor. Throws std::runtime_error if the
// dtype is not safetensors_dtype(format.storage()), the rank is not 1..3, the
// data size is wrong, or (integer formats) a mantissa lies outside
// [format.qmin(), format.qmax()]. For a grouped format the group scales and
// zero points are left at 1 and 0: set them from wherever the caller stored them.
Tensor from_safetensor(const SafeTensor& st, const Format& format, int exponent = 0);

// ---- implementation of the templates ----

template <class T> SafeTensor SafeTensor::from_values(std::vector<std::int64_t> shape, std::span<const T> values) {
  SafeTensor t;
  t.dtype = safetensors_dtype_of<T>();
  t.shape = std::move(shape);
  const std::int64_t n = t.numel();
  if (static_cast<std::uint64_t>(n) != values.size()) {
    throw std::invalid_argument("SafeTensor::from_values: shape has " + std::to_string(n) + " elements, got " +
                                std::to_string(values.size()) + " values");
  }
  t.data.resize(values.size_bytes());
  if (!values.empty()) std::memcpy(t.data.data(), values.data(), values.size_bytes());
  return t;
}

template <class T> std::vector<T> SafeTensor::values() const {
  if (dtype != safetensors_dtype_of<T>()) {
    throw std::invalid_argument(std::string("SafeTensor::values: asked for ") + safetensors_dtype_of<T>() +
                                " values of a " + dtype + " tensor");
  }
  if (data.size() % sizeof(T) != 0) {
    throw std::invalid_argument("SafeTensor::values: " + std::to_string(data.size()) +
                                " bytes is not a whole number of " + dtype + " elements");
  }
  std::vector<T> v(data.size() / sizeof(T));
  if (!v.empty()) std::memcpy(v.data(), data.data(), data.size());
  return v;
}

}  // namespace intrain
