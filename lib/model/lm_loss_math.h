#pragma once
// Per-row math of the cross-entropy in lm_loss.h, shared by the CPU reference
// and the CUDA kernel: a running (max, sum of exp(z - max)) over a row of
// logits, so one pass gives log-sum-exp without overflow, and partial results
// of several threads merge exactly.
#include <cmath>
#include <limits>

#include "core/host_device.h"

namespace patch::model::ce {

PATCH_HD float exp_of(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return std::exp(x);
#endif
}
PATCH_HD double exp_of(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}
PATCH_HD float log_of(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  return std::log(x);
#endif
}
PATCH_HD double log_of(double x) {
#if defined(__CUDA_ARCH__)
  return ::log(x);
#else
  return std::log(x);
#endif
}

template <typename Acc>
struct MaxSum {
  Acc max = -std::numeric_limits<Acc>::infinity();
  Acc sum = 0;  // sum of exp(z - max) over the values seen
};

// Adds one logit.
template <typename Acc>
PATCH_HD void push(MaxSum<Acc>& a, Acc z) {
  if (z > a.max) {
    a.sum = a.sum * exp_of(a.max - z) + Acc(1);
    a.max = z;
  } else {
    a.sum += exp_of(z - a.max);
  }
}

// Adds the logits another running pair has seen (either may have seen none).
template <typename Acc>
PATCH_HD void merge(MaxSum<Acc>& a, const MaxSum<Acc>& b) {
  if (b.sum == Acc(0)) return;
  if (a.sum == Acc(0)) {
    a = b;
    return;
  }
  if (b.max > a.max) {
    a.sum = a.sum * exp_of(a.max - b.max) + b.sum;
    a.max = b.max;
  } else {
    a.sum += b.sum * exp_of(b.max - a.max);
  }
}

template <typename Acc>
PATCH_HD Acc log_sum_exp(const MaxSum<Acc>& a) {
  return a.max + log_of(a.sum);
}

// d loss / d z for a logit z of the row: softmax(z) - [it is the target's].
template <typename Acc>
PATCH_HD Acc logit_grad(Acc z, Acc lse, bool is_target) {
  return exp_of(z - lse) - (is_target ? Acc(1) : Acc(0));
}

}  // namespace patch::model::ce
