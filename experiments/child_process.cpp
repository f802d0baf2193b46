#include "experiments/child_process.h"

#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <stdexcept>
#include <system_error>

extern char** environ;

namespace intrain {

namespace fs = std::filesystem;

fs::path self_exe() {
  std::error_code ec;
  fs::path p = fs::read_symlink("/proc/self/exe", ec);
  if (ec) throw std::runtime_error("cannot find this program's path (/proc/self/exe): " + ec.message());
  return p;
}

pid_t spawn(const fs::path& exe, const std::vector<std::string>& args, const fs::path& log) {
  std::vector<std::string> argv_s = {exe.string()};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& s : argv_s) argv.push_back(s.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, STDOUT_FILENO, log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  posix_spawn_file_actions_adddup2(&fa, STDOUT_FILENO, STDERR_FILENO);
  // A child is one process even when this one is an MPI rank: it must not
  // join (or start) an MPI world of its own (core/collective.h).
  std::string single = "INTRAIN_SINGLE_PROCESS=1";
  std::vector<char*> env;
  for (char** e = environ; *e; ++e)
    if (std::strncmp(*e, "INTRAIN_SINGLE_PROCESS=", 23) != 0) env.push_back(*e);
  env.push_back(single.data());
  env.push_back(nullptr);
  pid_t pid = 0;
  const int rc = posix_spawn(&pid, exe.c_str(), &fa, nullptr, argv.data(), env.data());
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) throw std::runtime_error("cannot start " + exe.string() + ": " + std::strerror(rc));
  return pid;
}

std::string last_line(const fs::path& log) {
  std::ifstream in(log);
  std::string line, last;
  while (std::getline(in, line)) {
    if (line.find_first_not_of(" \r\t") != std::string::npos) last = line;
  }
  return last;
}

void write_text_atomically(const fs::path& p, const std::string& text) {
  const fs::path tmp = p.string() + ".tmp";
  {
    std::ofstream out(tmp);
    out << text;
    if (!out) throw std::runtime_error(tmp.string() + ": cannot write");
  }
  fs::rename(tmp, p);
}

void run_plot_script(const std::string& script, const fs::path& dir, const std::string& who) {
  const fs::path path = fs::path(INTRAIN_SOURCE_DIR) / "analysis" / script;
  if (!fs::exists(path)) {
    std::fprintf(stderr, "%s: plots skipped: %s not found\n", who.c_str(), path.c_str());
    return;
  }
  const std::string cmd = "/usr/bin/python3 '" + path.string() + "' '" + dir.string() + "'";
  if (std::system(cmd.c_str()) != 0) {
    std::fprintf(stderr, "%s: plots skipped (needs python3-matplotlib); the report is complete without them\n", who.c_str());
  }
}

std::vector<ChildFailure> run_child_jobs(const std::vector<ChildJob>& jobs, int parallel, const std::string& who) {
  std::vector<const ChildJob*> pending;
  for (const ChildJob& j : jobs)
    if (!fs::exists(j.done)) pending.push_back(&j);
  if (pending.empty()) return {};
  const fs::path exe = self_exe();
  using Clock = std::chrono::steady_clock;
  std::map<pid_t, std::pair<const ChildJob*, Clock::time_point>> running;
  std::vector<ChildFailure> failed;
  std::size_t next = 0, finished = 0;
  while (next < pending.size() || !running.empty()) {
    while (next < pending.size() && static_cast<int>(running.size()) < std::max(1, parallel)) {
      const ChildJob* j = pending[next++];
      if (j->log.has_parent_path()) fs::create_directories(j->log.parent_path());
      running.emplace(spawn(exe, j->args, j->log), std::pair{j, Clock::now()});
    }
    int status = 0;
    const pid_t pid = waitpid(-1, &status, 0);
    if (pid < 0) throw std::runtime_error(who + ": waitpid failed: " + std::strerror(errno));
    const auto it = running.find(pid);
    if (it == running.end()) continue;
    const auto [j, t0] = it->second;
    running.erase(it);
    ++finished;
    const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0 && fs::exists(j->done)) {
      std::fprintf(stderr, "%s: [%zu/%zu] %s  %.0f s\n", who.c_str(), finished, pending.size(), j->name.c_str(), secs);
    } else {
      const std::string msg = WIFSIGNALED(status) ? "killed by signal " + std::to_string(WTERMSIG(status)) : last_line(j->log);
      failed.push_back({j->name, msg});
      std::fprintf(stderr, "%s: [%zu/%zu] %s FAILED: %s (log: %s)\n", who.c_str(), finished, pending.size(),
                   j->name.c_str(), msg.c_str(), j->log.c_str());
    }
  }
  return failed;
}

}  // namespace intrain
