#include "model/decoder.h"

#include <ATen/core/Reduction.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <functional>
#include <map>
#include <utility>

#include "core/error.h"
#include "core/tensor_utils.h"
#include "model/lm_loss.h"
#include "model/rms_norm.h"

namespace patch::model {

namespace {

using core::str;
using Shape = std::vector<int64_t>;

constexpr double kPi = 3.14159265358979323846;

// Bytes of one chunk of logits in loss() and distill_loss().
constexpr int64_t kLossChunkBytes = int64_t{1} << 28;

std::string shape_str(at::IntArrayRef s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

// Dtype of norms, softmax inputs and returned logits: at least float32.
at::ScalarType upcast(at::ScalarType t) {
  return at::promote_types(t, at::kFloat);
}

// ---- activation checkpointing ------------------------------------------------

// fn(x, recomputing): recomputing is true in backward, where fn's output only
// carries gradients back and its value is never read.
using RecomputeFn = std::function<at::Tensor(const at::Tensor&, bool)>;
struct Recompute : torch::CustomClassHolder {
  explicit Recompute(RecomputeFn f) : fn(std::move(f)) {}
  RecomputeFn fn;
};

// y = fn(x) without keeping fn's activations: forward saves only x; backward
// re-runs fn with grad enabled and backpropagates through the recomputed graph,
// which accumulates into the leaves fn used (e.g. mask logits inside providers)
// and yields x's gradient. `anchor` is a leaf requiring grad that makes the
// output part of the graph even when x does not require grad (the first block's
// input comes from frozen embeddings, yet its providers' leaves need gradients).
struct CheckpointFunction : torch::autograd::Function<CheckpointFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& /*anchor*/, c10::intrusive_ptr<Recompute> f) {
    ctx->save_for_backward({x});
    ctx->saved_data["fn"] = at::IValue::make_capsule(f);
    return f->fn(x, /*recomputing=*/false);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_out) {
    auto f = c10::static_intrusive_pointer_cast<Recompute>(ctx->saved_data["fn"].toCapsule());
    at::Tensor x = ctx->get_saved_variables()[0].detach();
    const bool x_grad = ctx->needs_input_grad(0);
    if (x_grad) x.requires_grad_(true);
    at::Tensor y;
    {
      at::AutoGradMode enable(true);
      y = f->fn(x, /*recomputing=*/true);
    }
    if (y.requires_grad() && grad_out[0].defined()) torch::autograd::backward({y}, {grad_out[0]});
    return {x_grad ? x.grad() : at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor checkpoint(RecomputeFn fn, const at::Tensor& x, const at::Tensor& anchor) {
  return CheckpointFunction::apply(x, anchor, c10::make_intrusive<Recompute>(std::move(fn)));
}

// y = x W^T in the autograd graph without computing y (its memory is left
// uninitialized): backward needs only x and W. A block's recompute gives its
// last linear this way, whose output only the residual sum reads, so the
// recompute costs one GEMM fewer, as torch.utils.checkpoint's recompute stops
// early. The gradients are the ones at::linear's backward computes, GEMM for GEMM.
struct LinearGraphOnly : torch::autograd::Function<LinearGraphOnly> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w) {
    ctx->save_for_backward({x, w});
    auto shape = x.sizes().vec();
    shape.back() = w.size(0);
    return at::empty(shape, x.options());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_out) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1];
    const at::Tensor g = grad_out[0].reshape({-1, w.size(0)});
    at::Tensor dx, dw;
    if (ctx->needs_input_grad(0)) dx = g.mm(w).view(x.sizes());
    if (ctx->needs_input_grad(1)) dw = g.t().mm(x.reshape({-1, w.size(1)}));
    return {dx, dw};
  }
};

// ---- modules -------------------------------------------------------------------

class RMSNormImpl : public torch::nn::Module {
 public:
  RMSNormImpl(at::Tensor weight, double eps) : eps_(eps) {
    weight_ = register_buffer("weight", std::move(weight));
  }
  // As transformers (model/rms_norm.h).
  at::Tensor forward(const at::Tensor& x) { return rms_norm(x, weight_, eps_); }

 private:
  at::Tensor weight_;
  double eps_;
};

at::Tensor rotate_half(const at::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return at::cat({-x.slice(-1, half), x.slice(-1, 0, half)}, -1);
}

// x [b, heads, s, d]; cos/sin [s, d] in x's dtype.
at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  return x * cos + rotate_half(x) * sin;
}

struct Rope {
  at::Tensor cos, sin;
};

class AttentionImpl : public torch::nn::Module {
 public:
  AttentionImpl(const io::ModelConfig& c, std::shared_ptr<LinearImpl> q,
                std::shared_ptr<LinearImpl> k, std::shared_ptr<LinearImpl> v,
                std::shared_ptr<LinearImpl> o, std::shared_ptr<RMSNormImpl> q_norm,
                std::shared_ptr<RMSNormImpl> k_norm)
      : heads_(c.num_heads), kv_heads_(c.num_kv_heads), head_dim_(c.head_dim) {
    q_proj = register_module("q_proj", std::move(q));
    k_proj = register_module("k_proj", std::move(k));
    v_proj = register_module("v_proj", std::move(v));
    o_proj = register_module("o_proj", std::move(o));
    if (q_norm) {
      this->q_norm = register_module("q_norm", std::move(q_norm));
      this->k_norm = register_module("k_norm", std::move(k_norm));
    }
  }

  at::Tensor forward(const at::Tensor& x, const Rope& rope) {
    const int64_t b = x.size(0), s = x.size(1);
    at::Tensor q = q_proj->forward(x).view({b, s, heads_, head_dim_});
    at::Tensor k = k_proj->forward(x).view({b, s, kv_heads_, head_dim_});
    at::Tensor v = v_proj->forward(x).view({b, s, kv_heads_, head_dim_}).transpose(1, 2);
    if (q_norm) {  // Qwen3: per-head RMSNorm before RoPE
      q = q_norm->forward(q);
      k = k_norm->forward(k);
    }
    q = apply_rope(q.transpose(1, 2), rope.cos, rope.sin);
    k = apply_rope(k.transpose(1, 2), rope.cos, rope.sin);
    at::Tensor o = at::scaled_dot_product_attention(q, k, v, /*attn_mask=*/{}, /*dropout_p=*/0.0,
                                                    /*is_causal=*/true, /*scale=*/std::nullopt,
                                                    /*enable_gqa=*/kv_heads_ != heads_);
    return o_proj->forward(o.transpose(1, 2).reshape({b, s, heads_ * head_dim_}));
  }

  // The same with a KV cache: this step's keys and values go into `slots` of
  // k_cache/v_cache [b, kv_heads, capacity, d]; queries attend over the whole
  // capacity under `allowed` [b, 1, s, capacity] (bool).
  at::Tensor forward_cached(const at::Tensor& x, const Rope& rope, at::Tensor& k_cache, at::Tensor& v_cache,
                            const at::Tensor& slots, const at::Tensor& allowed) {
    const int64_t b = x.size(0), s = x.size(1);
    at::Tensor q = q_proj->forward(x).view({b, s, heads_, head_dim_});
    at::Tensor k = k_proj->forward(x).view({b, s, kv_heads_, head_dim_});
    at::Tensor v = v_proj->forward(x).view({b, s, kv_heads_, head_dim_}).transpose(1, 2);
    if (q_norm) {
      q = q_norm->forward(q);
      k = k_norm->forward(k);
    }
    q = apply_rope(q.transpose(1, 2), rope.cos, rope.sin);
    k = apply_rope(k.transpose(1, 2), rope.cos, rope.sin);
    k_cache.index_copy_(2, slots, k);
    v_cache.index_copy_(2, slots, v);
    at::Tensor o = at::scaled_dot_product_attention(q, k_cache, v_cache, allowed, /*dropout_p=*/0.0,
                                                    /*is_causal=*/false, /*scale=*/std::nullopt,
                                                    /*enable_gqa=*/kv_heads_ != heads_);
    return o_proj->forward(o.transpose(1, 2).reshape({b, s, heads_ * head_dim_}));
  }

  std::shared_ptr<LinearImpl> q_proj, k_proj, v_proj, o_proj;
  std::shared_ptr<RMSNormImpl> q_norm, k_norm;

 private:
  int64_t heads_, kv_heads_, head_dim_;
};

class MlpImpl : public torch::nn::Module {
 public:
  MlpImpl(std::shared_ptr<LinearImpl> gate, std::shared_ptr<LinearImpl> up,
          std::shared_ptr<LinearImpl> down) {
    gate_proj = register_module("gate_proj", std::move(gate));
    up_proj = register_module("up_proj", std::move(up));
    down_proj = register_module("down_proj", std::move(down));
  }
  // value = false: down_proj's output only in the graph (LinearGraphOnly).
  at::Tensor forward(const at::Tensor& x, bool value = true) {
    const at::Tensor a = at::silu(gate_proj->forward(x)) * up_proj->forward(x);
    if (value) return down_proj->forward(a);
    const at::Tensor y = LinearGraphOnly::apply(a, down_proj->effective_weight());
    return down_proj->bias().defined() ? y + down_proj->bias() : y;
  }
  std::shared_ptr<LinearImpl> gate_proj, up_proj, down_proj;
};

class BlockImpl : public torch::nn::Module {
 public:
  BlockImpl(std::shared_ptr<RMSNormImpl> in_norm, std::shared_ptr<AttentionImpl> attn,
            std::shared_ptr<RMSNormImpl> post_norm, std::shared_ptr<MlpImpl> mlp) {
    input_layernorm = register_module("input_layernorm", std::move(in_norm));
    self_attn = register_module("self_attn", std::move(attn));
    post_attention_layernorm = register_module("post_attention_layernorm", std::move(post_norm));
    this->mlp = register_module("mlp", std::move(mlp));
  }
  // value = false (a recompute for gradients): the output's value is not
  // computed, only its graph (the MLP's last GEMM is skipped).
  at::Tensor forward(const at::Tensor& x, const Rope& rope, bool value = true) {
    at::Tensor h = x + self_attn->forward(input_layernorm->forward(x), rope);
    return h + mlp->forward(post_attention_layernorm->forward(h), value);
  }
  at::Tensor forward_cached(const at::Tensor& x, const Rope& rope, at::Tensor& k_cache, at::Tensor& v_cache,
                            const at::Tensor& slots, const at::Tensor& allowed) {
    at::Tensor h =
        x + self_attn->forward_cached(input_layernorm->forward(x), rope, k_cache, v_cache, slots, allowed);
    return h + mlp->forward(post_attention_layernorm->forward(h));
  }
  std::shared_ptr<RMSNormImpl> input_layernorm, post_attention_layernorm;
  std::shared_ptr<AttentionImpl> self_attn;
  std::shared_ptr<MlpImpl> mlp;
};

// Fetches named tensors, checks their shapes and casts them to the compute
// dtype on the compute device.
class TensorSource {
 public:
  TensorSource(const std::map<std::string, at::Tensor>& tensors, std::string source,
               const DecoderOptions& opts)
      : tensors_(tensors), source_(std::move(source)), opts_(opts) {}

  bool has(const std::string& name) const { return tensors_.count(name) > 0; }

  at::Tensor get(const std::string& name, const Shape& shape) const {
    auto it = tensors_.find(name);
    if (it == tensors_.end())
      throw core::Error(
          str(source_, ": tensor '", name, "' is missing (expected shape ", shape_str(shape), ")"));
    if (it->second.sizes() != at::IntArrayRef(shape))
      throw core::Error(str(source_, ": tensor '", name, "' has shape ",
                            shape_str(it->second.sizes()), ", expected ", shape_str(shape)));
    return it->second.to(opts_.device, opts_.dtype).contiguous();
  }

  at::Tensor get_optional(const std::string& name, const Shape& shape) const {
    return has(name) ? get(name, shape) : at::Tensor();
  }

 private:
  const std::map<std::string, at::Tensor>& tensors_;
  std::string source_;
  const DecoderOptions& opts_;
};

// Inverse RoPE frequencies in fp32 exactly as transformers computes them
// (default, and `_compute_llama3_parameters` for rope_type llama3). Python's
// `scalar / tensor` is `tensor.reciprocal() * scalar`, written out here so the
// fp32 roundings (and the band boundaries) match.
at::Tensor rope_inv_freq(const io::ModelConfig& c, const at::Device& device) {
  const int64_t dim = c.head_dim;
  at::Tensor exponent =
      at::arange(0, dim, 2, at::TensorOptions().dtype(at::kLong).device(device)).to(at::kFloat) /
      static_cast<double>(dim);
  at::Tensor inv_freq = at::pow(c.rope_theta, exponent).reciprocal();
  if (!c.rope_scaling) return inv_freq;
  const io::RopeScaling& r = *c.rope_scaling;
  const double old_ctx = static_cast<double>(r.original_max_position_embeddings);
  const double low_freq_wavelen = old_ctx / r.low_freq_factor;
  const double high_freq_wavelen = old_ctx / r.high_freq_factor;
  at::Tensor wavelen = inv_freq.reciprocal() * (2 * kPi);
  at::Tensor scaled = at::where(wavelen > low_freq_wavelen, inv_freq / r.factor, inv_freq);
  at::Tensor smooth = (wavelen.reciprocal() * old_ctx - r.low_freq_factor) /
                      (r.high_freq_factor - r.low_freq_factor);
  at::Tensor smoothed = (1 - smooth) * scaled / r.factor + smooth * scaled;
  at::Tensor medium = (wavelen >= high_freq_wavelen).logical_and(wavelen <= low_freq_wavelen);
  return at::where(medium, smoothed, scaled);
}

void validate(const io::ModelConfig& c, const DecoderOptions& opts, const std::string& source) {
  const auto t = opts.dtype;
  if (t != at::kFloat && t != at::kBFloat16 && t != at::kHalf && t != at::kDouble)
    throw core::ConfigError(str("model.dtype: expected float32, bfloat16, float16 or float64, got ",
                                core::dtype_name(t)));
  auto positive = [&](int64_t v, const char* key) {
    if (v <= 0) throw core::Error(str(source, ": ", key, " must be positive, got ", v));
  };
  positive(c.vocab_size, "vocab_size");
  positive(c.hidden_size, "hidden_size");
  positive(c.intermediate_size, "intermediate_size");
  positive(c.num_layers, "num_hidden_layers");
  positive(c.num_heads, "num_attention_heads");
  positive(c.num_kv_heads, "num_key_value_heads");
  positive(c.head_dim, "head_dim");
  if (c.num_heads % c.num_kv_heads != 0)
    throw core::Error(str(source, ": num_attention_heads (", c.num_heads,
                          ") is not a multiple of num_key_value_heads (", c.num_kv_heads, ")"));
  if (c.head_dim % 2 != 0)
    throw core::Error(str(source, ": head_dim must be even, got ", c.head_dim));
}

}  // namespace

// ---- LinearImpl ------------------------------------------------------------------

namespace {
// Set while Decoder::teacher_hidden runs: linears use their dense weights and
// ignore providers and kernels (the teacher of distillation is the model
// without masks). Thread-local: a forward runs on one thread.
thread_local bool t_dense_weights = false;
}  // namespace

LinearImpl::LinearImpl(std::string hf_name, at::Tensor weight, at::Tensor bias)
    : name_(std::move(hf_name)) {
  weight_ = register_buffer("weight", std::move(weight));
  if (bias.defined()) bias_ = register_buffer("bias", std::move(bias));
}

at::Tensor LinearImpl::forward(const at::Tensor& x) {
  if (t_dense_weights) return at::linear(x, weight_, bias_);
  if (observer_) observer_(x);
  if (kernel_) {
    auto y = kernel_(x);
    return bias_.defined() ? y + bias_ : y;
  }
  return at::linear(x, effective_weight(), bias_);
}

at::Tensor LinearImpl::effective_weight() const {
  if (t_dense_weights || !provider_) return weight_;
  return provider_->effective_weight(weight_);
}

// ---- Decoder ---------------------------------------------------------------------

struct Decoder::Impl {
  io::ModelConfig cfg;
  DecoderOptions opts;
  // Module tree under Hugging Face names: model.{embed_tokens,layers.N,norm}.
  std::shared_ptr<torch::nn::Module> root = std::make_shared<torch::nn::Module>("Decoder");
  at::Tensor embed_weight, lm_head_weight;
  std::vector<std::shared_ptr<BlockImpl>> blocks;
  std::shared_ptr<RMSNormImpl> norm;
  at::Tensor inv_freq;  // fp32 on the device
  std::vector<LinearImpl*> linears;
  std::map<std::string, LinearImpl*> by_name;
  at::Tensor anchor;  // see CheckpointFunction

  Impl(const io::ModelConfig& config, const std::map<std::string, at::Tensor>& tensors,
       const std::string& source, const DecoderOptions& options)
      : cfg(config), opts(options) {
    if (cfg.head_dim <= 0 && cfg.num_heads > 0) cfg.head_dim = cfg.hidden_size / cfg.num_heads;
    validate(cfg, opts, source);
    const TensorSource src(tensors, source, opts);
    const int64_t h = cfg.hidden_size, hd = cfg.head_dim, inter = cfg.intermediate_size;
    const int64_t q_out = cfg.num_heads * hd, kv_out = cfg.num_kv_heads * hd;

    auto model = root->register_module("model", std::make_shared<torch::nn::Module>("Model"));
    embed_weight = src.get("model.embed_tokens.weight", {cfg.vocab_size, h});
    model->register_module("embed_tokens", std::make_shared<torch::nn::Module>("Embedding"))
        ->register_buffer("weight", embed_weight);
    auto layers = model->register_module("layers", std::make_shared<torch::nn::Module>("Layers"));

    auto linear = [&](const std::string& name, int64_t out, int64_t in, bool bias_required) {
      at::Tensor b =
          bias_required ? src.get(name + ".bias", {out}) : src.get_optional(name + ".bias", {out});
      auto l = std::make_shared<LinearImpl>(name, src.get(name + ".weight", {out, in}), b);
      linears.push_back(l.get());
      by_name[name] = l.get();
      return l;
    };
    auto rms = [&](const std::string& name, int64_t n) {
      return std::make_shared<RMSNormImpl>(src.get(name + ".weight", {n}), cfg.rms_norm_eps);
    };

    for (int64_t i = 0; i < cfg.num_layers; ++i) {
      const std::string p = str("model.layers.", i, ".");
      auto q = linear(p + "self_attn.q_proj", q_out, h, cfg.attention_bias);
      auto k = linear(p + "self_attn.k_proj", kv_out, h, cfg.attention_bias);
      auto v = linear(p + "self_attn.v_proj", kv_out, h, cfg.attention_bias);
      auto o = linear(p + "self_attn.o_proj", h, q_out, /*bias_required=*/false);
      std::shared_ptr<RMSNormImpl> qn, kn;
      if (cfg.qk_norm) {
        qn = rms(p + "self_attn.q_norm", hd);
        kn = rms(p + "self_attn.k_norm", hd);
      }
      auto attn = std::make_shared<AttentionImpl>(cfg, q, k, v, o, qn, kn);
      auto gate = linear(p + "mlp.gate_proj", inter, h, /*bias_required=*/false);
      auto up = linear(p + "mlp.up_proj", inter, h, /*bias_required=*/false);
      auto down = linear(p + "mlp.down_proj", h, inter, /*bias_required=*/false);
      auto mlp = std::make_shared<MlpImpl>(gate, up, down);
      auto block = std::make_shared<BlockImpl>(rms(p + "input_layernorm", h), attn,
                                               rms(p + "post_attention_layernorm", h), mlp);
      blocks.push_back(layers->register_module(std::to_string(i), block));
    }
    norm = model->register_module("norm", rms("model.norm", h));
    lm_head_weight =
        cfg.tie_word_embeddings ? embed_weight : src.get("lm_head.weight", {cfg.vocab_size, h});
    root->register_module("lm_head", std::make_shared<torch::nn::Module>("LMHead"))
        ->register_buffer("weight", lm_head_weight);

    inv_freq = rope_inv_freq(cfg, opts.device);
    anchor = at::zeros({}, at::TensorOptions().device(opts.device)).requires_grad_(true);
  }

  Rope rope(int64_t seq) const { return rope_at(at::arange(seq, inv_freq.options())); }

  // cos/sin at `positions` (any shape P, fp32 or int64) -> [P..., head_dim] in the compute dtype.
  Rope rope_at(const at::Tensor& positions) const {
    at::Tensor freqs = positions.to(inv_freq.options()).unsqueeze(-1) * inv_freq;
    at::Tensor emb = at::cat({freqs, freqs}, -1);
    return {emb.cos().to(opts.dtype), emb.sin().to(opts.dtype)};
  }

  at::Tensor ids_on_device(const at::Tensor& ids) const {
    if (ids.dim() != 2 || ids.scalar_type() != at::kLong)
      throw core::Error(str("decoder input: expected int64 token ids [batch, seq], got ",
                            core::dtype_name(ids.scalar_type()), " ", shape_str(ids.sizes())));
    return ids.to(opts.device);
  }

  at::Tensor embed(const at::Tensor& ids) const {
    return at::embedding(embed_weight, ids_on_device(ids));
  }

  at::Tensor block(int64_t i, const at::Tensor& x, const Rope& r) {
    if (i < 0 || i >= static_cast<int64_t>(blocks.size()))
      throw core::Error(str("decoder: block index ", i, " out of range [0, ", blocks.size(), ")"));
    BlockImpl* b = blocks[static_cast<size_t>(i)].get();
    if (!opts.checkpointing || !at::GradMode::is_enabled()) return b->forward(x, r);
    return checkpoint([b, r](const at::Tensor& in, bool recomputing) { return b->forward(in, r, !recomputing); }, x,
                      anchor);
  }

  // Final-norm hidden states [b, s, h].
  at::Tensor hidden(const at::Tensor& ids) {
    at::Tensor x = embed(ids);
    const Rope r = rope(x.size(1));
    for (int64_t i = 0; i < static_cast<int64_t>(blocks.size()); ++i) x = block(i, x, r);
    return norm->forward(x);
  }

  at::Tensor logits(const at::Tensor& normed) const {
    return at::linear(normed, lm_head_weight).to(upcast(opts.dtype));
  }

  std::pair<at::Tensor, int64_t> loss_rows(const at::Tensor& dev_ids, int64_t logit_bytes);
  at::Tensor chunked_loss(const at::Tensor& dev_ids,
                          const std::function<at::Tensor(const at::Tensor&, int64_t, int64_t)>& chunk_loss);
};

Decoder::Decoder(const io::Checkpoint& ckpt, const DecoderOptions& opts)
    : impl_(std::make_unique<Impl>(ckpt.config, ckpt.tensors, ckpt.source, opts)) {}

Decoder::Decoder(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Decoder::Decoder(Decoder&&) noexcept = default;
Decoder& Decoder::operator=(Decoder&&) noexcept = default;
Decoder::~Decoder() = default;

Decoder Decoder::random(const io::ModelConfig& config, const DecoderOptions& opts,
                        double init_std) {
  io::ModelConfig c = config;
  if (c.head_dim <= 0 && c.num_heads > 0) c.head_dim = c.hidden_size / c.num_heads;
  validate(c, opts, "random decoder");
  const auto o = at::TensorOptions().dtype(opts.dtype).device(opts.device);
  std::map<std::string, at::Tensor> t;
  auto normal = [&](const std::string& name, const Shape& shape) {
    t[name] = at::randn(shape, o) * init_std;
  };
  auto ones = [&](const std::string& name, int64_t n) { t[name] = at::ones({n}, o); };
  const int64_t h = c.hidden_size, hd = c.head_dim, inter = c.intermediate_size;
  const int64_t q_out = c.num_heads * hd, kv_out = c.num_kv_heads * hd;
  normal("model.embed_tokens.weight", {c.vocab_size, h});
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string p = str("model.layers.", i, ".");
    normal(p + "self_attn.q_proj.weight", {q_out, h});
    normal(p + "self_attn.k_proj.weight", {kv_out, h});
    normal(p + "self_attn.v_proj.weight", {kv_out, h});
    normal(p + "self_attn.o_proj.weight", {h, q_out});
    if (c.attention_bias) {
      normal(p + "self_attn.q_proj.bias", {q_out});
      normal(p + "self_attn.k_proj.bias", {kv_out});
      normal(p + "self_attn.v_proj.bias", {kv_out});
    }
    if (c.qk_norm) {
      ones(p + "self_attn.q_norm.weight", hd);
      ones(p + "self_attn.k_norm.weight", hd);
    }
    normal(p + "mlp.gate_proj.weight", {inter, h});
    normal(p + "mlp.up_proj.weight", {inter, h});
    normal(p + "mlp.down_proj.weight", {h, inter});
    ones(p + "input_layernorm.weight", h);
    ones(p + "post_attention_layernorm.weight", h);
  }
  ones("model.norm.weight", h);
  if (!c.tie_word_embeddings) normal("lm_head.weight", {c.vocab_size, h});
  return Decoder(std::make_unique<Impl>(c, t, "random decoder", opts));
}

at::Tensor Decoder::forward(const at::Tensor& ids) {
  return impl_->logits(impl_->hidden(ids));
}

KvCache Decoder::make_cache(int64_t batch, int64_t capacity) const {
  const auto& c = impl_->cfg;
  if (batch <= 0 || capacity <= 0)
    throw core::Error(str("decoder cache: batch and capacity must be positive, got ", batch, " x ", capacity));
  KvCache cache;
  cache.capacity = capacity;
  const auto o = at::TensorOptions().dtype(impl_->opts.dtype).device(impl_->opts.device);
  for (int64_t i = 0; i < c.num_layers; ++i) {
    cache.k.push_back(at::zeros({batch, c.num_kv_heads, capacity, c.head_dim}, o));
    cache.v.push_back(at::zeros({batch, c.num_kv_heads, capacity, c.head_dim}, o));
  }
  cache.valid = at::zeros({batch, capacity}, o.dtype(at::kBool));
  return cache;
}

at::Tensor Decoder::forward_cached(const at::Tensor& ids, const at::Tensor& positions, const at::Tensor& slots,
                                   const at::Tensor& real, KvCache& cache) {
  Impl& m = *impl_;
  const at::Tensor dev_ids = m.ids_on_device(ids);
  const int64_t b = dev_ids.size(0), s = dev_ids.size(1);
  if (cache.k.size() != m.blocks.size() || cache.valid.size(0) != b || positions.sizes() != dev_ids.sizes() ||
      real.sizes() != dev_ids.sizes() || slots.dim() != 1 || slots.size(0) != s)
    throw core::Error(str("decoder cache: ids ", shape_str(dev_ids.sizes()), ", positions ",
                          shape_str(positions.sizes()), ", slots ", shape_str(slots.sizes()), ", real ",
                          shape_str(real.sizes()), " do not fit a cache of batch ", cache.valid.size(0)));
  const auto dev = m.opts.device;
  const at::Tensor dev_slots = slots.to(dev, at::kLong);
  cache.valid.index_copy_(1, dev_slots, real.to(dev, at::kBool));
  // Token i of this step sees the valid slots up to its own, and always its own
  // slot: a padding token then attends to itself (finite values, which no real
  // token reads) rather than to nothing (NaN, which 0-weights would still spread).
  const at::Tensor slot_ids = at::arange(cache.capacity, dev_slots.options()).unsqueeze(0);
  const at::Tensor upto = slot_ids <= dev_slots.unsqueeze(1), own = slot_ids == dev_slots.unsqueeze(1);  // [s, cap]
  const at::Tensor allowed = ((upto.unsqueeze(0) & cache.valid.unsqueeze(1)) | own.unsqueeze(0)).unsqueeze(1);
  Rope r = m.rope_at(positions.to(dev));  // [b, s, d]
  r.cos = r.cos.unsqueeze(1);
  r.sin = r.sin.unsqueeze(1);
  at::Tensor x = m.embed(dev_ids);
  for (size_t i = 0; i < m.blocks.size(); ++i)
    x = m.blocks[i]->forward_cached(x, r, cache.k[i], cache.v[i], dev_slots, allowed);
  return m.logits(m.norm->forward(x.narrow(1, s - 1, 1))).squeeze(1);
}

namespace {

void check_loss_ids(const at::Tensor& ids, const char* what) {
  if (ids.dim() != 2 || ids.size(1) < 2)
    throw core::Error(
        str("decoder ", what, ": expected token ids [batch, seq >= 2], got ", shape_str(ids.sizes())));
}

}  // namespace

// Rows of the final hidden states that predict a next token (positions
// 0..seq-2 of every sequence, flattened), and how many of them one loss chunk
// takes: opts.loss_chunk_rows, else as many as fit kLossChunkBytes of logits
// of `logit_bytes` bytes each.
std::pair<at::Tensor, int64_t> Decoder::Impl::loss_rows(const at::Tensor& dev_ids, int64_t logit_bytes) {
  at::Tensor h = hidden(dev_ids);
  h = h.slice(1, 0, -1).reshape({-1, h.size(-1)});
  const int64_t rows = opts.loss_chunk_rows > 0
                           ? opts.loss_chunk_rows
                           : std::max<int64_t>(1, kLossChunkBytes / (logit_bytes * cfg.vocab_size));
  return {h, rows};
}

// The mean over next-token positions of a per-position loss of the logits,
// summed chunk by chunk of rows of the final hidden states: `chunk_loss(x,
// begin, end)` gets rows [begin, end) of them and returns the chunk's summed
// loss. Each chunk is recomputed in backward, so the [tokens, vocab] logits
// never exist at once.
at::Tensor Decoder::Impl::chunked_loss(
    const at::Tensor& dev_ids,
    const std::function<at::Tensor(const at::Tensor&, int64_t, int64_t)>& chunk_loss) {
  const auto [h, rows] = loss_rows(dev_ids, at::elementSize(upcast(opts.dtype)));
  const int64_t n = h.size(0);
  const bool recompute = at::GradMode::is_enabled() && h.requires_grad();
  at::Tensor total;
  for (int64_t begin = 0; begin < n; begin += rows) {
    const int64_t end = std::min(n, begin + rows);
    auto fn = [chunk_loss, begin, end](const at::Tensor& x, bool) { return chunk_loss(x, begin, end); };
    const at::Tensor hc = h.slice(0, begin, end);
    at::Tensor l = recompute ? checkpoint(fn, hc, anchor) : fn(hc, false);
    total = total.defined() ? total + l : l;
  }
  return total / static_cast<double>(n);
}

// Cross-entropy through the frozen head: linear_cross_entropy makes each
// chunk's gradient while its logits exist (no recompute, no upcast copy).
at::Tensor Decoder::loss(const at::Tensor& ids) {
  check_loss_ids(ids, "loss");
  const at::Tensor dev_ids = impl_->ids_on_device(ids);
  const at::Tensor targets = dev_ids.slice(1, 1).reshape({-1});
  const auto [h, rows] = impl_->loss_rows(dev_ids, at::elementSize(impl_->opts.dtype));
  return linear_cross_entropy(h, impl_->lm_head_weight, targets, rows) / static_cast<double>(h.size(0));
}

at::Tensor Decoder::teacher_hidden(const at::Tensor& ids) {
  c10::NoGradGuard no_grad;
  struct DenseWeights {
    DenseWeights() { t_dense_weights = true; }
    ~DenseWeights() { t_dense_weights = false; }
  } dense;
  return impl_->hidden(impl_->ids_on_device(ids));
}

at::Tensor Decoder::distill_loss(const at::Tensor& ids, const at::Tensor& teacher) {
  check_loss_ids(ids, "distill_loss");
  if (teacher.dim() != 3 || teacher.size(0) != ids.size(0) || teacher.size(1) != ids.size(1))
    throw core::Error(str("decoder distill_loss: teacher hidden states ", shape_str(teacher.sizes()),
                          " do not match the ids ", shape_str(ids.sizes())));
  const at::Tensor t = teacher.detach().slice(1, 0, -1).reshape({-1, teacher.size(-1)});
  const at::Tensor w = impl_->lm_head_weight;
  const at::ScalarType out = upcast(impl_->opts.dtype);
  // KL(teacher || model) summed over the chunk; the teacher's log-probabilities
  // are made again from its hidden states wherever the chunk is (re)computed.
  return impl_->chunked_loss(impl_->ids_on_device(ids), [w, t, out](const at::Tensor& x, int64_t begin,
                                                                    int64_t end) {
    at::Tensor log_p;
    {
      c10::NoGradGuard no_grad;
      log_p = at::log_softmax(at::linear(t.slice(0, begin, end), w).to(out), -1);
    }
    const at::Tensor log_q = at::log_softmax(at::linear(x, w).to(out), -1);
    return (log_p.exp() * (log_p - log_q)).sum();
  });
}

const io::ModelConfig& Decoder::config() const {
  return impl_->cfg;
}
const DecoderOptions& Decoder::options() const {
  return impl_->opts;
}
std::vector<LinearImpl*> Decoder::linears() {
  return impl_->linears;
}

LinearImpl* Decoder::linear(const std::string& hf_name) {
  auto it = impl_->by_name.find(hf_name);
  return it == impl_->by_name.end() ? nullptr : it->second;
}

int64_t Decoder::block_index(const std::string& hf_name) {
  static const std::string prefix = "model.layers.";
  if (hf_name.compare(0, prefix.size(), prefix) != 0) return -1;
  size_t pos = prefix.size();
  int64_t index = 0;
  const size_t start = pos;
  while (pos < hf_name.size() && hf_name[pos] >= '0' && hf_name[pos] <= '9')
    index = index * 10 + (hf_name[pos++] - '0');
  if (pos == start || (pos < hf_name.size() && hf_name[pos] != '.')) return -1;
  return index;
}

at::Tensor Decoder::embed(const at::Tensor& ids) {
  return impl_->embed(ids);
}

at::Tensor Decoder::run_block(int64_t i, const at::Tensor& hidden) {
  return impl_->block(i, hidden, impl_->rope(hidden.size(1)));
}

at::Tensor Decoder::head(const at::Tensor& hidden) {
  return impl_->logits(impl_->norm->forward(hidden));
}

int64_t Decoder::num_blocks() const {
  return static_cast<int64_t>(impl_->blocks.size());
}

}  // namespace patch::model
