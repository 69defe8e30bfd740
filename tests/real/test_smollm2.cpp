// SmolLM2-135M-Instruct as people have it: a Q4_1 GGUF with a `gpt2` vocabulary
// (tokenizer.ggml.pre = smollm). Every number is checked against transformers
// loading the same file (scripts/smollm2_oracle.py).
#include "eval/perplexity.h"  // torch headers define CHECK: include them before catch.h
#include "io/checkpoint.h"
#include "io/gguf.h"
#include "model/decoder.h"
#include "text/tokenizer.h"

#include <cstring>
#include <map>

#include <nlohmann/json.hpp>

#include "catch.h"
#include "core/atomic_file.h"
#include "core/error.h"
#include "test_util.h"

using namespace patch;
using json = nlohmann::json;

namespace {

const json& oracle() {
  static const json m =
      json::parse(core::read_file(test::fixtures_dir() + "/smollm2/manifest.json"));
  return m;
}

// True (after printing why) when the GGUF is absent; the oracle must then agree.
bool skipped() {
  if (test::skip_without_smollm2()) return true;
  REQUIRE_FALSE(oracle()["absent"].get<bool>());
  return false;
}

std::vector<int32_t> read_ids(const std::string& path) {
  const std::string bytes = core::read_file(path);
  std::vector<int32_t> ids(bytes.size() / 4);
  std::memcpy(ids.data(), bytes.data(), ids.size() * 4);
  return ids;
}

std::string first_difference(const std::vector<int32_t>& a, const std::vector<int32_t>& b) {
  size_t i = 0;
  while (i < a.size() && i < b.size() && a[i] == b[i]) ++i;
  return core::str("sizes ", a.size(), " vs ", b.size(), ", first difference at ", i);
}

const text::Tokenizer& tokenizer() {
  static const auto tok = text::load_tokenizer_for(test::smollm2_gguf());
  return *tok;
}

}  // namespace

TEST_CASE("SmolLM2-135M GGUF: Q4_1, Q8_0 and F32 tensors and the model shape transformers reads") {
  if (skipped()) return;
  io::GgufFile g(test::smollm2_gguf());
  std::map<uint32_t, int> types;
  for (const auto& t : g.tensors()) ++types[t.ggml_type];
  CHECK(types == std::map<uint32_t, int>{{0, 61}, {3, 210}, {8, 1}});  // F32, Q4_1, Q8_0
  const io::Checkpoint ck = io::load_checkpoint(test::smollm2_gguf());
  const json& c = oracle()["config"];
  CHECK(ck.config.hidden_size == c["hidden_size"].get<int64_t>());
  CHECK(ck.config.intermediate_size == c["intermediate_size"].get<int64_t>());
  CHECK(ck.config.num_layers == c["num_hidden_layers"].get<int64_t>());
  CHECK(ck.config.num_heads == c["num_attention_heads"].get<int64_t>());
  CHECK(ck.config.num_kv_heads == c["num_key_value_heads"].get<int64_t>());
  CHECK(ck.config.vocab_size == c["vocab_size"].get<int64_t>());
  CHECK(ck.config.rope_theta == Approx(c["rope_theta"].get<double>()));
  CHECK(ck.config.rms_norm_eps == Approx(c["rms_norm_eps"].get<double>()));
  CHECK(ck.config.tie_word_embeddings == c["tie_word_embeddings"].get<bool>());
  CHECK(ck.tensors.at("model.layers.0.mlp.down_proj.weight").scalar_type() == at::kFloat);
  // Dequantized straight into the compute dtype: bfloat16 on a GPU.
  const io::Checkpoint bf = io::load_checkpoint(test::smollm2_gguf(), at::kBFloat16);
  const at::Tensor w32 = ck.tensors.at("model.layers.3.self_attn.q_proj.weight");
  const at::Tensor w16 = bf.tensors.at("model.layers.3.self_attn.q_proj.weight");
  CHECK(w16.scalar_type() == at::kBFloat16);
  CHECK(at::equal(w16, w32.to(at::kBFloat16)));
}

TEST_CASE("SmolLM2-135M GGUF tokenizer equals transformers' on WikiText-2, C4 and a torture text") {
  if (skipped()) return;
  const text::Tokenizer& tok = tokenizer();
  CHECK(tok.vocab_size() == 49152);
  CHECK(tok.bos_id() == oracle()["bos"].get<int32_t>());
  CHECK(tok.eos_id() == oracle()["eos"].get<int32_t>());
  for (const json& c : oracle()["cases"]) {
    const auto want = read_ids(c["ids_file"].get<std::string>());
    const auto got = tok.encode(core::read_file(c["text_file"].get<std::string>()), false);
    INFO(c["name"] << ": " << first_difference(got, want));
    CHECK(got == want);
  }
  const json docs = json::parse(core::read_file(oracle()["c4"]["docs_file"].get<std::string>()));
  const auto want = read_ids(oracle()["c4"]["ids_file"].get<std::string>());
  const json& lengths = oracle()["c4"]["lengths"];
  REQUIRE(docs.size() == lengths.size());
  size_t at = 0, mismatched = 0;
  for (size_t i = 0; i < docs.size(); ++i) {
    const auto got = tok.encode(docs[i].get<std::string>(), false);
    const size_t n = lengths[i].get<size_t>();
    if (got != std::vector<int32_t>(want.begin() + static_cast<long>(at),
                                    want.begin() + static_cast<long>(at + n)))
      ++mismatched;
    at += n;
  }
  INFO(mismatched << " of " << docs.size() << " C4 documents differ");
  CHECK(mismatched == 0);
  for (const json& t : oracle()["torture"]) {
    const std::string s = t["text"].get<std::string>();
    INFO(json(s).dump());
    CHECK(tok.encode(s, false) == t["ids"].get<std::vector<int32_t>>());
    CHECK(tok.encode(s, true) == t["with_special"].get<std::vector<int32_t>>());
    CHECK(tok.decode(t["ids"].get<std::vector<int32_t>>(), false) == t["decoded"].get<std::string>());
  }
  // Where the digit split of tokenizer.ggml.pre = smollm changes ids at all.
  CHECK(oracle()["digits_matter"].size() > 0);
}

TEST_CASE("SmolLM2-135M logits equal transformers' within 1e-3 of the logit range") {
  if (skipped()) return;
  const json& l = oracle()["logits"];
  const auto ids = l["tokens"].get<std::vector<int64_t>>();
  const std::string bytes = core::read_file(l["file"].get<std::string>());
  const int64_t n = static_cast<int64_t>(ids.size());
  at::Tensor want = at::empty({n, 49152}, at::kFloat);
  REQUIRE(bytes.size() == static_cast<size_t>(want.numel()) * 4);
  std::memcpy(want.data_ptr<float>(), bytes.data(), bytes.size());
  model::Decoder decoder(io::load_checkpoint(test::smollm2_gguf()), model::DecoderOptions{});
  const at::Tensor got =
      decoder.forward(at::tensor(ids, at::kLong).unsqueeze(0))[0].to(at::kFloat);
  const double range = (want.max() - want.min()).item<double>();
  const double diff = (got - want).abs().max().item<double>();
  INFO("max |difference| " << diff << ", logit range " << range);
  CHECK(range > 10.0);
  CHECK(diff <= 1e-3 * range);
}

TEST_CASE("SmolLM2-135M WikiText-2 test perplexity equals transformers' within 0.5%") {
  if (skipped()) return;
  const json& p = oracle()["perplexity"];
  model::Decoder decoder(io::load_checkpoint(test::smollm2_gguf()), model::DecoderOptions{});
  const auto ids = tokenizer().encode(
      core::read_file(test::data_path("text/wikitext-2-raw/wiki.test.raw")), false);
  eval::PerplexityOptions opts;
  opts.seq_len = p["seq_len"].get<int64_t>();
  opts.max_windows = p["windows"].get<int64_t>();
  opts.batch_size = 1;
  const auto r = eval::perplexity(decoder, ids.data(), static_cast<int64_t>(ids.size()), opts);
  INFO("ours " << r.perplexity << ", transformers " << p["perplexity"].get<double>());
  CHECK(r.predictions == p["predictions"].get<int64_t>());
  CHECK(r.perplexity == Approx(p["perplexity"].get<double>()).epsilon(0.005));
}
