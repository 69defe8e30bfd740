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
std::string read_file(const std::string& path);

}  // namespace patch::core
