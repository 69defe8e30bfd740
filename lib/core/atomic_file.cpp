#include "core/atomic_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <sstream>

#include "core/error.h"

namespace patch::core {
namespace fs = std::filesystem;

AtomicFile::AtomicFile(std::string path) : path_(std::move(path)) {
  fs::path p(path_);
  tmp_path_ = (p.parent_path() / ("." + p.filename().string() + ".tmp." + std::to_string(::getpid())))
                  .string();
  out_.open(tmp_path_, std::ios::binary | std::ios::trunc);
  if (!out_) throw Error(str(path_, ": cannot open for writing (", std::strerror(errno), ")"));
}

AtomicFile::~AtomicFile() {
  if (!committed_) {
    out_.close();
    std::remove(tmp_path_.c_str());
  }
}

void AtomicFile::write(const void* data, size_t bytes) {
  out_.write(static_cast<const char*>(data), static_cast<std::streamsize>(bytes));
  if (!out_) throw Error(str(path_, ": write failed"));
}

void AtomicFile::commit() {
  out_.flush();
  if (!out_) throw Error(str(path_, ": write failed"));
  out_.close();
  // fsync so that the rename never exposes a file whose data is not on disk.
  int fd = ::open(tmp_path_.c_str(), O_RDONLY);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
  if (std::rename(tmp_path_.c_str(), path_.c_str()) != 0)
    throw Error(str(path_, ": cannot rename temporary file into place (", std::strerror(errno), ")"));
  committed_ = true;
}

void write_file_atomic(const std::string& path, const std::string& contents) {
  AtomicFile f(path);
  f.write(contents.data(), contents.size());
  f.commit();
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(str(path, ": cannot open (", std::strerror(errno), ")"));
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace patch::core
