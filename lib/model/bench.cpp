#include "model/bench.h"

#include <memory>
#include <vector>

#include "core/error.h"
#include "core/tensor_utils.h"
#include "model/decoder.h"

namespace patch::model {

namespace {

// W * s: a cheap stand-in for W * M that puts a leaf into every linear.
class ScaledWeight : public WeightProvider {
 public:
  explicit ScaledWeight(at::Tensor scale) : scale_(std::move(scale)) {}
  at::Tensor effective_weight(const at::Tensor& weight) override { return weight * scale_; }

 private:
  at::Tensor scale_;
};

io::ModelConfig llama(int64_t hidden, int64_t inter, int64_t layers, int64_t heads,
                      int64_t kv_heads, int64_t vocab) {
  io::ModelConfig c;
  c.model_type = "llama";
  c.hidden_size = hidden;
  c.intermediate_size = inter;
  c.num_layers = layers;
  c.num_heads = heads;
  c.num_kv_heads = kv_heads;
  c.head_dim = hidden / heads;
  c.vocab_size = vocab;
  c.rms_norm_eps = 1e-5;
  return c;
}

io::RopeScaling llama3_scaling(double factor) {
  io::RopeScaling r;
  r.type = "llama3";
  r.factor = factor;
  r.low_freq_factor = 1.0;
  r.high_freq_factor = 4.0;
  r.original_max_position_embeddings = 8192;
  return r;
}

}  // namespace

io::ModelConfig model_shape(const std::string& name) {
  if (name == "qwen2.5-0.5b") {
    io::ModelConfig c = llama(896, 4864, 24, 14, 2, 151936);
    c.model_type = "qwen2";
    c.rms_norm_eps = 1e-6;
    c.rope_theta = 1000000.0;
    c.max_position_embeddings = 32768;
    c.tie_word_embeddings = true;
    c.attention_bias = true;
    c.bos_token_id = 151643;
    c.eos_token_id = 151643;
    c.torch_dtype = "bfloat16";
    return c;
  }
  if (name == "llama-3.2-1b") {
    io::ModelConfig c = llama(2048, 8192, 16, 32, 8, 128256);
    c.rope_theta = 500000.0;
    c.rope_scaling = llama3_scaling(32.0);
    c.max_position_embeddings = 131072;
    c.tie_word_embeddings = true;
    c.bos_token_id = 128000;
    c.eos_token_id = 128001;
    c.torch_dtype = "bfloat16";
    return c;
  }
  if (name == "llama-2-7b") {
    io::ModelConfig c = llama(4096, 11008, 32, 32, 32, 32000);
    c.max_position_embeddings = 4096;
    c.bos_token_id = 1;
    c.eos_token_id = 2;
    c.torch_dtype = "float16";
    return c;
  }
  if (name == "llama-3.1-8b") {
    io::ModelConfig c = llama(4096, 14336, 32, 32, 8, 128256);
    c.rope_theta = 500000.0;
    c.rope_scaling = llama3_scaling(8.0);
    c.max_position_embeddings = 131072;
    c.bos_token_id = 128000;
    c.eos_token_id = 128001;
    c.torch_dtype = "bfloat16";
    return c;
  }
  throw core::ConfigError(
      core::str("model shape: expected qwen2.5-0.5b, llama-3.2-1b, llama-2-7b or ",
                "llama-3.1-8b, got '", name, "'"));
}

nlohmann::json bench_forward_backward(const io::ModelConfig& cfg, at::Device device,
                                      at::ScalarType dtype, int64_t batch, int64_t seq,
                                      bool checkpointing, int warmup, int iters) {
  if (batch < 1 || seq < 2 || warmup < 0 || iters < 1)
    throw core::ConfigError(
        core::str("bench: expected batch >= 1, seq >= 2, warmup >= 0, iters >= 1, got ", batch,
                  ", ", seq, ", ", warmup, ", ", iters));
  DecoderOptions opts;
  opts.device = device;
  opts.dtype = dtype;
  opts.checkpointing = checkpointing;
  Decoder decoder = Decoder::random(cfg, opts);
  at::Tensor scale =
      at::ones({}, at::TensorOptions().dtype(dtype).device(device)).requires_grad_(true);
  auto provider = std::make_shared<ScaledWeight>(scale);
  for (LinearImpl* l : decoder.linears()) l->set_provider(provider);
  const at::Tensor ids = at::randint(cfg.vocab_size, {batch, seq},
                                     at::TensorOptions().dtype(at::kLong).device(device));

  auto step = [&] {
    scale.mutable_grad() = at::Tensor();
    decoder.loss(ids).backward();
  };
  const auto ms = core::time_steps(step, device, warmup, iters);
  const size_t n = ms.size();
  const double median = n % 2 ? ms[n / 2] : 0.5 * (ms[n / 2 - 1] + ms[n / 2]);
  int64_t params = 0;
  for (LinearImpl* l : decoder.linears()) params += l->weight().numel();
  return {{"model_type", cfg.model_type},
          {"device", device.str()},
          {"dtype", core::dtype_name(dtype)},
          {"batch", batch},
          {"seq", seq},
          {"checkpointing", checkpointing},
          {"warmup", warmup},
          {"iters", iters},
          {"block_linear_params", params},
          {"median_ms", median},
          {"min_ms", ms.front()},
          {"tokens_per_s", static_cast<double>(batch * seq) / (median / 1000.0)},
          {"peak_gib", core::peak_memory_gib(device)}};
}

}  // namespace patch::model
