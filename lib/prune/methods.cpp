#include "prune/methods.h"

#include <ATen/core/grad_mode.h>

#include <cmath>
#include <limits>

#include "core/error.h"
#include "core/log.h"
#include "sparsity/patterns.h"
#include "sparsity/prior.h"

namespace patch::prune {
namespace {

using sparsity::kGroupSize;

at::ScalarType compute_dtype(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

int64_t pruned_count(double sparsity, int64_t n) {
  return std::min<int64_t>(n, static_cast<int64_t>(std::llround(sparsity * static_cast<double>(n))));
}

// bool [out, in]: true inside sparse tiles (where a hybrid target prunes).
at::Tensor sparse_elements(const LayerTarget& t, const at::Device& device) {
  const auto& g = t.grid;
  core::check(t.tile_dense.defined() && t.tile_dense.dim() == 2 && t.tile_dense.size(0) == g.rows() &&
                  t.tile_dense.size(1) == g.cols(),
              "hybrid target", core::str("tile_dense does not match ", g.str()));
  return g.expand(t.tile_dense.to(device, at::kFloat)).eq(0);
}

void check_target(const at::Tensor& weight, const LayerTarget& t) {
  core::check(weight.dim() == 2 && weight.size(1) % kGroupSize == 0, "prune",
              core::str("expected a weight [out, in] with in a multiple of 4, got ", weight.sizes()));
  if (t.structure == Structure::kHybrid)
    core::check(t.grid.out() == weight.size(0) && t.grid.in() == weight.size(1), "prune",
                core::str("tile grid ", t.grid.str(), " does not fit the weight ", weight.sizes()));
  if (t.structure == Structure::kUnstructured)
    core::check(t.sparsity >= 0.0 && t.sparsity <= 1.0, "prune", core::str("sparsity ", t.sparsity, " outside [0, 1]"));
}

}  // namespace

Method parse_method(const std::string& name) {
  if (name == "magnitude") return Method::kMagnitude;
  if (name == "wanda") return Method::kWanda;
  if (name == "sparsegpt") return Method::kSparseGPT;
  throw core::ConfigError(core::str("prune.method: unknown method '", name, "' (expected magnitude, wanda or sparsegpt)"));
}

Structure parse_structure(const std::string& name) {
  if (name == "2:4") return Structure::k24;
  if (name == "unstructured") return Structure::kUnstructured;
  if (name == "hybrid") return Structure::kHybrid;
  throw core::ConfigError(core::str("prune.pattern: unknown pattern '", name, "' (expected 2:4, unstructured or hybrid)"));
}

std::string method_name(Method m) {
  switch (m) {
    case Method::kMagnitude: return "magnitude";
    case Method::kWanda: return "wanda";
    case Method::kSparseGPT: return "sparsegpt";
  }
  return "?";
}

std::string structure_name(Structure s) {
  switch (s) {
    case Structure::k24: return "2:4";
    case Structure::kUnstructured: return "unstructured";
    case Structure::kHybrid: return "hybrid";
  }
  return "?";
}

InputStats::InputStats(int64_t in, bool hessian_too, const at::TensorOptions& opts) {
  sq_norm = at::zeros({in}, opts);
  if (hessian_too) hessian = at::zeros({in, in}, opts);
}

void InputStats::add(const at::Tensor& x) {
  at::NoGradGuard no_grad;
  const int64_t in = sq_norm.size(0);
  core::check(x.size(-1) == in, "calibration", core::str("input has ", x.size(-1), " features, expected ", in));
  auto X = x.detach().reshape({-1, in}).to(sq_norm.scalar_type());
  sq_norm.add_((X * X).sum(0));
  if (hessian.defined()) hessian.addmm_(X.t(), X);
  tokens += X.size(0);
}

at::Tensor magnitude_score(const at::Tensor& weight) { return weight.detach().abs().to(compute_dtype(weight)); }

at::Tensor wanda_score(const at::Tensor& weight, const InputStats& stats) {
  core::check(stats.sq_norm.size(0) == weight.size(1), "wanda",
              core::str("input statistics have ", stats.sq_norm.size(0), " features, the weight ", weight.sizes()));
  return magnitude_score(weight) * stats.sq_norm.to(weight.device(), compute_dtype(weight)).sqrt().unsqueeze(0);
}

at::Tensor keep_from_score(const at::Tensor& score, const LayerTarget& target, bool per_row) {
  check_target(score, target);
  at::NoGradGuard no_grad;
  if (target.fixed_keep.defined()) return target.fixed_keep.to(score.device(), at::kBool);
  if (target.structure != Structure::kUnstructured) {
    auto keep = sparsity::expand_patterns(sparsity::best_patterns(score)).to(at::kBool);
    if (target.structure == Structure::kHybrid) keep = keep | ~sparse_elements(target, score.device());
    return keep;
  }
  // Stable sort so that ties go by position, row by row or over the layer.
  auto rows = per_row ? score : score.reshape({1, -1});
  const int64_t k = pruned_count(target.sparsity, rows.size(1));
  auto keep = at::ones(rows.sizes(), rows.options().dtype(at::kBool));
  if (k > 0) {
    auto order = std::get<1>(at::sort(rows, /*stable=*/true, /*dim=*/1, /*descending=*/false));
    keep.scatter_(1, order.narrow(1, 0, k), false);
  }
  return keep.view(score.sizes());
}

SparseGPTResult sparsegpt(const at::Tensor& weight, const at::Tensor& hessian, const LayerTarget& target,
                          const SparseGPTOptions& opts, const std::string& name) {
  check_target(weight, target);
  core::check(opts.blocksize > 0 && opts.blocksize % kGroupSize == 0, "sparsegpt",
              core::str("blocksize ", opts.blocksize, " is not a positive multiple of 4"));
  const int64_t rows = weight.size(0), cols = weight.size(1);
  core::check(hessian.dim() == 2 && hessian.size(0) == cols && hessian.size(1) == cols, name,
              core::str("Hessian ", hessian.sizes(), " does not match the weight ", weight.sizes()));
  at::NoGradGuard no_grad;
  const auto dt = compute_dtype(weight);
  auto W = weight.detach().to(dt).clone();
  auto H = hessian.to(weight.device(), dt).clone();
  auto dead = H.diagonal().eq(0);
  H.diagonal().masked_fill_(dead, 1.0);
  W.masked_fill_(dead.unsqueeze(0), 0.0);

  // Upper Cholesky factor of the inverse of the dampened Hessian; singular
  // Hessians (e.g. Mistral's) get more dampening until it factorizes.
  SparseGPTResult r;
  const double mean_diag = H.diagonal().mean().item<double>();
  double percdamp = opts.percdamp;
  at::Tensor Hinv, Hd;
  for (int attempt = 0;; ++attempt) {
    Hd = H.clone();
    Hd.diagonal().add_(percdamp * mean_diag);
    auto [L, info] = at::linalg_cholesky_ex(Hd);
    if (info.item<int64_t>() == 0) {
      auto [U, info2] = at::linalg_cholesky_ex(at::cholesky_inverse(L), /*upper=*/true);
      if (info2.item<int64_t>() == 0 && U.isfinite().all().item<bool>()) {
        Hinv = U;
        break;
      }
    }
    if (attempt + 1 >= opts.max_attempts)
      throw core::Error(core::str(name, ": SparseGPT's Hessian is not positive definite even with dampening ", percdamp,
                            " (", opts.max_attempts, " attempts)"));
    const double next = percdamp > 0 ? percdamp * 10 : 0.01;
    core::log::warn(core::str(name, ": Cholesky failed with dampening ", percdamp, "; retrying with ", next));
    percdamp = next;
  }
  r.percdamp = percdamp;

  at::Tensor sparse_el, fixed_prune;
  if (target.structure == Structure::kHybrid) sparse_el = sparse_elements(target, W.device());
  if (target.fixed_keep.defined()) {
    core::check(target.fixed_keep.sizes() == W.sizes(), name,
                core::str("the given mask ", target.fixed_keep.sizes(), " does not fit the weight ", W.sizes()));
    fixed_prune = target.fixed_keep.to(W.device(), at::kBool).logical_not();
  }
  const auto W0 = opts.refine_iters > 0 ? W.clone() : at::Tensor();
  auto keep = at::ones({rows, cols}, W.options().dtype(at::kBool));
  for (int64_t i1 = 0; i1 < cols; i1 += opts.blocksize) {
    const int64_t i2 = std::min(i1 + opts.blocksize, cols), count = i2 - i1;
    auto W1 = W.slice(1, i1, i2).clone();
    auto Q1 = at::zeros_like(W1);
    auto Err1 = at::zeros_like(W1);
    auto Hinv1 = Hinv.slice(0, i1, i2).slice(1, i1, i2);
    auto d1 = Hinv1.diagonal();
    auto prune1 = fixed_prune.defined() ? fixed_prune.slice(1, i1, i2).clone()
                                        : at::zeros({rows, count}, W.options().dtype(at::kBool));
    if (target.structure == Structure::kUnstructured && !fixed_prune.defined()) {
      auto saliency = (W1 * W1 / (d1 * d1).unsqueeze(0)).reshape({1, -1});
      const int64_t k = pruned_count(target.sparsity, saliency.numel());
      if (k > 0) {
        auto order = std::get<1>(at::sort(saliency, /*stable=*/true, /*dim=*/1, /*descending=*/false));
        prune1.view({1, -1}).scatter_(1, order.narrow(1, 0, k), true);
      }
    }
    for (int64_t i = 0; i < count; ++i) {
      if (target.structure != Structure::kUnstructured && !fixed_prune.defined() && i % kGroupSize == 0) {
        auto g = W1.slice(1, i, i + kGroupSize);
        auto dg = d1.slice(0, i, i + kGroupSize);
        auto drop = std::get<1>(at::topk(g * g / (dg * dg).unsqueeze(0), 2, /*dim=*/1, /*largest=*/false));
        auto sel = at::zeros({rows, kGroupSize}, prune1.options()).scatter_(1, drop, true);
        if (sparse_el.defined()) sel &= sparse_el.slice(1, i1 + i, i1 + i + kGroupSize);
        prune1.slice(1, i, i + kGroupSize).copy_(sel);
      }
      auto w = W1.select(1, i);
      auto q = w.masked_fill(prune1.select(1, i), 0.0);
      Q1.select(1, i).copy_(q);
      auto err = (w - q) / Hinv1[i][i];
      W1.slice(1, i).sub_(err.unsqueeze(1) * Hinv1.select(0, i).slice(0, i).unsqueeze(0));
      Err1.select(1, i).copy_(err);
    }
    W.slice(1, i1, i2).copy_(Q1);
    if (i2 < cols) W.slice(1, i2).sub_(at::matmul(Err1, Hinv.slice(0, i1, i2).slice(1, i2)));
    keep.slice(1, i1, i2).copy_(~prune1);
  }
  r.keep = keep;
  if (opts.update_weights)
    r.weight = opts.refine_iters > 0 ? refine_least_squares(W0, W, Hd, keep, opts.refine_iters) : W;
  return r;
}

at::Tensor refine_least_squares(const at::Tensor& weight, const at::Tensor& start, const at::Tensor& hessian,
                                const at::Tensor& keep, int64_t iters, double tol) {
  at::NoGradGuard no_grad;
  const auto dt = compute_dtype(weight);
  auto W = weight.to(dt);
  auto H = hessian.to(W.device(), dt);
  auto M = keep.to(W.device(), dt);
  auto X = start.to(W.device(), dt) * M;
  auto dinv = H.diagonal().reciprocal().unsqueeze(0);
  // Per row: residual r = (H (w - x))_K, preconditioned z = r / diag(H).
  auto R = at::matmul(W - X, H) * M;
  auto Z = R * dinv;
  auto P = Z.clone();
  auto rz = (R * Z).sum(1, /*keepdim=*/true);
  const auto r0 = R.norm(2, 1, /*keepdim=*/true).clamp_min(std::numeric_limits<double>::min());
  for (int64_t it = 0; it < iters; ++it) {
    auto AP = at::matmul(P, H) * M;
    auto pap = (P * AP).sum(1, /*keepdim=*/true);
    // A converged row (p = 0) takes no step.
    auto alpha = at::where(pap > 0, rz / pap.clamp_min(std::numeric_limits<double>::min()), at::zeros_like(pap));
    X.add_(alpha * P);
    R.sub_(alpha * AP);
    if ((it + 1) % 8 == 0 && (R.norm(2, 1, /*keepdim=*/true) / r0).max().item<double>() < tol) break;
    Z = R * dinv;
    auto rz_next = (R * Z).sum(1, /*keepdim=*/true);
    auto beta = at::where(rz > 0, rz_next / rz.clamp_min(std::numeric_limits<double>::min()), at::zeros_like(rz));
    P = Z + beta * P;
    rz = rz_next;
  }
  return X;
}

}  // namespace patch::prune
