#pragma once
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11):
// a counter-based generator, so (seed, offset, element index) -> value with no state.
// Forward and backward regenerate the same numbers, and CPU and CUDA draw the same
// stream. Each element gets 16 random bits: element i uses counter {i/8 (64 bit),
// offset (64 bit)}, 32-bit lane (i/2)%4 of the output and its low (i even) or high half,
// so one call serves 8 elements (16 bits are plenty for rounding decisions).
#include "common/host_device.h"

namespace lowrank {

struct Philox4 {
  uint32_t v[4];
};

LOWRANK_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

LOWRANK_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                 uint32_t k0, uint32_t k1) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kMul0, c0, hi0, lo0);
    mulhilo32(kMul1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// The four 32-bit draws of counter group `group` (elements 8*group .. 8*group+7).
LOWRANK_HD Philox4 philox_group(uint64_t seed, uint64_t offset, uint64_t group) {
  return philox4x32_10(static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32),
                       static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32),
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

constexpr int kPhiloxGroup = 8;  // elements served by one philox_group call

// Element `index`'s 16 random bits from its group's draws.
LOWRANK_HD uint32_t random16(const Philox4& r, uint64_t index) {
  return (r.v[(index >> 1) & 3] >> ((index & 1) * 16)) & 0xffffu;
}

// 16 random bits -> a float in [0, 1), exact in fp32 (the reference does the same).
LOWRANK_HD float uniform_from_bits16(uint32_t r16) { return static_cast<float>(r16) * (1.0f / 65536.0f); }


}  // namespace lowrank
