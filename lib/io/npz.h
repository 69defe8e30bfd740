#pragma once
// numpy's .npz (np.savez / np.savez_compressed): a zip archive with one .npy
// member per array. Reading maps the archive and inflates one member at a
// time (stored or deflated members, zip64 records as numpy writes them);
// writing deflates each member, as savez_compressed does, with fixed
// timestamps so the same arrays give the same bytes.
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace patch::io {

struct MappedFile;

// One .npy array: numpy's dtype descriptor ('|u1', '|b1', '<i8', '<U12', ...),
// the C-order shape (empty for a 0-d array) and the raw little-endian bytes.
struct NpyArray {
  std::string descr;
  std::vector<int64_t> shape;
  std::string data;

  int64_t numel() const;
};

// Bytes per element of a descriptor; throws core::Error naming `what` for one
// this reader does not know (big-endian, objects, structured types).
size_t npy_item_size(const std::string& descr, const std::string& what);
// The .npy bytes of an array, and back (format versions 1.0-3.0 read, 1.0
// written). Errors name `what`.
std::string format_npy(const NpyArray& array);
NpyArray parse_npy(const std::string& bytes, const std::string& what);

// Builders and readers for the arrays mask files use.
NpyArray npy_uint8(std::vector<int64_t> shape, std::string bytes);
NpyArray npy_int64(const std::vector<int64_t>& values);  // 1-D '<i8'
NpyArray npy_unicode(const std::string& utf8);           // 0-d '<U' (np.array(str))
// An integer array's values (any signed/unsigned integer descriptor).
std::vector<int64_t> npy_integers(const NpyArray& array, const std::string& what);
// The text of a 0-d or one-element string array ('<U' or '|S'), as UTF-8.
std::string npy_text(const NpyArray& array, const std::string& what);

class NpzFile {
 public:
  // Reads the zip's central directory; every member must be stored or
  // deflated, lie inside the file and be named "<key>.npy".
  explicit NpzFile(const std::string& path);
  ~NpzFile();

  const std::string& path() const { return path_; }
  // The keys in archive order (member names without ".npy").
  const std::vector<std::string>& keys() const { return keys_; }
  bool contains(const std::string& key) const { return members_.count(key) > 0; }
  // Inflates and parses one member (its CRC-32 checked).
  NpyArray array(const std::string& key) const;

 private:
  struct Member {
    uint16_t method = 0;
    uint32_t crc = 0;
    uint64_t compressed = 0, size = 0, local_offset = 0;
  };
  std::string path_;
  std::shared_ptr<MappedFile> map_;
  std::vector<std::string> keys_;
  std::map<std::string, Member> members_;
};

// Writes `arrays` (key -> array, in order) as a deflated .npz, atomically.
void write_npz(const std::string& path, const std::vector<std::pair<std::string, NpyArray>>& arrays);

}  // namespace patch::io
