#include "experiments/quantize.h"

#include <omp.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <stdexcept>
#include <vector>

#include "core/gptq.h"
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

std::vector<float> weight_values(const Param& p) { return dequantize(p.value); }

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
  const std::vector<std::int16_t> s = f.at(module + ".scales").values<std::int16_t>();
  std::vector<std::uint16_t> scales(s.size());
  for (std::size_t i = 0; i < s.size(); ++i) scales[i] = static_cast<std::uint16_t>(s[i]);
  return PackedWeights::from_storage(K, N, meta("quant.bits"), meta("quant.group"),
                                     f.at(module + ".qweight").values<std::uint8_t>(),
                                     f.at(module + ".qzeros").values<std::uint8_t>(), std::move(scales));
}

nlohmann::json run_quantize(const QuantizeOptions& o) {
  if (o.threads > 0) omp_set_num_threads(o.threads);
  if (o.method != "rtn" && o.method != "gptq") throw std::invalid_argument("--method must be rtn or gptq, got '" + o.method + "'");
  if (o.bits < 2 || o.bits > 8) throw std::invalid_argument("--bits must be in 2..8, got " + std::to_string(o.bits));
  if (o.method == "gptq" && o.calib_tokens < 1) throw std::invalid_argument("--calib-tokens must be positive");
  if (o.out.empty()) throw std::invalid_argument("--out: give the path of the quantized model file");
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
  std::map<std::string, PackedWeights> packed;
  std::int64_t windows = 0;
  std::optional<Corpus> corpus;
  if (o.method == "gptq") {
    corpus = Corpus::load(o.data, T + 1);
    windows = (o.calib_tokens + T - 1) / T;
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
      const int B = 16;
      std::vector<std::int32_t> x(static_cast<std::size_t>(B) * T), y(x.size());
      for (std::int64_t w = 0, step = 0; w < windows; w += B, ++step) {
        const int n = static_cast<int>(std::min<std::int64_t>(B, windows - w));
        sample_batch(corpus->train, o.seed, static_cast<std::uint64_t>(step), n, T, x.data(), y.data());
        model.forward(x.data(), nullptr, n, T, static_cast<std::uint64_t>(step), o.seed, false);
      }
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
      PackedWeights q = quantize_rtn(W, K, N, o.bits, o.group);
      if (o.method == "gptq") {
        const std::vector<double>& H = hessians[m];
        const double energy = output_energy(W, K, N, H);
        info["rtn_rel_output_error"] = layer_output_error(W, q, H) / energy;
        GptqResult g = quantize_gptq(W, K, N, H, {o.bits, o.group, o.damp, o.act_order});
        info["gptq_rel_output_error"] = layer_output_error(W, g.weights, H) / energy;
        info["damp"] = g.damp;
        info["damp_raises"] = g.damp_raises;
        info["dead_inputs"] = g.dead_inputs;
        if (g.damp_raises > 0) {
          std::fprintf(stderr, "intrain quantize: %s: Hessian not positive definite; damping raised to %g\n", m.c_str(), g.damp);
        }
        q = std::move(g.weights);
      }
      info["bits_per_weight"] = q.bits_per_weight();
      layers.push_back(info);
      model.replace_linear(m, std::make_unique<QuantizedLinear>(m, q, &model.param(m + ".bias")));
      packed.emplace(m, std::move(q));
    }
  }

  // The file: the float model's tensors with each quantized weight replaced by its packed form.
  double bits = 0.0, weights = 0.0;
  for (const auto& [m, q] : packed) {
    bits += q.bits_per_weight() * static_cast<double>(q.K() * q.N());
    weights += static_cast<double>(q.K() * q.N());
  }
  Metadata meta = {{"quant.method", o.method},
                   {"quant.bits", std::to_string(o.bits)},
                   {"quant.group", std::to_string(o.group)},
                   {"quant.act_order", o.act_order ? "true" : "false"},
                   {"quant.damp", std::to_string(o.damp)},
                   {"quant.calib_tokens", std::to_string(windows * T)},
                   {"quant.calib_seed", std::to_string(o.seed)},
                   {"quant.calib_split", o.method == "gptq" ? "train (" + corpus->name + ")" : "none"},
                   {"quant.source", o.model.string()},
                   {"quant.packing", kPacking},
                   {"quant.bits_per_weight", std::to_string(bits / weights)}};
  SafeTensorsFile f = model_file(model, meta);
  std::erase_if(f.tensors, [&](const auto& t) { return packed.count(t.first.substr(0, t.first.rfind('.'))) && t.first.ends_with(".weight"); });
  for (const auto& [m, q] : packed) {
    f.add(m + ".qweight", SafeTensor::from_values<std::uint8_t>({static_cast<std::int64_t>(q.packed_codes().size())}, q.packed_codes()));
    f.add(m + ".qzeros", SafeTensor::from_values<std::uint8_t>({static_cast<std::int64_t>(q.packed_zeros().size())}, q.packed_zeros()));
    std::vector<std::int16_t> s(q.scale_bits().size());
    for (std::size_t i = 0; i < s.size(); ++i) s[i] = static_cast<std::int16_t>(q.scale_bits()[i]);
    f.add(m + ".scales", SafeTensor::from_values<std::int16_t>({q.N(), q.groups_per_column()}, s));
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
