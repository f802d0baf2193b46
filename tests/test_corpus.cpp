// The training corpus: the KJV loader and its cache, --data checks, the fixed
// train/validation split, the deterministic batch sampler and the validation
// windows.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <random>
// GCC 12 reports a false -Wmaybe-uninitialized inside libstdc++'s <regex> at -O2 with sanitizers.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <regex>
#pragma GCC diagnostic pop
#include <set>
#include <string>
#include <vector>

#include "experiments/corpus.h"

namespace fs = std::filesystem;
using namespace intrain;

namespace {

// Sets an environment variable for the scope, then restores it.
class EnvGuard {
 public:
  EnvGuard(const char* name, const std::string& value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    ::setenv(name, value.c_str(), 1);
  }
  ~EnvGuard() {
    if (old_) ::setenv(name_, old_->c_str(), 1);
    else ::unsetenv(name_);
  }
  EnvGuard(const EnvGuard&) = delete;
  EnvGuard& operator=(const EnvGuard&) = delete;

 private:
  const char* name_;
  std::optional<std::string> old_;
};

class CorpusTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() / ("intrain_corpus_" + std::string(info->name()) + "_" + std::to_string(::getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  fs::path write(const std::string& name, const std::string& bytes) {
    const fs::path p = dir_ / name;
    std::ofstream f(p, std::ios::binary);
    f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    return p;
  }
  fs::path dir_;
};

std::string slurp(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

// Expects Corpus::load(path, min) to throw std::runtime_error naming the file
// and containing `needle`.
void expect_load_error(const fs::path& path, std::int64_t min, const std::string& needle) {
  try {
    (void)Corpus::load(path, min);
    ADD_FAILURE() << "loading " << path << " did not throw";
  } catch (const std::runtime_error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(path.string()), std::string::npos) << "message does not name the file: " << msg;
    EXPECT_NE(msg.find(needle), std::string::npos) << "missing \"" << needle << "\" in: " << msg;
  }
}

std::string text_of(const std::vector<std::uint8_t>& v) { return {v.begin(), v.end()}; }

}  // namespace

// ---------------------------------------------------------------- KJV

TEST_F(CorpusTest, KjvLoadsStrippedAndCached) {
  if (!find_bible_program()) {
    GTEST_SKIP() << "the `bible` program (Debian package bible-kjv) is not installed; run ./scripts/setup.sh";
  }
  EnvGuard cache_home("XDG_CACHE_HOME", dir_.string());
  const fs::path cache = kjv_cache_path();
  ASSERT_EQ(cache, dir_ / "intrain" / "kjv.txt");
  ASSERT_FALSE(fs::exists(cache));

  const Corpus c = Corpus::load(std::nullopt, 129);
  EXPECT_EQ(c.name, "kjv");
  const std::int64_t n = c.size();
  std::printf("stripped KJV: %lld bytes\n", static_cast<long long>(n));
  EXPECT_GE(n, 3'900'000);
  EXPECT_LE(n, 4'300'000);
  const std::string text = text_of(c.train) + text_of(c.val);

  // Cached, atomically (no temp file left), with exactly this text.
  ASSERT_TRUE(fs::exists(cache));
  EXPECT_EQ(slurp(cache), text);
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(cache.parent_path())) files.push_back(e.path().filename().string());
  EXPECT_EQ(files, std::vector<std::string>{"kjv.txt"});

  EXPECT_EQ(text.rfind("In the beginning God created the heaven and the earth.\n", 0), 0u) << text.substr(0, 80);
  EXPECT_TRUE(text.ends_with("\nThe grace of our Lord Jesus Christ be with you all. Amen.\n"));
  EXPECT_EQ(check_text(std::span(reinterpret_cast<const std::uint8_t*>(text.data()), text.size())), "");

  // No verse label remains at the start of any line; one verse per line.
  const std::regex label(R"(^[1-3]?[A-Za-z]+[0-9]+:[0-9]+ )");
  std::int64_t lines = 0;
  std::size_t pos = 0;
  while (pos < text.size()) {
    const std::size_t eol = text.find('\n', pos);
    ASSERT_NE(eol, std::string::npos);
    const std::string line = text.substr(pos, eol - pos);
    ASSERT_FALSE(line.empty()) << "blank line " << lines + 1;
    ASSERT_FALSE(std::regex_search(line, label)) << "line " << lines + 1 << " still has a label: " << line;
    ++lines;
    pos = eol + 1;
  }
  EXPECT_GE(lines, 31000);  // 31,102 verses in bible-kjv 4.38
  EXPECT_LE(lines, 31200);

  // The split is exact.
  EXPECT_EQ(static_cast<std::int64_t>(c.val.size()), n / 10);
  EXPECT_EQ(static_cast<std::int64_t>(c.train.size()), n - n / 10);

  // A second load reads the cache: a (plausible) edited cache is returned as is.
  const std::string fake = "In the beginning was a cached file. Amen.\n";
  { std::ofstream(cache, std::ios::binary) << fake; }
  EXPECT_EQ(load_kjv_text(), fake);
  // An implausible cache (e.g. truncated) is rebuilt from `bible`.
  { std::ofstream(cache, std::ios::binary) << text.substr(0, 1000); }
  EXPECT_EQ(load_kjv_text(), text);
  EXPECT_EQ(slurp(cache), text);
}

TEST_F(CorpusTest, KjvWithoutTheBibleProgramSaysHowToInstallIt) {
  fs::create_directories(dir_ / "empty_bin");
  EnvGuard path("PATH", (dir_ / "empty_bin").string());
  EnvGuard cache_home("XDG_CACHE_HOME", (dir_ / "cache").string());
  EXPECT_FALSE(find_bible_program().has_value());
  try {
    (void)Corpus::load(std::nullopt, 129);
    ADD_FAILURE() << "loading the KJV without `bible` did not throw";
  } catch (const std::runtime_error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("./scripts/setup.sh"), std::string::npos) << msg;
    EXPECT_NE(msg.find("apt-get install bible-kjv"), std::string::npos) << msg;
    EXPECT_NE(msg.find("bible"), std::string::npos) << msg;
  }
}

TEST_F(CorpusTest, CachePathFollowsXdgThenHomeThenTemp) {
  {
    EnvGuard xdg("XDG_CACHE_HOME", "/x/cache");
    EXPECT_EQ(kjv_cache_path(), fs::path("/x/cache/intrain/kjv.txt"));
  }
  {
    EnvGuard xdg("XDG_CACHE_HOME", "relative/is/ignored");
    EnvGuard home("HOME", "/home/someone");
    EXPECT_EQ(kjv_cache_path(), fs::path("/home/someone/.cache/intrain/kjv.txt"));
  }
  {
    EnvGuard xdg("XDG_CACHE_HOME", "");
    EnvGuard home("HOME", "");
    EXPECT_EQ(kjv_cache_path(), fs::temp_directory_path() / "intrain-cache" / "kjv.txt");
  }
}

TEST(CorpusStrip, RemovesLabelsDropsBlankLinesAndRejectsOtherLines) {
  EXPECT_EQ(strip_kjv_labels("Ge1:1 In the beginning.\n\n1Chr3:4 Foo: bar.\r\nSSol1:1 Song.\nRev22:21 Amen."),
            "In the beginning.\nFoo: bar.\nSong.\nAmen.\n");
  EXPECT_EQ(strip_kjv_labels(""), "");
  try {
    (void)strip_kjv_labels("Ge1:1 ok\n\nGenesis 1\n");
    ADD_FAILURE() << "a header line was accepted";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("line 3"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("Genesis 1"), std::string::npos) << e.what();
  }
  EXPECT_THROW((void)strip_kjv_labels("  1 In the beginning\n"), std::runtime_error);
  EXPECT_THROW((void)strip_kjv_labels("Ge1: x\n"), std::runtime_error);
}

// ---------------------------------------------------------------- --data

TEST_F(CorpusTest, DataFileLoadsAndSplitsExactly) {
  std::string text;
  for (int i = 0; i < 103; ++i) text += "line " + std::to_string(i) + " of caf\u00e9 text\n";
  const auto p = write("text.txt", text);
  const Corpus c = Corpus::load(p, 17);
  EXPECT_EQ(c.name, p.string());
  const auto n = static_cast<std::int64_t>(text.size());
  EXPECT_EQ(c.size(), n);
  EXPECT_EQ(static_cast<std::int64_t>(c.val.size()), n / 10);
  EXPECT_EQ(text_of(c.train), text.substr(0, static_cast<std::size_t>(n - n / 10)));
  EXPECT_EQ(text_of(c.val), text.substr(static_cast<std::size_t>(n - n / 10)));
}

TEST(CorpusSplit, SizesAreExact) {
  for (std::int64_t n : {10, 19, 20, 1000, 1009, 4137850}) {
    std::vector<std::uint8_t> bytes(static_cast<std::size_t>(n));
    for (std::int64_t i = 0; i < n; ++i) bytes[static_cast<std::size_t>(i)] = static_cast<std::uint8_t>(i * 7);
    const Corpus c = Corpus::from_bytes("x", bytes, 1);
    EXPECT_EQ(static_cast<std::int64_t>(c.val.size()), n / 10) << n;
    EXPECT_EQ(static_cast<std::int64_t>(c.train.size()), n - n / 10) << n;
    EXPECT_TRUE(std::equal(c.train.begin(), c.train.end(), bytes.begin()));
    EXPECT_TRUE(std::equal(c.val.begin(), c.val.end(), bytes.begin() + static_cast<std::ptrdiff_t>(c.train.size())));
  }
  EXPECT_EQ(val_bytes(4137850), 413785);
  // The boundary: 10 * min bytes is just enough.
  EXPECT_NO_THROW(Corpus::from_bytes("x", std::vector<std::uint8_t>(1290, 'a'), 129));
  EXPECT_THROW(Corpus::from_bytes("x", std::vector<std::uint8_t>(1289, 'a'), 129), std::runtime_error);
  EXPECT_THROW(Corpus::from_bytes("x", std::vector<std::uint8_t>(100, 'a'), 0), std::invalid_argument);
}

TEST_F(CorpusTest, BadDataFilesNameTheFileAndSayWhatToDo) {
  expect_load_error(dir_ / "missing.txt", 9, "no such file");
  expect_load_error(dir_, 9, "is a directory");
  expect_load_error(write("empty.txt", ""), 9, "the file is empty");
  expect_load_error(write("nul.txt", std::string("hello\0world, this is text", 25)), 9,
                    "contains a NUL byte at offset 5");
  std::string random(4096, ' ');
  std::mt19937 rng(7);
  for (auto& ch : random) ch = static_cast<char>(1 + rng() % 255);  // no NUL: caught by the UTF-8 rule
  expect_load_error(write("random.bin", random), 9, "looks binary");
  expect_load_error(write("random.bin", random), 9, "more than 1%");
  expect_load_error(write("small.txt", std::string(89, 'a')), 9, "needs at least 90 bytes");
  expect_load_error(write("small.txt", std::string(89, 'a')), 9, "too small: 89 bytes");
  if (::geteuid() != 0) {
    const auto p = write("locked.txt", std::string(1000, 'a'));
    fs::permissions(p, fs::perms::none);
    expect_load_error(p, 9, "cannot open");
  }
}

TEST(CorpusText, TheBinaryRuleIsOnePercentOfBadBytesOrAnyNul) {
  auto check = [](const std::string& s) {
    return check_text(std::span(reinterpret_cast<const std::uint8_t*>(s.data()), s.size()));
  };
  EXPECT_EQ(check("plain ASCII\twith\r\nwhitespace\f\v"), "");
  EXPECT_EQ(check("UTF-8: caf\u00e9, \u4e2d\u6587, \U0001F600"), "");
  EXPECT_NE(check(std::string("a\0b", 3)), "");
  // One bad byte in 100 is allowed, two are not.
  std::string s(99, 'a');
  EXPECT_EQ(check(s + "\xff"), "");
  EXPECT_NE(check(std::string(98, 'a') + "\xff\xff"), "");
  // Ill-formed UTF-8 counts as bad: overlong, surrogate, beyond U+10FFFF, lone
  // continuation, truncated sequence; so do control characters other than
  // \t \n \v \f \r.
  for (const std::string bad : {"\xC0\xAF", "\xED\xA0\x80", "\xF4\x90\x80\x80", "\x80", "\xE4\xB8", "\x1b", "\x7f"}) {
    EXPECT_NE(check(std::string(10, 'a') + bad), "") << "accepted a bad sequence";
    EXPECT_EQ(check(std::string(1000, 'a') + bad), "") << "below 1% is text";
  }
}

// ---------------------------------------------------------------- sampler

TEST(CorpusSampler, DeterministicAndIndependentOfCallOrder) {
  std::vector<std::uint8_t> split(10000);
  for (std::size_t i = 0; i < split.size(); ++i) split[i] = static_cast<std::uint8_t>((i * 2654435761u) >> 13);
  const int B = 8, T = 32;
  auto draw = [&](std::uint64_t seed, std::uint64_t step) {
    std::vector<std::int32_t> in(B * T), tg(B * T);
    sample_batch(split, seed, step, B, T, in.data(), tg.data());
    return std::pair(in, tg);
  };
  const auto step5_alone = draw(1, 5);
  for (std::uint64_t s = 0; s < 5; ++s) (void)draw(1, s);
  EXPECT_EQ(draw(1, 5), step5_alone);
  EXPECT_NE(draw(1, 6), step5_alone);
  EXPECT_NE(draw(2, 5), step5_alone);
  // Window b does not depend on the batch size.
  std::vector<std::int32_t> in1(T), tg1(T);
  sample_batch(split, 1, 5, 1, T, in1.data(), tg1.data());
  EXPECT_TRUE(std::equal(in1.begin(), in1.end(), step5_alone.first.begin()));
}

TEST(CorpusSampler, WindowsLieInsideTheSplitAndTargetsAreShiftedInputs) {
  std::vector<std::uint8_t> split(300);
  for (std::size_t i = 0; i < split.size(); ++i) split[i] = static_cast<std::uint8_t>(i * 37 + 11);
  const int B = 16, T = 20;
  std::vector<std::int32_t> in(B * T), tg(B * T);
  std::set<std::int64_t> positions;
  for (std::uint64_t step = 0; step < 200; ++step) {
    sample_batch(split, 42, step, B, T, in.data(), tg.data());
    for (int b = 0; b < B; ++b) {
      const std::int64_t p = sample_position(static_cast<std::int64_t>(split.size()), 42, step, b, T);
      ASSERT_GE(p, 0);
      ASSERT_LE(p + T + 1, static_cast<std::int64_t>(split.size()));
      positions.insert(p);
      for (int t = 0; t < T; ++t) {
        ASSERT_EQ(in[static_cast<std::size_t>(b * T + t)], split[static_cast<std::size_t>(p + t)]);
        ASSERT_EQ(tg[static_cast<std::size_t>(b * T + t)], split[static_cast<std::size_t>(p + t + 1)]);
        if (t + 1 < T) {
          ASSERT_EQ(tg[static_cast<std::size_t>(b * T + t)], in[static_cast<std::size_t>(b * T + t + 1)]);
        }
      }
    }
  }
  // 3200 draws over 280 possible positions reach every one, including both ends.
  EXPECT_EQ(positions.size(), split.size() - T);
  EXPECT_EQ(*positions.begin(), 0);
  EXPECT_EQ(*positions.rbegin(), static_cast<std::int64_t>(split.size()) - T - 1);

  // The smallest split holds exactly one window.
  std::vector<std::uint8_t> tiny(T + 1, 'x');
  EXPECT_NO_THROW(sample_batch(tiny, 1, 1, B, T, in.data(), tg.data()));
  std::vector<std::uint8_t> too_small(T, 'x');
  EXPECT_THROW(sample_batch(too_small, 1, 1, B, T, in.data(), tg.data()), std::invalid_argument);
  EXPECT_THROW(sample_batch(split, 1, 1, 0, T, in.data(), tg.data()), std::invalid_argument);
  EXPECT_THROW(sample_batch(split, 1, 1, B, 0, in.data(), tg.data()), std::invalid_argument);
}

TEST(CorpusValidation, ConsecutiveNonOverlappingWindowsWithACap) {
  std::vector<std::uint8_t> split(105);
  for (std::size_t i = 0; i < split.size(); ++i) split[i] = static_cast<std::uint8_t>(i);
  const int T = 10, B = 4;
  ValWindows all(split, T);
  EXPECT_EQ(all.num_windows(), 10);  // (105 - 1) / 10
  std::vector<std::int32_t> in(B * T), tg(B * T);
  std::vector<int> got;
  std::int64_t w = 0;
  while (const int k = all.next(B, in.data(), tg.data())) {
    got.push_back(k);
    for (int b = 0; b < k; ++b, ++w) {
      for (int t = 0; t < T; ++t) {
        ASSERT_EQ(in[static_cast<std::size_t>(b * T + t)], w * T + t);
        ASSERT_EQ(tg[static_cast<std::size_t>(b * T + t)], w * T + t + 1);
      }
    }
  }
  EXPECT_EQ(got, (std::vector<int>{4, 4, 2}));
  EXPECT_EQ(all.next(B, in.data(), tg.data()), 0);
  all.reset();
  EXPECT_EQ(all.remaining(), 10);

  ValWindows capped(split, T, 3);
  EXPECT_EQ(capped.num_windows(), 3);
  EXPECT_EQ(capped.next(B, in.data(), tg.data()), 3);
  EXPECT_EQ(capped.next(B, in.data(), tg.data()), 0);

  // Exactly T+1 bytes: one window; T bytes: none.
  EXPECT_EQ(ValWindows(std::span(split).first(T + 1), T).num_windows(), 1);
  EXPECT_EQ(ValWindows(std::span(split).first(T), T).num_windows(), 0);
  EXPECT_EQ(ValWindows(std::span<const std::uint8_t>(), T).num_windows(), 0);
  EXPECT_THROW(ValWindows(split, 0), std::invalid_argument);
}
