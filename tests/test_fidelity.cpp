// Teacher-fidelity statistics (analysis/fidelity.h, docs/fidelity.md): KL,
// top-1/top-5 agreement, delta-p and percentiles against hand-computed values,
// a model against itself, integer logits against their float dequantization,
// and `intrain eval --teacher` end to end.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "analysis/fidelity.h"
#include "experiments/checkpoint.h"
#include "experiments/corpus.h"
#include "experiments/evaluate.h"
#include "experiments/train.h"
#include "test_support.h"
#include "tests/run_support.h"

namespace intrain {
namespace {

namespace fs = std::filesystem;
using testing::fresh_dir;
using testing::run_cli;
using testing::thrown_message;
using testing::tiny_corpus;

// A logit of -1000 gives probability exactly 0 in double (exp(-1000) underflows),
// so each hand-made row below is a distribution over two or six entries whose
// log-softmax has a closed form.
constexpr double kOff = -1000.0;
const double kE = std::exp(1.0);

Tensor float_rows(const std::vector<std::vector<double>>& rows) {
  const auto V = static_cast<std::int64_t>(rows.front().size());
  Tensor t({static_cast<std::int64_t>(rows.size()), V}, Format::fp32());
  float* p = t.data<float>();
  for (std::size_t r = 0; r < rows.size(); ++r)
    for (std::int64_t v = 0; v < V; ++v) p[static_cast<std::int64_t>(r) * V + v] = static_cast<float>(rows[r][v]);
  return t;
}

// Six tokens over a vocabulary of 6:
struct HandCase {
  std::vector<std::vector<double>> teacher, model;
  std::vector<std::int32_t> targets;
};

// Row by row (p_t, p_m: teacher's / model's distribution; y: target):
//  0  t = m = (0,0,0,0,0, ln 3): p = (1/8 x5, 3/8).          y=5. KL 0, top1 yes, top5 yes,
//     nll = teacher nll = ln(8/3), dp = 0.
//  1  t = (0, 0, off..): p_t = (1/2, 1/2); m = (ln 3, 0, off..): p_m = (3/4, 1/4).   y=1.
//     KL = 1/2 ln((1/2)/(3/4)) + 1/2 ln((1/2)/(1/4)) = 1/2 ln(4/3) = 0.14384103622589042
//     (the reverse direction KL(m||t) would be 0.13081203594113697).
//     argmax_t = 0 (tie: smallest index), argmax_m = 0: top1 yes, top5 yes.
//     nll = ln 4, teacher nll = ln 2, dp = 1/4 - 1/2 = -1/4.
//  2  t = (0, ln 3, off..): p_t = (1/4, 3/4); m = (ln 3, 0, off..): p_m = (3/4, 1/4).  y=0.
//     KL = 1/4 ln(1/3) + 3/4 ln 3 = 1/2 ln 3 = 0.5493061443340549.
//     argmax_t = 1, argmax_m = 0: top1 no; rank of 1 in m is 1 (only m[0] > m[1]): top5 yes.
//     nll = ln(4/3), teacher nll = ln 4, dp = 3/4 - 1/4 = 1/2.
//  3  t = (off x5, 0): p_t = delta_5; m = (0,0,0,0,0, -ln 5): p_m(5) = (1/5)/(5 + 1/5) = 1/26.  y=5.
//     KL = ln 26 = 3.258096538021482. argmax_m = 0: top1 no; 5 entries above m[5]: rank 5, top5 no.
//     nll = ln 26, teacher nll = 0, dp = 1/26 - 1 = -25/26.
//  4  t = delta_5 as in 3; m = (1,1,1,1,0,0): p_m(5) = 1/(4e + 2).  y=5.
//     KL = ln(4e + 2) = 2.555141984618196. top1 no. Rank of 5: four entries greater plus the
//     tie m[4] = m[5] with the smaller index 4: rank 5, top5 no (ties go to the smaller index).
//     nll = ln(4e + 2), teacher nll = 0, dp = 1/(4e + 2) - 1.
//  5  t = delta_4; m = (1,1,1,0,0,0): p_m(4) = 1/(3e + 3).  y=4.
//     KL = ln(3e + 3) = 2.4118739761863326. top1 no. Rank of 4: three greater plus the tie
//     m[3] (index 3 < 4): rank 4, top5 yes.
//     nll = ln(3e + 3), teacher nll = 0, dp = 1/(3e + 3) - 1.
HandCase hand_case() {
  const double l3 = std::log(3.0), l5 = std::log(5.0);
  HandCase c;
  c.teacher = {{0, 0, 0, 0, 0, l3},
               {0, 0, kOff, kOff, kOff, kOff},
               {0, l3, kOff, kOff, kOff, kOff},
               {kOff, kOff, kOff, kOff, kOff, 0},
               {kOff, kOff, kOff, kOff, kOff, 0},
               {kOff, kOff, kOff, kOff, 0, kOff}};
  c.model = {{0, 0, 0, 0, 0, l3},
             {l3, 0, kOff, kOff, kOff, kOff},
             {l3, 0, kOff, kOff, kOff, kOff},
             {0, 0, 0, 0, 0, -l5},
             {1, 1, 1, 1, 0, 0},
             {1, 1, 1, 0, 0, 0}};
  c.targets = {5, 1, 0, 5, 5, 4};
  return c;
}

// Tolerances. token_fidelity() takes the logits in double: a few dozen
// roundings of O(1) values, so 1e-12 absolute. The accumulator takes Tensors,
// here float ones: ln 3 stored in float is off by ~3e-8, which moves the
// results by at most ~1e-7, so 1e-6 absolute. Every definitional mistake (KL
// direction: 0.1308 vs 0.1438; bits vs nats: a factor 1.44; a tie rule) moves
// them by more than 1e-2.
constexpr double kTokenTol = 1e-12;
constexpr double kHandTol = 1e-6;

TEST(Fidelity, TokenValuesMatchHandComputation) {
  const HandCase c = hand_case();
  struct Want {
    double kl, nll, tnll, dp;
    bool top1, top5;
  };
  const std::vector<Want> want = {
      {0.0, std::log(8.0 / 3.0), std::log(8.0 / 3.0), 0.0, true, true},
      {0.5 * std::log(4.0 / 3.0), std::log(4.0), std::log(2.0), -0.25, true, true},
      {0.5 * std::log(3.0), std::log(4.0 / 3.0), std::log(4.0), 0.5, false, true},
      {std::log(26.0), std::log(26.0), 0.0, 1.0 / 26.0 - 1.0, false, false},
      {std::log(4 * kE + 2), std::log(4 * kE + 2), 0.0, 1.0 / (4 * kE + 2) - 1.0, false, false},
      {std::log(3 * kE + 3), std::log(3 * kE + 3), 0.0, 1.0 / (3 * kE + 3) - 1.0, false, true}};
  for (std::size_t r = 0; r < want.size(); ++r) {
    const TokenFidelity f = token_fidelity(c.model[r], c.teacher[r], c.targets[r]);
    EXPECT_NEAR(f.kl, want[r].kl, kTokenTol) << "row " << r;
    EXPECT_NEAR(f.nll, want[r].nll, kTokenTol) << "row " << r;
    EXPECT_NEAR(f.teacher_nll, want[r].tnll, kTokenTol) << "row " << r;
    EXPECT_NEAR(f.dp, want[r].dp, kTokenTol) << "row " << r;
    EXPECT_EQ(f.top1, want[r].top1) << "row " << r;
    EXPECT_EQ(f.top5, want[r].top5) << "row " << r;
  }
}

TEST(Fidelity, ReportMatchesHandComputation) {
  const HandCase c = hand_case();
  FidelityAccumulator acc;
  const Tensor m = float_rows(c.model), t = float_rows(c.teacher);
  acc.add(m, &t, c.targets.data());
  const nlohmann::json j = acc.report();
  EXPECT_EQ(j["tokens"].get<std::int64_t>(), 6);
  // NLL mean = (ln(8/3) + ln 4 + ln(4/3) + ln 26 + ln(4e+2) + ln(3e+3)) / 6 = 1.8133196975682349
  const double nll = (std::log(8.0 / 3) + std::log(4.0) + std::log(4.0 / 3) + std::log(26.0) + std::log(4 * kE + 2) +
                      std::log(3 * kE + 3)) / 6;
  // teacher NLL mean = (ln(8/3) + ln 2 + ln 4 + 0 + 0 + 0) / 6 = 0.5100451324485937
  const double tnll = (std::log(8.0 / 3) + std::log(2.0) + std::log(4.0)) / 6;
  EXPECT_NEAR(j["nll"].get<double>(), nll, kHandTol);
  EXPECT_NEAR(j["perplexity"].get<double>(), 6.1307659767637945, 1e-5);  // exp(1.81332); 1e-6 of ln -> 6e-6 of ppl
  EXPECT_NEAR(j["teacher_nll"].get<double>(), tnll, kHandTol);
  EXPECT_NEAR(j["teacher_perplexity"].get<double>(), 1.6653663553112088, 1e-5);  // exp(0.51005)
  EXPECT_NEAR(j["perplexity_ratio"].get<double>(), 3.6813317125156715, 1e-5);  // exp(1.81332 - 0.51005)

  // Sorted KL: x0..x5 = 0, 1/2 ln(4/3), 1/2 ln 3, ln(3e+3), ln(4e+2), ln 26
  //              = 0, 0.143841, 0.549306, 2.411874, 2.555142, 3.258097.
  const double x2 = 0.5 * std::log(3.0), x3 = std::log(3 * kE + 3), x4 = std::log(4 * kE + 2), x5 = std::log(26.0);
  // mean = 8.918259679385957 / 6 = 1.4863766132309928
  const double mean = (0.5 * std::log(4.0 / 3) + x2 + x3 + x4 + x5) / 6;
  EXPECT_NEAR(j["kl_mean"].get<double>(), mean, kHandTol);
  // stderr = sqrt(sum (x_i - mean)^2 / 5 / 6) = 0.5781468831642618
  EXPECT_NEAR(j["kl_stderr"].get<double>(), 0.5781468831642618, kHandTol);
  // Linear interpolation, h = f (n - 1) = 5 f:
  //   median h = 2.5:   (x2 + x3)/2          = 1.4805900602601936
  //   p90    h = 4.5:   x4 + 0.5 (x5 - x4)   = 2.906619261319839
  //   p95    h = 4.75:  x4 + 0.75 (x5 - x4)  = 3.0823578996706607
  //   p99    h = 4.95:  x4 + 0.95 (x5 - x4)  = 3.222948810351318
  //   p99.9  h = 4.995: x4 + 0.995 (x5 - x4) = 3.254581765254466
  EXPECT_NEAR(j["kl_median"].get<double>(), 0.5 * (x2 + x3), kHandTol);
  EXPECT_NEAR(j["kl_p90"].get<double>(), x4 + 0.5 * (x5 - x4), kHandTol);
  EXPECT_NEAR(j["kl_p95"].get<double>(), x4 + 0.75 * (x5 - x4), kHandTol);
  EXPECT_NEAR(j["kl_p99"].get<double>(), x4 + 0.95 * (x5 - x4), kHandTol);
  EXPECT_NEAR(j["kl_p999"].get<double>(), x4 + 0.995 * (x5 - x4), kHandTol);
  EXPECT_NEAR(j["kl_max"].get<double>(), x5, kHandTol);
  // top-1: rows 0, 1 -> 2/6; top-5: rows 0, 1, 2, 5 -> 4/6; both stderr sqrt((1/3)(2/3)/6) = sqrt(1/27).
  // Counts are exact, so these are compared to 1e-15 (one rounding of a division).
  EXPECT_NEAR(j["top1"].get<double>(), 1.0 / 3, 1e-15);
  EXPECT_NEAR(j["top5"].get<double>(), 2.0 / 3, 1e-15);
  EXPECT_NEAR(j["top1_stderr"].get<double>(), std::sqrt(1.0 / 27), 1e-15);
  EXPECT_NEAR(j["top5_stderr"].get<double>(), std::sqrt(1.0 / 27), 1e-15);
  // dp = (0, -1/4, 1/2, -25/26, 1/(4e+2) - 1, 1/(3e+3) - 1): mean -0.42403501988888576,
  // rms sqrt(mean dp^2) = 0.6971932428799306.
  EXPECT_NEAR(j["dp_mean"].get<double>(), -0.42403501988888576, kHandTol);
  EXPECT_NEAR(j["dp_rms"].get<double>(), 0.6971932428799306, kHandTol);
}

TEST(Fidelity, PercentileIsLinearInterpolationBetweenRanks) {
  const std::vector<double> x = {10, 20, 30, 40};
  // h = f * 3: f=0.5 -> h=1.5 -> 25; f=0.9 -> h=2.7 -> 30 + 0.7*10 = 37; f=0.1 -> h=0.3 -> 13.
  EXPECT_DOUBLE_EQ(percentile_of_sorted(x, 0.5), 25.0);
  EXPECT_DOUBLE_EQ(percentile_of_sorted(x, 0.9), 37.0);
  EXPECT_DOUBLE_EQ(percentile_of_sorted(x, 0.1), 13.0);
  EXPECT_EQ(percentile_of_sorted(x, 0.0), 10.0);
  EXPECT_EQ(percentile_of_sorted(x, 1.0), 40.0);
  EXPECT_EQ(percentile_of_sorted(std::vector<double>{7.0}, 0.999), 7.0);
  // Odd n: the median is the middle value.
  EXPECT_EQ(percentile_of_sorted(std::vector<double>{1, 2, 9}, 0.5), 2.0);
  EXPECT_THROW(percentile_of_sorted(std::vector<double>{}, 0.5), std::invalid_argument);
  EXPECT_THROW(percentile_of_sorted(x, 1.5), std::invalid_argument);
}

// Random logits [R, V] with values spread over about +-8 nats.
Tensor random_logits(std::int64_t R, std::int64_t V, std::uint64_t seed) {
  const std::vector<float> v = testing::normal_floats(R * V, seed, 3.0f);
  Tensor t({R, V}, Format::fp32());
  std::copy(v.begin(), v.end(), t.data<float>());
  return t;
}

std::vector<std::int32_t> random_targets(std::int64_t R, std::int64_t V, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<std::int32_t> d(0, static_cast<std::int32_t>(V - 1));
  std::vector<std::int32_t> y(static_cast<std::size_t>(R));
  for (auto& x : y) x = d(rng);
  return y;
}

// Identical inputs go through identical double operations, so every per-token
// difference is exactly 0: compared with no tolerance.
TEST(Fidelity, TeacherEqualToModelGivesZeroKlAndFullAgreement) {
  const Tensor m = random_logits(300, 256, 11);
  const auto y = random_targets(300, 256, 12);
  FidelityAccumulator acc;
  acc.add(m, &m, y.data());
  const nlohmann::json j = acc.report();
  EXPECT_EQ(j["kl_mean"].get<double>(), 0.0);
  EXPECT_EQ(j["kl_max"].get<double>(), 0.0);
  EXPECT_EQ(j["kl_p999"].get<double>(), 0.0);
  EXPECT_EQ(j["top1"].get<double>(), 1.0);
  EXPECT_EQ(j["top5"].get<double>(), 1.0);
  EXPECT_EQ(j["top1_stderr"].get<double>(), 0.0);
  EXPECT_EQ(j["dp_mean"].get<double>(), 0.0);
  EXPECT_EQ(j["dp_rms"].get<double>(), 0.0);
  EXPECT_EQ(j["perplexity_ratio"].get<double>(), 1.0);
  EXPECT_EQ(j["nll"].get<double>(), j["teacher_nll"].get<double>());
}

// An acc32 tensor at exponent -10 with mantissas below 2^20 and the float
// tensor of its values (m * 2^-10, exact in float) are the same real numbers,
// so the reports are equal exactly.
TEST(Fidelity, IntegerAccumulatorLogitsEqualTheirFloatDequantization) {
  const std::int64_t R = 200, V = 256;
  Tensor acc_logits({R, V}, Format::accumulator(32), -10);
  Tensor deq({R, V}, Format::fp32());
  std::mt19937_64 rng(5);
  std::uniform_int_distribution<std::int32_t> d(-(1 << 20), 1 << 20);
  for (std::int64_t i = 0; i < R * V; ++i) {
    const std::int32_t q = d(rng);
    acc_logits.data<std::int32_t>()[i] = q;
    deq.data<float>()[i] = std::ldexp(static_cast<float>(q), -10);
  }
  const Tensor teacher = random_logits(R, V, 6);
  const auto y = random_targets(R, V, 7);
  FidelityAccumulator a, b;
  a.add(acc_logits, &teacher, y.data());
  b.add(deq, &teacher, y.data());
  EXPECT_EQ(a.report(), b.report());
  EXPECT_GT(a.report()["kl_mean"].get<double>(), 0.0);  // not trivially equal: the two models differ
}

// Per-row values kept by index and summed in row order: the same report for
// 1 and 2 threads and however the rows are cut into add() calls.
TEST(Fidelity, ReportIndependentOfThreadsAndBatching) {
  const std::int64_t R = 512, V = 64;
  const Tensor m = random_logits(R, V, 21), t = random_logits(R, V, 22);
  const auto y = random_targets(R, V, 23);
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  FidelityAccumulator one;
  one.add(m, &t, y.data());
  omp_set_num_threads(2);
  FidelityAccumulator two;
  two.add(m, &t, y.data());
  omp_set_num_threads(saved);
  EXPECT_EQ(one.report(), two.report());
  // Rows [0, 100) and [100, 512) in two calls.
  FidelityAccumulator split;
  for (auto [r0, r1] : {std::pair<std::int64_t, std::int64_t>{0, 100}, {100, R}}) {
    Tensor mm({r1 - r0, V}, Format::fp32()), tt({r1 - r0, V}, Format::fp32());
    std::copy(m.data<float>() + r0 * V, m.data<float>() + r1 * V, mm.data<float>());
    std::copy(t.data<float>() + r0 * V, t.data<float>() + r1 * V, tt.data<float>());
    split.add(mm, &tt, y.data() + r0);
  }
  EXPECT_EQ(split.report(), one.report());
  EXPECT_EQ(split.tokens(), R);
}

TEST(Fidelity, WithoutTeacherOnlyPerplexity) {
  const HandCase c = hand_case();
  FidelityAccumulator acc;
  EXPECT_EQ(acc.report(), nlohmann::json({{"tokens", 0}}));
  acc.add(float_rows(c.model), nullptr, c.targets.data());
  const nlohmann::json j = acc.report();
  EXPECT_EQ(j.size(), 3u) << j.dump();  // tokens, nll, perplexity
  EXPECT_NEAR(j["nll"].get<double>(), 1.8133196975682349, kHandTol);
  EXPECT_FALSE(j.contains("kl_mean"));
}

TEST(Fidelity, BadInputThrows) {
  const HandCase c = hand_case();
  const Tensor m = float_rows(c.model), t = float_rows(c.teacher);
  FidelityAccumulator acc;
  const Tensor narrow = random_logits(6, 5, 1);
  EXPECT_NE(thrown_message<std::invalid_argument>([&] { acc.add(m, &narrow, c.targets.data()); }).find("do not match"),
            std::string::npos);
  std::vector<std::int32_t> bad = c.targets;
  bad[3] = 6;
  EXPECT_NE(thrown_message<std::invalid_argument>([&] { acc.add(m, &t, bad.data()); }).find("row 3"), std::string::npos);
  Tensor nan_logits = m;
  nan_logits.data<float>()[2 * 6 + 1] = std::nanf("");
  EXPECT_NE(thrown_message<std::invalid_argument>([&] { acc.add(nan_logits, &t, c.targets.data()); }).find("row 2"),
            std::string::npos);
  EXPECT_EQ(acc.tokens(), 0);  // rejected batches leave no trace
  acc.add(m, &t, c.targets.data());
  EXPECT_THROW(acc.add(m, nullptr, c.targets.data()), std::logic_error);
}

// ---- through the models and the CLI

TrainOptions tiny_train(const fs::path& out, int context, long steps) {
  TrainOptions o = testing::tiny_train_options(out, "fp32", 1, context, steps);
  o.eval_windows = 2;
  o.final_eval_windows = 2;
  return o;
}

// evaluate_fidelity's NLL is the validation loss eval printed before it
// existed: the window-weighted mean of GPT::forward's cross-entropy. Both are
// double log-sum-exp over the same float logits, summed in different orders:
// 1e-12 relative.
TEST(FidelityEval, NllEqualsForwardCrossEntropy) {
  const fs::path dir = fresh_dir("fidelity_nll");
  run_train(tiny_train(dir, 16, 5));
  GPT model = load_model(dir / "model.safetensors", "int8", Rounding::Stochastic);
  const Corpus corpus = Corpus::load(tiny_corpus(), 17);
  const nlohmann::json j = evaluate_fidelity(model, nullptr, corpus, 4, 10, 1);
  ValWindows w(corpus.val, 16, 10);
  std::vector<std::int32_t> x(4 * 16), y(x.size());
  double sum = 0;
  std::int64_t n = 0, b = 0;
  while (int got = w.next(4, x.data(), y.data())) {
    sum += model.forward(x.data(), y.data(), got, 16, (std::uint64_t{1} << 40) + b++, 1, false) * got * 16;
    n += got * 16;
  }
  EXPECT_EQ(j["tokens"].get<std::int64_t>(), n);
  EXPECT_NEAR(j["nll"].get<double>(), sum / n, 1e-12 * sum / n);
  fs::remove_all(dir);
}

TEST(FidelityEval, CliTeacherAgainstItselfAndBadTeachers) {
  const fs::path dir = fresh_dir("fidelity_cli"), other = fresh_dir("fidelity_cli_ctx8");
  run_train(tiny_train(dir, 16, 5));
  run_train(tiny_train(other, 8, 2));
  const std::string model = (dir / "model.safetensors").string(), data = " --data " + tiny_corpus().string();
  std::string text;
  ASSERT_EQ(run_cli("eval --model " + model + " --teacher " + model + data, &text), 0) << text;
  nlohmann::json j = nlohmann::json::parse(text);
  // The same file run twice with the same rounding keys: identical logits, so exactly 0 and 1.
  EXPECT_EQ(j["kl_mean"].get<double>(), 0.0);
  EXPECT_EQ(j["kl_max"].get<double>(), 0.0);
  EXPECT_EQ(j["top1"].get<double>(), 1.0);
  EXPECT_EQ(j["top5"].get<double>(), 1.0);
  EXPECT_EQ(j["dp_rms"].get<double>(), 0.0);
  EXPECT_EQ(j["perplexity_ratio"].get<double>(), 1.0);
  EXPECT_EQ(j["loss"].get<double>(), j["nll"].get<double>());
  EXPECT_EQ(j["teacher"].get<std::string>(), model);
  EXPECT_GT(j["tokens"].get<std::int64_t>(), 1000);

  // The int8 run of the float model against the float model: a small, non-zero KL.
  ASSERT_EQ(run_cli("eval --model " + model + " --format int8 --teacher " + model + data, &text), 0) << text;
  j = nlohmann::json::parse(text);
  EXPECT_GT(j["kl_mean"].get<double>(), 0.0);
  EXPECT_LE(j["kl_median"].get<double>(), j["kl_p90"].get<double>());
  EXPECT_LE(j["kl_p99"].get<double>(), j["kl_max"].get<double>());
  EXPECT_EQ(j["teacher_format"].get<std::string>(), "fp32");

  // A teacher of another context, and a missing teacher file: non-zero exit naming the problem.
  EXPECT_NE(run_cli("eval --model " + model + " --teacher " + (other / "model.safetensors").string() + data, &text), 0);
  EXPECT_NE(text.find("--teacher"), std::string::npos) << text;
  EXPECT_NE(text.find("context"), std::string::npos) << text;
  const std::string missing = (dir / "no_such_teacher.safetensors").string();
  EXPECT_NE(run_cli("eval --model " + model + " --teacher " + missing + data, &text), 0);
  EXPECT_NE(text.find(missing), std::string::npos) << text;
  fs::remove_all(dir);
  fs::remove_all(other);
}

}  // namespace
}  // namespace intrain
