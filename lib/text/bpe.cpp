#include "text/bpe.h"

#include <algorithm>
#include <cstdio>
#include <queue>

#include "core/error.h"
#include "text/unicode.h"

namespace patch::text {

namespace {

uint64_t pair_key(int32_t a, int32_t b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}

// Above this many symbols (a word without pre-tokenization, e.g. a whole
// document under a SentencePiece-style normalizer) the bucket queue is used.
constexpr size_t kBucketQueueMinSymbols = 512;

struct Symbol {
  int32_t c;
  int64_t prev, next;
  size_t len;
};

struct Merge {
  int32_t rank;
  int64_t pos;
  int32_t new_id;
};

// The queue of Hugging Face's Word::merge_all: pops the lowest rank, then the
// leftmost position.
class HeapQueue {
 public:
  void push(const Merge& m) { heap_.push(m); }
  bool pop(Merge& m) {
    if (heap_.empty()) return false;
    m = heap_.top();
    heap_.pop();
    return true;
  }

 private:
  struct Later {
    bool operator()(const Merge& a, const Merge& b) const {
      return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos;
    }
  };
  std::priority_queue<Merge, std::vector<Merge>, Later> heap_;
};

// The same order for long words without a heap's cache misses: one bucket per
// rank, each consumed in position order. A merge never pushes a pair of its
// own rank (the new pair contains the merged token), so a bucket only grows
// while another one is being consumed; it is re-sorted when that broke its order.
class BucketQueue {
 public:
  explicit BucketQueue(size_t ranks)
      : buckets_(ranks), head_(ranks, 0), dirty_(ranks, 0), cur_(ranks) {}
  void push(const Merge& m) {
    const auto r = static_cast<size_t>(m.rank);
    auto& b = buckets_[r];
    if (b.size() > head_[r] && b.back().pos > m.pos) dirty_[r] = 1;
    b.push_back(Entry{m.pos, m.new_id});
    cur_ = std::min(cur_, r);
  }
  bool pop(Merge& m) {
    while (cur_ < buckets_.size()) {
      auto& b = buckets_[cur_];
      size_t& head = head_[cur_];
      if (head == b.size()) {
        b.clear();
        head = 0;
        ++cur_;
        continue;
      }
      if (dirty_[cur_]) {
        std::stable_sort(b.begin() + static_cast<std::ptrdiff_t>(head), b.end(),
                         [](const Entry& x, const Entry& y) { return x.pos < y.pos; });
        dirty_[cur_] = 0;
      }
      const Entry e = b[head++];
      m = Merge{static_cast<int32_t>(cur_), e.pos, e.new_id};
      return true;
    }
    return false;
  }

 private:
  struct Entry {
    int64_t pos;
    int32_t new_id;
  };
  std::vector<std::vector<Entry>> buckets_;
  std::vector<size_t> head_;
  std::vector<char> dirty_;
  size_t cur_;
};

}  // namespace

template <typename Symbols, typename Queue>
void BpeModel::merge_all(Symbols& symbols, Queue& queue) const {
  for (size_t i = 0; i + 1 < symbols.size(); ++i) {
    const auto it = merges_.find(pair_key(symbols[i].c, symbols[i + 1].c));
    if (it != merges_.end())
      queue.push(Merge{it->second.first, static_cast<int64_t>(i), it->second.second});
  }
  Merge top;
  while (queue.pop(top)) {
    Symbol& cur = symbols[static_cast<size_t>(top.pos)];
    if (cur.len == 0 || cur.next == -1) continue;
    const int64_t next_pos = cur.next;
    const Symbol right = symbols[static_cast<size_t>(next_pos)];
    // Skip entries that went stale: the pair at pos no longer makes new_id.
    const auto target = merges_.find(pair_key(cur.c, right.c));
    if (target == merges_.end() || target->second.second != top.new_id) continue;
    cur.c = top.new_id;
    cur.len += right.len;
    cur.next = right.next;
    symbols[static_cast<size_t>(next_pos)].len = 0;
    if (right.next > -1 && static_cast<size_t>(right.next) < symbols.size())
      symbols[static_cast<size_t>(right.next)].prev = top.pos;
    if (cur.prev >= 0) {
      const auto it = merges_.find(pair_key(symbols[static_cast<size_t>(cur.prev)].c, cur.c));
      if (it != merges_.end()) queue.push(Merge{it->second.first, cur.prev, it->second.second});
    }
    if (cur.next >= 0 && static_cast<size_t>(cur.next) < symbols.size()) {
      const auto it = merges_.find(pair_key(cur.c, symbols[static_cast<size_t>(cur.next)].c));
      if (it != merges_.end()) queue.push(Merge{it->second.first, top.pos, it->second.second});
    }
  }
}

BpeModel::BpeModel(std::unordered_map<std::string, int32_t> vocab,
                   const std::vector<std::pair<std::string, std::string>>& merges, Options options,
                   const std::string& context)
    : vocab_(std::move(vocab)), opt_(std::move(options)) {
  int32_t max_id = -1;
  for (const auto& [tok, id] : vocab_) {
    if (id < 0)
      throw core::Error(core::str(context, ": negative id ", id, " for token '", tok, "'"));
    max_id = std::max(max_id, id);
  }
  id_to_token_.resize(static_cast<size_t>(max_id + 1));
  has_id_.assign(static_cast<size_t>(max_id + 1), false);
  for (const auto& [tok, id] : vocab_) {
    id_to_token_[static_cast<size_t>(id)] = tok;
    has_id_[static_cast<size_t>(id)] = true;
  }
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const auto& [a, b] = merges[rank];
    const int32_t ia = id(a), ib = id(b), inew = id(a + b);
    if (ia < 0 || ib < 0 || inew < 0)
      throw core::Error(core::str(context, ": merge #", rank, " '", a, " ", b,
                                  "' uses a token missing from the vocabulary"));
    merges_[pair_key(ia, ib)] = {static_cast<int32_t>(rank), inew};  // a repeated pair: last wins
  }
  num_ranks_ = merges.size();
  if (!opt_.unk_token.empty()) {
    unk_id_ = id(opt_.unk_token);
    if (unk_id_ < 0)
      throw core::Error(
          core::str(context, ": unk_token '", opt_.unk_token, "' is not in the vocabulary"));
  }
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    byte_ids_[b] = id(name);
  }
}

const std::string* BpeModel::token(int32_t i) const {
  if (i < 0 || static_cast<size_t>(i) >= id_to_token_.size() || !has_id_[static_cast<size_t>(i)])
    return nullptr;
  return &id_to_token_[static_cast<size_t>(i)];
}

int32_t BpeModel::id(const std::string& tok) const {
  const auto it = vocab_.find(tok);
  return it == vocab_.end() ? -1 : it->second;
}

void BpeModel::encode(std::string_view word, std::vector<int32_t>& out) const {
  if (word.empty()) return;
  if (opt_.ignore_merges) {
    const auto it = vocab_.find(std::string(word));
    if (it != vocab_.end()) {
      out.push_back(it->second);
      return;
    }
  }
  cache_.encode(word, out,
                [this](std::string_view w, std::vector<int32_t>& ids) { merge_word(w, ids); });
}

void BpeModel::merge_word(std::string_view w, std::vector<int32_t>& out) const {
  std::vector<Symbol> symbols;
  symbols.reserve(w.size());
  auto add = [&](int32_t c, size_t byte_len) {
    const int64_t n = static_cast<int64_t>(symbols.size());
    if (!symbols.empty()) symbols.back().next = n;
    symbols.push_back(Symbol{c, n - 1, -1, byte_len});
  };

  // Initial symbols: one per character, as in models/bpe/model.rs merge_word.
  bool have_unk = false;
  int32_t pending_unk = -1;
  size_t pending_unk_len = 0;
  std::string s;
  for (size_t i = 0; i < w.size();) {
    const size_t len =
        std::min<size_t>(unicode::utf8_length(static_cast<unsigned char>(w[i])), w.size() - i);
    const bool is_first = i == 0, is_last = i + len == w.size();
    s.assign(w.substr(i, len));
    i += len;
    if (!is_first && !opt_.continuing_subword_prefix.empty())
      s = opt_.continuing_subword_prefix + s;
    if (is_last && !opt_.end_of_word_suffix.empty()) s += opt_.end_of_word_suffix;
    const auto it = vocab_.find(s);
    if (it != vocab_.end()) {
      if (have_unk) {
        add(pending_unk, pending_unk_len);
        have_unk = false;
      }
      add(it->second, len);
      continue;
    }
    if (opt_.byte_fallback) {
      bool all = true;
      for (unsigned char b : s) all = all && byte_ids_[b] >= 0;
      if (all) {
        for (unsigned char b : s) add(byte_ids_[b], 1);
        continue;
      }
    }
    if (unk_id_ < 0) continue;  // as Hugging Face: dropped without an unk token
    if (have_unk && opt_.fuse_unk) {
      pending_unk_len += len;
    } else {
      if (have_unk) add(pending_unk, pending_unk_len);
      have_unk = true;
      pending_unk = unk_id_;
      pending_unk_len = len;
    }
  }
  if (have_unk) add(pending_unk, pending_unk_len);

  if (symbols.size() > kBucketQueueMinSymbols) {
    BucketQueue queue(num_ranks_);
    merge_all(symbols, queue);
  } else {
    HeapQueue queue;
    merge_all(symbols, queue);
  }
  for (const Symbol& sym : symbols)
    if (sym.len != 0) out.push_back(sym.c);
}

}  // namespace patch::text
