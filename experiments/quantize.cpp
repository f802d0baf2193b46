#include "experiments/quantize.h"

#include <omp.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <stdexcept>
#include <vector>

#include "core/adpq.h"
#include "core/gptq.h"
#include "core/oac.h"
#include "core/quantize.h"
#include "experiments/checkpoint.h"
#include "experiments/corpus.h"
#include "layers/quantized_linear.h"

namespace intrain {

namespace {

constexpr const char* kPacking =
    "qweight: b-bit codes, LSB-first bit stream, element n*K+k of W[K,N] (HF Conv1D [in,out]); groups of G "
    "consecutive k per output column n; qzeros: b-bit stream, element n*(K/G)+g; scales: I16 holding IEEE binary16 "
    "bit patterns, [N, K/G]; W[k,n] = scale[n,k/G] * (q[k,n] - zero[n,k/G])";

// Wraps a linear layer and accumulates the Hessian of its inputs (fp32 model).
class CalibrationProbe : public LinearLayer {
 public:
  CalibrationProbe(std::unique_ptr<LinearLayer> inner, std::int64_t K) : inner_(std::move(inner)), acc_(K) {}
  Tensor forward(const Tensor& x, const Format& out, RngKey key) override {
    acc_.add(x.data<float>(), x.numel() / acc_.K());
    return inner_->forward(x, out, key);
  }
  Tensor backward(const Tensor& dy, RngKey key) override { return inner_->backward(dy, key); }
  const HessianAccumulator& hessian() const { return acc_; }

 private:
  std::unique_ptr<LinearLayer> inner_;
  HessianAccumulator acc_;
};

// Wraps a linear layer of the float model for OAC: keeps the input x of the
// forward pass and, in the backward pass, adds the per-sequence gradients
// Xᵀ·dY of that batch to the output-adaptive Hessian (and XᵀX to GPTQ's,
// for the report).
class GradientProbe : public LinearLayer {
 public:
  GradientProbe(std::unique_ptr<LinearLayer> inner, std::int64_t K, std::int64_t N, std::int64_t T)
      : inner_(std::move(inner)), T_(T), oac_(K, N), xtx_(K) {}
  Tensor forward(const Tensor& x, const Format& out, RngKey key) override {
    x_.assign(x.data<float>(), x.data<float>() + x.numel());
    return inner_->forward(x, out, key);
  }
  Tensor backward(const Tensor& dy, RngKey key) override {
    const std::int64_t R = dy.numel() / dy.cols();
    oac_.add(x_.data(), dy.data<float>(), R, T_, dy_scale_);
    xtx_.add(x_.data(), R);
    return inner_->backward(dy, key);
  }
  // dY of a batch of B sequences is the gradient of the batch's mean loss:
  // B·dY is that of each sequence's own mean loss.
  void set_batch(int B) { dy_scale_ = B; }
  std::unique_ptr<LinearLayer> take_inner() { return std::move(inner_); }
  const OutputAdaptiveHessian& oac() const { return oac_; }
  const HessianAccumulator& xtx() const { return xtx_; }

 private:
  std::unique_ptr<LinearLayer> inner_;
  std::int64_t T_;
  double dy_scale_ = 1.0;
  std::vector<float> x_;
  OutputAdaptiveHessian oac_;
  HessianAccumulator xtx_;
};

std::vector<float> weight_values(const Param& p) { return dequantize(p.value); }

std::vector<std::uint16_t> from_i16(const std::vector<std::int16_t>& s) {
  std::vector<std::uint16_t> u(s.size());
  for (std::size_t i = 0; i < s.size(); ++i) u[i] = static_cast<std::uint16_t>(s[i]);
  return u;
}

std::vector<std::int16_t> to_i16(const std::vector<std::uint16_t>& u) {
  std::vector<std::int16_t> s(u.size());
  for (std::size_t i = 0; i < u.size(); ++i) s[i] = static_cast<std::int16_t>(u[i]);
  return s;
}

SafeTensor u8_tensor(const std::vector<std::uint8_t>& v) {
  return SafeTensor::from_values<std::uint8_t>({static_cast<std::int64_t>(v.size())}, v);
}

// ||X·W||² / rows from H = 2/rows XᵀX: tr(Wᵀ H W) / 2, the denominator of the relative error.
double output_energy(const std::vector<float>& W, std::int64_t K, std::int64_t N, const std::vector<double>& H) {
  double e = 0.0;
  std::vector<double> hw(static_cast<std::size_t>(K));
  for (std::int64_t n = 0; n < N; ++n) {
    for (std::int64_t i = 0; i < K; ++i) {
      double s = 0.0;
      for (std::int64_t j = 0; j < K; ++j) s += H[static_cast<std::size_t>(i * K + j)] * W[static_cast<std::size_t>(j * N + n)];
      hw[static_cast<std::size_t>(i)] = s;
    }
    for (std::int64_t i = 0; i < K; ++i) e += W[static_cast<std::size_t>(i * N + n)] * hw[static_cast<std::size_t>(i)];
  }
  return e / 2.0;
}

}  // namespace

PackedWeights read_packed(const SafeTensorsFile& f, const std::string& module, std::int64_t K, std::int64_t N) {
  auto meta = [&](const std::string& key) {
    const auto it = f.metadata.find(key);
    if (it == f.metadata.end()) throw std::invalid_argument("metadata has no '" + key + "'");
    return std::stoi(it->second);
  };
  return PackedWeights::from_storage(K, N, meta("quant.bits"), meta("quant.group"),
                                     f.at(module + ".qweight").values<std::uint8_t>(),
                                     f.at(module + ".qzeros").values<std::uint8_t>(),
                                     from_i16(f.at(module + ".scales").values<std::int16_t>()));
}

std::optional<SalientWeights> read_salient(const SafeTensorsFile& f, const std::string& module, std::int64_t K, std::int64_t N) {
  const auto it = f.metadata.find("quant.salient_count." + module);
  if (it == f.metadata.end()) return std::nullopt;
  const std::int64_t m = std::stoll(it->second);
  const int bits = std::stoi(f.metadata.at("quant.bits")), group = std::stoi(f.metadata.at("quant.group"));
  if (m == 0) return SalientWeights::from_storage(K, N, bits, group, 0, {}, {}, {}, {});
  return SalientWeights::from_storage(K, N, bits, group, m, f.at(module + ".salient_positions").values<std::uint8_t>(),
                                      f.at(module + ".salient_codes").values<std::uint8_t>(),
                                      f.at(module + ".salient_zeros").values<std::uint8_t>(),
                                      from_i16(f.at(module + ".salient_scales").values<std::int16_t>()));
}

namespace {

struct LayerResult {
  PackedWeights base;
  std::optional<SalientWeights> salient;
  double damp = 0.0;
  int damp_raises = 0;
  double threshold = 0.0;
};

// GPTQ's column loop on H (GPTQ's or OAC's), with the damping report.
LayerResult solve(const std::string& m, const std::vector<float>& W, std::int64_t K, std::int64_t N, const std::vector<double>& H,
                  const QuantizeOptions& o, nlohmann::json& info, const char* tag) {
  const double energy = output_energy(W, K, N, H);
  info[std::string("rtn_rel_") + tag + "_error"] = layer_output_error(W, quantize_rtn(W, K, N, o.bits, o.group), H) / energy;
  GptqResult g = quantize_gptq(W, K, N, H, {o.bits, o.group, o.damp, o.act_order});
  info[o.method + "_rel_" + tag + "_error"] = layer_output_error(W, g.weights, H) / energy;
  info["damp"] = g.damp;
  info["damp_raises"] = g.damp_raises;
  info["dead_inputs"] = g.dead_inputs;
  if (g.damp_raises > 0) {
    std::fprintf(stderr, "intrain quantize: warning: %s: the Cholesky factorisation of its Hessian failed at damping %g; "
                 "damping raised %d time(s) to %g of the mean diagonal\n", m.c_str(), o.damp, g.damp_raises, g.damp);
  }
  LayerResult r;
  r.base = std::move(g.weights);
  r.damp = g.damp;
  r.damp_raises = g.damp_raises;
  return r;
}

}  // namespace

nlohmann::json run_quantize(const QuantizeOptions& o) {
  if (o.threads > 0) omp_set_num_threads(o.threads);
  if (o.method != "rtn" && o.method != "gptq" && o.method != "adpq" && o.method != "oac") {
    throw std::invalid_argument("--method must be rtn, gptq, adpq or oac, got '" + o.method + "'");
  }
  if (o.bits < 2 || o.bits > 8) throw std::invalid_argument("--bits must be in 2..8, got " + std::to_string(o.bits));
  const bool calibrated = o.method == "gptq" || o.method == "oac";
  if (calibrated && o.calib_tokens < 1) throw std::invalid_argument("--calib-tokens must be positive");
  if (calibrated && !(o.damp >= 0.0)) throw std::invalid_argument("--damp must be >= 0");
  if (o.out.empty()) throw std::invalid_argument("--out: give the path of the quantized model file");
  AdpqOptions adpq;
  if (o.method == "adpq") {
    adpq = {o.bits, o.group, parse_salient_rule(o.adpq_rule), o.salient_fraction, o.adpq_gamma};
    if (!(o.salient_fraction >= 0.0 && o.salient_fraction < 1.0)) {
      throw std::invalid_argument("--salient-fraction must be in [0, 1), got " + std::to_string(o.salient_fraction));
    }
  }
  const auto t0 = std::chrono::steady_clock::now();
  GPT model = load_model(o.model, "fp32", Rounding::Nearest);
  for (const Param& p : model.params())
    if (p.master.empty()) throw std::invalid_argument(o.model.string() + " is already quantized; quantize the float checkpoint");
  const int T = model.config().n_ctx;
  const std::vector<std::string> modules = model.linear_modules();
  for (const std::string& m : modules) {
    const std::int64_t K = model.param(m + ".weight").value.rows();
    if (o.group % 8 != 0 || K % o.group != 0) {
      throw std::invalid_argument("--group " + std::to_string(o.group) + " must be a multiple of 8 that divides the input dimension " +
                                  std::to_string(K) + " of " + m + ".weight; choose e.g. 32 or 64");
    }
  }

  nlohmann::json layers = nlohmann::json::array();
  std::map<std::string, LayerResult> results;
  std::int64_t windows = 0;
  std::optional<Corpus> corpus;
  std::string offsets;  // the calibration windows' byte offsets in the file
  const int B = 16;
  if (calibrated) {
    try {
      corpus = Corpus::load(o.data, T + 1);
    } catch (const std::exception& e) {
      throw std::runtime_error(std::string("calibration data: ") + e.what());
    }
    windows = (o.calib_tokens + T - 1) / T;
    for (std::int64_t w = 0, step = 0; w < windows; w += B, ++step) {
      const int n = static_cast<int>(std::min<std::int64_t>(B, windows - w));
      for (int b = 0; b < n; ++b) {
        if (!offsets.empty()) offsets += ",";
        offsets += std::to_string(sample_position(static_cast<std::int64_t>(corpus->train.size()), o.seed, static_cast<std::uint64_t>(step), b, T));
      }
    }
  }
  // One batch pass over the calibration windows: forward (and, for OAC, backward).
  auto calibration_pass = [&](bool with_backward, const std::function<void(int)>& before_batch) {
    std::vector<std::int32_t> x(static_cast<std::size_t>(B) * T), y(x.size());
    for (std::int64_t w = 0, step = 0; w < windows; w += B, ++step) {
      const int n = static_cast<int>(std::min<std::int64_t>(B, windows - w));
      sample_batch(corpus->train, o.seed, static_cast<std::uint64_t>(step), n, T, x.data(), y.data());
      before_batch(n);
      model.forward(x.data(), with_backward ? y.data() : nullptr, n, T, static_cast<std::uint64_t>(step), o.seed, with_backward);
      if (with_backward) {
        model.backward();
        for (Param& p : model.params()) p.zero_grad();
      }
    }
  };

  // OAC: the output-adaptive Hessians of every linear, from the float model.
  std::map<std::string, std::vector<double>> oac_h, oac_xtx;
  if (o.method == "oac") {
    std::map<std::string, GradientProbe*> probes;
    for (const std::string& m : modules) {
      const Param& w = model.param(m + ".weight");
      auto probe = std::make_unique<GradientProbe>(model.replace_linear(m, nullptr), w.value.rows(), w.value.cols(), T);
      probes[m] = probe.get();
      model.replace_linear(m, std::move(probe));
    }
    calibration_pass(true, [&](int n) {
      for (auto& [m, p] : probes) p->set_batch(n);
    });
    for (const std::string& m : modules) {
      auto probe = model.replace_linear(m, nullptr);
      auto& gp = dynamic_cast<GradientProbe&>(*probe);
      oac_h[m] = gp.oac().hessian();
      oac_xtx[m] = gp.xtx().hessian();
      model.replace_linear(m, gp.take_inner());  // the float layer back
    }
  }

  for (int l = 0; l < model.config().n_layer; ++l) {
    const std::vector<std::string> block(modules.begin() + 4 * l, modules.begin() + 4 * l + 4);
    std::map<std::string, std::vector<double>> hessians;
    if (o.method == "gptq") {
      // One float pass of the calibration windows through the model as quantized so far.
      for (const std::string& m : block) {
        const std::int64_t K = model.param(m + ".weight").value.rows();
        model.replace_linear(m, std::make_unique<CalibrationProbe>(model.replace_linear(m, nullptr), K));
      }
      calibration_pass(false, [](int) {});
      for (const std::string& m : block) {
        auto probe = model.replace_linear(m, nullptr);
        hessians[m] = dynamic_cast<const CalibrationProbe&>(*probe).hessian().hessian();
      }
    }
    for (const std::string& m : block) {
      const Param& wp = model.param(m + ".weight");
      const std::int64_t K = wp.value.rows(), N = wp.value.cols();
      const std::vector<float> W = weight_values(wp);
      nlohmann::json info = {{"module", m}, {"K", K}, {"N", N}};
      LayerResult r;
      if (o.method == "rtn") {
        r.base = quantize_rtn(W, K, N, o.bits, o.group);
      } else if (o.method == "adpq") {
        AdpqResult a = quantize_adpq(W, K, N, adpq);
        info["threshold"] = a.threshold;
        info["salient"] = a.salient.count();
        info["salient_bits_per_weight"] = a.salient.bits_per_weight();
        r.base = std::move(a.base);
        r.threshold = a.threshold;
        r.salient = std::move(a.salient);
      } else if (o.method == "gptq") {
        r = solve(m, W, K, N, hessians[m], o, info, "output");
      } else {
        r = solve(m, W, K, N, oac_h[m], o, info, "oac");
        // The same layers judged by the plain output error ‖XW − XŴ‖², for comparison with GPTQ's.
        const double energy = output_energy(W, K, N, oac_xtx[m]);
        info["oac_rel_output_error"] = layer_output_error(W, r.base, oac_xtx[m]) / energy;
      }
      const double bpw = r.base.bits_per_weight() + (r.salient ? r.salient->bits_per_weight() : 0.0);
      info["bits_per_weight"] = bpw;
      layers.push_back(info);
      if (o.method == "gptq") {
        // Later blocks calibrate on the outputs of this one as quantized.
        model.replace_linear(m, std::make_unique<QuantizedLinear>(m, r.base, &model.param(m + ".bias"), r.salient));
      }
      results.emplace(m, std::move(r));
    }
  }

  // The file: the float model's tensors with each quantized weight replaced by its packed form.
  double bits = 0.0, weights = 0.0;
  for (const auto& [m, r] : results) {
    const double kn = static_cast<double>(r.base.K() * r.base.N());
    bits += (r.base.bits_per_weight() + (r.salient ? r.salient->bits_per_weight() : 0.0)) * kn;
    weights += kn;
  }
  Metadata meta = {{"quant.method", o.method},
                   {"quant.bits", std::to_string(o.bits)},
                   {"quant.group", std::to_string(o.group)},
                   {"quant.act_order", o.act_order ? "true" : "false"},
                   {"quant.damp", calibrated ? std::to_string(o.damp) : "none"},
                   {"quant.calib_tokens", std::to_string(windows * T)},
                   {"quant.calib_seed", calibrated ? std::to_string(o.seed) : "none"},
                   {"quant.calib_split", calibrated ? "train (" + corpus->name + ")" : "none"},
                   {"quant.calib_file", calibrated ? corpus->name : "none"},
                   {"quant.calib_offsets", calibrated ? offsets : "none"},
                   {"quant.calib_window", std::to_string(T + 1)},
                   {"quant.source", o.model.string()},
                   {"quant.packing", kPacking},
                   {"quant.bits_per_weight", std::to_string(bits / weights)}};
  if (o.method == "adpq") {
    meta["quant.adpq_rule"] = o.adpq_rule;
    meta["quant.salient_fraction"] = std::to_string(o.salient_fraction);
    meta["quant.adpq_gamma"] = std::to_string(o.adpq_gamma);
  }
  for (const auto& [m, r] : results) {
    if (calibrated) {
      meta["quant.damp." + m] = std::to_string(r.damp);
      meta["quant.damp_raises." + m] = std::to_string(r.damp_raises);
    }
    if (r.salient) {
      meta["quant.salient_count." + m] = std::to_string(r.salient->count());
      meta["quant.adpq_threshold." + m] = std::to_string(r.threshold);
    }
  }
  // The float weights of the quantized modules (the model may hold QuantizedLinears already: GPTQ).
  SafeTensorsFile f = model_file(model, meta);
  std::erase_if(f.tensors, [&](const auto& t) { return results.count(t.first.substr(0, t.first.rfind('.'))) && t.first.ends_with(".weight"); });
  for (const auto& [m, r] : results) {
    const PackedWeights& q = r.base;
    f.add(m + ".qweight", u8_tensor(q.packed_codes()));
    f.add(m + ".qzeros", u8_tensor(q.packed_zeros()));
    f.add(m + ".scales", SafeTensor::from_values<std::int16_t>({q.N(), q.groups_per_column()}, to_i16(q.scale_bits())));
    if (r.salient && r.salient->count() > 0) {
      const SalientWeights& sw = *r.salient;
      f.add(m + ".salient_positions", u8_tensor(sw.packed_positions()));
      f.add(m + ".salient_codes", u8_tensor(sw.packed_codes()));
      f.add(m + ".salient_zeros", u8_tensor(sw.packed_zeros()));
      f.add(m + ".salient_scales", SafeTensor::from_values<std::int16_t>({sw.groups()}, to_i16(sw.scale_bits())));
    }
  }
  if (o.out.has_parent_path()) std::filesystem::create_directories(o.out.parent_path());
  write_safetensors(o.out, f);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  nlohmann::json summary = {{"model", o.model.string()},   {"out", o.out.string()},     {"method", o.method},
                            {"bits", o.bits},              {"group", o.group},          {"act_order", o.act_order},
                            {"calib_tokens", windows * T}, {"bits_per_weight", bits / weights},
                            {"file_bytes", std::filesystem::file_size(o.out)}, {"seconds", secs}, {"layers", layers}};
  std::ofstream(o.out.string() + ".json") << summary.dump(2) << "\n";
  return summary;
}

}  // namespace intrain
