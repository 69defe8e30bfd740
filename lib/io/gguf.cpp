#include "io/gguf.h"

#include <ATen/Parallel.h>

#include <cstring>

#include "core/error.h"
#include "io/ggml_quants.h"
#include "io/mapped_file.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "GGUF files read here are little-endian");

namespace patch::io {
namespace {

constexpr int kMaxArrayDepth = 8;
constexpr uint32_t kMaxDims = 4;  // GGML_MAX_DIMS

struct GgmlType {
  uint32_t id;
  const char* name;
  uint64_t block;  // elements per block
  uint64_t bytes;  // bytes per block
};
// ggml's type table (ggml.c type_traits), enough to size every tensor.
constexpr GgmlType kGgmlTypes[] = {
    {0, "F32", 1, 4},         {1, "F16", 1, 2},         {2, "Q4_0", 32, 18},
    {3, "Q4_1", 32, 20},      {6, "Q5_0", 32, 22},      {7, "Q5_1", 32, 24},
    {8, "Q8_0", 32, 34},      {9, "Q8_1", 32, 40},      {10, "Q2_K", 256, 84},
    {11, "Q3_K", 256, 110},   {12, "Q4_K", 256, 144},   {13, "Q5_K", 256, 176},
    {14, "Q6_K", 256, 210},   {15, "Q8_K", 256, 292},   {16, "IQ2_XXS", 256, 66},
    {17, "IQ2_XS", 256, 74},  {18, "IQ3_XXS", 256, 98}, {19, "IQ1_S", 256, 50},
    {20, "IQ4_NL", 32, 18},   {21, "IQ3_S", 256, 110},  {22, "IQ2_S", 256, 82},
    {23, "IQ4_XS", 256, 136}, {24, "I8", 1, 1},         {25, "I16", 1, 2},
    {26, "I32", 1, 4},        {27, "I64", 1, 8},        {28, "F64", 1, 8},
    {29, "IQ1_M", 256, 56},   {30, "BF16", 1, 2},       {34, "TQ1_0", 256, 54},
    {35, "TQ2_0", 256, 66},   {39, "MXFP4", 32, 17},
};

const GgmlType* find_type(uint32_t id) {
  for (const auto& t : kGgmlTypes)
    if (t.id == id) return &t;
  return nullptr;
}

enum ValueType : uint32_t {
  kU8 = 0,
  kI8 = 1,
  kU16 = 2,
  kI16 = 3,
  kU32 = 4,
  kI32 = 5,
  kFloat32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kU64 = 10,
  kI64 = 11,
  kFloat64 = 12,
};

// Smallest encoding of one value of the type: bounds array counts by the bytes left.
uint64_t min_value_bytes(uint32_t type) {
  switch (type) {
    case kU8:
    case kI8:
    case kBool:
      return 1;
    case kU16:
    case kI16:
      return 2;
    case kU32:
    case kI32:
    case kFloat32:
      return 4;
    case kU64:
    case kI64:
    case kFloat64:
    case kString:
      return 8;
    case kArray:
      return 12;
    default:
      return 0;
  }
}

// Bounds-checked little-endian reads from the mapping.
class Cursor {
 public:
  Cursor(const std::string& path, const uint8_t* data, uint64_t size)
      : path_(path), data_(data), size_(size) {}

  uint64_t pos() const { return pos_; }
  uint64_t left() const { return size_ - pos_; }

  void need(uint64_t n, const std::string& what) const {
    if (n > left())
      throw core::Error(core::str(path_, ": truncated: ", what, " needs ", n, " bytes at offset ",
                                  pos_, " but the file has ", size_, " bytes"));
  }
  template <typename T>
  T read(const std::string& what) {
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, data_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  std::string read_string(const std::string& what) {
    const uint64_t len = read<uint64_t>(what + " length");
    need(len, core::str(what, " (length ", len, ")"));
    std::string s(reinterpret_cast<const char*>(data_ + pos_), len);
    pos_ += len;
    return s;
  }

 private:
  const std::string& path_;
  const uint8_t* data_;
  uint64_t size_;
  uint64_t pos_ = 0;
};

nlohmann::json read_value(Cursor& cur, uint32_t type, const std::string& key, int depth,
                          const std::string& path) {
  switch (type) {
    case kU8:
      return cur.read<uint8_t>(key);
    case kI8:
      return cur.read<int8_t>(key);
    case kU16:
      return cur.read<uint16_t>(key);
    case kI16:
      return cur.read<int16_t>(key);
    case kU32:
      return cur.read<uint32_t>(key);
    case kI32:
      return cur.read<int32_t>(key);
    case kU64:
      return cur.read<uint64_t>(key);
    case kI64:
      return cur.read<int64_t>(key);
    case kFloat32:
      return cur.read<float>(key);
    case kFloat64:
      return cur.read<double>(key);
    case kBool:
      return cur.read<uint8_t>(key) != 0;
    case kString:
      return cur.read_string("value of '" + key + "'");
    case kArray: {
      if (depth >= kMaxArrayDepth)
        throw core::Error(
            core::str(path, ": key '", key, "': arrays nested deeper than ", kMaxArrayDepth));
      const uint32_t elem = cur.read<uint32_t>(key + " array type");
      const uint64_t count = cur.read<uint64_t>(key + " array length");
      const uint64_t min_bytes = min_value_bytes(elem);
      if (min_bytes == 0)
        throw core::Error(core::str(path, ": key '", key, "': unknown array element type ", elem));
      if (count > cur.left() / min_bytes)
        throw core::Error(core::str(path, ": key '", key, "': array length ", count,
                                    " exceeds the ", cur.left(), " bytes left in the file"));
      nlohmann::json arr = nlohmann::json::array();
      arr.get_ref<nlohmann::json::array_t&>().reserve(count);
      for (uint64_t i = 0; i < count; ++i)
        arr.push_back(read_value(cur, elem, key, depth + 1, path));
      return arr;
    }
    default:
      throw core::Error(core::str(path, ": key '", key, "': unknown value type ", type));
  }
}

}  // namespace

GgufFile::GgufFile(const std::string& path) : path_(path) {
  map_ = std::make_shared<MappedFile>(path);
  Cursor cur(path, map_->data, map_->size);
  if (map_->size < 4 || std::memcmp(map_->data, "GGUF", 4) != 0)
    throw core::Error(core::str(path, ": not a GGUF file (bad magic)"));
  cur.read<uint32_t>("magic");
  version_ = cur.read<uint32_t>("version");
  if (version_ != 2 && version_ != 3)
    throw core::Error(
        core::str(path, ": unsupported GGUF version ", version_, " (expected 2 or 3)"));
  const uint64_t n_tensors = cur.read<uint64_t>("tensor count");
  const uint64_t n_kv = cur.read<uint64_t>("metadata count");
  // Each key/value needs at least 13 bytes and each tensor info 24: absurd
  // counts fail here instead of allocating or looping.
  if (n_kv > cur.left() / 13)
    throw core::Error(core::str(path, ": metadata count ", n_kv, " exceeds what the ", map_->size,
                                "-byte file can hold"));
  if (n_tensors > cur.left() / 24)
    throw core::Error(core::str(path, ": tensor count ", n_tensors, " exceeds what the ",
                                map_->size, "-byte file can hold"));

  metadata_ = nlohmann::json::object();
  for (uint64_t i = 0; i < n_kv; ++i) {
    const std::string key = cur.read_string(core::str("metadata key #", i));
    const uint32_t type = cur.read<uint32_t>(core::str("type of '", key, "'"));
    if (metadata_.contains(key)) throw core::Error(core::str(path, ": duplicate key '", key, "'"));
    metadata_[key] = read_value(cur, type, key, 0, path);
  }

  uint64_t alignment = 32;
  if (metadata_.contains("general.alignment")) {
    const auto& a = metadata_["general.alignment"];
    if (!a.is_number_unsigned() || a.get<uint64_t>() == 0 ||
        (a.get<uint64_t>() & (a.get<uint64_t>() - 1)) != 0)
      throw core::Error(
          core::str(path, ": general.alignment ", a.dump(), " is not a power of two"));
    alignment = a.get<uint64_t>();
  }

  tensors_.reserve(n_tensors);
  for (uint64_t i = 0; i < n_tensors; ++i) {
    GgufTensorInfo info;
    info.name = cur.read_string(core::str("tensor name #", i));
    const std::string ctx = "tensor '" + info.name + "'";
    const uint32_t n_dims = cur.read<uint32_t>(ctx + " dimension count");
    if (n_dims > kMaxDims)
      throw core::Error(core::str(path, ": ", ctx, ": ", n_dims, " dimensions (at most 4)"));
    for (uint32_t d = 0; d < n_dims; ++d) {
      const uint64_t ne = cur.read<uint64_t>(ctx + " dimension");
      if (ne > static_cast<uint64_t>(INT64_MAX))
        throw core::Error(core::str(path, ": ", ctx, ": dimension ", ne, " is absurd"));
      info.dims.push_back(static_cast<int64_t>(ne));
    }
    info.ggml_type = cur.read<uint32_t>(ctx + " type");
    info.offset = cur.read<uint64_t>(ctx + " offset");
    if (index_.count(info.name)) throw core::Error(core::str(path, ": duplicate ", ctx));
    index_[info.name] = tensors_.size();
    tensors_.push_back(std::move(info));
  }

  data_offset_ = (cur.pos() + alignment - 1) / alignment * alignment;
  if (!tensors_.empty() && data_offset_ > map_->size)
    throw core::Error(core::str(path, ": truncated: the data section would start at offset ",
                                data_offset_, " but the file has ", map_->size, " bytes"));
  const uint64_t data_size = map_->size >= data_offset_ ? map_->size - data_offset_ : 0;
  for (const auto& t : tensors_) {
    const std::string ctx = core::str(path, ": tensor '", t.name, "'");
    const GgmlType* type = find_type(t.ggml_type);
    if (!type) throw core::Error(core::str(ctx, ": unknown ggml type ", t.ggml_type));
    if (!t.dims.empty() && t.dims[0] % type->block != 0)
      throw core::Error(core::str(ctx, ": first dimension ", t.dims[0],
                                  " is not a multiple of the ", type->name, " block size ",
                                  type->block));
    // Saturating size: anything above the data section fails below.
    unsigned __int128 numel = 1;
    for (int64_t ne : t.dims)
      numel = std::min<unsigned __int128>(numel * static_cast<uint64_t>(ne), UINT64_MAX);
    const unsigned __int128 bytes = numel / type->block * type->bytes;
    if (t.offset % alignment != 0)
      throw core::Error(
          core::str(ctx, ": offset ", t.offset, " is not a multiple of the alignment ", alignment));
    if (t.offset > data_size || bytes > data_size - t.offset)
      throw core::Error(core::str(ctx, ": data at offset ", t.offset, " (", type->name,
                                  ") exceeds the data section of ", data_size, " bytes"));
  }
}

bool GgufFile::contains(const std::string& name) const {
  return index_.count(name) > 0;
}

at::Tensor GgufFile::tensor(const std::string& name, at::ScalarType dtype) const {
  auto it = index_.find(name);
  if (it == index_.end()) throw core::Error(core::str(path_, ": no tensor '", name, "'"));
  const GgufTensorInfo& t = tensors_[it->second];
  const std::vector<int64_t> shape(t.dims.rbegin(), t.dims.rend());
  const size_t offset = data_offset_ + t.offset;
  switch (t.ggml_type) {
    case kGgmlF32:
      return view_mapped(map_, offset, shape, at::kFloat);
    case kGgmlF16:
      return view_mapped(map_, offset, shape, at::kHalf);
    case kGgmlBF16:
      return view_mapped(map_, offset, shape, at::kBFloat16);
    default:
      if (is_dequantizable(t.ggml_type)) return dequantize(t, shape, offset, dtype);
      throw core::Error(core::str(path_, ": tensor '", name, "' has ggml type ",
                                  find_type(t.ggml_type)->name,
                                  ", which is not supported (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, "
                                  "Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)"));
  }
}

// Block by block into `dtype`, through a float32 buffer of one chunk per
// thread: a quantized tensor never exists whole in float32 unless float32 is
// what was asked for.
at::Tensor GgufFile::dequantize(const GgufTensorInfo& t, const std::vector<int64_t>& shape,
                                size_t offset, at::ScalarType dtype) const {
  const GgmlType* type = find_type(t.ggml_type);
  at::Tensor out = at::empty(shape, at::TensorOptions().dtype(dtype));
  const uint8_t* src = map_->data + offset;
  const int64_t n_blocks = out.numel() / static_cast<int64_t>(type->block);
  const int64_t block = static_cast<int64_t>(type->block), bytes = static_cast<int64_t>(type->bytes);
  constexpr int64_t kChunk = 256;  // blocks per conversion chunk
  if (dtype == at::kFloat) {
    float* dst = out.data_ptr<float>();
    at::parallel_for(0, n_blocks, kChunk, [&](int64_t begin, int64_t end) {
      dequantize_blocks(t.ggml_type, src + begin * bytes, dst + begin * block, end - begin);
    });
    return out;
  }
  at::Tensor flat = out.view({-1});
  at::parallel_for(0, n_blocks, kChunk, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(static_cast<size_t>(std::min(kChunk, end - begin) * block));
    for (int64_t b = begin; b < end; b += kChunk) {
      const int64_t n = std::min(kChunk, end - b);
      dequantize_blocks(t.ggml_type, src + b * bytes, buf.data(), n);
      flat.narrow(0, b * block, n * block)
          .copy_(at::from_blob(buf.data(), {n * block}, at::TensorOptions().dtype(at::kFloat)));
    }
  });
  return out;
}

}  // namespace patch::io
