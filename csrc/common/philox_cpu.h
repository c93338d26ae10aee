#pragma once
// Host only: the 16-bit Philox draws of many consecutive groups at once (philox.h's stream,
// element 8 g + k of group g), for the CPU kernels that draw per element (stochastic
// rounding, dropout masks). Where the CPU has AVX2, sixteen groups are computed per step in
// 32-bit vector lanes; Philox is integer arithmetic, so the bits are the scalar version's
// (checked against it, counter wrap included, in a standalone harness; the ops' bit-exact
// reference tests run the AVX2 path on the dev machines).
#include <cstdint>

#include "common/cpu_clones.h"
#include "common/philox.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define LOWRANK_PHILOX_AVX2 1
#endif

namespace lowrank {

// r16[8 g + k] = the 16 random bits of element 8 (first_group + g) + k, for g < groups.
inline void philox_random16_scalar(uint64_t seed, uint64_t offset, uint64_t first_group, int groups,
                                   uint16_t* __restrict r16) {
  for (int g = 0; g < groups; ++g) {
    const Philox4 r = philox_group(seed, offset, first_group + g);
    for (int k = 0; k < kPhiloxGroup; ++k) r16[kPhiloxGroup * g + k] = static_cast<uint16_t>(random16(r, k));
  }
}

// u[8 g + k] = uniform_from_bits16 of the same draws.
inline void philox_uniforms_scalar(uint64_t seed, uint64_t offset, uint64_t first_group, int groups,
                                   float* __restrict u) {
  for (int g = 0; g < groups; ++g) {
    const Philox4 r = philox_group(seed, offset, first_group + g);
    for (int k = 0; k < kPhiloxGroup; ++k) u[kPhiloxGroup * g + k] = uniform_from_bits16(random16(r, k));
  }
}

#ifdef LOWRANK_PHILOX_AVX2
// Philox state of eight consecutive groups, one group per 32-bit AVX2 lane.
struct PhiloxLanes {
  __m256i c0, c1, c2, c3;
};

__attribute__((target("avx2"))) inline PhiloxLanes philox_lanes_init(uint64_t g0, uint64_t offset) {
  // counters {group (64 bit), offset (64 bit)}; the low word of 8 consecutive groups may wrap
  const __m256i lo0 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(g0)));
  const __m256i c0 = _mm256_add_epi32(lo0, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256i flip = _mm256_set1_epi32(INT32_MIN);  // unsigned compare through a signed one
  const __m256i wrapped = _mm256_cmpgt_epi32(_mm256_xor_si256(lo0, flip), _mm256_xor_si256(c0, flip));
  return {c0, _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(g0 >> 32))), wrapped),
          _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset))),
          _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset >> 32)))};
}

// One Philox round on eight lanes: mul_epu32 forms the 64-bit products of the even lanes,
// the odd lanes go through a 32-bit shift.
__attribute__((target("avx2"))) inline void philox_lanes_round(PhiloxLanes& s, __m256i k0, __m256i k1) {
  const __m256i mul0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i mul1 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  const __m256i e0 = _mm256_mul_epu32(s.c0, mul0), o0 = _mm256_mul_epu32(_mm256_srli_epi64(s.c0, 32), mul0);
  const __m256i e1 = _mm256_mul_epu32(s.c2, mul1), o1 = _mm256_mul_epu32(_mm256_srli_epi64(s.c2, 32), mul1);
  const __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(e0, 32), o0, 0xAA);
  const __m256i lo0 = _mm256_blend_epi32(e0, _mm256_slli_epi64(o0, 32), 0xAA);
  const __m256i hi1 = _mm256_blend_epi32(_mm256_srli_epi64(e1, 32), o1, 0xAA);
  const __m256i lo1 = _mm256_blend_epi32(e1, _mm256_slli_epi64(o1, 32), 0xAA);
  s.c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, s.c1), k0);
  s.c1 = lo1;
  s.c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, s.c3), k1);
  s.c3 = lo0;
}

// The eight groups' draws, transposed to one group per 128 bits: a group's four words are
// its eight 16-bit draws in element order (element 2j: word j's low half, 2j + 1: high).
// pairs[i] holds groups i (low half) and i + 4 (high half).
__attribute__((target("avx2"))) inline void philox_lanes_transpose(const PhiloxLanes& s, __m256i* pairs) {
  const __m256i t0 = _mm256_unpacklo_epi32(s.c0, s.c1), t1 = _mm256_unpackhi_epi32(s.c0, s.c1);
  const __m256i t2 = _mm256_unpacklo_epi32(s.c2, s.c3), t3 = _mm256_unpackhi_epi32(s.c2, s.c3);
  pairs[0] = _mm256_unpacklo_epi64(t0, t2);
  pairs[1] = _mm256_unpackhi_epi64(t0, t2);
  pairs[2] = _mm256_unpacklo_epi64(t1, t3);
  pairs[3] = _mm256_unpackhi_epi64(t1, t3);
}

// The transposed draws of the sixteen groups g0 .. g0 + 15: pairs[0..3] for groups g0 .. g0 + 7,
// pairs[4..7] for g0 + 8 .. g0 + 15 (two independent sets of lanes: more work in flight).
__attribute__((target("avx2"))) inline void philox_avx2_16(uint64_t seed, uint64_t offset, uint64_t g0,
                                                           __m256i (&pairs)[8]) {
  PhiloxLanes a = philox_lanes_init(g0, offset), b = philox_lanes_init(g0 + 8, offset);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const __m256i vk0 = _mm256_set1_epi32(static_cast<int>(k0)), vk1 = _mm256_set1_epi32(static_cast<int>(k1));
    philox_lanes_round(a, vk0, vk1);
    philox_lanes_round(b, vk0, vk1);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  philox_lanes_transpose(a, pairs);
  philox_lanes_transpose(b, pairs + 4);
}

// Group of pairs[p]'s low half, relative to g0 (its high half is that + 4).
constexpr int pair_group(int p) { return (p / 4) * 8 + p % 4; }

__attribute__((target("avx2"))) inline void philox_random16_avx2(uint64_t seed, uint64_t offset,
                                                                 uint64_t first_group, int groups,
                                                                 uint16_t* __restrict r16) {
  int g = 0;
  for (; g + 16 <= groups; g += 16) {
    __m256i pairs[8];
    philox_avx2_16(seed, offset, first_group + static_cast<uint64_t>(g), pairs);
    for (int p = 0; p < 8; ++p) {
      uint16_t* out = r16 + kPhiloxGroup * (g + pair_group(p));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_castsi256_si128(pairs[p]));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 4 * kPhiloxGroup), _mm256_extracti128_si256(pairs[p], 1));
    }
  }
  philox_random16_scalar(seed, offset, first_group + static_cast<uint64_t>(g), groups - g, r16 + kPhiloxGroup * g);
}

__attribute__((target("avx2"))) inline void philox_uniforms_avx2(uint64_t seed, uint64_t offset,
                                                                 uint64_t first_group, int groups,
                                                                 float* __restrict u) {
  const __m256 scale = _mm256_set1_ps(1.0f / 65536.0f);  // uniform_from_bits16, exact
  int g = 0;
  for (; g + 16 <= groups; g += 16) {
    __m256i pairs[8];
    philox_avx2_16(seed, offset, first_group + static_cast<uint64_t>(g), pairs);
    for (int p = 0; p < 8; ++p) {
      float* out = u + kPhiloxGroup * (g + pair_group(p));
      const __m256i lo = _mm256_cvtepu16_epi32(_mm256_castsi256_si128(pairs[p]));
      const __m256i hi = _mm256_cvtepu16_epi32(_mm256_extracti128_si256(pairs[p], 1));
      _mm256_storeu_ps(out, _mm256_mul_ps(_mm256_cvtepi32_ps(lo), scale));
      _mm256_storeu_ps(out + 4 * kPhiloxGroup, _mm256_mul_ps(_mm256_cvtepi32_ps(hi), scale));
    }
  }
  philox_uniforms_scalar(seed, offset, first_group + static_cast<uint64_t>(g), groups - g, u + kPhiloxGroup * g);
}

#endif

// r16[8 g + k] = the 16 random bits of element 8 (first_group + g) + k.
inline void philox_random16(uint64_t seed, uint64_t offset, uint64_t first_group, int groups,
                            uint16_t* __restrict r16) {
#ifdef LOWRANK_PHILOX_AVX2
  if (cpu_has_avx2()) return philox_random16_avx2(seed, offset, first_group, groups, r16);
#endif
  philox_random16_scalar(seed, offset, first_group, groups, r16);
}

// u[8 g + k] = the uniform draw (16 bits / 65536) of element 8 (first_group + g) + k.
inline void philox_uniforms(uint64_t seed, uint64_t offset, uint64_t first_group, int groups, float* __restrict u) {
#ifdef LOWRANK_PHILOX_AVX2
  if (cpu_has_avx2()) return philox_uniforms_avx2(seed, offset, first_group, groups, u);
#endif
  philox_uniforms_scalar(seed, offset, first_group, groups, u);
}

}  // namespace lowrank
