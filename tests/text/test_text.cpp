// Tokenizers against Hugging Face `tokenizers` and llama.cpp's algorithm
// (oracles from scripts/make_text_fixtures.py), regex engine and normalization.
#include "io/gguf.h"  // torch headers define CHECK: include them before catch.h

#include <cstring>
#include <ctime>

#include <nlohmann/json.hpp>

#include "catch.h"
#include "core/atomic_file.h"
#include "core/error.h"
#include "test_util.h"
#include "text/regex.h"
#include "text/tokenizer.h"
#include "text/unicode.h"

using namespace patch;
using json = nlohmann::json;

namespace {

const json& manifest() {
  static const json m = json::parse(core::read_file(test::fixtures_dir() + "/text/manifest.json"));
  return m;
}

std::vector<int32_t> read_ids(const std::string& path) {
  const std::string bytes = core::read_file(path);
  std::vector<int32_t> ids(bytes.size() / 4);
  std::memcpy(ids.data(), bytes.data(), ids.size() * 4);
  return ids;
}

std::unique_ptr<text::Tokenizer> load(const std::string& name) {
  const json& t = manifest()["tokenizers"][name];
  if (t["kind"] == "gguf")
    return text::load_gguf_tokenizer(io::GgufFile(t["path"].get<std::string>()));
  return text::load_hf_tokenizer(t["path"].get<std::string>());
}

// First index where two id sequences differ (for readable failures).
std::string first_difference(const std::vector<int32_t>& a, const std::vector<int32_t>& b) {
  size_t i = 0;
  while (i < a.size() && i < b.size() && a[i] == b[i]) ++i;
  return core::str("sizes ", a.size(), " vs ", b.size(), ", first difference at ", i);
}

// Every oracle case of one tokenizer: ids, decoding with and without special
// tokens; long texts also against the time budget.
void check_against_oracle(const std::string& name, bool round_trip) {
  const auto tok = load(name);
  const json& info = manifest()["tokenizers"][name];
  CHECK(tok->bos_id() == info["bos"].get<int32_t>());
  CHECK(tok->eos_id() == info["eos"].get<int32_t>());
  CHECK(tok->vocab_size() == info["vocab_size"].get<int64_t>());
  int cases = 0;
  for (const json& c : manifest()["cases"]) {
    if (c["tokenizer"] != name) continue;
    ++cases;
    const bool add_special = c["add_special"].get<bool>();
    if (c.contains("text")) {
      const std::string s = c["text"].get<std::string>();
      const std::vector<int32_t> expected = c["ids"].get<std::vector<int32_t>>();
      INFO(name << " " << c["name"] << " add_special=" << add_special
                << " text=" << json(s).dump());
      CHECK(tok->encode(s, add_special) == expected);
      if (c.contains("decoded")) {
        CHECK(tok->decode(expected, /*skip_special=*/false) == c["decoded"].get<std::string>());
        CHECK(tok->decode(expected, /*skip_special=*/true) == c["decoded_skip"].get<std::string>());
      }
      if (round_trip && c["name"].get<std::string>().rfind("short", 0) == 0 && !add_special &&
          std::stoi(c["name"].get<std::string>().substr(5)) < 16)
        CHECK(tok->decode(tok->encode(s, false), /*skip_special=*/false) == s);
    } else {
      const std::string s = core::read_file(c["text_file"].get<std::string>());
      const std::vector<int32_t> expected = read_ids(c["ids_file"].get<std::string>());
      // CPU time: the CI machine may be busy with other builds.
      const std::clock_t t0 = std::clock();
      const std::vector<int32_t> ids = tok->encode(s, add_special);
      const double secs = static_cast<double>(std::clock() - t0) / CLOCKS_PER_SEC;
      INFO(name << " " << c["name"] << ": " << first_difference(ids, expected) << ", " << secs
                << " s");
      CHECK(ids == expected);
      CHECK(secs < 2.0);
      if (c.contains("decoded_file"))
        CHECK(tok->decode(expected, /*skip_special=*/false) ==
              core::read_file(c["decoded_file"].get<std::string>()));
    }
  }
  CHECK(cases > 0);
}

}  // namespace

TEST_CASE("TinyStories-656K tokenizer.json equals Hugging Face tokenizers") {
  check_against_oracle("tinystories", /*round_trip=*/false);
}

TEST_CASE("byte-level BPE with the LLaMA-3 Split regex and ignore_merges equals tokenizers") {
  check_against_oracle("bl_llama3", /*round_trip=*/true);
}

TEST_CASE("byte-level BPE with NFC and the Qwen2 regex equals tokenizers") {
  check_against_oracle("bl_qwen2", /*round_trip=*/false);
}

TEST_CASE("byte-level BPE with GPT-2's ByteLevel regex equals tokenizers") {
  check_against_oracle("bl_gpt2", /*round_trip=*/true);
}

TEST_CASE("byte-level BPE with Digits and add_prefix_space equals tokenizers") {
  check_against_oracle("bl_smollm", /*round_trip=*/false);
}

TEST_CASE("Metaspace pre-tokenizers (prepend_scheme first and legacy split) equal tokenizers") {
  check_against_oracle("sp_metaspace_first", /*round_trip=*/false);
  check_against_oracle("sp_metaspace_legacy", /*round_trip=*/false);
}

TEST_CASE("GGUF gpt2 vocabularies tokenize like the tokenizer.json they came from") {
  // llama-bpe: the LLaMA-3 split and ignore_merges; qwen2: NFC and the Qwen2
  // split; gpt-2: GPT-2's ByteLevel regex. Control tokens are special, the
  // user-defined "<tool>" a plain added token.
  check_against_oracle("bl_llama3_gguf", /*round_trip=*/true);
  check_against_oracle("bl_qwen2_gguf", /*round_trip=*/false);
  check_against_oracle("bl_gpt2_gguf", /*round_trip=*/true);
}

TEST_CASE("GGUF gpt2 vocabularies: an unknown pre-tokenizer or no merges is a one-line error") {
  const std::string src = manifest()["tokenizers"]["bl_gpt2_gguf"]["path"].get<std::string>();
  const std::string bytes = core::read_file(src);
  test::TempDir dir;
  // Same-length edits of the metadata: the pre-tokenizer name, the merges key.
  auto edited = [&](const std::string& from, const std::string& to) {
    std::string s = bytes;
    const size_t at = s.find(from);
    REQUIRE(at != std::string::npos);
    REQUIRE(from.size() == to.size());
    s.replace(at, from.size(), to);
    const std::string path = dir.file("edited.gguf");
    core::write_file_atomic(path, s);
    return path;
  };
  auto error_of = [](const std::string& path) {
    try {
      text::load_gguf_tokenizer(io::GgufFile(path));
    } catch (const core::Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  std::string path = edited("gpt-2", "gpt-9");
  std::string err = error_of(path);
  INFO(err);
  CHECK(err.find(path + ": tokenizer.ggml.pre 'gpt-9' is not supported") == 0);
  CHECK(err.find('\n') == std::string::npos);
  path = edited("tokenizer.ggml.merges", "tokenizer.ggml.merged");
  err = error_of(path);
  INFO(err);
  CHECK(err.find(path + ": missing metadata key 'tokenizer.ggml.merges'") == 0);
}

TEST_CASE("GGUF SentencePiece vocabularies equal llama.cpp's algorithm") {
  check_against_oracle("stories260k", /*round_trip=*/false);
  check_against_oracle("llama2_tiny", /*round_trip=*/false);
}

TEST_CASE("stories260K decodes its reference greedy output and round-trips it") {
  const auto tok = load("stories260k");
  // PROVENANCE.md: greedy continuation of BOS; the decoder drops the space that
  // SentencePiece put in front of the first word.
  const std::vector<int32_t> ids = {403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421,
                                    395, 317, 426, 338, 401, 396, 267, 337, 410, 408, 419, 292};
  const std::string text = tok->decode(ids, /*skip_special=*/true);
  CHECK(text.rfind("Once upon a time, there was a little girl named Lily. She loved to play", 0) ==
        0);
  std::vector<int32_t> with_bos = {1};
  with_bos.insert(with_bos.end(), ids.begin(), ids.end());
  CHECK(tok->decode(with_bos, /*skip_special=*/true) == text);
  CHECK(tok->decode(with_bos, /*skip_special=*/false) == "<s> " + text);
  CHECK(tok->encode(text, /*add_special=*/true) == with_bos);
  CHECK(tok->bos_id() == 1);
  CHECK(tok->eos_id() == 2);
  CHECK(tok->vocab_size() == 512);
}

TEST_CASE("load_tokenizer_for picks the tokenizer of a model path") {
  const auto hf = text::load_tokenizer_for(test::data_path("models/tinystories-656k"));
  CHECK(hf->fingerprint().rfind("hf-bpe:", 0) == 0);
  CHECK(hf->encode("Once upon a time", /*add_special=*/true).front() == 1);
  const auto gg = text::load_tokenizer_for(test::data_path("models/stories260K/stories260K.gguf"));
  CHECK(gg->fingerprint().rfind("gguf-spm:", 0) == 0);
  CHECK(gg->fingerprint() != hf->fingerprint());
  CHECK(gg->fingerprint() ==
        text::load_tokenizer_for(test::data_path("models/stories260K/stories260K.gguf"))
            ->fingerprint());
  CHECK_THROWS_AS(text::load_tokenizer_for("/nonexistent/model"), core::Error);
}

TEST_CASE("unsupported tokenizer.json components are named in the error") {
  test::TempDir dir;
  json base =
      json::parse(core::read_file(test::data_path("models/tinystories-656k/tokenizer.json")));
  auto expect_error = [&](const json& j, const std::string& needle) {
    const std::string path = dir.file("tokenizer.json");
    core::write_file_atomic(path, j.dump());
    try {
      text::load_hf_tokenizer(path);
      FAIL("no error for " << needle);
    } catch (const core::Error& e) {
      const std::string msg = e.what();
      INFO(msg);
      CHECK(msg.find(path) != std::string::npos);
      CHECK(msg.find(needle) != std::string::npos);
    }
  };
  json j = base;
  j["model"]["type"] = "Unigram";
  expect_error(j, "Unigram");
  j = base;
  j["pre_tokenizer"] = {{"type", "BertPreTokenizer"}};
  expect_error(j, "BertPreTokenizer");
  j = base;
  j["normalizer"] = {{"type", "NFKC"}};
  expect_error(j, "NFKC");
  j = base;
  j["pre_tokenizer"] = {
      {"type", "Split"}, {"pattern", {{"Regex", "(?<=a)b"}}}, {"behavior", "Isolated"}};
  expect_error(j, "pre_tokenizer Split");
  j = base;
  j["decoder"] = {{"type", "WordPiece"}};
  expect_error(j, "WordPiece");
  j = base;
  j["model"]["merges"][0] = "e ▁ x";
  expect_error(j, "model.merges");
}

// Inputs libFuzzer found (fuzz_tokenizer_json, reduced to their cause): ids and
// indices that are not integers in range were converted by nlohmann's get<int>,
// undefined behaviour (UBSan: "outside the range of representable values").
TEST_CASE("token ids and indices that are not integers in range are a one-line error (fuzz regressions)") {
  test::TempDir dir;
  const json base = json::parse(core::read_file(test::data_path("models/tinystories-656k/tokenizer.json")));
  const std::string path = dir.file("tokenizer.json");
  auto error_of = [&](const std::string& text) {
    core::write_file_atomic(path, text);
    try {
      text::load_hf_tokenizer(path);
    } catch (const core::Error& e) {
      return std::string(e.what());
    }
    return std::string("(no error)");
  };
  // The fuzzer's input: a vocabulary id of 111 digits, which JSON parsers hold as a double.
  std::string huge = base.dump();
  const std::string key = "\"safe\":";
  const size_t at = huge.find(key);
  REQUIRE(at != std::string::npos);
  const size_t end = huge.find_first_of(",}", at);
  huge.replace(at + key.size(), end - at - key.size(), "1381" + std::string(107, '4'));
  std::string msg = error_of(huge);
  CHECK(msg.find(path + ": model.vocab:") == 0);
  CHECK(msg.find('\n') == std::string::npos);

  json j = base;
  j["model"]["vocab"]["safe"] = 2.5;
  CHECK(error_of(j.dump()).find("model.vocab") != std::string::npos);
  j = base;
  j["model"]["vocab"]["safe"] = -3;
  CHECK(error_of(j.dump()).find("non-negative integer") != std::string::npos);
  j = base;
  j["added_tokens"][0]["id"] = 4294967296.0;
  CHECK(error_of(j.dump()).find("added_tokens") != std::string::npos);
  j = base;
  j["added_tokens"][0]["id"] = 3000000000LL;  // beyond int32
  CHECK(error_of(j.dump()).find("added_tokens") != std::string::npos);
  j = base;
  j["decoder"] = {{"type", "Strip"}, {"content", " "}, {"start", 1e300}, {"stop", 0}};
  CHECK(error_of(j.dump()).find("'start' must be a non-negative integer") != std::string::npos);
  j = base;
  j["post_processor"] = {{"type", "BertProcessing"}, {"cls", {"[CLS]", 1e200}}, {"sep", {"[SEP]", 2}}};
  CHECK(error_of(j.dump()).find("cls") != std::string::npos);
}

TEST_CASE("regex engine agrees with Python re on the supported subset") {
  for (const json& c : manifest()["regex"]) {
    const text::Regex re(c["pattern"].get<std::string>());
    const std::u32string t = text::unicode::decode_utf8(c["text"].get<std::string>());
    std::vector<std::pair<size_t, size_t>> expected;
    for (const json& m : c["matches"])
      expected.emplace_back(m[0].get<size_t>(), m[1].get<size_t>());
    INFO(c["pattern"].get<std::string>() << " on " << c["text"].dump());
    CHECK(re.find_all(t) == expected);
  }
  // Oniguruma's \x{..}, which Python's re lacks.
  const text::Regex braced("\\x{48}\\x{1F600}+");
  CHECK(braced.find_all(U"H\U0001F600\U0001F600 H") ==
        std::vector<std::pair<size_t, size_t>>{{0, 3}});
  CHECK_THROWS_AS(text::Regex("a(?<=b)"), core::Error);
  CHECK_THROWS_AS(text::Regex("\\p{Foo}"), core::Error);
  CHECK_THROWS_AS(text::Regex("(a*)*"), core::Error);
  CHECK_THROWS_AS(text::Regex("[abc"), core::Error);
}

TEST_CASE("NFC and NFD equal Python's unicodedata") {
  namespace uc = text::unicode;
  for (const json& c : manifest()["normalization"]) {
    const std::u32string s = uc::decode_utf8(c[0].get<std::string>());
    INFO(c[0].dump());
    CHECK(uc::encode_utf8(uc::nfc(s)) == c[1].get<std::string>());
    CHECK(uc::encode_utf8(uc::nfd(s)) == c[2].get<std::string>());
  }
}

TEST_CASE("invalid UTF-8 passes through byte-level tokenizers unchanged") {
  const auto tok = load("bl_llama3");
  const std::string bad = "ok \xff\xfe bytes \xe2\x82 cut";
  CHECK(text::unicode::encode_utf8(text::unicode::decode_utf8(bad)) == bad);
  const std::vector<int32_t> ids = tok->encode(bad, /*add_special=*/false);
  CHECK(!ids.empty());
  // The decoder replaces invalid sequences with U+FFFD as Hugging Face does.
  CHECK(tok->decode(ids, /*skip_special=*/false) == text::unicode::utf8_lossy(bad));
}
