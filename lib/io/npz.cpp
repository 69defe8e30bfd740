#include "io/npz.h"

#include <zlib.h>

#include <algorithm>
#include <cctype>
#include <cstring>
#include <limits>

#include "core/atomic_file.h"
#include "core/error.h"
#include "io/mapped_file.h"

namespace patch::io {
namespace {

constexpr char kNpyMagic[] = "\x93NUMPY";
constexpr uint32_t kLocalSig = 0x04034b50, kCentralSig = 0x02014b50, kEndSig = 0x06054b50;
constexpr uint32_t kZip64EndSig = 0x06064b50, kZip64LocatorSig = 0x07064b50;
constexpr uint32_t kMax32 = 0xFFFFFFFFu;

uint64_t get_le(const uint8_t* p, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}
void put_le(std::string& out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}

// A bounds-checked cursor over the mapped archive: every read past the end is
// a one-line error naming the file and the record.
struct Reader {
  const std::string& path;
  const uint8_t* data;
  uint64_t size;

  const uint8_t* at(uint64_t offset, uint64_t bytes, const char* record) const {
    if (offset > size || bytes > size - offset)
      throw core::Error(core::str(path, ": truncated zip archive (", record, " at byte ", offset, " runs past the end)"));
    return data + offset;
  }
  uint64_t u(uint64_t offset, int bytes, const char* record) const { return get_le(at(offset, bytes, record), bytes); }
};

// ---- .npy ----

// The value of `'key': ...` in a .npy header dict, up to the next top-level comma.
std::string header_field(const std::string& header, const std::string& key, const std::string& what) {
  const std::string quoted[] = {"'" + key + "'", "\"" + key + "\""};
  size_t pos = std::string::npos;
  for (const auto& q : quoted)
    if ((pos = header.find(q)) != std::string::npos) {
      pos += q.size();
      break;
    }
  if (pos == std::string::npos) throw core::Error(core::str(what, ": .npy header has no '", key, "'"));
  pos = header.find(':', pos);
  if (pos == std::string::npos) throw core::Error(core::str(what, ": malformed .npy header"));
  ++pos;
  while (pos < header.size() && header[pos] == ' ') ++pos;
  size_t end = pos;
  if (end < header.size() && header[end] == '(') {
    end = header.find(')', end);
    if (end == std::string::npos) throw core::Error(core::str(what, ": malformed .npy shape"));
    return header.substr(pos, end - pos + 1);
  }
  while (end < header.size() && header[end] != ',' && header[end] != '}') ++end;
  std::string v = header.substr(pos, end - pos);
  while (!v.empty() && v.back() == ' ') v.pop_back();
  return v;
}

std::vector<int64_t> parse_shape(const std::string& text, const std::string& what) {
  std::vector<int64_t> shape;
  std::string inner = text.substr(1, text.size() - 2);  // without ( )
  size_t pos = 0;
  while (pos < inner.size()) {
    while (pos < inner.size() && (inner[pos] == ' ' || inner[pos] == ',')) ++pos;
    if (pos >= inner.size()) break;
    size_t end = pos;
    int64_t v = 0;
    while (end < inner.size() && std::isdigit(static_cast<unsigned char>(inner[end]))) {
      if (v > (std::numeric_limits<int64_t>::max() - 9) / 10)
        throw core::Error(core::str(what, ": .npy shape ", text, " is too large"));
      v = v * 10 + (inner[end] - '0');
      ++end;
    }
    if (end == pos) throw core::Error(core::str(what, ": malformed .npy shape ", text));
    shape.push_back(v);
    pos = end;
  }
  return shape;
}

// zlib counts in 32-bit chunks: feed it at most 1 GiB at a time.
constexpr uint64_t kZChunk = uint64_t{1} << 30;

// Feeds `in` to a zlib stream and collects its output into `out` (sized for
// the whole result), at most kZChunk at a time each way, until `step` (inflate
// or deflate, told whether all input is in) stops returning Z_OK. Returns the
// last return code; `produced` gets the bytes written.
template <class Step>
int pump(z_stream& zs, const uint8_t* in, uint64_t in_len, uint8_t* out, uint64_t out_len, uint64_t* produced,
         Step step) {
  zs.next_in = const_cast<Bytef*>(in);
  zs.next_out = out;
  uint64_t in_left = in_len, out_left = out_len;
  int rc = Z_OK;
  for (;;) {
    if (zs.avail_in == 0 && in_left > 0) {
      zs.avail_in = static_cast<uInt>(std::min(in_left, kZChunk));
      in_left -= zs.avail_in;
    }
    if (zs.avail_out == 0 && out_left > 0) {
      zs.avail_out = static_cast<uInt>(std::min(out_left, kZChunk));
      out_left -= zs.avail_out;
    }
    rc = step(in_left == 0);
    if (rc != Z_OK) break;  // Z_STREAM_END, or no progress possible (Z_BUF_ERROR), or corrupt data
  }
  *produced = out_len - out_left - zs.avail_out;
  return rc;
}

std::string inflate_member(const uint8_t* src, uint64_t compressed, uint64_t size, const std::string& what) {
  std::string out(size, '\0');
  z_stream zs{};
  if (inflateInit2(&zs, -MAX_WBITS) != Z_OK) throw core::Error(what + ": zlib could not start");
  uint64_t produced = 0;
  const int rc = pump(zs, src, compressed, reinterpret_cast<uint8_t*>(&out[0]), size, &produced,
                      [&](bool) { return inflate(&zs, Z_NO_FLUSH); });
  inflateEnd(&zs);
  if (rc != Z_STREAM_END || produced != size)
    throw core::Error(core::str(what, ": corrupt deflate data (", produced, " of ", size, " bytes inflated)"));
  return out;
}

uint32_t crc32_of(const std::string& bytes) {
  uLong crc = crc32(0L, Z_NULL, 0);
  size_t pos = 0;
  while (pos < bytes.size()) {
    const uInt n = static_cast<uInt>(std::min<size_t>(bytes.size() - pos, 1u << 30));
    crc = crc32(crc, reinterpret_cast<const Bytef*>(bytes.data() + pos), n);
    pos += n;
  }
  return static_cast<uint32_t>(crc);
}

std::string deflate_bytes(const std::string& bytes, const std::string& what) {
  z_stream zs{};
  if (deflateInit2(&zs, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -MAX_WBITS, 8, Z_DEFAULT_STRATEGY) != Z_OK)
    throw core::Error(what + ": zlib could not start");
  std::string out(deflateBound(&zs, static_cast<uLong>(bytes.size())), '\0');
  uint64_t produced = 0;
  const int rc = pump(zs, reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(),
                      reinterpret_cast<uint8_t*>(&out[0]), out.size(), &produced,
                      [&](bool all_in) { return deflate(&zs, all_in ? Z_FINISH : Z_NO_FLUSH); });
  deflateEnd(&zs);
  if (rc != Z_STREAM_END) throw core::Error(what + ": deflate failed");
  out.resize(produced);
  return out;
}

}  // namespace

int64_t NpyArray::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

size_t npy_item_size(const std::string& descr, const std::string& what) {
  if (descr.size() >= 3) {
    const char order = descr[0], kind = descr[1];
    const std::string digits = descr.substr(2);
    const bool numeric = std::all_of(digits.begin(), digits.end(), [](char c) { return std::isdigit(static_cast<unsigned char>(c)) != 0; });
    if (numeric && digits.size() <= 6) {
      const size_t n = std::stoul(digits);
      const bool one_byte = n == 1 && (order == '|' || order == '<' || order == '=');
      if ((kind == 'u' || kind == 'i' || kind == 'b') && (one_byte || (order != '>' && (n == 2 || n == 4 || n == 8))))
        return n;
      if (kind == 'f' && order != '>' && (n == 2 || n == 4 || n == 8)) return n;
      if (kind == 'U' && order != '>') return 4 * n;
      if (kind == 'S' && order == '|') return n;
    }
  }
  throw core::Error(core::str(what, ": unsupported .npy dtype '", descr,
                              "' (expected little-endian integers, floats, bool or strings)"));
}

std::string format_npy(const NpyArray& array) {
  // numpy's spelling of a shape: (), (n,), (a, b).
  std::string shape = "(";
  for (size_t i = 0; i < array.shape.size(); ++i) shape += (i ? ", " : "") + std::to_string(array.shape[i]);
  shape += array.shape.size() == 1 ? ",)" : ")";
  std::string header = "{'descr': '" + array.descr + "', 'fortran_order': False, 'shape': " + shape + ", }";
  // Magic (6) + version (2) + length (2) + header + '\n', padded to 64 bytes as numpy does.
  const size_t unpadded = 10 + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header += '\n';
  std::string out(kNpyMagic, 6);
  out += '\x01';
  out += '\x00';
  put_le(out, header.size(), 2);
  out += header;
  out += array.data;
  return out;
}

NpyArray parse_npy(const std::string& bytes, const std::string& what) {
  if (bytes.size() < 10 || bytes.compare(0, 6, kNpyMagic, 6) != 0)
    throw core::Error(what + ": not a .npy array (bad magic)");
  const auto* p = reinterpret_cast<const uint8_t*>(bytes.data());
  const int major = p[6];
  if (major < 1 || major > 3) throw core::Error(core::str(what, ": unknown .npy format version ", major));
  const size_t len_bytes = major == 1 ? 2 : 4;
  if (bytes.size() < 8 + len_bytes) throw core::Error(what + ": truncated .npy header");
  const uint64_t header_len = get_le(p + 8, static_cast<int>(len_bytes));
  const uint64_t data_start = 8 + len_bytes + header_len;
  if (data_start > bytes.size()) throw core::Error(what + ": truncated .npy header");
  const std::string header = bytes.substr(8 + len_bytes, header_len);
  NpyArray a;
  std::string descr = header_field(header, "descr", what);
  if (descr.size() < 2 || (descr.front() != '\'' && descr.front() != '"') || descr.back() != descr.front())
    throw core::Error(core::str(what, ": .npy descr ", descr, " is not a simple dtype"));
  a.descr = descr.substr(1, descr.size() - 2);
  if (header_field(header, "fortran_order", what) != "False") {
    // A Fortran-ordered array of at most one dimension is laid out as in C order.
    const std::string shape_text = header_field(header, "shape", what);
    if (parse_shape(shape_text, what).size() > 1)
      throw core::Error(what + ": Fortran-ordered .npy arrays are not supported (save it with C order)");
  }
  const std::string shape_text = header_field(header, "shape", what);
  if (shape_text.size() < 2 || shape_text.front() != '(')
    throw core::Error(core::str(what, ": malformed .npy shape ", shape_text));
  a.shape = parse_shape(shape_text, what);
  const size_t item = npy_item_size(a.descr, what);
  const uint64_t have = bytes.size() - data_start;
  int64_t n = 1;
  for (int64_t d : a.shape) {
    if (d != 0 && n > static_cast<int64_t>(have / item) / d)
      throw core::Error(core::str(what, ": .npy data is shorter than its shape ", shape_text, " needs"));
    n *= d;
  }
  if (static_cast<uint64_t>(n) * item != have)
    throw core::Error(core::str(what, ": .npy data holds ", have, " bytes, its shape ", shape_text, " x ", item,
                                " needs ", static_cast<uint64_t>(n) * item));
  a.data = bytes.substr(data_start);
  return a;
}

NpyArray npy_uint8(std::vector<int64_t> shape, std::string bytes) {
  return NpyArray{"|u1", std::move(shape), std::move(bytes)};
}

NpyArray npy_int64(const std::vector<int64_t>& values) {
  NpyArray a{"<i8", {static_cast<int64_t>(values.size())}, {}};
  for (int64_t v : values) put_le(a.data, static_cast<uint64_t>(v), 8);
  return a;
}

NpyArray npy_unicode(const std::string& utf8) {
  // UTF-8 -> UTF-32LE code points (the text is ours: well-formed UTF-8).
  std::string data;
  size_t chars = 0;
  for (size_t i = 0; i < utf8.size();) {
    const auto c = static_cast<unsigned char>(utf8[i]);
    const int len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : 4;
    uint32_t cp = len == 1 ? c : len == 2 ? (c & 0x1F) : len == 3 ? (c & 0x0F) : (c & 0x07);
    for (int k = 1; k < len && i + k < utf8.size(); ++k) cp = (cp << 6) | (static_cast<unsigned char>(utf8[i + k]) & 0x3F);
    put_le(data, cp, 4);
    ++chars;
    i += len;
  }
  return NpyArray{"<U" + std::to_string(std::max<size_t>(chars, 1)), {}, chars ? data : std::string(4, '\0')};
}

std::vector<int64_t> npy_integers(const NpyArray& array, const std::string& what) {
  const size_t item = npy_item_size(array.descr, what);
  const char kind = array.descr[1];
  if (kind != 'i' && kind != 'u')
    throw core::Error(core::str(what, ": expected an integer array, got dtype '", array.descr, "'"));
  std::vector<int64_t> out;
  const auto* p = reinterpret_cast<const uint8_t*>(array.data.data());
  for (int64_t i = 0; i < array.numel(); ++i) {
    uint64_t v = get_le(p + i * item, static_cast<int>(item));
    if (kind == 'i' && item < 8 && (v >> (8 * item - 1)) & 1) v |= ~uint64_t{0} << (8 * item);  // sign-extend
    if (kind == 'u' && item == 8 && v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      throw core::Error(what + ": integer out of range");
    out.push_back(static_cast<int64_t>(v));
  }
  return out;
}

std::string npy_text(const NpyArray& array, const std::string& what) {
  const size_t item = npy_item_size(array.descr, what);
  const char kind = array.descr[1];
  if ((kind != 'U' && kind != 'S') || array.numel() != 1)
    throw core::Error(core::str(what, ": expected one string, got dtype '", array.descr, "' of ", array.numel(),
                                " elements"));
  std::string out;
  if (kind == 'S') {
    out = array.data.substr(0, item);
  } else {
    const auto* p = reinterpret_cast<const uint8_t*>(array.data.data());
    for (size_t i = 0; i < item / 4; ++i) {
      const uint32_t cp = static_cast<uint32_t>(get_le(p + 4 * i, 4));
      if (cp == 0) break;
      if (cp > 0x10FFFF) throw core::Error(what + ": invalid code point in string");
      if (cp < 0x80) {
        out += static_cast<char>(cp);
      } else if (cp < 0x800) {
        out += static_cast<char>(0xC0 | (cp >> 6));
        out += static_cast<char>(0x80 | (cp & 0x3F));
      } else if (cp < 0x10000) {
        out += static_cast<char>(0xE0 | (cp >> 12));
        out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
        out += static_cast<char>(0x80 | (cp & 0x3F));
      } else {
        out += static_cast<char>(0xF0 | (cp >> 18));
        out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
        out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
        out += static_cast<char>(0x80 | (cp & 0x3F));
      }
    }
  }
  while (!out.empty() && out.back() == '\0') out.pop_back();  // numpy pads short strings with NULs
  return out;
}

// ---- .npz (zip) ----

NpzFile::NpzFile(const std::string& path) : path_(path), map_(std::make_shared<MappedFile>(path)) {
  const Reader r{path_, map_->data, map_->size};
  // The end-of-central-directory record: the last one within 64 KiB of comment.
  if (map_->size < 22) throw core::Error(path_ + ": not a zip archive (too short for an .npz file)");
  uint64_t end = map_->size - 22;
  const uint64_t stop = map_->size > 22 + 65535 ? map_->size - 22 - 65535 : 0;
  while (r.u(end, 4, "end record") != kEndSig) {
    if (end == stop) throw core::Error(path_ + ": not a zip archive (no end-of-central-directory record)");
    --end;
  }
  uint64_t entries = r.u(end + 10, 2, "end record");
  uint64_t cd_size = r.u(end + 12, 4, "end record");
  uint64_t cd_offset = r.u(end + 16, 4, "end record");
  if ((entries == 0xFFFF || cd_size == kMax32 || cd_offset == kMax32) && end >= 20 &&
      r.u(end - 20, 4, "zip64 locator") == kZip64LocatorSig) {
    const uint64_t z64 = r.u(end - 20 + 8, 8, "zip64 locator");
    if (r.u(z64, 4, "zip64 end record") != kZip64EndSig) throw core::Error(path_ + ": corrupt zip64 end record");
    entries = r.u(z64 + 32, 8, "zip64 end record");
    cd_size = r.u(z64 + 40, 8, "zip64 end record");
    cd_offset = r.u(z64 + 48, 8, "zip64 end record");
  }
  r.at(cd_offset, cd_size, "central directory");
  uint64_t pos = cd_offset;
  for (uint64_t i = 0; i < entries; ++i) {
    if (r.u(pos, 4, "central directory") != kCentralSig)
      throw core::Error(core::str(path_, ": corrupt zip central directory (entry ", i, ")"));
    Member m;
    const uint16_t flags = static_cast<uint16_t>(r.u(pos + 8, 2, "central directory"));
    m.method = static_cast<uint16_t>(r.u(pos + 10, 2, "central directory"));
    m.crc = static_cast<uint32_t>(r.u(pos + 16, 4, "central directory"));
    m.compressed = r.u(pos + 20, 4, "central directory");
    m.size = r.u(pos + 24, 4, "central directory");
    const uint64_t name_len = r.u(pos + 28, 2, "central directory");
    const uint64_t extra_len = r.u(pos + 30, 2, "central directory");
    const uint64_t comment_len = r.u(pos + 32, 2, "central directory");
    m.local_offset = r.u(pos + 42, 4, "central directory");
    const std::string name(reinterpret_cast<const char*>(r.at(pos + 46, name_len, "member name")), name_len);
    // zip64: the 64-bit values of the fields that hold 0xFFFFFFFF, in order.
    uint64_t extra = pos + 46 + name_len;
    const uint64_t extra_end = extra + extra_len;
    r.at(extra, extra_len, "extra field");
    while (extra + 4 <= extra_end) {
      const uint64_t id = r.u(extra, 2, "extra field"), len = r.u(extra + 2, 2, "extra field");
      uint64_t field = extra + 4;
      if (field + len > extra_end) throw core::Error(core::str(path_, ": corrupt extra field of member '", name, "'"));
      if (id == 0x0001) {
        for (uint64_t* v : {&m.size, &m.compressed, &m.local_offset}) {
          if (*v != kMax32) continue;
          if (field + 8 > extra + 4 + len)
            throw core::Error(core::str(path_, ": corrupt zip64 field of member '", name, "'"));
          *v = r.u(field, 8, "zip64 field");
          field += 8;
        }
      }
      extra += 4 + len;
    }
    pos = extra_end + comment_len;
    if (flags & 1) throw core::Error(core::str(path_, ": member '", name, "' is encrypted"));
    if (m.method != 0 && m.method != 8)
      throw core::Error(core::str(path_, ": member '", name, "' uses zip compression method ", m.method,
                                  " (expected stored or deflated, as numpy writes)"));
    if (name.size() < 5 || name.compare(name.size() - 4, 4, ".npy") != 0)
      throw core::Error(core::str(path_, ": member '", name, "' is not a .npy array"));
    const std::string key = name.substr(0, name.size() - 4);
    if (members_.count(key)) throw core::Error(core::str(path_, ": member '", name, "' appears twice"));
    if (m.method == 0 && m.compressed != m.size)
      throw core::Error(core::str(path_, ": member '", name, "' is stored with two different sizes"));
    keys_.push_back(key);
    members_[key] = m;
  }
}

NpzFile::~NpzFile() = default;

NpyArray NpzFile::array(const std::string& key) const {
  const auto it = members_.find(key);
  if (it == members_.end()) throw core::Error(core::str(path_, ": no array '", key, "'"));
  const Member& m = it->second;
  const std::string what = core::str(path_, ": ", key);
  const Reader r{path_, map_->data, map_->size};
  if (r.u(m.local_offset, 4, "local header") != kLocalSig)
    throw core::Error(what + ": corrupt zip local header");
  const uint64_t data = m.local_offset + 30 + r.u(m.local_offset + 26, 2, "local header") +
                        r.u(m.local_offset + 28, 2, "local header");
  const uint8_t* src = r.at(data, m.compressed, "member data");
  // Deflate expands at most ~1032:1; a larger claim is a corrupt (or hostile) header.
  if (m.method == 8 && m.size / 1032 > m.compressed + 1)
    throw core::Error(core::str(what, ": claims ", m.size, " bytes from ", m.compressed, " deflated ones (corrupt)"));
  std::string bytes = m.method == 0 ? std::string(reinterpret_cast<const char*>(src), m.size)
                                    : inflate_member(src, m.compressed, m.size, what);
  if (crc32_of(bytes) != m.crc) throw core::Error(what + ": CRC-32 mismatch (corrupt archive)");
  return parse_npy(bytes, what);
}

void write_npz(const std::string& path, const std::vector<std::pair<std::string, NpyArray>>& arrays) {
  core::AtomicFile file(path);
  std::string central;
  uint64_t offset = 0;
  // 1980-01-01 00:00 in DOS format: the same arrays always give the same bytes.
  constexpr uint16_t kDosTime = 0, kDosDate = (0 << 9) | (1 << 5) | 1;
  for (const auto& [key, array] : arrays) {
    const std::string name = key + ".npy";
    const std::string npy = format_npy(array);
    const std::string packed = deflate_bytes(npy, path + ": " + key);
    const uint32_t crc = crc32_of(npy);
    if (offset > kMax32 || npy.size() >= kMax32 || packed.size() >= kMax32 || name.size() > 0xFFFF)
      throw core::Error(core::str(path, ": '", key, "' does not fit a zip archive without zip64 (over 4 GiB)"));
    std::string local;
    put_le(local, kLocalSig, 4);
    put_le(local, 20, 2);  // version needed: 2.0 (deflate)
    put_le(local, 0, 2);
    put_le(local, 8, 2);  // deflated
    put_le(local, kDosTime, 2);
    put_le(local, kDosDate, 2);
    put_le(local, crc, 4);
    put_le(local, packed.size(), 4);
    put_le(local, npy.size(), 4);
    put_le(local, name.size(), 2);
    put_le(local, 0, 2);
    local += name;
    file.write(local.data(), local.size());
    file.write(packed.data(), packed.size());

    put_le(central, kCentralSig, 4);
    put_le(central, 20, 2);  // made by: 2.0
    put_le(central, 20, 2);
    put_le(central, 0, 2);
    put_le(central, 8, 2);
    put_le(central, kDosTime, 2);
    put_le(central, kDosDate, 2);
    put_le(central, crc, 4);
    put_le(central, packed.size(), 4);
    put_le(central, npy.size(), 4);
    put_le(central, name.size(), 2);
    put_le(central, 0, 2);  // extra
    put_le(central, 0, 2);  // comment
    put_le(central, 0, 2);  // disk
    put_le(central, 0, 2);  // internal attributes
    put_le(central, 0, 4);  // external attributes
    put_le(central, offset, 4);
    central += name;
    offset += local.size() + packed.size();
  }
  if (arrays.size() > 0xFFFF || offset > kMax32)
    throw core::Error(core::str(path, ": too many arrays for a zip archive without zip64"));
  std::string end;
  put_le(end, kEndSig, 4);
  put_le(end, 0, 2);
  put_le(end, 0, 2);
  put_le(end, arrays.size(), 2);
  put_le(end, arrays.size(), 2);
  put_le(end, central.size(), 4);
  put_le(end, offset, 4);
  put_le(end, 0, 2);
  file.write(central.data(), central.size());
  file.write(end.data(), end.size());
  file.commit();
}

}  // namespace patch::io
