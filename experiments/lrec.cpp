#include "experiments/lrec.h"

#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <numeric>
#include <stdexcept>

#include "core/ops.h"
#include "core/parallel.h"
#include "core/precision.h"
#include "core/safetensors.h"
#include "experiments/checkpoint.h"
#include "experiments/corpus.h"
#include "experiments/evaluate.h"
#include "experiments/run_lock.h"
#include "experiments/train.h"
#include "layers/fp16_linear.h"
#include "layers/gpt.h"
#include "layers/lora.h"
#include "layers/quantized_linear.h"
#include "optim/grad_clip.h"
#include "optim/sgd.h"

namespace intrain {

namespace fs = std::filesystem;

namespace {

using Clock = std::chrono::steady_clock;

// log softmax of row r of `logits` [R, V] into out, in double.
void log_softmax_row(const Tensor& logits, std::int64_t r, std::int64_t V, double* out) {
  double mx = -INFINITY;
  for (std::int64_t j = 0; j < V; ++j) mx = std::max(mx, out[j] = logits.value(r * V + j));
  double z = 0.0;
  for (std::int64_t j = 0; j < V; ++j) z += std::exp(out[j] - mx);
  const double lz = mx + std::log(z);
  for (std::int64_t j = 0; j < V; ++j) out[j] -= lz;
}

struct DistillBatch {
  Tensor target;     // (p_teacher + w onehot) / (1 + w): fp32, or Q30 int32 for an integer student
  double kl = 0.0;   // mean KL(teacher || student) per token, of the student's logits as they are
  double ce = 0.0;   // mean CE of the student per token
};

// The soft target of one batch and the two loss terms, in double. Rows are
// independent; partial sums are combined in chunk order (deterministic).
DistillBatch distill_batch(const Tensor& student, const Tensor& teacher, const std::int32_t* y, double w,
                           bool integer) {
  const std::int64_t V = student.cols(), R = student.numel() / V;
  DistillBatch d;
  d.target = integer ? Tensor({R, V}, Format::wide(31), -30) : Tensor({R, V}, Format::fp32());
  std::vector<double> kl_parts(static_cast<std::size_t>(num_chunks(R, 64))), ce_parts(kl_parts.size());
  for_chunks(R, [&](std::int64_t c, std::int64_t r0, std::int64_t r1) {
    std::vector<double> ls(static_cast<std::size_t>(V)), lt(ls.size());
    double kl = 0.0, ce = 0.0;
    for (std::int64_t r = r0; r < r1; ++r) {
      log_softmax_row(student, r, V, ls.data());
      log_softmax_row(teacher, r, V, lt.data());
      const std::int32_t yr = y[r];
      ce -= ls[static_cast<std::size_t>(yr)];
      std::int64_t sum = 0, argmax = 0;
      for (std::int64_t j = 0; j < V; ++j) {
        const double pt = std::exp(lt[static_cast<std::size_t>(j)]);
        kl += pt * (lt[static_cast<std::size_t>(j)] - ls[static_cast<std::size_t>(j)]);
        const double t = (pt + (j == yr ? w : 0.0)) / (1.0 + w);
        if (integer) {
          std::int32_t* q = d.target.data<std::int32_t>() + r * V;
          q[j] = static_cast<std::int32_t>(std::llround(std::ldexp(t, 30)));
          sum += q[j];
          if (q[j] > q[argmax]) argmax = j;
        } else {
          d.target.data<float>()[r * V + j] = static_cast<float>(t);
        }
      }
      // Rows sum to exactly 2^30 (the rounding residue, a few units, goes to
      // the largest entry), so the gradient of each row sums to what the
      // softmax's own rounding leaves, as with a one-hot target.
      if (integer) d.target.data<std::int32_t>()[r * V + argmax] += static_cast<std::int32_t>((std::int64_t{1} << 30) - sum);
    }
    kl_parts[static_cast<std::size_t>(c)] = kl;
    ce_parts[static_cast<std::size_t>(c)] = ce;
  }, 64);
  for (double v : kl_parts) d.kl += v;
  for (double v : ce_parts) d.ce += v;
  d.kl /= static_cast<double>(R);
  d.ce /= static_cast<double>(R);
  return d;
}

std::int64_t tensor_bytes(const Tensor& t) { return static_cast<std::int64_t>(t.nbytes()); }

// Bytes held by the student and the teacher, by kind (docs/int21.md).
nlohmann::json memory_breakdown(GPT& student, GPT& teacher, const std::vector<LoraLinear*>& lora, int B, int T) {
  std::int64_t packed = 0, base_float = 0, adapters = 0, adapter_state = 0, teacher_bytes = 0;
  student.for_each_linear([&](const std::string&, std::unique_ptr<LinearLayer>& slot) {
    const LinearLayer* l = slot.get();
    if (const auto* lo = dynamic_cast<const LoraLinear*>(l)) l = &lo->base();
    if (const auto* q = dynamic_cast<const QuantizedLinear*>(l)) packed += q->weights().storage_bytes();
  });
  for (const Param& p : student.params()) base_float += tensor_bytes(p.master) + tensor_bytes(p.value);
  for (LoraLinear* l : lora) {
    for (const Param* p : std::as_const(*l).params()) {
      adapters += tensor_bytes(p->value);
      // The master, the momentum and the gradient (an int64 accumulator at its peak).
      adapter_state += tensor_bytes(p->master) + tensor_bytes(p->momentum) + p->master.numel() * 8;
    }
  }
  for (const Param& p : teacher.params()) teacher_bytes += tensor_bytes(p.master) + tensor_bytes(p.value);
  teacher.for_each_linear([&](const std::string&, std::unique_ptr<LinearLayer>& slot) {
    if (const auto* h = dynamic_cast<const Fp16Linear*>(slot.get())) teacher_bytes += h->bytes();
  });
  // Activations saved for the backward pass, per block (integer student; the
  // float student keeps 4 bytes everywhere): LayerNorm caches (2 x [BT, C] at
  // 4 bytes), q, k, v ([BT, C] each, 1 byte), P ([B H, T, T], 1 byte), the MLP
  // pre-activation z ([BT, 4C], 4 bytes), and each adapter's x and u (1 byte).
  const GPTConfig& c = student.config();
  const bool fl = student.precision().is_float();
  const std::int64_t BT = static_cast<std::int64_t>(B) * T, C = c.n_embd, H = c.n_head, one = fl ? 4 : 1;
  std::int64_t act = static_cast<std::int64_t>(c.n_layer) * (2 * BT * C * 4 + 3 * BT * C * one +
                                                             static_cast<std::int64_t>(B) * H * T * T * one + BT * 4 * C * 4);
  for (LoraLinear* l : lora) {
    const auto [in, out] = student.linear_dims(l->module());
    (void)out;
    act += BT * (in + l->rank()) * one;
  }
  act += 2 * BT * c.vocab_size * 4 + BT * C * 4;  // logits and their gradient, the final LayerNorm's input
  const auto mib = [](std::int64_t b) { return static_cast<double>(b) / (1024.0 * 1024.0); };
  return {{"packed_weights_mib", mib(packed)},
          {"float_base_params_mib", mib(base_float)},
          {"adapters_mib", mib(adapters)},
          {"adapter_optimizer_state_mib", mib(adapter_state)},
          {"teacher_params_mib", mib(teacher_bytes)},
          {"saved_activations_mib_estimate", mib(act)}};
}

// Effective bits per quantized base weight: (packed codes + scales + zeros +
// AdpQ's salient part + stored adapter bits) / base weights.
bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

nlohmann::json effective_bits(GPT& student, const std::vector<LoraLinear*>& lora, int adapter_bits) {
  double base_weights = 0.0, packed_bits = 0.0, lora_bits = 0.0;
  student.for_each_linear([&](const std::string&, std::unique_ptr<LinearLayer>& slot) {
    const LinearLayer* l = slot.get();
    if (const auto* lo = dynamic_cast<const LoraLinear*>(l)) l = &lo->base();
    if (const auto* q = dynamic_cast<const QuantizedLinear*>(l)) {
      const double n = static_cast<double>(q->weights().K() * q->weights().N());
      base_weights += n;
      packed_bits += q->weights().bits_per_weight() * n;
      if (q->salient()) packed_bits += q->salient()->bits_per_weight() * n;
    }
  });
  for (LoraLinear* l : lora)
    for (const Param* p : std::as_const(*l).params()) lora_bits += static_cast<double>(p->value.numel()) * adapter_bits + 8.0;  // + its exponent byte
  return {{"packed_bits_per_weight", packed_bits / base_weights},
          {"adapter_bits_per_weight", lora_bits / base_weights},
          {"effective_bits", (packed_bits + lora_bits) / base_weights},
          {"adapter_storage_bits", adapter_bits},
          {"base_weights", base_weights}};
}

}  // namespace

nlohmann::json storage_breakdown(const fs::path& model, double base_weights) {
  const SafeTensorsFile f = read_safetensors(model);
  std::map<std::string, std::int64_t> bytes;
  for (const char* c : {"packed_codes", "scales_and_zeros", "salient", "adapters", "embeddings", "norms", "biases", "other"}) bytes[c] = 0;
  std::int64_t data = 0;
  for (const auto& [name, t] : f.tensors) {
    const auto n = static_cast<std::int64_t>(t.data.size());
    data += n;
    const std::string c = ends_with(name, ".qweight")                                     ? "packed_codes"
                          : ends_with(name, ".scales") || ends_with(name, ".qzeros")        ? "scales_and_zeros"
                          : name.find(".salient_") != std::string::npos                    ? "salient"
                          : ends_with(name, ".lora_A") || ends_with(name, ".lora_B")        ? "adapters"
                          : name == "wte.weight" || name == "wpe.weight"                    ? "embeddings"
                          : name.rfind("ln_", 0) == 0 || name.find(".ln_") != std::string::npos ? "norms"
                          : ends_with(name, ".bias")                                         ? "biases"
                                                                                             : "other";
    bytes[c] += n;
  }
  const auto file_bytes = static_cast<std::int64_t>(fs::file_size(model));
  nlohmann::json j = {{"bytes", bytes}, {"header_bytes", file_bytes - data}, {"file_bytes", file_bytes}};
  if (base_weights > 0) {
    for (const auto& [c, b] : bytes) j["bits_per_base_weight"][c] = 8.0 * static_cast<double>(b) / base_weights;
    j["bits_per_base_weight"]["header"] = 8.0 * static_cast<double>(file_bytes - data) / base_weights;
  }
  return j;
}

nlohmann::json run_lrec(const LrecOptions& o) {
  const auto t_start = Clock::now();
  if (o.threads > 0) omp_set_num_threads(o.threads);
  if (o.steps < 1) throw std::invalid_argument("--steps must be at least 1");
  if (o.batch < 1) throw std::invalid_argument("--batch must be at least 1");
  if (!(o.lr > 0.0)) throw std::invalid_argument("--lr must be positive");
  if (!(o.ce_weight >= 0.0)) throw std::invalid_argument("--ce-weight must be >= 0");
  LoraConfig lcfg;
  lcfg.rank = o.rank;
  lcfg.alpha = o.alpha;
  lcfg.targets = o.targets;
  lcfg.validate();

  if (o.teacher_storage != "fp32" && o.teacher_storage != "fp16")
    throw std::invalid_argument("--teacher-storage: '" + o.teacher_storage + "' is not one of fp32, fp16");
  // The teacher only runs forward, which reads the values: a forward-only load
  // keeps no masters (in fp32 a second copy of every weight).
  GPT teacher = load_model(o.teacher, "fp32", Rounding::Nearest,
                           LoadMode{.forward_only = true, .linears_fp16 = o.teacher_storage == "fp16"});
  teacher.for_each_linear([&](const std::string&, std::unique_ptr<LinearLayer>& slot) {
    if (dynamic_cast<const QuantizedLinear*>(slot.get()))
      throw std::invalid_argument("--teacher " + o.teacher.string() + " is a quantized model; give the float checkpoint");
  });
  teacher.freeze();
  if (o.adapter_format != "int" && o.adapter_format != "fp32") {
    throw std::invalid_argument("--adapter-format: '" + o.adapter_format + "' is not one of int, fp32");
  }
  if (o.adapter_format == "fp32" && o.format != kLrecDefaultFormat && o.format != "fp32") {
    throw std::invalid_argument("--adapter-format fp32 trains the float reference, which has no integer --format; "
                                "drop --format " + o.format);
  }
  const std::string student_format = o.adapter_format == "fp32" ? "fp32" : o.format;
  if (const Precision sp = Precision::parse(student_format); !sp.is_float() && sp.linear_e().bits() > 8) {
    // The packed base's backward (core/packed_matmul.h) takes errors of at most 8 bits.
    throw std::invalid_argument("--format " + o.format + ": errors of " + std::to_string(sp.linear_e().bits()) +
                                " bits cannot pass the packed weights (at most 8); use e8, e.g. --format " + kLrecDefaultFormat);
  }
  GPT student = load_model(o.quantized, student_format, parse_rounding(o.rounding));
  const GPTConfig &tc = teacher.config(), &sc = student.config();
  if (tc.n_layer != sc.n_layer || tc.n_embd != sc.n_embd || tc.n_head != sc.n_head || tc.n_ctx != sc.n_ctx) {
    throw std::invalid_argument("--quantized " + o.quantized.string() + " does not have the teacher's configuration; quantize " +
                                o.teacher.string() + " itself");
  }
  if (!lora_layers(student).empty()) {
    throw std::invalid_argument("--quantized " + o.quantized.string() + " already holds adapters; start from the file intrain quantize wrote");
  }
  const Precision prec = student.precision();
  const Corpus corpus = Corpus::load(o.data, sc.n_ctx + 1);

  const RunLock lock(o.out, "intrain lrec");
  const fs::path metrics_path = o.out / "metrics.csv", model_path = o.out / "model.safetensors",
                 summary_path = o.out / "summary.json";
  if ((fs::exists(metrics_path) || fs::exists(summary_path)) && !o.overwrite) {
    throw std::runtime_error(o.out.string() + " already holds an LREC run: pass --overwrite to replace it, or choose another --out");
  }

  const int B = o.batch, T = sc.n_ctx;
  nlohmann::json before = evaluate_fidelity(student, &teacher, corpus, B, o.eval_windows, o.seed);
  const double rss_before_training = peak_rss_mib();

  const std::vector<LoraLinear*> lora = attach_lora(student, lcfg, o.seed);
  const std::vector<Param*> params = lora_params(lora);
  Sgd opt(SgdConfig{o.momentum, 0.0});
  const LrSchedule sched{o.lr, o.warmup, o.steps, 0.1};
  std::ofstream metrics(metrics_path);
  metrics.precision(9);
  metrics << "step,loss,kl,ce,lr,grad_norm,clip_shift,tokens_per_s\n";
  std::vector<std::int32_t> x(static_cast<std::size_t>(B) * T), y(x.size());
  const bool tty = isatty(STDERR_FILENO) && !o.quiet;
  double last_kl = NAN, last_ce = NAN;
  std::vector<double> step_s;
  long clipped_steps = 0;
  double max_grad_norm = 0.0;
  for (long step = 0; step < o.steps; ++step) {
    const auto t0 = Clock::now();
    sample_batch(corpus.train, o.seed, static_cast<std::uint64_t>(step), B, T, x.data(), y.data());
    teacher.forward(x.data(), nullptr, B, T, static_cast<std::uint64_t>(step), o.seed, false);
    student.forward(x.data(), nullptr, B, T, static_cast<std::uint64_t>(step), o.seed, true);
    DistillBatch d = distill_batch(student.logits(), teacher.logits(), y.data(), o.ce_weight, !prec.is_float());
    if (!std::isfinite(d.kl) || !std::isfinite(d.ce)) {
      throw std::runtime_error("LREC diverged at step " + std::to_string(step) + " (KL " + std::to_string(d.kl) + "); lower --lr");
    }
    student.backward(soft_cross_entropy_grad(student.logits(), d.target, 1.0 + o.ce_weight, prec.e,
                                             RngKey(o.seed, stream_id(static_cast<std::uint64_t>(step), 2))));
    const double lr = sched.at(step);
    const GradClip clip = clip_grad_norm(params, o.clip_grad_norm);
    clipped_steps += clip.shift > 0;
    max_grad_norm = std::max(max_grad_norm, clip.norm);
    opt.step(params, prec.g, lr, static_cast<std::uint64_t>(step), o.seed);
    for (LoraLinear* l : lora) l->refresh_values(static_cast<std::uint64_t>(step + 1), o.seed);
    const double dt = std::chrono::duration<double>(Clock::now() - t0).count();
    step_s.push_back(dt);
    last_kl = d.kl;
    last_ce = d.ce;
    metrics << step << ',' << d.kl + o.ce_weight * d.ce << ',' << d.kl << ',' << d.ce << ',' << lr << ',' << clip.norm
            << ',' << clip.shift << ',' << static_cast<double>(B) * T / dt << '\n';
    if (!o.quiet && (tty || (step + 1) % 50 == 0 || step + 1 == o.steps)) {
      std::fprintf(stderr, "%sstep %ld/%ld  kl %.4f  ce %.4f  %.0f tok/s%s", tty ? "\r" : "", step + 1, o.steps, d.kl,
                   d.ce, static_cast<double>(B) * T / dt, tty ? "   " : "\n");
    }
  }
  if (tty) std::fprintf(stderr, "\n");
  metrics.close();
  const double rss_training = peak_rss_mib();

  // The file: the quantized model's tensors and metadata plus the adapters.
  const int adapter_bits = prec.is_float() ? 32 : prec.w.bits();
  SafeTensorsFile f = read_safetensors(o.quantized);
  add_lora_tensors(f, lora, lcfg);
  f.metadata["lrec.teacher"] = o.teacher.string();
  f.metadata["lrec.steps"] = std::to_string(o.steps);
  f.metadata["lrec.ce_weight"] = std::to_string(o.ce_weight);
  f.metadata["format"] = prec.name();
  write_safetensors(model_path, f);

  nlohmann::json after = evaluate_fidelity(student, &teacher, corpus, B, o.eval_windows, o.seed);
  std::sort(step_s.begin(), step_s.end());
  nlohmann::json j;
  j["before"] = before;
  j["after"] = after;
  j["final_train_kl"] = last_kl;
  j["final_train_ce"] = last_ce;
  j["clipped_steps"] = clipped_steps;
  j["max_grad_norm"] = max_grad_norm;
  j["bits"] = effective_bits(student, lora, adapter_bits);
  j["storage"] = storage_breakdown(model_path, j["bits"]["base_weights"].get<double>());
  j["memory"] = memory_breakdown(student, teacher, lora, B, T);
  j["memory"]["peak_rss_mib_before_training"] = rss_before_training;
  j["memory"]["peak_rss_mib"] = rss_training;
  j["adapter_parameters"] = static_cast<std::int64_t>(std::accumulate(params.begin(), params.end(), std::int64_t{0},
                                                                      [](std::int64_t s, const Param* p) { return s + p->master.numel(); }));
  j["tokens_per_s"] = step_s.empty() ? 0.0 : static_cast<double>(B) * T / step_s[step_s.size() / 2];
  j["wall_s"] = std::chrono::duration<double>(Clock::now() - t_start).count();
  j["config"] = {{"teacher", o.teacher.string()}, {"quantized", o.quantized.string()}, {"rank", o.rank},
                 {"alpha", o.alpha},              {"steps", o.steps},                  {"batch", o.batch},
                 {"lr", o.lr},                    {"momentum", o.momentum},            {"warmup", o.warmup},
                 {"ce_weight", o.ce_weight},      {"format", prec.name()},             {"seed", o.seed},
                 {"targets", o.targets},          {"data", corpus.name},               {"commit", build_commit()},
                 {"adapter_format", o.adapter_format}, {"clip_grad_norm", o.clip_grad_norm},
                 {"teacher_storage", o.teacher_storage}};
  const fs::path tmp = summary_path.string() + ".tmp";
  {
    std::ofstream out(tmp);
    out << j.dump(2) << '\n';
    if (!out) throw std::runtime_error(tmp.string() + ": cannot write");
  }
  fs::rename(tmp, summary_path);
  return j;
}

}  // namespace intrain
