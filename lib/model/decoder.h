#pragma once
// LLaMA-family decoder (LLaMA 2/3/3.x, Mistral, Qwen2/2.5, Qwen3, SmolLM) as
// torch::nn modules with Hugging Face semantics. The seam that matters: every
// linear layer takes its weight from a WeightProvider (dense weight, or W*M from
// the layer's mask), so training, masked evaluation, calibration and export all
// reuse this model.
#include <ATen/ATen.h>
#include <torch/nn/module.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "io/checkpoint.h"
#include "io/model_config.h"
#include "model/weight_provider.h"

namespace patch::model {

// y = x W^T (+ b) with W from the provider when one is set. The weight and bias
// are registered buffers: frozen (no grad), never written.
class LinearImpl : public torch::nn::Module {
 public:
  LinearImpl(std::string hf_name, at::Tensor weight, at::Tensor bias);
  at::Tensor forward(const at::Tensor& x);

  const std::string& name() const { return name_; }     // e.g. "model.layers.3.mlp.down_proj"
  const at::Tensor& weight() const { return weight_; }  // frozen, never written
  const at::Tensor& bias() const { return bias_; }      // undefined when absent
  void set_provider(std::shared_ptr<WeightProvider> p) { provider_ = std::move(p); }
  const std::shared_ptr<WeightProvider>& provider() const { return provider_; }
  // What x is multiplied by: the provider's effective weight, or the weight
  // itself (no provider, or inside Decoder's dense-weights forward).
  at::Tensor effective_weight() const;
  // Called with the layer's input on every forward (calibration statistics);
  // an empty function removes it.
  using InputObserver = std::function<void(const at::Tensor& x)>;
  void set_input_observer(InputObserver f) { observer_ = std::move(f); }
  // Replaces x W^T by kernel(x) (the bias is still added): deployment kernels
  // that read the weight in their own format. An empty function removes it.
  using Kernel = std::function<at::Tensor(const at::Tensor& x)>;
  void set_kernel(Kernel k) { kernel_ = std::move(k); }

 private:
  std::string name_;
  at::Tensor weight_, bias_;
  std::shared_ptr<WeightProvider> provider_;
  InputObserver observer_;
  Kernel kernel_;
};

struct DecoderOptions {
  at::Device device = at::kCPU;
  // Compute/storage dtype of the weights: float32, bfloat16, float16, or
  // float64 (CPU tests: finite differences).
  at::ScalarType dtype = at::kFloat;
  // Recompute each block in backward instead of keeping its activations. The
  // recompute runs inside backward (reentrant), so gradients reach leaves through
  // .grad (Tensor::backward / torch::autograd::backward), not autograd::grad.
  bool checkpointing = false;
  // Rows (tokens) of hidden states per loss() chunk; 0: as many as fit 256 MiB
  // of logits.
  int64_t loss_chunk_rows = 0;
};

// Keys and values of every block for `batch` sequences of up to `capacity`
// positions, allocated once: a step writes its slots in place and attends over
// the whole capacity under `valid`, so that every decode step has the same
// shapes (a CUDA graph replays it).
struct KvCache {
  std::vector<at::Tensor> k, v;  // per block [batch, kv_heads, capacity, head_dim], compute dtype
  at::Tensor valid;              // bool [batch, capacity]: slots holding a real token
  int64_t capacity = 0;
};

class Decoder {
 public:
  // Weights are cast to opts.dtype on opts.device. Throws core::Error naming the
  // checkpoint and tensor for a missing tensor or a wrong shape.
  Decoder(const io::Checkpoint& ckpt, const DecoderOptions& opts);
  // A decoder of the given shape with weights ~ N(0, init_std^2) (norm weights
  // 1, biases N(0, init_std^2)) drawn from the global generator, made directly on
  // opts.device: benchmarks and tests without a checkpoint file.
  static Decoder random(const io::ModelConfig& cfg, const DecoderOptions& opts,
                        double init_std = 0.02);
  Decoder(Decoder&&) noexcept;
  Decoder& operator=(Decoder&&) noexcept;
  ~Decoder();

  // ids [batch, seq] int64 (any device) -> logits [batch, seq, vocab] float32
  // (float64 for a float64 decoder).
  at::Tensor forward(const at::Tensor& ids);
  // Mean next-token cross-entropy of ids[:, :-1] -> ids[:, 1:] (float32 scalar;
  // float64 for a float64 decoder). Computed in row chunks of the hidden states
  // whose gradient is made with their logits (model::linear_cross_entropy), so
  // the [tokens, vocab] logits never exist at once and are never recomputed.
  at::Tensor loss(const at::Tensor& ids);

  // Knowledge distillation from the model itself without masks: the final-norm
  // hidden states [batch, seq, hidden] of ids with every linear on its dense
  // weight (providers and kernels ignored; no gradient), and the mean over
  // next-token positions of KL(teacher || model) of the two models' next-token
  // distributions, chunked like loss(). The teacher's logits are made from its
  // hidden states one chunk at a time, so they never exist whole either.
  at::Tensor teacher_hidden(const at::Tensor& ids);
  at::Tensor distill_loss(const at::Tensor& ids, const at::Tensor& teacher_hidden);

  // Inference with a KV cache. make_cache: an empty cache on the decoder's
  // device. forward_cached: ids [b, s] at RoPE `positions` [b, s] (int64) go
  // into cache `slots` [s] (int64, on the device; the same slots for every
  // sequence), marking valid[:, slots] from `real` [b, s] (bool: false for
  // left padding); each token attends to the valid slots up to its own.
  // Returns the logits of the last position [b, vocab] (float32).
  KvCache make_cache(int64_t batch, int64_t capacity) const;
  at::Tensor forward_cached(const at::Tensor& ids, const at::Tensor& positions, const at::Tensor& slots,
                            const at::Tensor& real, KvCache& cache);

  const io::ModelConfig& config() const;
  const DecoderOptions& options() const;
  // Every linear layer of the decoder blocks in module order (q, k, v, o, gate,
  // up, down per block); not lm_head.
  std::vector<LinearImpl*> linears();
  LinearImpl* linear(const std::string& hf_name);  // nullptr when unknown
  // Decoder block index of a layer name ("model.layers.7.mlp.up_proj" -> 7);
  // -1 for names outside the blocks.
  static int64_t block_index(const std::string& hf_name);

  // Block by block (calibration): embed gives hidden [b, s, h] in the compute
  // dtype; run_block applies block `i` (checkpointed like forward()); head
  // applies the final norm and lm_head (logits as forward() returns them).
  // forward(ids) == head(run_block(n-1, ... run_block(0, embed(ids)))).
  at::Tensor embed(const at::Tensor& ids);
  at::Tensor run_block(int64_t i, const at::Tensor& hidden);
  at::Tensor head(const at::Tensor& hidden);
  int64_t num_blocks() const;

 private:
  struct Impl;
  explicit Decoder(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace patch::model
