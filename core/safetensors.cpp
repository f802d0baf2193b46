#include "core/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>
#include <set>
#include <utility>

namespace intrain {

static_assert(std::endian::native == std::endian::little,
              "safetensors.cpp copies raw little-endian bytes; a big-endian host needs byte swapping");

namespace {

using ordered_json = nlohmann::ordered_json;

constexpr const char* kMetadataKey = "__metadata__";

std::string quoted(const std::filesystem::path& p) { return "\"" + p.string() + "\""; }

std::string errno_str(int e) { return std::strerror(e); }

// Product of the dimensions, or false on a negative dimension / overflow.
bool checked_numel(const std::vector<std::int64_t>& shape, std::uint64_t& n) {
  n = 1;
  for (auto d : shape) {
    if (d < 0) return false;
    if (__builtin_mul_overflow(n, static_cast<std::uint64_t>(d), &n)) return false;
  }
  return true;
}

// Closes a file descriptor on scope exit unless released.
struct Fd {
  int fd = -1;
  explicit Fd(int f) : fd(f) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
  int release() {
    const int f = fd;
    fd = -1;
    return f;
  }
};

// ---------------------------------------------------------------- reading

class Reader {
 public:
  explicit Reader(const std::filesystem::path& p) : path_(p) {}

  [[noreturn]] void fail(const std::string& what) const {
    throw std::runtime_error("safetensors: " + quoted(path_) + ": " + what);
  }
  [[noreturn]] void corrupt(const std::string& what) const {
    fail("not a valid safetensors file: " + what);
  }

  // Reads exactly n bytes at offset; fails on a short read (file changed under us).
  void pread_exact(int fd, void* dst, std::size_t n, std::uint64_t offset) const {
    auto* p = static_cast<char*>(dst);
    while (n > 0) {
      const ssize_t r = ::pread(fd, p, n, static_cast<off_t>(offset));
      if (r < 0) {
        if (errno == EINTR) continue;
        fail("read error: " + errno_str(errno));
      }
      if (r == 0) fail("unexpected end of file at byte " + std::to_string(offset) + " (was it truncated while reading?)");
      p += r;
      n -= static_cast<std::size_t>(r);
      offset += static_cast<std::uint64_t>(r);
    }
  }

  SafeTensorsFile read(bool with_data) const;

 private:
  std::filesystem::path path_;
};

// Detects duplicate keys in any JSON object (nlohmann keeps the last silently).
struct DuplicateKeyDetector {
  std::vector<std::set<std::string>> stack;
  std::string duplicate;  // first duplicate found, empty if none
  bool found = false;

  bool operator()(int /*depth*/, nlohmann::detail::parse_event_t event, ordered_json& parsed) {
    using E = nlohmann::detail::parse_event_t;
    switch (event) {
      case E::object_start: stack.emplace_back(); break;
      case E::object_end:
        if (!stack.empty()) stack.pop_back();
        break;
      case E::key:
        if (!stack.empty() && parsed.is_string() && !stack.back().insert(parsed.get<std::string>()).second && !found) {
          found = true;
          duplicate = parsed.get<std::string>();
        }
        break;
      default: break;
    }
    return true;
  }
};

std::string json_kind(const ordered_json& j) {
  if (j.is_number_float()) return "a non-integer number";
  if (j.is_number_unsigned()) return "a number";
  if (j.is_number_integer()) return "a negative number";
  if (j.is_object() || j.is_array()) return std::string("an ") + j.type_name();
  return std::string("a ") + j.type_name();
}

struct Entry {
  std::string name;
  SafeTensor tensor;  // data not yet read
  std::uint64_t begin = 0, end = 0;
};

SafeTensorsFile Reader::read(bool with_data) const {
  std::error_code ec;
  const auto st = std::filesystem::status(path_, ec);
  if (ec && ec != std::errc::no_such_file_or_directory) fail("cannot access: " + ec.message());
  if (!std::filesystem::exists(st)) fail("no such file");
  if (std::filesystem::is_directory(st)) fail("is a directory, not a safetensors file");

  const int raw_fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
  if (raw_fd < 0) fail("cannot open: " + errno_str(errno));
  Fd fd(raw_fd);
  struct stat sb{};
  if (::fstat(fd.fd, &sb) != 0) fail("cannot stat: " + errno_str(errno));
  if (!S_ISREG(sb.st_mode)) fail("is not a regular file");
  const auto file_size = static_cast<std::uint64_t>(sb.st_size);

  if (file_size < 8) {
    corrupt("the file is " + std::to_string(file_size) +
            " bytes, shorter than the 8-byte header length that starts every safetensors file");
  }
  unsigned char len_bytes[8];
  pread_exact(fd.fd, len_bytes, 8, 0);
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = n << 8 | len_bytes[i];
  if (n == 0) corrupt("the header length (first 8 bytes) is 0");
  if (n > kMaxHeaderBytes) {
    corrupt("the header length " + std::to_string(n) + " (first 8 bytes, little-endian) is absurd: more than " +
            std::to_string(kMaxHeaderBytes) + " bytes");
  }
  if (n > file_size - 8) {
    corrupt("the header length " + std::to_string(n) + " is larger than the " + std::to_string(file_size - 8) +
            " bytes that follow it (file size " + std::to_string(file_size) + "): truncated?");
  }
  std::string header_text(static_cast<std::size_t>(n), '\0');
  pread_exact(fd.fd, header_text.data(), header_text.size(), 8);

  // nlohmann's lexer takes a NUL byte for the end of input; JSON never contains one.
  if (const auto nul = header_text.find('\0'); nul != std::string::npos) {
    corrupt("the header is not valid JSON: it contains a NUL byte at header offset " + std::to_string(nul));
  }
  DuplicateKeyDetector dup;
  ordered_json header;
  try {
    header = ordered_json::parse(header_text, std::ref(dup));
  } catch (const ordered_json::exception& e) {
    corrupt("the header is not valid JSON: " + std::string(e.what()));
  }
  if (dup.found) corrupt("the header has the key \"" + dup.duplicate + "\" twice");
  if (!header.is_object()) corrupt("the header is " + json_kind(header) + ", not a JSON object");

  const std::uint64_t data_size = file_size - 8 - n;
  SafeTensorsFile out;
  out.source = path_;
  std::vector<Entry> entries;

  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const ordered_json& v = it.value();
    if (name == kMetadataKey) {
      if (!v.is_object()) corrupt("\"__metadata__\" is " + json_kind(v) + ", not an object of strings");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string()) {
          corrupt("\"__metadata__\" entry \"" + m.key() + "\" is " + json_kind(m.value()) + ", not a string");
        }
        out.metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string where = "tensor \"" + name + "\"";
    if (!v.is_object()) corrupt(where + " is " + json_kind(v) + ", not an object");
    for (const char* key : {"dtype", "shape", "data_offsets"}) {
      if (!v.contains(key)) corrupt(where + " has no \"" + key + "\"");
    }
    for (auto k = v.begin(); k != v.end(); ++k) {
      if (k.key() != "dtype" && k.key() != "shape" && k.key() != "data_offsets") {
        corrupt(where + " has an unknown key \"" + k.key() + "\" (expected dtype, shape, data_offsets)");
      }
    }
    Entry e;
    e.name = name;
    const auto& dt = v["dtype"];
    if (!dt.is_string()) corrupt(where + ": dtype is " + json_kind(dt) + ", not a string");
    e.tensor.dtype = dt.get<std::string>();
    const std::size_t esize = safetensors_dtype_size(e.tensor.dtype);
    if (esize == 0) {
      corrupt(where + " has the unsupported dtype \"" + e.tensor.dtype + "\" (supported: F32, I8, I16, I32, I64, U8)");
    }
    const auto& sh = v["shape"];
    if (!sh.is_array()) corrupt(where + ": shape is " + json_kind(sh) + ", not an array");
    for (const auto& d : sh) {
      if (!d.is_number_unsigned()) {
        corrupt(where + ": shape " + sh.dump() + " has an element that is " + json_kind(d) +
                ", not a non-negative integer");
      }
      const auto du = d.get<std::uint64_t>();
      if (du > static_cast<std::uint64_t>(INT64_MAX)) corrupt(where + ": shape " + sh.dump() + " is too large");
      e.tensor.shape.push_back(static_cast<std::int64_t>(du));
    }
    const auto& off = v["data_offsets"];
    if (!off.is_array() || off.size() != 2) corrupt(where + ": data_offsets " + off.dump() + " is not [begin, end]");
    for (const auto& o : off) {
      if (!o.is_number_unsigned()) {
        corrupt(where + ": data_offsets " + off.dump() + " has an element that is " + json_kind(o) +
                ", not a non-negative integer");
      }
    }
    e.begin = off[0].get<std::uint64_t>();
    e.end = off[1].get<std::uint64_t>();
    if (e.begin > e.end) corrupt(where + ": data_offsets " + off.dump() + " ends before it begins");
    if (e.end > data_size) {
      corrupt(where + ": data_offsets " + off.dump() + " reach past the end of the data section (" +
              std::to_string(data_size) + " bytes): truncated?");
    }
    std::uint64_t numel = 0, bytes = 0;
    if (!checked_numel(e.tensor.shape, numel) || __builtin_mul_overflow(numel, esize, &bytes)) {
      corrupt(where + ": shape " + sh.dump() + " overflows");
    }
    if (bytes != e.end - e.begin) {
      corrupt(where + ": data_offsets " + off.dump() + " hold " + std::to_string(e.end - e.begin) +
              " bytes, but shape " + sh.dump() + " of " + e.tensor.dtype + " needs " + std::to_string(bytes));
    }
    entries.push_back(std::move(e));
  }

  // The tensors, sorted by offset, must tile the data section exactly.
  std::vector<const Entry*> by_offset;
  for (const auto& e : entries) by_offset.push_back(&e);
  std::stable_sort(by_offset.begin(), by_offset.end(), [](const Entry* a, const Entry* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  std::uint64_t expected = 0;
  const Entry* prev = nullptr;
  for (const Entry* e : by_offset) {
    if (e->begin < expected) {
      corrupt("tensor \"" + e->name + "\" at bytes [" + std::to_string(e->begin) + ", " + std::to_string(e->end) +
              ") overlaps tensor \"" + prev->name + "\" at [" + std::to_string(prev->begin) + ", " +
              std::to_string(prev->end) + ")");
    }
    if (e->begin > expected) {
      corrupt("gap in the data section: bytes [" + std::to_string(expected) + ", " + std::to_string(e->begin) +
              ") belong to no tensor (the next tensor is \"" + e->name + "\")");
    }
    expected = e->end;
    prev = e;
  }
  if (expected != data_size) {
    corrupt("the data section has " + std::to_string(data_size - expected) +
            " trailing bytes after the last tensor (it ends at " + std::to_string(expected) + " of " +
            std::to_string(data_size) + ")");
  }

  const std::uint64_t data_start = 8 + n;
  out.tensors.reserve(entries.size());
  out.file_offsets.reserve(entries.size());
  for (auto& e : entries) {
    if (with_data) {
      e.tensor.data.resize(static_cast<std::size_t>(e.end - e.begin));
      if (!e.tensor.data.empty()) pread_exact(fd.fd, e.tensor.data.data(), e.tensor.data.size(), data_start + e.begin);
    }
    out.tensors.emplace_back(std::move(e.name), std::move(e.tensor));
    out.file_offsets.push_back(data_start + e.begin);
  }
  return out;
}

// ---------------------------------------------------------------- writing

void write_all(int fd, const void* src, std::size_t n, const std::string& tmp) {
  const auto* p = static_cast<const char*>(src);
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      throw std::runtime_error("write to \"" + tmp + "\" failed: " + errno_str(errno));
    }
    p += w;
    n -= static_cast<std::size_t>(w);
  }
}

}  // namespace

// ---------------------------------------------------------------- public

std::size_t safetensors_dtype_size(const std::string& dtype) {
  if (dtype == "F32" || dtype == "I32") return 4;
  if (dtype == "I8" || dtype == "U8") return 1;
  if (dtype == "I16") return 2;
  if (dtype == "I64") return 8;
  return 0;
}

std::int64_t SafeTensor::numel() const {
  std::uint64_t n = 0;
  if (!checked_numel(shape, n) || n > static_cast<std::uint64_t>(INT64_MAX)) {
    throw std::invalid_argument("SafeTensor: shape " + shape_str(shape) + " has a negative dimension or overflows");
  }
  return static_cast<std::int64_t>(n);
}

const SafeTensor* SafeTensorsFile::find(const std::string& name) const {
  for (const auto& [n, t] : tensors) {
    if (n == name) return &t;
  }
  return nullptr;
}

SafeTensor* SafeTensorsFile::find(const std::string& name) {
  return const_cast<SafeTensor*>(std::as_const(*this).find(name));
}

const SafeTensor& SafeTensorsFile::at(const std::string& name) const {
  if (const SafeTensor* t = find(name)) return *t;
  std::string msg = "safetensors: no tensor \"" + name + "\" in " +
                    (source.empty() ? std::string("this SafeTensorsFile") : quoted(source)) + " (it has " +
                    std::to_string(tensors.size()) + " tensor" + (tensors.size() == 1 ? "" : "s");
  for (std::size_t i = 0; i < tensors.size() && i < 20; ++i) msg += (i ? ", " : ": ") + tensors[i].first;
  if (tensors.size() > 20) msg += ", ...";
  throw std::runtime_error(msg + ")");
}

void SafeTensorsFile::add(std::string name, SafeTensor t) {
  if (contains(name)) throw std::invalid_argument("SafeTensorsFile::add: tensor \"" + name + "\" already present");
  tensors.emplace_back(std::move(name), std::move(t));
}

SafeTensorsFile read_safetensors(const std::filesystem::path& path) { return Reader(path).read(true); }

SafeTensorsFile read_safetensors_header(const std::filesystem::path& path) { return Reader(path).read(false); }

void load_tensor_data(SafeTensorsFile& f, const std::string& name) {
  for (std::size_t i = 0; i < f.tensors.size(); ++i) {
    SafeTensor& t = f.tensors[i].second;
    if (f.tensors[i].first != name) continue;
    const std::size_t bytes = static_cast<std::size_t>(t.numel()) * safetensors_dtype_size(t.dtype);
    if (t.data.size() == bytes) return;
    if (i >= f.file_offsets.size()) throw std::runtime_error("load_tensor_data: \"" + name + "\" has no file offset");
    const Reader r(f.source);
    const int raw_fd = ::open(f.source.c_str(), O_RDONLY | O_CLOEXEC);
    if (raw_fd < 0) r.fail("cannot open: " + errno_str(errno));
    Fd fd(raw_fd);
    t.data.resize(bytes);
    r.pread_exact(fd.fd, t.data.data(), bytes, f.file_offsets[i]);
    return;
  }
  f.at(name);  // throws, listing the tensors the file has
}

void write_safetensors(const std::filesystem::path& path, const SafeTensorsFile& file) {
  const std::string prefix = "write_safetensors(" + quoted(path) + "): ";
  // 1. Validate and build the header; nothing touches the disk yet.
  ordered_json header = ordered_json::object();
  if (!file.metadata.empty()) {
    ordered_json meta = ordered_json::object();
    for (const auto& [k, v] : file.metadata) meta[k] = v;
    header[kMetadataKey] = std::move(meta);
  }
  std::set<std::string> names;
  std::uint64_t offset = 0;
  for (const auto& [name, t] : file.tensors) {
    const std::string where = "tensor \"" + name + "\"";
    if (name.empty()) throw std::invalid_argument(prefix + "a tensor has an empty name");
    if (name == kMetadataKey) throw std::invalid_argument(prefix + "\"__metadata__\" is reserved, not a tensor name");
    if (!names.insert(name).second) throw std::invalid_argument(prefix + where + " appears twice");
    const std::size_t esize = safetensors_dtype_size(t.dtype);
    if (esize == 0) {
      throw std::invalid_argument(prefix + where + " has the unsupported dtype \"" + t.dtype +
                                  "\" (supported: F32, I8, I16, I32, I64, U8)");
    }
    std::uint64_t numel = 0, bytes = 0;
    if (!checked_numel(t.shape, numel) || __builtin_mul_overflow(numel, esize, &bytes)) {
      throw std::invalid_argument(prefix + where + " has the invalid shape " + shape_str(t.shape));
    }
    if (bytes != t.data.size()) {
      throw std::invalid_argument(prefix + where + " of shape " + shape_str(t.shape) + " and dtype " + t.dtype +
                                  " needs " + std::to_string(bytes) + " bytes of data, has " +
                                  std::to_string(t.data.size()));
    }
    ordered_json entry = ordered_json::object();
    entry["dtype"] = t.dtype;
    entry["shape"] = t.shape;
    entry["data_offsets"] = {offset, offset + bytes};
    header[name] = std::move(entry);
    offset += bytes;
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const ordered_json::exception& e) {
    throw std::invalid_argument(prefix + "cannot encode the header (names and metadata must be UTF-8): " + e.what());
  }
  text.append((8 - text.size() % 8) % 8, ' ');
  unsigned char len_bytes[8];
  for (int i = 0; i < 8; ++i) len_bytes[i] = static_cast<unsigned char>(static_cast<std::uint64_t>(text.size()) >> (8 * i));

  // 2. Write a temporary file next to the target, fsync, rename over it.
  const std::string tmp = path.string() + ".tmp." + std::to_string(::getpid());
  const int raw_fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (raw_fd < 0) throw std::runtime_error(prefix + "cannot create \"" + tmp + "\": " + errno_str(errno));
  Fd fd(raw_fd);
  try {
    write_all(fd.fd, len_bytes, 8, tmp);
    write_all(fd.fd, text.data(), text.size(), tmp);
    for (const auto& [name, t] : file.tensors) write_all(fd.fd, t.data.data(), t.data.size(), tmp);
    if (::fsync(fd.fd) != 0) throw std::runtime_error("fsync of \"" + tmp + "\" failed: " + errno_str(errno));
    if (::close(fd.release()) != 0) throw std::runtime_error("close of \"" + tmp + "\" failed: " + errno_str(errno));
    if (::rename(tmp.c_str(), path.c_str()) != 0) {
      throw std::runtime_error("cannot rename \"" + tmp + "\" to " + quoted(path) + ": " + errno_str(errno));
    }
  } catch (const std::exception& e) {
    if (fd.fd >= 0) ::close(fd.release());
    ::unlink(tmp.c_str());
    throw std::runtime_error(prefix + e.what());
  }
  // 3. Make the rename durable (best effort: the new file is already in place).
  const auto dir = path.parent_path().empty() ? std::filesystem::path(".") : path.parent_path();
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    (void)::fsync(dfd);
    ::close(dfd);
  }
}

// ---------------------------------------------------------------- Tensor conversion

const char* safetensors_dtype(DType t) {
  switch (t) {
    case DType::I8: return "I8";
    case DType::I16: return "I16";
    case DType::I32: return "I32";
    case DType::I64: return "I64";
    case DType::F32: return "F32";
  }
  throw std::invalid_argument("safetensors_dtype: unknown DType");
}

SafeTensor to_safetensor(const Tensor& t) {
  SafeTensor s;
  s.dtype = safetensors_dtype(t.dtype());
  s.shape = t.shape();
  s.data.resize(t.nbytes());
  if (t.nbytes()) std::memcpy(s.data.data(), t.raw(), t.nbytes());
  return s;
}

Tensor from_safetensor(const SafeTensor& st, const Format& format, int exponent) {
  const std::string want = safetensors_dtype(format.storage());
  const std::string what = "from_safetensor: a " + st.dtype + shape_str(st.shape) + " tensor ";
  if (st.dtype != want) {
    throw std::runtime_error(what + "cannot hold format " + format.name() + ", whose storage is " + want);
  }
  if (st.shape.empty() || st.shape.size() > 3) {
    throw std::runtime_error(what + "has rank " + std::to_string(st.shape.size()) + "; a Tensor has rank 1, 2 or 3");
  }
  std::uint64_t numel = 0;
  if (!checked_numel(st.shape, numel) || numel * safetensors_dtype_size(st.dtype) != st.data.size()) {
    throw std::runtime_error(what + "has " + std::to_string(st.data.size()) + " bytes of data, not matching its shape");
  }
  Tensor t(st.shape, format, exponent);
  if (t.nbytes()) std::memcpy(t.raw(), st.data.data(), t.nbytes());
  if (format.is_integer()) {
    const std::int64_t lo = format.qmin(), hi = format.qmax();
    visit_int(static_cast<const Tensor&>(t), [&](const auto* p) {
      for (std::int64_t i = 0; i < t.numel(); ++i) {
        const auto v = static_cast<std::int64_t>(p[i]);
        if (v < lo || v > hi) {
          throw std::runtime_error(what + "has the mantissa " + std::to_string(v) + " at index " + std::to_string(i) +
                                   ", outside the range [" + std::to_string(lo) + ", " + std::to_string(hi) +
                                   "] of format " + format.name());
        }
      }
    });
  }
  return t;
}

}  // namespace intrain
