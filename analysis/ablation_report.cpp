#include "analysis/ablation_report.h"

#include <algorithm>
#include <boost/math/distributions/students_t.hpp>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <tuple>
#include <sstream>
#include <stdexcept>

#include "analysis/trajectory_bound.h"

namespace intrain {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

json read_json(const fs::path& p) {
  std::ifstream in(p);
  if (!in) throw std::runtime_error(p.string() + ": cannot open");
  try {
    return json::parse(in);
  } catch (const json::exception& e) {
    throw std::runtime_error(p.string() + ": not valid JSON (" + e.what() + "); delete the cell folder to rerun it");
  }
}

// Splits one CSV line (no quoting: metrics.csv holds numbers only).
std::vector<std::string> split_csv(const std::string& line) {
  std::vector<std::string> f;
  std::stringstream ss(line);
  std::string item;
  while (std::getline(ss, item, ',')) f.push_back(item);
  if (!line.empty() && line.back() == ',') f.emplace_back();
  return f;
}

double mean_of(const std::vector<double>& v) {
  double s = 0.0;
  for (double x : v) s += x;
  return v.empty() ? 0.0 : s / static_cast<double>(v.size());
}

// Sample standard deviation (n - 1); 0 for fewer than two values.
double sd_of(const std::vector<double>& v) {
  if (v.size() < 2) return 0.0;
  const double m = mean_of(v);
  double s = 0.0;
  for (double x : v) s += (x - m) * (x - m);
  return std::sqrt(s / static_cast<double>(v.size() - 1));
}

// A byte model that predicts the uniform distribution has loss ln 256; a
// final loss above it means the run diverged, whatever its exact value.
constexpr double kUniformLoss = 5.545177444479562;

std::string fmt(const char* f, double x) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, x);
  return buf;
}

// The "bound held" column of one group.
std::string bound_cell(const json& g) {
  if (!g.contains("bound")) return "n/a";
  const json& b = g["bound"];
  const int ev = b["evaluated"].get<int>(), held = b["held"].get<int>(), vac = b["held_vacuous"].get<int>();
  if (ev == 0) return b.value("not_evaluated", std::string("n/a"));
  std::string s = (held == ev ? "yes " : "no ") + std::to_string(held) + "/" + std::to_string(ev);
  if (vac > 0) s += vac == held ? " (vacuous)" : " (" + std::to_string(vac) + " vacuous)";
  if (b.contains("not_evaluated")) s += "; others " + b["not_evaluated"].get<std::string>();
  return s;
}

// About 100 points of a bound curve, and the last.
std::vector<std::array<double, 3>> thin_curve(const std::vector<std::array<double, 3>>& all) {
  std::vector<std::array<double, 3>> out;
  const std::size_t stride = std::max<std::size_t>(1, all.size() / 100);
  for (std::size_t i = 0; i < all.size(); ++i) {
    if (i % stride == 0 || i + 1 == all.size()) out.push_back(all[i]);
  }
  return out;
}

}  // namespace

void use_smoothness_floor(CellResult& c, const RunBound& rb) {
  c.bound_status = rb.status;
  c.est_L = rb.constants.L;
  c.L_source = rb.constants.L > rb.constants.L_own ? "fp32 cell" : "own";
  c.bound_held = rb.held;
  c.bound_vacuous = rb.vacuous;
  c.bound_final = std::isfinite(rb.final_bound) ? rb.final_bound : INFINITY;
  c.bound_measured = std::isfinite(rb.final_measured) ? rb.final_measured : 0.0;
  std::vector<std::array<double, 3>> all;
  for (std::size_t K = 1; K <= rb.bound.size(); ++K)
    if (std::isfinite(rb.measured[K - 1])) all.push_back({static_cast<double>(K), rb.bound[K - 1], rb.measured[K - 1]});
  c.bound_curve = thin_curve(all);
}

std::string ablation_group_name(int bits, const std::string& rounding, const std::string& tiling) {
  if (bits == 32) return "fp32";
  return "int" + std::to_string(bits) + (rounding == "nearest" ? "-rn" : "-sr") + (tiling == "none" ? "" : "+" + tiling);
}

CellResult load_cell(const fs::path& dir, int bits, const std::string& rounding, int seed, const std::string& tiling) {
  CellResult c;
  c.tiling = tiling;
  c.name = dir.filename().string();
  c.bits = bits;
  c.rounding = rounding;
  c.seed = seed;
  bool lrec = false;
  if (fs::exists(dir / "summary.json")) {
    const json s = read_json(dir / "summary.json");
    c.status = "done";
    lrec = s.contains("after") && s.contains("before");
    if (lrec) {
      // An `intrain lrec` cell: the loss is the validation KL(teacher || student)
      // per token, before (step 0) and after LREC; it has no validation curve between.
      c.final_val_loss = s.at("after").at("kl_mean").get<double>();
      c.final_train_loss = s.at("final_train_kl").get<double>();
      c.peak_rss_mib = s.at("memory").at("peak_rss_mib").get<double>();
      c.val_curve = {{0, s.at("before").at("kl_mean").get<double>()},
                     {s.at("config").at("steps").get<long>(), c.final_val_loss}};
    } else {
      c.final_val_loss = s.at("final_val_loss").get<double>();
      c.final_train_loss = s.at("final_train_loss").get<double>();
      c.peak_rss_mib = s.at("peak_rss_mib").get<double>();
    }
    c.tokens_per_s = s.at("tokens_per_s").get<double>();
    c.wall_s = s.at("wall_s").get<double>();
  } else if (fs::exists(dir / "failed.json")) {
    c.status = "failed";
    c.failure = read_json(dir / "failed.json").value("message", std::string("unknown failure"));
  } else {
    c.status = "missing";
  }
  if (c.status == "done") {
    const json s = read_json(dir / "summary.json");
    if (s.contains("probe")) {
      const json& pr = s["probe"];
      c.bound_status = pr.at("status").get<std::string>();
      c.est_L = pr.at("constants").at("L").get<double>();
      c.est_sigma2 = pr.at("constants").at("sigma2").get<double>();
      if (c.bound_status == "evaluated") {
        c.bound_held = pr.at("held").get<bool>();
        c.bound_vacuous = pr.at("vacuous").get<bool>();
        c.bound_final = pr.value("final_bound", json(nullptr)).is_number() ? pr["final_bound"].get<double>() : INFINITY;
        c.bound_measured = pr.value("final_measured", json(nullptr)).is_number() ? pr["final_measured"].get<double>() : 0.0;
      }
    }
  }
  c.own_L = c.est_L;
  if (c.bound_status == "evaluated") {
    // bound.csv has a row per step (those with a measurement are kept).
    std::ifstream b(dir / "bound.csv");
    std::string row;
    std::vector<std::array<double, 3>> all;
    std::getline(b, row);  // header: step,lr,bound,measured
    while (std::getline(b, row)) {
      const std::vector<std::string> f = split_csv(row);
      if (f.size() != 4 || f[3].empty()) continue;
      all.push_back({std::stod(f[0]), std::stod(f[2]), std::stod(f[3])});
    }
    c.bound_curve = thin_curve(all);
  }
  std::ifstream m(dir / "metrics.csv");
  std::string line;
  if (!lrec && m && std::getline(m, line)) {
    const std::vector<std::string> head = split_csv(line);
    const auto col = [&](const char* name) {
      const auto it = std::find(head.begin(), head.end(), name);
      if (it == head.end()) throw std::runtime_error((dir / "metrics.csv").string() + ": no column '" + name + "'");
      return static_cast<std::size_t>(it - head.begin());
    };
    const std::size_t c_step = col("step"), c_val = col("val_loss"), c_sat = col("saturated_fraction");
    std::vector<double> sat;
    while (std::getline(m, line)) {
      const std::vector<std::string> f = split_csv(line);
      if (f.size() != head.size()) continue;  // a row cut short by a kill
      if (!f[c_val].empty()) c.val_curve.emplace_back(std::stol(f[c_step]), std::stod(f[c_val]));
      sat.push_back(std::stod(f[c_sat]));
    }
    c.saturated_fraction = mean_of(sat);
  }
  return c;
}

double student_t_quantile(double p, int df) {
  if (df < 1) throw std::invalid_argument("student_t_quantile: df must be at least 1");
  return boost::math::quantile(boost::math::students_t_distribution<double>(df), p);
}

GapStatistics paired_gap(const std::vector<CellResult>& cells, const std::vector<CellResult>& baseline) {
  std::vector<double> d, rel;
  for (const CellResult& c : cells) {
    if (c.status != "done") continue;
    for (const CellResult& b : baseline) {
      if (b.status == "done" && b.seed == c.seed) {
        d.push_back(c.final_val_loss - b.final_val_loss);
        rel.push_back((c.final_val_loss - b.final_val_loss) / b.final_val_loss);
      }
    }
  }
  GapStatistics g;
  g.n = static_cast<int>(d.size());
  g.mean = mean_of(d);
  g.sd = sd_of(d);
  g.relative_mean = mean_of(rel);
  if (g.n >= 2) {
    const double half = student_t_quantile(0.975, g.n - 1) * g.sd / std::sqrt(static_cast<double>(g.n));
    g.ci_lo = g.mean - half;
    g.ci_hi = g.mean + half;
  }
  return g;
}

json ablation_report(const std::vector<CellResult>& cells, const json& settings) {
  // Groups keyed by (bits, rounding); fp32 (bits 32) sorts last by bits, so
  // it is put first explicitly below.
  std::map<std::tuple<int, std::string, std::string>, std::vector<CellResult>> groups;
  for (const CellResult& c : cells) groups[{c.bits, c.rounding, c.tiling}].push_back(c);
  const std::vector<CellResult> none;
  const auto fp32_it = groups.find({32, "", "none"});
  const std::vector<CellResult>& baseline = fp32_it == groups.end() ? none : fp32_it->second;
  const double tokens_per_step = settings.value("batch", 0.0) * settings.value("context", 0.0);

  json jcells = json::array();
  for (const CellResult& c : cells) {
    json j = {{"name", c.name}, {"bits", c.bits},     {"rounding", c.rounding},
              {"tiling", c.tiling}, {"seed", c.seed}, {"status", c.status}};
    if (c.status == "failed") j["failure"] = c.failure;
    if (c.status == "done") {
      j["final_val_loss"] = c.final_val_loss;
      j["final_train_loss"] = c.final_train_loss;
      j["tokens_per_s"] = c.tokens_per_s;
      j["peak_rss_mib"] = c.peak_rss_mib;
      j["wall_s"] = c.wall_s;
    }
    j["saturated_fraction"] = c.saturated_fraction;
    j["bound"] = {{"status", c.bound_status}};
    if (c.bound_status != "n/a (no probe)") {
      j["bound"]["L"] = c.est_L;
      j["bound"]["L_own"] = c.own_L;
      j["bound"]["L_source"] = c.L_source;
      j["bound"]["sigma2"] = c.est_sigma2;
    }
    if (c.bound_status == "evaluated") {
      j["bound"]["held"] = c.bound_held;
      j["bound"]["vacuous"] = c.bound_vacuous;
      j["bound"]["final_bound"] = std::isfinite(c.bound_final) ? json(c.bound_final) : json(nullptr);
      j["bound"]["final_measured"] = c.bound_measured;
      json bc = json::array();
      for (const auto& [step, b, m] : c.bound_curve) bc.push_back({step, std::isfinite(b) ? json(b) : json(nullptr), m});
      j["bound"]["curve"] = bc;
    }
    json curve = json::array();
    for (const auto& [step, v] : c.val_curve) curve.push_back({step, v});
    j["val_curve"] = curve;
    jcells.push_back(j);
  }

  json jgroups = json::array();
  auto add_group = [&](int bits, const std::string& rounding, const std::string& tiling,
                       const std::vector<CellResult>& g) {
    std::vector<double> val, sat, tps, rss;
    int failed = 0, diverged = 0, evaluated = 0, held = 0, vacuous = 0;
    std::string not_evaluated;  // the reason of the first done cell without a bound
    for (const CellResult& c : g) {
      if (c.status == "failed") ++failed;
      if (c.status != "done") continue;
      if (c.bound_status == "evaluated") {
        ++evaluated;
        held += c.bound_held;
        vacuous += c.bound_held && c.bound_vacuous;
      } else if (not_evaluated.empty()) {
        not_evaluated = c.bound_status;
      }
      diverged += c.final_val_loss > kUniformLoss;
      val.push_back(c.final_val_loss);
      sat.push_back(c.saturated_fraction);
      tps.push_back(c.tokens_per_s);
      rss.push_back(c.peak_rss_mib);
    }
    json j = {{"name", ablation_group_name(bits, rounding, tiling)}, {"bits", bits}, {"rounding", rounding},
              {"tiling", tiling},
              {"seeds", static_cast<int>(g.size())}, {"done", static_cast<int>(val.size())}, {"failed", failed},
              {"diverged", diverged}};
    if (!val.empty()) {
      j["val_mean"] = mean_of(val);
      j["val_sd"] = sd_of(val);
      j["saturated_fraction"] = mean_of(sat);
      j["tokens_per_s"] = mean_of(tps);
      j["seconds_per_step"] = tokens_per_step > 0 ? tokens_per_step / mean_of(tps) : 0.0;
      j["peak_rss_mib"] = mean_of(rss);
    }
    j["bound"] = {{"evaluated", evaluated}, {"held", held}, {"held_vacuous", vacuous}};
    if (!not_evaluated.empty()) j["bound"]["not_evaluated"] = not_evaluated;
    if (bits != 32) {
      const GapStatistics gap = paired_gap(g, baseline);
      j["gap"] = {{"n", gap.n}, {"mean", gap.mean}, {"sd", gap.sd}, {"relative_mean", gap.relative_mean}};
      if (gap.ci_lo) j["gap"]["ci95"] = {*gap.ci_lo, *gap.ci_hi};
    }
    jgroups.push_back(j);
  };
  if (fp32_it != groups.end()) add_group(32, "", "none", baseline);
  for (const auto& [key, g] : groups) {
    const auto& [bits, rounding, tiling] = key;
    if (bits != 32) add_group(bits, rounding, tiling, g);
  }

  // Pareto: listed when no other group is strictly better on all three axes.
  json pareto = json::array();
  std::vector<const json*> ranked;
  for (const json& a : jgroups) {
    if (!a.contains("val_mean")) continue;
    bool beaten = false;
    for (const json& b : jgroups) {
      if (&a == &b || !b.contains("val_mean")) continue;
      beaten = beaten || (b["val_mean"].get<double>() < a["val_mean"].get<double>() &&
                          b["bits"].get<int>() < a["bits"].get<int>() &&
                          b["seconds_per_step"].get<double>() < a["seconds_per_step"].get<double>());
    }
    if (!beaten) ranked.push_back(&a);
  }
  std::sort(ranked.begin(), ranked.end(),
            [](const json* x, const json* y) { return (*x)["val_mean"].get<double>() < (*y)["val_mean"].get<double>(); });
  for (const json* g : ranked) pareto.push_back((*g)["name"]);

  return {{"settings", settings}, {"cells", jcells}, {"groups", jgroups}, {"pareto", pareto}};
}

namespace {
// "the first N windows of the validation split", or the whole split (N = 0).
std::string validation_windows(long n) {
  return n > 0 ? "the first " + std::to_string(n) + " windows of the validation split" : "the whole validation split";
}
}  // namespace

std::string ablation_markdown(const json& r) {
  std::ostringstream md;
  const json& s = r.at("settings");
  const bool lrec = s.value("kind", std::string("train")) == "lrec";
  if (lrec) {
    md << "# Bit-width ablation of LREC\n\n";
    md << "Every cell trains rank-" << s.value("rank", 0) << " LoRA correctors (alpha " << s.value("alpha", 0.0)
       << ") of `" << s.value("quantized", std::string("?")) << "` against the teacher `"
       << s.value("teacher", std::string("?")) << "`: " << s.value("steps", 0) << " SGD steps, batch "
       << s.value("batch", 0) << ", peak lr " << s.value("lr", 0.0) << ", momentum " << s.value("momentum", 0.0)
       << ", CE weight " << s.value("ce_weight", 0.0) << "; data " << s.value("data", std::string("?"))
       << ". The integer cells train in the integer engine at the cell's bits; fp32 is the float LoRA reference "
          "on the same packed base.\n\n";
    md << "The loss is the validation KL(teacher || student) in nats per token after LREC, over "
       << validation_windows(s.value("eval_windows", 0L)) << " (the same for every cell). `gap` is the paired difference to the fp32 reference at the same seed (same "
          "initial adapters and batches): mean, and its 95% Student-t interval over seeds. Column meanings: "
          "docs/ablation.md.\n\n";
  } else {
    md << "# Bit-width ablation\n\n";
    md << "Model: " << s.value("layers", 0) << " layers, d = " << s.value("d_model", 0) << ", " << s.value("heads", 0)
       << " heads, context " << s.value("context", 0) << ", batch " << s.value("batch", 0) << "; "
       << s.value("steps", 0) << " SGD steps, peak lr " << s.value("lr", 0.0) << ", warmup " << s.value("warmup", 0)
       << ", momentum " << s.value("momentum", 0.0) << ", init std " << s.value("init_std", 0.0) << "; data "
       << s.value("data", std::string("?")) << ".\n\n";
    const long final_windows = s.value("final_eval_windows", 0L);
    md << "Final validation loss in nats per byte over " << validation_windows(final_windows)
       << (final_windows > 0 ? " (the same for every cell)" : "") << ". `gap` is the paired difference "
          "to fp32 at the same seed (same initialisation and batches): mean, and its 95% Student-t interval over "
          "seeds. Column meanings: docs/ablation.md.\n\n";
  }
  md << "| format | seeds | val loss (mean ± sd) | gap to fp32 | 95% CI of gap | gap % | saturated | tokens/s | "
        "peak MiB | bound held |\n";
  md << "|---|---|---|---|---|---|---|---|---|---|\n";
  for (const json& g : r.at("groups")) {
    md << "| " << g["name"].get<std::string>() << " | " << g["done"].get<int>() << "/" << g["seeds"].get<int>();
    if (g["failed"].get<int>() > 0) md << " (" << g["failed"].get<int>() << " failed)";
    if (g.value("diverged", 0) > 0) md << " (" << g["diverged"].get<int>() << " diverged)";
    md << " | ";
    if (g.contains("val_mean")) {
      md << fmt("%.4f", g["val_mean"].get<double>()) << " ± " << fmt("%.4f", g["val_sd"].get<double>());
    } else {
      md << "n/a";
    }
    md << " | ";
    if (g.contains("gap") && g["gap"]["n"].get<int>() > 0) {
      const json& gap = g["gap"];
      md << fmt("%+.4f", gap["mean"].get<double>()) << " | ";
      if (gap.contains("ci95")) {
        md << "[" << fmt("%+.4f", gap["ci95"][0].get<double>()) << ", " << fmt("%+.4f", gap["ci95"][1].get<double>())
           << "]";
      } else {
        md << "n/a (1 seed)";
      }
      md << " | " << fmt("%+.2f%%", 100.0 * gap["relative_mean"].get<double>());
    } else {
      md << (g["bits"].get<int>() == 32 ? "baseline | | " : "n/a | | ");
    }
    md << " | ";
    if (g.contains("val_mean")) {
      md << fmt("%.2e", g["saturated_fraction"].get<double>()) << " | " << fmt("%.0f", g["tokens_per_s"].get<double>())
         << " | " << fmt("%.0f", g["peak_rss_mib"].get<double>());
    } else {
      md << " | | ";
    }
    md << " | " << bound_cell(g) << " |\n";
  }
  md << "\n*bound held*: per seed, whether the measured weighted mean of the probes' squared gradient norms "
        "stayed under the convergence bound at every step (yes k/n); *vacuous* when the bound is no better than "
        "smoothness alone gives (>= 2 L (f(x0) - f_inf)), or infinite (heavy ball at a step too long for its drift "
        "term); n/a where the bound does not apply (weight decay) or the run was not probed. An integer cell's "
        "bound uses the larger of its own smoothness estimate and the fp32 cell's at the same seed (smoothness "
        "belongs to the loss, and each trajectory estimate errs low; ablation.json gives both). See "
        "docs/convergence.md §6b and §10.\n";
  md << "\nA cell *diverged* when its final loss exceeds ln 256 = 5.545 (worse than predicting every byte as "
        "equally likely); its loss still enters the mean.\n";
  md << "\n## Pareto front\n\nOver (mean validation loss, bits, seconds per step): a format is listed when no other "
        "is strictly better on all three. Ordered by loss.\n\n";
  for (const json& n : r.at("pareto")) md << "- " << n.get<std::string>() << "\n";
  bool any_failed = false;
  for (const json& c : r.at("cells")) {
    if (c["status"] == "failed") {
      if (!any_failed) md << "\n## Failed cells\n\n";
      any_failed = true;
      md << "- " << c["name"].get<std::string>() << ": " << c["failure"].get<std::string>() << "\n";
    }
  }
  return md.str();
}

}  // namespace intrain
