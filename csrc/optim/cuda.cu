// CUDA kernels of the optim family. The block-wise and fp32 steps ran and matched the
// references bit for bit on an H100 (see the README's op table and benchmarks/results/); the
// rank-1 step below has not run on a GPU yet.
//
// One launch steps every tensor of the call: the grid strides over work units of all
// tensors (prefix sums in `offsets`); the tensor table and offsets travel host->device
// asynchronously from pinned memory, so there is no host synchronisation.
//
// Quantized moments: one CTA per chunk of 4096 values (a multiple of every blocksize, so
// no quantization block straddles two CTAs), 8 consecutive values per thread (vector
// loads, one Philox group per stream). Each thread dequantizes, updates and keeps its 8
// values in registers; the new absmax of every block is a shuffle reduction over the
// blocksize/8 threads of the block (plus one shared-memory step for blocks wider than a
// warp); then each thread re-quantizes and stores its values. One pass over memory.
// fp32 moments: one warp per 2048 values, 4 consecutive values per lane.
//
// Rank-1 second moments (adamw_step_rank1_; its CUDA tests passed on the H100, 2026-11-25): every entry's new scale
// min(row max, column max) depends on maxima over the whole tensor, so the step is four launches
// on the stream: zero a scratch buffer for the new maxima; a statistics kernel computing each
// entry's v' (the update's own arithmetic) and reducing |v'| into the scratch (2-D tiles: a
// thread's column maxima in registers over many rows, rows reduced by shuffles, then shared and
// global atomicMax on the float bits, which order as the values do for v' >= 0 and put NaN
// above everything); the quantized kernel above, dequantizing v with the old maxima and
// re-quantizing it with the new; and a copy of the new maxima into the state.
#include <torch/library.h>

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include "common/cuda_utils.cuh"
#include "optim/ops.h"
#include "optim/optim_math.h"
#include "quant/quant_math.h"

namespace lowrank::optim {
namespace {

__device__ __forceinline__ int64_t find_tensor(const int64_t* offsets, int64_t num_tensors, int64_t unit) {
  int64_t lo = 0, hi = num_tensors;  // largest t with offsets[t] <= unit (empty tensors own no unit)
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (offsets[mid] <= unit) lo = mid; else hi = mid;
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

template <typename T>
__device__ __forceinline__ bool aligned(const T* ptr, int bytes) {
  return (reinterpret_cast<uintptr_t>(ptr) & (bytes - 1)) == 0;
}

// ---------------------------------------------------------------- quantized moments
constexpr int kChunk = 4096;                           // values per CTA: a multiple of every blocksize
constexpr int kPerThread = 8;                          // consecutive values per thread (one Philox group)
constexpr int kChunkThreads = kChunk / kPerThread;     // 512
constexpr int kChunkWarps = kChunkThreads / 32;
static_assert(kPerThread == kPhiloxGroup, "one philox_group call per thread and stream");
static_assert(128 % kPerThread == 0, "a thread's values sit in one block of the smallest blocksize");

// 8 values from e0 (those < end; the rest read as 0) as floats: one or two 16-byte loads
// when all 8 exist and the address allows it.
template <typename T>
__device__ __forceinline__ void load8(const T* ptr, int64_t e0, int64_t end, float (&out)[kPerThread]) {
  const T* src = ptr + e0;
  if (e0 + kPerThread <= end && aligned(src, 16)) {
    if constexpr (sizeof(T) == 4) {
      const float4 a = reinterpret_cast<const float4*>(src)[0], b = reinterpret_cast<const float4*>(src)[1];
      out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
      out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
    } else {
      const uint4 u = *reinterpret_cast<const uint4*>(src);
      const T* h = reinterpret_cast<const T*>(&u);
#pragma unroll
      for (int k = 0; k < kPerThread; ++k) out[k] = static_cast<float>(h[k]);
    }
  } else {
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) out[k] = e0 + k < end ? static_cast<float>(src[k]) : 0.f;
  }
}

template <typename P>
__device__ __forceinline__ void store8(P* ptr, int64_t e0, int64_t end, const P (&v)[kPerThread]) {
  P* dst = ptr + e0;
  if (e0 + kPerThread <= end && aligned(dst, 16)) {
    if constexpr (sizeof(P) == 4) {
      reinterpret_cast<float4*>(dst)[0] = make_float4(v[0], v[1], v[2], v[3]);
      reinterpret_cast<float4*>(dst)[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else {
      uint4 u;
      P* h = reinterpret_cast<P*>(&u);
#pragma unroll
      for (int k = 0; k < kPerThread; ++k) h[k] = v[k];
      *reinterpret_cast<uint4*>(dst) = u;
    }
  } else {
#pragma unroll
    for (int k = 0; k < kPerThread; ++k)
      if (e0 + k < end) dst[k] = v[k];
  }
}

// The code indices of values e0..e0+7: 8 bytes (8-bit) or 4 bytes (4-bit, low nibble first).
template <int BITS>
__device__ __forceinline__ void load_indices(const uint8_t* q, int64_t e0, int64_t end, int (&idx)[kPerThread]) {
  constexpr int kBytes = kPerThread * BITS / 8;
  const uint8_t* src = q + e0 * BITS / 8;
  uint8_t b[kBytes];
  if (e0 + kPerThread <= end && aligned(src, kBytes)) {
    if constexpr (BITS == 8) *reinterpret_cast<uint2*>(b) = *reinterpret_cast<const uint2*>(src);
    else *reinterpret_cast<uint32_t*>(b) = *reinterpret_cast<const uint32_t*>(src);
  } else {
#pragma unroll
    for (int j = 0; j < kBytes; ++j) b[j] = e0 + j * 8 / BITS < end ? src[j] : 0;
  }
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) idx[k] = BITS == 8 ? b[k] : (b[k / 2] >> ((k & 1) * 4)) & 0xF;
}

template <int BITS>
__device__ __forceinline__ void store_indices(uint8_t* q, int64_t e0, int64_t end, const int (&idx)[kPerThread]) {
  constexpr int kBytes = kPerThread * BITS / 8;
  uint8_t* dst = q + e0 * BITS / 8;
  uint8_t b[kBytes];
#pragma unroll
  for (int j = 0; j < kBytes; ++j) {
    if constexpr (BITS == 8) {
      b[j] = static_cast<uint8_t>(idx[j]);
    } else {  // an odd last value sits alone in its byte, high nibble 0 (quantize_blockwise's layout)
      const int hi = e0 + 2 * j + 1 < end ? idx[2 * j + 1] << 4 : 0;
      b[j] = static_cast<uint8_t>(idx[2 * j] | hi);
    }
  }
  if (e0 + kPerThread <= end && aligned(dst, kBytes)) {
    if constexpr (BITS == 8) *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(b);
    else *reinterpret_cast<uint32_t*>(dst) = *reinterpret_cast<const uint32_t*>(b);
  } else {
#pragma unroll
    for (int j = 0; j < kBytes; ++j)
      if (e0 + j * 8 / BITS < end) dst[j] = b[j];
  }
}

// As load_indices from any element (the statistics kernel's rows start anywhere; a 4-bit row
// may start at a high nibble).
template <int BITS>
__device__ __forceinline__ void load_indices_any(const uint8_t* q, int64_t e0, int64_t end, int (&idx)[kPerThread]) {
  if (BITS == 8 || (e0 & 1) == 0) {
    load_indices<BITS>(q, e0, end, idx);
  } else {
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) idx[k] = e0 + k < end ? quant::code_index(q, e0 + k, BITS) : 0;
  }
}

// Max and any-non-finite over the `group` threads (blocksize / 8, a power of two) holding
// one quantization block: shuffles within a warp, then one shared-memory step for groups
// of several warps. Every thread of the CTA must call it (it synchronises the CTA).
struct BlockMax {
  float amax[kChunkWarps];
  int bad[kChunkWarps];
};

__device__ __forceinline__ void group_max(float& amax, bool& bad, int group, BlockMax& sh, int warp, int lane) {
  int b = bad;
  const int width = group < 32 ? group : 32;
  for (int off = 1; off < width; off <<= 1) {
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    b |= __shfl_xor_sync(0xffffffffu, b, off);
  }
  if (group > 32 && lane == 0) {
    sh.amax[warp] = amax;
    sh.bad[warp] = b;
  }
  __syncthreads();
  if (group > 32) {
    const int warps = group / 32, first = warp / warps * warps;
    for (int w = first; w < first + warps; ++w) {
      amax = fmaxf(amax, sh.amax[w]);
      b |= sh.bad[w];
    }
  }
  bad = b;
}

// The new rank-1 maxima: tensor t's rows at values + offsets[t], its columns right after.
struct Rank1Next {
  const int64_t* offsets;  // [num_tensors + 1] device array; an empty tensor has none
  float* values;
};

// RANK1: the second moment is rank-1 normalised (the scales are per entry, from the old
// maxima in the slot and the new ones in `next`); otherwise block-wise (`next` unused).
template <typename P, typename G, int BITS, bool RANK1>
__global__ void __launch_bounds__(kChunkThreads, 2)
    adamw_quantized_kernel(AdamWStepParams p, const int64_t* offsets, int64_t total_chunks, Rank1Next next) {
  constexpr int kCode = 1 << BITS;
  __shared__ float code_m[kCode], mids_m[kCode], code_v[kCode], mids_v[kCode];
  __shared__ BlockMax reduce_m, reduce_v;
  // rank-1: each value's new scale, from the first loop to the re-quantization ([k][thread]:
  // no bank conflicts); in shared memory because 8 more live registers spill at this kernel's
  // 64-register bound
  __shared__ float scale_v[RANK1 ? kPerThread * kChunkThreads : 1];
  for (int i = threadIdx.x; i < kCode; i += blockDim.x) {
    code_m[i] = p.code_exp_avg[i];
    code_v[i] = p.code_exp_avg_sq[i];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kCode - 1; i += blockDim.x) {
    mids_m[i] = quant::code_midpoint(code_m, i);
    mids_v[i] = quant::code_midpoint(code_v, i);
  }
  if (threadIdx.x == 0) mids_m[kCode - 1] = mids_v[kCode - 1] = INFINITY;  // nearest_index_padded's padding
  __syncthreads();

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int group_m = static_cast<int>(p.blocksize_exp_avg / kPerThread);
  const int group_v = static_cast<int>(p.blocksize_exp_avg_sq / kPerThread);
  for (int64_t c = blockIdx.x; c < total_chunks; c += gridDim.x) {  // CTA-uniform loop
    const int64_t t = find_tensor(offsets, p.num_tensors, c);
    const TensorSlot s = p.tensors[t];  // a register copy: stores through its pointers cannot alias it
    const int64_t e0 = (c - offsets[t]) * kChunk + tid * kPerThread, end = s.numel;
    const bool live = e0 < end;
    const int64_t block_m = e0 >> p.log2_blocksize_exp_avg, block_v = e0 >> p.log2_blocksize_exp_avg_sq;

    float param[kPerThread], grad[kPerThread], m[kPerThread], v[kPerThread];
    int im[kPerThread], iv[kPerThread];
    load8(static_cast<const P*>(s.param), e0, end, param);
    load8(static_cast<const G*>(s.grad), e0, end, grad);
    load_indices<BITS>(s.exp_avg_q, e0, end, im);
    load_indices<BITS>(s.exp_avg_sq_q, e0, end, iv);
    const float old_am = live ? s.exp_avg_absmax[block_m] : 0.f;
    const float old_av = !RANK1 && live ? s.exp_avg_sq_absmax[block_v] : 0.f;
    // rank-1: value e0's (row, column), advanced per value; the new maxima of this tensor
    int64_t row = 0, col = 0;
    const float *row_next = nullptr, *col_next = nullptr;
    if constexpr (RANK1) {
      if (live) {
        row = e0 / s.cols;
        col = e0 - row * s.cols;
        row_next = next.values + next.offsets[t];
        col_next = row_next + s.numel / s.cols;
      }
    }

    float amax_m = 0.f, amax_v = 0.f;
    bool bad_m = false, bad_v = false;
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      if (e0 + k < end) {
        float vk;
        if constexpr (RANK1) {  // dequantized with the old maxima (the state's)
          vk = quant::dequantize_value(code_v, iv[k], rank1_scale(s.exp_avg_sq_row[row], s.exp_avg_sq_col[col]));
          scale_v[k * kChunkThreads + tid] = rank1_scale(row_next[row], col_next[col]);
          if (++col == s.cols) {
            col = 0;
            ++row;
          }
        } else {
          vk = quant::dequantize_value(code_v, iv[k], old_av);
        }
        const AdamWResult r = adamw_update(param[k], grad[k], quant::dequantize_value(code_m, im[k], old_am), vk, p.c);
        param[k] = r.param;
        m[k] = r.exp_avg;
        v[k] = storable_exp_avg_sq(r.exp_avg_sq);
        quant::absmax_step(m[k], amax_m, bad_m);
        if constexpr (!RANK1) quant::absmax_step(v[k], amax_v, bad_v);
      } else {
        m[k] = v[k] = 0.f;
      }
    }
    // every thread of the CTA has read the old absmax before the first sync in group_max
    group_max(amax_m, bad_m, group_m, reduce_m, warp, lane);
    if constexpr (!RANK1) group_max(amax_v, bad_v, group_v, reduce_v, warp, lane);
    const float am = quant::finish_absmax(amax_m, bad_m), av = quant::finish_absmax(amax_v, bad_v);

    Philox4 rnd_p{}, rnd_m{}, rnd_v{};
    const uint64_t group = static_cast<uint64_t>(e0) >> 3;
    if (p.stochastic_rounding) rnd_p = philox_group(p.seed, stream_offset(t, kParamStream), group);
    if (p.stochastic_exp_avg) rnd_m = philox_group(p.seed, stream_offset(t, kExpAvgStream), group);
    if (p.stochastic_exp_avg_sq) rnd_v = philox_group(p.seed, stream_offset(t, kExpAvgSqStream), group);
    P out[kPerThread];
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const uint64_t e = static_cast<uint64_t>(e0 + k);
      const float vm = quant::normalize(m[k], am);
      const float vv = quant::normalize(v[k], RANK1 ? scale_v[k * kChunkThreads + tid] : av);
      im[k] = p.stochastic_exp_avg ? quant::stochastic_index(code_m, kCode, vm, uniform_from_bits16(random16(rnd_m, e)))
                                   : quant::nearest_index_padded(mids_m, kCode, vm);
      iv[k] = p.stochastic_exp_avg_sq
                  ? quant::stochastic_index(code_v, kCode, vv, uniform_from_bits16(random16(rnd_v, e)))
                  : quant::nearest_index_padded(mids_v, kCode, vv);
      out[k] = store_param<P>(param[k], p, rnd_p, e0 + k);
    }
    store8(static_cast<P*>(s.param), e0, end, out);
    store_indices<BITS>(s.exp_avg_q, e0, end, im);
    store_indices<BITS>(s.exp_avg_sq_q, e0, end, iv);
    if (live && (e0 & (p.blocksize_exp_avg - 1)) == 0) s.exp_avg_absmax[block_m] = am;
    if (!RANK1 && live && (e0 & (p.blocksize_exp_avg_sq - 1)) == 0) s.exp_avg_sq_absmax[block_v] = av;
    __syncthreads();  // the next chunk reuses the shared reduction slots
  }
}

// ---------------------------------------------------------------- fp32 moments
constexpr int kWarpsPerCta = 4;
constexpr int kThreads = kWarpsPerCta * 32;
constexpr int kVec = 4;                  // consecutive values per lane per step
constexpr int kStep = 32 * kVec;         // values per warp step
constexpr int kFp32Unit = 2048;          // values per warp

template <typename P, typename G>
__global__ void __launch_bounds__(kThreads) adamw_fp32_kernel(AdamWStepParams p, const int64_t* offsets, int64_t total) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + warp; b < total;
       b += static_cast<int64_t>(gridDim.x) * kWarpsPerCta) {
    const int64_t t = find_tensor(offsets, p.num_tensors, b);
    const TensorSlot s = p.tensors[t];
    const int64_t base = (b - offsets[t]) * kFp32Unit;
    const int64_t end = min(base + kFp32Unit, s.numel);
    const P* param = static_cast<const P*>(s.param);
    const G* grad = static_cast<const G*>(s.grad);
    for (int64_t e0 = base + lane * kVec; e0 < end; e0 += kStep) {
      Philox4 rnd{};
      if (p.stochastic_rounding) rnd = philox_group(p.seed, stream_offset(t, kParamStream), static_cast<uint64_t>(e0) >> 3);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const int64_t e = e0 + k;
        if (e < end) {
          const AdamWResult r = adamw_update(static_cast<float>(param[e]), static_cast<float>(grad[e]), s.exp_avg[e],
                                             s.exp_avg_sq[e], p.c);
          s.exp_avg[e] = r.exp_avg;
          s.exp_avg_sq[e] = r.exp_avg_sq;
          static_cast<P*>(s.param)[e] = store_param<P>(r.param, p, rnd, e);
        }
      }
    }
  }
}

// ---------------------------------------------------------------- rank-1 statistics
// A unit of the statistics kernel is a tile of one tensor seen as [rows, cols]: a strip of
// threads_per_row * 8 columns (8 consecutive values per thread, as the step loads them) by
// up to kStatPasses passes of rows_per_pass rows (fewer when the tensor has fewer rows).
// Narrow tensors put several rows side by side in the CTA, so no thread idles on a row
// shorter than the CTA.
constexpr int kStatThreads = 256;
constexpr int kStatPasses = 16;
constexpr int kStatMaxRows = kStatThreads * kStatPasses;  // rows of a unit when a row holds <= 8 values
constexpr int kStatMaxCols = kStatThreads * kPerThread;   // columns of a strip

struct Rank1Tiling {
  int threads_per_row;  // a power of two, at most kStatThreads
  int rows_per_pass, passes;
  int64_t strip_cols, strips, rows_per_unit, row_blocks;
};

__host__ __device__ inline Rank1Tiling rank1_tiling(int64_t rows, int64_t cols) {
  Rank1Tiling g;
  g.threads_per_row = 1;
  while (g.threads_per_row < kStatThreads && int64_t{g.threads_per_row} * kPerThread < cols) g.threads_per_row *= 2;
  g.rows_per_pass = kStatThreads / g.threads_per_row;
  g.strip_cols = int64_t{g.threads_per_row} * kPerThread;
  g.strips = ceil_div<int64_t>(cols, g.strip_cols);
  const int64_t passes = ceil_div<int64_t>(rows, g.rows_per_pass);  // rows >= 1
  g.passes = passes < kStatPasses ? static_cast<int>(passes) : kStatPasses;
  g.rows_per_unit = int64_t{g.rows_per_pass} * g.passes;
  g.row_blocks = ceil_div<int64_t>(rows, g.rows_per_unit);
  return g;
}

// The new row and column maxima of |v'| (v' as the step computes and stores it) of every
// rank-1 tensor, into next.values (zeroed; atomicMax on the bits of |v'|: v' is >= 0 or NaN,
// and the bits of non-negative floats order as their values, with NaN above +inf, so a NaN
// sticks, as nan_sticky_absmax makes it on the CPU). A thread keeps its 8 columns' maxima in
// registers over the unit's rows; a row's maximum is a shuffle reduction over its threads.
template <typename G, int BITS>
__global__ void __launch_bounds__(kStatThreads)
    rank1_statistics_kernel(AdamWStepParams p, const int64_t* unit_offsets, int64_t total_units, Rank1Next next) {
  constexpr int kCode = 1 << BITS;
  __shared__ float code_v[kCode];
  __shared__ unsigned row_bits[kStatMaxRows];
  __shared__ unsigned col_bits[kStatMaxCols];
  for (int i = threadIdx.x; i < kCode; i += blockDim.x) code_v[i] = p.code_exp_avg_sq[i];
  const int tid = threadIdx.x, lane = tid % 32;
  for (int64_t u = blockIdx.x; u < total_units; u += gridDim.x) {  // CTA-uniform loop
    const int64_t t = find_tensor(unit_offsets, p.num_tensors, u);
    const TensorSlot s = p.tensors[t];
    const int64_t cols = s.cols, rows = s.numel / cols;
    const Rank1Tiling g = rank1_tiling(rows, cols);
    const int64_t local = u - unit_offsets[t];
    const int64_t r0 = local / g.strips * g.rows_per_unit, c0 = local % g.strips * g.strip_cols;
    for (int i = tid; i < g.rows_per_unit; i += kStatThreads) row_bits[i] = 0u;
    for (int i = tid; i < g.strip_cols; i += kStatThreads) col_bits[i] = 0u;
    __syncthreads();  // (the first unit: the code is loaded too)

    const int row_in_pass = tid / g.threads_per_row;
    const int64_t c = c0 + static_cast<int64_t>(tid % g.threads_per_row) * kPerThread;
    const int n = c >= cols ? 0 : cols - c < kPerThread ? static_cast<int>(cols - c) : kPerThread;
    float col_old[kPerThread];
    unsigned col_max[kPerThread];
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      col_old[k] = k < n ? s.exp_avg_sq_col[c + k] : 0.f;
      col_max[k] = 0u;
    }
    const int width = g.threads_per_row < 32 ? g.threads_per_row : 32;  // a row's threads within a warp
    for (int pass = 0; pass < g.passes; ++pass) {
      const int local_row = pass * g.rows_per_pass + row_in_pass;
      const int64_t r = r0 + local_row;
      unsigned row_max = 0u;
      if (r < rows && n > 0) {
        const int64_t e0 = r * cols + c;
        float grad[kPerThread];
        int iv[kPerThread];
        load8(static_cast<const G*>(s.grad), e0, e0 + n, grad);
        load_indices_any<BITS>(s.exp_avg_sq_q, e0, e0 + n, iv);
        const float row_old = s.exp_avg_sq_row[r];
#pragma unroll
        for (int k = 0; k < kPerThread; ++k) {
          if (k < n) {
            const float v = quant::dequantize_value(code_v, iv[k], rank1_scale(row_old, col_old[k]));
            const unsigned b = float_as_bits(fabsf(storable_exp_avg_sq(second_moment_update(v, grad[k], p.c))));
            row_max = max(row_max, b);
            col_max[k] = max(col_max[k], b);
          }
        }
      }
      for (int off = 1; off < width; off <<= 1) row_max = max(row_max, __shfl_xor_sync(0xffffffffu, row_max, off));
      if (lane % width == 0 && row_max != 0u) atomicMax(&row_bits[local_row], row_max);
    }
#pragma unroll
    for (int k = 0; k < kPerThread; ++k)
      if (col_max[k] != 0u) atomicMax(&col_bits[c - c0 + k], col_max[k]);
    __syncthreads();
    unsigned* row_next = reinterpret_cast<unsigned*>(next.values + next.offsets[t]);
    unsigned* col_next = row_next + rows;
    for (int i = tid; i < g.rows_per_unit; i += kStatThreads)  // nonzero only for rows < rows
      if (row_bits[i] != 0u) atomicMax(row_next + r0 + i, row_bits[i]);
    for (int i = tid; i < g.strip_cols; i += kStatThreads)
      if (col_bits[i] != 0u) atomicMax(col_next + c0 + i, col_bits[i]);
    __syncthreads();  // the next unit clears the shared maxima
  }
}

// The new maxima replace the old in the state, once the step has dequantized with the old.
__global__ void publish_rank1_statistics_kernel(AdamWStepParams p, Rank1Next next, int64_t total) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = find_tensor(next.offsets, p.num_tensors, i);
    const TensorSlot& s = p.tensors[t];
    const int64_t k = i - next.offsets[t], rows = s.numel / s.cols;
    if (k < rows) s.exp_avg_sq_row[k] = next.values[i];
    else s.exp_avg_sq_col[k - rows] = next.values[i];
  }
}

// Copies the tensor table and the offsets to the device in one buffer, without a host
// synchronisation: pinned staging memory and an async copy on the current stream (the
// caching host allocator keeps the staging buffer alive until the copy has run; the device
// buffer is freed to the same stream, after the kernel).
static_assert(sizeof(TensorSlot) % alignof(int64_t) == 0, "the offsets follow the table in one buffer");

struct DeviceTable {
  at::Tensor buffer;
  const TensorSlot* slots;
  std::vector<const int64_t*> offsets;  // one device array per host array given
};

DeviceTable upload(const PreparedStep& prep, std::initializer_list<const std::vector<int64_t>*> arrays) {
  const size_t slot_bytes = prep.slots.size() * sizeof(TensorSlot);  // a multiple of 8: offsets stay aligned
  size_t bytes = slot_bytes;
  for (const auto* a : arrays) bytes += a->size() * sizeof(int64_t);
  at::Tensor host = at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  uint8_t* h = host.mutable_data_ptr<uint8_t>();
  std::memcpy(h, prep.slots.data(), slot_bytes);
  std::vector<size_t> starts;
  size_t at_byte = slot_bytes;
  for (const auto* a : arrays) {
    std::memcpy(h + at_byte, a->data(), a->size() * sizeof(int64_t));
    starts.push_back(at_byte);
    at_byte += a->size() * sizeof(int64_t);
  }
  DeviceTable table;
  table.buffer = host.to(prep.device, /*non_blocking=*/true);
  const uint8_t* d = table.buffer.const_data_ptr<uint8_t>();
  table.slots = reinterpret_cast<const TensorSlot*>(d);
  for (size_t start : starts) table.offsets.push_back(reinterpret_cast<const int64_t*>(d + start));
  return table;
}

void adamw_step_rank1_cuda(const AdamWStepParams& p, const int64_t* chunk_offsets, int64_t total_chunks,
                           const int64_t* unit_offsets, int64_t total_units, Rank1Next next, int64_t total_next,
                           cudaStream_t stream);

void launch(PreparedStep& prep) {
  // the CUDA kernels' own work units (the CPU's superblocks are another size)
  const int64_t n = static_cast<int64_t>(prep.slots.size());
  const std::vector<int64_t> chunks =
      superblock_offsets(prep.slots.data(), n, prep.params.quantized ? kChunk : kFp32Unit);
  if (chunks.back() == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(prep.device);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AdamWStepParams p = prep.params;
  if (!p.rank1) {
    const DeviceTable table = upload(prep, {&chunks});
    p.tensors = table.slots;
    adamw_step_cuda(p, table.offsets[0], chunks.back(), stream);
    return;
  }
  // rank-1: the statistics kernel's units, and each tensor's place in the new maxima
  std::vector<int64_t> units(n + 1, 0), next_offsets(n + 1, 0);
  for (int64_t t = 0; t < n; ++t) {  // an empty tensor owns none (its maxima are zeroed at the boundary)
    const TensorSlot& s = prep.slots[t];
    units[t + 1] = units[t];
    next_offsets[t + 1] = next_offsets[t];
    if (s.numel > 0) {
      const int64_t rows = s.numel / s.cols;
      const Rank1Tiling g = rank1_tiling(rows, s.cols);
      units[t + 1] += g.strips * g.row_blocks;
      next_offsets[t + 1] += rows + s.cols;
    }
  }
  const DeviceTable table = upload(prep, {&chunks, &units, &next_offsets});
  p.tensors = table.slots;
  const at::Tensor next = at::zeros({next_offsets.back()}, at::TensorOptions().dtype(at::kFloat).device(prep.device));
  adamw_step_rank1_cuda(p, table.offsets[0], chunks.back(), table.offsets[1], units.back(),
                        Rank1Next{table.offsets[2], next.mutable_data_ptr<float>()}, next_offsets.back(), stream);
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

void adamw_step_rank1_cuda_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avg_q,
                              at::TensorList exp_avg_absmax, at::TensorList exp_avg_sq_q,
                              at::TensorList exp_avg_sq_row, at::TensorList exp_avg_sq_col,
                              const at::Tensor& code_exp_avg, const at::Tensor& code_exp_avg_sq, double lr,
                              double beta1, double beta2, double eps, double weight_decay, int64_t step_count,
                              int64_t bits, int64_t blocksize_exp_avg, bool stochastic_rounding, int64_t seed,
                              bool stochastic_exp_avg, bool stochastic_exp_avg_sq) {
  PreparedStep prep = prepare_rank1_step(params, grads, exp_avg_q, exp_avg_absmax, exp_avg_sq_q, exp_avg_sq_row,
                                         exp_avg_sq_col, code_exp_avg, code_exp_avg_sq, lr, beta1, beta2, eps,
                                         weight_decay, step_count, bits, blocksize_exp_avg, stochastic_rounding, seed,
                                         stochastic_exp_avg, stochastic_exp_avg_sq);
  launch(prep);
}

void adamw_step_fp32_cuda_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avg,
                             at::TensorList exp_avg_sq, double lr, double beta1, double beta2, double eps,
                             double weight_decay, int64_t step_count, bool stochastic_rounding, int64_t seed) {
  PreparedStep prep = prepare_fp32_step(params, grads, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay,
                                        step_count, stochastic_rounding, seed);
  launch(prep);
}

int multiprocessors() {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

void adamw_step_rank1_cuda(const AdamWStepParams& p, const int64_t* chunk_offsets, int64_t total_chunks,
                           const int64_t* unit_offsets, int64_t total_units, Rank1Next next, int64_t total_next,
                           cudaStream_t stream) {
  const int sms = multiprocessors();
  const int stat_grid = static_cast<int>(std::min<int64_t>(total_units, int64_t{sms} * 8));
  const int grid = static_cast<int>(std::min<int64_t>(total_chunks, int64_t{sms} * 2 * 8));
  LOWRANK_DISPATCH_FLOAT(p.param_kind, P, [&] {
    LOWRANK_DISPATCH_FLOAT(p.grad_kind, G, [&] {
      if (p.bits == 8) {
        rank1_statistics_kernel<G, 8><<<stat_grid, kStatThreads, 0, stream>>>(p, unit_offsets, total_units, next);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        adamw_quantized_kernel<P, G, 8, true><<<grid, kChunkThreads, 0, stream>>>(p, chunk_offsets, total_chunks, next);
      } else {
        rank1_statistics_kernel<G, 4><<<stat_grid, kStatThreads, 0, stream>>>(p, unit_offsets, total_units, next);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        adamw_quantized_kernel<P, G, 4, true><<<grid, kChunkThreads, 0, stream>>>(p, chunk_offsets, total_chunks, next);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  const int copy_grid = static_cast<int>(std::min<int64_t>(ceil_div<int64_t>(total_next, 256), int64_t{sms} * 8));
  publish_rank1_statistics_kernel<<<copy_grid, 256, 0, stream>>>(p, next, total_next);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void adamw_step_cuda(const AdamWStepParams& p, const int64_t* block_offsets, int64_t total_blocks,
                     cudaStream_t stream) {
  if (total_blocks == 0 || p.num_tensors == 0) return;
  const int sms = multiprocessors();
  LOWRANK_DISPATCH_FLOAT(p.param_kind, P, [&] {
    LOWRANK_DISPATCH_FLOAT(p.grad_kind, G, [&] {
      if (!p.quantized) {
        const int64_t grid = std::min<int64_t>(ceil_div<int64_t>(total_blocks, kWarpsPerCta), int64_t{sms} * 16);
        adamw_fp32_kernel<P, G><<<static_cast<int>(grid), kThreads, 0, stream>>>(p, block_offsets, total_blocks);
      } else {
        const int grid = static_cast<int>(std::min<int64_t>(total_blocks, int64_t{sms} * 2 * 8));
        if (p.bits == 8)
          adamw_quantized_kernel<P, G, 8, false>
              <<<grid, kChunkThreads, 0, stream>>>(p, block_offsets, total_blocks, Rank1Next{});
        else
          adamw_quantized_kernel<P, G, 4, false>
              <<<grid, kChunkThreads, 0, stream>>>(p, block_offsets, total_blocks, Rank1Next{});
      }
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

TORCH_LIBRARY_IMPL(lowrank, CUDA, m) {
  m.impl("adamw_step_quantized_", TORCH_FN(adamw_step_quantized_cuda_op));
  m.impl("adamw_step_fp32_", TORCH_FN(adamw_step_fp32_cuda_op));
  m.impl("adamw_step_rank1_", TORCH_FN(adamw_step_rank1_cuda_op));
}

}  // namespace lowrank::optim
