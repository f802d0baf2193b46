// The training text: a byte-level corpus, its fixed train/validation split, a
// deterministic batch sampler, and a validation iterator.
//
// Vocabulary: the 256 byte values (kVocabSize); a token is one byte of the file.
//
// Sources:
//   * default: the King James Bible from Debian's bible-kjv package. The
//     program `bible -f 'Gen1:1-Rev22:21'` prints one verse per line, each
//     starting with a label "<book><chapter>:<verse> " ("Ge1:1 ", "1Chr3:4 ",
//     "SSol1:1 "); the label is removed, the verse text and its '\n' are kept,
//     blank lines are dropped (there are none in bible-kjv 4.38). Any other
//     line is an error (the program's output format changed). The stripped
//     text (4,137,850 bytes, 31,102 verses, pure ASCII with bible-kjv 4.38) is
//     cached in kjv_cache_path() so `bible` runs once per machine; the cache is
//     written atomically (temp file, then rename) and is rebuilt if it does not
//     look like the KJV (it must start "In the beginning" and end "Amen.\n").
//   * --data FILE: any text file, used byte for byte. It must be a readable
//     regular file, non-empty, and text (see check_text() for the rule).
//
// Split (fixed, documented): with n bytes, n_val = n / 10 (integer division);
// validation = bytes [n - n_val, n), train = bytes [0, n - n_val). Both splits
// must hold at least `min_bytes_per_split` bytes (the caller passes
// context + 1), so the file must have at least 10 * min_bytes_per_split bytes.
//
// Sampling: sample_batch() draws window b of step `step` at a position that is
// a pure function of (seed, step, b) (a counter-based hash, core/rng.h). No
// generator state is kept, so a run resumed at step k draws exactly the batches
// an uninterrupted run would, without replaying steps 0..k-1.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace intrain {

inline constexpr int kVocabSize = 256;

struct Corpus {
  std::string name;                  // "kjv", or the --data path as given
  std::vector<std::uint8_t> train;   // bytes [0, n - n/10)
  std::vector<std::uint8_t> val;     // bytes [n - n/10, n)

  std::int64_t size() const { return static_cast<std::int64_t>(train.size() + val.size()); }

  // Loads `data` (or the KJV if nullopt), checks it, and splits it. Throws
  // std::runtime_error naming the file and what to do if it is missing,
  // unreadable, a directory, empty, binary, or too small for two splits of
  // `min_bytes_per_split` bytes; or if the KJV is needed and `bible` is absent.
  static Corpus load(const std::optional<std::filesystem::path>& data, std::int64_t min_bytes_per_split);

  // Splits `bytes` (already loaded) as described above; `name` is used in errors.
  static Corpus from_bytes(std::string name, std::vector<std::uint8_t> bytes, std::int64_t min_bytes_per_split);
};

// Number of validation bytes for a corpus of n bytes: n / 10.
constexpr std::int64_t val_bytes(std::int64_t n) { return n / 10; }

// ---- the KJV

// $XDG_CACHE_HOME/intrain/kjv.txt if XDG_CACHE_HOME is set to an absolute path,
// else $HOME/.cache/intrain/kjv.txt, else <temp dir>/intrain-cache/kjv.txt.
std::filesystem::path kjv_cache_path();

// The `bible` program found on PATH, or nullopt.
std::optional<std::filesystem::path> find_bible_program();

// The stripped KJV text: from the cache if valid, else from `bible` (then cached).
// Throws std::runtime_error if `bible` is needed and absent (run ./scripts/setup.sh
// or apt-get install bible-kjv), fails, or prints something unexpected.
std::string load_kjv_text();

// Removes the verse labels from `bible -f` output (see the top of this file).
// Throws std::runtime_error naming the first line that has no label.
std::string strip_kjv_labels(std::string_view raw);

// ---- text check for --data files

// A file is text unless (1) it contains a NUL byte, or (2) more than 1% of its
// bytes are "bad": a byte that is not part of a well-formed UTF-8 sequence
// (overlong forms, surrogates and code points above U+10FFFF are ill-formed),
// or an ASCII control character other than \t \n \v \f \r (so 0x01-0x08,
// 0x0E-0x1F, 0x7F; ESC is bad too). Returns an empty string if the bytes are
// text, otherwise the reason (e.g. "contains a NUL byte at offset 17").
std::string check_text(std::span<const std::uint8_t> bytes);

// ---- batches

// Fills B windows of T+1 consecutive bytes from `split`: inputs[b*T + t] =
// split[p_b + t] and targets[b*T + t] = split[p_b + t + 1] for t in [0, T), with
// p_b uniform in [0, split.size() - T - 1], a pure function of (seed, step, b).
// Throws std::invalid_argument if B < 1, T < 1 or split.size() < T + 1.
void sample_batch(std::span<const std::uint8_t> split, std::uint64_t seed, std::uint64_t step, int B, int T,
                  std::int32_t* inputs, std::int32_t* targets);

// The start position sample_batch() uses for window b (exposed for tests).
std::int64_t sample_position(std::int64_t split_size, std::uint64_t seed, std::uint64_t step, int b, int T);

// Walks a split in consecutive non-overlapping windows for evaluation: window
// w has inputs split[w*T, w*T + T) and targets split[w*T + 1, w*T + T + 1).
// There are min((split.size() - 1) / T, max_windows) windows (max_windows <= 0:
// no cap); the last partial window is dropped. The split must outlive this.
class ValWindows {
 public:
  ValWindows(std::span<const std::uint8_t> split, int T, std::int64_t max_windows = 0);

  std::int64_t num_windows() const { return num_windows_; }
  std::int64_t remaining() const { return num_windows_ - next_; }
  // Fills up to B windows (fewer at the end); returns how many, 0 when done.
  int next(int B, std::int32_t* inputs, std::int32_t* targets);
  void reset() { next_ = 0; }

 private:
  std::span<const std::uint8_t> split_;
  int T_;
  std::int64_t num_windows_ = 0;
  std::int64_t next_ = 0;
};

}  // namespace intrain
