#pragma once
// Reading .xz-compressed corpus files as they stream past (liblzma), so a
// compressed corpus needs neither a decompressed copy on disk nor in memory.
#include <istream>
#include <memory>
#include <string>

namespace patch::data {

// True when this build can read .xz files (liblzma was found).
bool xz_supported();

// An input stream of the file's bytes: decompressed when the path ends in
// ".xz", the file itself otherwise. Errors (unreadable file, corrupt or
// truncated .xz data, a build without liblzma) throw core::Error naming the
// file. `consumed` (optional) receives the bytes of the file read so far.
std::unique_ptr<std::istream> open_input(const std::string& path, long* consumed = nullptr);

// True when the path names an .xz file.
bool is_xz(const std::string& path);

}  // namespace patch::data
