#include "experiments/bound.h"

#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <stdexcept>
#include <vector>

#include "analysis/bounds.h"
#include "analysis/trajectory_bound.h"
#include "core/precision.h"
#include "layers/gpt.h"
#include "layers/param.h"
#include "optim/sgd.h"

namespace intrain {

namespace {

void require(bool ok, const std::string& flag, const std::string& what) {
  if (!ok) throw std::invalid_argument(flag + ": " + what);
}

}  // namespace

void load_run_constants(BoundOptions& o, const std::filesystem::path& dir, const std::function<bool(const char*)>& given) {
  const std::filesystem::path sp = dir / "summary.json";
  std::ifstream in(sp);
  if (!in) throw std::invalid_argument("--from-run: " + sp.string() + " does not exist; give a finished `intrain train` run");
  nlohmann::json s;
  try {
    s = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw std::invalid_argument("--from-run: " + sp.string() + " is not valid JSON (" + e.what() + ")");
  }
  if (!s.contains("probe")) {
    throw std::invalid_argument("--from-run: " + dir.string() +
                                " was trained without --probe-every, so it has no estimated constants; rerun it with "
                                "--probe-every N, or give --L and --sigma2");
  }
  const nlohmann::json& c = s["probe"].at("constants");
  if (!given("--L")) o.L = c.at("L").get<double>();
  if (!given("--sigma2")) o.sigma2 = c.at("sigma2").get<double>();
  if (!given("--gap") && c.at("gap0").get<double>() > 0.0) o.gap = c.at("gap0").get<double>();
  if (!given("--grad-max")) o.grad_max = c.at("grad_max").get<double>();
  if (!given("--weight-max")) o.weight_max = c.at("master_max").get<double>();
  if (!given("--params")) o.params = s.at("parameters").get<long>();
  if (!given("--format")) {
    // summary.json holds Precision::name(), e.g. "w8a8e8g8-sr": the rounding is its suffix.
    std::string f = s.at("format").get<std::string>();
    if (f.size() > 3 && (f.ends_with("-sr") || f.ends_with("-rn"))) {
      if (!given("--rounding")) o.rounding = f.ends_with("-sr") ? "stochastic" : "nearest";
      f.resize(f.size() - 3);
    }
    o.format = f;
  }
  const nlohmann::json& cfg = s.at("config");
  if (!given("--lr")) o.lr = cfg.at("lr").get<double>();
  if (!given("--momentum")) o.momentum = cfg.value("momentum", 0.0);
  if (!given("--warmup")) o.warmup = cfg.at("warmup").get<long>();
  if (!given("--steps")) o.steps = s.at("steps").get<long>();
}

nlohmann::json run_bound(const BoundOptions& o) {
  require(o.L > 0.0 && std::isfinite(o.L), "--L",
          "the smoothness constant is required (or --from-run DIR) and must be > 0; estimate it with "
          "`intrain train --probe-every N` (docs/convergence.md §8)");
  require(o.sigma2 >= 0.0 && std::isfinite(o.sigma2), "--sigma2",
          "the minibatch gradient variance is required (or --from-run DIR) and must be >= 0; estimate it with "
          "`intrain train --probe-every N`");
  require(o.mu >= 0.0 && o.mu <= o.L, "--mu", "must lie in [0, L]");
  require(o.gap >= 0.0 && std::isfinite(o.gap), "--gap", "f(x0) - f_inf must be >= 0");
  require(o.steps >= 1, "--steps", "must be >= 1");
  require(o.warmup >= 0 && o.warmup <= o.steps, "--warmup", "must lie in [0, --steps]");
  require(o.lr > 0.0, "--lr", "must be > 0");
  require(o.log_every >= 1, "--log-every", "must be >= 1");
  const Precision prec = Precision::parse(o.format, parse_rounding(o.rounding));
  const bool fp = prec.is_float();
  if (!fp) {
    require(o.grad_max > 0.0, "--grad-max",
            "an integer format needs the typical per-tensor max |gradient| (from a run's log or a probe) to set its grid");
    require(o.weight_max > 0.0, "--weight-max", "an integer format needs the typical per-tensor max |weight|");
  }
  double d = static_cast<double>(o.params);
  if (o.params <= 0) {
    const GPT model(GPTConfig{o.layers, 1, o.d_model, o.context, 256}, Precision{}, 1);
    d = static_cast<double>(model.num_parameters());
  }

  // Relative gradient bias from the casts that are not counted term by term
  // (A, and E under RN), docs §10: a model, not a bound.
  double delta = o.delta;
  if (delta < 0.0) {
    delta = fp ? 0.0 : unit_roundoff(prec.a) + (prec.e.rounding() == Rounding::Nearest ? unit_roundoff(prec.e) : 0.0);
  }
  require(delta < 1.0, "--delta", "must be < 1");
  require(o.momentum >= 0.0 && o.momentum < 1.0, "--momentum", "must lie in [0, 1)");
  require(!(o.mu > 0.0 && o.momentum > 0.0), "--mu",
          "the PL bound is derived for momentum-free SGD only; add --momentum 0, or drop --mu for heavy ball's "
          "non-convex bound (docs/convergence.md §6b)");
  ProblemConstants pc{o.L, o.mu, o.gap, o.sigma2, 0.0, 0.0, delta};

  const LrSchedule sched{o.lr, o.warmup, o.steps, o.final_lr_fraction};
  const double master_grid = std::ldexp(1.0, kMasterExponent);
  std::vector<StepTerms> terms(static_cast<std::size_t>(o.steps));
  std::vector<double> lrs(terms.size()), ginf(terms.size(), fp ? 0.0 : o.grad_max);
  for (long k = 0; k < o.steps; ++k) {
    const double lr = applied_lr(sched.at(k), fp);
    lrs[static_cast<std::size_t>(k)] = lr;
    if (fp) {
      StepTerms t;
      t.lr = lr;
      // Float update x+ = fl(x - fl(lr g)): ||r|| <= 2u ||x|| to first order, ||x|| <= sqrt(d) max|w|.
      if (o.weight_max > 0.0) t.update_r2 = std::pow(2.0 * unit_roundoff(prec.w) * std::sqrt(d) * o.weight_max, 2);
      terms[static_cast<std::size_t>(k)] = t;
    } else {
      // One tensor of d elements at the typical maxima: the G cast (linear, gain 1) and the W cast
      // (grad f moves by <= L ||w - x||), the same terms a probed run uses (analysis/trajectory_bound.h).
      const TensorScale all{prec.w, d, o.grad_max, o.weight_max};
      terms[static_cast<std::size_t>(k)] = scaled_step_terms(format_scales(prec, {&all, 1}, lr, 0.0, 0.0, o.momentum), lr, o.L);
    }
  }
  const Rounding update = fp ? Rounding::Nearest : Rounding::Stochastic;
  const SgdBound bound(pc, update);
  const double beta = o.momentum > 0.0 ? applied_momentum(o.momentum, fp) : 0.0;
  const std::vector<BoundPoint> nc = beta > 0.0 ? bound.heavy_ball_gradient_norm(terms, beta) : bound.gradient_norm(terms);
  std::vector<BoundPoint> pl;
  if (o.mu > 0.0) pl = bound.suboptimality(terms);
  const double g_flush = fp || prec.g.rounding() != Rounding::Nearest ? 0.0 : format_grid(prec.g, o.grad_max) / 2.0;
  // The engine's master update is stochastic; this is where a round-to-nearest
  // master update on the same grid would stop moving a coordinate of size --grad-max.
  const StagnationReport stag = rn_stagnation(lrs, ginf, master_grid, d, o.mu, delta);

  nlohmann::json j;
  j["format"] = prec.name();
  j["update_rounding"] = rounding_name(update);
  j["optimizer"] = beta > 0.0 ? "heavy ball" : "sgd";
  j["momentum"] = beta;
  j["constants"] = {{"L", o.L},         {"mu", o.mu},           {"gap", o.gap}, {"sigma2", o.sigma2},
                    {"delta", delta},   {"params", d},          {"grad_max", o.grad_max},
                    {"weight_max", o.weight_max}, {"master_grid", master_grid}};
  j["schedule"] = {{"lr", o.lr}, {"warmup", o.warmup}, {"steps", o.steps}, {"final_lr_fraction", o.final_lr_fraction}};
  const std::string opt = beta > 0.0 ? "heavy ball (momentum " + std::to_string(beta) + ")" : "momentum-free SGD";
  std::printf("# intrain bound: %s, %s, %s update on the master grid 2^%d, d = %.0f\n", prec.name().c_str(),
              opt.c_str(), rounding_name(update), kMasterExponent, d);
  std::printf("%8s %11s %11s %11s %13s%s %13s\n", "step", "lr", "eps_abs", "grad_var", "min_E|g|^2<=",
              o.mu > 0.0 ? "  E[f-f*]<=  " : "", "rn_move_thr");
  nlohmann::json rows = nlohmann::json::array();
  for (long k = 1; k <= o.steps; ++k) {
    if (k % o.log_every != 0 && k != o.steps) continue;
    const StepTerms& t = terms[static_cast<std::size_t>(k - 1)];
    const double thr = rn_move_threshold(t.lr, master_grid);
    nlohmann::json row = {{"step", k},          {"lr", t.lr},
                          {"eps_abs", t.eps_abs}, {"grad_var", t.grad_var},
                          {"grad_norm2_bound", nc[static_cast<std::size_t>(k - 1)].value},
                          {"rn_move_threshold", thr}};
    std::printf("%8ld %11.4e %11.4e %11.4e %13.4e", k, t.lr, t.eps_abs, t.grad_var, nc[static_cast<std::size_t>(k - 1)].value);
    if (o.mu > 0.0) {
      const BoundPoint& p = pl[static_cast<std::size_t>(k)];
      row["suboptimality_bound"] = p.value;
      row["log10_transient"] = p.log10_transient;
      std::printf(" %13.4e", p.value);
    }
    std::printf(" %13.4e\n", thr);
    rows.push_back(row);
  }
  j["steps"] = rows;
  j["rn_stagnation"] = {{"first_step", stag.first_step},
                        {"stuck_steps", stag.stuck_steps},
                        {"g_flush_below", g_flush},
                        {"note", "first step where lr * grad_max < master_grid / 2, i.e. where a round-to-nearest "
                                 "master update would stop; the engine's master update is stochastic"}};
  if (stag.first_step >= 0) j["rn_stagnation"]["stall_level"] = stag.stall_level;
  std::printf("# RN stagnation of a master update on 2^%d: %s", kMasterExponent,
              stag.first_step < 0 ? "none within the run" : ("from step " + std::to_string(stag.first_step)).c_str());
  if (g_flush > 0.0) std::printf("; the RN gradient cast zeroes every |g_i| < %.3e", g_flush);
  std::printf("\n");
  std::cout << j.dump() << std::endl;
  return j;
}

}  // namespace intrain
