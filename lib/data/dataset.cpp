#include "data/dataset.h"

#include "core/error.h"

namespace patch::data {

BlockDataset::BlockDataset(TokenStream tokens, int64_t seq_len)
    : tokens_(std::move(tokens)), seq_len_(seq_len) {
  if (seq_len_ < 1)
    throw core::ConfigError(core::str("seq_len must be at least 1, got ", seq_len_));
  num_blocks_ = tokens_.size() > 0 ? (tokens_.size() - 1) / seq_len_ : 0;
}

at::Tensor BlockDataset::blocks(const std::vector<int64_t>& indices) const {
  const int64_t width = seq_len_ + 1;
  at::Tensor out = at::empty({static_cast<int64_t>(indices.size()), width}, at::kLong);
  int64_t* p = out.data_ptr<int64_t>();
  for (size_t r = 0; r < indices.size(); ++r) {
    const int64_t i = indices[r];
    if (i < 0 || i >= num_blocks_)
      throw core::Error(core::str("block index ", i, " outside [0, ", num_blocks_, ")"));
    tokens_.read(i * seq_len_, width, p + static_cast<int64_t>(r) * width);
  }
  return out;
}

Split split_blocks(int64_t num_blocks, int64_t valid_blocks) {
  if (valid_blocks < 0 || valid_blocks > num_blocks)
    throw core::ConfigError(core::str("validation blocks ", valid_blocks, " outside [0, ",
                                      num_blocks, "] (the data has ", num_blocks, " blocks)"));
  Split s;
  for (int64_t i = 0; i < num_blocks; ++i)
    (i < num_blocks - valid_blocks ? s.train : s.valid).push_back(i);
  return s;
}

namespace {

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Uniform in [0, n) without modulo bias (Lemire's multiply-shift with rejection).
uint64_t uniform(uint64_t& state, uint64_t n) {
  const uint64_t threshold = (0 - n) % n;
  for (;;) {
    const unsigned __int128 m = static_cast<unsigned __int128>(splitmix64(state)) * n;
    if (static_cast<uint64_t>(m) >= threshold) return static_cast<uint64_t>(m >> 64);
  }
}

}  // namespace

std::vector<int64_t> epoch_order(const std::vector<int64_t>& indices, uint64_t seed,
                                 int64_t epoch) {
  std::vector<int64_t> order = indices;
  uint64_t state = seed;
  splitmix64(state);
  state ^= 0xD1B54A32D192ED03ull * static_cast<uint64_t>(epoch + 1);
  for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[uniform(state, i)]);
  return order;
}

}  // namespace patch::data
