#pragma once
// Host only: dst = src^T for the CPU kernels that switch a tile between token-major and
// feature-major layouts (monarch, sparse). fp32 -> fp32 goes through AVX2 8 x 8 register
// transposes grouped in 16 x 16 tiles, so every 64-byte line a tile reads or writes is used
// whole at once: a scalar loop over a power-of-two row stride keeps evicting its own lines
// (they all map to a few cache sets). Edges and other dtype pairs run scalar, in 32 x 32
// blocks. The values are only copied (or converted), so every path gives the same bits.
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/cpu_clones.h"

#ifdef LOWRANK_X86_AVX2_PATHS
#include <immintrin.h>
#endif

namespace lowrank {

#ifdef LOWRANK_X86_AVX2_PATHS
// dst rows 0..7 (stride ldd) = the columns of the 8 x 8 block at src (stride lds).
__attribute__((target("avx2"), always_inline)) inline void transpose8x8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);      // a0 b0 a1 b1 | a4 b4 a5 b5
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);  // a2 b2 a3 b3 | a6 b6 a7 b7
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);      // a0 b0 c0 d0 | a4 b4 c4 d4
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);  // a1 b1 c1 d1 | a5 ...
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}

// The 16 x 16 tiles of the leading [m16, n16] block (multiples of 16), src rows outermost.
__attribute__((target("avx2"))) inline void transpose_tiles16_avx2(const float* src, int64_t lds, int64_t m16,
                                                                     int64_t n16, float* dst, int64_t ldd) {
  for (int64_t i = 0; i < m16; i += 16) {
    for (int64_t j = 0; j < n16; j += 16) {
      const float* s = src + i * lds + j;
      float* d = dst + j * ldd + i;
      transpose8x8(s, lds, d, ldd);
      transpose8x8(s + 8 * lds, lds, d + 8, ldd);
      transpose8x8(s + 8, lds, d + 8 * ldd, ldd);
      transpose8x8(s + 8 * lds + 8, lds, d + 8 * ldd + 8, ldd);
    }
  }
}
#endif

// dst[j * ldd + i] = D(src[i * lds + j]) for i < m, j < n, on the calling thread.
template <typename S, typename D>
void transpose_matrix(const S* src, int64_t lds, int64_t m, int64_t n, D* dst, int64_t ldd) {
  int64_t m16 = 0, n16 = 0;  // the block done in AVX2 tiles
#ifdef LOWRANK_X86_AVX2_PATHS
  if constexpr (std::is_same_v<S, float> && std::is_same_v<D, float>) {
    if (cpu_has_avx2()) {
      m16 = m / 16 * 16, n16 = n / 16 * 16;
      transpose_tiles16_avx2(src, lds, m16, n16, dst, ldd);
    }
  }
#endif
  // the rest: rows [m16, m) of every column, and columns [n16, n) of rows [0, m16)
  constexpr int64_t kB = 32;
  auto scalar_block = [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    for (int64_t ib = i0; ib < i1; ib += kB)
      for (int64_t jb = j0; jb < j1; jb += kB)
        for (int64_t i = ib; i < std::min(ib + kB, i1); ++i)
          for (int64_t j = jb; j < std::min(jb + kB, j1); ++j) dst[j * ldd + i] = static_cast<D>(src[i * lds + j]);
  };
  scalar_block(0, m16, n16, n);
  scalar_block(m16, m, 0, n);
}

}  // namespace lowrank
