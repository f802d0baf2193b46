// An exclusive lock on an output folder, so two processes never write the
// same run (`train --out`) or sweep (`ablate --out`) at once. It is an
// advisory flock(2) on DIR/.lock: the kernel drops it when the holder exits,
// however it exits, so a killed run never leaves a stale lock behind.
#pragma once

#include <filesystem>
#include <string>

namespace intrain {

class RunLock {
 public:
  // Creates `dir` if needed and takes the lock; throws std::runtime_error
  // naming the folder, and `what` ("run", "sweep"), if another process holds it.
  RunLock(const std::filesystem::path& dir, const std::string& what);
  ~RunLock();
  RunLock(const RunLock&) = delete;
  RunLock& operator=(const RunLock&) = delete;

 private:
  int fd_ = -1;
};

}  // namespace intrain
