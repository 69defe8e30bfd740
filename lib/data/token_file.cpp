#include "data/token_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstring>
#include <limits>

#include "core/atomic_file.h"
#include "core/error.h"

namespace patch::data {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the .bin format is little-endian");

namespace {

constexpr char kMagic[4] = {'P', 'T', 'O', 'K'};
constexpr uint32_t kVersion = 1;
constexpr size_t kHeaderBytes = 24;

struct Header {
  char magic[4];
  uint32_t version;
  uint32_t dtype_bytes;
  uint32_t reserved;
  uint64_t count;
};
static_assert(sizeof(Header) == kHeaderBytes, "header layout");

}  // namespace

TokenDtype dtype_for_vocab(int64_t vocab_size) {
  return vocab_size <= 65536 ? TokenDtype::kUInt16 : TokenDtype::kUInt32;
}

// ---- writer ------------------------------------------------------------------

struct TokenFileWriter::Impl {
  explicit Impl(const std::string& path) : file(path) {}
  core::AtomicFile file;
  std::vector<uint8_t> buffer;
};

TokenFileWriter::TokenFileWriter(const std::string& path, TokenDtype dtype)
    : impl_(std::make_unique<Impl>(path)), dtype_(dtype) {
  Header h{};
  std::memcpy(h.magic, kMagic, sizeof(kMagic));
  h.version = kVersion;
  h.dtype_bytes = static_cast<uint32_t>(dtype);
  impl_->file.write(&h, sizeof(h));  // count is patched in by commit()
}

TokenFileWriter::~TokenFileWriter() = default;

void TokenFileWriter::append(const int32_t* ids, size_t n) {
  const size_t width = static_cast<size_t>(dtype_);
  const int64_t max_id =
      dtype_ == TokenDtype::kUInt16 ? 65535 : std::numeric_limits<int32_t>::max();
  auto& buf = impl_->buffer;
  for (size_t i = 0; i < n; ++i) {
    const int32_t id = ids[i];
    if (id < 0 || id > max_id)
      throw core::Error(core::str(impl_->file.path(), ": token id ", id, " does not fit ",
                                  width == 2 ? "uint16" : "uint32"));
    const uint32_t v = static_cast<uint32_t>(id);
    const size_t at = buf.size();
    buf.resize(at + width);
    std::memcpy(buf.data() + at, &v, width);  // little-endian: the low bytes
  }
  count_ += static_cast<int64_t>(n);
  if (buf.size() >= (size_t{1} << 20)) {
    impl_->file.write(buf.data(), buf.size());
    buf.clear();
  }
}

void TokenFileWriter::commit() {
  auto& buf = impl_->buffer;
  impl_->file.write(buf.data(), buf.size());
  buf.clear();
  const uint64_t count = static_cast<uint64_t>(count_);
  impl_->file.stream().seekp(static_cast<std::streamoff>(offsetof(Header, count)));
  impl_->file.write(&count, sizeof(count));
  impl_->file.commit();
}

void write_token_file(const std::string& path, const std::vector<int32_t>& tokens,
                      TokenDtype dtype) {
  TokenFileWriter w(path, dtype);
  w.append(tokens);
  w.commit();
}

// ---- stream ------------------------------------------------------------------

struct TokenStream::Storage {
  std::string path;
  std::vector<int32_t> owned;  // in-memory stream
  void* map = nullptr;         // mapped file
  size_t map_bytes = 0;
  const uint8_t* tokens = nullptr;
  size_t width = 4;

  ~Storage() {
    if (map) ::munmap(map, map_bytes);
  }
};

TokenStream::TokenStream(std::vector<int32_t> tokens) {
  auto s = std::make_shared<Storage>();
  s->owned = std::move(tokens);
  s->tokens = reinterpret_cast<const uint8_t*>(s->owned.data());
  s->width = 4;
  size_ = static_cast<int64_t>(s->owned.size());
  storage_ = std::move(s);
}

TokenStream TokenStream::open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw core::Error(core::str(path, ": cannot open (", std::strerror(errno), ")"));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    throw core::Error(core::str(path, ": cannot stat (", std::strerror(errno), ")"));
  }
  const size_t bytes = static_cast<size_t>(st.st_size);
  auto fail = [&](const std::string& what) {
    ::close(fd);
    throw core::Error(core::str(path, ": not a token file: ", what));
  };
  if (bytes < kHeaderBytes) fail(core::str("", bytes, " bytes, shorter than the 24-byte header"));
  Header h{};
  if (::pread(fd, &h, sizeof(h), 0) != static_cast<ssize_t>(sizeof(h)))
    fail("cannot read the header");
  if (std::memcmp(h.magic, kMagic, sizeof(kMagic)) != 0) fail("expected magic \"PTOK\"");
  if (h.version != kVersion) fail(core::str("version ", h.version, ", expected ", kVersion));
  if (h.dtype_bytes != 2 && h.dtype_bytes != 4)
    fail(core::str("bytes per token ", h.dtype_bytes, ", expected 2 or 4"));
  if (h.count > (bytes - kHeaderBytes) / h.dtype_bytes ||
      kHeaderBytes + h.count * h.dtype_bytes != bytes)
    fail(core::str("header says ", h.count, " tokens of ", h.dtype_bytes,
                   " bytes, but the file has ", bytes, " bytes"));
  void* map = ::mmap(nullptr, bytes, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map == MAP_FAILED)
    throw core::Error(core::str(path, ": cannot map (", std::strerror(errno), ")"));
  auto s = std::make_shared<Storage>();
  s->path = path;
  s->map = map;
  s->map_bytes = bytes;
  s->tokens = static_cast<const uint8_t*>(map) + kHeaderBytes;
  s->width = h.dtype_bytes;
  TokenStream out;
  out.size_ = static_cast<int64_t>(h.count);
  out.storage_ = std::move(s);
  return out;
}

int32_t TokenStream::operator[](int64_t i) const {
  const size_t w = storage_->width;
  const uint8_t* p = storage_->tokens + static_cast<size_t>(i) * w;
  if (w == 2) {
    uint16_t v;
    std::memcpy(&v, p, 2);
    return v;
  }
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

void TokenStream::read(int64_t begin, int64_t n, int64_t* out) const {
  if (begin < 0 || n < 0 || begin + n > size_)
    throw core::Error(core::str(path().empty() ? "token stream" : path(), ": range [", begin, ", ",
                                begin + n, ") outside ", size_, " tokens"));
  for (int64_t i = 0; i < n; ++i) out[i] = (*this)[begin + i];
}

std::vector<int32_t> TokenStream::to_vector() const {
  std::vector<int32_t> v(static_cast<size_t>(size_));
  for (int64_t i = 0; i < size_; ++i) v[static_cast<size_t>(i)] = (*this)[i];
  return v;
}

const std::string& TokenStream::path() const {
  static const std::string empty;
  return storage_ ? storage_->path : empty;
}

}  // namespace patch::data
