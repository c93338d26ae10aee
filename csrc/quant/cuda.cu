// CUDA kernels of the quant family. Run and checked bit for bit against the references on
// an H100 (see the README's op table and benchmarks/results/), except the vectorized
// dequantize (dequantize_vec_kernel, 2026-11-25), which has not yet run on a GPU.
//
// quantize: one warp per quantization block (grid-stride over blocks). Each lane takes
// four consecutive elements per step, so a warp reads 512 contiguous values and writes
// 128 (8-bit) or 64 (4-bit) contiguous bytes per step. The absmax is a warp-shuffle
// reduction; the code and its midpoints sit in shared memory; the second pass re-reads
// the block (from L1/L2) rather than holding up to 128 values per lane in registers.
// dequantize: one thread per 16-byte word of q (below: 128-bit loads and stores) where q and
// the output are 16-byte aligned, else one thread per four elements; the code in shared memory.
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common/cuda_utils.cuh"
#include "quant/ops.h"
#include "quant/quant_math.h"

namespace lowrank::quant {
namespace {

constexpr int kWarpsPerCta = 8;
constexpr int kThreads = kWarpsPerCta * 32;
constexpr int kVec = 4;  // consecutive elements per lane per step

template <int BITS>
__device__ __forceinline__ void load_code(const float* code, float* s_code, float* s_mids) {
  constexpr int kCodeSize = 1 << BITS;
  for (int i = threadIdx.x; i < kCodeSize; i += blockDim.x) s_code[i] = code[i];
  __syncthreads();
  for (int i = threadIdx.x; i < kCodeSize - 1; i += blockDim.x) s_mids[i] = code_midpoint(s_code, i);
  if (threadIdx.x == 0) s_mids[kCodeSize - 1] = INFINITY;  // the padding of nearest_index_padded
  __syncthreads();
}

template <typename T, int BITS, bool STOCHASTIC>
__global__ void __launch_bounds__(kThreads) quantize_kernel(QuantizeParams p) {
  constexpr int kCodeSize = 1 << BITS;
  __shared__ float s_code[kCodeSize];
  __shared__ float s_mids[kCodeSize];
  load_code<BITS>(p.code, s_code, s_mids);

  const T* x = static_cast<const T*>(p.x);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + warp; b < p.nblocks;
       b += static_cast<int64_t>(gridDim.x) * kWarpsPerCta) {
    const int64_t base = b * p.blocksize;
    const int n = static_cast<int>(min(p.blocksize, p.numel - base));
    const T* xb = x + base;

    float amax = 0.f;
    bool nonfinite = false;
    for (int i = lane; i < n; i += 32) absmax_step(static_cast<float>(xb[i]), amax, nonfinite);
    amax = warp_allreduce(amax, [](float a, float c) { return fmaxf(a, c); });
    nonfinite = __any_sync(0xffffffffu, nonfinite);
    const float absmax = finish_absmax(amax, nonfinite);
    if (lane == 0) p.absmax[b] = absmax;

    for (int i0 = lane * kVec; i0 < n; i0 += 32 * kVec) {
      // the four elements share one Philox group (8 elements): base and i0 are multiples of 4
      Philox4 r{};
      if constexpr (STOCHASTIC) r = philox_group(p.seed, p.offset, static_cast<uint64_t>(base + i0) >> 3);
      uint32_t idx[kVec];
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const int i = i0 + k;
        const float v = i < n ? normalize(static_cast<float>(xb[i]), absmax) : 0.f;
        if constexpr (STOCHASTIC) {
          idx[k] = stochastic_index(s_code, kCodeSize, v, uniform_from_bits16(random16(r, static_cast<uint64_t>(base + i))));
        } else {
          idx[k] = nearest_index_padded(s_mids, kCodeSize, v);
        }
      }
      if constexpr (BITS == 8) {
        uint8_t* qb = p.q + base + i0;
        if (i0 + kVec <= n) {  // aligned: q is freshly allocated, base and i0 are multiples of 4
          *reinterpret_cast<uint32_t*>(qb) = idx[0] | (idx[1] << 8) | (idx[2] << 16) | (idx[3] << 24);
        } else {
#pragma unroll
          for (int k = 0; k < kVec; ++k) {  // constant indices keep idx[] in registers
            if (i0 + k < n) qb[k] = static_cast<uint8_t>(idx[k]);
          }
        }
      } else {
        uint8_t* qb = p.q + (base + i0) / 2;
        const uint32_t lo = idx[0] | (idx[1] << 4), hi = idx[2] | (idx[3] << 4);
        if (i0 + kVec <= n) {
          *reinterpret_cast<uint16_t*>(qb) = static_cast<uint16_t>(lo | (hi << 8));
        } else {  // unused nibbles of a partial last byte are zero (v = 0 is not used there)
          const int rem = n - i0;  // 1..3
          qb[0] = static_cast<uint8_t>(rem >= 2 ? lo : idx[0]);
          if (rem == 3) qb[1] = static_cast<uint8_t>(idx[2]);
        }
      }
    }
  }
}

template <typename T, int BITS>
__global__ void __launch_bounds__(kThreads) dequantize_kernel(DequantizeParams p, int log2_blocksize) {
  constexpr int kCodeSize = 1 << BITS;
  __shared__ float s_code[kCodeSize];
  for (int i = threadIdx.x; i < kCodeSize; i += blockDim.x) s_code[i] = p.code[i];
  __syncthreads();

  T* out = static_cast<T*>(p.out);
  const int64_t nvec = ceil_div<int64_t>(p.numel, kVec);
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < nvec;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e0 = t * kVec;  // the four elements share a block (blocksize >= 64)
    const float absmax = p.absmax[e0 >> log2_blocksize];
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const int64_t e = e0 + k;
      if (e < p.numel) {
        const int index = BITS == 8 ? p.q[e] : (p.q[e >> 1] >> ((e & 1) * 4)) & 0xF;
        out[e] = static_cast<T>(dequantize_value(s_code, index, absmax));
      }
    }
  }
}

// dequantize, vectorized: each thread takes one 16-byte word of q (16 values at 8 bits, 32 at
// 4) with a 128-bit load and writes its values with 16-byte stores, where q and out are 16-byte
// aligned (dequantize_blockwise_cuda checks; else the kernel above runs). The span's values
// share a quantization block (blocksize >= 64, a power of two, spans aligned to their size).
// The same arithmetic per value as dequantize_kernel; the numel % span tail is done by one
// thread. Written after the H100 run of 2026-11-25, where the kernel above moved 64M fp32
// values at 27% of peak bandwidth (0.35x bitsandbytes): NOT YET RUN ON A GPU.
template <typename T, int BITS>
__global__ void __launch_bounds__(kThreads) dequantize_vec_kernel(DequantizeParams p, int log2_blocksize) {
  constexpr int kCodeSize = 1 << BITS, kSpan = 128 / BITS, kStores = kSpan * static_cast<int>(sizeof(T)) / 16;
  static_assert(kStores * 16 == kSpan * static_cast<int>(sizeof(T)), "a span's output is whole 16-byte words");
  __shared__ float s_code[kCodeSize];
  for (int i = threadIdx.x; i < kCodeSize; i += blockDim.x) s_code[i] = p.code[i];
  __syncthreads();

  T* out = static_cast<T*>(p.out);
  const int64_t nspans = p.numel / kSpan;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t s = first; s < nspans; s += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e0 = s * kSpan;
    const uint4 word = reinterpret_cast<const uint4*>(p.q)[s];
    const uint32_t w[4] = {word.x, word.y, word.z, word.w};
    const float absmax = p.absmax[e0 >> log2_blocksize];
    T vals[kSpan];
#pragma unroll
    for (int k = 0; k < kSpan; ++k) {  // element k: bits [k BITS, (k + 1) BITS) of the little-endian word
      const int index = static_cast<int>((w[k * BITS / 32] >> ((k * BITS) % 32)) & (kCodeSize - 1));
      vals[k] = static_cast<T>(dequantize_value(s_code, index, absmax));
    }
    uint4* dst = reinterpret_cast<uint4*>(out + e0);
#pragma unroll
    for (int j = 0; j < kStores; ++j) {
      uint4 v;
      memcpy(&v, reinterpret_cast<const unsigned char*>(vals) + 16 * j, 16);
      dst[j] = v;
    }
  }
  if (first == 0) {
    for (int64_t e = nspans * kSpan; e < p.numel; ++e) {
      out[e] = static_cast<T>(dequantize_value(s_code, code_index(p.q, e, BITS), p.absmax[e >> log2_blocksize]));
    }
  }
}

int grid_for(int64_t work_items, int items_per_cta) {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(ceil_div<int64_t>(work_items, items_per_cta), int64_t{sms} * 32)));
}

template <int BITS, bool STOCHASTIC>
void launch_quantize(const QuantizeParams& p, cudaStream_t stream) {
  LOWRANK_DISPATCH_FLOAT(p.x_kind, T, [&] {
    quantize_kernel<T, BITS, STOCHASTIC><<<grid_for(p.nblocks, kWarpsPerCta), kThreads, 0, stream>>>(p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cuda_op(const at::Tensor& x, const at::Tensor& code,
                                                              int64_t blocksize, int64_t bits,
                                                              bool stochastic_rounding, int64_t seed, int64_t offset) {
  // checks first: with x on the CPU and code on CUDA, this kernel is picked and must say so
  PreparedQuantize prep = prepare_quantize(x, code, blocksize, bits, stochastic_rounding, seed, offset);
  const c10::cuda::OptionalCUDAGuard guard(prep.q.device());
  quantize_blockwise_cuda(prep.params, at::cuda::getCurrentCUDAStream());
  return {prep.q, prep.absmax};
}

at::Tensor dequantize_blockwise_cuda_op(const at::Tensor& q, const at::Tensor& absmax, const at::Tensor& code,
                                        int64_t blocksize, int64_t bits, c10::SymIntArrayRef shape,
                                        at::ScalarType dtype) {
  PreparedDequantize prep = prepare_dequantize(q, absmax, code, blocksize, bits, shape, dtype);
  const c10::cuda::OptionalCUDAGuard guard(prep.out.device());
  dequantize_blockwise_cuda(prep.params, at::cuda::getCurrentCUDAStream());
  return prep.out;
}

}  // namespace

void quantize_blockwise_cuda(const QuantizeParams& p, cudaStream_t stream) {
  if (p.numel == 0) return;
  if (p.bits == 8) {
    p.stochastic ? launch_quantize<8, true>(p, stream) : launch_quantize<8, false>(p, stream);
  } else {
    p.stochastic ? launch_quantize<4, true>(p, stream) : launch_quantize<4, false>(p, stream);
  }
}

void dequantize_blockwise_cuda(const DequantizeParams& p, cudaStream_t stream) {
  if (p.numel == 0) return;
  int log2_blocksize = 0;
  while ((int64_t{1} << log2_blocksize) < p.blocksize) ++log2_blocksize;
  const bool aligned = reinterpret_cast<uintptr_t>(p.q) % 16 == 0 && reinterpret_cast<uintptr_t>(p.out) % 16 == 0;
  const int64_t span = 128 / p.bits;  // values per 16-byte word of q
  const int grid = aligned ? grid_for(std::max<int64_t>(p.numel / span, 1), kThreads)
                           : grid_for(ceil_div<int64_t>(p.numel, kVec), kThreads);
  LOWRANK_DISPATCH_FLOAT(p.out_kind, T, [&] {
    if (p.bits == 8 && aligned) {
      dequantize_vec_kernel<T, 8><<<grid, kThreads, 0, stream>>>(p, log2_blocksize);
    } else if (p.bits == 8) {
      dequantize_kernel<T, 8><<<grid, kThreads, 0, stream>>>(p, log2_blocksize);
    } else if (aligned) {
      dequantize_vec_kernel<T, 4><<<grid, kThreads, 0, stream>>>(p, log2_blocksize);
    } else {
      dequantize_kernel<T, 4><<<grid, kThreads, 0, stream>>>(p, log2_blocksize);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

TORCH_LIBRARY_IMPL(lowrank, CUDA, m) {
  m.impl("quantize_blockwise", TORCH_FN(quantize_blockwise_cuda_op));
  m.impl("dequantize_blockwise", TORCH_FN(dequantize_blockwise_cuda_op));
}

}  // namespace lowrank::quant
