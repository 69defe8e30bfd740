#include "data/xz_stream.h"

#include <array>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <streambuf>

#include "core/error.h"

#if PATCH_WITH_LZMA
#include <lzma.h>
#endif

namespace patch::data {

bool is_xz(const std::string& path) {
  return path.size() > 3 && path.compare(path.size() - 3, 3, ".xz") == 0;
}

#if PATCH_WITH_LZMA
namespace {

// A read-only streambuf that inflates an .xz file chunk by chunk.
class XzStreamBuf final : public std::streambuf {
 public:
  XzStreamBuf(const std::string& path, long* consumed) : path_(path), consumed_(consumed) {
    file_ = std::fopen(path.c_str(), "rb");
    if (!file_) throw core::Error(core::str(path, ": cannot open for reading"));
    if (lzma_stream_decoder(&strm_, UINT64_MAX, LZMA_CONCATENATED) != LZMA_OK) {
      std::fclose(file_);
      throw core::Error(core::str(path, ": cannot start the xz decoder"));
    }
    setg(out_.data(), out_.data(), out_.data());
  }
  ~XzStreamBuf() override {
    lzma_end(&strm_);
    if (file_) std::fclose(file_);
  }
  XzStreamBuf(const XzStreamBuf&) = delete;
  XzStreamBuf& operator=(const XzStreamBuf&) = delete;

 protected:
  int_type underflow() override {
    if (gptr() < egptr()) return traits_type::to_int_type(*gptr());
    if (done_) return traits_type::eof();
    strm_.next_out = reinterpret_cast<uint8_t*>(out_.data());
    strm_.avail_out = out_.size();
    while (strm_.avail_out == out_.size() && !done_) {
      lzma_action action = LZMA_RUN;
      if (strm_.avail_in == 0) {
        const size_t n = std::fread(in_.data(), 1, in_.size(), file_);
        if (std::ferror(file_)) throw core::Error(core::str(path_, ": read error"));
        total_in_ += static_cast<long>(n);
        if (consumed_) *consumed_ = total_in_;
        strm_.next_in = in_.data();
        strm_.avail_in = n;
        if (n == 0) action = LZMA_FINISH;
      }
      const lzma_ret ret = lzma_code(&strm_, action);
      if (ret == LZMA_STREAM_END) {
        done_ = true;
      } else if (ret != LZMA_OK) {
        throw core::Error(core::str(path_, ": corrupt or truncated xz data (liblzma error ",
                                    static_cast<int>(ret), ")"));
      }
    }
    const size_t produced = out_.size() - strm_.avail_out;
    setg(out_.data(), out_.data(), out_.data() + produced);
    if (produced == 0) return traits_type::eof();
    return traits_type::to_int_type(*gptr());
  }

 private:
  std::string path_;
  long* consumed_;
  std::FILE* file_ = nullptr;
  lzma_stream strm_ = LZMA_STREAM_INIT;
  std::array<uint8_t, 1 << 16> in_{};
  std::array<char, 1 << 16> out_{};
  long total_in_ = 0;
  bool done_ = false;
};

// An istream that owns its streambuf.
class XzIStream final : public std::istream {
 public:
  XzIStream(const std::string& path, long* consumed)
      : std::istream(nullptr), buf_(path, consumed) {
    rdbuf(&buf_);
    // Decoding errors surface as exceptions from underflow; let them through.
    exceptions(std::ios::badbit);
  }

 private:
  XzStreamBuf buf_;
};

}  // namespace

bool xz_supported() {
  return true;
}
#else
bool xz_supported() {
  return false;
}
#endif

std::unique_ptr<std::istream> open_input(const std::string& path, long* consumed) {
  if (is_xz(path)) {
#if PATCH_WITH_LZMA
    return std::make_unique<XzIStream>(path, consumed);
#else
    (void)consumed;
    throw core::Error(core::str(path, ": this build cannot read .xz files (liblzma was not found "
                                      "at configure time); decompress it with `xz -dk`"));
#endif
  }
  auto in = std::make_unique<std::ifstream>(path, std::ios::binary);
  if (!*in) throw core::Error(core::str(path, ": cannot open for reading"));
  return in;
}

}  // namespace patch::data
