#pragma once
// The AdamW update, shared by the CPU and CUDA kernels and mirrored op for op by
// lowrank_ext/reference/optim.py. Every product and sum is rounded separately (the
// *_rn helpers stop nvcc from contracting them into FMAs), so CPU, CUDA and the
// reference agree bit for bit and re-quantized state is identical everywhere.
//   m' = b1*m + (1-b1)*g            v' = b2*v + ((1-b2)*g)*g
//   p' = p*(1 - lr*wd) - step_size * (m' / (sqrt(v')/sqrt(bc2) + eps)),  step_size = lr/bc1
#include <cfloat>
#include <cmath>

#include "common/host_device.h"

namespace lowrank::optim {

LOWRANK_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

LOWRANK_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// Constants of one step, rounded to fp32 once on the host (from double).
struct AdamWConstants {
  float beta1, one_minus_beta1;
  float beta2, one_minus_beta2;
  float decay;               // 1 - lr * weight_decay
  float step_size;           // lr / (1 - beta1^step)
  float bias_correction2_sqrt;  // sqrt(1 - beta2^step)
  float eps;
};

struct AdamWResult {
  float param, exp_avg, exp_avg_sq;
};

// v' of the update; the rank-1 steps' statistics pass also computes it ahead of the update.
LOWRANK_HD float second_moment_update(float v, float g, const AdamWConstants& c) {
  return add_rn(mul_rn(c.beta2, v), mul_rn(mul_rn(c.one_minus_beta2, g), g));
}

LOWRANK_HD AdamWResult adamw_update(float p, float g, float m, float v, const AdamWConstants& c) {
  const float m_new = add_rn(mul_rn(c.beta1, m), mul_rn(c.one_minus_beta1, g));
  const float v_new = second_moment_update(v, g, c);
  const float denom = add_rn(sqrtf(v_new) / c.bias_correction2_sqrt, c.eps);
  const float p_new = add_rn(mul_rn(p, c.decay), -mul_rn(c.step_size, m_new / denom));
  return {p_new, m_new, v_new};
}

// The second moment as a quantized state stores it. v overflows to inf where g*g does
// (|g| > ~1.8e19), and a block holding inf would quantize to NaN and stay NaN for good; FLT_MAX
// keeps the block finite, like any huge finite v (which squashes its block's other entries
// toward the code's floor until it decays). The step just taken used the unclamped v, so that
// entry's update was 0, as in torch's AdamW. NaN stays NaN.
LOWRANK_HD float storable_exp_avg_sq(float v) { return v > FLT_MAX ? FLT_MAX : v; }

// Li et al.'s rank-1 normaliser of entry (i, j): min(row max i, column max j), NaN where
// either is (a NaN in v reaches its row and its column, as a NaN reaches its block in
// block-wise quantization).
LOWRANK_HD float rank1_scale(float row_max, float col_max) {
  return row_max != row_max ? row_max : (row_max < col_max ? row_max : col_max);
}

// A maximum of |x| that sticks at NaN once it sees one (the rank-1 statistics; the second
// moment as stored is finite or NaN, see storable_exp_avg_sq).
LOWRANK_HD float nan_sticky_absmax(float amax, float x) {
  const float a = fabsf(x);
  return (a > amax || a != a) ? a : amax;
}

}  // namespace lowrank::optim

namespace lowrank::optim {

// bf16 with stochastic rounding: add 16 random bits below bf16's last mantissa bit, then
// truncate. Unbiased: rounds up with probability (distance to the lower value) / ulp.
// Non-finite values and values that would carry into the exponent's top are handled by
// the integer add as well: inf stays inf (low bits zero), NaN keeps a NaN payload.
LOWRANK_HD uint16_t bf16_bits_stochastic(float x, uint32_t random16) {
  const uint32_t b = float_as_bits(x);
  if ((b & 0x7f800000u) == 0x7f800000u) return static_cast<uint16_t>((b >> 16) | ((b & 0xffffu) ? 0x40u : 0u));
  return static_cast<uint16_t>((b + (random16 & 0xffffu)) >> 16);
}

}  // namespace lowrank::optim
