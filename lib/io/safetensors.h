#pragma once
// safetensors: a JSON header (u64 little-endian length, then the header) and a
// flat data section. Reading memory-maps the file; tensors are views into the
// mapping (no copy) that keep it alive.
#include <ATen/ATen.h>

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace patch::io {

struct SafetensorsEntry {
  std::string name;
  at::ScalarType dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // byte offsets inside the data section
};

class SafetensorsFile {
 public:
  // Validates the whole header before any tensor data is touched: bounded
  // header size, known dtypes (F32/F16/BF16/F64/I64/I32/I16/I8/U8/BOOL),
  // offsets inside the file, no overlaps, shape x dtype size == byte length.
  explicit SafetensorsFile(const std::string& path);

  const std::string& path() const { return path_; }
  const std::vector<SafetensorsEntry>& entries() const { return entries_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool contains(const std::string& name) const;
  // A CPU tensor viewing the mapped bytes (read-only by convention).
  at::Tensor tensor(const std::string& name) const;

 private:
  std::string path_;
  std::shared_ptr<struct MappedFile> map_;
  size_t data_offset_ = 0;
  std::vector<SafetensorsEntry> entries_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// The safetensors dtype string ("F32", "I32", ...) or nullptr when it has none.
const char* safetensors_dtype(at::ScalarType dtype);

// Writes tensors (any device; copied to CPU, made contiguous) in the given
// order, atomically (temporary file + rename).
void write_safetensors(const std::string& path,
                       const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace patch::io
