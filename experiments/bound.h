// `intrain bound`: the convergence bound of a planned run, before it is spent
// (docs/convergence.md §10). Momentum-free SGD with the run's lr schedule;
// the non-convex bound on min_k E||grad f(x_k)||^2 always, and with --mu > 0
// the PL bound on E f(x_k) - f*.
#pragma once

#include <filesystem>
#include <functional>
#include <string>

#include <nlohmann/json.hpp>

namespace intrain {

struct BoundOptions {
  std::string format = "int8", rounding = "stochastic";
  double lr = 0.1, final_lr_fraction = 0.1;
  double momentum = 0.9;  // heavy ball as `intrain train` runs it by default; 0: momentum-free SGD
  long steps = 2000, warmup = 100, log_every = 100;
  // Constants the user supplies (estimate them with analysis/estimators.h on a probe run).
  double L = -1.0, sigma2 = -1.0;  // required: < 0 means "not given"
  double mu = 0.0;                 // PL constant; 0: non-convex only
  double gap = 5.545177444479562;  // f(x_0) - f_inf: ln 256, a byte model's initial loss, with f_inf = 0
  double grad_max = -1.0, weight_max = -1.0;  // required for integer formats: typical per-tensor max |g|, |w|
  double delta = -1.0;             // relative gradient bias; < 0: the format's default (docs §10)
  long params = 0;                 // 0: count the GPT of --layers / --d-model
  int layers = 4, d_model = 128, context = 128;
};

// `--from-run DIR`: takes L, sigma2, f(x0) - f_inf, the format, the schedule,
// the parameter count and the largest |g| and |master| from a finished
// `intrain train --probe-every` run (DIR/summary.json, written from
// DIR/probe.csv). `given(flag)` says which flags the user set; those win.
// Throws naming DIR if it holds no probed run.
void load_run_constants(BoundOptions& o, const std::filesystem::path& dir, const std::function<bool(const char*)>& given);

// Prints the table to stdout and returns the JSON object (also printed).
// Throws std::invalid_argument naming the flag for bad input.
nlohmann::json run_bound(const BoundOptions& opt);

}  // namespace intrain
