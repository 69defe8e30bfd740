// Corpus loading, .bin token files, the token cache, packing, split and order.
#include "data/dataset.h"  // torch headers define CHECK: include them before catch.h
#include "data/xz_stream.h"

#include <sys/stat.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>

#include "catch.h"
#include "core/atomic_file.h"
#include "core/error.h"
#include "test_util.h"

using namespace patch;
namespace fs = std::filesystem;

namespace {

const text::Tokenizer& tinystories() {
  static const auto tok = text::load_tokenizer_for(test::data_path("models/tinystories-656k"));
  return *tok;
}

// The stream load_tokens must produce, built directly from the tokenizer.
std::vector<int32_t> expected_stream(const std::vector<std::string>& docs,
                                     const text::Tokenizer& tok) {
  std::vector<int32_t> out;
  for (const std::string& d : docs) {
    const auto ids = tok.encode(d, /*add_special=*/false);
    out.insert(out.end(), ids.begin(), ids.end());
    out.push_back(tok.eos_id());
  }
  return out;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const core::Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("JSONL: the configured field is tokenized and a bad line is reported with file:line") {
  test::TempDir dir;
  const std::string path = dir.file("docs.jsonl");
  core::write_file_atomic(path,
                          "{\"text\": \"Once upon a time.\", \"body\": \"Tom ran.\"}\n"
                          "\n"
                          "{\"text\": \"A cat sat.\", \"body\": \"Sue saw a dog.\"}\n");
  data::DataOptions opts;
  CHECK(data::load_tokens(path, tinystories(), opts).to_vector() ==
        expected_stream({"Once upon a time.", "A cat sat."}, tinystories()));
  opts.jsonl_field = "body";
  CHECK(data::load_tokens(path, tinystories(), opts).to_vector() ==
        expected_stream({"Tom ran.", "Sue saw a dog."}, tinystories()));

  core::write_file_atomic(path, "{\"text\": \"ok\"}\n{\"text\": \"ok\"}\n{\"text\": oops}\n");
  std::string err = error_of([&] { data::load_tokens(path, tinystories(), data::DataOptions{}); });
  CHECK(err.find(path + ":3: invalid JSON") == 0);
  core::write_file_atomic(path, "{\"text\": \"ok\"}\n{\"body\": \"no text\"}\n");
  err = error_of([&] { data::load_tokens(path, tinystories(), data::DataOptions{}); });
  CHECK(err.find(path + ":2: expected an object with a string field 'text'") == 0);
  core::write_file_atomic(path, "{\"text\": 5}\n");
  err = error_of([&] { data::load_tokens(path, tinystories(), data::DataOptions{}); });
  CHECK(err.find(path + ":1:") == 0);
  data::DataOptions bad;
  bad.format = "csv";
  CHECK_THROWS_AS(data::load_tokens(path, tinystories(), bad), core::ConfigError);
}

TEST_CASE(".bin token files round-trip as uint16 and uint32 and bad headers are refused") {
  test::TempDir dir;
  const std::vector<int32_t> small = {0, 1, 2, 65535, 7, 300};
  const std::vector<int32_t> large = {0, 65536, 1 << 20, 2147483647, 5};
  const std::string p16 = dir.file("a.bin"), p32 = dir.file("b.bin");
  data::write_token_file(p16, small, data::TokenDtype::kUInt16);
  data::write_token_file(p32, large, data::TokenDtype::kUInt32);
  CHECK(fs::file_size(p16) == 24 + 2 * small.size());
  CHECK(fs::file_size(p32) == 24 + 4 * large.size());
  CHECK(data::TokenStream::open(p16).to_vector() == small);
  const data::TokenStream s32 = data::TokenStream::open(p32);
  CHECK(s32.to_vector() == large);
  CHECK(s32.path() == p32);
  std::vector<int64_t> wide(3);
  s32.read(1, 3, wide.data());
  CHECK(wide == std::vector<int64_t>{65536, 1 << 20, 2147483647});
  CHECK_THROWS_AS(s32.read(4, 2, wide.data()), core::Error);

  // The header layout, byte by byte.
  const std::string bytes = core::read_file(p16);
  CHECK(bytes.substr(0, 4) == "PTOK");
  uint32_t version, width;
  uint64_t count;
  std::memcpy(&version, bytes.data() + 4, 4);
  std::memcpy(&width, bytes.data() + 8, 4);
  std::memcpy(&count, bytes.data() + 16, 8);
  CHECK(version == 1);
  CHECK(width == 2);
  CHECK(count == small.size());

  CHECK_THROWS_AS(data::write_token_file(dir.file("c.bin"), {70000}, data::TokenDtype::kUInt16),
                  core::Error);
  CHECK_FALSE(fs::exists(dir.file("c.bin")));

  auto expect_refused = [&](const std::string& contents, const std::string& needle) {
    const std::string p = dir.file("bad.bin");
    core::write_file_atomic(p, contents);
    const std::string err = error_of([&] { data::TokenStream::open(p); });
    INFO(err);
    CHECK(err.find(p + ": not a token file") == 0);
    CHECK(err.find(needle) != std::string::npos);
  };
  expect_refused("short", "header");
  expect_refused("NOPE" + bytes.substr(4), "magic");
  std::string v2 = bytes;
  v2[4] = 2;
  expect_refused(v2, "version 2");
  std::string w3 = bytes;
  w3[8] = 3;
  expect_refused(w3, "bytes per token 3");
  expect_refused(bytes.substr(0, bytes.size() - 1), "header says 6 tokens");

  // A .bin corpus is checked against the tokenizer's vocabulary.
  data::write_token_file(dir.file("big.bin"), {1, 5000}, data::TokenDtype::kUInt16);
  CHECK(error_of([&] {
          data::load_tokens(dir.file("big.bin"), tinystories(), data::DataOptions{});
        }).find("outside the tokenizer's vocabulary of 2048") != std::string::npos);
  data::write_token_file(dir.file("ok.bin"), {1, 5, 2}, data::TokenDtype::kUInt16);
  CHECK(data::load_tokens(dir.file("ok.bin"), tinystories(), data::DataOptions{}).to_vector() ==
        std::vector<int32_t>{1, 5, 2});
}

TEST_CASE("packing puts EOS between documents and blocks are seq_len + 1 with the shift") {
  test::TempDir dir;
  const std::string path = dir.file("stories.txt");
  core::write_file_atomic(
      path,
      "Tom had a ball.\nHe liked it.\n<|endoftext|>\nSue had a cat.\r\n<|endoftext|>\r\n"
      "\n<|endoftext|>\nThe end.");
  data::DataOptions opts;
  opts.document_separator = "<|endoftext|>";
  const std::vector<int32_t> stream = data::load_tokens(path, tinystories(), opts).to_vector();
  CHECK(stream == expected_stream({"Tom had a ball.\nHe liked it.", "Sue had a cat.\r", "The end."},
                                  tinystories()));
  CHECK(std::count(stream.begin(), stream.end(), tinystories().eos_id()) == 3);
  CHECK(stream.back() == tinystories().eos_id());

  // Without a separator the whole file is one document.
  CHECK(data::load_tokens(path, tinystories(), data::DataOptions{}).to_vector() ==
        expected_stream({core::read_file(path)}, tinystories()));

  const int64_t seq_len = 7;
  const data::BlockDataset ds(data::TokenStream(stream), seq_len);
  const int64_t n = static_cast<int64_t>(stream.size());
  REQUIRE(ds.num_blocks() == (n - 1) / seq_len);
  REQUIRE(ds.num_blocks() >= 3);
  std::vector<int64_t> all(static_cast<size_t>(ds.num_blocks()));
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<int64_t>(i);
  const at::Tensor b = ds.blocks(all);
  REQUIRE(b.sizes() == at::IntArrayRef({ds.num_blocks(), seq_len + 1}));
  REQUIRE(b.scalar_type() == at::kLong);
  for (int64_t i = 0; i < ds.num_blocks(); ++i)
    for (int64_t j = 0; j <= seq_len; ++j)
      CHECK(b[i][j].item<int64_t>() == stream[static_cast<size_t>(i * seq_len + j)]);
  // The last target of a block is the first input of the next.
  CHECK(b[0][seq_len].item<int64_t>() == b[1][0].item<int64_t>());
  CHECK_THROWS_AS(ds.blocks({ds.num_blocks()}), core::Error);
  CHECK_THROWS_AS(data::BlockDataset(data::TokenStream(stream), 0), core::ConfigError);
}

TEST_CASE("TinyStories train text: one EOS per document") {
  data::DataOptions opts;
  opts.document_separator = "<|endoftext|>";
  const data::TokenStream s = data::load_tokens(
      test::data_path("text/tinystories/tinystories_train_first2MiB.txt"), tinystories(), opts);
  const std::vector<int32_t> v = s.to_vector();
  // 2316 separator lines, so 2317 documents.
  CHECK(std::count(v.begin(), v.end(), tinystories().eos_id()) == 2317);
  CHECK(std::count(v.begin(), v.end(), tinystories().bos_id()) == 0);
}

TEST_CASE("epoch order: same seed gives the same order and another seed or epoch another one") {
  std::vector<int64_t> idx(100);
  for (size_t i = 0; i < idx.size(); ++i) idx[i] = static_cast<int64_t>(i) * 3;
  const auto a = data::epoch_order(idx, 42, 0);
  CHECK(a == data::epoch_order(idx, 42, 0));
  CHECK(a != data::epoch_order(idx, 43, 0));
  CHECK(a != data::epoch_order(idx, 42, 1));
  CHECK(a != idx);
  auto sorted = a;
  std::sort(sorted.begin(), sorted.end());
  CHECK(sorted == idx);
  CHECK(data::epoch_order({}, 1, 0).empty());
}

TEST_CASE("train/validation split is disjoint and covering") {
  const data::Split s = data::split_blocks(10, 3);
  CHECK(s.train == std::vector<int64_t>{0, 1, 2, 3, 4, 5, 6});
  CHECK(s.valid == std::vector<int64_t>{7, 8, 9});
  std::set<int64_t> all(s.train.begin(), s.train.end());
  all.insert(s.valid.begin(), s.valid.end());
  CHECK(all.size() == 10);
  CHECK(data::split_blocks(5, 0).train.size() == 5);
  CHECK(data::split_blocks(5, 5).valid.size() == 5);
  CHECK_THROWS_AS(data::split_blocks(5, 6), core::ConfigError);
  CHECK_THROWS_AS(data::split_blocks(5, -1), core::ConfigError);
}

TEST_CASE("token cache: a hit gives identical tokens and a changed file is retokenized") {
  test::TempDir dir;
  const std::string path = dir.file("corpus.txt");
  core::write_file_atomic(path, "One day a frog sang.\n@@\nThe sun was hot.\n");
  data::DataOptions opts;
  opts.document_separator = "@@";
  opts.cache_dir = dir.file("cache");
  const data::TokenStream first = data::load_tokens(path, tinystories(), opts);
  const std::vector<int32_t> expected =
      expected_stream({"One day a frog sang.", "The sun was hot."}, tinystories());
  CHECK(first.to_vector() == expected);
  REQUIRE(first.path().rfind(opts.cache_dir + "/", 0) == 0);  // memory-mapped from the cache
  const auto files = [&] {
    return static_cast<size_t>(
        std::distance(fs::directory_iterator(opts.cache_dir), fs::directory_iterator()));
  };
  CHECK(files() == 1);
  struct stat before {};
  ::stat(first.path().c_str(), &before);

  const data::TokenStream second = data::load_tokens(path, tinystories(), opts);
  CHECK(second.path() == first.path());
  CHECK(second.to_vector() == expected);
  struct stat after {};
  ::stat(second.path().c_str(), &after);
  CHECK(after.st_ino == before.st_ino);  // not rewritten
  CHECK(files() == 1);

  // Other options or another tokenizer get their own entry.
  data::DataOptions whole = opts;
  whole.document_separator.clear();
  CHECK(data::load_tokens(path, tinystories(), whole).path() != first.path());

  // Same size, other contents: a new key, new tokens.
  core::write_file_atomic(path, "One day a frog sang.\n@@\nThe sun was red.\n");
  const data::TokenStream third = data::load_tokens(path, tinystories(), opts);
  CHECK(third.path() != first.path());
  CHECK(third.to_vector() ==
        expected_stream({"One day a frog sang.", "The sun was red."}, tinystories()));
  CHECK(first.to_vector() == expected);  // the old mapping stays valid
}

TEST_CASE("WikiText-2 evaluation text equals Hugging Face's encoding of the whole file") {
  const std::vector<int32_t> ids =
      data::tokenize_eval_text(test::data_path("text/wikitext-2-raw/wiki.test.raw"), tinystories());
  const std::string bytes =
      core::read_file(test::fixtures_dir() + "/text/tinystories/wikitext2_test.i32");
  std::vector<int32_t> expected(bytes.size() / 4);
  std::memcpy(expected.data(), bytes.data(), bytes.size());
  CHECK(ids.size() == expected.size());
  CHECK(ids == expected);
  CHECK(ids.front() != tinystories().bos_id());
}

TEST_CASE(".xz corpora stream to the tokens of their decompressed text") {
  REQUIRE(data::xz_supported());
  test::TempDir dir;
  const auto xz = [](const std::string& args) {
    REQUIRE(std::system(("xz " + args).c_str()) == 0);  // the xz tool is the oracle
  };
  SECTION("text with separators, and the token cache keyed by the compressed file") {
    const std::string plain = dir.file("corpus.txt");
    std::string body;
    for (int i = 0; i < 2000; ++i)
      body += core::str("Story ", i, ": a frog sang to the moon.\n<|endoftext|>\n");
    core::write_file_atomic(plain, body);
    xz("-k -T1 '" + plain + "'");
    data::DataOptions opts;
    opts.document_separator = "<|endoftext|>";
    const auto want = data::load_tokens(plain, tinystories(), opts).to_vector();
    REQUIRE(want.size() > 20000);
    CHECK(data::load_tokens(plain + ".xz", tinystories(), opts).to_vector() == want);
    opts.cache_dir = dir.file("cache");
    const data::TokenStream cached = data::load_tokens(plain + ".xz", tinystories(), opts);
    CHECK(cached.to_vector() == want);
    REQUIRE(cached.path().rfind(opts.cache_dir + "/", 0) == 0);
    // Other contents under the same name: a new cache entry with the new tokens.
    core::write_file_atomic(plain, "A dog barked.\n<|endoftext|>\n");
    fs::remove(plain + ".xz");
    xz("-k -T1 '" + plain + "'");
    const data::TokenStream changed = data::load_tokens(plain + ".xz", tinystories(), opts);
    CHECK(changed.path() != cached.path());
    CHECK(changed.to_vector() == expected_stream({"A dog barked."}, tinystories()));
  }
  SECTION("JSONL by the extension under .xz, and the shared WebText file") {
    const std::string shared = test::data_path("text/extra/web_text.jsonl.xz");
    const std::string plain = dir.file("web_text.jsonl");
    REQUIRE(std::system(core::str("xz -dc '", shared, "' > '", plain, "'").c_str()) == 0);
    data::DataOptions opts;
    const auto want = data::load_tokens(plain, tinystories(), opts).to_vector();
    REQUIRE(want.size() > 100000);
    CHECK(data::load_tokens(shared, tinystories(), opts).to_vector() == want);
  }
  SECTION("corrupt or truncated .xz data names the file") {
    const std::string plain = dir.file("t.txt");
    core::write_file_atomic(plain, std::string(100000, 'a') + "\n");
    xz("-k -T1 '" + plain + "'");
    const std::string good = core::read_file(plain + ".xz");
    const std::string cut = dir.file("cut.txt.xz");
    core::write_file_atomic(cut, good.substr(0, good.size() / 2));
    std::string err = error_of([&] { data::load_tokens(cut, tinystories(), data::DataOptions{}); });
    CHECK(err.find(cut + ": corrupt or truncated xz data") == 0);
    const std::string junk = dir.file("junk.txt.xz");
    core::write_file_atomic(junk, "not xz at all");
    err = error_of([&] { data::load_tokens(junk, tinystories(), data::DataOptions{}); });
    CHECK(err.find(junk + ": corrupt or truncated xz data") == 0);
  }
}
