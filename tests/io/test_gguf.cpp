// GGUF reading, GGUF -> ModelConfig and the GGUF -> Hugging Face mapping.
#include <cstring>
#include <set>

#include "io/checkpoint.h"
#include "io/gguf.h"
#include "io/safetensors.h"
#include "io_test_util.h"

using namespace patch;
using nlohmann::json;

namespace {

const char* const kStories = "models/stories260K/stories260K.gguf";
const char* const kTinyRandom = "models/llama-2-tiny-random/llama-2-tiny-random.gguf";

// Tensors agree with gguf-py's reading of the same file (shape, type, sum, first values).
void require_matches_gguf_py(const io::GgufFile& g, const json& ref) {
  REQUIRE(g.tensors().size() == ref["tensors"].size());
  for (auto it = ref["tensors"].begin(); it != ref["tensors"].end(); ++it) {
    INFO(it.key());
    const io::GgufTensorInfo* info = nullptr;
    for (const auto& t : g.tensors())
      if (t.name == it.key()) info = &t;
    REQUIRE(info);
    REQUIRE(info->ggml_type == (*it)["ggml_type"].get<uint32_t>());
    at::Tensor t = g.tensor(it.key());
    REQUIRE(t.sizes().vec() == test::shape_of((*it)["shape"]));
    at::Tensor d = t.to(at::kDouble).flatten();
    REQUIRE(d.sum().item<double>() == Approx((*it)["sum"].get<double>()).margin(1e-9));
    test::require_values(d.slice(0, 0, 8), (*it)["head"], it.key() + " head");
  }
}

void require_bad_gguf(const std::string& path, const std::string& part) {
  const std::string msg = test::error_of([&] { io::GgufFile g(path); });
  INFO(msg);
  REQUIRE(msg.find(path) == 0);
  REQUIRE(msg.find(part) != std::string::npos);
  REQUIRE(msg.find('\n') == std::string::npos);
}

}  // namespace

TEST_CASE("shared GGUF models: stories260K and llama-2-tiny-random") {
  SECTION("stories260K: header, metadata and tensors") {
    const json ref = test::read_json(test::io_fixture("shared_gguf.json"))[kStories];
    io::GgufFile g(test::data_path(kStories));
    REQUIRE(g.version() == 3);
    REQUIRE(g.tensors().size() == 48);
    const json& m = g.metadata();
    REQUIRE(m.size() == 19);
    REQUIRE(ref["kv_count"] == 19);
    REQUIRE(m["general.architecture"] == "llama");
    REQUIRE(m["llama.embedding_length"] == 64);
    REQUIRE(m["llama.feed_forward_length"] == 172);
    REQUIRE(m["llama.block_count"] == 5);
    REQUIRE(m["llama.attention.head_count"] == 8);
    REQUIRE(m["llama.attention.head_count_kv"] == 4);
    REQUIRE(m["llama.rope.dimension_count"] == 8);
    REQUIRE(m["llama.context_length"] == 2048);
    REQUIRE(m["llama.attention.layer_norm_rms_epsilon"].get<double>() == Approx(1e-5));
    REQUIRE_FALSE(m.contains("llama.rope.freq_base"));
    REQUIRE(m["tokenizer.ggml.model"] == "llama");
    REQUIRE(m["tokenizer.ggml.tokens"].size() == 512);
    REQUIRE(m["tokenizer.ggml.scores"].size() == 512);
    REQUIRE(m["tokenizer.ggml.bos_token_id"] == 1);
    REQUIRE(m["tokenizer.ggml.eos_token_id"] == 2);
    REQUIRE(g.tensors()[0].dims.size() == 2);
    REQUIRE(g.contains("token_embd.weight"));
    at::Tensor embd = g.tensor("token_embd.weight");
    REQUIRE(embd.sizes().vec() == std::vector<int64_t>{512, 64});
    REQUIRE(embd.scalar_type() == at::kFloat);
    REQUIRE(embd.data_ptr() == g.tensor("token_embd.weight").data_ptr());  // a view, no copy
    REQUIRE(at::equal(embd, g.tensor("output.weight")));
    REQUIRE(g.tensor("blk.0.ffn_down.weight").sizes().vec() == std::vector<int64_t>{64, 172});
    require_matches_gguf_py(g, ref);
    int64_t params = 0;
    for (const auto& t : g.tensors()) params += g.tensor(t.name).numel();
    REQUIRE(params == 292800);
  }
  SECTION("stories260K as a checkpoint") {
    io::Checkpoint ck = io::load_checkpoint(test::data_path(kStories));
    REQUIRE(ck.format == "gguf");
    REQUIRE(ck.gguf);
    REQUIRE(ck.tensor_file.empty());
    const io::ModelConfig& c = ck.config;
    REQUIRE(c.model_type == "llama");
    REQUIRE(c.hidden_size == 64);
    REQUIRE(c.intermediate_size == 172);
    REQUIRE(c.num_layers == 5);
    REQUIRE(c.num_heads == 8);
    REQUIRE(c.num_kv_heads == 4);
    REQUIRE(c.head_dim == 8);
    REQUIRE(c.vocab_size == 512);
    REQUIRE(c.max_position_embeddings == 2048);
    REQUIRE(c.rms_norm_eps == Approx(1e-5));
    REQUIRE(c.rope_theta == 10000.0);
    REQUIRE_FALSE(c.tie_word_embeddings);  // output.weight is stored (an untied copy)
    REQUIRE_FALSE(c.attention_bias);
    REQUIRE(c.bos_token_id == 1);
    REQUIRE(c.eos_token_id == 2);
    REQUIRE(c.torch_dtype == "float32");
    REQUIRE(c.raw.is_null());
    REQUIRE(ck.tensors.size() == 48);
    REQUIRE(at::equal(ck.tensors.at("model.embed_tokens.weight"), ck.tensors.at("lm_head.weight")));
    REQUIRE(ck.tensors.at("model.layers.4.mlp.down_proj.weight").sizes().vec() ==
            std::vector<int64_t>{64, 172});
    REQUIRE(ck.tensors.at("model.layers.0.self_attn.k_proj.weight").sizes().vec() ==
            std::vector<int64_t>{32, 64});
    // v is stored as is; q rows are only reordered within each head
    REQUIRE(at::equal(ck.tensors.at("model.layers.2.self_attn.v_proj.weight"),
                      ck.gguf->tensor("blk.2.attn_v.weight")));
    at::Tensor q = ck.tensors.at("model.layers.2.self_attn.q_proj.weight");
    at::Tensor raw_q = ck.gguf->tensor("blk.2.attn_q.weight");
    REQUIRE_FALSE(at::equal(q, raw_q));
    REQUIRE(at::equal(std::get<0>(q.sum(1).sort()), std::get<0>(raw_q.sum(1).sort())));
  }
  SECTION("llama-2-tiny-random: F16 tensors") {
    const json ref = test::read_json(test::io_fixture("shared_gguf.json"))[kTinyRandom];
    io::GgufFile g(test::data_path(kTinyRandom));
    REQUIRE(g.metadata().size() == ref["kv_count"].get<size_t>());
    REQUIRE(g.metadata().size() == 18);
    at::Tensor embd = g.tensor("token_embd.weight");
    REQUIRE(embd.scalar_type() == at::kHalf);
    REQUIRE(embd.sizes().vec() == std::vector<int64_t>{32000, 8});
    REQUIRE(g.tensor("output_norm.weight").scalar_type() == at::kFloat);
    require_matches_gguf_py(g, ref);

    io::Checkpoint ck = io::load_checkpoint(test::data_path(kTinyRandom));
    REQUIRE(ck.config.vocab_size == 32000);
    REQUIRE(ck.config.num_heads == 2);
    REQUIRE(ck.config.head_dim == 4);
    REQUIRE(ck.config.max_position_embeddings == 4096);
    REQUIRE(ck.config.torch_dtype == "float16");
    REQUIRE(ck.tensors.size() == 12);
    REQUIRE(ck.tensors.at("model.layers.0.self_attn.q_proj.weight").scalar_type() == at::kHalf);
  }
}

TEST_CASE("GGUF files written by gguf-py and the GGUF -> HF mapping") {
  SECTION("every metadata type, F32/F16/BF16/Q8_0 tensors") {
    const json expected = test::read_json(test::io_fixture("small.json"));
    io::GgufFile g(test::io_fixture("small.gguf"));
    REQUIRE(g.version() == 3);
    const json& m = g.metadata();
    REQUIRE(m["general.architecture"] == "testarch");
    REQUIRE(m["general.alignment"] == 64);
    for (auto it = expected["metadata"].begin(); it != expected["metadata"].end(); ++it) {
      INFO(it.key());
      REQUIRE(m.contains(it.key()));
      if (it->is_number_float() || (it->is_array() && (*it)[0].is_number_float()))
        REQUIRE(m[it.key()].dump() == it->dump());
      else
        REQUIRE(m[it.key()] == *it);
    }
    REQUIRE(m["t.u64"].get<uint64_t>() == (uint64_t{1} << 60));
    REQUIRE(m["t.i64"].get<int64_t>() == -(int64_t{1} << 60));
    REQUIRE(m["t.bool"].is_boolean());
    for (auto it = expected["tensors"].begin(); it != expected["tensors"].end(); ++it) {
      INFO(it.key());
      REQUIRE(g.contains(it.key()));
      at::Tensor t = g.tensor(it.key());
      REQUIRE(t.sizes().vec() == test::shape_of((*it)["shape"]));
      test::require_values(t, (*it)["values"], it.key());
    }
    REQUIRE(g.tensor("m.q8").scalar_type() == at::kFloat);
    REQUIRE(g.tensor("m.bf16").scalar_type() == at::kBFloat16);
    REQUIRE(test::error_of([&] {
              io::load_checkpoint(test::io_fixture("small.gguf"));
            }).find("general.architecture 'testarch' is not supported") != std::string::npos);
  }
  SECTION("llama: HF names, tying, llama.cpp's q/k permutation undone") {
    io::Checkpoint ck = io::load_checkpoint(test::io_fixture("tiny_llama.gguf"));
    io::SafetensorsFile expected(test::io_fixture("tiny_llama_expected.safetensors"));
    REQUIRE(ck.tensors.size() == expected.entries().size() + 1);
    for (const auto& e : expected.entries()) {
      INFO(e.name);
      REQUIRE(ck.tensors.count(e.name));
      REQUIRE(at::equal(ck.tensors.at(e.name), expected.tensor(e.name)));
    }
    REQUIRE(ck.tensors.at("lm_head.weight").data_ptr() ==
            ck.tensors.at("model.embed_tokens.weight").data_ptr());
    const io::ModelConfig& c = ck.config;
    REQUIRE(c.tie_word_embeddings);
    REQUIRE(c.attention_bias);
    REQUIRE(c.rope_theta == 50000.0);
    REQUIRE(c.vocab_size == 40);
    REQUIRE(c.num_kv_heads == 2);
    REQUIRE(c.max_position_embeddings == 256);
  }
  SECTION("gguf_to_hf_name") {
    CHECK(io::gguf_to_hf_name("token_embd.weight") == "model.embed_tokens.weight");
    CHECK(io::gguf_to_hf_name("output_norm.weight") == "model.norm.weight");
    CHECK(io::gguf_to_hf_name("output.weight") == "lm_head.weight");
    CHECK(io::gguf_to_hf_name("blk.7.attn_q.weight") == "model.layers.7.self_attn.q_proj.weight");
    CHECK(io::gguf_to_hf_name("blk.12.attn_k.bias") == "model.layers.12.self_attn.k_proj.bias");
    CHECK(io::gguf_to_hf_name("blk.0.attn_v.weight") == "model.layers.0.self_attn.v_proj.weight");
    CHECK(io::gguf_to_hf_name("blk.0.attn_output.weight") ==
          "model.layers.0.self_attn.o_proj.weight");
    CHECK(io::gguf_to_hf_name("blk.3.attn_norm.weight") == "model.layers.3.input_layernorm.weight");
    CHECK(io::gguf_to_hf_name("blk.3.ffn_norm.weight") ==
          "model.layers.3.post_attention_layernorm.weight");
    CHECK(io::gguf_to_hf_name("blk.1.ffn_gate.weight") == "model.layers.1.mlp.gate_proj.weight");
    CHECK(io::gguf_to_hf_name("blk.1.ffn_up.weight") == "model.layers.1.mlp.up_proj.weight");
    CHECK(io::gguf_to_hf_name("blk.1.ffn_down.weight") == "model.layers.1.mlp.down_proj.weight");
    CHECK(io::gguf_to_hf_name("rope_freqs.weight").empty());
    CHECK(io::gguf_to_hf_name("blk.x.attn_q.weight").empty());
    CHECK(io::gguf_to_hf_name("blk.1.attn_q.scale").empty());
    CHECK(io::gguf_to_hf_name("blk..attn_q.weight").empty());
  }
}

TEST_CASE("corrupt GGUF files fail with one-line errors") {
  const std::string good = core::read_file(test::io_fixture("small.gguf"));
  test::TempDir dir;
  const std::string path = dir.file("bad.gguf");
  auto patched = [&](size_t offset, const void* bytes, size_t n) {
    std::string s = good;
    std::memcpy(&s[offset], bytes, n);
    return s;
  };
  const uint64_t huge = uint64_t{1} << 60;

  SECTION("bad magic") {
    test::write_bytes(path, patched(0, "GGUX", 4));
    require_bad_gguf(path, "not a GGUF file (bad magic)");
  }
  SECTION("bad version") {
    const uint32_t v = 7;
    test::write_bytes(path, patched(4, &v, 4));
    require_bad_gguf(path, "unsupported GGUF version 7 (expected 2 or 3)");
  }
  SECTION("absurd tensor count") {
    test::write_bytes(path, patched(8, &huge, 8));
    require_bad_gguf(path, "tensor count 1152921504606846976 exceeds");
  }
  SECTION("absurd key/value count") {
    test::write_bytes(path, patched(16, &huge, 8));
    require_bad_gguf(path, "metadata count 1152921504606846976 exceeds");
  }
  SECTION("absurd string length") {
    test::write_bytes(path, patched(24, &huge, 8));
    require_bad_gguf(path, "truncated: metadata key #0 (length 1152921504606846976)");
  }
  SECTION("truncated metadata") {
    test::write_bytes(path, good.substr(0, 300));
    require_bad_gguf(path, "truncated");
  }
  SECTION("truncated header") {
    test::write_bytes(path, good.substr(0, 10));
    require_bad_gguf(path, "truncated: tensor count needs 8 bytes at offset 8");
  }
  SECTION("truncated tensor data") {
    test::write_bytes(path, good.substr(0, good.size() - 60));
    require_bad_gguf(path, "tensor 'v.f32': data at offset");
  }
  SECTION("every single-byte corruption: an error or a readable file, never a crash") {
    for (size_t i = 0; i < good.size(); ++i) {
      std::string s = good;
      s[i] = static_cast<char>(s[i] ^ 0xA5);
      test::write_bytes(path, s);
      try {
        io::GgufFile g(path);
        for (const auto& t : g.tensors()) g.tensor(t.name);
      } catch (const core::Error&) {
      }
    }
  }
  SECTION("empty file") {
    test::write_bytes(path, "");
    require_bad_gguf(path, "bad magic");
  }
}

TEST_CASE("quantized GGUF tensors dequantize exactly as gguf-py does") {
  io::GgufFile g(test::io_fixture("quants.gguf"));
  io::SafetensorsFile expected(test::io_fixture("quants_expected.safetensors"));
  const std::vector<std::string> types = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                                          "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"};
  std::set<std::string> seen;
  for (const auto& e : expected.entries()) {
    INFO(e.name);
    const at::Tensor want = expected.tensor(e.name);
    const at::Tensor got = g.tensor(e.name);
    REQUIRE(got.scalar_type() == at::kFloat);
    REQUIRE(got.sizes().equals(want.sizes()));
    REQUIRE(at::isfinite(want).all().item<bool>());
    // Bit for bit: the same float32 operations in the same order.
    REQUIRE(at::equal(got, want));
    // Into bfloat16 directly: what rounding the float32 values gives.
    REQUIRE(at::equal(g.tensor(e.name, at::kBFloat16), want.to(at::kBFloat16)));
    seen.insert(e.name.substr(e.name.find('.') + 1));
  }
  REQUIRE(seen == std::set<std::string>(types.begin(), types.end()));
  const std::string msg = test::error_of([&] { g.tensor("unsupported.IQ4_NL"); });
  INFO(msg);
  REQUIRE(msg.find("tensor 'unsupported.IQ4_NL' has ggml type IQ4_NL, which is not supported") !=
          std::string::npos);
  REQUIRE(msg.find('\n') == std::string::npos);
}

TEST_CASE("a truncated quantized block names the tensor") {
  const std::string good = core::read_file(test::io_fixture("quants.gguf"));
  test::TempDir dir;
  const std::string path = dir.file("cut.gguf");
  // The last tensor is the IQ4_NL one (36 bytes, padded); cut into the Q6_K before it.
  test::write_bytes(path, good.substr(0, good.size() - 100));
  require_bad_gguf(path, "tensor 'raw.Q6_K': data at offset");
}
