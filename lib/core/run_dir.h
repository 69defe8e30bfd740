#pragma once
// A run folder belongs to one run: the run holds an exclusive lock on it for
// its whole life, stale temporary files of killed runs are removed when a run
// starts, and --overwrite clears the previous run's outputs (only in a folder
// that patch-train made) before anything new is written.
#include <string>
#include <vector>

namespace patch::core {

// The lock file that marks a folder as a patch-train run folder.
inline constexpr const char* kRunLockName = ".patch-run.lock";

// Creates `dir` if needed and takes it for this process: an exclusive flock on
// <dir>/.patch-run.lock (released when the process ends, however it ends), so a
// second run on the folder fails at once naming the folder and the other run's
// pid. Then: a non-empty folder is refused unless `overwrite` or `resume`;
// temporaries of killed runs (".<name>.tmp.<pid>" files, ".partial-<pid>"
// folders) are removed; with `overwrite` and not `resume` every previous output
// is removed, provided the folder is a patch-train run folder (it has the lock
// file or a config.resolved.yaml), else it is refused. Errors are ConfigError
// naming output.dir.
void claim_output_dir(const std::string& dir, bool overwrite, bool resume);

// The same rules as claim_output_dir, checked without writing anything (the
// lock is only tried, then released): a command calls it before its own
// checks and its work, so that a folder in use or not to be reused is refused
// at once.
void check_output_dir(const std::string& dir, bool overwrite, bool resume);

// Removes the temporaries a killed run leaves in `dir` (see above); returns
// how many entries it removed.
int remove_stale_temporaries(const std::string& dir);

// True when `path` is `dir` or lies inside it (after resolving "." / ".." and
// symbolic links of the parts that exist).
bool path_within(const std::string& path, const std::string& dir);

}  // namespace patch::core
