// safetensors reading/writing, HF checkpoints and config.json parsing.
#include <cstdio>
#include <cstring>
#include <filesystem>

#include "io/checkpoint.h"
#include "io/model_config.h"
#include "io/safetensors.h"
#include "io_test_util.h"

namespace fs = std::filesystem;
using namespace patch;
using nlohmann::json;

namespace {

std::string le64(uint64_t v) {
  return std::string(reinterpret_cast<const char*>(&v), 8);
}

// A safetensors file from a raw header string and `data_bytes` zero bytes.
std::string raw_safetensors(const std::string& header, size_t data_bytes) {
  return le64(header.size()) + header + std::string(data_bytes, '\0');
}

// Expects a one-line core::Error naming the file and containing `part`.
void require_bad_file(const std::string& path, const std::string& part) {
  const std::string msg = test::error_of([&] { io::SafetensorsFile f(path); });
  INFO(msg);
  REQUIRE(msg.find(path) == 0);
  REQUIRE(msg.find(part) != std::string::npos);
  REQUIRE(msg.find('\n') == std::string::npos);
}

}  // namespace

TEST_CASE("safetensors written by Python read back exactly - as views of the mapping") {
  SECTION("mixed dtypes with metadata, numpy-written F16") {
    const json expected = test::read_json(test::io_fixture("mixed.json"));
    io::SafetensorsFile f(test::io_fixture("mixed.safetensors"));
    REQUIRE(f.metadata() == expected["metadata"].get<std::map<std::string, std::string>>());
    REQUIRE(f.entries().size() == expected["tensors"].size());
    const std::map<std::string, at::ScalarType> dtypes = {{"float32", at::kFloat},
                                                          {"float16", at::kHalf},
                                                          {"bfloat16", at::kBFloat16},
                                                          {"uint8", at::kByte},
                                                          {"int64", at::kLong}};
    for (auto it = expected["tensors"].begin(); it != expected["tensors"].end(); ++it) {
      REQUIRE(f.contains(it.key()));
      at::Tensor t = f.tensor(it.key());
      REQUIRE(t.scalar_type() == dtypes.at((*it)["dtype"].get<std::string>()));
      REQUIRE(t.sizes().vec() == test::shape_of((*it)["shape"]));
      test::require_values(t, (*it)["values"], it.key());
    }
    REQUIRE_FALSE(f.contains("missing"));

    io::SafetensorsFile g(test::io_fixture("numpy_f16.safetensors"));
    const json e16 = test::read_json(test::io_fixture("numpy_f16.json"));
    REQUIRE(g.metadata().empty());
    REQUIRE(g.tensor("w").scalar_type() == at::kHalf);
    REQUIRE(g.tensor("w").sizes().vec() == test::shape_of(e16["w"]["shape"]));
    test::require_values(g.tensor("w"), e16["w"]["values"], "w");
  }
  SECTION("tensors view the mapping and outlive the reader") {
    at::Tensor a, b;
    {
      io::SafetensorsFile f(test::io_fixture("mixed.safetensors"));
      a = f.tensor("a.f32");
      b = f.tensor("a.f32");
    }
    REQUIRE(a.data_ptr() == b.data_ptr());  // no copy: both view the same mapped bytes
    const json expected = test::read_json(test::io_fixture("mixed.json"));
    test::require_values(a, expected["tensors"]["a.f32"]["values"], "a.f32 after close");
  }
}

TEST_CASE("write_safetensors output loads in Python safetensors") {
  test::TempDir dir;
  const std::string path = dir.file("out.safetensors");
  at::Tensor f32 = at::arange(12, at::kFloat).reshape({3, 4}) / 7;
  at::Tensor f16 = (at::arange(6, at::kFloat) - 2.5).to(at::kHalf);
  at::Tensor bf16 = at::linspace(-1, 1, 10).to(at::kBFloat16).reshape({2, 5});
  at::Tensor i64 = at::tensor({int64_t{-3}, int64_t{1} << 40});
  at::Tensor u8 = at::arange(5, at::kByte);
  at::Tensor strided = f32.t();  // not contiguous: written in logical order
  io::write_safetensors(
      path, {{"f32", f32}, {"f16", f16}, {"bf16", bf16}, {"i64", i64}, {"u8", u8}, {"t", strided}},
      {{"format", "pt"}, {"who", "patch"}});
  REQUIRE(std::distance(fs::directory_iterator(dir.path()), fs::directory_iterator()) == 1);

  const std::string bytes = core::read_file(path);
  uint64_t header_len = 0;
  std::memcpy(&header_len, bytes.data(), 8);
  REQUIRE(header_len % 8 == 0);

  // Python prints every value with C's "%.17g" (exact for doubles), as does line().
  const std::string script =
      "import sys, torch\n"
      "from safetensors import safe_open\n"
      "with safe_open(sys.argv[1], 'pt') as f:\n"
      "    print(sorted(f.metadata().items()))\n"
      "    for k in ['f32', 'f16', 'bf16', 'i64', 'u8', 't']:\n"
      "        t = f.get_tensor(k)\n"
      "        print(k, str(t.dtype), list(t.shape),\n"
      "              ' '.join('%.17g' % v for v in t.double().flatten().tolist()))\n";
  core::write_file_atomic(dir.file("check.py"), script);
  auto r = test::run_command(test::env_or("PATCH_PYTHON", "python3") + " " + dir.file("check.py") +
                             " " + path);
  INFO(r.err);
  REQUIRE(r.exit_code == 0);
  auto line = [](const std::string& name, const std::string& dtype, const std::string& shape,
                 const at::Tensor& t) {
    at::Tensor d = t.to(at::kDouble).contiguous().flatten();
    std::string s = name + " " + dtype + " " + shape + " ";
    char buf[64];
    for (int64_t i = 0; i < d.numel(); ++i) {
      std::snprintf(buf, sizeof(buf), "%.17g", d.data_ptr<double>()[i]);
      s += (i ? " " : "") + std::string(buf);
    }
    return s;
  };
  std::istringstream out(r.out);
  std::string l;
  std::getline(out, l);
  REQUIRE(l == "[('format', 'pt'), ('who', 'patch')]");
  std::getline(out, l);
  REQUIRE(l == line("f32", "torch.float32", "[3, 4]", f32));
  std::getline(out, l);
  REQUIRE(l == line("f16", "torch.float16", "[6]", f16));
  std::getline(out, l);
  REQUIRE(l == line("bf16", "torch.bfloat16", "[2, 5]", bf16));
  std::getline(out, l);
  REQUIRE(l == "i64 torch.int64 [2] -3 1099511627776");
  std::getline(out, l);
  REQUIRE(l == "u8 torch.uint8 [5] 0 1 2 3 4");
  std::getline(out, l);
  REQUIRE(l == line("t", "torch.float32", "[4, 3]", strided));

  SECTION("unsupported dtypes and duplicate names are refused") {
    REQUIRE_THROWS_AS(io::write_safetensors(dir.file("x.safetensors"),
                                            {{"c", at::zeros({2}, at::kComplexFloat)}}),
                      core::Error);
    REQUIRE_THROWS_AS(io::write_safetensors(dir.file("x.safetensors"), {{"a", f32}, {"a", f32}}),
                      core::Error);
    REQUIRE_FALSE(fs::exists(dir.file("x.safetensors")));
  }
}

TEST_CASE("corrupt safetensors files fail with one-line errors") {
  test::TempDir dir;
  const std::string path = dir.file("bad.safetensors");
  const std::string f32_2 = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";

  SECTION("truncated data") {
    test::write_bytes(path, raw_safetensors(f32_2, 4));
    require_bad_file(path, "tensor 'a': data_offsets [0, 8) exceed the data section of 4 bytes");
  }
  SECTION("truncated inside the header") {
    test::write_bytes(path, raw_safetensors(f32_2, 8).substr(0, 30));
    require_bad_file(path, "exceeds the file size");
  }
  SECTION("shorter than the length prefix") {
    test::write_bytes(path, "abc");
    require_bad_file(path, "not a safetensors file");
  }
  SECTION("offsets past the end") {
    test::write_bytes(
        path, raw_safetensors(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[16,24]}})", 16));
    require_bad_file(path, "data_offsets [16, 24) exceed the data section of 16 bytes");
  }
  SECTION("overlapping tensors") {
    test::write_bytes(path,
                      raw_safetensors(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                      R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                                      12));
    require_bad_file(path, "overlap tensor 'a'");
  }
  SECTION("absurd header length") {
    test::write_bytes(path, le64(uint64_t{1} << 60) + "{}");
    require_bad_file(path, "header length 1152921504606846976 exceeds the 100 MB limit");
  }
  SECTION("unknown dtype") {
    test::write_bytes(
        path, raw_safetensors(R"({"a":{"dtype":"F8_E9M9","shape":[2],"data_offsets":[0,2]}})", 2));
    require_bad_file(path, "tensor 'a': unknown dtype 'F8_E9M9'");
  }
  SECTION("shape and byte length disagree") {
    test::write_bytes(
        path, raw_safetensors(R"({"a":{"dtype":"F16","shape":[3,2],"data_offsets":[0,8]}})", 8));
    require_bad_file(path, "tensor 'a': shape [3, 2] of F16 needs 12 bytes");
  }
  SECTION("absurd shape") {
    test::write_bytes(path,
                      raw_safetensors(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296,16],)"
                                      R"("data_offsets":[0,8]}})",
                                      8));
    require_bad_file(path, "needs more than 2^64 bytes");
  }
  SECTION("non-JSON header") {
    test::write_bytes(path, raw_safetensors("{\"a\": [not json", 8));
    require_bad_file(path, "header is not a JSON object");
  }
  SECTION("header is not an object") {
    test::write_bytes(path, raw_safetensors("[1, 2]", 8));
    require_bad_file(path, "header is not a JSON object");
  }
  SECTION("entry without data_offsets") {
    test::write_bytes(path, raw_safetensors(R"({"a":{"dtype":"F32","shape":[2]}})", 8));
    require_bad_file(path, "tensor 'a': header entry has no 'data_offsets'");
  }
  SECTION("every single-byte corruption: an error or a readable file, never a crash") {
    const std::string good = core::read_file(test::io_fixture("mixed.safetensors"));
    for (size_t i = 0; i < good.size(); ++i) {
      std::string s = good;
      s[i] = static_cast<char>(s[i] ^ 0xA5);
      test::write_bytes(path, s);
      try {
        io::SafetensorsFile f(path);
        for (const auto& e : f.entries()) f.tensor(e.name).sum();
      } catch (const core::Error&) {
      }
    }
  }
  SECTION("negative offsets") {
    test::write_bytes(
        path, raw_safetensors(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}})", 8));
    require_bad_file(path, "tensor 'a': data_offsets is not a pair of non-negative integers");
  }
}

TEST_CASE("Hugging Face checkpoints: sharded with tied embeddings - TinyStories-656K") {
  SECTION("transformers save_pretrained, two shards, lm_head not stored") {
    const std::string dir = test::io_fixture("tiny_llama_sharded");
    const json expected = test::read_json(test::io_fixture("tiny_llama_sharded.json"));
    io::Checkpoint ck = io::load_checkpoint(dir);
    REQUIRE(ck.format == "safetensors");
    REQUIRE(ck.source == dir);
    REQUIRE(ck.config.hidden_size == 16);
    REQUIRE(ck.config.num_layers == 2);
    REQUIRE(ck.config.num_kv_heads == 2);
    REQUIRE(ck.config.tie_word_embeddings);
    REQUIRE(ck.config.torch_dtype == "float32");
    REQUIRE(ck.config.raw["model_type"] == "llama");
    // transformers stores the tied lm_head under neither name; both come back.
    REQUIRE(ck.tensors.size() == expected["tensors"].size());
    for (auto it = expected["tensors"].begin(); it != expected["tensors"].end(); ++it) {
      REQUIRE(ck.tensors.count(it.key()));
      test::require_values(ck.tensors.at(it.key()), *it, it.key());
    }
    REQUIRE(ck.tensors.at("lm_head.weight").data_ptr() ==
            ck.tensors.at("model.embed_tokens.weight").data_ptr());
    std::set<std::string> files;
    for (const auto& [name, file] : ck.tensor_file)
      files.insert(fs::path(file).filename().string());
    REQUIRE(files.size() == expected["shards"].get<size_t>());
    REQUIRE(ck.tensor_file.size() == ck.tensors.size());
  }
  SECTION("TinyStories-656K: lm_head stored, embedding aliased in __metadata__") {
    const std::string dir = test::data_path("models/tinystories-656k");
    io::Checkpoint ck = io::load_checkpoint(dir);
    REQUIRE(ck.tensors.size() == 21);
    const at::Tensor& embed = ck.tensors.at("model.embed_tokens.weight");
    const at::Tensor& head = ck.tensors.at("lm_head.weight");
    REQUIRE(embed.data_ptr() == head.data_ptr());
    REQUIRE(embed.sizes().vec() == std::vector<int64_t>{2048, 128});
    REQUIRE(embed.scalar_type() == at::kFloat);
    REQUIRE(ck.tensor_file.at("model.embed_tokens.weight") == dir + "/model.safetensors");
    REQUIRE(ck.tensors.at("model.layers.1.self_attn.k_proj.weight").sizes().vec() ==
            std::vector<int64_t>{64, 128});
    int64_t params = 0;
    for (const auto& [name, t] : ck.tensors)
      if (name != "model.embed_tokens.weight") params += t.numel();
    REQUIRE(params == 656000);

    const io::ModelConfig& c = ck.config;
    REQUIRE(c.model_type == "llama");
    REQUIRE(c.hidden_size == 128);
    REQUIRE(c.intermediate_size == 384);
    REQUIRE(c.num_layers == 2);
    REQUIRE(c.num_heads == 8);
    REQUIRE(c.num_kv_heads == 4);
    REQUIRE(c.head_dim == 16);
    REQUIRE(c.vocab_size == 2048);
    REQUIRE(c.max_position_embeddings == 512);
    REQUIRE(c.rms_norm_eps == 1e-6);
    REQUIRE(c.rope_theta == 10000.0);
    REQUIRE_FALSE(c.rope_scaling);
    REQUIRE(c.tie_word_embeddings);
    REQUIRE_FALSE(c.attention_bias);
    REQUIRE(c.bos_token_id == 1);
    REQUIRE(c.eos_token_id == 2);
  }
}

TEST_CASE("HF config.json: parsed as transformers reads it - clear errors otherwise") {
  SECTION("llama3, mistral, qwen2, qwen3, smollm") {
    const std::string dir = test::io_fixture("configs");
    const json all = test::read_json(dir + "/expected.json");
    std::set<std::string> fingerprints;
    for (auto it = all.begin(); it != all.end(); ++it) {
      INFO(it.key());
      const json& e = *it;
      const io::ModelConfig c = io::load_hf_config(dir + "/" + it.key() + ".json");
      CHECK(c.model_type == e["model_type"]);
      CHECK(c.hidden_size == e["hidden_size"]);
      CHECK(c.intermediate_size == e["intermediate_size"]);
      CHECK(c.num_layers == e["num_layers"]);
      CHECK(c.num_heads == e["num_heads"]);
      CHECK(c.num_kv_heads == e["num_kv_heads"]);
      CHECK(c.head_dim == e["head_dim"]);
      CHECK(c.vocab_size == e["vocab_size"]);
      CHECK(c.max_position_embeddings == e["max_position_embeddings"]);
      CHECK(c.rms_norm_eps == e["rms_norm_eps"].get<double>());
      CHECK(c.rope_theta == e["rope_theta"].get<double>());
      CHECK(c.tie_word_embeddings == e["tie_word_embeddings"]);
      CHECK(c.attention_bias == e["attention_bias"]);
      CHECK(c.qk_norm == e["qk_norm"]);
      CHECK(c.bos_token_id == e["bos_token_id"]);
      CHECK(c.eos_token_id == e["eos_token_id"]);
      REQUIRE(c.rope_scaling.has_value() == e.contains("rope_scaling"));
      if (c.rope_scaling) {
        const json& r = e["rope_scaling"];
        CHECK(c.rope_scaling->type == r["rope_type"]);
        CHECK(c.rope_scaling->factor == r["factor"].get<double>());
        CHECK(c.rope_scaling->low_freq_factor == r["low_freq_factor"].get<double>());
        CHECK(c.rope_scaling->high_freq_factor == r["high_freq_factor"].get<double>());
        CHECK(c.rope_scaling->original_max_position_embeddings ==
              r["original_max_position_embeddings"]);
      }
      const std::string fp = io::config_fingerprint(c);
      REQUIRE(json::parse(fp)["hidden_size"] == c.hidden_size);
      REQUIRE(fp == io::config_fingerprint(io::load_hf_config(dir + "/" + it.key() + ".json")));
      fingerprints.insert(fp);
    }
    REQUIRE(fingerprints.size() == all.size());
  }
  SECTION("unsupported or incomplete configs name the file and the key") {
    const std::string dir = test::io_fixture("configs");
    auto error_for = [&](const std::string& name) {
      return test::error_of([&] { io::load_hf_config(dir + "/" + name); });
    };
    auto require_msg = [](const std::string& msg, const std::string& part) {
      INFO(msg);
      REQUIRE(msg.find(part) != std::string::npos);
      REQUIRE(msg.find('\n') == std::string::npos);
    };
    require_msg(error_for("bad_rope_linear.json"), "rope type 'linear' is unsupported");
    require_msg(error_for("bad_rope_linear.json"), "bad_rope_linear.json: key 'rope_parameters'");
    require_msg(error_for("bad_mistral_window.json"), "sliding window attention not supported");
    require_msg(error_for("bad_qwen2_window.json"), "sliding window attention not supported");
    require_msg(error_for("bad_mlp_bias.json"), "key 'mlp_bias'");

    const json good = test::read_json(dir + "/llama3.json");
    json j = good;
    j.erase("intermediate_size");
    require_msg(test::error_of([&] { io::parse_hf_config(j, "cfg.json"); }),
                "cfg.json: missing required key 'intermediate_size'");
    j = good;
    j["model_type"] = "gpt2";
    require_msg(test::error_of([&] { io::parse_hf_config(j, "cfg.json"); }),
                "cfg.json: unsupported model_type 'gpt2'");
    j = good;
    j["rope_parameters"] = {{"rope_type", "yarn"}, {"factor", 4.0}};
    require_msg(test::error_of([&] { io::parse_hf_config(j, "cfg.json"); }),
                "rope type 'yarn' is unsupported");
    j = good;
    j["rope_parameters"].erase("low_freq_factor");
    require_msg(test::error_of([&] { io::parse_hf_config(j, "cfg.json"); }), "'low_freq_factor'");
    j = good;
    j["num_hidden_layers"] = "16";
    require_msg(test::error_of([&] { io::parse_hf_config(j, "cfg.json"); }),
                "key 'num_hidden_layers': expected an integer");
    j = good;
    j["layer_types"] = {"full_attention", "sliding_attention"};
    require_msg(test::error_of([&] { io::parse_hf_config(j, "cfg.json"); }),
                "sliding window attention not supported");

    test::TempDir tmp;
    test::write_bytes(tmp.file("config.json"), "{\"model_type\": ");
    require_msg(test::error_of([&] { io::load_hf_config(tmp.file("config.json")); }),
                tmp.file("config.json") + ": not valid JSON");
  }
}

TEST_CASE("checkpoint directories with unusable weights fail clearly") {
  test::TempDir dir;
  const std::string config =
      core::read_file(test::data_path("models/tinystories-656k/config.json"));
  core::write_file_atomic(dir.file("config.json"), config);
  const std::string model = dir.file("model.safetensors");

  SECTION("integer weight") {
    io::write_safetensors(model, {{"model.embed_tokens.weight", at::zeros({4, 2})},
                                  {"model.norm.weight", at::zeros({2}, at::kInt)}});
    const std::string msg = test::error_of([&] { io::load_checkpoint(dir.path()); });
    INFO(msg);
    REQUIRE(msg.find(model + ": tensor 'model.norm.weight' has dtype I32") == 0);
  }
  SECTION("no embedding at all") {
    io::write_safetensors(model, {{"model.norm.weight", at::zeros({2})}});
    const std::string msg = test::error_of([&] { io::load_checkpoint(dir.path()); });
    REQUIRE(msg == dir.path() + ": no tensor 'model.embed_tokens.weight'");
  }
  SECTION("untied without lm_head") {
    json j = json::parse(config);
    j["tie_word_embeddings"] = false;
    core::write_file_atomic(dir.file("config.json"), j.dump());
    io::write_safetensors(model, {{"model.embed_tokens.weight", at::zeros({4, 2})}});
    const std::string msg = test::error_of([&] { io::load_checkpoint(dir.path()); });
    REQUIRE(msg.find("no tensor 'lm_head.weight' and the embeddings are not tied") !=
            std::string::npos);
  }
  SECTION("no weights file") {
    const std::string msg = test::error_of([&] { io::load_checkpoint(dir.path()); });
    REQUIRE(msg.find("neither model.safetensors nor model.safetensors.index.json") !=
            std::string::npos);
  }
  SECTION("index naming a missing tensor") {
    io::write_safetensors(dir.file("a.safetensors"),
                          {{"model.embed_tokens.weight", at::zeros({4, 2})}});
    core::write_file_atomic(dir.file("model.safetensors.index.json"),
                            R"({"weight_map": {"model.embed_tokens.weight": "a.safetensors",
                                               "model.norm.weight": "a.safetensors"}})");
    const std::string msg = test::error_of([&] { io::load_checkpoint(dir.path()); });
    REQUIRE(msg == dir.file("a.safetensors") +
                       ": tensor 'model.norm.weight' listed in the index's weight_map is missing");
  }
  SECTION("not a checkpoint") {
    REQUIRE(test::error_of([&] { io::load_checkpoint(dir.file("nope")); }) ==
            dir.file("nope") + ": no such checkpoint file or directory");
    REQUIRE(test::error_of([&] {
              io::load_checkpoint(dir.file("config.json"));
            }).find("neither a GGUF file nor") != std::string::npos);
  }
}
