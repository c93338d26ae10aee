#pragma once
// The Gaussian sketch of the svd family, shared by every device: Omega[j, c] (row j < n,
// column c < l of the n x l test matrix) is a standard normal drawn from Philox4x32-10 at
// element index e = c * n + j (column-major, so a wider sketch of the same A extends the
// narrower one), by Box-Muller on two 24-bit uniforms: draws 4g..4g+3 come from one Philox
// call (counter g, offset 0), pair p = (e % 4) / 2 uses lanes 2p and 2p + 1, and the even
// element takes r cos(theta), the odd one r sin(theta). The reference
// (lowrank_ext/reference/svd.py) computes the same numbers in fp32 torch ops.
#include <cmath>

#include "common/host_device.h"
#include "common/philox.h"

namespace lowrank::svd {

constexpr float kTwoPi = 6.28318530717958647692f;
constexpr float kInv2p24 = 1.0f / 16777216.0f;

// The Gaussian of element index e (of the four that one Philox call serves).
LOWRANK_HD float gaussian_from_philox(const Philox4& r, uint64_t e) {
  const int pair = static_cast<int>((e >> 1) & 1);
  const float u1 = static_cast<float>((r.v[2 * pair] >> 8) + 1u) * kInv2p24;  // (0, 1]: log finite
  const float u2 = static_cast<float>(r.v[2 * pair + 1] >> 8) * kInv2p24;     // [0, 1)
  const float radius = sqrtf(-2.0f * logf(u1));
  const float theta = kTwoPi * u2;
  return (e & 1) ? radius * sinf(theta) : radius * cosf(theta);
}

LOWRANK_HD float sketch_entry(uint64_t seed, uint64_t e) {
  return gaussian_from_philox(philox_group(seed, 0, e >> 2), e);
}

// The four Gaussians of element indices 4g .. 4g + 3 from one Philox call: the same
// arithmetic as gaussian_from_philox, each Box-Muller pair's radius and angle computed once.
LOWRANK_HD void sketch_group(uint64_t seed, uint64_t g, float out[4]) {
  const Philox4 r = philox_group(seed, 0, g);
  for (int pair = 0; pair < 2; ++pair) {
    const float u1 = static_cast<float>((r.v[2 * pair] >> 8) + 1u) * kInv2p24;
    const float u2 = static_cast<float>(r.v[2 * pair + 1] >> 8) * kInv2p24;
    const float radius = sqrtf(-2.0f * logf(u1));
    const float theta = kTwoPi * u2;
    out[2 * pair] = radius * cosf(theta);
    out[2 * pair + 1] = radius * sinf(theta);
  }
}

}  // namespace lowrank::svd
