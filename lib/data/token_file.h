#pragma once
// Pre-tokenized corpora: the .bin token file format, its incremental writer
// and a read-only token stream over a memory-mapped file (or a vector).
//
// .bin token file (little-endian; lib/data/README.md):
//   offset  0: char[4]  magic "PTOK"
//   offset  4: uint32   version = 1
//   offset  8: uint32   bytes per token: 2 (uint16) or 4 (uint32)
//   offset 12: uint32   reserved, 0
//   offset 16: uint64   number of tokens
//   offset 24: the tokens
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace patch::data {

enum class TokenDtype : uint32_t { kUInt16 = 2, kUInt32 = 4 };
// uint16 when every id fits (vocab_size <= 65536), else uint32.
TokenDtype dtype_for_vocab(int64_t vocab_size);

// Writes a .bin incrementally to a temporary file; commit() renames it into place.
class TokenFileWriter {
 public:
  TokenFileWriter(const std::string& path, TokenDtype dtype);
  ~TokenFileWriter();  // without commit() nothing appears at `path`
  TokenFileWriter(const TokenFileWriter&) = delete;
  TokenFileWriter& operator=(const TokenFileWriter&) = delete;
  // Throws core::Error when an id is negative or does not fit the dtype.
  void append(const int32_t* ids, size_t n);
  void append(const std::vector<int32_t>& ids) { append(ids.data(), ids.size()); }
  int64_t count() const { return count_; }
  void commit();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  TokenDtype dtype_;
  int64_t count_ = 0;
};

void write_token_file(const std::string& path, const std::vector<int32_t>& tokens,
                      TokenDtype dtype);

// A read-only sequence of token ids: a memory-mapped .bin file or a vector.
// Cheap to copy (shared storage).
class TokenStream {
 public:
  TokenStream() = default;
  explicit TokenStream(std::vector<int32_t> tokens);
  // Maps a .bin file; throws core::Error naming the file when the header or
  // size is not what the format above requires.
  static TokenStream open(const std::string& path);

  int64_t size() const { return size_; }
  int32_t operator[](int64_t i) const;
  // tokens[begin, begin + n) widened to int64 into out.
  void read(int64_t begin, int64_t n, int64_t* out) const;
  std::vector<int32_t> to_vector() const;
  // The mapped file; empty for an in-memory stream.
  const std::string& path() const;

 private:
  struct Storage;
  std::shared_ptr<const Storage> storage_;
  int64_t size_ = 0;
};

}  // namespace patch::data
