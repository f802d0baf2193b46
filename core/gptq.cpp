#include "core/gptq.h"

#include <Eigen/Dense>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>

namespace intrain {

namespace {

void check_shape(std::span<const float> W, std::int64_t K, std::int64_t N, int bits, int group, const char* who) {
  if (K < 1 || N < 1 || static_cast<std::int64_t>(W.size()) != K * N) {
    throw std::invalid_argument(std::string(who) + ": " + std::to_string(W.size()) + " weights do not fill [" +
                                std::to_string(K) + ", " + std::to_string(N) + "]");
  }
  if (bits < 2 || bits > 8) throw std::invalid_argument(std::string(who) + ": --bits must be in 2..8, got " + std::to_string(bits));
  if (group < 8 || group % 8 != 0 || K % group != 0) {
    throw std::invalid_argument(std::string(who) + ": group size " + std::to_string(group) +
                                " must be a multiple of 8 that divides the input dimension K = " + std::to_string(K));
  }
  for (float w : W)
    if (!std::isfinite(w)) throw std::invalid_argument(std::string(who) + ": the weights hold a NaN or infinity");
}

// Raw (unfloored) scale of a group: its range, widened to include 0, over maxq.
double raw_scale(const float* w, std::int64_t n, std::int64_t stride, int bits) {
  float mn = 0.0f, mx = 0.0f;
  for (std::int64_t i = 0; i < n; ++i) {
    mn = std::min(mn, w[i * stride]);
    mx = std::max(mx, w[i * stride]);
  }
  return (static_cast<double>(mx) - mn) / static_cast<double>((1 << bits) - 1);
}

}  // namespace

float scale_floor(std::span<const float> W, std::int64_t K, std::int64_t N, int bits, int group) {
  double mx = 0.0;
  for (std::int64_t k = 0; k < K; k += group)
    for (std::int64_t n = 0; n < N; ++n) mx = std::max(mx, raw_scale(W.data() + k * N + n, group, N, bits));
  return static_cast<float>(std::max(std::ldexp(mx, -16), std::ldexp(1.0, -24)));
}

GroupParams group_params(const float* w, std::int64_t n, std::int64_t stride, int bits, float floor) {
  float mn = 0.0f;
  for (std::int64_t i = 0; i < n; ++i) mn = std::min(mn, w[i * stride]);
  const double maxq = static_cast<double>((1 << bits) - 1);
  GroupParams p;
  // An all-zero group has raw scale 0: it takes the floor, and every code is the zero point.
  p.scale = half_to_float(float_to_half(static_cast<float>(std::max(raw_scale(w, n, stride, bits), double{floor}))));
  if (!std::isfinite(p.scale)) {
    throw std::invalid_argument("quantizer: a group's scale exceeds binary16's range (65504); the weights are too large");
  }
  p.zero = static_cast<std::uint32_t>(std::clamp(std::nearbyint(-static_cast<double>(mn) / p.scale), 0.0, maxq));
  return p;
}

std::uint32_t quantize_code(double w, const GroupParams& p, int bits) {
  const double maxq = static_cast<double>((1 << bits) - 1);
  return static_cast<std::uint32_t>(std::clamp(std::nearbyint(w / p.scale) + p.zero, 0.0, maxq));
}

namespace {

// Packs codes [N][K] with per-(n, g) parameters.
PackedWeights pack_with(std::int64_t K, std::int64_t N, int bits, int group, const std::vector<std::uint8_t>& q,
                        const std::vector<GroupParams>& params) {
  std::vector<std::uint8_t> zeros(params.size());
  std::vector<float> scales(params.size());
  for (std::size_t i = 0; i < params.size(); ++i) {
    zeros[i] = static_cast<std::uint8_t>(params[i].zero);
    scales[i] = params[i].scale;
  }
  return PackedWeights::pack(K, N, bits, group, q, zeros, scales);
}

}  // namespace

PackedWeights quantize_rtn(std::span<const float> W, std::int64_t K, std::int64_t N, int bits, int group) {
  check_shape(W, K, N, bits, group, "quantize_rtn");
  const std::int64_t ng = K / group;
  const float floor = scale_floor(W, K, N, bits, group);
  std::vector<GroupParams> params(static_cast<std::size_t>(N * ng));
  std::vector<std::uint8_t> q(static_cast<std::size_t>(K * N));
  for (std::int64_t n = 0; n < N; ++n) {
    for (std::int64_t g = 0; g < ng; ++g) {
      const GroupParams p = group_params(W.data() + g * group * N + n, group, N, bits, floor);
      params[static_cast<std::size_t>(n * ng + g)] = p;
      for (std::int64_t k = g * group; k < (g + 1) * group; ++k)
        q[static_cast<std::size_t>(n * K + k)] = static_cast<std::uint8_t>(quantize_code(W[static_cast<std::size_t>(k * N + n)], p, bits));
    }
  }
  return pack_with(K, N, bits, group, q, params);
}

// ---------------------------------------------------------------------------
// Hessian
// ---------------------------------------------------------------------------

void HessianAccumulator::add(const float* x, std::int64_t R) {
  if (R <= 0) return;
  const Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>> X(x, R, K_);
  Eigen::Map<Eigen::MatrixXd> S(xtx_.data(), K_, K_);  // symmetric: layout does not matter
  const Eigen::MatrixXd Xd = X.cast<double>();
  S.selfadjointView<Eigen::Lower>().rankUpdate(Xd.transpose());
  rows_ += R;
}

std::vector<double> HessianAccumulator::hessian() const {
  if (rows_ == 0) throw std::logic_error("HessianAccumulator: no calibration rows were added");
  Eigen::MatrixXd S = Eigen::Map<const Eigen::MatrixXd>(xtx_.data(), K_, K_);
  Eigen::MatrixXd H = S.selfadjointView<Eigen::Lower>();  // mirror the lower triangle
  H *= 2.0 / static_cast<double>(rows_);
  return std::vector<double>(H.data(), H.data() + H.size());  // symmetric: row-major = column-major
}

// ---------------------------------------------------------------------------
// GPTQ
// ---------------------------------------------------------------------------

GptqResult quantize_gptq(std::span<const float> W, std::int64_t K, std::int64_t N, std::span<const double> Hspan,
                         const GptqOptions& opt) {
  check_shape(W, K, N, opt.bits, opt.group, "quantize_gptq");
  if (static_cast<std::int64_t>(Hspan.size()) != K * K) {
    throw std::invalid_argument("quantize_gptq: the Hessian has " + std::to_string(Hspan.size()) + " entries, need K² = " +
                                std::to_string(K * K));
  }
  if (!(opt.damp >= 0.0) || !std::isfinite(opt.damp)) throw std::invalid_argument("quantize_gptq: damping must be a finite number >= 0");
  const int G = opt.group, b = opt.bits;
  const std::int64_t ng = K / G;
  GptqResult res;

  using RowMat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  RowMat H = Eigen::Map<const RowMat>(Hspan.data(), K, K);
  std::vector<float> W0(W.begin(), W.end());
  // An input that is never active carries no information: GPTQ zeroes its weights.
  for (std::int64_t k = 0; k < K; ++k) {
    if (H(k, k) == 0.0) {
      H(k, k) = 1.0;
      std::fill_n(W0.begin() + k * N, N, 0.0f);
      ++res.dead_inputs;
    }
  }
  const float floor = scale_floor(W0, K, N, b, G);

  std::vector<std::int64_t> perm(static_cast<std::size_t>(K));
  std::iota(perm.begin(), perm.end(), 0);
  if (opt.act_order) {
    std::stable_sort(perm.begin(), perm.end(), [&](std::int64_t a, std::int64_t c) { return H(a, a) > H(c, c); });
  }
  RowMat Hp(K, K), Wp(K, N);
  for (std::int64_t i = 0; i < K; ++i) {
    for (std::int64_t j = 0; j < K; ++j) Hp(i, j) = H(perm[static_cast<std::size_t>(i)], perm[static_cast<std::size_t>(j)]);
    for (std::int64_t n = 0; n < N; ++n) Wp(i, n) = W0[static_cast<std::size_t>(perm[static_cast<std::size_t>(i)] * N + n)];
  }

  // U: upper Cholesky factor of (H + λ·mean(diag H)·I)⁻¹. A factorisation
  // that fails, or whose smallest pivot² falls below 1e-10 of the largest
  // diagonal entry (numerically singular: a rank-deficient H can pass Eigen's
  // sign test by rounding alone, and its inverse is then garbage), raises λ
  // tenfold (from λ = 0, to 1e-6) and tries again.
  const double mean_diag = Hp.diagonal().mean();
  RowMat U;
  double damp = opt.damp;
  for (;; damp = damp == 0.0 ? 1e-6 : damp * 10.0, ++res.damp_raises) {
    if (res.damp_raises > kMaxDampRaises) {
      throw std::runtime_error("quantize_gptq: the Hessian is not positive definite even with damping " + std::to_string(damp / 10.0) +
                               " of its mean diagonal; it holds a NaN, an infinity or a negative eigenvalue: check the calibration data");
    }
    RowMat Hd = Hp;
    Hd.diagonal().array() += damp * mean_diag;
    Eigen::LLT<RowMat> llt(Hd);
    if (llt.info() != Eigen::Success) continue;
    const double max_diag = Hd.diagonal().maxCoeff();
    if (!(llt.matrixLLT().diagonal().array().square().minCoeff() > 1e-10 * max_diag)) continue;
    const RowMat Hinv = llt.solve(RowMat::Identity(K, K));
    Eigen::LLT<RowMat> llt_inv(Hinv);
    if (llt_inv.info() != Eigen::Success || !Hinv.allFinite()) continue;
    U = llt_inv.matrixU();
    break;
  }
  res.damp = damp;

  std::vector<GroupParams> params(static_cast<std::size_t>(N * ng));
  auto find_params = [&](const float* base, std::int64_t stride, std::int64_t g) {
    for (std::int64_t n = 0; n < N; ++n)
      params[static_cast<std::size_t>(n * ng + g)] = group_params(base + n, G, stride, b, floor);
  };
  if (opt.act_order) {
    for (std::int64_t g = 0; g < ng; ++g) find_params(W0.data() + g * G * N, N, g);  // static groups
  }

  std::vector<std::uint8_t> q(static_cast<std::size_t>(K * N));
  std::vector<float> group_rows(static_cast<std::size_t>(G * N));
  Eigen::VectorXd err(N);
  for (std::int64_t i = 0; i < K; ++i) {
    const std::int64_t k = perm[static_cast<std::size_t>(i)], g = k / G;
    if (!opt.act_order && k % G == 0) {
      // Natural order: rows i..i+G-1 are this group, already updated by the earlier groups' errors.
      for (std::int64_t r = 0; r < G; ++r)
        for (std::int64_t n = 0; n < N; ++n) group_rows[static_cast<std::size_t>(r * N + n)] = static_cast<float>(Wp(i + r, n));
      find_params(group_rows.data(), N, g);
    }
    const double d = U(i, i);
    for (std::int64_t n = 0; n < N; ++n) {
      const GroupParams& p = params[static_cast<std::size_t>(n * ng + g)];
      // Quantize the float weight, as RTN does (so a diagonal H gives RTN exactly).
      const std::uint32_t c = quantize_code(static_cast<float>(Wp(i, n)), p, b);
      q[static_cast<std::size_t>(n * K + k)] = static_cast<std::uint8_t>(c);
      const double wq = static_cast<double>(p.scale) * (static_cast<double>(c) - p.zero);
      err(n) = (Wp(i, n) - wq) / d;
    }
    if (i + 1 < K) Wp.bottomRows(K - i - 1).noalias() -= U.row(i).tail(K - i - 1).transpose() * err.transpose();
  }
  res.weights = pack_with(K, N, b, G, q, params);
  return res;
}

double layer_output_error(std::span<const float> W, const PackedWeights& Wq, std::span<const double> H) {
  const std::int64_t K = Wq.K(), N = Wq.N();
  if (static_cast<std::int64_t>(W.size()) != K * N || static_cast<std::int64_t>(H.size()) != K * K) {
    throw std::invalid_argument("layer_output_error: shapes do not match");
  }
  const std::vector<float> Wd = Wq.dequantize();
  using RowMat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  RowMat D(K, N);
  for (std::int64_t i = 0; i < K * N; ++i) D.data()[i] = static_cast<double>(W[static_cast<std::size_t>(i)]) - Wd[static_cast<std::size_t>(i)];
  const Eigen::Map<const RowMat> Hm(H.data(), K, K);
  return (D.transpose() * Hm * D).trace() / 2.0;
}

}  // namespace intrain
