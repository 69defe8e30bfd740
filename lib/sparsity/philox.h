#pragma once
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
// SC'11): a counter-based generator, so the mask noise of any group is a pure
// function of (key, group index) and the backward pass regenerates it instead
// of storing it. Host and device code share this header; the counter layout
// matches at::philox_engine(key, subsequence, 0), the test's oracle.
#include <cstdint>

#include "core/host_device.h"

namespace patch::sparsity {

struct Philox4 {
  uint32_t v[4];
};

PATCH_HD void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// The `block`-th 128-bit output of stream `subsequence` under `key`.
PATCH_HD Philox4 philox4x32(uint64_t key, uint64_t subsequence, uint32_t block = 0) {
  uint32_t c0 = block, c1 = 0, c2 = static_cast<uint32_t>(subsequence),
           c3 = static_cast<uint32_t>(subsequence >> 32);
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(0xD2511F53u, c0, hi0, lo0);
    philox_mulhilo(0xCD9E8D57u, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {{c0, c1, c2, c3}};
}

// A uniform in the open interval (0, 1) from 23 random bits: (k + 1/2) / 2^23,
// exactly representable in float, so log(u) and log(1 - u) stay finite.
PATCH_HD float uniform_open(uint32_t x) {
  return (static_cast<float>(x >> 9) + 0.5f) * (1.0f / 8388608.0f);
}
// The same from the low 21 bits of x: six such uniforms fit one Philox block.
PATCH_HD float uniform_open21(uint32_t x) {
  return (static_cast<float>(x & 0x1FFFFFu) + 0.5f) * (1.0f / 2097152.0f);
}

}  // namespace patch::sparsity
