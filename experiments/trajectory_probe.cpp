#include "experiments/trajectory_probe.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <sstream>
#include <stdexcept>
#include <string>

namespace intrain {

namespace fs = std::filesystem;

namespace {

// Appends the real values of t (numel of them; zeros if t is empty and
// `numel` is given) to out.
void append_real(const Tensor& t, std::int64_t numel, std::vector<double>& out) {
  if (t.empty()) {
    out.insert(out.end(), static_cast<std::size_t>(numel), 0.0);
    return;
  }
  const std::size_t at = out.size();
  out.resize(at + static_cast<std::size_t>(t.numel()));
  double* o = out.data() + at;
  switch (t.format().scaling()) {
    case Scaling::Float: {
      const float* p = t.data<float>();
      for (std::int64_t i = 0; i < t.numel(); ++i) o[i] = p[i];
      break;
    }
    case Scaling::SharedExponent: {
      const double scale = std::ldexp(1.0, t.exponent());
      visit_int(t, [&](const auto* p) {
        for (std::int64_t i = 0; i < t.numel(); ++i) o[i] = static_cast<double>(p[i]) * scale;
      });
      break;
    }
    case Scaling::Grouped:
      for (std::int64_t i = 0; i < t.numel(); ++i) o[i] = t.value(i);
      break;
  }
}

double max_abs(std::span<const double> v) {
  double m = 0.0;
  for (double x : v) m = std::max(m, std::abs(x));
  return m;
}

double norm(std::span<const double> v) {
  double s = 0.0;
  for (double x : v) s += x * x;
  return std::sqrt(s);
}

std::vector<double> values(const GPT& model) {
  std::vector<double> w;
  for (const Param& p : model.params()) append_real(p.value, p.value.numel(), w);
  return w;
}

std::vector<double> gradients(const GPT& model) {
  std::vector<double> g;
  for (const Param& p : model.params()) append_real(p.has_grad ? p.grad : Tensor(), p.value.numel(), g);
  return g;
}

// Keeps the header and the rows of steps < keep_below.
void keep_rows_below(const fs::path& p, long keep_below) {
  std::ifstream in(p);
  std::ostringstream kept;
  std::string line;
  bool header = true;
  while (std::getline(in, line)) {
    if (header || (!line.empty() && std::stol(line.substr(0, line.find(','))) < keep_below)) kept << line << '\n';
    header = false;
  }
  in.close();
  const fs::path tmp = p.string() + ".tmp";
  {
    std::ofstream out(tmp);
    out << kept.str();
  }
  fs::rename(tmp, p);
}

}  // namespace

TrajectoryProbe::TrajectoryProbe(const fs::path& out_dir, const Precision& prec, long every, int micro_batches,
                                 int batch, long start_step, double momentum)
    : out_(out_dir), csv_(out_dir / "probe.csv"), prec_(prec), every_(every), momentum_(momentum) {
  if (every < 1) throw std::invalid_argument("--probe-every must be >= 1 to probe (0: off)");
  if (micro_batches < 1) throw std::invalid_argument("--probe-micro-batches must be >= 1");
  // Micro-batches must split the batch evenly for their mean to be the batch gradient.
  micro_ = std::gcd(batch, micro_batches);
  if (start_step == 0 || !fs::exists(csv_)) {
    std::ofstream f(csv_, std::ios::trunc);
    f << probe_csv_header() << '\n';
    if (!f) throw std::runtime_error(csv_.string() + ": cannot write");
  } else {
    keep_rows_below(csv_, start_step);
  }
}

void TrajectoryProbe::micro_passes(GPT& model, const std::int32_t* tokens, const std::int32_t* targets, int B, int T,
                                   long step, std::uint64_t seed, int point) {
  const int b = B / micro_;
  for (int j = 0; j < micro_; ++j) {
    const std::size_t off = static_cast<std::size_t>(j) * b * T;
    // Rounding keys from 2^41 on: no training step (keys 0..steps) nor
    // evaluation (2^40 + i) uses them; the same at both points of a probe.
    const std::uint64_t key = (std::uint64_t{1} << 41) + static_cast<std::uint64_t>(step) * 4096 + j;
    model.forward(tokens + off, targets + off, b, T, key, seed, true);
    model.backward();
    pending_->add_micro(point, gradients(model));
    for (Param& p : model.params()) p.zero_grad();
  }
}

void TrajectoryProbe::before_update(GPT& model, const std::int32_t* tokens, const std::int32_t* targets, int B, int T,
                                    long step, std::uint64_t seed, double lr, double train_loss) {
  const std::vector<double> g = gradients(model);
  w0_ = values(model);
  sample_ = ProbeSample{};
  sample_.step = step;
  sample_.lr = lr;
  sample_.train_loss = train_loss;
  std::vector<TensorScale> tensors;
  master0_.clear();
  std::size_t at = 0;
  for (const Param& p : model.params()) {
    const std::size_t before = master0_.size();
    append_real(p.master, p.value.numel(), master0_);
    const auto n = static_cast<std::size_t>(p.value.numel());
    const std::span<const double> gm(g.data() + at, n), xm(master0_.data() + before, n);
    tensors.push_back({p.value.format(), static_cast<double>(n), max_abs(gm), max_abs(xm)});
    sample_.grad_max = std::max(sample_.grad_max, tensors.back().grad_max);
    sample_.master_max = std::max(sample_.master_max, tensors.back().master_max);
    at += n;
  }
  grad_norm2_ = 0.0;
  for (double v : g) grad_norm2_ += v * v;
  sample_.scales = format_scales(prec_, tensors, lr, norm(master0_), std::sqrt(grad_norm2_), momentum_);
  pending_.emplace(static_cast<std::int64_t>(g.size()));
  // The micro-batch passes at w_k; the training gradient is set aside and put back for the optimizer.
  std::vector<Tensor> saved;
  std::vector<char> had;
  for (Param& p : model.params()) {
    saved.push_back(std::move(p.grad));
    had.push_back(p.has_grad);
    p.zero_grad();
  }
  micro_passes(model, tokens, targets, B, T, step, seed, 0);
  for (std::size_t i = 0; i < saved.size(); ++i) {
    model.params()[i].grad = std::move(saved[i]);
    model.params()[i].has_grad = had[i] != 0;
  }
}

void TrajectoryProbe::after_update(GPT& model, const std::int32_t* tokens, const std::int32_t* targets, int B, int T,
                                   long step, std::uint64_t seed) {
  if (!pending_ || sample_.step != step) throw std::logic_error("TrajectoryProbe: after_update without before_update");
  // w_{k+1} cast with the random bits that made w_k (key k), so that the two
  // points differ by the update rather than by two independent roundings;
  // the training values (key k + 1) are restored afterwards, bit for bit.
  model.refresh_values(static_cast<std::uint64_t>(step), seed);
  const std::vector<double> w1 = values(model);
  micro_passes(model, tokens, targets, B, T, step, seed, 1);
  model.refresh_values(static_cast<std::uint64_t>(step + 1), seed);
  sample_.measured = pending_->finish(w0_, w1, grad_norm2_);
  std::vector<double> x1;
  for (const Param& p : model.params()) append_real(p.master, p.value.numel(), x1);
  double s = 0.0;
  for (std::size_t i = 0; i < x1.size(); ++i) s += (x1[i] - master0_[i]) * (x1[i] - master0_[i]);
  sample_.master_step_norm = std::sqrt(s);
  pending_.reset();
  std::ofstream f(csv_, std::ios::app);
  f << probe_csv_row(sample_) << '\n';
  f.flush();
  if (!f) throw std::runtime_error(csv_.string() + ": cannot write");
}

nlohmann::json TrajectoryProbe::finish(const LrSchedule& sched, long steps, double momentum,
                                       double weight_decay) const {
  const std::vector<ProbeSample> probes = read_probe_csv(csv_);
  std::vector<double> lr(static_cast<std::size_t>(steps));
  for (long k = 0; k < steps; ++k) lr[static_cast<std::size_t>(k)] = sched.at(k);
  const RunBound rb = evaluate_run_bound(probes, lr, prec_, momentum, weight_decay);
  if (rb.status == "evaluated") {
    const fs::path p = out_ / "bound.csv", tmp = p.string() + ".tmp";
    {
      std::ofstream f(tmp);
      f.precision(9);
      f << "step,lr,bound,measured\n";
      for (std::size_t K = 1; K <= rb.bound.size(); ++K) {
        f << K << ',' << lr[K - 1] << ',' << rb.bound[K - 1] << ',';
        if (std::isfinite(rb.measured[K - 1])) f << rb.measured[K - 1];
        f << '\n';
      }
      if (!f) throw std::runtime_error(tmp.string() + ": cannot write");
    }
    fs::rename(tmp, p);
  }
  nlohmann::json j = rb.summary();
  j["every"] = every_;
  j["micro_batches"] = micro_;
  return j;
}

}  // namespace intrain
