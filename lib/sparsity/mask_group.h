#pragma once
// Per-group math shared by the CPU reference and the CUDA kernels of
// mask_kernels.h (host and device). A group is four consecutive input weights
// of one output row; `q` = row * groups + group indexes its noise stream.
#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "sparsity/philox.h"

namespace patch::sparsity::group {

// Kept positions of the six patterns (DESIGN.md order), as 4-bit masks.
PATCH_HD uint32_t pattern_bits(int k) {
  constexpr uint32_t kBits =
      (0x3u << 0) | (0x5u << 4) | (0x9u << 8) | (0x6u << 12) | (0xAu << 16) | (0xCu << 20);
  return (kBits >> (4 * k)) & 0xFu;
}

// Natural log and exp: the hardware approximations on the device (absolute
// error ~1e-6 for log, a few ulp for exp), the library functions on the host.
// On the device they flush subnormals: the log's inputs here are >= 2^-22 and
// an exp that underflows is a probability below 1e-38, so only the fix-up
// code that __logf and __expf carry for subnormals goes away.
PATCH_HD float fast_log(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y * 0.693147180559945f;
#else
  return std::log(x);
#endif
}
template <typename T>
PATCH_HD T fast_exp(T x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(static_cast<float>(x) * 1.44269504088896f));
  return static_cast<T>(y);
#else
  return std::exp(x);
#endif
}

// sqrt(x) and a / b for AdamW's update, whose result is rounded to bf16 or
// moves a logit by a step of about lr: the hardware approximations on the
// device (relative error ~2^-22), exact on the host. The IEEE forms take a
// slow subroutine whenever the second moment is tiny (|x| < 2^-100 or so),
// which the gradients of 2:4 logits often are.
PATCH_HD float update_sqrt(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("sqrt.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return std::sqrt(x);
#endif
}
PATCH_HD float update_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("div.approx.ftz.f32 %0, %1, %2;" : "=f"(y) : "f"(a), "f"(b));
  return y;
#else
  return a / b;
#endif
}

// Six 21-bit words of one Philox block: the four low parts, then the two
// 22-bit concatenations of the high parts (21 bits used).
PATCH_HD void split6(const Philox4& b, uint32_t x[6]) {
  for (int i = 0; i < 4; ++i) x[i] = b.v[i];
  x[4] = (b.v[0] >> 21) | ((b.v[1] >> 21) << 11);
  x[5] = (b.v[2] >> 21) | ((b.v[3] >> 21) << 11);
}

// Gumbel(0, 1) noise of the six patterns of group q, from one Philox block.
PATCH_HD void gumbel6(uint64_t key, uint64_t q, float g[6]) {
  uint32_t x[6];
  split6(philox4x32(key, q), x);
  // The inner log needs relative accuracy near u = 1 (-log u ~ 1e-7 sets the
  // largest draws); the outer one only absolute accuracy.
  for (int k = 0; k < 6; ++k) g[k] = -fast_log(-std::log(uniform_open21(x[k])));
}

// Logistic(0, 1) noise of tile t (the difference of two Gumbels).
PATCH_HD float logistic1(uint64_t key, uint64_t t) {
  const float u = uniform_open(philox4x32(key, t, 0).v[0]);
  return std::log(u) - std::log1p(-u);
}

// The sample of one group: soft probabilities p = softmax((scale l + g) / tau)
// and the forward value of the 2:4 mask m24 (from one-hot argmax when hard).
template <typename Acc, typename L>
PATCH_HD void sample(const L* logits, uint64_t key, uint64_t q, Acc scale, Acc inv_tau, bool noise,
                     bool hard, Acc p[6], Acc m24[4]) {
  float g[6] = {0, 0, 0, 0, 0, 0};
  if (noise) gumbel6(key, q, g);
  Acc y[6], top = 0;
  int best = 0;
  for (int k = 0; k < 6; ++k) {
    y[k] = (scale * static_cast<Acc>(logits[k]) + static_cast<Acc>(g[k])) * inv_tau;
    if (k == 0 || y[k] > top) {
      top = y[k];
      best = k;
    }
  }
  Acc sum = 0;
  for (int k = 0; k < 6; ++k) {
    p[k] = fast_exp(y[k] - top);
    sum += p[k];
  }
  const Acc inv = Acc(1) / sum;
  for (int k = 0; k < 6; ++k) p[k] *= inv;
  for (int j = 0; j < 4; ++j) {
    Acc m = 0;
    if (hard) {
      m = (pattern_bits(best) >> j) & 1u ? Acc(1) : Acc(0);
    } else {
      for (int k = 0; k < 6; ++k)
        if ((pattern_bits(k) >> j) & 1u) m += p[k];
    }
    m24[j] = m;
  }
}

// dL/dlogits of a group from dL/dm24 (straight-through: the soft p carries
// the gradient whatever the forward value was).
template <typename Acc>
PATCH_HD void logit_grad(const Acc p[6], const Acc dm24[4], Acc scale, Acc inv_tau, Acc dl[6]) {
  Acc dp[6], dot = 0;
  for (int k = 0; k < 6; ++k) {
    const uint32_t b = pattern_bits(k);
    dp[k] = 0;
    for (int j = 0; j < 4; ++j)
      if ((b >> j) & 1u) dp[k] += dm24[j];
    dot += p[k] * dp[k];
  }
  for (int k = 0; k < 6; ++k) dl[k] = p[k] * (dp[k] - dot) * inv_tau * scale;
}

// A 32-bit mix of (x, key): the "lowbias32" finalizer (C. Wellons) of x
// xor-ed with the folded key.
PATCH_HD uint32_t hash32(uint32_t x, uint64_t key) {
  x ^= static_cast<uint32_t>(key) ^ static_cast<uint32_t>(key >> 32) * 0x9E3779B9u;
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// Stochastic rounding to bf16: adding 16 random low bits before truncation
// rounds up with probability equal to the dropped fraction.
PATCH_HD c10::BFloat16 round_stochastic(float x, uint32_t r) {
  uint32_t bits;
  memcpy(&bits, &x, sizeof(bits));
  if ((bits & 0x7f800000u) != 0x7f800000u) bits += r & 0xffffu;  // leave inf/nan alone
  return c10::BFloat16(static_cast<uint16_t>(bits >> 16), c10::BFloat16::from_bits());
}

PATCH_HD float to_float(float x) {
  return x;
}
PATCH_HD float to_float(double x) {
  return static_cast<float>(x);
}
PATCH_HD float to_float(c10::BFloat16 x) {
  return static_cast<float>(x);
}

// An updated logit: bf16 rounded stochastically, wider types as they are.
PATCH_HD void store_logit(float* dst, float x, uint32_t) {
  *dst = x;
}
PATCH_HD void store_logit(double* dst, float x, uint32_t) {
  *dst = x;
}
PATCH_HD void store_logit(c10::BFloat16* dst, float x, uint32_t r) {
  *dst = round_stochastic(x, r);
}

// One AdamW step of the six logits of group q (see InlineAdam).
struct AdamArgs {
  float lr, beta1, beta2, eps, decay, inv_bias1, inv_bias2, grad_scale;
  uint64_t round_key;
};
template <typename L, typename Acc>
PATCH_HD void adam6(L* logits, L* m, L* v, const Acc dl[6], const AdamArgs& a, uint64_t q) {
  // Six 16-bit rounding draws from three integer hashes: rounding needs
  // uniform, step-to-step independent bits, not Philox's statistical strength.
  uint32_t r[6];
  for (int i = 0; i < 3; ++i) {
    const uint32_t h =
        hash32(static_cast<uint32_t>(q) * 3u + static_cast<uint32_t>(i), a.round_key);
    r[2 * i] = h;
    r[2 * i + 1] = h >> 16;
  }
  // All 18 loads before any store: the compiler cannot tell the three arrays
  // apart, and interleaved stores would make every later load wait on them.
  float l0[6], m0[6], v0[6];
  for (int k = 0; k < 6; ++k) {
    l0[k] = to_float(logits[k]);
    m0[k] = to_float(m[k]);
    v0[k] = to_float(v[k]);
  }
  for (int k = 0; k < 6; ++k) {
    const float g = static_cast<float>(dl[k]) * a.grad_scale;
    const float mk = a.beta1 * m0[k] + (1.0f - a.beta1) * g;
    const float vk = a.beta2 * v0[k] + (1.0f - a.beta2) * g * g;
    m[k] = static_cast<L>(mk);
    v[k] = static_cast<L>(vk);
    const float l = l0[k] * (1.0f - a.lr * a.decay) -
                    update_div(a.lr * a.inv_bias1 * mk, update_sqrt(vk * a.inv_bias2) + a.eps);
    store_logit(&logits[k], l, r[k]);
  }
}

}  // namespace patch::sparsity::group
