#include "sparsity/linear_mask.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cctype>
#include <limits>
#include <mutex>

#include "core/error.h"
#include "sparsity/mask_kernels.h"
#include "sparsity/patterns.h"
#include "sparsity/step_scalars.h"

namespace patch::sparsity {
namespace {

uint64_t fnv1a(const std::string& s) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ULL;
  return h;
}

// A fresh generator on `device` with a fixed seed. CPU: a Mersenne twister,
// which takes 32 seed bits, so both halves are folded in. Other devices: a
// clone of the default generator (any backend, no CUDA headers), reseeded.
at::Generator make_generator(uint64_t seed, const at::Device& device) {
  if (device.is_cpu())
    return at::make_generator<at::CPUGeneratorImpl>((seed ^ (seed >> 32)) & 0xffffffffULL);
  at::Generator def = at::globalContext().defaultGenerator(device);
  at::Generator gen;
  {
    std::lock_guard<std::mutex> lock(def.mutex());
    gen = def.clone();
  }
  gen.set_current_seed(seed);
  return gen;
}

}  // namespace

// One fused call: what the kernels need, fixed at forward time so that the
// backward rebuilds exactly the forward's mask (the noise from its keys).
struct FusedMask : torch::CustomClassHolder {
  LinearMask* owner;
  at::Tensor weight, pattern;  // pattern: detached 2:4 logits, or the fixed patterns
  at::Tensor gates, soft;      // tile gates T (forward values) and their soft values
  GroupSampling s;

  FusedMask(LinearMask& m, const at::Tensor& w) : owner(&m), weight(w) {
    const SamplerState& st = *m.state_;
    s.fixed = m.opts_.mode == MaskMode::kTile;
    s.has_tiles = m.opts_.mode != MaskMode::kMaskLLM;
    s.scale = st.scale_24;
    s.tau = st.tau_24;
    s.hard = st.hard_24;
    s.key = m.noise_seed(kPatternNoise);
    s.device = device_scalars(st);
    s.layer_hash = m.name_hash_;
    s.tile_rows = m.grid_.tile_rows();
    s.tile_cols = m.grid_.tile_cols();
    pattern = s.fixed ? m.fixed_pattern_ : m.pattern_logits_.detach();
    if (s.has_tiles) {
      const at::Tensor& g = m.step_gates();
      gates = g[0];
      soft = g[1];
    }
  }

  at::Tensor forward(at::ScalarType out_dtype) const {
    return masked_weight_forward(weight, gates, pattern, s, out_dtype);
  }

  // Logit gradients from dL/d(W * M); compact state updates the 2:4 logits instead.
  std::pair<at::Tensor, at::Tensor> backward(const at::Tensor& grad, bool tile_grad,
                                             bool inline_update) const {
    LinearMask& m = *owner;
    InlineAdam adam;
    const bool inline_adam = inline_update && m.opts_.compact && !s.fixed;
    if (inline_adam) {
      const auto& u = m.state_->update;
      adam = {u.lr,
              u.beta1,
              u.beta2,
              u.eps,
              u.weight_decay,
              SamplerState::bias_correction(u.beta1, u.steps),
              SamplerState::bias_correction(u.beta2, u.steps),
              u.grad_scale,
              m.noise_seed(kRounding),
              m.exp_avg_,
              m.exp_avg_sq_};
    }
    auto g = masked_weight_backward(grad, weight, gates, pattern, s, inline_adam ? &adam : nullptr);
    if (inline_adam)
      m.pattern_sq_norm_ =
          m.pattern_sq_norm_.defined() ? m.pattern_sq_norm_ + g.sq_norm : g.sq_norm;
    at::Tensor dtile;
    if (s.has_tiles && tile_grad)
      dtile = tile_logit_grad(g.tile_rows, soft, m.grid_.tile_rows(),
                              m.state_->scale_tile / m.state_->tau_tile, s.device)
                  .to(m.tile_logits_.scalar_type());
    at::Tensor dpattern =
        g.pattern.defined() ? g.pattern.to(m.pattern_logits_.scalar_type()) : at::Tensor();
    return {dtile, dpattern};
  }
};

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

c10::intrusive_ptr<FusedMask> fused_of(AutogradContext* ctx) {
  return c10::static_intrusive_pointer_cast<FusedMask>(ctx->saved_data["fused"].toCapsule());
}

// Tile gates with a straight-through hard forward value: the soft gate's
// derivative soft (1 - soft) k carries the gradient.
struct GatesFn : torch::autograd::Function<GatesFn> {
  // g: [2, rows, cols] forward values and soft gates of `logits`; k as
  // tile_k_value gives it.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& /*logits*/, const at::Tensor& g,
                            at::IValue k) {
    ctx->save_for_backward({g[1]});
    ctx->saved_data["k"] = std::move(k);
    return g[0].clone();
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    const auto soft = ctx->get_saved_variables()[0];
    return {times_tile_k(grad_out[0] * soft * (1.0 - soft), ctx->saved_data["k"]), at::Tensor(),
            at::Tensor()};
  }
};

// W * M with inputs (tile logits, 2:4 logits or fixed patterns).
struct MaskedWeightFn : torch::autograd::Function<MaskedWeightFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& /*tiles*/,
                            const at::Tensor& /*patterns*/, c10::intrusive_ptr<FusedMask> f) {
    ctx->saved_data["fused"] = at::IValue::make_capsule(f);
    return f->forward(f->weight.scalar_type());
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    auto [dtile, dpattern] =
        fused_of(ctx)->backward(grad_out[0], ctx->needs_input_grad(0), /*inline_update=*/true);
    return {dtile, dpattern, at::Tensor()};
  }
};

// ||W * M||_F^2; its backward is the masked weight's with dL/d(W*M) = 2 g W*M,
// the product recomputed instead of kept.
struct WeightTermFn : torch::autograd::Function<WeightTermFn> {
  static at::ScalarType acc(const FusedMask& f) {
    return at::promote_types(f.owner->options().dtype, at::kFloat);
  }
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& /*tiles*/,
                            const at::Tensor& /*patterns*/, c10::intrusive_ptr<FusedMask> f) {
    ctx->saved_data["fused"] = at::IValue::make_capsule(f);
    return f->forward(acc(*f)).square().sum();
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    auto f = fused_of(ctx);
    auto grad = f->forward(acc(*f)) * (2.0 * grad_out[0]);
    auto [dtile, dpattern] = f->backward(grad, ctx->needs_input_grad(0), /*inline_update=*/false);
    return {dtile, dpattern, at::Tensor()};
  }
};

const StepScalars* device_scalars(const SamplerState& st) {
  return st.device.defined() ? reinterpret_cast<const StepScalars*>(st.device.data_ptr()) : nullptr;
}

at::IValue tile_k_value(const SamplerState& st) {
  if (!st.device.defined()) return st.scale_tile / st.tau_tile;
  return st.device.narrow(0, offsetof(StepScalars, k_tile) / sizeof(float), 1).squeeze(0);
}

at::Tensor times_tile_k(const at::Tensor& x, const at::IValue& k) {
  return k.isTensor() ? x * k.toTensor() : x * k.toDouble();
}

MaskMode parse_mask_mode(const std::string& name) {
  if (name == "joint") return MaskMode::kJoint;
  if (name == "tile") return MaskMode::kTile;
  if (name == "maskllm") return MaskMode::kMaskLLM;
  throw core::ConfigError(
      core::str("unknown mask mode '", name, "' (expected joint, tile or maskllm)"));
}

std::string mask_mode_name(MaskMode mode) {
  switch (mode) {
    case MaskMode::kJoint:
      return "joint";
    case MaskMode::kTile:
      return "tile";
    case MaskMode::kMaskLLM:
      return "maskllm";
  }
  return "?";
}

int64_t block_index(const std::string& hf_name) {
  const std::string key = "layers.";
  for (size_t pos = hf_name.find(key); pos != std::string::npos; pos = hf_name.find(key, pos + 1)) {
    if (pos != 0 && hf_name[pos - 1] != '.') continue;
    size_t i = pos + key.size(), j = i;
    while (j < hf_name.size() && std::isdigit(static_cast<unsigned char>(hf_name[j]))) ++j;
    if (j > i && j - i < 10 && (j == hf_name.size() || hf_name[j] == '.'))
      return std::stoll(hf_name.substr(i, j - i));
  }
  return -1;
}

LinearMask::LinearMask(std::string name, TileGrid grid, std::shared_ptr<const SamplerState> state,
                       const LinearMaskOptions& opts)
    : name_(std::move(name)),
      block_(block_index(name_)),
      name_hash_(fnv1a(name_)),
      grid_(grid),
      state_(std::move(state)),
      opts_(opts) {
  core::check(state_ != nullptr, name_, "LinearMask needs a sampler state");
  core::check(opts.dtype == at::kFloat || opts.dtype == at::kDouble, name_,
              "mask logits must be float32 or float64");
  core::check(!opts.compact || opts.fused, name_, "compact state needs the fused mask kernels");
  const auto topts = at::TensorOptions().dtype(opts.dtype).device(opts.device);
  auto init = [&](at::IntArrayRef shape, Stream stream) {
    if (opts.init_std <= 0.0) return at::zeros(shape, topts);
    auto gen = make_generator(combine(combine(combine(opts.seed, kInitTag), name_hash_), stream),
                              opts.device);
    return at::normal(0.0, opts.init_std, shape, gen, topts);
  };
  const bool learn_tiles = opts.mode != MaskMode::kMaskLLM;
  tile_logits_ = learn_tiles ? init({grid_.rows(), grid_.cols()}, kTileInit)
                             : at::zeros({grid_.rows(), grid_.cols()}, topts);
  tile_logits_.set_requires_grad(learn_tiles);
  counts_ = grid_.counts().to(opts.device, opts.dtype);  // on the device once: no copy per step
  if (opts.mode == MaskMode::kTile) {
    fixed_pattern_ = at::zeros({grid_.out(), grid_.groups()},
                               at::TensorOptions().dtype(at::kByte).device(opts.device));
  } else {
    pattern_logits_ = init({grid_.out(), grid_.groups(), kNumPatterns}, kPatternInit);
    if (opts.compact) {
      pattern_logits_ = pattern_logits_.to(at::kBFloat16);
      exp_avg_ = at::zeros_like(pattern_logits_);
      exp_avg_sq_ = at::zeros_like(pattern_logits_);
    }
    // Compact logits never receive a .grad, but requiring one makes autograd
    // run the fused backward (which updates them) even in maskllm mode.
    pattern_logits_.set_requires_grad(true);
  }
}

void LinearMask::set_fixed_pattern(const at::Tensor& pattern) {
  core::check(opts_.mode == MaskMode::kTile, name_, "a fixed 2:4 pattern exists only in tile mode");
  core::check(
      pattern.dim() == 2 && pattern.size(0) == grid_.out() && pattern.size(1) == grid_.groups(),
      name_, core::str("fixed pattern must be [", grid_.out(), ", ", grid_.groups(), "]"));
  auto p = pattern.to(opts_.device, at::kLong);
  core::check(
      p.numel() == 0 || (p.min().item<int64_t>() >= 0 && p.max().item<int64_t>() < kNumPatterns),
      name_, "fixed pattern indices must be 0-5");
  fixed_pattern_ = p.to(at::kByte).contiguous();
}

std::vector<at::Tensor> LinearMask::parameters() const {
  std::vector<at::Tensor> out;
  for (auto& [name, t] : named_parameters()) out.push_back(t);
  return out;
}

std::vector<std::pair<std::string, at::Tensor>> LinearMask::named_parameters() const {
  std::vector<std::pair<std::string, at::Tensor>> out;
  if (tile_logits_.requires_grad()) out.emplace_back(name_ + ".tile_logits", tile_logits_);
  if (pattern_logits_.defined() && !opts_.compact)
    out.emplace_back(name_ + ".pattern_logits", pattern_logits_);
  return out;
}

std::vector<std::pair<std::string, at::Tensor>> LinearMask::named_state() const {
  std::vector<std::pair<std::string, at::Tensor>> out{{name_ + ".tile_logits", tile_logits_}};
  if (pattern_logits_.defined()) out.emplace_back(name_ + ".pattern_logits", pattern_logits_);
  if (fixed_pattern_.defined()) out.emplace_back(name_ + ".fixed_pattern", fixed_pattern_);
  if (exp_avg_.defined()) {
    out.emplace_back(name_ + ".pattern_exp_avg", exp_avg_);
    out.emplace_back(name_ + ".pattern_exp_avg_sq", exp_avg_sq_);
  }
  return out;
}

at::Tensor LinearMask::take_pattern_sq_norm() {
  at::Tensor out = pattern_sq_norm_;
  pattern_sq_norm_ = at::Tensor();
  return out;
}

uint64_t LinearMask::noise_seed(uint64_t stream) const {
  return layer_key(step_key(state_->seed, state_->step), name_hash_, stream);
}

at::Tensor LinearMask::gates(bool noise, bool hard) const {
  if (opts_.mode == MaskMode::kMaskLLM) return at::zeros_like(tile_logits_);
  const at::Tensor g =
      noise && hard == state_->hard_tile
          ? step_gates()
          : sparsity::tile_gates(tile_logits_.detach(), state_->scale_tile, state_->tau_tile, hard,
                                 noise, noise_seed(kTileNoise))
                .to(tile_logits_.scalar_type());
  return GatesFn::apply(tile_logits_, g, tile_k_value(*state_));
}

const at::Tensor& LinearMask::step_gates() const {
  const SamplerState& st = *state_;
  GateCache& c = gate_cache_;
  const uint32_t version = tile_logits_._version();
  if (!c.gates.defined() || c.step != st.step || c.seed != st.seed || c.scale != st.scale_tile ||
      c.tau != st.tau_tile || c.hard != st.hard_tile || c.version != version) {
    c = {st.step,
         st.seed,
         st.scale_tile,
         st.tau_tile,
         st.hard_tile,
         version,
         sparsity::tile_gates(tile_logits_.detach(), st.scale_tile, st.tau_tile, st.hard_tile,
                              /*noise=*/true, noise_seed(kTileNoise), device_scalars(st),
                              name_hash_)
             .to(tile_logits_.scalar_type())};
  }
  return c.gates;
}

at::Tensor LinearMask::mask_24(bool noise, bool hard) const {
  if (opts_.mode == MaskMode::kTile) return expand_patterns(fixed_pattern_, opts_.dtype);
  auto x = pattern_logits_.to(opts_.dtype) * state_->scale_24;
  if (noise)
    x = x + gumbel_noise(grid_.out(), grid_.groups(), noise_seed(kPatternNoise), x.options());
  auto p = at::softmax(x / state_->tau_24, -1);
  if (hard)
    p = at::zeros_like(p).scatter_(-1, p.argmax(-1, /*keepdim=*/true), 1.0) + (p - p.detach());
  auto table = pattern_table(at::TensorOptions().dtype(opts_.dtype).device(opts_.device));
  return at::matmul(p, table).view({grid_.out(), grid_.in()});
}

at::Tensor LinearMask::mask(bool noise, bool hard_24, bool hard_tile) const {
  auto m24 = mask_24(noise, hard_24);
  if (opts_.mode == MaskMode::kMaskLLM) return m24;
  auto t = grid_.expand(gates(noise, hard_tile));
  return t + (1.0 - t) * m24;
}

at::Tensor LinearMask::pattern_noise() const {
  return gumbel_noise(grid_.out(), grid_.groups(), noise_seed(kPatternNoise),
                      tile_logits_.options().dtype(at::kFloat));
}
at::Tensor LinearMask::tile_noise() const {
  return logistic_noise(grid_.rows(), grid_.cols(), noise_seed(kTileNoise),
                        tile_logits_.options().dtype(at::kFloat));
}

at::Tensor LinearMask::tile_gates(bool noise) const {
  return gates(noise, state_->hard_tile);
}
at::Tensor LinearMask::sampled_mask() const {
  return mask(/*noise=*/true, state_->hard_24, state_->hard_tile);
}
at::Tensor LinearMask::soft_mask(bool noise) const {
  return mask(noise, /*hard_24=*/false, /*hard_tile=*/false);
}

at::Tensor LinearMask::effective_weight(const at::Tensor& weight) {
  core::check(weight.dim() == 2 && weight.size(0) == grid_.out() && weight.size(1) == grid_.in(),
              name_,
              core::str("weight ", weight.sizes(), " does not match the mask ", grid_.str()));
  core::check(
      weight.device() == tile_logits_.device(), name_,
      core::str("weight on ", weight.device(), " but mask logits on ", tile_logits_.device()));
  if (!opts_.fused) return weight * sampled_mask().to(weight.scalar_type());
  auto f = c10::make_intrusive<FusedMask>(*this, weight);
  return MaskedWeightFn::apply(tile_logits_, f->s.fixed ? fixed_pattern_ : pattern_logits_, f);
}

at::Tensor LinearMask::hard_tiles() const {
  if (opts_.mode == MaskMode::kMaskLLM)
    return at::zeros(tile_logits_.sizes(), tile_logits_.options().dtype(at::kByte));
  return tile_logits_.detach().gt(0).to(at::kByte);
}

at::Tensor LinearMask::hard_pattern() const {
  if (opts_.mode == MaskMode::kTile) return fixed_pattern_.clone();
  return pattern_logits_.detach().argmax(-1).to(at::kByte);
}

at::Tensor LinearMask::hard_mask() const {
  return build_mask(grid_, hard_tiles(), hard_pattern(), opts_.dtype);
}

at::Tensor LinearMask::soft_density() const {
  if (opts_.mode == MaskMode::kMaskLLM)
    return at::full({}, 0.5, at::TensorOptions().dtype(opts_.dtype).device(opts_.device));
  auto t = gates(/*noise=*/true, state_->hard_tile);
  return 0.5 + (counts_ * t).sum() * (0.5 / static_cast<double>(grid_.numel()));
}

double LinearMask::expected_density() const {
  if (opts_.mode == MaskMode::kMaskLLM) return 0.5;
  auto p = at::sigmoid(tile_logits_.detach().to(at::kCPU, at::kDouble) * state_->scale_tile);
  auto dense = (grid_.counts().to(at::kDouble) * p).sum().item<double>();
  return 0.5 + 0.5 * dense / static_cast<double>(grid_.numel());
}

at::Tensor LinearMask::weight_term(const at::Tensor& weight) const {
  if (opts_.fused) {
    // Its backward must not run the compact in-backward update a second time.
    core::check(!opts_.compact, name_, "the kept-weight term is not available with compact state");
    auto f = c10::make_intrusive<FusedMask>(const_cast<LinearMask&>(*this), weight);
    return WeightTermFn::apply(tile_logits_, f->s.fixed ? fixed_pattern_ : pattern_logits_, f);
  }
  const auto dtype = at::promote_types(opts_.dtype, at::kFloat);
  return (weight.to(dtype) * sampled_mask().to(dtype)).square().sum();
}

at::Tensor FixedMask::effective_weight(const at::Tensor& weight) {
  core::check(weight.sizes() == mask_.sizes(), "FixedMask",
              core::str("weight ", weight.sizes(), " does not match mask ", mask_.sizes()));
  if (!cast_.defined() || cast_.scalar_type() != weight.scalar_type() ||
      cast_.device() != weight.device())
    cast_ = mask_.to(weight.device(), weight.scalar_type());
  return weight * cast_;
}

}  // namespace patch::sparsity
