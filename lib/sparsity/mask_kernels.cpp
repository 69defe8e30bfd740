#include "sparsity/mask_kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "core/dispatch.h"
#include "core/error.h"
#include "sparsity/mask_group.h"

namespace patch::sparsity {
namespace {

void check_inputs(const at::Tensor& weight, const at::Tensor& gates, const at::Tensor& pattern,
                  const GroupSampling& s) {
  core::check(weight.dim() == 2 && weight.size(1) % 4 == 0, "mask kernels",
              core::str("weight must be [out, in] with in % 4 == 0, got ", weight.sizes()));
  const int64_t out = weight.size(0), groups = weight.size(1) / 4;
  if (s.fixed)
    core::check(pattern.scalar_type() == at::kByte && pattern.dim() == 2 &&
                    pattern.size(0) == out && pattern.size(1) == groups,
                "mask kernels", core::str("fixed pattern must be uint8 [", out, ", ", groups, "]"));
  else
    core::check(
        pattern.dim() == 3 && pattern.size(0) == out && pattern.size(1) == groups &&
            pattern.size(2) == 6,
        "mask kernels",
        core::str("2:4 logits must be [", out, ", ", groups, ", 6], got ", pattern.sizes()));
  if (s.has_tiles)
    core::check(gates.dim() == 2 && gates.size(0) == (out + s.tile_rows - 1) / s.tile_rows &&
                    gates.size(1) == (weight.size(1) + s.tile_cols - 1) / s.tile_cols,
                "mask kernels",
                core::str("tile gates ", gates.sizes(), " do not match ", weight.sizes()));
  core::check(s.tile_cols % 4 == 0, "mask kernels", "tile columns must be a multiple of 4");
}

int64_t tile_cols_of(const at::Tensor& weight, const GroupSampling& s) {
  return (weight.size(1) + s.tile_cols - 1) / s.tile_cols;
}

// The reference computes in the logits' precision (float64 for gradient checks).
at::ScalarType acc_type(const at::Tensor& gates, const at::Tensor& pattern,
                        const GroupSampling& s) {
  const bool dbl = s.fixed ? s.has_tiles && gates.scalar_type() == at::kDouble
                           : pattern.scalar_type() == at::kDouble;
  return dbl ? at::kDouble : at::kFloat;
}

// The sampled group q (row `row`): forward mask values m[4] and soft p[6].
template <typename Acc, typename L>
void sample_cpu(const L* logits, const uint8_t* fixed, const Acc* gates, int64_t row, int64_t grp,
                int64_t groups, int64_t cols, const GroupSampling& s, Acc& t, Acc p[6],
                Acc m24[4]) {
  const int64_t q = row * groups + grp;
  t = s.has_tiles ? gates[(row / s.tile_rows) * cols + (4 * grp) / s.tile_cols] : Acc(0);
  if (s.fixed) {
    const uint32_t bits = group::pattern_bits(fixed[q]);
    for (int j = 0; j < 4; ++j) m24[j] = (bits >> j) & 1u ? Acc(1) : Acc(0);
  } else {
    group::sample<Acc>(logits + 6 * q, s.key, static_cast<uint64_t>(q), static_cast<Acc>(s.scale),
                       static_cast<Acc>(1.0 / s.tau), s.noise, s.hard, p, m24);
  }
}

template <typename Acc, typename L>
void forward_cpu(const Acc* w, const Acc* gates, const L* logits, const uint8_t* fixed, Acc* out,
                 int64_t rows, int64_t groups, int64_t cols, const GroupSampling& s) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o)
      for (int64_t grp = 0; grp < groups; ++grp) {
        Acc t, p[6], m24[4];
        sample_cpu<Acc, L>(logits, fixed, gates, o, grp, groups, cols, s, t, p, m24);
        const int64_t base = o * groups * 4 + 4 * grp;
        for (int j = 0; j < 4; ++j) out[base + j] = w[base + j] * (t + (Acc(1) - t) * m24[j]);
      }
  });
}

template <typename Acc, typename L>
void backward_cpu(const Acc* grad, const Acc* w, const Acc* gates, L* logits, const uint8_t* fixed,
                  Acc* dlogits, Acc* tile_rows, Acc* sq_rows, int64_t rows, int64_t groups,
                  int64_t cols, const GroupSampling& s, const group::AdamArgs* adam, L* m, L* v) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o)
      for (int64_t grp = 0; grp < groups; ++grp) {
        const int64_t q = o * groups + grp, base = 4 * q, c = (4 * grp) / s.tile_cols;
        Acc t, p[6], m24[4], dm24[4], dt = 0;
        sample_cpu<Acc, L>(logits, fixed, gates, o, grp, groups, cols, s, t, p, m24);
        for (int j = 0; j < 4; ++j) {
          const Acc dm = grad[base + j] * w[base + j];
          dm24[j] = dm * (Acc(1) - t);
          dt += dm * (Acc(1) - m24[j]);
        }
        if (s.has_tiles) tile_rows[o * cols + c] += dt;
        if (s.fixed) continue;
        Acc dl[6];
        group::logit_grad<Acc>(p, dm24, static_cast<Acc>(s.scale), static_cast<Acc>(1.0 / s.tau),
                               dl);
        if (adam) {
          for (int k = 0; k < 6; ++k) sq_rows[o * cols + c] += dl[k] * dl[k];
          group::adam6<L, Acc>(logits + 6 * q, m + 6 * q, v + 6 * q, dl, *adam,
                               static_cast<uint64_t>(q));
        } else {
          for (int k = 0; k < 6; ++k) dlogits[6 * q + k] = dl[k];
        }
      }
  });
}

}  // namespace

group::AdamArgs adam_args(const InlineAdam& a) {
  return {static_cast<float>(a.lr),
          static_cast<float>(a.beta1),
          static_cast<float>(a.beta2),
          static_cast<float>(a.eps),
          static_cast<float>(a.weight_decay),
          static_cast<float>(1.0 / a.bias1),
          static_cast<float>(1.0 / a.bias2),
          static_cast<float>(a.grad_scale),
          a.round_key};
}

at::Tensor gumbel_noise(int64_t out, int64_t groups, uint64_t key, const at::TensorOptions& opts) {
  auto noise = at::empty({out, groups, 6}, opts.dtype(at::kFloat));
  core::dispatch(
      noise, "gumbel_noise", [&] { cuda::gumbel_noise(noise, key); },
      [&] {
        float* n = noise.data_ptr<float>();
        at::parallel_for(0, out * groups, 1024, [&](int64_t begin, int64_t end) {
          for (int64_t q = begin; q < end; ++q) group::gumbel6(key, static_cast<uint64_t>(q), n + 6 * q);
        });
      });
  return noise.to(opts.dtype());
}

at::Tensor logistic_noise(int64_t rows, int64_t cols, uint64_t key, const at::TensorOptions& opts) {
  auto noise = at::empty({rows, cols}, opts.dtype(at::kFloat));
  core::dispatch(
      noise, "logistic_noise", [&] { cuda::logistic_noise(noise, key); },
      [&] {
        float* n = noise.data_ptr<float>();
        for (int64_t t = 0; t < rows * cols; ++t) n[t] = group::logistic1(key, static_cast<uint64_t>(t));
      });
  return noise.to(opts.dtype());
}

at::Tensor tile_gates(const at::Tensor& logits, double scale, double tau, bool hard, bool noise,
                      uint64_t key, const StepScalars* device, uint64_t layer_hash) {
  core::check(logits.dim() == 2, "tile_gates", "tile logits must be [rows, cols]");
  auto on_cuda = [&] {
    auto out = at::empty({2, logits.size(0), logits.size(1)}, logits.options().dtype(at::kFloat));
    cuda::tile_gates(logits, scale, tau, hard, noise, key, device, layer_hash, out);
    return out;
  };
  auto on_cpu = [&] {
    core::check(device == nullptr, "tile_gates", "device step values need CUDA tensors");
    auto l = logits.contiguous();
    auto out = at::empty({2, l.size(0), l.size(1)}, l.options());
    AT_DISPATCH_FLOATING_TYPES(l.scalar_type(), "tile_gates", [&] {
      const scalar_t* src = l.data_ptr<scalar_t>();
      scalar_t* fwd = out.data_ptr<scalar_t>();
      scalar_t* soft = fwd + l.numel();
      for (int64_t t = 0; t < l.numel(); ++t) {
        const double n = noise ? group::logistic1(key, static_cast<uint64_t>(t)) : 0.0;
        const double y = 1.0 / (1.0 + std::exp(-(scale * static_cast<double>(src[t]) + n) / tau));
        soft[t] = static_cast<scalar_t>(y);
        fwd[t] = hard ? static_cast<scalar_t>(y > 0.5 ? 1 : 0) : soft[t];
      }
    });
    return out;
  };
  return core::dispatch(logits, "tile_gates", on_cuda, on_cpu);
}

namespace {
// The CPU reference of tile_logit_grad.
at::Tensor tile_logit_grad_cpu(const at::Tensor& partial, const at::Tensor& soft, int64_t tile_rows, double k) {
  auto p = partial.contiguous();
  auto s = soft.to(p.scalar_type()).contiguous();
  auto out = at::empty(s.sizes(), p.options());
  const int64_t rows = s.size(0), cols = s.size(1), out_rows = p.size(0);
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "tile_logit_grad", [&] {
    const scalar_t* src = p.data_ptr<scalar_t>();
    const scalar_t* sv = s.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        scalar_t sum = 0;
        for (int64_t o = r * tile_rows; o < std::min(out_rows, (r + 1) * tile_rows); ++o)
          sum += src[o * cols + c];
        const scalar_t y = sv[r * cols + c];
        dst[r * cols + c] = sum * y * (scalar_t(1) - y) * static_cast<scalar_t>(k);
      }
  });
  return out;
}
}  // namespace

at::Tensor tile_logit_grad(const at::Tensor& partial, const at::Tensor& soft, int64_t tile_rows,
                           double k, const StepScalars* device) {
  core::check(partial.dim() == 2 && soft.dim() == 2 && partial.size(1) == soft.size(1) &&
                  (partial.size(0) + tile_rows - 1) / tile_rows == soft.size(0),
              "tile_logit_grad", "partial sums and tile gates do not match");
  return core::dispatch(
      partial, "tile_logit_grad",
      [&] {
        auto out = at::empty(soft.sizes(), partial.options().dtype(at::kFloat));
        cuda::tile_logit_grad(partial, soft, tile_rows, k, device, out);
        return out;
      },
      [&] {
        core::check(device == nullptr, "tile_logit_grad", "device step values need CUDA tensors");
        return tile_logit_grad_cpu(partial, soft, tile_rows, k);
      });
}

namespace {
// The CPU reference of masked_weight_forward.
at::Tensor masked_weight_forward_cpu(const at::Tensor& weight, const at::Tensor& gates, const at::Tensor& pattern,
                                     const GroupSampling& s, at::ScalarType out_dtype) {
  core::check(s.device == nullptr, "mask kernels", "device step values need CUDA tensors");
  const auto acc = acc_type(gates, pattern, s);
  auto w = weight.to(acc).contiguous();
  auto g = s.has_tiles ? gates.to(acc).contiguous() : at::zeros({1}, w.options());
  auto pat = pattern.contiguous();
  auto out = at::empty_like(w);
  const int64_t rows = w.size(0), groups = w.size(1) / 4, cols = tile_cols_of(weight, s);
  AT_DISPATCH_FLOATING_TYPES(acc, "masked_weight_forward", [&] {
    using Acc = scalar_t;
    if (s.fixed) {
      forward_cpu<Acc, Acc>(w.data_ptr<Acc>(), g.data_ptr<Acc>(), nullptr, pat.data_ptr<uint8_t>(),
                            out.data_ptr<Acc>(), rows, groups, cols, s);
    } else {
      AT_DISPATCH_FLOATING_TYPES_AND(
          at::kBFloat16, pat.scalar_type(), "masked_weight_forward_logits", [&] {
            forward_cpu<Acc, scalar_t>(w.data_ptr<Acc>(), g.data_ptr<Acc>(),
                                       pat.data_ptr<scalar_t>(), nullptr, out.data_ptr<Acc>(), rows,
                                       groups, cols, s);
          });
    }
  });
  return out.to(out_dtype);
}
}  // namespace

at::Tensor masked_weight_forward(const at::Tensor& weight, const at::Tensor& gates,
                                 const at::Tensor& pattern, const GroupSampling& s,
                                 at::ScalarType out_dtype) {
  check_inputs(weight, gates, pattern, s);
  return core::dispatch(
      weight, "mask kernels",
      [&] {
        auto out = at::empty(weight.sizes(), weight.options().dtype(out_dtype));
        cuda::masked_weight_forward(weight, gates, pattern, s, out);
        return out;
      },
      [&] { return masked_weight_forward_cpu(weight, gates, pattern, s, out_dtype); });
}

MaskedWeightGrads masked_weight_backward(const at::Tensor& grad, const at::Tensor& weight,
                                         const at::Tensor& gates, const at::Tensor& pattern,
                                         const GroupSampling& s, InlineAdam* adam) {
  check_inputs(weight, gates, pattern, s);
  core::check(grad.sizes() == weight.sizes(), "mask kernels", "gradient and weight shapes differ");
  core::check(
      !adam || (!s.fixed && pattern.is_contiguous() && adam->exp_avg.sizes() == pattern.sizes() &&
                adam->exp_avg_sq.sizes() == pattern.sizes() &&
                adam->exp_avg.scalar_type() == pattern.scalar_type()),
      "mask kernels",
      "the in-backward AdamW needs contiguous 2:4 logits and moments of the same shape");
  const auto acc = acc_type(gates, pattern, s);
  const int64_t rows = weight.size(0), groups = weight.size(1) / 4, cols = tile_cols_of(weight, s);
  const auto aopts = weight.options().dtype(acc);
  MaskedWeightGrads res;
  // Every (row, tile column) entry is written, so no zero fill is needed.
  res.tile_rows = at::empty({rows, cols}, aopts);
  auto sq_rows = adam ? at::empty({rows, cols}, aopts) : at::Tensor();
  if (!s.fixed && !adam) res.pattern = at::empty({rows, groups, 6}, aopts);
  core::dispatch(
      weight, "mask kernels",
      [&] {
        cuda::masked_weight_backward(grad, weight, gates, pattern, s, adam, res.pattern,
                                     res.tile_rows, sq_rows);
      },
      [&] {
        res.tile_rows.zero_();
        if (adam) sq_rows.zero_();
        core::check(s.device == nullptr, "mask kernels", "device step values need CUDA tensors");
        auto w = weight.to(acc).contiguous();
        auto gr = grad.to(acc).contiguous();
        auto g = s.has_tiles ? gates.to(acc).contiguous() : at::zeros({1}, aopts);
        // The in-backward update writes the logits in place, so no copy is made then.
        at::Tensor pat = pattern.is_contiguous() ? pattern : pattern.contiguous();
        const auto args = adam ? adam_args(*adam) : group::AdamArgs{};
        AT_DISPATCH_FLOATING_TYPES(acc, "masked_weight_backward", [&] {
          using Acc = scalar_t;
          Acc* dl = res.pattern.defined() ? res.pattern.data_ptr<Acc>() : nullptr;
          if (s.fixed) {
            backward_cpu<Acc, Acc>(gr.data_ptr<Acc>(), w.data_ptr<Acc>(), g.data_ptr<Acc>(),
                                   nullptr, pat.data_ptr<uint8_t>(), dl,
                                   res.tile_rows.data_ptr<Acc>(), nullptr, rows, groups, cols, s,
                                   nullptr, nullptr, nullptr);
          } else {
            AT_DISPATCH_FLOATING_TYPES_AND(
                at::kBFloat16, pat.scalar_type(), "masked_weight_backward_logits", [&] {
                  backward_cpu<Acc, scalar_t>(
                      gr.data_ptr<Acc>(), w.data_ptr<Acc>(), g.data_ptr<Acc>(),
                      pat.data_ptr<scalar_t>(), nullptr, dl, res.tile_rows.data_ptr<Acc>(),
                      adam ? sq_rows.data_ptr<Acc>() : nullptr, rows, groups, cols, s,
                      adam ? &args : nullptr, adam ? adam->exp_avg.data_ptr<scalar_t>() : nullptr,
                      adam ? adam->exp_avg_sq.data_ptr<scalar_t>() : nullptr);
                });
          }
        });
      });
  if (adam) res.sq_norm = sq_rows.sum();
  return res;
}

}  // namespace patch::sparsity
