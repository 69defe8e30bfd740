#include "sparsity/linear_mask.h"

#include <ATen/CPUGeneratorImpl.h>

#include <cctype>
#include <limits>
#include <mutex>

#include "core/error.h"
#include "sparsity/patterns.h"

namespace patch::sparsity {
namespace {

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

uint64_t combine(uint64_t h, uint64_t v) { return splitmix64(h ^ splitmix64(v)); }

uint64_t fnv1a(const std::string& s) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ULL;
  return h;
}

// Streams of random numbers a layer draws; each gets its own generator.
enum Stream : uint64_t { kTileNoise = 0, kPatternNoise = 1, kTileInit = 2, kPatternInit = 3 };
constexpr uint64_t kNoiseTag = 0x6e6f697365ULL, kInitTag = 0x696e6974ULL;

// A fresh generator on `device` with a fixed seed. CPU: a Mersenne twister,
// which takes 32 seed bits, so both halves are folded in. Other devices: a
// clone of the default generator (any backend, no CUDA headers), reseeded.
at::Generator make_generator(uint64_t seed, const at::Device& device) {
  if (device.is_cpu()) return at::make_generator<at::CPUGeneratorImpl>((seed ^ (seed >> 32)) & 0xffffffffULL);
  at::Generator def = at::globalContext().defaultGenerator(device);
  at::Generator gen;
  {
    std::lock_guard<std::mutex> lock(def.mutex());
    gen = def.clone();
  }
  gen.set_current_seed(seed);
  return gen;
}

// Uniform samples kept away from 0 and 1 so the logs below stay finite.
at::Tensor open_uniform(at::IntArrayRef shape, const at::Generator& gen, const at::TensorOptions& opts) {
  const double eps = opts.dtype() == at::kDouble ? 1e-12 : std::numeric_limits<float>::epsilon();
  return at::rand(shape, gen, opts).clamp_(eps, 1.0 - eps);
}

at::Tensor gumbel(at::IntArrayRef shape, const at::Generator& gen, const at::TensorOptions& opts) {
  return open_uniform(shape, gen, opts).log_().neg_().log_().neg_();
}

// g1 - g2 for independent Gumbel(0, 1) g1, g2 is Logistic(0, 1): one uniform suffices.
at::Tensor logistic(at::IntArrayRef shape, const at::Generator& gen, const at::TensorOptions& opts) {
  auto u = open_uniform(shape, gen, opts);
  return u.log() - u.neg().log1p_();
}

}  // namespace

MaskMode parse_mask_mode(const std::string& name) {
  if (name == "joint") return MaskMode::kJoint;
  if (name == "tile") return MaskMode::kTile;
  if (name == "maskllm") return MaskMode::kMaskLLM;
  throw core::ConfigError(core::str("unknown mask mode '", name, "' (expected joint, tile or maskllm)"));
}

std::string mask_mode_name(MaskMode mode) {
  switch (mode) {
    case MaskMode::kJoint: return "joint";
    case MaskMode::kTile: return "tile";
    case MaskMode::kMaskLLM: return "maskllm";
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
  const auto topts = at::TensorOptions().dtype(opts.dtype).device(opts.device);
  auto init = [&](at::IntArrayRef shape, Stream stream) {
    if (opts.init_std <= 0.0) return at::zeros(shape, topts);
    auto gen = make_generator(combine(combine(combine(opts.seed, kInitTag), name_hash_), stream), opts.device);
    return at::normal(0.0, opts.init_std, shape, gen, topts);
  };
  const bool learn_tiles = opts.mode != MaskMode::kMaskLLM;
  tile_logits_ = learn_tiles ? init({grid_.rows(), grid_.cols()}, kTileInit)
                             : at::zeros({grid_.rows(), grid_.cols()}, topts);
  tile_logits_.set_requires_grad(learn_tiles);
  if (opts.mode == MaskMode::kTile) {
    fixed_pattern_ = at::zeros({grid_.out(), grid_.groups()}, at::TensorOptions().dtype(at::kByte).device(opts.device));
  } else {
    pattern_logits_ = init({grid_.out(), grid_.groups(), kNumPatterns}, kPatternInit);
    pattern_logits_.set_requires_grad(true);
  }
}

void LinearMask::set_fixed_pattern(const at::Tensor& pattern) {
  core::check(opts_.mode == MaskMode::kTile, name_, "a fixed 2:4 pattern exists only in tile mode");
  core::check(pattern.dim() == 2 && pattern.size(0) == grid_.out() && pattern.size(1) == grid_.groups(), name_,
              core::str("fixed pattern must be [", grid_.out(), ", ", grid_.groups(), "]"));
  auto p = pattern.to(opts_.device, at::kLong);
  core::check(p.numel() == 0 || (p.min().item<int64_t>() >= 0 && p.max().item<int64_t>() < kNumPatterns), name_,
              "fixed pattern indices must be 0-5");
  fixed_pattern_ = p.to(at::kByte).contiguous();
}

std::vector<at::Tensor> LinearMask::parameters() const {
  std::vector<at::Tensor> out;
  if (tile_logits_.requires_grad()) out.push_back(tile_logits_);
  if (pattern_logits_.defined()) out.push_back(pattern_logits_);
  return out;
}

std::vector<std::pair<std::string, at::Tensor>> LinearMask::named_state() const {
  std::vector<std::pair<std::string, at::Tensor>> out{{name_ + ".tile_logits", tile_logits_}};
  if (pattern_logits_.defined()) out.emplace_back(name_ + ".pattern_logits", pattern_logits_);
  if (fixed_pattern_.defined()) out.emplace_back(name_ + ".fixed_pattern", fixed_pattern_);
  return out;
}

uint64_t LinearMask::noise_seed(uint64_t stream) const {
  uint64_t h = combine(combine(state_->seed, kNoiseTag), static_cast<uint64_t>(state_->step));
  return combine(combine(h, name_hash_), stream);
}

at::Tensor LinearMask::gates(bool noise, bool hard) const {
  if (opts_.mode == MaskMode::kMaskLLM) return at::zeros_like(tile_logits_);
  auto x = tile_logits_ * state_->scale_tile;
  if (noise)
    x = x + logistic(tile_logits_.sizes(), make_generator(noise_seed(kTileNoise), opts_.device),
                     tile_logits_.options());
  auto y = at::sigmoid(x / state_->tau_tile);
  // Straight-through, written y_hard + (y - y.detach()) so the forward value is exactly 0/1.
  if (hard) y = y.gt(0.5).to(y.scalar_type()) + (y - y.detach());
  return y;
}

at::Tensor LinearMask::mask_24(bool noise, bool hard) const {
  if (opts_.mode == MaskMode::kTile) return expand_patterns(fixed_pattern_, opts_.dtype);
  auto x = pattern_logits_ * state_->scale_24;
  if (noise)
    x = x + gumbel(pattern_logits_.sizes(), make_generator(noise_seed(kPatternNoise), opts_.device),
                   pattern_logits_.options());
  auto p = at::softmax(x / state_->tau_24, -1);
  if (hard) p = at::zeros_like(p).scatter_(-1, p.argmax(-1, /*keepdim=*/true), 1.0) + (p - p.detach());
  auto table = pattern_table(at::TensorOptions().dtype(opts_.dtype).device(opts_.device));
  return at::matmul(p, table).view({grid_.out(), grid_.in()});
}

at::Tensor LinearMask::mask(bool noise, bool hard_24, bool hard_tile) const {
  auto m24 = mask_24(noise, hard_24);
  if (opts_.mode == MaskMode::kMaskLLM) return m24;
  auto t = grid_.expand(gates(noise, hard_tile));
  return t + (1.0 - t) * m24;
}

at::Tensor LinearMask::tile_gates(bool noise) const { return gates(noise, state_->hard_tile); }
at::Tensor LinearMask::sampled_mask() const { return mask(/*noise=*/true, state_->hard_24, state_->hard_tile); }
at::Tensor LinearMask::soft_mask(bool noise) const { return mask(noise, /*hard_24=*/false, /*hard_tile=*/false); }

at::Tensor LinearMask::effective_weight(const at::Tensor& weight) {
  core::check(weight.dim() == 2 && weight.size(0) == grid_.out() && weight.size(1) == grid_.in(), name_,
              core::str("weight ", weight.sizes(), " does not match the mask ", grid_.str()));
  core::check(weight.device() == tile_logits_.device(), name_,
              core::str("weight on ", weight.device(), " but mask logits on ", tile_logits_.device()));
  return weight * sampled_mask().to(weight.scalar_type());
}

at::Tensor LinearMask::hard_tiles() const {
  if (opts_.mode == MaskMode::kMaskLLM) return at::zeros(tile_logits_.sizes(), tile_logits_.options().dtype(at::kByte));
  return tile_logits_.detach().gt(0).to(at::kByte);
}

at::Tensor LinearMask::hard_pattern() const {
  if (opts_.mode == MaskMode::kTile) return fixed_pattern_.clone();
  return pattern_logits_.detach().argmax(-1).to(at::kByte);
}

at::Tensor LinearMask::hard_mask() const { return build_mask(grid_, hard_tiles(), hard_pattern(), opts_.dtype); }

at::Tensor LinearMask::soft_density() const {
  if (opts_.mode == MaskMode::kMaskLLM) return at::full({}, 0.5, at::TensorOptions().dtype(opts_.dtype).device(opts_.device));
  auto t = gates(/*noise=*/true, state_->hard_tile);
  auto counts = grid_.counts().to(t.device(), t.scalar_type());
  return 0.5 + 0.5 * (counts * t).sum() / static_cast<double>(grid_.numel());
}

double LinearMask::expected_density() const {
  if (opts_.mode == MaskMode::kMaskLLM) return 0.5;
  auto p = at::sigmoid(tile_logits_.detach().to(at::kCPU, at::kDouble) * state_->scale_tile);
  auto dense = (grid_.counts().to(at::kDouble) * p).sum().item<double>();
  return 0.5 + 0.5 * dense / static_cast<double>(grid_.numel());
}

at::Tensor LinearMask::weight_term(const at::Tensor& weight) const {
  const auto dtype = at::promote_types(opts_.dtype, at::kFloat);
  return (weight.to(dtype) * sampled_mask().to(dtype)).square().sum();
}

at::Tensor FixedMask::effective_weight(const at::Tensor& weight) {
  core::check(weight.sizes() == mask_.sizes(), "FixedMask",
              core::str("weight ", weight.sizes(), " does not match mask ", mask_.sizes()));
  if (!cast_.defined() || cast_.scalar_type() != weight.scalar_type() || cast_.device() != weight.device())
    cast_ = mask_.to(weight.device(), weight.scalar_type());
  return weight * cast_;
}

}  // namespace patch::sparsity
