#pragma once
// The arithmetic of block-wise quantization, shared by the CPU and CUDA kernels and
// mirrored exactly by lowrank_ext/reference/quant.py:
//   absmax  = max |x| over the block, or NaN when the block holds a NaN or an infinity
//             (the block then dequantizes to NaN everywhere: non-finite input is never
//             turned into finite output)
//   v       = x / absmax in fp32 (v = 0 when absmax is 0 or NaN)
//   nearest = number of code midpoints m_j = 0.5f * (code[j] + code[j+1]) below v; ties
//             go to the lower entry
//   stochastic: with c_i <= v < c_{i+1}, pick i+1 with probability (v - c_i) / (c_{i+1} - c_i),
//             from a Philox draw u in [0, 1): pick i+1 when u * (c_{i+1} - c_i) < v - c_i
//   x'      = code[q] * absmax in fp32, then cast to the output dtype
#include <cmath>

#include "common/host_device.h"
#include "common/philox.h"

namespace lowrank::quant {

// Number of entries of the sorted range arr[lo, hi) that are < v (a lower bound).
LOWRANK_HD int count_less(const float* arr, int lo, int hi, float v) {
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (arr[mid] < v) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// #{j : arr[j] <= v} over a sorted arr[0, n) with n a power of two, without data-dependent
// branches (a select per step): a branchy search mispredicts half its steps on random data.
// Invariant: the answer lies in [lo, lo + len].
LOWRANK_HD int count_less_equal_pow2(const float* arr, int n, float v) {
  int lo = 0;
  for (int len = n; len > 1; len >>= 1) {
    const int half = len >> 1;
    lo += arr[lo + half - 1] <= v ? half : 0;
  }
  return lo + (arr[lo] <= v ? 1 : 0);
}

// #{j : arr[j] < v} over a sorted arr[0, n) with n a power of two, branch-free (a select per
// step, log2(n) + 1 loads): count_less's answer without its data-dependent loop, which
// diverges across a warp. A caller padding a shorter array to n puts +inf in the padding.
LOWRANK_HD int count_less_pow2(const float* arr, int n, float v) {
  int lo = 0;
  for (int len = n; len > 1; len >>= 1) {
    const int half = len >> 1;
    lo += arr[lo + half - 1] < v ? half : 0;
  }
  return lo + (arr[lo] < v ? 1 : 0);
}

LOWRANK_HD float code_midpoint(const float* code, int j) { return 0.5f * (code[j] + code[j + 1]); }

// NaN-propagating |x| max step: the flag records any non-finite value seen.
LOWRANK_HD void absmax_step(float x, float& amax, bool& nonfinite) {
  const float a = fabsf(x);
  amax = a > amax ? a : amax;
  nonfinite |= !(a <= 3.402823466e+38f);  // true for inf and NaN
}

LOWRANK_HD float finish_absmax(float amax, bool nonfinite) {
  return nonfinite ? bits_as_float(0x7fc00000u) : amax;
}

LOWRANK_HD float normalize(float x, float absmax) { return absmax > 0.f ? x / absmax : 0.f; }

// Nearest code entry: mids[j] is the midpoint between code[j] and code[j+1].
LOWRANK_HD int nearest_index(const float* mids, int n_mids, float v) {
  return count_less(mids, 0, n_mids, v);
}

// The same for a code of n = 2^bits entries whose n - 1 midpoints are followed by +inf in
// mids[n - 1] (the CUDA kernels' shared-memory tables): nearest_index(mids, n - 1, v) for
// every v that is not NaN (normalize() never gives NaN).
LOWRANK_HD int nearest_index_padded(const float* mids, int n, float v) { return count_less_pow2(mids, n, v); }

// The stochastic rounding decision for lo <= v < hi: up with probability (v - lo) / (hi - lo),
// written without the division (u * gap < distance; u has 16 random bits).
LOWRANK_HD bool round_up(float v, float lo, float hi, float u) { return u * (hi - lo) < v - lo; }

// n (the code size, 2^bits) must be a power of two.
LOWRANK_HD int stochastic_index(const float* code, int n, float v, float u) {
  const int i = count_less_equal_pow2(code, n, v) - 1;  // largest i with code[i] <= v
  if (i < 0) return 0;
  if (i >= n - 1) return n - 1;
  const float lo = code[i], hi = code[i + 1];
  return round_up(v, lo, hi, u) ? i + 1 : i;
}

LOWRANK_HD float dequantize_value(const float* code, int index, float absmax) {
  return code[index] * absmax;
}

// The code index of element e of a q buffer: one byte each (8-bit), or two per byte with
// the even element in the low nibble (4-bit).
LOWRANK_HD int code_index(const uint8_t* q, int64_t e, int bits) {
  return bits == 8 ? q[e] : (q[e >> 1] >> ((e & 1) * 4)) & 0xF;
}

// Element e of a block-wise quantized tensor, for kernels that dequantize as they load.
LOWRANK_HD float dequantize_element(const uint8_t* q, const float* absmax, const float* code, int bits,
                                    int64_t blocksize, int64_t e) {
  return dequantize_value(code, code_index(q, e, bits), absmax[e / blocksize]);
}

// Order-preserving map from finite floats to uint32 (used by the CPU search table):
// negative floats have all bits flipped, positive ones only the sign bit. Branch-free,
// since signs are random in the data it runs over.
LOWRANK_HD uint32_t ordered_key(float v) {
  const uint32_t b = float_as_bits(v);
  const uint32_t sign_mask = static_cast<uint32_t>(static_cast<int32_t>(b) >> 31);
  return b ^ (sign_mask | 0x80000000u);
}

LOWRANK_HD float key_to_float(uint32_t key) {
  return bits_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

}  // namespace lowrank::quant
