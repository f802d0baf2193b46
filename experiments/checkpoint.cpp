#include "experiments/checkpoint.h"

#include <stdexcept>
#include <string>

#include "core/ops.h"
#include "core/quantize.h"
#include "core/safetensors.h"
#include "experiments/quantize.h"
#include "layers/fp16_linear.h"
#include "layers/quantized_linear.h"

namespace intrain {

namespace {

constexpr const char* kVersion = "1";

SafeTensor float_tensor(const Tensor& t) {
  const std::vector<float> v = dequantize(t);
  return SafeTensor::from_values<float>(std::vector<std::int64_t>(t.shape().begin(), t.shape().end()), v);
}

[[noreturn]] void fail(const std::filesystem::path& p, const std::string& what) {
  throw std::runtime_error(p.string() + ": " + what);
}

int meta_int(const SafeTensorsFile& f, const std::string& key) {
  const auto it = f.metadata.find(key);
  if (it == f.metadata.end()) fail(f.source, "metadata has no '" + key + "'; is this an intrain checkpoint?");
  try {
    std::size_t used = 0;
    const int v = std::stoi(it->second, &used);
    if (used != it->second.size()) throw std::invalid_argument("trailing characters");
    return v;
  } catch (const std::exception&) {
    fail(f.source, "metadata '" + key + "' = '" + it->second + "' is not an integer");
  }
}

// Wraps the modules that have stored adapters (see add_lora_tensors).
void attach_saved_lora(const SafeTensorsFile& f, GPT& model) {
  LoraConfig cfg;
  cfg.rank = meta_int(f, "lora.rank");
  try {
    cfg.alpha = std::stod(f.metadata.at("lora.alpha"));
    cfg.validate();
  } catch (const std::exception& e) {
    fail(f.source, std::string("adapter metadata: ") + e.what());
  }
  for (const std::string& module : model.linear_modules()) {
    const SafeTensor* sa = f.find(module + ".lora_A");
    if (!sa) continue;
    const auto [in, out] = model.linear_dims(module);
    auto layer = std::make_unique<LoraLinear>(module, model.replace_linear(module, nullptr), in, out, cfg,
                                              model.precision(), 0);
    for (Param* p : layer->params()) {
      const SafeTensor* st = f.find(p->name);
      if (!st) fail(f.source, "adapter tensor '" + p->name + "' is missing");
      if (st->shape != std::vector<std::int64_t>(p->master.shape().begin(), p->master.shape().end())) {
        fail(f.source, "adapter tensor '" + p->name + "' has shape " + shape_str(Shape(st->shape.begin(), st->shape.end())) +
                           ", rank " + std::to_string(cfg.rank) + " needs " + shape_str(p->master.shape()));
      }
      Tensor stored;
      if (st->dtype == "F32") {
        stored = from_safetensor(*st, Format::fp32());
      } else {
        const auto it = f.metadata.find("lora.exponent." + p->name);
        if (it == f.metadata.end()) fail(f.source, "metadata has no 'lora.exponent." + p->name + "'");
        const int bits = st->dtype == "I8" ? 8 : st->dtype == "I16" ? 16 : 0;
        if (!bits) fail(f.source, "adapter tensor '" + p->name + "' is " + st->dtype + "; expected F32, I8 or I16");
        stored = from_safetensor(*st, Format::fixed(bits), std::stoi(it->second));
      }
      const std::vector<float> v = dequantize(stored);  // exact: at most 16 significant bits
      p->master = model.precision().is_float() ? quantize(v, p->master.shape(), Format::fp32())
                                                : quantize_at(v, p->master.shape(), Format::wide(31), kMasterExponent);
    }
    layer->refresh_values(0, 0);
    model.replace_linear(module, std::move(layer));
  }
}

}  // namespace

void save_model(const std::filesystem::path& path, const GPT& model, const Metadata& extra) {
  write_safetensors(path, model_file(model, extra));
}

SafeTensorsFile model_file(const GPT& model, const Metadata& extra) {
  SafeTensorsFile f;
  f.metadata = extra;
  const GPTConfig& c = model.config();
  f.metadata["n_layer"] = std::to_string(c.n_layer);
  f.metadata["n_head"] = std::to_string(c.n_head);
  f.metadata["n_embd"] = std::to_string(c.n_embd);
  f.metadata["n_ctx"] = std::to_string(c.n_ctx);
  f.metadata["vocab_size"] = std::to_string(c.vocab_size);
  f.metadata["format"] = model.precision().name();
  f.metadata["intrain"] = kVersion;
  for (const Param& p : model.params()) {
    if (p.master.empty()) {
      throw std::invalid_argument("save_model: " + p.name + " is held only as packed codes (a quantized model); " +
                                  "write quantized models with intrain quantize");
    }
    f.add(p.name, float_tensor(p.value));
  }
  return f;
}

void save_train_state(const std::filesystem::path& path, const GPT& model, std::uint64_t next_step,
                      const Metadata& settings) {
  SafeTensorsFile f;
  f.metadata = settings;
  f.metadata["step"] = std::to_string(next_step);
  f.metadata["intrain"] = kVersion;
  f.metadata["master_exponent"] = std::to_string(kMasterExponent);
  for (const Param& p : model.params()) {
    f.add("master." + p.name, to_safetensor(p.master));
    if (!p.momentum.empty()) {
      f.add("momentum." + p.name, to_safetensor(p.momentum));
      f.metadata["momentum_exponent." + p.name] = std::to_string(p.momentum.exponent());
    }
  }
  write_safetensors(path, f);
}

GPT load_model(const std::filesystem::path& path, const std::string& format_override, Rounding rounding,
               LoadMode mode) {
  SafeTensorsFile f = read_safetensors_header(path);
  GPTConfig cfg;
  cfg.n_layer = meta_int(f, "n_layer");
  cfg.n_head = meta_int(f, "n_head");
  cfg.n_embd = meta_int(f, "n_embd");
  cfg.n_ctx = meta_int(f, "n_ctx");
  cfg.vocab_size = meta_int(f, "vocab_size");
  try {
    cfg.validate();
  } catch (const std::invalid_argument& e) {
    fail(path, e.what());
  }
  std::string fmt = format_override;
  if (fmt.empty()) {
    const auto it = f.metadata.find("format");
    if (it == f.metadata.end()) fail(path, "metadata has no 'format'; pass --format");
    fmt = it->second;
    // Names carry the rounding suffix; the rounding flag decides it on load.
    for (const char* suffix : {"-sr", "-rn"}) {
      if (fmt.size() > 3 && fmt.compare(fmt.size() - 3, 3, suffix) == 0) fmt.resize(fmt.size() - 3);
    }
  }
  GPT model(cfg, Precision::parse(fmt, rounding), GPT::Unfilled{});
  const bool forward_only = mode.forward_only || mode.linears_fp16;
  if (forward_only && !model.precision().is_float()) {
    throw std::invalid_argument("load_model(" + path.string() + "): a forward-only load is for float models, not " +
                                model.precision().name());
  }
  std::vector<std::string> packed;  // modules stored as packed codes
  for (Param& p : model.params()) {
    const std::string module = p.name.substr(0, p.name.rfind('.'));
    if (!f.contains(p.name) && p.kind == ParamKind::MatmulWeight && f.contains(module + ".qweight")) {
      packed.push_back(module);
      continue;
    }
    const SafeTensor& st = f.at(p.name);
    if (st.shape != std::vector<std::int64_t>(p.shape.begin(), p.shape.end())) {
      fail(path, "tensor '" + p.name + "' has shape " + shape_str(Shape(st.shape.begin(), st.shape.end())) +
                     ", the configuration needs " + shape_str(p.shape));
    }
    if (st.dtype != "F32") fail(path, "tensor '" + p.name + "' is " + st.dtype + ", expected F32");
    load_tensor_data(f, p.name);
    Tensor v = from_safetensor(st, Format::fp32());
    std::vector<std::byte>().swap(f.find(p.name)->data);  // the file's copy goes as soon as it is read
    if (model.precision().is_float()) {
      if (mode.linears_fp16 && p.kind == ParamKind::MatmulWeight) {
        model.replace_linear(module, std::make_unique<Fp16Linear>(module, v, &model.param(module + ".bias")));
        continue;  // neither master nor value: the layer holds the weight
      }
      if (!forward_only) p.master = v;
      p.value = std::move(v);
    } else {
      // The file holds the values the forward used: exactly representable.
      const std::vector<float> vals(v.data<float>(), v.data<float>() + v.numel());
      const bool operand = p.kind == ParamKind::MatmulWeight || p.kind == ParamKind::Embedding;
      p.value = quantize(vals, p.shape, operand ? model.precision().w : residual_format());
      p.master = quantize_at(vals, p.shape, Format::wide(31), kMasterExponent);
    }
  }
  // What the parameters did not take: packed codes, salient weights, adapters.
  std::vector<std::string> rest;
  for (const auto& [name, t] : f.tensors)
    if (!model.has_param(name)) rest.push_back(name);
  for (const std::string& name : rest) load_tensor_data(f, name);
  for (const std::string& module : packed) {
    const Param& w = model.param(module + ".weight");
    try {
      const std::int64_t K = w.shape[0], N = w.shape[1];
      model.replace_linear(module, std::make_unique<QuantizedLinear>(module, read_packed(f, module, K, N),
                                                                     &model.param(module + ".bias"), read_salient(f, module, K, N)));
    } catch (const std::exception& e) {  // invalid storage, or a salient tensor or count missing
      fail(path, "packed weight '" + module + "': " + e.what());
    }
  }
  if (f.metadata.count("lora.rank")) attach_saved_lora(f, model);
  return model;
}

void add_lora_tensors(SafeTensorsFile& f, const std::vector<LoraLinear*>& lora, const LoraConfig& cfg) {
  f.metadata["lora.rank"] = std::to_string(cfg.rank);
  f.metadata["lora.alpha"] = std::to_string(cfg.alpha);
  std::string targets;
  for (const std::string& t : cfg.targets) targets += (targets.empty() ? "" : ",") + t;
  f.metadata["lora.targets"] = targets.empty() ? "all" : targets;
  for (const LoraLinear* l : lora) {
    for (const Param* p : l->params()) {
      f.add(p->name, to_safetensor(p->value));
      if (p->value.format().is_integer()) f.metadata["lora.exponent." + p->name] = std::to_string(p->value.exponent());
    }
  }
}

Metadata load_train_state(const std::filesystem::path& path, GPT& model) {
  const SafeTensorsFile f = read_safetensors(path);
  for (Param& p : model.params()) {
    p.master = from_safetensor(f.at("master." + p.name), p.master.format(), p.master.exponent());
    if (const SafeTensor* m = f.find("momentum." + p.name)) {
      const Format mf = model.precision().is_float() ? Format::fp32() : Format::wide(31);
      int e = 0;
      if (!model.precision().is_float()) {
        const auto it = f.metadata.find("momentum_exponent." + p.name);
        if (it == f.metadata.end()) fail(path, "metadata has no momentum exponent for '" + p.name + "'");
        e = std::stoi(it->second);
      }
      p.momentum = from_safetensor(*m, mf, e);
      p.momentum.reshape(p.master.shape());
    } else {
      p.momentum = Tensor();
    }
    p.master.reshape(p.master.shape());
  }
  return f.metadata;
}

}  // namespace intrain
