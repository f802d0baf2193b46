#include "experiments/train.h"

#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <numeric>
#include <span>
#include <sstream>
#include <stdexcept>
#include <vector>

#include "core/collective.h"
#include "experiments/build_info.h"
#include "experiments/checkpoint.h"
#include "experiments/run_lock.h"
#include "experiments/corpus.h"
#include "experiments/trajectory_probe.h"
#include "layers/gpt.h"
#include "optim/sgd.h"

namespace intrain {

namespace fs = std::filesystem;

double peak_rss_mib() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;  // kB
  }
  return 0.0;
}

const char* build_commit() { return INTRAIN_BUILD_COMMIT; }

std::string exact_text(double x) {
  char buf[32];
  const auto r = std::to_chars(buf, buf + sizeof buf, x);
  return std::string(buf, r.ptr);
}

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// The settings a resumed run must share with the run it continues.
Metadata run_settings(const TrainOptions& o, const Precision& prec, const std::string& corpus) {
  return {{"layers", std::to_string(o.layers)},   {"d_model", std::to_string(o.d_model)},
          {"heads", std::to_string(o.heads)},     {"context", std::to_string(o.context)},
          {"batch", std::to_string(o.batch)},     {"steps", std::to_string(o.steps)},
          {"warmup", std::to_string(o.warmup)},   {"lr", std::to_string(o.lr)},
          {"momentum", std::to_string(o.momentum)}, {"weight_decay", std::to_string(o.weight_decay)},
          {"format", prec.name()},                {"seed", std::to_string(o.seed)},
          {"init_std", std::to_string(o.init_std)}, {"data", corpus}};
}

// Mean loss over consecutive validation windows (all of them if max_windows <= 0).
double validation_loss(GPT& model, const Corpus& corpus, int B, int T, long max_windows, std::uint64_t seed,
                       std::int64_t* tokens = nullptr) {
  ValWindows windows(corpus.val, T, max_windows);
  std::vector<std::int32_t> x(static_cast<std::size_t>(B) * T), y(x.size());
  double sum = 0.0;
  std::int64_t n = 0, batch_index = 0;
  while (int got = windows.next(B, x.data(), y.data())) {
    // Evaluation rounds on its own streams, far from any training step.
    const double l = model.forward(x.data(), y.data(), got, T, (std::uint64_t{1} << 40) + batch_index++, seed, false);
    sum += l * got * T;
    n += static_cast<std::int64_t>(got) * T;
  }
  if (tokens) *tokens = n;
  return n ? sum / static_cast<double>(n) : 0.0;
}

std::string fmt_eta(double s) {
  char buf[32];
  if (s >= 3600) {
    std::snprintf(buf, sizeof buf, "%dh%02dm", static_cast<int>(s / 3600), static_cast<int>(s / 60) % 60);
  } else {
    std::snprintf(buf, sizeof buf, "%dm%02ds", static_cast<int>(s / 60), static_cast<int>(s) % 60);
  }
  return buf;
}

// Keeps the header and the rows of steps < `keep_below` (resume after a kill).
void truncate_metrics(const fs::path& p, long keep_below) {
  std::ifstream in(p);
  std::vector<std::string> lines;
  std::string line;
  while (std::getline(in, line)) {
    if (lines.empty() || (!line.empty() && std::stol(line.substr(0, line.find(','))) < keep_below)) lines.push_back(line);
  }
  in.close();
  const fs::path tmp = p.string() + ".tmp";
  {
    std::ofstream out(tmp);
    for (const auto& l : lines) out << l << '\n';
  }
  fs::rename(tmp, p);
}

void write_json_atomically(const fs::path& p, const nlohmann::json& j) {
  const fs::path tmp = p.string() + ".tmp";
  {
    std::ofstream out(tmp);
    out << j.dump(2) << '\n';
    if (!out) throw std::runtime_error(tmp.string() + ": cannot write");
  }
  fs::rename(tmp, p);
}

}  // namespace

TrainResult run_train(const TrainOptions& o) {
  const auto t_start = Clock::now();
  if (o.steps < 1) throw std::invalid_argument("--steps must be at least 1");
  if (o.batch < 1) throw std::invalid_argument("--batch must be at least 1");
  if (!(o.lr > 0.0)) throw std::invalid_argument("--lr must be positive");
  Precision prec = Precision::parse(o.format, parse_rounding(o.rounding));
  prec.tiling = OutlierTiling::parse(o.outlier_tiling, o.outlier_threshold);
  if (prec.tiling.any() && prec.is_float()) throw std::invalid_argument("--outlier-tiling needs an integer --format");
  GPTConfig cfg{o.layers, o.heads, o.d_model, o.context, kVocabSize};
  cfg.validate();
  const SingleProcess one_process;
  const Collective& comm = o.comm ? *o.comm : one_process;
  const int ranks = comm.size();
  const bool writer = comm.rank() == 0;  // rank 0 alone writes --out
  if (o.threads > 0) {
    omp_set_num_threads(o.threads);
  } else if (ranks > 1) {
    omp_set_num_threads(threads_per_rank(comm));
  }
  if (o.batch % ranks != 0) {
    throw std::invalid_argument("--batch " + std::to_string(o.batch) + " does not split evenly over " +
                                std::to_string(ranks) + " ranks: use a multiple of " + std::to_string(ranks));
  }
  if (o.early_stop > 0 && o.eval_every <= 0) {
    throw std::invalid_argument("--early-stop needs periodic validation: set --eval-every");
  }
  if (ranks > 1 && o.probe_every > 0) {
    throw std::invalid_argument("--probe-every runs single-process only (the probe's micro-batches are not split "
                                "over ranks); run it without mpirun");
  }

  const Corpus corpus = Corpus::load(o.data, o.context + 1);
  const Metadata settings = run_settings(o, prec, corpus.name);

  std::optional<RunLock> lock;
  if (writer) lock.emplace(o.out, "intrain train");
  const fs::path metrics_path = o.out / "metrics.csv", state_path = o.out / "train_state.safetensors";
  const fs::path model_path = o.out / "model.safetensors", summary_path = o.out / "summary.json";
  const fs::path best_path = o.out / "best.safetensors";
  // Early stopping's state; saved in train_state's metadata so a resumed run keeps it.
  double best_val = INFINITY;
  long best_step = -1, evals_since_best = 0;

  GPT model(cfg, prec, o.seed, static_cast<float>(o.init_std));
  if (ranks > 1) model.set_batch_shard(&comm);
  long start = 0;
  if (o.resume) {
    if (!fs::exists(state_path)) {
      throw std::runtime_error(state_path.string() + " does not exist: there is nothing to resume; run without --resume");
    }
    const Metadata saved = load_train_state(state_path, model);
    for (const auto& [k, v] : settings) {
      const auto it = saved.find(k);
      if (it == saved.end() || it->second != v) {
        throw std::runtime_error("--resume: " + state_path.string() + " was written with " + k + " = " +
                                 (it == saved.end() ? "(none)" : it->second) + ", this run has " + k + " = " + v +
                                 "; use the same flags or another --out");
      }
    }
    start = std::stol(saved.at("step"));
    model.refresh_values(static_cast<std::uint64_t>(start), o.seed);
    if (saved.count("best_val_loss")) {
      best_val = std::stod(saved.at("best_val_loss"));
      best_step = std::stol(saved.at("best_step"));
      evals_since_best = std::stol(saved.at("evals_since_best"));
    }
  } else if ((fs::exists(metrics_path) || fs::exists(state_path)) && !o.overwrite) {
    throw std::runtime_error(o.out.string() +
                             " already holds a run: pass --resume to continue it, --overwrite to replace it, or "
                             "choose another --out");
  }
  // Every rank has read --out; only now may rank 0 change it.
  comm.barrier();
  std::ofstream metrics;
  if (writer) {
    if (o.resume && fs::exists(metrics_path)) truncate_metrics(metrics_path, start);
    if (!o.resume) {
      for (const fs::path& p :
           {metrics_path, state_path, model_path, summary_path, best_path, o.out / "probe.csv", o.out / "bound.csv"})
        fs::remove(p);
    }
    if (o.save_init && start == 0) save_model(o.out / "init.safetensors", model, {{"step", "0"}, {"commit", build_commit()}});
    metrics.open(metrics_path, std::ios::app);
    metrics.precision(9);
    if (start == 0) metrics << "step,train_loss,val_loss,lr,tokens_per_s,saturated_fraction,outlier_fraction\n";
  }

  Sgd opt(SgdConfig{o.momentum, o.weight_decay});
  const LrSchedule sched{o.lr, o.warmup, o.steps, o.final_lr_fraction};
  const int B = o.batch, T = o.context;
  const int B_local = B / ranks;  // this rank's rows of each global batch
  const std::size_t slice = static_cast<std::size_t>(comm.rank()) * B_local * T;
  if (o.probe_every < 0) throw std::invalid_argument("--probe-every must be >= 0 (0: off)");
  std::optional<TrajectoryProbe> probe;  // the bound's constants from this run (docs/convergence.md §8)
  if (o.probe_every > 0) probe.emplace(o.out, prec, o.probe_every, o.probe_micro_batches, B, start, o.momentum);
  std::vector<std::int32_t> x(static_cast<std::size_t>(B) * T), y(x.size());
  std::vector<double> step_times;
  Collective::Traffic per_step;  // all-reduce traffic of the last step
  const bool tty = writer && isatty(STDERR_FILENO) && !o.quiet;
  double last_train = 0.0, last_val = NAN;
  std::vector<double> recent;
  long last_step = o.steps;  // earlier when stopped early
  const std::int64_t nparams = model.num_parameters();

  auto checkpoint = [&](long next_step) {
    if (!writer) return;
    metrics.flush();
    Metadata meta = settings;
    if (best_step >= 0) {
      meta["best_val_loss"] = exact_text(best_val);
      meta["best_step"] = std::to_string(best_step);
      meta["evals_since_best"] = std::to_string(evals_since_best);
    }
    save_train_state(state_path, model, static_cast<std::uint64_t>(next_step), meta);
    save_model(model_path, model, {{"step", std::to_string(next_step)}, {"commit", build_commit()}});
  };

  double rss_training = 0.0;
  for (long step = start; step < o.steps; ++step) {
    const auto t0 = Clock::now();
    sample_batch(corpus.train, o.seed, static_cast<std::uint64_t>(step), B, T, x.data(), y.data());
    const Collective::Traffic before = comm.traffic();
    // Equal slices: the global mean is the mean of the ranks' means.
    const double loss =
        comm.sum(model.forward(x.data() + slice, y.data() + slice, B_local, T, static_cast<std::uint64_t>(step), o.seed,
                               true)) / ranks;
    if (!std::isfinite(loss)) {
      checkpoint(step);
      throw std::runtime_error("training diverged at step " + std::to_string(step) + " (loss " + std::to_string(loss) +
                               "); lower --lr. The state before this step is saved in " + o.out.string());
    }
    model.backward();
    all_reduce_gradients(model.params(), comm);
    const double lr = sched.at(step);
    std::int64_t counts[2] = {model.saturated(), model.elements_cast()};
    if (ranks > 1) comm.sum(std::span<std::int64_t>(counts));
    per_step = {comm.traffic().bytes - before.bytes, comm.traffic().calls - before.calls,
                comm.traffic().seconds - before.seconds};
    const std::int64_t sat_fb = counts[0], cast_fb = counts[1];
    std::int64_t split_elements = 0;
    const std::int64_t outliers = model.outliers(&split_elements);
    if (probe && probe->due(step)) probe->before_update(model, x.data(), y.data(), B, T, step, o.seed, lr, loss);
    const std::int64_t sat_opt = opt.step(model.params(), prec.g, lr, static_cast<std::uint64_t>(step), o.seed);
    model.refresh_values(static_cast<std::uint64_t>(step + 1), o.seed);
    const double dt = seconds_since(t0);
    step_times.push_back(dt);
    if (probe && probe->due(step)) probe->after_update(model, x.data(), y.data(), B, T, step, o.seed);
    last_train = loss;
    recent.push_back(loss);
    if (recent.size() > 50) recent.erase(recent.begin());

    bool last = step + 1 == o.steps;
    std::string val_field;
    if (o.eval_every > 0 && ((step + 1) % o.eval_every == 0) && !last) {
      last_val = validation_loss(model, corpus, B, T, o.eval_windows, o.seed);
      val_field = std::to_string(last_val);
      if (o.early_stop > 0) {
        if (last_val < best_val) {
          best_val = last_val;
          best_step = step + 1;
          evals_since_best = 0;
          if (writer) {
            save_model(best_path, model, {{"step", std::to_string(step + 1)}, {"val_loss", exact_text(last_val)},
                                          {"commit", build_commit()}});
          }
        } else if (++evals_since_best >= o.early_stop) {
          last = true;  // stop here: the final evaluation and checkpoint follow
          if (writer && !o.quiet) {
            std::fprintf(stderr, "%sstopping early at step %ld: no better validation loss in %ld evaluations since "
                         "step %ld (%.4f)\n", tty ? "\n" : "", step + 1, evals_since_best, best_step, best_val);
          }
        }
      }
    }
    if (last) {
      last_val = validation_loss(model, corpus, B, T, o.final_eval_windows, o.seed);  // 0: the whole split
      val_field = std::to_string(last_val);
    }
    const double tps = static_cast<double>(B) * T / dt;
    const double sat_frac = static_cast<double>(sat_fb + sat_opt) / static_cast<double>(cast_fb + nparams);
    if (writer)
      metrics << step << ',' << loss << ',' << val_field << ',' << lr << ',' << tps << ',' << sat_frac << ','
            << (split_elements ? static_cast<double>(outliers) / static_cast<double>(split_elements) : 0.0) << '\n';

    if (!o.quiet && writer) {
      const double avg = std::accumulate(step_times.end() - std::min<long>(20, static_cast<long>(step_times.size())),
                                         step_times.end(), 0.0) /
                         std::min<double>(20, static_cast<double>(step_times.size()));
      const double eta = avg * static_cast<double>(o.steps - step - 1);
      if (tty) {
        std::fprintf(stderr, "\rstep %ld/%ld  loss %.4f  val %.4f  %.0f tok/s  ETA %s   ", step + 1, o.steps, loss,
                     last_val, static_cast<double>(B) * T / avg, fmt_eta(eta).c_str());
      } else if ((step + 1) % 50 == 0 || last || step == start) {
        std::fprintf(stderr, "step %ld/%ld  loss %.4f  val %.4f  %.0f tok/s  ETA %s\n", step + 1, o.steps, loss,
                     last_val, static_cast<double>(B) * T / avg, fmt_eta(eta).c_str());
      }
    }
    // The peak of training itself, before the final checkpoint's copies of
    // master, momentum and value (12 bytes a weight in fp32) raise it.
    if (last) rss_training = peak_rss_mib();
    if ((o.checkpoint_every > 0 && (step + 1) % o.checkpoint_every == 0) || last) checkpoint(step + 1);
    if (last) {
      last_step = step + 1;
      break;
    }
  }
  if (tty) std::fprintf(stderr, "\n");

  std::vector<double> sorted = step_times;
  std::sort(sorted.begin(), sorted.end());
  const double median_dt = sorted.empty() ? 0.0 : sorted[sorted.size() / 2];
  TrainResult r;
  r.final_train_loss = last_train;
  r.final_val_loss = last_val;
  r.tokens_per_s = median_dt > 0 ? static_cast<double>(B) * T / median_dt : 0.0;
  r.wall_s = seconds_since(t_start);
  nlohmann::json j;
  j["format"] = prec.name();
  j["steps"] = o.steps;
  j["final_train_loss"] = r.final_train_loss;
  j["final_train_loss_mean50"] = recent.empty() ? 0.0 : std::accumulate(recent.begin(), recent.end(), 0.0) / recent.size();
  j["final_val_loss"] = r.final_val_loss;
  j["tokens_per_s"] = r.tokens_per_s;
  j["peak_rss_mib"] = peak_rss_mib();
  j["peak_rss_mib_training"] = rss_training;  // before the final checkpoint was written
  j["wall_s"] = r.wall_s;
  j["parameters"] = nparams;
  j["commit"] = build_commit();
  j["threads"] = omp_get_max_threads();
  j["config"] = {{"layers", o.layers},
                 {"d_model", o.d_model},
                 {"heads", o.heads},
                 {"context", o.context},
                 {"batch", o.batch},
                 {"lr", o.lr},
                 {"warmup", o.warmup},
                 {"momentum", o.momentum},
                 {"weight_decay", o.weight_decay},
                 {"init_std", o.init_std},
                 {"rounding", o.rounding},
                 {"seed", o.seed},
                 {"final_eval_windows", o.final_eval_windows},
                 {"data", corpus.name},
                 {"resumed_from_step", start}};
  if (o.early_stop > 0) {
    j["early_stop"] = {{"patience", o.early_stop},
                       {"best_step", best_step},
                       {"best_val_loss", best_val},  // periodic validation windows (--eval-windows)
                       {"stopped_at_step", last_step},
                       {"stopped_early", last_step < o.steps},
                       {"best_model", best_step >= 0 ? best_path.filename().string() : ""}};
  }
  j["ranks"] = ranks;
  // Rank 0's all-reduce traffic in the last step (zeros for one process), and
  // over the whole run (docs/distributed.md).
  j["all_reduce"] = {{"bytes_per_step", per_step.bytes},
                     {"calls_per_step", per_step.calls},
                     {"last_step_s", per_step.seconds},
                     {"total_s", comm.traffic().seconds},
                     {"total_calls", comm.traffic().calls}};
  if (probe) j["probe"] = probe->finish(sched, o.steps, o.momentum, o.weight_decay);
  if (writer) write_json_atomically(summary_path, j);
  return r;
}

}  // namespace intrain
