#include "core/atomic_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <sstream>

#include "core/error.h"
#include "core/paths.h"

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

namespace {
// The OS's reason for a failed stream write ("No space left on device").
std::string write_error(const std::string& path) {
  const int e = errno;
  return str(path, ": write failed (", e ? std::strerror(e) : "unknown error", ")");
}
}  // namespace

void AtomicFile::write(const void* data, size_t bytes) {
  errno = 0;
  out_.write(static_cast<const char*>(data), static_cast<std::streamsize>(bytes));
  if (!out_) throw Error(write_error(path_));
}

void AtomicFile::commit() {
  errno = 0;
  out_.flush();
  if (!out_) throw Error(write_error(path_));
  out_.close();
  if (out_.fail()) throw Error(write_error(path_));
  // fsync so that the rename never exposes a file whose data is not on disk.
  int fd = ::open(tmp_path_.c_str(), O_RDONLY);
  if (fd >= 0) {
    const int rc = ::fsync(fd);
    const int e = errno;
    ::close(fd);
    if (rc != 0) throw Error(str(path_, ": write failed (", std::strerror(e), ")"));
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

OutputSet::OutputSet(std::string dir) : dir_(std::move(dir)) {
  staging_ = (fs::path(dir_) / (".partial-" + std::to_string(::getpid()))).string();
  remove_tree(staging_);
  std::error_code ec;
  fs::create_directories(staging_, ec);
  if (ec) throw Error(str(staging_, ": cannot create (", ec.message(), ")"));
}

OutputSet::~OutputSet() {
  if (!published_) remove_tree(staging_);
}

std::string OutputSet::path(const std::string& name) const { return (fs::path(staging_) / name).string(); }

void OutputSet::publish(const std::string& marker_name, const std::string& marker_contents) {
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(staging_)) {
    const fs::path target = fs::path(dir_) / entry.path().filename();
    remove_tree(target.string());  // an older output of the same name
    fs::rename(entry.path(), target, ec);
    if (ec) throw Error(str(target.string(), ": cannot move into place (", ec.message(), ")"));
  }
  remove_tree(staging_);
  write_file_atomic((fs::path(dir_) / marker_name).string(), marker_contents);
  published_ = true;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(str(path, ": cannot open (", std::strerror(errno), ")"));
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace patch::core
