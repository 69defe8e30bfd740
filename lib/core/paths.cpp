#include "core/paths.h"

#include <ftw.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>

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
