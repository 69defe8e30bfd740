#include "sparsity/schedule.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace patch::sparsity {

Anneal parse_anneal(const std::string& name) {
  if (name == "linear") return Anneal::kLinear;
  if (name == "cosine") return Anneal::kCosine;
  if (name == "exp") return Anneal::kExp;
  throw core::ConfigError(core::str("unknown annealing '", name, "' (expected linear, cosine or exp)"));
}

double anneal(double start, double end, double progress, Anneal kind) {
  const double p = std::clamp(progress, 0.0, 1.0);
  switch (kind) {
    case Anneal::kLinear:
      return start + (end - start) * p;
    case Anneal::kCosine:
      return end + (start - end) * 0.5 * (1.0 + std::cos(M_PI * p));
    case Anneal::kExp:
      if (start <= 0.0 || end <= 0.0)
        throw core::ConfigError(core::str("exp annealing needs positive start and end (got ", start, ", ", end, ")"));
      return start * std::pow(end / start, p);
  }
  return start;
}

void SamplerSchedule::apply(SamplerState& s, double progress) const {
  s.tau_24 = anneal(tau_24_start, tau_24_end, progress, kind);
  s.scale_24 = anneal(scale_24_start, scale_24_end, progress, kind);
  s.tau_tile = anneal(tau_tile_start, tau_tile_end, progress, kind);
  s.scale_tile = anneal(scale_tile_start, scale_tile_end, progress, kind);
}

}  // namespace patch::sparsity
