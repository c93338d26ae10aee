#pragma once
// Dropout of the LoRA branch, shared by every device: element e = n * d_in + k of the
// logical [N, d_in] input is kept when its 16 Philox bits (seed, offset 0) are >= the
// threshold round(p * 65536); kept values are scaled by 65536 / (65536 - threshold), the
// inverse of the exact keep probability, so drop(x) is unbiased for the p actually used
// (which differs from the requested p by less than 2^-17).
#include "common/philox.h"

namespace lowrank::lora {

constexpr uint64_t kDropoutOffset = 0;  // Philox counter offset of the dropout stream

struct Dropout {
  uint64_t seed;
  uint32_t threshold;  // 0: no dropout
  float keep_scale;
};

inline Dropout make_dropout(double p, int64_t seed) {
  const auto rounded = static_cast<uint32_t>(p * 65536.0 + 0.5);
  const uint32_t threshold = rounded < 65535u ? rounded : 65535u;  // p < 1: keep at least 1/65536
  return Dropout{static_cast<uint64_t>(seed), threshold, 65536.0f / static_cast<float>(65536u - threshold)};
}

// The mask value (0 or keep_scale) of an element with 16 random bits r16.
LOWRANK_HD float dropout_factor16(const Dropout& d, uint32_t r16) { return r16 >= d.threshold ? d.keep_scale : 0.f; }

// The mask value of element e, given its group's draws.
LOWRANK_HD float dropout_factor(const Dropout& d, const Philox4& r, uint64_t e) {
  return dropout_factor16(d, random16(r, e));
}

}  // namespace lowrank::lora
