#include "core/run_dir.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "core/atomic_file.h"
#include "core/error.h"
#include "core/paths.h"

namespace patch::core {
namespace fs = std::filesystem;

namespace {

// The lock stays held while the process runs: the descriptor is never closed.
int g_lock_fd = -1;
std::string g_locked_dir;

bool is_stale_temporary(const fs::directory_entry& e) {
  const std::string name = e.path().filename().string();
  if (name.size() > 1 && name[0] == '.' && name.find(".tmp.") != std::string::npos && !e.is_directory())
    return true;
  return name.rfind(".partial-", 0) == 0 && e.is_directory();
}

// Takes the flock of `fd` (the lock file of `dir`) or throws naming the holder's pid.
void lock_or_throw(int fd, const std::string& dir) {
  if (::flock(fd, LOCK_EX | LOCK_NB) == 0) return;
  std::string pid;
  char buf[32] = {};
  if (::pread(fd, buf, sizeof buf - 1, 0) > 0) pid = buf;
  ::close(fd);
  while (!pid.empty() && (pid.back() == '\n' || pid.back() == ' ')) pid.pop_back();
  throw ConfigError(str("output.dir: '", dir, "' is in use by another run (pid ", pid.empty() ? "?" : pid,
                        "); wait for it or choose another folder"));
}

// The entries of `dir` a run's outputs would replace (all but the lock file).
std::vector<fs::path> run_entries(const std::string& dir) {
  std::error_code ec;
  std::vector<fs::path> entries;
  for (const auto& e : fs::directory_iterator(dir, ec))
    if (e.path().filename() != kRunLockName && !is_stale_temporary(e)) entries.push_back(e.path());
  return entries;
}

// The rules of a non-empty folder: refused unless overwrite or resume, and
// overwrite clears only a patch-train run folder.
void check_reuse(const std::string& dir, bool overwrite, bool resume) {
  std::error_code ec;
  if (run_entries(dir).empty() || resume) return;
  if (!overwrite)
    throw ConfigError(str("output.dir: '", dir,
                          "' is not empty; pass --overwrite to replace its outputs or --resume "
                          "to continue the run in it"));
  if (!fs::exists(fs::path(dir) / kRunLockName, ec) && !fs::exists(fs::path(dir) / "config.resolved.yaml", ec))
    throw ConfigError(str("output.dir: '", dir,
                          "' is not empty and not a patch-train run folder (no config.resolved.yaml); "
                          "--overwrite clears only run folders: choose an empty or new folder"));
}

void take_lock(const std::string& dir) {
  if (g_lock_fd >= 0 && g_locked_dir == dir) return;
  const std::string path = (fs::path(dir) / kRunLockName).string();
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0)
    throw ConfigError(str("output.dir: cannot create the lock file '", path, "' (", std::strerror(errno), ")"));
  lock_or_throw(fd, dir);
  const std::string me = std::to_string(::getpid()) + "\n";
  if (::ftruncate(fd, 0) != 0 || ::pwrite(fd, me.data(), me.size(), 0) != static_cast<ssize_t>(me.size()))
    throw ConfigError(str("output.dir: cannot write '", path, "' (", std::strerror(errno), ")"));
  g_lock_fd = fd;
  g_locked_dir = dir;
}

}  // namespace

int remove_stale_temporaries(const std::string& dir) {
  std::error_code ec;
  int n = 0;
  std::vector<fs::path> stale;
  for (const auto& e : fs::directory_iterator(dir, ec))
    if (is_stale_temporary(e)) stale.push_back(e.path());
  for (const auto& p : stale) {
    remove_tree(p.string());
    ++n;
  }
  return n;
}

void check_output_dir(const std::string& dir, bool overwrite, bool resume) {
  std::error_code ec;
  if (!fs::exists(dir, ec)) return;
  if (!fs::is_directory(dir, ec)) throw ConfigError(str("output.dir: '", dir, "' exists and is not a directory"));
  if (g_lock_fd < 0 || g_locked_dir != dir) {
    const std::string path = (fs::path(dir) / kRunLockName).string();
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
      lock_or_throw(fd, dir);
      ::close(fd);  // releases the lock: this was only a look
    }
  }
  check_reuse(dir, overwrite, resume);
}

void claim_output_dir(const std::string& dir, bool overwrite, bool resume) {
  std::error_code ec;
  if (fs::exists(dir, ec) && !fs::is_directory(dir, ec))
    throw ConfigError(str("output.dir: '", dir, "' exists and is not a directory"));
  fs::create_directories(dir, ec);
  if (ec) throw ConfigError(str("output.dir: cannot create '", dir, "': ", ec.message()));
  check_reuse(dir, overwrite, resume);
  take_lock(dir);
  remove_stale_temporaries(dir);
  if (resume) return;
  for (const auto& p : run_entries(dir)) remove_tree(p.string());
}

bool path_within(const std::string& path, const std::string& dir) {
  std::error_code ec;
  const fs::path p = fs::weakly_canonical(fs::absolute(path, ec), ec);
  const fs::path d = fs::weakly_canonical(fs::absolute(dir, ec), ec);
  auto pi = p.begin(), di = d.begin();
  for (; di != d.end(); ++di, ++pi) {
    if (di->empty()) continue;  // a trailing separator
    if (pi == p.end() || *pi != *di) return false;
  }
  return true;
}

}  // namespace patch::core
