#include "experiments/reproduce.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>

#include <nlohmann/json.hpp>

#include "experiments/child_process.h"
#include "experiments/run_lock.h"
#include "experiments/train.h"

namespace intrain {

namespace fs = std::filesystem;
using nlohmann::json;

void apply_quick(ReproduceOptions& o) {
  // A 2-block, d = 64 byte model: trained, quantized 8 ways and corrected 12
  // times within the 3-minute budget of the README's main job.
  o.layers = 2;
  o.d_model = 64;
  o.heads = 2;
  o.context = 64;
  o.teacher_steps = 400;
  o.teacher_early_stop = 0;  // 400 steps of a d = 64 model do not over-fit the KJV
  o.group = 32;
  o.calib_tokens = 8192;
  o.sweep_ranks = {1, 4, 16};
  o.lrec_steps = 120;
  o.eval_windows = 256;
  o.memory_steps = 5;
  o.memory_widths = {};
  o.jobs = 2;
}

namespace {

std::string s(double v) {
  std::ostringstream o;
  o.precision(10);
  o << v;
  return o.str();
}

json read_json(const fs::path& p) {
  std::ifstream in(p);
  if (!in) return json();
  try {
    return json::parse(in);
  } catch (const json::exception&) {
    return json();
  }
}

std::string quantized_name(const std::string& method, int bits) { return method + "-int" + std::to_string(bits); }
std::string lrec_name(const std::string& method, int bits, int rank) {
  return quantized_name(method, bits) + "-r" + std::to_string(rank);
}

// Flags every child shares.
std::vector<std::string> common(const ReproduceOptions& o, int threads) {
  std::vector<std::string> a = {"--threads", std::to_string(threads)};
  if (o.data) a.insert(a.end(), {"--data", fs::absolute(*o.data).string()});
  return a;
}

std::vector<std::string> plus(std::vector<std::string> a, const std::vector<std::string>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// The settings a second run into the same DIR must share (stages would not be comparable otherwise).
json pinned_settings(const ReproduceOptions& o, const fs::path& teacher) {
  return {{"teacher", teacher.string()}, {"group", o.group},         {"calib_tokens", o.calib_tokens},
          {"lrec_steps", o.lrec_steps},  {"batch", o.batch},         {"lr", o.lr},
          {"ce_weight", o.ce_weight},    {"clip_grad_norm", o.clip_grad_norm}, {"format", o.format},       {"eval_windows", o.eval_windows},
          {"alpha_per_rank", o.alpha > 0.0 ? o.alpha / o.rank : 4.0}, {"seed", o.seed},
          {"data", o.data ? o.data->string() : "kjv"}};
}

void pin(const fs::path& dir, const json& settings) {
  const fs::path p = dir / "reproduce.json";
  if (fs::exists(p)) {
    const json old = read_json(p);
    for (const auto& [k, v] : settings.items()) {
      if (!old.contains(k) || old[k] != v) {
        throw std::runtime_error(dir.string() + " holds a reproduction with " + k + " = " +
                                 (old.contains(k) ? old[k].dump() : "(unset)") + ", not " + v.dump() +
                                 "; use the same settings to resume it, or choose another --out");
      }
    }
    return;
  }
  write_text_atomically(p, settings.dump(2) + "\n");
}

double log_gap_recovered(double ppl_q, double ppl_lrec, double ppl_f) {
  const double gap = std::log(ppl_q) - std::log(ppl_f);
  return gap > 0 ? (std::log(ppl_q) - std::log(ppl_lrec)) / gap : NAN;
}

json row_from(const json& lrec, const std::string& method, int bits, int rank) {
  const json& b = lrec["before"];
  const json& a = lrec["after"];
  json r = {{"bits", bits},
            {"method", method},
            {"rank", rank},
            {"ppl_float", b["teacher_perplexity"]},
            {"ppl_quantized", b["perplexity"]},
            {"ppl_lrec", a["perplexity"]},
            {"kl_quantized", b["kl_mean"]},
            {"kl_lrec", a["kl_mean"]},
            {"top1_quantized", b["top1"]},
            {"top1_lrec", a["top1"]},
            {"top5_lrec", a["top5"]},
            {"kld_p99_lrec", a["kl_p99"]},
            {"effective_bits", lrec["bits"]["effective_bits"]},
            {"packed_bits", lrec["bits"]["packed_bits_per_weight"]},
            {"peak_rss_mib", lrec["memory"]["peak_rss_mib"]},
            {"lrec_seconds", lrec["wall_s"]}};
  r["log_ppl_gap_recovered"] = log_gap_recovered(b["perplexity"], a["perplexity"], b["teacher_perplexity"]);
  const double kq = b["kl_mean"], kl = a["kl_mean"];
  r["kl_reduction"] = kq > 0 ? 1.0 - kl / kq : NAN;
  return r;
}

// The float-LoRA and KL-only runs beside an LREC run (docs/fidelity.md), if
// they exist. Each reduction is against its own run's quantized starting point
// (the float reference evaluates the quantized model in fp32).
void add_references(json& row, const fs::path& lrec_dir) {
  const json fl = read_json(lrec_dir.string() + "-float-lora/summary.json");
  if (!fl.is_null()) {
    const double kq = fl["before"]["kl_mean"], kl = fl["after"]["kl_mean"];
    row["kl_quantized_float_lora"] = kq;
    row["kl_lrec_float_lora"] = kl;
    row["kl_reduction_float_lora"] = kq > 0 ? 1.0 - kl / kq : NAN;
    row["top1_lrec_float_lora"] = fl["after"]["top1"];
    row["ppl_lrec_float_lora"] = fl["after"]["perplexity"];
    row["effective_bits_float_lora"] = fl["bits"]["effective_bits"];
    const double ri = row["kl_reduction"], rf = row["kl_reduction_float_lora"];
    row["kl_reduction_int_over_float"] = rf > 0 ? ri / rf : NAN;
  }
  const json ko = read_json(lrec_dir.string() + "-kl-only/summary.json");
  if (!ko.is_null()) {
    row["kl_lrec_kl_only"] = ko["after"]["kl_mean"];
    row["ppl_lrec_kl_only"] = ko["after"]["perplexity"];
    row["top1_lrec_kl_only"] = ko["after"]["top1"];
  }
}

std::string fmt(const json& v, int prec = 3) {
  if (!v.is_number()) return "–";
  const double d = v.get<double>();
  if (std::isnan(d)) return "–";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.*f", prec, d);
  return buf;
}

std::string markdown(const json& report) {
  std::ostringstream m;
  m << "# INT2.1 on CPU: quantized weights and LREC correctors\n\n";
  const json& c = report["config"];
  m << "Teacher `" << c["teacher"].get<std::string>() << "` (validation perplexity " << fmt(report["ppl_float"]) << "). "
    << "Group " << c["group"] << ", LREC " << c["lrec_steps"] << " steps at batch " << c["batch"] << ", rank "
    << c["rank"] << ", adapters in " << c["format"].get<std::string>() << ". Evaluation: "
    << (c["eval_windows"].get<long>() == 0 ? std::string("the whole validation split") : c["eval_windows"].dump() + " validation windows")
    << "; KL(teacher‖model) per token in nats; the quantized and corrected models run in the integer engine.\n\n";
  m << "| bits | method | ppl quantized | ppl LREC | ppl float | log-ppl gap recovered | KL quantized | KL LREC | KL reduction | top-1 quantized | top-1 LREC | effective bits | quantize s | peak RSS MiB |\n";
  m << "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
  for (const json& r : report["rows"]) {
    m << "| " << r["bits"] << " | " << r["method"].get<std::string>() << " | " << fmt(r["ppl_quantized"]) << " | "
      << fmt(r["ppl_lrec"]) << " | " << fmt(r["ppl_float"]) << " | " << fmt(r["log_ppl_gap_recovered"], 2) << " | "
      << fmt(r["kl_quantized"], 4) << " | " << fmt(r["kl_lrec"], 4) << " | " << fmt(r["kl_reduction"], 2) << " | "
      << fmt(r["top1_quantized"]) << " | " << fmt(r["top1_lrec"]) << " | " << fmt(r["effective_bits"]) << " | "
      << fmt(r.value("quantize_seconds", json()), 1) << " | " << fmt(r["peak_rss_mib"], 0) << " |\n";
  }
  bool references = false;
  for (const json& r : report["rows"]) references |= r.contains("kl_lrec_float_lora") || r.contains("kl_lrec_kl_only");
  if (references) {
    m << "\n## Integer against float adapters, and the CE term\n\n"
      << "Same quantized base, steps, data and seed. *Float LoRA*: the float reference in the same engine "
      << "(`lrec --adapter-format fp32`); its KL reduction is against its own starting point, the quantized model "
      << "evaluated in fp32. *KL only*: integer adapters trained with CE weight 0.\n\n";
    m << "| bits | method | KL reduction int | KL reduction float LoRA | int / float | top-1 int | top-1 float LoRA | "
         "eff. bits int | eff. bits float | ppl LREC | ppl KL only | KL LREC | KL KL-only | KL p99 LREC |\n";
    m << "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    for (const json& r : report["rows"]) {
      if (!r.contains("kl_lrec_float_lora") && !r.contains("kl_lrec_kl_only")) continue;
      auto f = [&](const char* k, int p = 3) { return r.contains(k) ? fmt(r[k], p) : std::string("–"); };
      m << "| " << r["bits"] << " | " << r["method"].get<std::string>() << " | " << f("kl_reduction", 3) << " | "
        << f("kl_reduction_float_lora", 3) << " | " << f("kl_reduction_int_over_float", 2) << " | " << f("top1_lrec")
        << " | " << f("top1_lrec_float_lora") << " | " << f("effective_bits") << " | " << f("effective_bits_float_lora")
        << " | " << f("ppl_lrec") << " | " << f("ppl_lrec_kl_only") << " | " << f("kl_lrec", 4) << " | "
        << f("kl_lrec_kl_only", 4) << " | " << f("kld_p99_lrec", 3) << " |\n";
    }
  }
  if (!report["rank_sweep"].empty()) {
    m << "\n## Rank sweep at INT2 (" << report["rank_sweep"][0]["method"].get<std::string>() << ")\n\n";
    m << "| rank | effective bits | ppl LREC | log-ppl gap recovered | KL LREC | KL reduction | top-1 LREC |\n|---|---|---|---|---|---|---|\n";
    for (const json& r : report["rank_sweep"]) {
      m << "| " << r["rank"] << " | " << fmt(r["effective_bits"]) << " | " << fmt(r["ppl_lrec"]) << " | "
        << fmt(r["log_ppl_gap_recovered"], 2) << " | " << fmt(r["kl_lrec"], 4) << " | " << fmt(r["kl_reduction"], 2)
        << " | " << fmt(r["top1_lrec"]) << " |\n";
    }
  }
  if (report.contains("memory")) {
    const json& mem = report["memory"];
    m << "\n## Memory: the same model and batch, " << c["memory_steps"] << " steps each\n\n";
    m << "| run | peak RSS MiB |\n|---|---|\n";
    for (const char* k : {"fp32_full_finetune", "fp32_lora", "int_lrec", "int_lrec_fp16_teacher"})
      if (mem.contains(k)) m << "| " << k << " | " << fmt(mem[k], 1) << " |\n";
    m << "\nLREC / fp32 full fine-tuning: **" << fmt(mem["ratio_lrec_to_full"], 3) << "**; fp32 LoRA / fp32 full: "
      << fmt(mem["ratio_fp32_lora_to_full"], 3) << ". Peak RSS of the integer LREC process before its first step (libraries, corpus, "
      << "both models, one evaluation): " << fmt(mem["int_lrec_peak_before_training_mib"], 1)
      << " MiB. Analytic breakdown of the integer LREC run (MiB):";
    for (const auto& [k, v] : mem["int_lrec_breakdown"].items()) m << " " << k << " " << fmt(v, 3) << ";";
    m << "\n";
  }
  if (report.contains("memory_scale")) {
    m << "\n## Memory against model size: the same model and batch, " << c["memory_steps"]
      << " steps each (RTN at the sweep's bits; peak RSS MiB)\n\n"
      << "| d_model | blocks | parameters (M) | batch | fp32 full fine-tuning | LREC, fp32 teacher | ratio | LREC, fp16 teacher | ratio |\n"
      << "|---|---|---|---|---|---|---|---|---|\n";
    for (const json& r : report["memory_scale"]) {
      m << "| " << r["d_model"] << " | " << r["layers"] << " | " << fmt(r["parameters"].get<double>() / 1e6, 1) << " | "
        << r["batch"] << " | " << fmt(r["fp32_full_finetune"], 0) << " | " << fmt(r["int_lrec_fp32_teacher"], 0) << " | "
        << fmt(r["ratio_fp32_teacher"], 3) << " | " << fmt(r["int_lrec_fp16_teacher"], 0) << " | " << fmt(r["ratio_fp16_teacher"], 3)
        << " |\n";
    }
  }
  if (!report["failed"].empty()) {
    m << "\n## Failed stages\n\n";
    for (const json& f : report["failed"]) m << "- " << f["name"].get<std::string>() << ": " << f["message"].get<std::string>() << "\n";
  }
  return m.str();
}

}  // namespace

int run_reproduce_int21(const ReproduceOptions& o) {
  if (o.methods.empty() || o.bits.empty()) throw std::invalid_argument("--methods and --bits must not be empty");
  for (const std::string& m : o.methods)
    if (m != "rtn" && m != "gptq" && m != "adpq" && m != "oac")
      throw std::invalid_argument("--methods: '" + m + "' is not one of rtn, gptq, adpq, oac");
  for (int b : o.bits)
    if (b < 2 || b > 8) throw std::invalid_argument("--bits: " + std::to_string(b) + " is outside 2..8");
  if (o.teacher && !fs::exists(*o.teacher)) throw std::invalid_argument("--teacher " + o.teacher->string() + " does not exist");
  const RunLock lock(o.out, "intrain reproduce");
  const int threads = o.threads > 0 ? o.threads : (o.jobs > 1 ? 1 : 0);
  const fs::path teacher = o.teacher ? fs::absolute(*o.teacher)
                                     : fs::absolute(o.out / "teacher" /
                                                    (o.teacher_early_stop > 0 ? "best.safetensors" : "model.safetensors"));
  const long teacher_eval_every = o.teacher_early_stop > 0 ? std::max<long>(1, o.teacher_steps / 30) : 0;
  pin(o.out, pinned_settings(o, teacher));
  std::vector<ChildFailure> failed;
  auto run = [&](const std::vector<ChildJob>& jobs) {
    const auto f = run_child_jobs(jobs, o.jobs, "reproduce");
    failed.insert(failed.end(), f.begin(), f.end());
    return f.empty();
  };

  // 1. The teacher.
  if (!o.teacher) {
    const fs::path d = o.out / "teacher";
    run({{"teacher",
          plus({"train", "--format", "fp32", "--layers", std::to_string(o.layers), "--d-model", std::to_string(o.d_model),
                "--heads", std::to_string(o.heads), "--context", std::to_string(o.context), "--batch", std::to_string(o.batch),
                "--steps", std::to_string(o.teacher_steps), "--lr", s(o.teacher_lr), "--warmup",
                std::to_string(std::min<long>(100, o.teacher_steps / 10)), "--eval-every", std::to_string(teacher_eval_every),
                "--eval-windows", std::to_string(o.eval_windows > 0 ? std::min<long>(o.eval_windows, 256) : 256),
                "--early-stop", std::to_string(o.teacher_early_stop), "--final-eval-windows",
                std::to_string(o.eval_windows), "--seed", std::to_string(o.seed), "--quiet", "--out", d.string(),
                fs::exists(d / "train_state.safetensors") ? "--resume" : "--overwrite"},
               common(o, o.jobs > 1 ? 0 : threads)),
          d / "summary.json", o.out / "logs" / "teacher.log"}});
  }
  if (!fs::exists(teacher)) {
    throw std::runtime_error("reproduce: no teacher at " + teacher.string() + " (see " + (o.out / "logs" / "teacher.log").string() + ")");
  }

  // 2. Quantized models.
  std::vector<ChildJob> jobs;
  for (const std::string& m : o.methods) {
    for (int b : o.bits) {
      const fs::path q = o.out / "quantized" / (quantized_name(m, b) + ".safetensors");
      fs::create_directories(q.parent_path());
      jobs.push_back({"quantize " + quantized_name(m, b),
                      plus({"quantize", "--model", teacher.string(), "--bits", std::to_string(b), "--group",
                            std::to_string(o.group), "--method", m, "--calib-tokens", std::to_string(o.calib_tokens),
                            "--seed", std::to_string(o.seed), "--out", q.string()},
                           common(o, threads)),
                      q.string() + ".json", o.out / "logs" / ("quantize-" + quantized_name(m, b) + ".log")});
    }
  }
  run(jobs);

  // 3. LREC runs, the rank sweep and the memory comparison.
  const std::string sweep_method = std::find(o.methods.begin(), o.methods.end(), "gptq") != o.methods.end() ? "gptq" : o.methods[0];
  const int sweep_bits = o.bits[0];
  // One `intrain lrec` child; `name` names its job and its log.
  auto lrec_child = [&](const std::string& name, const fs::path& teacher_file, const fs::path& quantized, int rank,
                        const fs::path& dir, long steps, long eval_windows, const std::string& format, double ce_weight,
                        const std::string& adapter_format, int batch, const std::string& teacher_storage) {
    const double alpha = o.alpha > 0.0 ? o.alpha / o.rank * rank : 4.0 * rank;
    std::vector<std::string> a = {"lrec", "--teacher", teacher_file.string(), "--quantized", quantized.string(), "--rank",
                                  std::to_string(rank), "--alpha", s(alpha), "--steps", std::to_string(steps), "--batch",
                                  std::to_string(batch), "--lr", s(o.lr), "--clip-grad-norm", s(o.clip_grad_norm),
                                  "--ce-weight", s(ce_weight), "--format", format,
                                  "--adapter-format", adapter_format,
                                  "--eval-windows", std::to_string(eval_windows), "--seed", std::to_string(o.seed), "--quiet",
                                  "--overwrite", "--out", dir.string()};
    if (teacher_storage != "fp32") a.insert(a.end(), {"--teacher-storage", teacher_storage});
    return ChildJob{name, plus(a, common(o, threads)), dir / "summary.json", o.out / "logs" / ("lrec-" + name + ".log")};
  };
  auto lrec_job = [&](const std::string& m, int b, int rank, const fs::path& dir, long steps, long eval_windows,
                      const std::string& format, double ce_weight, const std::string& adapter_format,
                      const std::string& teacher_storage = "fp32") {
    return lrec_child(dir.filename().string(), teacher, o.out / "quantized" / (quantized_name(m, b) + ".safetensors"), rank,
                      dir, steps, eval_windows, format, ce_weight, adapter_format, o.batch, teacher_storage);
  };
  jobs.clear();
  for (const std::string& m : o.methods)
    for (int b : o.bits)
      jobs.push_back(lrec_job(m, b, o.rank, o.out / "lrec" / lrec_name(m, b, o.rank), o.lrec_steps, o.eval_windows,
                              o.format, o.ce_weight, "int"));
  for (int b : o.reference_bits) {
    if (std::find(o.bits.begin(), o.bits.end(), b) == o.bits.end()) continue;
    const std::string n = lrec_name(sweep_method, b, o.rank);
    jobs.push_back(lrec_job(sweep_method, b, o.rank, o.out / "lrec" / (n + "-float-lora"), o.lrec_steps, o.eval_windows,
                            "fp32", o.ce_weight, "fp32"));
    jobs.push_back(lrec_job(sweep_method, b, o.rank, o.out / "lrec" / (n + "-kl-only"), o.lrec_steps, o.eval_windows,
                            o.format, 0.0, "int"));
  }
  for (int r : o.sweep_ranks)
    if (r != o.rank)
      jobs.push_back(lrec_job(sweep_method, sweep_bits, r, o.out / "lrec" / lrec_name(sweep_method, sweep_bits, r),
                              o.lrec_steps, o.eval_windows, o.format, o.ce_weight, "int"));
  // Memory: the same steps and evaluation in three processes, one at a time
  // below (peak RSS must not depend on what runs beside it; it does not, but
  // time does, and these are short).
  const fs::path mem = o.out / "memory";
  jobs.push_back(lrec_job(sweep_method, sweep_bits, o.rank, mem / "int-lrec", o.memory_steps, 8, o.format, o.ce_weight, "int"));
  jobs.push_back(lrec_job(sweep_method, sweep_bits, o.rank, mem / "int-lrec-fp16-teacher", o.memory_steps, 8, o.format,
                          o.ce_weight, "int", "fp16"));
  jobs.push_back(lrec_job(sweep_method, sweep_bits, o.rank, mem / "fp32-lora", o.memory_steps, 8, "fp32", o.ce_weight, "fp32"));
  run(jobs);
  const json tsum = read_json(fs::path(teacher).parent_path() / "summary.json");
  if (!tsum.is_null() && tsum.contains("config")) {
    const json& tc = tsum["config"];
    run({{"fp32-full",
          plus({"train", "--format", "fp32", "--layers", tc["layers"].dump(), "--d-model", tc["d_model"].dump(), "--heads",
                tc["heads"].dump(), "--context", tc["context"].dump(), "--batch", std::to_string(o.batch), "--steps",
                std::to_string(o.memory_steps), "--eval-every", "0", "--final-eval-windows", "8", "--checkpoint-every", "0",
                "--quiet", "--overwrite", "--out", (mem / "fp32-full").string()},
               common(o, threads)),
          mem / "fp32-full" / "summary.json", o.out / "logs" / "memory-fp32-full.log"}});
  }

  // Memory against model size: the table's model is small next to its
  // activations, INT2.1's LLaMA models are not. At each --memory-widths
  // width (the teacher's depth and context, 64-wide heads) a float model with
  // one step of training (its weights do not change the memory), its RTN
  // quantization at the sweep's bits, and at each --memory-batches batch the
  // same steps of fp32 full fine-tuning and of integer LREC with the teacher
  // in fp32 and in fp16.
  const bool known = !tsum.is_null() && tsum.contains("config");
  const int scale_layers = known ? tsum["config"]["layers"].get<int>() : o.layers;
  const int scale_context = known ? tsum["config"]["context"].get<int>() : o.context;
  for (const int W : o.memory_widths) {
    if (W <= 0) continue;  // --memory-widths 0: none
    const fs::path d = mem / ("d" + std::to_string(W));
    const std::string tag = "memory-d" + std::to_string(W);
    const std::vector<std::string> arch = {"train", "--format", "fp32", "--layers", std::to_string(scale_layers), "--d-model",
                                           std::to_string(W), "--heads", std::to_string(std::max(1, W / 64)), "--context",
                                           std::to_string(scale_context), "--eval-every", "0", "--checkpoint-every", "0",
                                           "--seed", std::to_string(o.seed), "--quiet", "--overwrite"};
    const fs::path model = d / "model" / "model.safetensors", q = d / ("rtn-int" + std::to_string(sweep_bits) + ".safetensors");
    if (!run({{tag + "-model", plus(plus(arch, {"--batch", "1", "--steps", "1", "--final-eval-windows", "1", "--out", (d / "model").string()}),
                                    common(o, threads)),
               d / "model" / "summary.json", o.out / "logs" / (tag + "-model.log")}}))
      continue;
    std::error_code ec;
    fs::remove(d / "model" / "train_state.safetensors", ec);  // twice the model's size, and never resumed
    if (!run({{tag + "-quantize",
               plus({"quantize", "--model", model.string(), "--bits", std::to_string(sweep_bits), "--group",
                     std::to_string(o.group), "--method", "rtn", "--seed", std::to_string(o.seed), "--out", q.string()},
                    common(o, threads)),
               q.string() + ".json", o.out / "logs" / (tag + "-quantize.log")}}))
      continue;
    jobs.clear();
    for (const int B : o.memory_batches) {
      const std::string b = "-b" + std::to_string(B);
      jobs.push_back({tag + "-fp32-full" + b,
                      plus(plus(arch, {"--batch", std::to_string(B), "--steps", std::to_string(o.memory_steps),
                                       "--final-eval-windows", "8", "--out", (d / ("fp32-full" + b)).string()}),
                           common(o, threads)),
                      d / ("fp32-full" + b) / "summary.json", o.out / "logs" / (tag + "-fp32-full" + b + ".log")});
      for (const char* storage : {"fp32", "fp16"}) {
        const std::string n = std::string("int-lrec-") + storage + "-teacher" + b;
        jobs.push_back(lrec_child(tag + "-" + n, model, q, o.rank, d / n, o.memory_steps, 8, o.format, o.ce_weight, "int", B, storage));
      }
    }
    run(jobs);
  }

  // 4. The report.
  json report;
  report["config"] = pinned_settings(o, teacher);
  report["config"]["rank"] = o.rank;
  report["config"]["memory_steps"] = o.memory_steps;
  report["config"]["methods"] = o.methods;
  report["config"]["bits"] = o.bits;
  report["teacher_summary"] = tsum;
  report["rows"] = json::array();
  report["rank_sweep"] = json::array();
  for (const std::string& m : o.methods) {
    for (int b : o.bits) {
      const json l = read_json(o.out / "lrec" / lrec_name(m, b, o.rank) / "summary.json");
      if (l.is_null()) continue;
      json row = row_from(l, m, b, o.rank);
      if (m == sweep_method) add_references(row, o.out / "lrec" / lrec_name(m, b, o.rank));
      const json q = read_json(o.out / "quantized" / (quantized_name(m, b) + ".safetensors.json"));
      if (!q.is_null()) row["quantize_seconds"] = q["seconds"];
      report["ppl_float"] = row["ppl_float"];
      report["rows"].push_back(row);
    }
  }
  std::vector<int> ranks = o.sweep_ranks;
  if (std::find(ranks.begin(), ranks.end(), o.rank) == ranks.end()) ranks.push_back(o.rank);
  std::sort(ranks.begin(), ranks.end());
  for (int r : ranks) {
    const json l = read_json(o.out / "lrec" / lrec_name(sweep_method, sweep_bits, r) / "summary.json");
    if (!l.is_null()) report["rank_sweep"].push_back(row_from(l, sweep_method, sweep_bits, r));
  }
  const json full = read_json(mem / "fp32-full" / "summary.json"), flora = read_json(mem / "fp32-lora" / "summary.json"),
             ilrec = read_json(mem / "int-lrec" / "summary.json");
  if (!full.is_null() && !flora.is_null() && !ilrec.is_null()) {
    // Training peaks: fp32 full fine-tuning's before its final checkpoint is
    // written (older summaries have only the peak that includes it).
    const double f = full.value("peak_rss_mib_training", full["peak_rss_mib"].get<double>()),
                 fl = flora["memory"]["peak_rss_mib"], il = ilrec["memory"]["peak_rss_mib"];
    report["memory"] = {{"fp32_full_finetune", f},
                        {"fp32_lora", fl},
                        {"int_lrec", il},
                        {"ratio_lrec_to_full", il / f},
                        {"ratio_fp32_lora_to_full", fl / f},
                        {"int_lrec_peak_before_training_mib", ilrec["memory"]["peak_rss_mib_before_training"]},
                        {"int_lrec_breakdown", ilrec["memory"]}};
    report["memory"]["int_lrec_breakdown"].erase("peak_rss_mib");
    report["memory"]["int_lrec_breakdown"].erase("peak_rss_mib_before_training");
    const json l16 = read_json(mem / "int-lrec-fp16-teacher" / "summary.json");
    if (!l16.is_null()) {
      report["memory"]["int_lrec_fp16_teacher"] = l16["memory"]["peak_rss_mib"];
      report["memory"]["ratio_lrec_fp16_teacher_to_full"] = l16["memory"]["peak_rss_mib"].get<double>() / f;
    }
  }
  for (const int W : o.memory_widths) {
    if (W <= 0) continue;
    const fs::path d = mem / ("d" + std::to_string(W));
    for (const int B : o.memory_batches) {
      const std::string b = "-b" + std::to_string(B);
      const json fu = read_json(d / ("fp32-full" + b) / "summary.json"), l32 = read_json(d / ("int-lrec-fp32-teacher" + b) / "summary.json"),
                 l16 = read_json(d / ("int-lrec-fp16-teacher" + b) / "summary.json");
      if (fu.is_null() || l32.is_null() || l16.is_null()) continue;
      const double full_mib = fu["peak_rss_mib_training"], a = l32["memory"]["peak_rss_mib"], h = l16["memory"]["peak_rss_mib"];
      json row = {{"d_model", W},
                  {"layers", fu["config"].value("layers", 0)},
                  {"parameters", fu["parameters"]},
                  {"batch", B},
                  {"fp32_full_finetune", full_mib},
                  {"int_lrec_fp32_teacher", a},
                  {"int_lrec_fp16_teacher", h},
                  {"ratio_fp32_teacher", a / full_mib},
                  {"ratio_fp16_teacher", h / full_mib},
                  {"int_lrec_fp16_teacher_breakdown", l16["memory"]}};
      report["memory_scale"].push_back(row);
    }
  }
  report["failed"] = json::array();
  for (const ChildFailure& f : failed) report["failed"].push_back({{"name", f.name}, {"message", f.message}});
  write_text_atomically(o.out / "int21.json", report.dump(2) + "\n");
  const std::string md = markdown(report);
  write_text_atomically(o.out / "int21.md", md);
  std::printf("%s", md.c_str());
  if (o.plots) run_plot_script("plot_int21.py", o.out, "reproduce");
  std::fprintf(stderr, "reproduce: report in %s/int21.md and int21.json\n", o.out.c_str());
  return static_cast<int>(failed.size());
}

}  // namespace intrain
