#pragma once
// LOWRANK_HD marks math shared by the CPU and CUDA kernels: __host__ __device__ under
// nvcc, plain inline under a host compiler. One definition, so CPU and CUDA agree bit
// for bit and CPU tests cover the math on machines without a GPU.
#if defined(__CUDACC__)
#define LOWRANK_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define LOWRANK_HD inline __attribute__((always_inline))  // small math: always inline in hot loops
#else
#define LOWRANK_HD inline
#endif

#include <cstdint>
#include <cstring>

namespace lowrank {

LOWRANK_HD uint32_t float_as_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#elif !defined(__CUDACC__)
  return __builtin_bit_cast(uint32_t, f);  // unlike memcpy, lets GCC vectorize loops using it
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

LOWRANK_HD float bits_as_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#elif !defined(__CUDACC__)
  return __builtin_bit_cast(float, u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

}  // namespace lowrank
