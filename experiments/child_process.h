// Running intrain's own subcommands as child processes (`intrain ablate`,
// `intrain reproduce`). A child has its own peak RSS (VmHWM only grows within
// a process), children run side by side, and a driver resumes by skipping the
// jobs whose output already exists.
#pragma once

#include <sys/types.h>

#include <filesystem>
#include <string>
#include <vector>

namespace intrain {

// This program's path (/proc/self/exe).
std::filesystem::path self_exe();

// Starts `exe args...` with stdout and stderr appended to `log`, and with
// INTRAIN_SINGLE_PROCESS=1 (the child never joins this process's MPI run).
pid_t spawn(const std::filesystem::path& exe, const std::vector<std::string>& args, const std::filesystem::path& log);

// The last non-empty line of a log: the error message of a failed child.
std::string last_line(const std::filesystem::path& log);

// Writes `text` to a temporary file beside `p`, then renames it over `p`.
void write_text_atomically(const std::filesystem::path& p, const std::string& text);

// Runs analysis/<script> DIR with Debian's python3 (matplotlib). A missing
// script or a failure only prints why on stderr, prefixed by `who`: the
// reports a plot accompanies are complete without it.
void run_plot_script(const std::string& script, const std::filesystem::path& dir, const std::string& who);

struct ChildJob {
  std::string name;               // for progress lines and errors
  std::vector<std::string> args;  // arguments of this binary, e.g. {"train", "--out", ...}
  std::filesystem::path done;     // the file a finished job leaves; the job is skipped if it exists
  std::filesystem::path log;      // stdout and stderr of the child (appended)
};

struct ChildFailure {
  std::string name, message;
};

// Runs the jobs whose `done` file is missing, `jobs` at a time, and returns
// the ones that failed (non-zero exit, a signal, or no `done` file), each with
// the last line of its log. `who` prefixes the progress lines on stderr.
std::vector<ChildFailure> run_child_jobs(const std::vector<ChildJob>& jobs, int parallel, const std::string& who);

}  // namespace intrain
