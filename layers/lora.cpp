#include "layers/lora.h"

#include <cmath>
#include <stdexcept>

#include "core/matmul.h"
#include "core/ops.h"
#include "core/quantize.h"
#include "layers/gpt.h"

namespace intrain {

void LoraConfig::validate() const {
  if (rank < 1 || rank > 4096) throw std::invalid_argument("--rank must be in 1..4096, got " + std::to_string(rank));
  if (!(alpha > 0.0) || !std::isfinite(alpha)) throw std::invalid_argument("--alpha must be positive, got " + std::to_string(alpha));
}

bool LoraConfig::targets_module(const std::string& module) const {
  if (targets.empty()) return true;
  for (const std::string& t : targets) {
    if (module == t) return true;
    if (module.size() > t.size() && module.ends_with(t) && module[module.size() - t.size() - 1] == '.') return true;
  }
  return false;
}

namespace {

// FNV-1a: a stable stream id per module name, so an adapter's initial values
// depend on (seed, module) only.
std::uint64_t name_id(const std::string& s) {
  std::uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

Param make_param(const std::string& name, Shape shape, const std::vector<float>& init, const Precision& prec) {
  Param p;
  p.name = name;
  p.kind = ParamKind::MatmulWeight;
  // Both engines start from the same numbers: the initial values on the
  // integer master's grid (2^-24; exact in fp32 for |x| < 1), so a float and
  // an integer run of one seed differ only by their arithmetic.
  const Tensor fixed = quantize_at(init, shape, Format::wide(31), kMasterExponent);
  p.master = prec.is_float() ? quantize(dequantize(fixed), shape, Format::fp32()) : fixed;
  return p;
}

}  // namespace

LoraLinear::LoraLinear(std::string module, std::unique_ptr<LinearLayer> base, std::int64_t in, std::int64_t out,
                       const LoraConfig& cfg, const Precision& prec, std::uint64_t seed)
    : module_(std::move(module)), base_(std::move(base)), prec_(prec), rank_(cfg.rank),
      scale_(cfg.alpha / cfg.rank) {
  cfg.validate();
  if (!base_) throw std::invalid_argument("LoraLinear " + module_ + ": no base layer");
  const std::int64_t r = cfg.rank;
  // A ~ U(-1/sqrt(in), 1/sqrt(in)) from a counter-based generator; B = 0.
  std::vector<float> a(static_cast<std::size_t>(in * r));
  const RngKey k(seed, name_id(module_));
  const double bound = 1.0 / std::sqrt(static_cast<double>(in));
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double u = (static_cast<double>(k.bits(static_cast<std::uint32_t>(i))) + 0.5) / 4294967296.0;  // (0, 1)
    a[i] = static_cast<float>((2.0 * u - 1.0) * bound);
  }
  a_ = make_param(module_ + ".lora_A", {in, r}, a, prec_);
  b_ = make_param(module_ + ".lora_B", {r, out}, std::vector<float>(static_cast<std::size_t>(r * out), 0.0f), prec_);
  refresh_values(0, seed);
}

void LoraLinear::refresh_values(std::uint64_t step, std::uint64_t seed) {
  const RngKey k(seed, stream_id(step, 0x10A0000 ^ (name_id(module_) & 0xFFFF)));
  a_.value = cast(a_.master, prec_.is_float() ? Format::fp32() : prec_.w, k.derive(0));
  b_.value = cast(b_.master, prec_.is_float() ? Format::fp32() : prec_.w, k.derive(1));
}

Tensor LoraLinear::forward(const Tensor& x, const Format& out, RngKey key) {
  if (x.cols() != a_.value.rows()) {
    throw std::invalid_argument("LoraLinear " + module_ + ": input " + x.describe() + " does not match A " +
                                a_.value.describe());
  }
  // base(x) in 24 bits with out's rounding mode: when out is itself the
  // 24-bit format and B = 0, the final cast is the identity (same grid).
  const Format wide = prec_.is_float() ? Format::fp32() : Format::wide(24, out.rounding());
  const Tensor y = base_->forward(x, wide, key);
  x_ = x;
  u_ = cast(matmul(x, a_.value), prec_.a, key.derive(0x10A));             // u = x·A
  const Tensor v = scale_accumulator(matmul(u_, b_.value), scale_);       // s·u·B, exact
  return cast(add_accumulators(y, v), out, key.derive(0x10B));
}

Tensor LoraLinear::backward(const Tensor& dy, RngKey key) {
  if (u_.empty()) throw std::logic_error("LoraLinear " + module_ + ": backward without a forward pass");
  Tensor dx = base_->backward(dy, key);
  b_.accumulate(scale_accumulator(matmul(u_, dy, Trans::T, Trans::N), scale_));  // dB = s·uᵀ·dy
  const Tensor du = cast(scale_accumulator(matmul(dy, b_.value, Trans::N, Trans::T), scale_), prec_.e,
                         key.derive(0x10C));                                       // du = s·dy·Bᵀ
  a_.accumulate(matmul(x_, du, Trans::T, Trans::N));                               // dA = xᵀ·du
  dx = add_accumulators(dx, matmul(du, a_.value, Trans::N, Trans::T));             // dx += du·Aᵀ
  x_ = Tensor();
  u_ = Tensor();
  return dx;
}

std::vector<LoraLinear*> attach_lora(GPT& model, const LoraConfig& cfg, std::uint64_t seed) {
  cfg.validate();
  model.freeze();
  std::vector<LoraLinear*> out;
  model.for_each_linear([&](const std::string& name, std::unique_ptr<LinearLayer>& slot) {
    if (!cfg.targets_module(name)) return;
    const auto [in, outf] = model.linear_dims(name);
    auto layer = std::make_unique<LoraLinear>(name, std::move(slot), in, outf, cfg, model.precision(), seed);
    out.push_back(layer.get());
    slot = std::move(layer);
  });
  if (out.empty()) throw std::invalid_argument("--lora-targets matches no block linear of the model");
  return out;
}

std::vector<LoraLinear*> lora_layers(GPT& model) {
  std::vector<LoraLinear*> out;
  model.for_each_linear([&](const std::string&, std::unique_ptr<LinearLayer>& slot) {
    if (auto* l = dynamic_cast<LoraLinear*>(slot.get())) out.push_back(l);
  });
  return out;
}

std::vector<Param*> lora_params(const std::vector<LoraLinear*>& layers) {
  std::vector<Param*> ps;
  for (LoraLinear* l : layers)
    for (Param* p : l->params()) ps.push_back(p);
  return ps;
}

}  // namespace intrain
