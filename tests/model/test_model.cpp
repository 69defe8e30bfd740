// Decoder tests against transformers' fp32 CPU logits (scripts/make_model_fixtures.py),
// the published stories260K greedy continuation, and finite differences.
#include <ATen/ATen.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "catch.h"
#include "core/error.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "model/bench.h"
#include "model/decoder.h"
#include "test_util.h"

using namespace patch;

namespace {

std::string fixture(const std::string& rel) {
  return test::fixtures_dir() + "/model/" + rel;
}

struct Oracle {
  at::Tensor ids, logits, loss;
};

Oracle load_oracle(const std::string& name) {
  io::SafetensorsFile f(fixture("oracles/" + name + ".safetensors"));
  return {f.tensor("ids").clone(), f.tensor("logits").clone(), f.tensor("loss").clone()};
}

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

model::DecoderOptions options(at::ScalarType dtype = at::kFloat, bool checkpointing = false) {
  model::DecoderOptions o;
  o.dtype = dtype;
  o.checkpointing = checkpointing;
  return o;
}

// Checks one fixture against transformers: logits and the causal-LM loss.
void check_against_transformers(const std::string& ckpt_path, const std::string& oracle_name) {
  INFO(oracle_name);
  const Oracle o = load_oracle(oracle_name);
  model::Decoder d(io::load_checkpoint(ckpt_path), options());
  at::NoGradGuard no_grad;
  const at::Tensor logits = d.forward(o.ids);
  REQUIRE(logits.scalar_type() == at::kFloat);
  REQUIRE(logits.sizes() == o.logits.sizes());
  CHECK(max_abs_diff(logits, o.logits) <= 1e-4);
  CHECK(d.loss(o.ids).item<double>() == Approx(o.loss.item<double>()).epsilon(1e-5));
}

// W * sigmoid(s) with one leaf s per output row.
class SigmoidScale : public model::WeightProvider {
 public:
  explicit SigmoidScale(at::Tensor leaf) : leaf_(std::move(leaf)) {}
  at::Tensor effective_weight(const at::Tensor& weight) override {
    return weight * at::sigmoid(leaf_);
  }

 private:
  at::Tensor leaf_;
};

class Identity : public model::WeightProvider {
 public:
  at::Tensor effective_weight(const at::Tensor& weight) override { return weight; }
};

class Zero : public model::WeightProvider {
 public:
  at::Tensor effective_weight(const at::Tensor& weight) override { return at::zeros_like(weight); }
};

io::ModelConfig tiny_config() {
  io::ModelConfig c;
  c.model_type = "qwen3";  // with q/k/v biases too: every optional term is exercised
  c.vocab_size = 50;
  c.hidden_size = 16;
  c.intermediate_size = 24;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 4;
  c.attention_bias = true;
  c.qk_norm = true;
  c.tie_word_embeddings = false;
  return c;
}

// One sigmoid-scale leaf per linear of `d` (float64, requires grad).
std::vector<at::Tensor> attach_leaves(model::Decoder& d) {
  std::vector<at::Tensor> leaves;
  at::manual_seed(11);
  for (model::LinearImpl* l : d.linears()) {
    at::Tensor s = at::randn({l->weight().size(0), 1}, at::kDouble).requires_grad_(true);
    l->set_provider(std::make_shared<SigmoidScale>(s));
    leaves.push_back(s);
  }
  return leaves;
}

}  // namespace

TEST_CASE("logits match transformers for every architecture fixture") {
  for (const char* name : {"llama3", "llama_tied", "mistral", "qwen2", "qwen3", "smollm",
                           "llama_sharded", "llama_bf16"})
    check_against_transformers(fixture(name), name);
}

TEST_CASE("logits match transformers for TinyStories-656K") {
  check_against_transformers(test::data_path("models/tinystories-656k"), "tinystories-656k");
}

TEST_CASE("stories260K GGUF greedy decoding reproduces the reference continuation") {
  model::Decoder d(io::load_checkpoint(test::data_path("models/stories260K/stories260K.gguf")),
                   options());
  const std::vector<int64_t> expected = {403, 407, 261, 378, 432, 383, 286, 261,
                                         376, 298, 315, 421, 395, 317, 426, 338,
                                         401, 396, 267, 337, 410, 408, 419, 292};
  at::NoGradGuard no_grad;
  std::vector<int64_t> ids = {1};
  for (size_t i = 0; i < expected.size(); ++i) {
    const at::Tensor x = at::tensor(ids, at::kLong).unsqueeze(0);
    ids.push_back(d.forward(x)[0][-1].argmax().item<int64_t>());
  }
  const std::vector<int64_t> got(ids.begin() + 1, ids.end());
  CHECK(got == expected);
}

TEST_CASE("linears are named like Hugging Face modules and found by name") {
  model::Decoder d(io::load_checkpoint(fixture("qwen2")), options());
  const auto ls = d.linears();
  REQUIRE(ls.size() == 2 * 7);
  const std::vector<std::string> order = {
      "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
      "mlp.gate_proj",    "mlp.up_proj",      "mlp.down_proj"};
  for (size_t i = 0; i < ls.size(); ++i) {
    const std::string expected = "model.layers." + std::to_string(i / 7) + "." + order[i % 7];
    CHECK(ls[i]->name() == expected);
    CHECK(d.linear(expected) == ls[i]);
    CHECK(model::Decoder::block_index(expected) == static_cast<int64_t>(i / 7));
    CHECK_FALSE(ls[i]->weight().requires_grad());
  }
  CHECK(d.linear("model.layers.1.self_attn.q_proj")->bias().defined());
  CHECK_FALSE(d.linear("model.layers.1.self_attn.o_proj")->bias().defined());
  CHECK(d.linear("lm_head") == nullptr);
  CHECK(d.linear("model.layers.9.mlp.up_proj") == nullptr);
  CHECK(d.num_blocks() == 2);
  CHECK(d.config().model_type == "qwen2");

  CHECK(model::Decoder::block_index("model.layers.12.mlp.down_proj") == 12);
  CHECK(model::Decoder::block_index("lm_head") == -1);
  CHECK(model::Decoder::block_index("model.layers.x.mlp") == -1);
  CHECK(model::Decoder::block_index("model.layers.3") == 3);
  CHECK(model::Decoder::block_index("model.layers.3x.mlp") == -1);
}

TEST_CASE("a missing tensor is reported with the checkpoint and tensor name") {
  io::Checkpoint ckpt = io::load_checkpoint(fixture("llama3"));
  ckpt.tensors.erase("model.layers.1.mlp.up_proj.weight");
  try {
    model::Decoder d(ckpt, options());
    FAIL("no error");
  } catch (const core::Error& e) {
    const std::string msg = e.what();
    CHECK(msg.find("model.layers.1.mlp.up_proj.weight") != std::string::npos);
    CHECK(msg.find("llama3") != std::string::npos);
  }
}

TEST_CASE("the weight provider seam changes exactly what it should") {
  const Oracle o = load_oracle("llama3");
  model::Decoder d(io::load_checkpoint(fixture("llama3")), options());
  at::NoGradGuard no_grad;
  const at::Tensor base = d.forward(o.ids);
  for (model::LinearImpl* l : d.linears()) l->set_provider(std::make_shared<Identity>());
  CHECK(at::equal(d.forward(o.ids), base));
  d.linear("model.layers.1.mlp.down_proj")->set_provider(std::make_shared<Zero>());
  CHECK(max_abs_diff(d.forward(o.ids), base) > 1e-2);
  d.linear("model.layers.1.mlp.down_proj")->set_provider(nullptr);
  CHECK(at::equal(d.forward(o.ids), base));
}

TEST_CASE("embed - run_block and head compose to forward") {
  const Oracle o = load_oracle("qwen3");
  model::Decoder d(io::load_checkpoint(fixture("qwen3")), options());
  at::NoGradGuard no_grad;
  at::Tensor h = d.embed(o.ids);
  for (int64_t i = 0; i < d.num_blocks(); ++i) h = d.run_block(i, h);
  CHECK(at::equal(d.head(h), d.forward(o.ids)));
}

TEST_CASE("loss equals the cross-entropy of the forward logits - chunked or not") {
  const Oracle o = load_oracle("smollm");
  io::Checkpoint ckpt = io::load_checkpoint(fixture("smollm"));
  model::DecoderOptions opts = options();
  model::Decoder whole(ckpt, opts);
  opts.loss_chunk_rows = 5;  // 46 targets: ragged last chunk
  model::Decoder chunked(ckpt, opts);
  at::NoGradGuard no_grad;
  const at::Tensor logits = whole.forward(o.ids);
  const at::Tensor ce = at::cross_entropy_loss(
      logits.slice(1, 0, -1).reshape({-1, logits.size(-1)}), o.ids.slice(1, 1).reshape({-1}));
  CHECK(whole.loss(o.ids).item<double>() == Approx(ce.item<double>()).epsilon(1e-6));
  CHECK(chunked.loss(o.ids).item<double>() == Approx(ce.item<double>()).epsilon(1e-6));
}

TEST_CASE("checkpointed gradients equal plain ones and finite differences (float64)") {
  at::manual_seed(3);
  model::Decoder plain =
      model::Decoder::random(tiny_config(), options(at::kDouble), /*init_std=*/0.3);
  at::manual_seed(3);
  model::DecoderOptions ck = options(at::kDouble, /*checkpointing=*/true);
  ck.loss_chunk_rows = 4;  // the loss chunks are recomputed in backward as well
  model::Decoder checkpointed = model::Decoder::random(tiny_config(), ck, /*init_std=*/0.3);
  const std::vector<at::Tensor> leaves_plain = attach_leaves(plain);
  const std::vector<at::Tensor> leaves_ck = attach_leaves(checkpointed);
  at::manual_seed(5);
  const at::Tensor ids = at::randint(50, {2, 7}, at::kLong);

  // The recompute runs every linear again but a block's last one (down_proj),
  // whose output only the residual sum reads: its forward runs once.
  std::map<std::string, int> forwards;
  for (const char* name : {"model.layers.0.mlp.down_proj", "model.layers.0.mlp.gate_proj"})
    checkpointed.linear(name)->set_input_observer([&forwards, name](const at::Tensor&) { ++forwards[name]; });
  const at::Tensor loss_plain = plain.loss(ids);
  const at::Tensor loss_ck = checkpointed.loss(ids);
  REQUIRE(loss_plain.scalar_type() == at::kDouble);
  CHECK(loss_plain.item<double>() == Approx(loss_ck.item<double>()).epsilon(1e-12));
  loss_plain.backward();
  loss_ck.backward();
  CHECK(forwards["model.layers.0.mlp.gate_proj"] == 2);
  CHECK(forwards["model.layers.0.mlp.down_proj"] == 1);
  for (const char* name : {"model.layers.0.mlp.down_proj", "model.layers.0.mlp.gate_proj"})
    checkpointed.linear(name)->set_input_observer({});
  for (size_t i = 0; i < leaves_plain.size(); ++i) {
    INFO(plain.linears()[i]->name());
    REQUIRE(leaves_ck[i].grad().defined());
    CHECK(max_abs_diff(leaves_plain[i].grad(), leaves_ck[i].grad()) <= 1e-12);
    CHECK(leaves_plain[i].grad().abs().max().item<double>() > 0.0);
  }

  // Central differences on a few entries of the first and last block's leaves.
  at::NoGradGuard no_grad;
  const double eps = 1e-6;
  for (size_t li : {size_t{0}, size_t{5}, leaves_ck.size() - 1}) {
    for (int64_t row : {int64_t{0}, int64_t{3}}) {
      at::Tensor leaf = leaves_ck[li];
      const double orig = leaf[row][0].item<double>();
      leaf[row][0].fill_(orig + eps);
      const double up = checkpointed.loss(ids).item<double>();
      leaf[row][0].fill_(orig - eps);
      const double down = checkpointed.loss(ids).item<double>();
      leaf[row][0].fill_(orig);
      const double fd = (up - down) / (2 * eps);
      INFO(checkpointed.linears()[li]->name() << " row " << row);
      CHECK(leaf.grad()[row][0].item<double>() == Approx(fd).epsilon(1e-6).margin(1e-9));
    }
  }
}

TEST_CASE("distillation: the teacher is the unmasked model and the loss is KL of full logits (float64)") {
  at::manual_seed(3);
  model::DecoderOptions opts = options(at::kDouble, /*checkpointing=*/true);
  opts.loss_chunk_rows = 4;  // chunks recomputed in backward, a ragged last one
  model::Decoder d = model::Decoder::random(tiny_config(), opts, /*init_std=*/0.3);
  at::manual_seed(5);
  const at::Tensor ids = at::randint(50, {2, 7}, at::kLong);
  at::Tensor dense_logits, dense_hidden;
  {
    at::NoGradGuard no_grad;
    dense_logits = d.forward(ids);
    dense_hidden = d.teacher_hidden(ids);
  }
  const std::vector<at::Tensor> leaves = attach_leaves(d);
  // The teacher ignores the providers: the hidden states of the dense model.
  const at::Tensor teacher = d.teacher_hidden(ids);
  CHECK_FALSE(teacher.requires_grad());
  CHECK(max_abs_diff(teacher, dense_hidden) == 0.0);
  // The oracle: KL(teacher || student) over all next-token positions from the
  // full logits, with plain ATen ops.
  const at::Tensor student_logits = d.forward(ids);
  REQUIRE(max_abs_diff(student_logits.detach(), dense_logits) > 1e-3);  // the masks matter
  const at::Tensor lp = at::log_softmax(dense_logits.slice(1, 0, -1), -1);
  const at::Tensor lq = at::log_softmax(student_logits.slice(1, 0, -1), -1);
  const at::Tensor kl = (lp.exp() * (lp - lq)).sum(-1).mean();
  const at::Tensor got = d.distill_loss(ids, teacher);
  CHECK(got.item<double>() == Approx(kl.item<double>()).epsilon(1e-10));
  CHECK(got.item<double>() > 0.0);
  // Gradients equal the oracle's, through the checkpointed blocks and chunks.
  kl.backward();
  std::vector<at::Tensor> want;
  for (const at::Tensor& l : leaves) {
    want.push_back(l.grad().clone());
    l.grad().zero_();
  }
  got.backward();
  for (size_t i = 0; i < leaves.size(); ++i) {
    INFO(d.linears()[i]->name());
    CHECK(max_abs_diff(leaves[i].grad(), want[i]) <= 1e-10);
    CHECK(want[i].abs().max().item<double>() > 0.0);
  }
  // Without masks the student is the teacher: no divergence.
  for (model::LinearImpl* l : d.linears()) l->set_provider(nullptr);
  CHECK(std::abs(d.distill_loss(ids, d.teacher_hidden(ids)).item<double>()) <= 1e-12);
}

TEST_CASE("half-precision forwards run and stay close to float32") {
  const Oracle o = load_oracle("llama3");
  const io::Checkpoint ckpt = io::load_checkpoint(fixture("llama3"));
  at::NoGradGuard no_grad;
  const double scale = o.logits.abs().max().item<double>();
  for (at::ScalarType t : {at::kBFloat16, at::kHalf}) {
    INFO(c10::toString(t));
    model::Decoder d(ckpt, options(t));
    CHECK(d.linears()[0]->weight().scalar_type() == t);
    const at::Tensor logits = d.forward(o.ids);
    REQUIRE(logits.scalar_type() == at::kFloat);
    CHECK(max_abs_diff(logits, o.logits) <= 0.1 * scale);
    CHECK((logits - o.logits).abs().mean().item<double>() <= 0.02 * scale);
  }
}

TEST_CASE("benchmark entry point runs on a tiny shape and model shapes are known") {
  io::ModelConfig c = tiny_config();
  const nlohmann::json r =
      model::bench_forward_backward(c, at::kCPU, at::kFloat, /*batch=*/2, /*seq=*/8,
                                    /*checkpointing=*/true, /*warmup=*/1, /*iters=*/2);
  for (const char* key :
       {"median_ms", "tokens_per_s", "peak_gib", "batch", "seq", "dtype", "checkpointing"})
    CHECK(r.contains(key));
  CHECK(r["median_ms"].get<double>() > 0.0);
  CHECK(r["tokens_per_s"].get<double>() > 0.0);

  const io::ModelConfig q = model::model_shape("qwen2.5-0.5b");
  CHECK((q.hidden_size == 896 && q.num_layers == 24 && q.num_kv_heads == 2 && q.attention_bias));
  const io::ModelConfig l = model::model_shape("llama-3.1-8b");
  CHECK((l.intermediate_size == 14336 && l.rope_scaling && l.rope_scaling->factor == 8.0));
  CHECK(model::model_shape("llama-3.2-1b").rope_scaling->factor == 32.0);
  CHECK(model::model_shape("llama-2-7b").num_kv_heads == 32);
  CHECK_THROWS_AS(model::model_shape("gpt2"), core::ConfigError);
  for (const char* name : {"qwen2.5-0.5b", "llama-3.2-1b", "llama-2-7b", "llama-3.1-8b"}) {
    CHECK(model::is_model_shape(name));
    CHECK(model::model_shape_names().find(name) != std::string::npos);
  }
  CHECK_FALSE(model::is_model_shape("gpt2"));
}

TEST_CASE("bench.profile sums a step's kernels and needs CUDA", "[cuda]") {
  const auto step = [] { (at::ones({64, 64}) * 2.0).sum(); };
  CHECK_THROWS_AS(model::profile_kernels(step, at::kCPU), core::ConfigError);
  if (!at::hasCUDA()) {
    SUCCEED("no CUDA device");
    return;
  }
  // Three matmuls and one fill on one stream: the profile must see all of
  // them, their device time inside the profiled span.
  const auto opts = at::TensorOptions().dtype(at::kFloat).device(at::kCUDA);
  const at::Tensor a = at::randn({1024, 1024}, opts);
  const auto gemms = [&] {
    at::Tensor x = a;
    for (int i = 0; i < 3; ++i) x = at::mm(x, a);
    x.fill_(1.0);
  };
  const nlohmann::json p = model::profile_kernels(gemms, at::Device(at::kCUDA));
  int64_t calls = 0;
  for (const auto& k : p["kernels"]) calls += k["calls"].get<int64_t>();
  CHECK(calls >= 4);
  CHECK(p["gpu_ms"].get<double>() > 0.0);
  CHECK(p["idle_ms"].get<double>() >= 0.0);
  CHECK(p["gpu_ms"].get<double>() <= p["span_ms"].get<double>() + 1e-6);
}

// GPU oracle (skipped without one): float32 on CUDA within 1e-3 of transformers'
// CPU float32 (cuBLAS/SDPA reduce in another order); bfloat16 within 10% of the
// largest logit at worst and 2% on average, as on the CPU.
TEST_CASE("on CUDA logits match transformers in float32 and bfloat16") {
  if (!at::hasCUDA()) {
    WARN("no CUDA device: skipped");
    return;
  }
  at::NoGradGuard no_grad;
  for (const char* name : {"llama3", "mistral", "qwen2", "qwen3", "smollm"}) {
    INFO(name);
    const Oracle o = load_oracle(name);
    const io::Checkpoint ckpt = io::load_checkpoint(fixture(name));
    const double scale = o.logits.abs().max().item<double>();
    for (at::ScalarType t : {at::kFloat, at::kBFloat16}) {
      INFO(c10::toString(t));
      model::DecoderOptions opts = options(t);
      opts.device = at::Device(at::kCUDA, 0);
      model::Decoder d(ckpt, opts);
      const at::Tensor logits = d.forward(o.ids.to(opts.device)).cpu();
      if (t == at::kFloat) {
        CHECK(max_abs_diff(logits, o.logits) <= 1e-3);
      } else {
        CHECK(max_abs_diff(logits, o.logits) <= 0.1 * scale);
        CHECK((logits - o.logits).abs().mean().item<double>() <= 0.02 * scale);
      }
    }
  }
}
