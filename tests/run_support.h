// Shared helpers for the suites that run training: a small corpus, scratch
// folders, and the `intrain` binary run as a child process.
#pragma once

#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "experiments/train.h"

namespace intrain::testing {

namespace fs = std::filesystem;

// A small corpus file: deterministic, text, large enough for both splits.
inline fs::path tiny_corpus() {
  const fs::path p = fs::temp_directory_path() / "intrain_test_corpus.txt";
  if (!fs::exists(p)) {
    // Written under a private name, then renamed: suites running side by side
    // never read a half-written file.
    const fs::path tmp = p.string() + "." + std::to_string(::getpid());
    {
      std::ofstream f(tmp);
      for (int i = 0; i < 400; ++i)
        f << "In the beginning was the word " << i % 17 << ", and the word was with " << (i * 7) % 13 << ".\n";
    }
    fs::rename(tmp, p);
  }
  return p;
}

inline fs::path fresh_dir(const std::string& name) {
  const fs::path d = fs::temp_directory_path() / ("intrain_test_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(d);
  return d;
}

inline std::string file_bytes(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

// Options of a tiny training run on tiny_corpus(): d = 32, 2 heads, batch 4,
// no periodic evaluation or checkpoints, quiet. Callers adjust the rest.
inline TrainOptions tiny_train_options(const fs::path& out, const std::string& format, int layers, int context,
                                       long steps) {
  TrainOptions o;
  o.layers = layers;
  o.d_model = 32;
  o.heads = 2;
  o.context = context;
  o.batch = 4;
  o.steps = steps;
  o.warmup = 2;
  o.lr = 0.1;
  o.format = format;
  o.data = tiny_corpus();
  o.out = out;
  o.eval_every = 0;
  o.eval_windows = 4;
  o.checkpoint_every = 0;
  o.quiet = true;
  return o;
}

// A shell command, run with its output (stdout and stderr) captured; returns
// its exit status (-1 if it did not exit normally).
inline int run_command(const std::string& shell_command, std::string* output) {
  const std::string cmd = shell_command + " 2>&1";
  FILE* p = ::popen(cmd.c_str(), "r");
  std::string out;
  char buf[512];
  while (p && std::fgets(buf, sizeof buf, p)) out += buf;
  const int status = p ? ::pclose(p) : -1;
  if (output) *output = out;
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// The CLI, run as a child process with its output captured.
inline int run_cli(const std::string& args, std::string* output) {
  return run_command(std::string(INTRAIN_BINARY_DIR) + "/intrain " + args, output);
}

}  // namespace intrain::testing
