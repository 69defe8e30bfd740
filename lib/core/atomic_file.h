#pragma once
// Every file the tool writes goes to a temporary name in the same directory and
// is renamed into place, so a crash or kill never leaves a half-written output.
#include <cstdint>
#include <fstream>
#include <string>

namespace patch::core {

class AtomicFile {
 public:
  explicit AtomicFile(std::string path);
  ~AtomicFile();  // removes the temporary file unless commit() succeeded
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  std::ofstream& stream() { return out_; }
  void write(const void* data, size_t bytes);
  // Flushes, syncs and renames onto the final path.
  void commit();
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::string tmp_path_;
  std::ofstream out_;
  bool committed_ = false;
};

void write_file_atomic(const std::string& path, const std::string& contents);

// Outputs published together: each is written under a staging folder
// <dir>/.partial-<pid>/ (path(name)), then publish() moves them all into <dir>
// and writes the marker file (e.g. prune.json) last, so a folder with the
// marker has every output of the set, and a killed command leaves only the
// staging folder, which the next run in <dir> removes (claim_output_dir).
class OutputSet {
 public:
  explicit OutputSet(std::string dir);
  ~OutputSet();  // removes the staging folder unless published
  OutputSet(const OutputSet&) = delete;
  OutputSet& operator=(const OutputSet&) = delete;

  std::string path(const std::string& name) const;
  void publish(const std::string& marker_name, const std::string& marker_contents);

 private:
  std::string dir_, staging_;
  bool published_ = false;
};
std::string read_file(const std::string& path);

}  // namespace patch::core
