#pragma once
// GGUF v2/v3 reader: metadata, tensor infos and tensors (F32/F16/BF16 as views
// of the mapped file; Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants Q2_K..Q6_K
// dequantized on load, tensor by tensor, into the dtype asked for).
#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace patch::io {

struct GgufTensorInfo {
  std::string name;
  std::vector<int64_t> dims;  // ggml order: dims[0] = ne0 (fastest)
  uint32_t ggml_type = 0;
  uint64_t offset = 0;  // relative to the data section
};

class GgufFile {
 public:
  // Validates magic, version (2 or 3), counts, string lengths and tensor extents
  // against the file size before reading data.
  explicit GgufFile(const std::string& path);

  const std::string& path() const { return path_; }
  uint32_t version() const { return version_; }
  // Metadata as JSON: numbers, strings, bools and arrays of them.
  const nlohmann::json& metadata() const { return metadata_; }
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  bool contains(const std::string& name) const;
  // Row-major torch tensor of shape reversed(dims) (so [out, in] for matrices).
  // Quantized tensors are dequantized into `dtype`; others keep their type.
  at::Tensor tensor(const std::string& name, at::ScalarType dtype = at::kFloat) const;

 private:
  at::Tensor dequantize(const GgufTensorInfo& t, const std::vector<int64_t>& shape, size_t offset,
                        at::ScalarType dtype) const;

  std::string path_;
  uint32_t version_ = 0;
  std::shared_ptr<struct MappedFile> map_;
  size_t data_offset_ = 0;
  nlohmann::json metadata_;
  std::vector<GgufTensorInfo> tensors_;
  std::map<std::string, size_t> index_;
};

}  // namespace patch::io
