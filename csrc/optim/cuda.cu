// CUDA kernels of the optim family. NOTE: compiled in CI, but run on a GPU only when a
// session has one; see the README's op table for what has been verified on a GPU.
//
// One launch steps every tensor of the call: the grid strides over the superblocks of
// all tensors (prefix sums in block_offsets), one warp per superblock; the tensor table
// and offsets travel host->device asynchronously from pinned memory, so there is no host
// synchronisation. Quantized state takes two passes over a superblock: the first
// computes the updated moments to find each block's new absmax (warp shuffles), the
// second recomputes them (same inputs, same arithmetic), writes the param and stores
// the re-quantized moments. The re-read hits L1/L2; nothing of size blocksize is held.
#include <torch/library.h>

#include <ATen/ops/empty.h>

#include "common/cuda_utils.cuh"
#include "optim/ops.h"
#include "optim/optim_math.h"
#include "quant/quant_math.h"

namespace lowrank::optim {
namespace {

constexpr int kWarpsPerCta = 4;
constexpr int kThreads = kWarpsPerCta * 32;
constexpr int kVec = 4;                        // consecutive elements per lane per step
constexpr int kStep = 32 * kVec;               // elements per warp step (128)
constexpr int kMinBlocksize = 128;             // ops.cpp's floor for the moments' blocksizes
constexpr int kMaxSubBlocks = 4096 / kMinBlocksize;  // blocks in a superblock of <= 4096 values
// pass 1 takes one absmax per warp step: a step must never straddle two blocks
static_assert(kStep <= kMinBlocksize && kMinBlocksize % kStep == 0, "a warp step must sit inside one block");

__device__ __forceinline__ int64_t find_tensor(const int64_t* offsets, int64_t num_tensors, int64_t block) {
  int64_t lo = 0, hi = num_tensors;  // largest t with offsets[t] <= block
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (offsets[mid] <= block) lo = mid; else hi = mid;
  }
  return lo;
}

template <typename P>
__device__ __forceinline__ P store_param(float value, const AdamWStepParams& p, const Philox4& r, int64_t e) {
  if constexpr (std::is_same_v<P, c10::BFloat16>) {
    if (p.stochastic_rounding)
      return c10::BFloat16(bf16_bits_stochastic(value, random16(r, static_cast<uint64_t>(e))), c10::BFloat16::from_bits());
  }
  return static_cast<P>(value);
}

__device__ __forceinline__ int code_index(const uint8_t* q, int bits, int64_t e) {
  return bits == 8 ? q[e] : (q[e >> 1] >> ((e & 1) * 4)) & 0xF;
}

struct SharedCodes {
  float code_m[256], mids_m[256], code_v[256], mids_v[256];
  float absmax_m[kWarpsPerCta][kMaxSubBlocks], absmax_v[kWarpsPerCta][kMaxSubBlocks];
  int bad_m[kWarpsPerCta][kMaxSubBlocks], bad_v[kWarpsPerCta][kMaxSubBlocks];
};

// The four elements e0..e0+3 (those < end) of one lane: load, update in fp32.
template <typename P, typename G>
__device__ __forceinline__ void update4(const AdamWStepParams& p, const TensorSlot& s, const SharedCodes& sh,
                                        int64_t e0, int64_t end, AdamWResult (&r)[kVec]) {
  const P* param = static_cast<const P*>(s.param);
  const G* grad = static_cast<const G*>(s.grad);
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    const int64_t e = e0 + k;
    if (e < end) {
      float m, v;
      if (p.quantized) {
        m = quant::dequantize_value(sh.code_m, code_index(s.exp_avg_q, p.bits, e),
                                    s.exp_avg_absmax[e >> p.log2_blocksize_exp_avg]);
        v = quant::dequantize_value(sh.code_v, code_index(s.exp_avg_sq_q, p.bits, e),
                                    s.exp_avg_sq_absmax[e >> p.log2_blocksize_exp_avg_sq]);
      } else {
        m = s.exp_avg[e];
        v = s.exp_avg_sq[e];
      }
      r[k] = adamw_update(static_cast<float>(param[e]), static_cast<float>(grad[e]), m, v, p.c);
    } else {
      r[k] = AdamWResult{0.f, 0.f, 0.f};
    }
  }
}

__device__ __forceinline__ void store_indices(uint8_t* q, int bits, int64_t e0, int64_t end, const int (&idx)[kVec]) {
  if (bits == 8) {
#pragma unroll
    for (int k = 0; k < kVec; ++k)
      if (e0 + k < end) q[e0 + k] = static_cast<uint8_t>(idx[k]);
  } else {  // e0 is even: bytes e0/2 and e0/2 + 1; an odd last element sits alone
    if (e0 < end) q[e0 / 2] = static_cast<uint8_t>(idx[0] | (e0 + 1 < end ? idx[1] << 4 : 0));
    if (e0 + 2 < end) q[e0 / 2 + 1] = static_cast<uint8_t>(idx[2] | (e0 + 3 < end ? idx[3] << 4 : 0));
  }
}

template <typename P, typename G>
__global__ void __launch_bounds__(kThreads) adamw_kernel(AdamWStepParams p, const int64_t* offsets, int64_t total) {
  __shared__ SharedCodes sh;
  const int code_size = p.quantized ? 1 << p.bits : 0;
  for (int i = threadIdx.x; i < code_size; i += blockDim.x) {
    sh.code_m[i] = p.code_exp_avg[i];
    sh.code_v[i] = p.code_exp_avg_sq[i];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < code_size - 1; i += blockDim.x) {
    sh.mids_m[i] = quant::code_midpoint(sh.code_m, i);
    sh.mids_v[i] = quant::code_midpoint(sh.code_v, i);
  }
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t S = superblock_size(p);
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + warp; b < total;
       b += static_cast<int64_t>(gridDim.x) * kWarpsPerCta) {
    const int64_t t = find_tensor(offsets, p.num_tensors, b);
    const TensorSlot s = p.tensors[t];  // a register copy: stores through its pointers cannot alias it
    const int64_t base = (b - offsets[t]) * S;
    const int64_t end = min(base + S, s.numel);
    AdamWResult r[kVec];

    if (!p.quantized) {
      for (int64_t e0 = base + lane * kVec; e0 < end; e0 += kStep) {
        update4<P, G>(p, s, sh, e0, end, r);
        Philox4 rnd{};
        if (p.stochastic_rounding) rnd = philox_group(p.seed, stream_offset(t, kParamStream), static_cast<uint64_t>(e0) >> 3);
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          if (e0 + k < end) {
            s.exp_avg[e0 + k] = r[k].exp_avg;
            s.exp_avg_sq[e0 + k] = r[k].exp_avg_sq;
            static_cast<P*>(s.param)[e0 + k] = store_param<P>(r[k].param, p, rnd, e0 + k);
          }
        }
      }
      continue;
    }

    // pass 1: the new absmax of every block of each moment in this superblock
    const int sub_m = static_cast<int>(S / p.blocksize_exp_avg), sub_v = static_cast<int>(S / p.blocksize_exp_avg_sq);
    if (lane < kMaxSubBlocks) {
      sh.absmax_m[warp][lane] = 0.f;
      sh.absmax_v[warp][lane] = 0.f;
      sh.bad_m[warp][lane] = 0;
      sh.bad_v[warp][lane] = 0;
    }
    __syncwarp();
    for (int64_t step0 = base; step0 < end; step0 += kStep) {  // warp-uniform loop
      update4<P, G>(p, s, sh, step0 + lane * kVec, end, r);
      float amax_m = 0.f, amax_v = 0.f;
      bool bad_m = false, bad_v = false;
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        quant::absmax_step(r[k].exp_avg, amax_m, bad_m);
        quant::absmax_step(r[k].exp_avg_sq, amax_v, bad_v);
      }
      amax_m = warp_allreduce(amax_m, [](float a, float c) { return fmaxf(a, c); });
      amax_v = warp_allreduce(amax_v, [](float a, float c) { return fmaxf(a, c); });
      bad_m = __any_sync(0xffffffffu, bad_m);
      bad_v = __any_sync(0xffffffffu, bad_v);
      if (lane == 0) {
        const int jm = static_cast<int>((step0 - base) >> p.log2_blocksize_exp_avg);
        const int jv = static_cast<int>((step0 - base) >> p.log2_blocksize_exp_avg_sq);
        sh.absmax_m[warp][jm] = fmaxf(sh.absmax_m[warp][jm], amax_m);
        sh.absmax_v[warp][jv] = fmaxf(sh.absmax_v[warp][jv], amax_v);
        sh.bad_m[warp][jm] |= bad_m;
        sh.bad_v[warp][jv] |= bad_v;
      }
      __syncwarp();
    }
    if (lane < kMaxSubBlocks) {
      sh.absmax_m[warp][lane] = quant::finish_absmax(sh.absmax_m[warp][lane], sh.bad_m[warp][lane]);
      sh.absmax_v[warp][lane] = quant::finish_absmax(sh.absmax_v[warp][lane], sh.bad_v[warp][lane]);
    }
    __syncwarp();

    // pass 2: recompute, write the param and the re-quantized moments
    for (int64_t e0 = base + lane * kVec; e0 < end; e0 += kStep) {
      update4<P, G>(p, s, sh, e0, end, r);
      const float am = sh.absmax_m[warp][(e0 - base) >> p.log2_blocksize_exp_avg];
      const float av = sh.absmax_v[warp][(e0 - base) >> p.log2_blocksize_exp_avg_sq];
      Philox4 rnd{};
      if (p.stochastic_rounding) rnd = philox_group(p.seed, stream_offset(t, kParamStream), static_cast<uint64_t>(e0) >> 3);
      Philox4 rnd_m{}, rnd_v{};
      if (p.stochastic_exp_avg) rnd_m = philox_group(p.seed, stream_offset(t, kExpAvgStream), static_cast<uint64_t>(e0) >> 3);
      if (p.stochastic_exp_avg_sq)
        rnd_v = philox_group(p.seed, stream_offset(t, kExpAvgSqStream), static_cast<uint64_t>(e0) >> 3);
      int im[kVec], iv[kVec];
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const float vm = quant::normalize(r[k].exp_avg, am), vv = quant::normalize(r[k].exp_avg_sq, av);
        im[k] = p.stochastic_exp_avg ? quant::stochastic_index(sh.code_m, code_size, vm, uniform_from_bits16(random16(rnd_m, static_cast<uint64_t>(e0 + k))))
                                     : quant::nearest_index(sh.mids_m, code_size - 1, vm);
        iv[k] = p.stochastic_exp_avg_sq
                    ? quant::stochastic_index(sh.code_v, code_size, vv, uniform_from_bits16(random16(rnd_v, static_cast<uint64_t>(e0 + k))))
                    : quant::nearest_index(sh.mids_v, code_size - 1, vv);
        if (e0 + k < end) static_cast<P*>(s.param)[e0 + k] = store_param<P>(r[k].param, p, rnd, e0 + k);
      }
      store_indices(s.exp_avg_q, p.bits, e0, end, im);
      store_indices(s.exp_avg_sq_q, p.bits, e0, end, iv);
    }
    // the new absmax goes out only now: pass 2 dequantized the old moments with the old one
    __syncwarp();
    if (lane < sub_m && base + lane * p.blocksize_exp_avg < end)
      s.exp_avg_absmax[base / p.blocksize_exp_avg + lane] = sh.absmax_m[warp][lane];
    if (lane < sub_v && base + lane * p.blocksize_exp_avg_sq < end)
      s.exp_avg_sq_absmax[base / p.blocksize_exp_avg_sq + lane] = sh.absmax_v[warp][lane];
    __syncwarp();  // the next superblock of this warp reuses the shared absmax slots
  }
}

// Copies the tensor table and the offsets to the device in one buffer, without a host
// synchronisation: pinned staging memory and an async copy on the current stream (the
// caching host allocator keeps the staging buffer alive until the copy has run; the device
// buffer is freed to the same stream, after the kernel).
static_assert(sizeof(TensorSlot) % alignof(int64_t) == 0, "the offsets follow the table in one buffer");

void launch(PreparedStep& prep) {
  const int64_t total = prep.block_offsets.back();
  if (total == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(prep.device);
  const size_t slot_bytes = prep.slots.size() * sizeof(TensorSlot);  // a multiple of 8: offsets stay aligned
  const size_t offset_bytes = prep.block_offsets.size() * sizeof(int64_t);
  at::Tensor host = at::empty({static_cast<int64_t>(slot_bytes + offset_bytes)},
                              at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.mutable_data_ptr<uint8_t>(), prep.slots.data(), slot_bytes);
  std::memcpy(host.mutable_data_ptr<uint8_t>() + slot_bytes, prep.block_offsets.data(), offset_bytes);
  const at::Tensor table = host.to(prep.device, /*non_blocking=*/true);
  AdamWStepParams p = prep.params;
  p.tensors = reinterpret_cast<const TensorSlot*>(table.const_data_ptr<uint8_t>());
  adamw_step_cuda(p, reinterpret_cast<const int64_t*>(table.const_data_ptr<uint8_t>() + slot_bytes), total,
                  at::cuda::getCurrentCUDAStream());
}

void adamw_step_quantized_cuda_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avg_q,
                                  at::TensorList exp_avg_absmax, at::TensorList exp_avg_sq_q,
                                  at::TensorList exp_avg_sq_absmax, const at::Tensor& code_exp_avg,
                                  const at::Tensor& code_exp_avg_sq, double lr, double beta1, double beta2, double eps,
                                  double weight_decay, int64_t step_count, int64_t bits, int64_t blocksize_exp_avg,
                                  int64_t blocksize_exp_avg_sq, bool stochastic_rounding, int64_t seed,
                                  bool stochastic_exp_avg, bool stochastic_exp_avg_sq) {
  PreparedStep prep = prepare_quantized_step(params, grads, exp_avg_q, exp_avg_absmax, exp_avg_sq_q,
                                             exp_avg_sq_absmax, code_exp_avg, code_exp_avg_sq, lr, beta1, beta2, eps,
                                             weight_decay, step_count, bits, blocksize_exp_avg, blocksize_exp_avg_sq,
                                             stochastic_rounding, seed, stochastic_exp_avg, stochastic_exp_avg_sq);
  launch(prep);
}

void adamw_step_fp32_cuda_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avg,
                             at::TensorList exp_avg_sq, double lr, double beta1, double beta2, double eps,
                             double weight_decay, int64_t step_count, bool stochastic_rounding, int64_t seed) {
  PreparedStep prep = prepare_fp32_step(params, grads, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay,
                                        step_count, stochastic_rounding, seed);
  launch(prep);
}

}  // namespace

void adamw_step_cuda(const AdamWStepParams& p, const int64_t* block_offsets, int64_t total_blocks,
                     cudaStream_t stream) {
  if (total_blocks == 0 || p.num_tensors == 0) return;
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int grid = static_cast<int>(std::min<int64_t>(ceil_div<int64_t>(total_blocks, kWarpsPerCta), int64_t{sms} * 16));
  LOWRANK_DISPATCH_FLOAT(p.param_kind, P, [&] {
    LOWRANK_DISPATCH_FLOAT(p.grad_kind, G, [&] {
      adamw_kernel<P, G><<<grid, kThreads, 0, stream>>>(p, block_offsets, total_blocks);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

TORCH_LIBRARY_IMPL(lowrank, CUDA, m) {
  m.impl("adamw_step_quantized_", TORCH_FN(adamw_step_quantized_cuda_op));
  m.impl("adamw_step_fp32_", TORCH_FN(adamw_step_fp32_cuda_op));
}

}  // namespace lowrank::optim
