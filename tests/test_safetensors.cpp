// safetensors reading and writing: round trips, the exact byte layout, every
// corruption the reader must reject with a clear message, fuzzed headers and
// truncations (run under ASan+UBSan in CI), and atomic writes.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "core/safetensors.h"
#include "tests/test_support.h"

namespace fs = std::filesystem;
using namespace intrain;

namespace {

// A fresh directory per test (tests run in parallel processes).
class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() /
           ("intrain_safetensors_" + std::string(info->name()) + "_" + std::to_string(::getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ec;
    fs::permissions(dir_, fs::perms::owner_all, fs::perm_options::add, ec);
    fs::remove_all(dir_, ec);
  }
  fs::path dir_;
};

std::string slurp(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

void spit(const fs::path& p, const std::string& bytes) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string le64(std::uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[static_cast<std::size_t>(i)] = static_cast<char>(n >> (8 * i));
  return s;
}

// A file from a raw header text (padded to 8 bytes with spaces) and data bytes.
std::string make_file(std::string header, const std::string& data) {
  header.append((8 - header.size() % 8) % 8, ' ');
  return le64(header.size()) + header + data;
}

// The names of the files in a directory (to check that no temp file is left).
std::vector<std::string> listing(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

SafeTensorsFile sample_file() {
  SafeTensorsFile f;
  f.metadata = {{"format", "pt"}, {"step", "1200"}, {"note", "h\u00e9llo \"quoted\"\n"}};
  f.add("w.f32", SafeTensor::from_values<float>({2, 3}, std::vector<float>{1.5f, -2.0f, 0.0f, 3.25f, -0.0f, 1e30f}));
  f.add("w.i8", SafeTensor::from_values<std::int8_t>({5}, std::vector<std::int8_t>{-127, -1, 0, 1, 127}));
  f.add("w.i16", SafeTensor::from_values<std::int16_t>({2, 2, 2}, std::vector<std::int16_t>{-32767, 5, 6, 7, 8, 9, 10, 32767}));
  f.add("acc.i32", SafeTensor::from_values<std::int32_t>({1}, std::vector<std::int32_t>{-2147483647}));
  f.add("acc.i64", SafeTensor::from_values<std::int64_t>({3, 1}, std::vector<std::int64_t>{INT64_MIN, 0, INT64_MAX}));
  f.add("bytes.u8", SafeTensor::from_values<std::uint8_t>({4}, std::vector<std::uint8_t>{0, 1, 128, 255}));
  f.add("scalar", SafeTensor::from_values<float>({}, std::vector<float>{42.0f}));
  f.add("empty", SafeTensor::from_values<std::int32_t>({0, 4}, std::vector<std::int32_t>{}));
  f.add("a.after.empty", SafeTensor::from_values<std::int16_t>({1}, std::vector<std::int16_t>{-3}));
  return f;
}

// Expects read_safetensors(path) to throw std::runtime_error whose message
// contains the path and every one of `needles`.
void expect_read_error(const fs::path& path, std::initializer_list<std::string> needles) {
  try {
    (void)read_safetensors(path);
    ADD_FAILURE() << "reading " << path << " did not throw";
  } catch (const std::runtime_error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(path.string()), std::string::npos) << "message does not name the file: " << msg;
    for (const auto& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "missing \"" << n << "\" in: " << msg;
  }
}

}  // namespace

TEST_F(SafetensorsTest, RoundTripKeepsDtypesShapesDataMetadataAndOrder) {
  const auto f = sample_file();
  const auto path = dir_ / "model.safetensors";
  write_safetensors(path, f);
  const auto g = read_safetensors(path);
  EXPECT_EQ(g.metadata, f.metadata);
  EXPECT_EQ(g.source, path);
  ASSERT_EQ(g.tensors.size(), f.tensors.size());
  for (std::size_t i = 0; i < f.tensors.size(); ++i) {
    EXPECT_EQ(g.tensors[i].first, f.tensors[i].first);
    EXPECT_EQ(g.tensors[i].second.dtype, f.tensors[i].second.dtype);
    EXPECT_EQ(g.tensors[i].second.shape, f.tensors[i].second.shape);
    EXPECT_EQ(g.tensors[i].second.data, f.tensors[i].second.data) << f.tensors[i].first;
  }
  EXPECT_EQ(g.at("acc.i64").values<std::int64_t>(), (std::vector<std::int64_t>{INT64_MIN, 0, INT64_MAX}));
  EXPECT_EQ(g.at("scalar").values<float>(), std::vector<float>{42.0f});
  EXPECT_EQ(g.at("scalar").numel(), 1);
  EXPECT_EQ(g.at("empty").numel(), 0);
  EXPECT_THROW((void)g.at("w.i8").values<float>(), std::invalid_argument);
  // The data section starts 8-byte aligned.
  const std::string bytes = slurp(path);
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = n << 8 | static_cast<unsigned char>(bytes[static_cast<std::size_t>(i)]);
  EXPECT_EQ(n % 8, 0u);
  // Writing what was read reproduces the file byte for byte.
  write_safetensors(dir_ / "again.safetensors", g);
  EXPECT_EQ(slurp(dir_ / "again.safetensors"), bytes);
}

TEST_F(SafetensorsTest, EmptyFileHasOnlyAnEmptyHeader) {
  const auto path = dir_ / "empty.safetensors";
  write_safetensors(path, SafeTensorsFile{});
  EXPECT_EQ(slurp(path), le64(8) + std::string("{}      "));
  const auto g = read_safetensors(path);
  EXPECT_TRUE(g.tensors.empty());
  EXPECT_TRUE(g.metadata.empty());
}

TEST_F(SafetensorsTest, ByteExactLayoutOfATinyFile) {
  SafeTensorsFile f;
  f.metadata["k"] = "v";
  f.add("a", SafeTensor::from_values<std::int8_t>({3}, std::vector<std::int8_t>{1, 2, -1}));
  f.add("b", SafeTensor::from_values<std::int16_t>({1}, std::vector<std::int16_t>{0x0102}));
  const auto path = dir_ / "tiny.safetensors";
  write_safetensors(path, f);

  // Hand-computed: the JSON is 131 bytes, padded with 5 spaces to 136 = 0x88,
  // so the data starts at 8 + 136 = 144, a multiple of 8.
  const std::string json =
      R"({"__metadata__":{"k":"v"},"a":{"dtype":"I8","shape":[3],"data_offsets":[0,3]},)"
      R"("b":{"dtype":"I16","shape":[1],"data_offsets":[3,5]}})";
  ASSERT_EQ(json.size(), 131u);
  std::string expected("\x88\0\0\0\0\0\0\0", 8);
  expected += json + "     ";
  expected += std::string("\x01\x02\xff", 3);  // a: int8 1, 2, -1
  expected += std::string("\x02\x01", 2);      // b: int16 0x0102, little-endian
  ASSERT_EQ(expected.size(), 149u);
  EXPECT_EQ(slurp(path), expected);
}

TEST_F(SafetensorsTest, ReadsFilesWhoseHeaderOrderDiffersFromDataOrder) {
  // Other writers may list entries in another order than the data; the reader
  // keeps the header order and checks the tiling by offset. Unpadded header too.
  const std::string header = R"({"b":{"dtype":"U8","shape":[2],"data_offsets":[1,3]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})";
  const auto path = dir_ / "reordered.safetensors";
  spit(path, le64(header.size()) + header + "ABC");
  const auto g = read_safetensors(path);
  ASSERT_EQ(g.tensors.size(), 2u);
  EXPECT_EQ(g.tensors[0].first, "b");
  EXPECT_EQ(g.at("a").values<std::uint8_t>(), std::vector<std::uint8_t>{'A'});
  EXPECT_EQ(g.at("b").values<std::uint8_t>(), (std::vector<std::uint8_t>{'B', 'C'}));
}

TEST_F(SafetensorsTest, TensorConversionsKeepValuesFormatIsCallersBusiness) {
  const Tensor w = intrain::testing::random_int({4, 8}, Format::fixed(8), 1, intrain::testing::Fill::Extremes, -7);
  const Tensor g = intrain::testing::random_int({2, 3, 4}, Format::fixed(12), 2, intrain::testing::Fill::Uniform, 3);
  const Tensor acc = intrain::testing::random_int({3, 5}, Format::accumulator(32), 3);
  const Tensor acc64 = intrain::testing::random_int({6}, Format::accumulator(64), 4);
  Tensor f(Shape{2, 5}, Format::fp32());
  for (int i = 0; i < 10; ++i) f.data<float>()[i] = 0.25f * static_cast<float>(i) - 1.0f;

  SafeTensorsFile file;
  file.metadata["w.exponent"] = std::to_string(w.exponent());
  file.metadata["g.exponent"] = std::to_string(g.exponent());
  file.add("w", to_safetensor(w));
  file.add("g", to_safetensor(g));
  file.add("acc", to_safetensor(acc));
  file.add("acc64", to_safetensor(acc64));
  file.add("f", to_safetensor(f));
  EXPECT_EQ(file.at("w").dtype, "I8");
  EXPECT_EQ(file.at("g").dtype, "I16");
  EXPECT_EQ(file.at("acc").dtype, "I32");
  EXPECT_EQ(file.at("acc64").dtype, "I64");
  EXPECT_EQ(file.at("f").dtype, "F32");
  const auto path = dir_ / "tensors.safetensors";
  write_safetensors(path, file);
  const auto r = read_safetensors(path);

  auto same = [](const Tensor& a, const Tensor& b) {
    ASSERT_EQ(a.shape(), b.shape());
    ASSERT_EQ(a.format(), b.format());
    EXPECT_EQ(a.exponent(), b.exponent());
    for (std::int64_t i = 0; i < a.numel(); ++i) ASSERT_EQ(a.value(i), b.value(i)) << i;
  };
  same(from_safetensor(r.at("w"), Format::fixed(8), std::stoi(r.metadata.at("w.exponent"))), w);
  same(from_safetensor(r.at("g"), Format::fixed(12), std::stoi(r.metadata.at("g.exponent"))), g);
  same(from_safetensor(r.at("acc"), Format::accumulator(32)), acc);
  same(from_safetensor(r.at("acc64"), Format::accumulator(64)), acc64);
  same(from_safetensor(r.at("f"), Format::fp32()), f);

  // Wrong storage type, rank the Tensor cannot hold, mantissa out of range.
  EXPECT_THROW(from_safetensor(r.at("w"), Format::fixed(12)), std::runtime_error);
  EXPECT_THROW(from_safetensor(r.at("f"), Format::fixed(8)), std::runtime_error);
  EXPECT_THROW(from_safetensor(SafeTensor::from_values<float>({}, std::vector<float>{1}), Format::fp32()),
               std::runtime_error);
  try {
    (void)from_safetensor(r.at("w"), Format::fixed(4));
    ADD_FAILURE() << "an int8 mantissa of +-127 must not load as int4";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("outside the range [-7, 7]"), std::string::npos) << e.what();
  }
}

TEST_F(SafetensorsTest, MissingFileAndDirectory) {
  expect_read_error(dir_ / "nope.safetensors", {"no such file"});
  expect_read_error(dir_, {"is a directory"});
}

TEST_F(SafetensorsTest, FileShorterThanEightBytes) {
  for (int len : {0, 1, 7}) {
    const auto path = dir_ / ("short" + std::to_string(len));
    spit(path, std::string(static_cast<std::size_t>(len), '\x10'));
    expect_read_error(path, {"shorter than the 8-byte header length", std::to_string(len) + " bytes"});
  }
}

TEST_F(SafetensorsTest, HeaderLengthLargerThanFileOrAbsurd) {
  const auto p1 = dir_ / "toolong";
  spit(p1, le64(1000) + "{}");
  expect_read_error(p1, {"header length 1000 is larger than the 2 bytes that follow"});
  const auto p2 = dir_ / "absurd";
  spit(p2, le64(0xFFFFFFFFFFFFFFF0ull) + "{}");
  expect_read_error(p2, {"absurd", "18446744073709551600"});
  const auto p3 = dir_ / "absurd2";
  spit(p3, le64(kMaxHeaderBytes + 1) + "{}");
  expect_read_error(p3, {"absurd"});
  const auto p4 = dir_ / "zero";
  spit(p4, le64(0) + "{}");
  expect_read_error(p4, {"header length (first 8 bytes) is 0"});
}

TEST_F(SafetensorsTest, HeaderNotJsonOrNotAnObject) {
  const auto p = dir_ / "bad.safetensors";
  spit(p, make_file(R"({"a": {"dtype": "I8", )", ""));
  expect_read_error(p, {"not valid JSON"});
  spit(p, make_file(std::string("{}\0\0\0\0\0\0", 8), ""));  // padded with NULs, not spaces
  expect_read_error(p, {"not valid JSON"});
  spit(p, make_file("[1, 2]", ""));
  expect_read_error(p, {"not a JSON object"});
  spit(p, make_file("\"{}\"", ""));
  expect_read_error(p, {"not a JSON object"});
  spit(p, make_file(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}})", "xy"));
  expect_read_error(p, {"key \"a\" twice"});
  spit(p, make_file(R"({"a":{"dtype":"U8","dtype":"U8","shape":[1],"data_offsets":[0,1]}})", "x"));
  expect_read_error(p, {"key \"dtype\" twice"});
}

TEST_F(SafetensorsTest, EntryMissingFieldsOrMalformed) {
  const auto p = dir_ / "bad.safetensors";
  spit(p, make_file(R"({"w":{"shape":[1],"data_offsets":[0,1]}})", "x"));
  expect_read_error(p, {"tensor \"w\" has no \"dtype\""});
  spit(p, make_file(R"({"w":{"dtype":"U8","data_offsets":[0,1]}})", "x"));
  expect_read_error(p, {"tensor \"w\" has no \"shape\""});
  spit(p, make_file(R"({"w":{"dtype":"U8","shape":[1]}})", "x"));
  expect_read_error(p, {"tensor \"w\" has no \"data_offsets\""});
  spit(p, make_file(R"({"w":[1,2]})", ""));
  expect_read_error(p, {"tensor \"w\" is an array, not an object"});
  spit(p, make_file(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"extra":1}})", "x"));
  expect_read_error(p, {"unknown key \"extra\""});
  spit(p, make_file(R"({"w":{"dtype":7,"shape":[1],"data_offsets":[0,1]}})", "x"));
  expect_read_error(p, {"dtype is a number"});
  spit(p, make_file(R"({"w":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}})", "x"));
  expect_read_error(p, {"shape [-1]", "negative"});
  spit(p, make_file(R"({"w":{"dtype":"U8","shape":[1.5],"data_offsets":[0,1]}})", "x"));
  expect_read_error(p, {"non-integer"});
  spit(p, make_file(R"({"w":{"dtype":"U8","shape":"1","data_offsets":[0,1]}})", "x"));
  expect_read_error(p, {"shape is a string"});
  spit(p, make_file(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0]}})", "x"));
  expect_read_error(p, {"data_offsets [0] is not [begin, end]"});
  spit(p, make_file(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[1,0]}})", "x"));
  expect_read_error(p, {"ends before it begins"});
  spit(p, make_file(R"({"w":{"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,1]}})", "x"));
  expect_read_error(p, {"overflows"});
  spit(p, make_file(R"({"__metadata__":{"step":12},"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})", "x"));
  expect_read_error(p, {"\"__metadata__\" entry \"step\" is a number, not a string"});
  spit(p, make_file(R"({"__metadata__":["a"]})", ""));
  expect_read_error(p, {"\"__metadata__\" is an array"});
}

TEST_F(SafetensorsTest, UnknownDtype) {
  const auto p = dir_ / "f16.safetensors";
  spit(p, make_file(R"({"h":{"dtype":"F16","shape":[1],"data_offsets":[0,2]}})", "xy"));
  expect_read_error(p, {"unsupported dtype \"F16\"", "supported: F32, I8, I16, I32, I64, U8"});
  spit(p, make_file(R"({"h":{"dtype":"i8","shape":[1],"data_offsets":[0,1]}})", "x"));
  expect_read_error(p, {"unsupported dtype \"i8\""});
}

TEST_F(SafetensorsTest, OffsetsOutOfRangeOverlappingOrNotMatchingTheShape) {
  const auto p = dir_ / "bad.safetensors";
  // Out of range: the data section has 4 bytes, the tensor claims [0, 8).
  spit(p, make_file(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", "abcd"));
  expect_read_error(p, {"reach past the end of the data section (4 bytes)"});
  // Huge offsets do not wrap around.
  spit(p, make_file(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[18446744073709551615,18446744073709551615]}})", "x"));
  expect_read_error(p, {"reach past the end"});
  // Size mismatch: shape [2] of I32 is 8 bytes, offsets hold 4.
  spit(p, make_file(R"({"w":{"dtype":"I32","shape":[2],"data_offsets":[0,4]}})", "abcd"));
  expect_read_error(p, {"hold 4 bytes", "needs 8"});
  // Overlap.
  spit(p, make_file(R"({"a":{"dtype":"I16","shape":[2],"data_offsets":[0,4]},"b":{"dtype":"I16","shape":[2],"data_offsets":[2,6]}})", "abcdef"));
  expect_read_error(p, {"tensor \"b\" at bytes [2, 6) overlaps tensor \"a\" at [0, 4)"});
  // Two tensors on the same bytes.
  spit(p, make_file(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})", "ab"));
  expect_read_error(p, {"overlaps"});
}

TEST_F(SafetensorsTest, DataSectionWithGapsOrTrailingGarbage) {
  const auto p = dir_ / "bad.safetensors";
  spit(p, make_file(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[3,5]}})", "abXcd"));
  expect_read_error(p, {"gap in the data section: bytes [2, 3)", "\"b\""});
  spit(p, make_file(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}})", "Xab"));
  expect_read_error(p, {"gap in the data section: bytes [0, 1)"});
  spit(p, make_file(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})", "abGARBAGE"));
  expect_read_error(p, {"7 trailing bytes"});
  spit(p, make_file("{}", "x"));
  expect_read_error(p, {"1 trailing bytes"});
}

TEST_F(SafetensorsTest, AbsentTensorNameNamesTheFile) {
  const auto path = dir_ / "model.safetensors";
  write_safetensors(path, sample_file());
  const auto g = read_safetensors(path);
  try {
    (void)g.at("w.missing");
    ADD_FAILURE() << "at() did not throw";
  } catch (const std::runtime_error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("no tensor \"w.missing\""), std::string::npos) << msg;
    EXPECT_NE(msg.find(path.string()), std::string::npos) << msg;
    EXPECT_NE(msg.find("w.f32"), std::string::npos) << msg;
  }
  EXPECT_FALSE(g.contains("w.missing"));
  EXPECT_EQ(g.find("w.missing"), nullptr);
  EXPECT_TRUE(g.contains("w.i8"));
}

// The header-only reader validates like the whole-file one, then reads one
// tensor at a time: the same bytes, in header order or any other; a file cut
// short after its header was read fails at that tensor, naming the file.
TEST_F(SafetensorsTest, HeaderOnlyReadLoadsTensorsOneAtATime) {
  const auto f = sample_file();
  const auto path = dir_ / "lazy.safetensors";
  write_safetensors(path, f);
  auto g = read_safetensors_header(path);
  EXPECT_EQ(g.metadata, f.metadata);
  ASSERT_EQ(g.tensors.size(), f.tensors.size());
  for (const auto& [name, t] : g.tensors) EXPECT_TRUE(t.data.empty()) << name;
  for (std::size_t k = f.tensors.size(); k-- > 0;) {  // last to first
    const std::string& name = f.tensors[k].first;
    load_tensor_data(g, name);
    EXPECT_EQ(g.at(name).data, f.tensors[k].second.data) << name;
    load_tensor_data(g, name);  // a second call reads nothing new
    EXPECT_EQ(g.at(name).data, f.tensors[k].second.data) << name;
  }
  EXPECT_THROW(load_tensor_data(g, "w.missing"), std::runtime_error);
  auto h = read_safetensors_header(path);
  const std::string bytes = slurp(path);
  spit(path, bytes.substr(0, bytes.size() - 1));
  EXPECT_MESSAGE_HAS(intrain::testing::thrown_message<std::runtime_error>([&] {
                       for (const auto& [name, t] : f.tensors) load_tensor_data(h, name);
                     }),
                     "lazy.safetensors");
  for (const char* bad : {"{", "not json"}) {
    spit(path, le64(std::string(bad).size()) + bad);
    EXPECT_THROW((void)read_safetensors_header(path), std::runtime_error) << bad;
  }
}

TEST_F(SafetensorsTest, EveryTruncationIsRejected) {
  const auto good = dir_ / "good.safetensors";
  write_safetensors(good, sample_file());
  const std::string bytes = slurp(good);
  const auto p = dir_ / "truncated.safetensors";
  for (std::size_t len = 0; len < bytes.size(); ++len) {
    spit(p, bytes.substr(0, len));
    EXPECT_THROW((void)read_safetensors(p), std::runtime_error) << "length " << len;
  }
  // And an appended byte is trailing garbage.
  spit(p, bytes + "!");
  expect_read_error(p, {"trailing"});
}

TEST_F(SafetensorsTest, RandomByteFlipsNeverCrash) {
  const auto good = dir_ / "good.safetensors";
  write_safetensors(good, sample_file());
  const std::string bytes = slurp(good);
  std::uint64_t header_end = 0;
  for (int i = 7; i >= 0; --i) header_end = header_end << 8 | static_cast<unsigned char>(bytes[static_cast<std::size_t>(i)]);
  header_end += 8;
  const auto p = dir_ / "flipped.safetensors";
  std::mt19937_64 rng(12345);
  int rejected = 0, accepted = 0;
  for (int iter = 0; iter < 3000; ++iter) {
    std::string b = bytes;
    const int flips = 1 + static_cast<int>(rng() % 3);
    for (int k = 0; k < flips; ++k) {
      // Mostly in the length and header, sometimes anywhere.
      const std::size_t at = iter % 4 == 0 ? rng() % b.size() : rng() % header_end;
      switch (rng() % 3) {
        case 0: b[at] = static_cast<char>(b[at] ^ (1 << (rng() % 8))); break;
        case 1: b[at] = static_cast<char>(rng()); break;
        default: b[at] = "{}[]\",:0-9 \\e."[rng() % 14]; break;
      }
    }
    spit(p, b);
    try {
      const auto g = read_safetensors(p);
      ++accepted;
      for (const auto& [name, t] : g.tensors) {
        ASSERT_EQ(static_cast<std::size_t>(t.numel()) * safetensors_dtype_size(t.dtype), t.data.size()) << name;
      }
    } catch (const std::runtime_error& e) {
      ++rejected;
      ASSERT_NE(std::string(e.what()).find(p.string()), std::string::npos) << e.what();
    }
  }
  EXPECT_GT(rejected, 1000);
  std::printf("byte flips: %d rejected, %d still valid\n", rejected, accepted);
}

TEST_F(SafetensorsTest, WriteRejectsInvalidInputBeforeTouchingTheDisk) {
  const auto path = dir_ / "model.safetensors";
  write_safetensors(path, sample_file());
  const std::string old = slurp(path);
  auto expect_invalid = [&](SafeTensorsFile f, const std::string& needle) {
    try {
      write_safetensors(path, f);
      ADD_FAILURE() << "write did not throw (" << needle << ")";
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(path.string()), std::string::npos) << e.what();
    }
    EXPECT_EQ(slurp(path), old);
    EXPECT_EQ(listing(dir_), std::vector<std::string>{"model.safetensors"});
  };
  SafeTensorsFile f = sample_file();
  f.tensors[2].second.data.pop_back();  // data size mismatches the shape
  expect_invalid(f, "needs 16 bytes of data, has 15");
  f = sample_file();
  f.tensors[1].second.dtype = "BF16";
  expect_invalid(f, "unsupported dtype \"BF16\"");
  f = sample_file();
  f.tensors.push_back(f.tensors[0]);
  expect_invalid(f, "appears twice");
  f = sample_file();
  f.tensors[0].first = "__metadata__";
  expect_invalid(f, "reserved");
  f = sample_file();
  f.tensors[0].first = "";
  expect_invalid(f, "empty name");
  f = sample_file();
  f.tensors[0].second.shape = {-2, -3};
  expect_invalid(f, "invalid shape");
  f = sample_file();
  f.metadata["bad"] = std::string("\xff\xfe", 2);
  expect_invalid(f, "UTF-8");
  EXPECT_THROW(sample_file().add("w.f32", SafeTensor{}), std::invalid_argument);
}

TEST_F(SafetensorsTest, AtomicWriteLeavesNoTempFileWhenTheDirectoryIsMissing) {
  const auto path = dir_ / "no" / "such" / "dir" / "model.safetensors";
  try {
    write_safetensors(path, sample_file());
    ADD_FAILURE() << "write into a missing directory did not throw";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("cannot create"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(path.string()), std::string::npos) << e.what();
  }
  EXPECT_TRUE(listing(dir_).empty());
}

TEST_F(SafetensorsTest, AtomicWriteRemovesTheTempFileWhenRenameFails) {
  // The target is a non-empty directory: the temp file is written in full,
  // then rename() fails; the temp file must be gone and the directory intact.
  const auto path = dir_ / "model.safetensors";
  fs::create_directories(path / "inside");
  try {
    write_safetensors(path, sample_file());
    ADD_FAILURE() << "rename over a directory did not throw";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("cannot rename"), std::string::npos) << e.what();
  }
  EXPECT_EQ(listing(dir_), std::vector<std::string>{"model.safetensors"});
  EXPECT_TRUE(fs::is_directory(path / "inside"));
}

TEST_F(SafetensorsTest, AtomicWriteKeepsTheOldFileWhenAWriteFailsHalfway) {
  // RLIMIT_FSIZE makes write() fail with EFBIG part way through the temp file
  // (it applies to root too). SIGXFSZ would kill the process: ignore it.
  const auto path = dir_ / "model.safetensors";
  write_safetensors(path, sample_file());
  const std::string old = slurp(path);
  SafeTensorsFile big;
  big.add("big", SafeTensor::from_values<float>({256, 256}, std::vector<float>(65536, 1.0f)));

  struct sigaction ign{}, saved{};
  ign.sa_handler = SIG_IGN;
  ASSERT_EQ(::sigaction(SIGXFSZ, &ign, &saved), 0);
  rlimit lim{}, saved_lim{};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &saved_lim), 0);
  lim = saved_lim;
  lim.rlim_cur = 64 * 1024;
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &lim), 0);
  std::string msg;
  try {
    write_safetensors(path, big);
  } catch (const std::runtime_error& e) {
    msg = e.what();
  }
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &saved_lim), 0);
  ASSERT_EQ(::sigaction(SIGXFSZ, &saved, nullptr), 0);

  EXPECT_NE(msg.find("failed"), std::string::npos) << "expected a write failure, got: " << msg;
  EXPECT_NE(msg.find(path.string()), std::string::npos) << msg;
  EXPECT_EQ(slurp(path), old);
  EXPECT_EQ(listing(dir_), std::vector<std::string>{"model.safetensors"});
  EXPECT_EQ(read_safetensors(path).tensors.size(), sample_file().tensors.size());
}

TEST_F(SafetensorsTest, AtomicWriteIntoAReadOnlyDirectory) {
  if (::geteuid() == 0) GTEST_SKIP() << "running as root: a read-only directory is still writable";
  const auto path = dir_ / "model.safetensors";
  write_safetensors(path, sample_file());
  const std::string old = slurp(path);
  fs::permissions(dir_, fs::perms::owner_write | fs::perms::group_write | fs::perms::others_write,
                  fs::perm_options::remove);
  EXPECT_THROW(write_safetensors(path, SafeTensorsFile{}), std::runtime_error);
  fs::permissions(dir_, fs::perms::owner_write, fs::perm_options::add);
  EXPECT_EQ(slurp(path), old);
  EXPECT_EQ(listing(dir_), std::vector<std::string>{"model.safetensors"});
}

TEST_F(SafetensorsTest, OverwriteReplacesTheFileAndLeavesNoTempFile) {
  const auto path = dir_ / "model.safetensors";
  write_safetensors(path, sample_file());
  SafeTensorsFile f;
  f.add("only", SafeTensor::from_values<std::int32_t>({2}, std::vector<std::int32_t>{7, 8}));
  write_safetensors(path, f);
  const auto g = read_safetensors(path);
  ASSERT_EQ(g.tensors.size(), 1u);
  EXPECT_EQ(g.at("only").values<std::int32_t>(), (std::vector<std::int32_t>{7, 8}));
  EXPECT_EQ(listing(dir_), std::vector<std::string>{"model.safetensors"});
}
