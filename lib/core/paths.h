#pragma once
#include <string>

namespace patch::core {

// The shared data directory: $PATCH_DATA_DIR, else the CMake cache value
// PATCH_DATA_DIR (default ../shared/data beside the source tree).
std::string data_dir();

// The directory of assets fetched from PyPI wheels by scripts/setup.sh (the
// SmolLM2-135M GGUF): $PATCH_ASSETS_DIR, else the CMake cache value
// PATCH_ASSETS_DIR (default data/assets in the source tree).
std::string assets_dir();

// The cache shared by all runs (token files, one-shot priors): $PATCH_CACHE_DIR,
// else $XDG_CACHE_HOME/patch, else ~/.cache/patch. Entries are written
// atomically under content keys, so concurrent runs may share it.
std::string cache_dir();

// A cheap identity of a file or folder for cache keys: the path with each
// regular file's name, size and modification time (a folder's files sorted).
// Reads no contents, so it stays cheap for a 15 GB checkpoint.
std::string file_fingerprint(const std::string& path);

// Paths in configurations may start with "@data/" to name a file of the data
// directory, or "@assets/" for one of the assets directory, so that the
// bundled configs work wherever the data lives.
std::string resolve_path(const std::string& path);

// Refuses a non-empty output directory unless overwrite or resume is set;
// creates it when missing.
void prepare_output_dir(const std::string& dir, bool overwrite, bool resume);

// Removes a file or a directory tree (a missing path is fine). Not
// fs::remove_all: libtorch exports its own copy of it, which calls a libstdc++
// symbol that Debian 12's library lacks and crashes.
void remove_tree(const std::string& path);

}  // namespace patch::core
