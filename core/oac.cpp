#include "core/oac.h"

#include <Eigen/Dense>

#include <stdexcept>
#include <string>

namespace intrain {

OutputAdaptiveHessian::OutputAdaptiveHessian(std::int64_t K, std::int64_t N)
    : K_(K), N_(N), ggt_(static_cast<std::size_t>(K * K), 0.0) {
  if (K < 1 || N < 1) throw std::invalid_argument("OutputAdaptiveHessian: empty shape");
}

void OutputAdaptiveHessian::add(const float* x, const float* dy, std::int64_t R, std::int64_t T, double dy_scale) {
  if (R <= 0) return;
  if (T < 1 || R % T != 0) {
    throw std::invalid_argument("OutputAdaptiveHessian: " + std::to_string(R) + " rows are not whole samples of " + std::to_string(T));
  }
  using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  Eigen::Map<Eigen::MatrixXd> S(ggt_.data(), K_, K_);
  for (std::int64_t s = 0; s < R / T; ++s) {
    const Eigen::Map<const RowMat> X(x + s * T * K_, T, K_);
    const Eigen::Map<const RowMat> D(dy + s * T * N_, T, N_);
    // G_s = X_sᵀ·dY_s in double (the products are summed over T tokens).
    const Eigen::MatrixXd G = (X.cast<double>().transpose() * D.cast<double>()) * dy_scale;
    S.selfadjointView<Eigen::Lower>().rankUpdate(G);
    ++samples_;
  }
}

std::vector<double> OutputAdaptiveHessian::hessian() const {
  if (samples_ == 0) throw std::logic_error("OutputAdaptiveHessian: no calibration samples were added");
  Eigen::MatrixXd S = Eigen::Map<const Eigen::MatrixXd>(ggt_.data(), K_, K_);
  Eigen::MatrixXd H = S.selfadjointView<Eigen::Lower>();
  H *= 2.0 / static_cast<double>(samples_);
  return std::vector<double>(H.data(), H.data() + H.size());
}

}  // namespace intrain
