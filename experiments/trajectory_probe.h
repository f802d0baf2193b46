// `intrain train --probe-every K`: estimates the convergence bound's
// constants from the run itself and evaluates the bound at the end
// (analysis/trajectory_bound.h, docs/convergence.md §8).
//
// At every step k with k % K == 0 the probe
//   1. before the update, records ||g||^2 of the training gradient, each
//      tensor's max |g| and max |master| and the values w_k, then runs m
//      forward/backward passes over m micro-batches that split the same batch
//      B_k (m = gcd(batch, --probe-micro-batches)), with the training gradient
//      set aside and put back for the optimizer;
//   2. after the update, re-casts the values of x_{k+1} with the random bits
//      that made w_k, runs the same m passes with the same rounding keys,
//      and restores the training values (key k + 1, bit for bit);
// and appends one row to OUT/probe.csv. Cost per probe: two extra forward and
// backward passes of the batch, two value casts and copies of the
// parameters; nothing between probes. The probe's passes draw their
// stochastic rounding from keys no training step uses and clear the
// gradients they leave, so the training run is bit-identical with and without
// it (tested).
// On --resume the rows of steps not yet replayed are dropped, like metrics.csv.
// At the end, finish() reads probe.csv back, evaluates the bound at every
// step, writes OUT/bound.csv (step, lr, bound, measured) and returns the
// summary for summary.json.
#pragma once

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <vector>

#include <nlohmann/json.hpp>

#include "analysis/trajectory_bound.h"
#include "core/precision.h"
#include "layers/gpt.h"
#include "optim/sgd.h"

namespace intrain {

class TrajectoryProbe {
 public:
  // Starts OUT/probe.csv afresh (start_step == 0) or keeps its rows of steps < start_step.
  // `momentum`: the optimizer's heavy-ball beta, whose buffer rounding the format terms include.
  TrajectoryProbe(const std::filesystem::path& out_dir, const Precision& prec, long every, int micro_batches,
                  int batch, long start_step, double momentum = 0.0);
  bool due(long step) const { return every_ > 0 && step % every_ == 0; }
  // After backward, before the optimizer step; `tokens`/`targets` are batch B_k.
  void before_update(GPT& model, const std::int32_t* tokens, const std::int32_t* targets, int B, int T, long step,
                     std::uint64_t seed, double lr, double train_loss);
  // After the optimizer step and refresh_values(step + 1); the same batch.
  void after_update(GPT& model, const std::int32_t* tokens, const std::int32_t* targets, int B, int T, long step,
                    std::uint64_t seed);
  nlohmann::json finish(const LrSchedule& sched, long steps, double momentum, double weight_decay) const;

  int micro_batches() const { return micro_; }

 private:
  std::filesystem::path out_, csv_;
  Precision prec_;
  long every_;
  double momentum_ = 0.0;
  int micro_;
  void micro_passes(GPT& model, const std::int32_t* tokens, const std::int32_t* targets, int B, int T, long step,
                    std::uint64_t seed, int point);

  std::optional<SameBatchProbe> pending_;
  ProbeSample sample_;
  std::vector<double> master0_, w0_;
  double grad_norm2_ = 0.0;
};

}  // namespace intrain
