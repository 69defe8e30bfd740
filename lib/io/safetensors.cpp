#include "io/safetensors.h"

#include <algorithm>
#include <cstring>
#include <set>

#include <nlohmann/json.hpp>

#include "core/atomic_file.h"
#include "core/error.h"
#include "io/mapped_file.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "safetensors is little-endian");

namespace patch::io {
namespace {

// Larger headers are corrupt: the Python library uses the same bound.
constexpr uint64_t kMaxHeaderBytes = 100ull * 1000 * 1000;

struct DtypeName {
  const char* name;
  at::ScalarType dtype;
};
constexpr DtypeName kDtypes[] = {
    {"F64", at::kDouble}, {"F32", at::kFloat}, {"F16", at::kHalf},  {"BF16", at::kBFloat16},
    {"I64", at::kLong},   {"I32", at::kInt},   {"I16", at::kShort}, {"I8", at::kChar},
    {"U8", at::kByte},    {"BOOL", at::kBool},
};

// Parses one header entry; every failure names the file and the tensor.
SafetensorsEntry parse_entry(const std::string& file, const std::string& name,
                             const nlohmann::json& v, uint64_t data_size) {
  auto fail = [&](const std::string& what) {
    return core::Error(core::str(file, ": tensor '", name, "': ", what));
  };
  if (!v.is_object()) throw fail("header entry is not an object");
  for (const char* key : {"dtype", "shape", "data_offsets"})
    if (!v.contains(key)) throw fail(core::str("header entry has no '", key, "'"));

  SafetensorsEntry e;
  e.name = name;
  const auto& dt = v["dtype"];
  if (!dt.is_string()) throw fail("dtype is not a string");
  const std::string dts = dt.get<std::string>();
  const DtypeName* found = nullptr;
  for (const auto& d : kDtypes)
    if (dts == d.name) found = &d;
  if (!found)
    throw fail(core::str("unknown dtype '", dts, "' (expected F64, F32, F16, BF16, I64, I32, I16, ",
                         "I8, U8 or BOOL)"));
  e.dtype = found->dtype;

  const auto& shape = v["shape"];
  if (!shape.is_array()) throw fail("shape is not an array");
  // The element count saturates at 2^64 (then it cannot match any byte range)
  // so that absurd shapes never overflow.
  const unsigned __int128 cap = static_cast<unsigned __int128>(1) << 64;
  unsigned __int128 numel = 1;
  for (const auto& d : shape) {
    if (!d.is_number_unsigned()) throw fail("shape has a non-integer or negative dimension");
    const uint64_t n = d.get<uint64_t>();
    if (n > static_cast<uint64_t>(INT64_MAX)) throw fail(core::str("dimension ", n, " is absurd"));
    e.shape.push_back(static_cast<int64_t>(n));
    numel = std::min(numel * n, cap);
  }

  const auto& off = v["data_offsets"];
  if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() ||
      !off[1].is_number_unsigned())
    throw fail("data_offsets is not a pair of non-negative integers");
  e.begin = off[0].get<uint64_t>();
  e.end = off[1].get<uint64_t>();
  if (e.begin > e.end)
    throw fail(core::str("data_offsets [", e.begin, ", ", e.end, ") are reversed"));
  if (e.end > data_size)
    throw fail(core::str("data_offsets [", e.begin, ", ", e.end, ") exceed the data section of ",
                         data_size, " bytes"));
  const unsigned __int128 bytes = numel * c10::elementSize(e.dtype);
  if (bytes != e.end - e.begin) {
    std::string dims;
    for (size_t i = 0; i < e.shape.size(); ++i)
      dims += (i ? ", " : "") + std::to_string(e.shape[i]);
    throw fail(core::str("shape [", dims, "] of ", dts, " needs ",
                         bytes > UINT64_MAX ? std::string("more than 2^64")
                                            : std::to_string(static_cast<uint64_t>(bytes)),
                         " bytes but data_offsets [", e.begin, ", ", e.end, ") hold ",
                         e.end - e.begin));
  }
  return e;
}

}  // namespace

const char* safetensors_dtype(at::ScalarType dtype) {
  for (const auto& d : kDtypes)
    if (d.dtype == dtype) return d.name;
  return nullptr;
}

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  map_ = std::make_shared<MappedFile>(path);
  const uint64_t size = map_->size;
  if (size < 8) throw core::Error(core::str(path, ": not a safetensors file (", size, " bytes)"));
  uint64_t header_len = 0;
  std::memcpy(&header_len, map_->data, 8);
  if (header_len > kMaxHeaderBytes || header_len > size - 8)
    throw core::Error(core::str(path, ": header length ", header_len, " exceeds ",
                                header_len > kMaxHeaderBytes ? "the 100 MB limit" : "the file size",
                                " (file has ", size, " bytes)"));
  const char* hbegin = reinterpret_cast<const char*>(map_->data + 8);
  auto header = nlohmann::json::parse(hbegin, hbegin + header_len, nullptr,
                                      /*allow_exceptions=*/false);
  if (header.is_discarded() || !header.is_object())
    throw core::Error(core::str(path, ": header is not a JSON object"));

  data_offset_ = 8 + header_len;
  const uint64_t data_size = size - data_offset_;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (!it->is_object()) throw core::Error(core::str(path, ": __metadata__ is not an object"));
      for (auto m = it->begin(); m != it->end(); ++m) {
        if (!m->is_string())
          throw core::Error(
              core::str(path, ": __metadata__ value '", m.key(), "' is not a string"));
        metadata_[m.key()] = m->get<std::string>();
      }
      continue;
    }
    entries_.push_back(parse_entry(path, it.key(), *it, data_size));
  }

  // File order; any two non-empty ranges must be disjoint.
  std::sort(entries_.begin(), entries_.end(), [](const auto& a, const auto& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  const SafetensorsEntry* prev = nullptr;
  for (const auto& e : entries_) {
    if (e.begin == e.end) continue;
    if (prev && e.begin < prev->end)
      throw core::Error(core::str(path, ": tensor '", e.name, "': data_offsets [", e.begin, ", ",
                                  e.end, ") overlap tensor '", prev->name, "' [", prev->begin, ", ",
                                  prev->end, ")"));
    prev = &e;
  }
  for (size_t i = 0; i < entries_.size(); ++i) index_[entries_[i].name] = i;
}

bool SafetensorsFile::contains(const std::string& name) const {
  return index_.count(name) > 0;
}

at::Tensor SafetensorsFile::tensor(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) throw core::Error(core::str(path_, ": no tensor '", name, "'"));
  const auto& e = entries_[it->second];
  return view_mapped(map_, data_offset_ + e.begin, e.shape, e.dtype);
}

void write_safetensors(const std::string& path,
                       const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<at::Tensor> data;
  std::set<std::string> seen;
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    if (name == "__metadata__" || !seen.insert(name).second)
      throw core::Error(core::str(path, ": tensor name '", name, "' is reserved or repeated"));
    const char* dtype = safetensors_dtype(t.scalar_type());
    if (!dtype)
      throw core::Error(core::str(path, ": tensor '", name, "': dtype ", t.scalar_type(),
                                  " cannot be stored in safetensors"));
    at::Tensor c = t.to(at::kCPU).contiguous();
    const uint64_t bytes = c.nbytes();
    header[name] = {
        {"dtype", dtype}, {"shape", c.sizes().vec()}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
    data.push_back(std::move(c));
  }
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');  // keeps the data section 8-byte aligned
  const uint64_t len = h.size();

  core::AtomicFile out(path);
  out.write(&len, 8);
  out.write(h.data(), h.size());
  for (const auto& c : data) out.write(c.data_ptr(), c.nbytes());
  out.commit();
}

}  // namespace patch::io
