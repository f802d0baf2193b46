#include "experiments/corpus.h"

#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

#include "core/rng.h"

namespace intrain {

namespace {

namespace fs = std::filesystem;

constexpr const char* kBibleRange = "Gen1:1-Rev22:21";
constexpr const char* kInstallHint = "run ./scripts/setup.sh (or: apt-get install bible-kjv), or pass --data FILE";
// Separates the sampler's random stream from every other use of the same seed.
constexpr std::uint64_t kSamplerTag = 0x636F72707573ull;  // "corpus"

std::string quoted(const fs::path& p) { return "\"" + p.string() + "\""; }

[[noreturn]] void data_error(const fs::path& p, const std::string& what) {
  throw std::runtime_error("--data " + quoted(p) + ": " + what);
}

// Reads a whole regular file; errors name the file and say what to do.
std::vector<std::uint8_t> read_data_file(const fs::path& p) {
  std::error_code ec;
  const auto st = fs::status(p, ec);
  if (ec && ec != std::errc::no_such_file_or_directory) {
    data_error(p, "cannot access it: " + ec.message() + "; check the path and its permissions");
  }
  if (!fs::exists(st)) data_error(p, "no such file; pass the path of an existing text file");
  if (fs::is_directory(st)) data_error(p, "is a directory; pass a text file");
  if (!fs::is_regular_file(st)) data_error(p, "is not a regular file; pass a text file");
  std::FILE* f = std::fopen(p.c_str(), "rb");
  if (!f) data_error(p, std::string("cannot open it: ") + std::strerror(errno) + "; check that it is readable");
  std::vector<std::uint8_t> bytes;
  std::uint8_t buf[1 << 16];
  for (;;) {
    const std::size_t got = std::fread(buf, 1, sizeof buf, f);
    bytes.insert(bytes.end(), buf, buf + got);
    if (got < sizeof buf) break;
  }
  const bool failed = std::ferror(f) != 0;
  const int err = errno;
  std::fclose(f);
  if (failed) data_error(p, std::string("read error: ") + std::strerror(err) + "; check that it is readable");
  return bytes;
}

// Length of the well-formed UTF-8 sequence starting at s[i], or 0 if ill-formed.
std::size_t utf8_sequence_length(std::span<const std::uint8_t> s, std::size_t i) {
  const std::uint8_t b = s[i];
  const std::size_t left = s.size() - i;
  auto cont = [&](std::size_t k, std::uint8_t lo = 0x80, std::uint8_t hi = 0xBF) {
    return k < left && s[i + k] >= lo && s[i + k] <= hi;
  };
  if (b < 0x80) return 1;
  if (b >= 0xC2 && b <= 0xDF) return cont(1) ? 2 : 0;
  if (b == 0xE0) return cont(1, 0xA0) && cont(2) ? 3 : 0;
  if ((b >= 0xE1 && b <= 0xEC) || b == 0xEE || b == 0xEF) return cont(1) && cont(2) ? 3 : 0;
  if (b == 0xED) return cont(1, 0x80, 0x9F) && cont(2) ? 3 : 0;  // no surrogates
  if (b == 0xF0) return cont(1, 0x90) && cont(2) && cont(3) ? 4 : 0;
  if (b >= 0xF1 && b <= 0xF3) return cont(1) && cont(2) && cont(3) ? 4 : 0;
  if (b == 0xF4) return cont(1, 0x80, 0x8F) && cont(2) && cont(3) ? 4 : 0;  // <= U+10FFFF
  return 0;
}

bool executable_file(const fs::path& p) {
  struct stat sb{};
  return ::stat(p.c_str(), &sb) == 0 && S_ISREG(sb.st_mode) && ::access(p.c_str(), X_OK) == 0;
}

std::string shell_quote(const std::string& s) {
  std::string r = "'";
  for (char c : s) r += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return r + "'";
}

// Does a cached text look like the stripped KJV?
bool plausible_kjv(const std::string& t) {
  static const std::string head = "In the beginning", tail = "Amen.\n";
  return t.size() > head.size() + tail.size() && t.compare(0, head.size(), head) == 0 &&
         t.compare(t.size() - tail.size(), tail.size(), tail) == 0;
}

std::string run_bible(const fs::path& bible) {
  const std::string cmd = shell_quote(bible.string()) + " -f '" + kBibleRange + "' </dev/null 2>&1";
  std::FILE* pipe = ::popen(cmd.c_str(), "r");
  if (!pipe) throw std::runtime_error("corpus: cannot run " + cmd + ": " + std::strerror(errno));
  std::string out;
  char buf[1 << 16];
  std::size_t got = 0;
  while ((got = std::fread(buf, 1, sizeof buf, pipe)) > 0) out.append(buf, got);
  const int status = ::pclose(pipe);
  if (status == -1 || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    throw std::runtime_error("corpus: `" + cmd + "` failed (status " + std::to_string(status) + "): " +
                             out.substr(0, 300) + "; " + kInstallHint);
  }
  return out;
}

}  // namespace

// ---------------------------------------------------------------- KJV

fs::path kjv_cache_path() {
  const char* xdg = std::getenv("XDG_CACHE_HOME");
  if (xdg && *xdg && fs::path(xdg).is_absolute()) return fs::path(xdg) / "intrain" / "kjv.txt";
  const char* home = std::getenv("HOME");
  if (home && *home) return fs::path(home) / ".cache" / "intrain" / "kjv.txt";
  return fs::temp_directory_path() / "intrain-cache" / "kjv.txt";
}

std::optional<fs::path> find_bible_program() {
  const char* env = std::getenv("PATH");
  const std::string path = env ? env : "/usr/local/bin:/usr/bin:/bin";
  std::size_t start = 0;
  while (start <= path.size()) {
    const std::size_t end = std::min(path.find(':', start), path.size());
    const std::string dir = path.substr(start, end - start);
    if (!dir.empty()) {
      const fs::path candidate = fs::path(dir) / "bible";
      if (executable_file(candidate)) return candidate;
    }
    start = end + 1;
  }
  return std::nullopt;
}

std::string strip_kjv_labels(std::string_view raw) {
  std::string out;
  out.reserve(raw.size());
  std::size_t pos = 0, line_no = 0;
  while (pos < raw.size()) {
    std::size_t eol = raw.find('\n', pos);
    if (eol == std::string_view::npos) eol = raw.size();
    std::string_view line = raw.substr(pos, eol - pos);
    pos = eol + 1;
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.find_first_not_of(" \t") == std::string_view::npos) continue;  // blank
    // Label: [1-3]? [A-Za-z]+ [0-9]+ ':' [0-9]+ ' '
    std::size_t i = 0;
    auto digits = [&] {
      const std::size_t s = i;
      while (i < line.size() && line[i] >= '0' && line[i] <= '9') ++i;
      return i > s;
    };
    if (i < line.size() && line[i] >= '1' && line[i] <= '3') ++i;
    const std::size_t letters = i;
    while (i < line.size() && ((line[i] >= 'A' && line[i] <= 'Z') || (line[i] >= 'a' && line[i] <= 'z'))) ++i;
    bool ok = i > letters && digits();
    ok = ok && i < line.size() && line[i++] == ':' && digits();
    ok = ok && i < line.size() && line[i++] == ' ';
    if (!ok) {
      throw std::runtime_error("corpus: line " + std::to_string(line_no) + " of `bible -f " + kBibleRange +
                               "` has no verse label like \"Ge1:1 \": \"" + std::string(line.substr(0, 80)) +
                               "\" (has the output format of bible-kjv changed?)");
    }
    out.append(line.substr(i));
    out.push_back('\n');
  }
  return out;
}

std::string load_kjv_text() {
  const fs::path cache = kjv_cache_path();
  {
    std::FILE* f = std::fopen(cache.c_str(), "rb");
    if (f) {
      std::string text;
      char buf[1 << 16];
      std::size_t got = 0;
      while ((got = std::fread(buf, 1, sizeof buf, f)) > 0) text.append(buf, got);
      const bool failed = std::ferror(f) != 0;
      std::fclose(f);
      if (!failed && plausible_kjv(text)) return text;
    }
  }
  const auto bible = find_bible_program();
  if (!bible) {
    throw std::runtime_error("corpus: the default corpus (the King James Bible) needs the `bible` program, which is "
                             "not on PATH; " + std::string(kInstallHint));
  }
  std::string text = strip_kjv_labels(run_bible(*bible));
  if (!plausible_kjv(text)) {
    throw std::runtime_error("corpus: `" + bible->string() + " -f " + kBibleRange +
                             "` did not print the King James Bible (it must start \"In the beginning\" and end "
                             "\"Amen.\"); is bible-kjv installed correctly? " + kInstallHint);
  }
  // Cache atomically; a cache that cannot be written costs only speed.
  std::error_code ec;
  fs::create_directories(cache.parent_path(), ec);
  const fs::path tmp = cache.string() + ".tmp." + std::to_string(::getpid());
  bool cached = false;
  if (std::FILE* f = std::fopen(tmp.c_str(), "wb")) {
    const bool wrote = std::fwrite(text.data(), 1, text.size(), f) == text.size();
    const bool closed = std::fclose(f) == 0;
    cached = wrote && closed && std::rename(tmp.c_str(), cache.c_str()) == 0;
    if (!cached) std::remove(tmp.c_str());
  }
  if (!cached) std::fprintf(stderr, "intrain: warning: cannot write the corpus cache %s\n", quoted(cache).c_str());
  return text;
}

// ---------------------------------------------------------------- loading

std::string check_text(std::span<const std::uint8_t> bytes) {
  std::size_t bad = 0, first_bad = bytes.size();
  for (std::size_t i = 0; i < bytes.size();) {
    const std::uint8_t b = bytes[i];
    if (b == 0) return "contains a NUL byte at offset " + std::to_string(i);
    const std::size_t len = utf8_sequence_length(bytes, i);
    const bool control = b < 0x80 && ((b < 0x20 && !(b >= 0x09 && b <= 0x0D)) || b == 0x7F);
    if (len == 0 || control) {
      if (first_bad == bytes.size()) first_bad = i;
      ++bad;
      ++i;
    } else {
      i += len;
    }
  }
  if (bad * 100 > bytes.size()) {
    char hex[8];
    std::snprintf(hex, sizeof hex, "0x%02X", bytes[first_bad]);
    return std::to_string(bad) + " of its " + std::to_string(bytes.size()) +
           " bytes (more than 1%) are neither UTF-8 text nor whitespace; the first is " + hex + " at offset " +
           std::to_string(first_bad);
  }
  return {};
}

Corpus Corpus::from_bytes(std::string name, std::vector<std::uint8_t> bytes, std::int64_t min_bytes_per_split) {
  if (min_bytes_per_split < 1) {
    throw std::invalid_argument("Corpus: min_bytes_per_split must be at least 1, got " +
                                std::to_string(min_bytes_per_split));
  }
  const auto n = static_cast<std::int64_t>(bytes.size());
  const std::int64_t n_val = val_bytes(n);
  if (n_val < min_bytes_per_split || n - n_val < min_bytes_per_split) {
    throw std::runtime_error(
        "corpus \"" + name + "\": too small: " + std::to_string(n) + " bytes, but each split needs at least " +
        std::to_string(min_bytes_per_split) + " bytes (context + 1) and the validation split is the last 10%, " +
        "so it needs at least " + std::to_string(10 * min_bytes_per_split) +
        " bytes; use a larger file or a smaller context");
  }
  Corpus c;
  c.name = std::move(name);
  c.val.assign(bytes.end() - n_val, bytes.end());
  bytes.resize(static_cast<std::size_t>(n - n_val));
  c.train = std::move(bytes);
  return c;
}

Corpus Corpus::load(const std::optional<fs::path>& data, std::int64_t min_bytes_per_split) {
  if (!data) {
    const std::string text = load_kjv_text();
    return from_bytes("kjv", std::vector<std::uint8_t>(text.begin(), text.end()), min_bytes_per_split);
  }
  std::vector<std::uint8_t> bytes = read_data_file(*data);
  if (bytes.empty()) data_error(*data, "the file is empty; pass a text file");
  if (const std::string why = check_text(bytes); !why.empty()) {
    data_error(*data, "looks binary, not text: " + why + "; pass a UTF-8 or ASCII text file");
  }
  return from_bytes(data->string(), std::move(bytes), min_bytes_per_split);
}

// ---------------------------------------------------------------- batches

std::int64_t sample_position(std::int64_t split_size, std::uint64_t seed, std::uint64_t step, int b, int T) {
  const RngKey key(seed, stream_id(step, kSamplerTag));
  const auto i = static_cast<std::uint32_t>(b) * 2u;
  const std::uint64_t r = std::uint64_t{key.bits(i)} << 32 | key.bits(i + 1);
  return static_cast<std::int64_t>(r % static_cast<std::uint64_t>(split_size - T));
}

void sample_batch(std::span<const std::uint8_t> split, std::uint64_t seed, std::uint64_t step, int B, int T,
                  std::int32_t* inputs, std::int32_t* targets) {
  if (B < 1 || T < 1) {
    throw std::invalid_argument("sample_batch: need B >= 1 and T >= 1, got B=" + std::to_string(B) +
                                " T=" + std::to_string(T));
  }
  const auto n = static_cast<std::int64_t>(split.size());
  if (n < static_cast<std::int64_t>(T) + 1) {
    throw std::invalid_argument("sample_batch: a split of " + std::to_string(n) + " bytes cannot hold a window of " +
                                std::to_string(T + 1) + " bytes");
  }
  for (int b = 0; b < B; ++b) {
    const std::uint8_t* w = split.data() + sample_position(n, seed, step, b, T);
    std::int32_t* in = inputs + static_cast<std::ptrdiff_t>(b) * T;
    std::int32_t* tg = targets + static_cast<std::ptrdiff_t>(b) * T;
    for (int t = 0; t < T; ++t) {
      in[t] = w[t];
      tg[t] = w[t + 1];
    }
  }
}

ValWindows::ValWindows(std::span<const std::uint8_t> split, int T, std::int64_t max_windows) : split_(split), T_(T) {
  if (T < 1) throw std::invalid_argument("ValWindows: T must be at least 1, got " + std::to_string(T));
  num_windows_ = split.empty() ? 0 : static_cast<std::int64_t>(split.size() - 1) / T;
  if (max_windows > 0) num_windows_ = std::min(num_windows_, max_windows);
}

int ValWindows::next(int B, std::int32_t* inputs, std::int32_t* targets) {
  if (B < 1) throw std::invalid_argument("ValWindows::next: B must be at least 1, got " + std::to_string(B));
  const int count = static_cast<int>(std::min<std::int64_t>(B, remaining()));
  for (int b = 0; b < count; ++b, ++next_) {
    const std::uint8_t* w = split_.data() + next_ * T_;
    std::int32_t* in = inputs + static_cast<std::ptrdiff_t>(b) * T_;
    std::int32_t* tg = targets + static_cast<std::ptrdiff_t>(b) * T_;
    for (int t = 0; t < T_; ++t) {
      in[t] = w[t];
      tg[t] = w[t + 1];
    }
  }
  return count;
}

}  // namespace intrain
