#include "core/paths.h"

#include <ftw.h>

#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <filesystem>
#include <vector>

#include "core/error.h"

namespace patch::core {
namespace fs = std::filesystem;

std::string data_dir() {
  if (const char* env = std::getenv("PATCH_DATA_DIR"); env && *env) return env;
  return PATCH_DEFAULT_DATA_DIR;
}

std::string assets_dir() {
  if (const char* env = std::getenv("PATCH_ASSETS_DIR"); env && *env) return env;
  return PATCH_DEFAULT_ASSETS_DIR;
}

std::string cache_dir() {
  if (const char* env = std::getenv("PATCH_CACHE_DIR"); env && *env) return env;
  if (const char* env = std::getenv("XDG_CACHE_HOME"); env && *env) return std::string(env) + "/patch";
  const char* home = std::getenv("HOME");
  return std::string(home && *home ? home : ".") + "/.cache/patch";
}

std::string file_fingerprint(const std::string& path) {
  std::error_code ec;
  const auto one = [&](const fs::path& p) {
    const auto size = fs::file_size(p, ec);
    const auto time = fs::last_write_time(p, ec).time_since_epoch().count();
    return str(p.filename().string(), ":", ec ? 0 : size, ":", ec ? 0 : time, "\n");
  };
  std::string out = fs::absolute(path, ec).lexically_normal().string() + "\n";
  if (!fs::is_directory(path, ec)) return out + one(path);
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(path, ec))
    if (e.is_regular_file(ec)) files.push_back(e.path());
  std::sort(files.begin(), files.end());
  for (const auto& f : files) out += one(f);
  return out;
}

std::string resolve_path(const std::string& path) {
  static const std::string data = "@data/", assets = "@assets/";
  if (path.compare(0, data.size(), data) == 0) return data_dir() + "/" + path.substr(data.size());
  if (path.compare(0, assets.size(), assets) == 0)
    return assets_dir() + "/" + path.substr(assets.size());
  return path;
}

void prepare_output_dir(const std::string& dir, bool overwrite, bool resume) {
  std::error_code ec;
  if (fs::exists(dir, ec)) {
    if (!fs::is_directory(dir, ec))
      throw ConfigError(str("output.dir: '", dir, "' exists and is not a directory"));
    if (!fs::is_empty(dir, ec) && !overwrite && !resume)
      throw ConfigError(str("output.dir: '", dir,
                            "' is not empty; pass --overwrite to replace its outputs or --resume "
                            "to continue the run in it"));
    return;
  }
  fs::create_directories(dir, ec);
  if (ec) throw Error(str("output.dir: cannot create '", dir, "': ", ec.message()));
}

void remove_tree(const std::string& path) {
  ::nftw(
      path.c_str(), [](const char* p, const struct stat*, int, struct FTW*) { return ::remove(p); }, 16,
      FTW_DEPTH | FTW_PHYS);
}

}  // namespace patch::core
