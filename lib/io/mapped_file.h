#pragma once
// A read-only private memory mapping of a whole file, shared by the tensors that
// view it (safetensors and GGUF readers). Private to the io module.
#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace patch::io {

struct MappedFile {
  // Maps the file copy-on-write: a tensor view written by mistake changes
  // only this process's pages, never the file.
  explicit MappedFile(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  std::string path;
  uint8_t* data = nullptr;
  size_t size = 0;
};

// A CPU tensor over `shape` x `dtype` bytes at `offset` of the mapping, which it
// keeps alive. Copies only when the address is not aligned for the dtype.
at::Tensor view_mapped(const std::shared_ptr<MappedFile>& map, size_t offset,
                       const std::vector<int64_t>& shape, at::ScalarType dtype);

}  // namespace patch::io
