// The `intrain` command line: one binary, one subcommand per experiment.
#include <CLI/CLI.hpp>

#include <cstdio>
#include <exception>

#include "experiments/selfcheck.h"

int main(int argc, char** argv) {
  CLI::App app{"intrain: training neural networks in integer arithmetic"};
  app.require_subcommand(1);

  intrain::SelfcheckOptions sc;
  auto* selfcheck = app.add_subcommand("selfcheck", "Check every matmul path bit for bit and print its throughput");
  selfcheck->add_option("--threads", sc.threads, "OpenMP threads (0: default)")->check(CLI::NonNegativeNumber);
  selfcheck->add_option("--size", sc.size, "Square matrix size for the throughput table")->check(CLI::Range(16, 8192));
  selfcheck->add_option("--reps", sc.reps, "Timed repetitions (the median is printed)")->check(CLI::Range(1, 1000));

  CLI11_PARSE(app, argc, argv);
  try {
    if (*selfcheck) return intrain::run_selfcheck(sc);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "intrain: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
