#pragma once
// Small CUDA helpers shared by the families' cuda.cu files.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <optional>

namespace lowrank {

template <typename T>
__host__ __device__ constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

// The device a CUDA op's guard selects: that of its first CUDA tensor argument (the dispatcher
// chose the CUDA kernel because one is on a GPU). Guarding on a fixed argument instead fails
// inside the guard ("CUDAGuardImpl initialized with non-CUDA DeviceType") when that argument
// is on the CPU, before the op's own device check can name it.
inline void note_cuda_device(std::optional<c10::Device>& d, const at::Tensor& t) {
  if (!d.has_value() && t.defined() && t.is_cuda()) d = t.device();
}
inline void note_cuda_device(std::optional<c10::Device>& d, const std::optional<at::Tensor>& t) {
  if (t.has_value()) note_cuda_device(d, *t);
}
inline void note_cuda_device(std::optional<c10::Device>& d, at::TensorList ts) {
  for (const at::Tensor& t : ts) note_cuda_device(d, t);
}
template <typename... Ts>
std::optional<c10::Device> first_cuda_device(const Ts&... ts) {
  std::optional<c10::Device> d;
  (note_cuda_device(d, ts), ...);
  return d;
}

// Reduction over the 32 lanes of a warp; every lane gets the result.
template <typename Op>
__device__ __forceinline__ float warp_allreduce(float v, Op op) {
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, mask));
  return v;
}

// A product and a sum rounded separately, where CUDA must round as the CPU does (the host
// build has -ffp-contract=off; nvcc would fuse a * b + c into one FMA).
__device__ __forceinline__ float product_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double product_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float sum_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double sum_rn(double a, double b) { return __dadd_rn(a, b); }

}  // namespace lowrank
