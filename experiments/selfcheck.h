// `intrain selfcheck`: exactness and throughput of the matmul paths.
#pragma once

namespace intrain {

struct SelfcheckOptions {
  int threads = 0;        // 0: OpenMP default
  long long size = 1024;  // square size for the throughput table
  int reps = 10;
};

// Returns the process exit code: 0 when every path is bit-exact.
int run_selfcheck(const SelfcheckOptions& opt);

}  // namespace intrain
