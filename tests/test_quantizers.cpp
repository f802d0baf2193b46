// AdpQ and OAC (core/adpq.h, core/oac.h, core/salient_weights.h), the damping
// that never fails silently (core/gptq.h), and `intrain quantize`'s handling
// of all four methods and of bad input (experiments/quantize.h).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>
#include <vector>

#include "core/adpq.h"
#include "core/gptq.h"
#include "core/oac.h"
#include "core/packed_matmul.h"
#include "core/quantize.h"
#include "core/salient_weights.h"
#include "experiments/checkpoint.h"
#include "experiments/quantize.h"
#include "experiments/train.h"
#include "run_support.h"
#include "test_support.h"

namespace intrain {
namespace {

namespace fs = std::filesystem;
using testing::file_bytes;
using testing::fresh_dir;
using testing::run_cli;
using testing::tiny_corpus;

// Heavy-tailed weights: N(0, 0.02) with 1% outliers of 10-30x.
std::vector<float> heavy_tailed(std::int64_t n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, 0.02f);
  std::uniform_real_distribution<float> u(10.0f, 30.0f);
  std::vector<float> w(static_cast<std::size_t>(n));
  for (float& x : w) x = d(rng) * ((rng() % 100 == 0) ? u(rng) : 1.0f);
  return w;
}

TEST(SalientWeights, PackUnpackDequantizeExactAtEveryWidth) {
  const std::int64_t K = 40, N = 24, m = 77;  // K·N = 960: 10 position bits
  const int G = 16;
  std::mt19937_64 rng(7);
  std::vector<std::uint32_t> all(static_cast<std::size_t>(K * N));
  for (std::size_t i = 0; i < all.size(); ++i) all[i] = static_cast<std::uint32_t>(i);
  std::shuffle(all.begin(), all.end(), rng);
  std::vector<std::uint32_t> pos(all.begin(), all.begin() + m);
  std::sort(pos.begin(), pos.end());
  for (int b = 2; b <= 8; ++b) {
    const std::int64_t ng = (m + G - 1) / G;
    std::vector<std::uint8_t> q(static_cast<std::size_t>(m)), z(static_cast<std::size_t>(ng));
    std::vector<float> s(static_cast<std::size_t>(ng));
    for (auto& c : q) c = static_cast<std::uint8_t>(rng() % (1u << b));
    for (auto& c : z) c = static_cast<std::uint8_t>(rng() % (1u << b));
    for (auto& c : s) c = half_to_float(float_to_half(std::ldexp(1.0f + static_cast<float>(rng() % 1000) / 1000.0f, -static_cast<int>(rng() % 12))));
    const SalientWeights S = SalientWeights::pack(K, N, b, G, pos, q, z, s);
    EXPECT_EQ(S.position_bits(), 10);
    EXPECT_EQ(S.storage_bits(), m * (10 + b) + ng * (b + 16) + 32);
    const std::vector<float> dense = S.dequantize();
    for (std::int64_t j = 0; j < m; ++j) {
      const auto u = static_cast<std::size_t>(j);
      ASSERT_EQ(S.position(j), pos[u]);
      ASSERT_EQ(S.code(j), q[u]);
      const float v = s[static_cast<std::size_t>(j / G)] * static_cast<float>(int{q[u]} - int{z[static_cast<std::size_t>(j / G)]});
      ASSERT_EQ(S.value(j), v);  // exact: an 11-bit scale times a 9-bit integer
      ASSERT_EQ(dense[static_cast<std::size_t>((pos[u] % K) * N + pos[u] / K)], v);
    }
    int nonzero = 0;
    for (float v : dense) nonzero += v != 0.0f;
    EXPECT_LE(nonzero, m);
    const SalientWeights back = SalientWeights::from_storage(K, N, b, G, m, S.packed_positions(), S.packed_codes(),
                                                             S.packed_zeros(), S.scale_bits());
    EXPECT_EQ(back, S) << "bits " << b;
  }
  std::vector<std::uint32_t> unsorted = {5, 3};
  std::vector<std::uint8_t> q2 = {1, 1}, z2 = {0};
  std::vector<float> s2 = {1.0f};
  EXPECT_THROW((void)SalientWeights::pack(K, N, 4, G, unsorted, q2, z2, s2), std::invalid_argument);
}

// AdpQ's split: the salient entries are the m largest |w|, the remainder is
// bounded by τ, and Ŵ = base + salient; on heavy-tailed weights its squared
// error is below RTN's at 3, 4 and 8 bits (the outliers no longer set the
// scales). Not at 2 bits on this data: the salient values themselves get
// only 4 levels per group of 32 mixed-sign outliers, and that error (2.04
// against RTN's 1.25 when written) outweighs the gain on the bulk; printed,
// not asserted. (On the trained model AdpQ beats RTN at 2 bits: docs.)
TEST(Adpq, SplitsTheLargestWeightsAndBeatsRtnOnHeavyTails) {
  const std::int64_t K = 128, N = 64;
  const std::vector<float> W = heavy_tailed(K * N, 3);
  for (int b : {2, 3, 4, 8}) {
    AdpqOptions o;
    o.bits = b;
    o.group = 32;
    o.salient_fraction = 0.01;
    const AdpqResult r = quantize_adpq(W, K, N, o);
    const auto m = static_cast<std::int64_t>(std::llround(0.01 * static_cast<double>(K * N)));
    EXPECT_EQ(r.salient.count(), m);  // random floats: no ties at τ
    std::int64_t above = 0;
    for (float w : W) above += std::abs(w) > r.threshold;
    EXPECT_EQ(above, m);
    EXPECT_NEAR(r.bits_per_weight(), r.base.bits_per_weight() + static_cast<double>(r.salient.storage_bits()) / (K * N), 1e-12);
    const std::vector<float> base = r.base.dequantize(), sal = r.salient.dequantize();
    const std::vector<float> rtn = quantize_rtn(W, K, N, b, 32).dequantize();
    double e_adpq = 0.0, e_rtn = 0.0;
    for (std::size_t i = 0; i < W.size(); ++i) {
      e_adpq += std::pow(static_cast<double>(W[i]) - (base[i] + sal[i]), 2);
      e_rtn += std::pow(static_cast<double>(W[i]) - rtn[i], 2);
    }
    std::printf("  %d bits: AdpQ squared error %.4g, RTN %.4g, %.3f bits/weight\n", b, e_adpq, e_rtn, r.bits_per_weight());
    if (b >= 3) {
      EXPECT_LT(e_adpq, e_rtn) << b << " bits";
    }
  }
}

// The salient part inside QuantizedLinear's products, against the dense
// Ŵ + S in double: fp32 forward and backward (float sums of K terms:
// 1e-5 relative to the row's magnitude allowed), integer forward (exact
// integers; the double reference is exact to 1e-12 relative).
TEST(Adpq, SalientTermInTheMatmulsMatchesTheDenseWeight) {
  const std::int64_t K = 128, N = 64, R = 9;
  const std::vector<float> W = heavy_tailed(K * N, 5);
  AdpqOptions o;
  o.bits = 3;
  o.group = 32;
  o.salient_fraction = 0.02;
  const AdpqResult a = quantize_adpq(W, K, N, o);
  std::vector<double> dense(static_cast<std::size_t>(K * N));
  const std::vector<float> b = a.base.dequantize(), s = a.salient.dequantize();
  for (std::size_t i = 0; i < dense.size(); ++i) dense[i] = static_cast<double>(b[i]) + s[i];

  const std::vector<float> xf = testing::normal_floats(R * K, 11, 1.0f);
  const Tensor X = quantize(xf, {R, K}, Format::fp32());
  Tensor Y = packed_matmul(X, a.base);
  salient_matmul_add(Y, X, a.salient);
  for (std::int64_t r = 0; r < R; ++r)
    for (std::int64_t n = 0; n < N; ++n) {
      double ref = 0.0, mag = 0.0;
      for (std::int64_t k = 0; k < K; ++k) {
        ref += xf[static_cast<std::size_t>(r * K + k)] * dense[static_cast<std::size_t>(k * N + n)];
        mag += std::abs(xf[static_cast<std::size_t>(r * K + k)] * dense[static_cast<std::size_t>(k * N + n)]);
      }
      ASSERT_NEAR(Y.data<float>()[r * N + n], ref, 1e-5 * mag);
    }
  const std::vector<float> ef = testing::normal_floats(R * N, 12, 1.0f);
  const Tensor E = quantize(ef, {R, N}, Format::fp32());
  Tensor dX = packed_matmul_t(E, a.base, RngKey{});
  salient_matmul_t_add(dX, E, a.salient);
  for (std::int64_t r = 0; r < R; ++r)
    for (std::int64_t k = 0; k < K; ++k) {
      double ref = 0.0, mag = 0.0;
      for (std::int64_t n = 0; n < N; ++n) {
        ref += ef[static_cast<std::size_t>(r * N + n)] * dense[static_cast<std::size_t>(k * N + n)];
        mag += std::abs(ef[static_cast<std::size_t>(r * N + n)] * dense[static_cast<std::size_t>(k * N + n)]);
      }
      ASSERT_NEAR(dX.data<float>()[r * K + k], ref, 1e-5 * mag);
    }
  const Tensor Xi = testing::random_int({R, K}, Format::fixed(8), 13, testing::Fill::Uniform, -6);
  Tensor Yi = packed_matmul(Xi, a.base);
  salient_matmul_add(Yi, Xi, a.salient);
  for (std::int64_t r = 0; r < R; ++r)
    for (std::int64_t n = 0; n < N; ++n) {
      double ref = 0.0;
      for (std::int64_t k = 0; k < K; ++k) ref += std::ldexp(static_cast<double>(Xi.mantissa(r * K + k)), -6) * dense[static_cast<std::size_t>(k * N + n)];
      const double got = std::ldexp(static_cast<double>(Yi.mantissa(r * N + n)), Yi.exponent());
      ASSERT_NEAR(got, ref, 1e-12 * (std::abs(ref) + 1.0));
    }
}

// A layer whose output rows differ widely in how much they move the loss:
// half the tokens are loud (large inputs in one correlation structure) but
// barely matter (loss weight 0.01), half are quiet (0.3× inputs, another
// structure) and matter (weight 1). Gradients dy = weight·ε. The
// output-weighted error Σ_t weight_t²·‖x_t·Δ‖² on held-out tokens (the
// Fisher form OAC approximates) must be lower for OAC than for GPTQ, whose
// Hessian XᵀX is dominated by the loud tokens. Deterministic data: no flake.
TEST(Oac, LowerOutputWeightedErrorThanGptqWhenOutputsMatterUnequally) {
  const std::int64_t K = 64, N = 32, T = 4, S = 512, R = S * T;
  std::mt19937_64 rng(21);
  std::normal_distribution<double> nd(0.0, 1.0);
  auto matrix = [&](double scale) {
    std::vector<double> M(static_cast<std::size_t>(K * K));
    for (double& v : M) v = nd(rng) * scale / std::sqrt(static_cast<double>(K));
    return M;
  };
  const std::vector<double> MA = matrix(1.0), MB = matrix(0.3);
  auto tokens = [&](std::int64_t rows, std::vector<float>& x, std::vector<float>& dy, std::vector<double>& wt) {
    x.assign(static_cast<std::size_t>(rows * K), 0.0f);
    dy.assign(static_cast<std::size_t>(rows * N), 0.0f);
    wt.assign(static_cast<std::size_t>(rows), 0.0);
    for (std::int64_t r = 0; r < rows; ++r) {
      const bool loud = (r / T) % 2 == 0;  // whole samples of one kind
      const std::vector<double>& M = loud ? MA : MB;
      std::vector<double> z(static_cast<std::size_t>(K));
      for (double& v : z) v = nd(rng);
      for (std::int64_t j = 0; j < K; ++j) {
        double s = 0.0;
        for (std::int64_t i = 0; i < K; ++i) s += z[static_cast<std::size_t>(i)] * M[static_cast<std::size_t>(i * K + j)];
        x[static_cast<std::size_t>(r * K + j)] = static_cast<float>(s);
      }
      wt[static_cast<std::size_t>(r)] = loud ? 0.01 : 1.0;
      for (std::int64_t n = 0; n < N; ++n) dy[static_cast<std::size_t>(r * N + n)] = static_cast<float>(wt[static_cast<std::size_t>(r)] * nd(rng));
    }
  };
  std::vector<float> x, dy, xt, dyt;
  std::vector<double> wt, wtt;
  tokens(R, x, dy, wt);
  tokens(R, xt, dyt, wtt);
  HessianAccumulator xtx(K);
  xtx.add(x.data(), R);
  OutputAdaptiveHessian oac(K, N);
  oac.add(x.data(), dy.data(), R, T);
  EXPECT_EQ(oac.samples(), S);
  const std::vector<float> W = testing::normal_floats(K * N, 22, 0.05f);
  auto weighted_error = [&](const PackedWeights& q) {
    const std::vector<float> d = q.dequantize();
    double e = 0.0;
    for (std::int64_t r = 0; r < R; ++r)
      for (std::int64_t n = 0; n < N; ++n) {
        double s = 0.0;
        for (std::int64_t k = 0; k < K; ++k)
          s += static_cast<double>(xt[static_cast<std::size_t>(r * K + k)]) * (W[static_cast<std::size_t>(k * N + n)] - d[static_cast<std::size_t>(k * N + n)]);
        e += wtt[static_cast<std::size_t>(r)] * wtt[static_cast<std::size_t>(r)] * s * s;
      }
    return e;
  };
  for (int b : {2, 3, 4}) {
    const GptqOptions o{b, 32, 0.01, false};
    const double eg = weighted_error(quantize_gptq(W, K, N, xtx.hessian(), o).weights);
    const double eo = weighted_error(quantize_gptq(W, K, N, oac.hessian(), o).weights);
    std::printf("  %d bits: output-weighted error GPTQ %.4g, OAC %.4g\n", b, eg, eo);
    EXPECT_LT(eo, 0.9 * eg) << b << " bits";
  }
}

// Too few calibration rows for the input width: H is singular, the plain
// Cholesky (damping 0) fails, and both solvers raise the damping and finish.
TEST(Gptq, RankDeficientCalibrationRaisesTheDampingAndFinishes) {
  const std::int64_t K = 64, N = 16, T = 4;
  const std::vector<float> x = testing::normal_floats(2 * T * K, 31, 1.0f), dy = testing::normal_floats(2 * T * N, 32, 1.0f);
  HessianAccumulator xtx(K);
  xtx.add(x.data(), 2 * T);  // rank 8 < 64
  OutputAdaptiveHessian oac(K, N);
  oac.add(x.data(), dy.data(), 2 * T, T);  // rank <= 2·min(T, N) = 8
  const std::vector<float> W = testing::normal_floats(K * N, 33, 0.05f);
  for (const auto& H : {xtx.hessian(), oac.hessian()}) {
    const GptqResult r = quantize_gptq(W, K, N, H, {3, 32, 0.0, false});
    EXPECT_GE(r.damp_raises, 1);
    EXPECT_GT(r.damp, 0.0);
    EXPECT_EQ(r.weights.K(), K);
  }
}

TrainOptions tiny_model(const fs::path& out) { return testing::tiny_train_options(out, "fp32", 2, 16, 10); }

// The CLI end to end on a tiny model: AdpQ's bytes do not depend on the data
// named; GPTQ and OAC record the raised damping and the calibration set; all
// four load back and run; bad input exits non-zero naming what was wrong.
TEST(QuantizeMethods, CliEndToEnd) {
  const fs::path dir = fresh_dir("quantizers");
  run_train(tiny_model(dir));
  const fs::path model = dir / "model.safetensors";
  QuantizeOptions q;
  q.model = model;
  q.bits = 2;
  q.group = 32;
  q.threads = 1;
  q.method = "adpq";
  q.salient_fraction = 0.02;
  q.data = tiny_corpus();
  q.out = dir / "adpq_a.safetensors";
  (void)run_quantize(q);
  q.data = dir / "no such file.txt";
  q.out = dir / "adpq_b.safetensors";
  (void)run_quantize(q);
  EXPECT_EQ(file_bytes(dir / "adpq_a.safetensors"), file_bytes(dir / "adpq_b.safetensors"));
  const SafeTensorsFile fa = read_safetensors(dir / "adpq_a.safetensors");
  EXPECT_GT(std::stoll(fa.metadata.at("quant.salient_count.h.0.mlp.c_fc")), 0);
  EXPECT_EQ(fa.metadata.at("quant.calib_file"), "none");

  std::vector<std::int32_t> x(2 * 16), y(2 * 16);
  for (std::size_t i = 0; i < x.size(); ++i) {
    x[i] = 'a' + static_cast<std::int32_t>(i % 26);
    y[i] = 'a' + static_cast<std::int32_t>((i + 1) % 26);
  }
  GPT adpq = load_model(dir / "adpq_a.safetensors", "", Rounding::Nearest);
  EXPECT_TRUE(std::isfinite(adpq.forward(x.data(), y.data(), 2, 16, 0, 1, false)));

  q.data = tiny_corpus();
  q.damp = 0.0;         // plain Cholesky first
  q.calib_tokens = 16;  // one window of 16 tokens: every H has rank <= 16 < K
  for (const char* method : {"gptq", "oac"}) {
    q.method = method;
    q.out = dir / (std::string(method) + ".safetensors");
    (void)run_quantize(q);
    const SafeTensorsFile f = read_safetensors(q.out);
    EXPECT_GE(std::stoi(f.metadata.at("quant.damp_raises.h.1.mlp.c_proj")), 1) << method;
    EXPECT_GT(std::stod(f.metadata.at("quant.damp.h.1.mlp.c_proj")), 0.0) << method;
    EXPECT_EQ(f.metadata.at("quant.calib_tokens"), "16");
    EXPECT_EQ(f.metadata.at("quant.calib_seed"), "1");
    EXPECT_EQ(f.metadata.at("quant.calib_file"), tiny_corpus().string());
    EXPECT_FALSE(f.metadata.at("quant.calib_offsets").empty());
    GPT g = load_model(q.out, "", Rounding::Nearest);
    EXPECT_TRUE(std::isfinite(g.forward(x.data(), y.data(), 2, 16, 0, 1, false))) << method;
  }

  const std::string base = "quantize --model " + model.string() + " --out " + (dir / "bad.safetensors").string();
  std::string out;
  EXPECT_NE(run_cli(base + " --group 32 --method nope", &out), 0);
  EXPECT_NE(out.find("--method"), std::string::npos) << out;
  EXPECT_NE(run_cli(base + " --group 32 --bits 9", &out), 0);
  EXPECT_NE(out.find("--bits"), std::string::npos) << out;
  EXPECT_NE(run_cli(base + " --group 32 --bits 1", &out), 0);
  EXPECT_NE(run_cli(base + " --group 24", &out), 0);
  EXPECT_NE(out.find("--group 24"), std::string::npos) << out;
  const fs::path empty = dir / "empty.txt";
  std::ofstream(empty).close();
  for (const char* method : {"gptq", "oac"}) {
    EXPECT_NE(run_cli(base + " --group 32 --method " + method + " --data " + empty.string(), &out), 0);
    EXPECT_NE(out.find("calibration data"), std::string::npos) << out;
    EXPECT_NE(out.find("empty"), std::string::npos) << out;
  }
  fs::remove_all(dir);
}

}  // namespace
}  // namespace intrain
