// CUDA kernels of the multilora family. Verified on a GPU: every CUDA test of
// tests/test_multilora.py passed on an H100 (2026-11-25, commit a7295fc, torch 2.11:
// benchmarks/results/gpu-check-h100-80gb-hbm3-2026-11-25-a7295fc-tests.md).
//
// No host synchronisation and no data-dependent launch shapes (usable in CUDA graphs): the
// ids are sorted on the device (a stable at::sort: equal ids keep batch order), and every
// grid depends on N, d and S only.
//  * lora_shrink / lora_expand(_): one kernel, out[row] (+)= scale * in[row] W[a]^T over the
//    sorted rows. A block owns kTileRows consecutive sorted rows and kTileCols output columns;
//    the rows of a tile form runs of one adapter each, and the block accumulates every run's
//    product into the same registers with the other runs' rows masked to zero, so a row only
//    ever meets its own adapter's weights. A tile mixing k adapters costs k tile products:
//    cheap while tokens per adapter >= kTileRows, up to kTileRows x the work when every token
//    has its own adapter.
//  * lora_grouped_outer: one block per (adapter, P tile, Q tile); its token range in the
//    sorted order comes from a device searchsorted, so empty adapters write zeros.
// Ids and ranks out of range trip a device assertion (as torch's own index kernels do):
// checking them on the host would synchronise.
#include <torch/library.h>

#include <limits>

#include <ATen/Dispatch.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <c10/macros/Macros.h>

#include "common/cuda_utils.cuh"
#include "common/dtype.h"
#include "multilora/ops.h"

namespace lowrank::multilora {
namespace {

constexpr int kThreads = 256;  // a 16 x 16 grid of threads
constexpr int kTileRows = 32, kTileCols = 64, kTileK = 32;
constexpr int kRowsPerThread = kTileRows / 16, kColsPerThread = kTileCols / 16;
constexpr int kOuterTile = 64, kOuterPerThread = kOuterTile / 16;

// out[perm[i], c] = (base[perm[i], c] +) scale[a] * sum_k in[perm[i], k] W[a, c, k], a = sorted_ids[i]
template <typename TIn, typename TW, typename TOut, typename Acc>
struct RowsParams {
  const TIn* in;
  int64_t ld_in;
  const TW* w;
  int64_t w_stride_s, w_stride_c, w_stride_k;
  const TOut* base;  // expand: y (== out in place); shrink: null (out = the products, zero past the rank)
  TOut* out;
  int64_t ld_base, ld_out;
  const int64_t* sorted_ids;
  const int64_t* perm;
  const int64_t* ranks;  // null: every adapter has rank max_rank
  const Acc* scales;     // null: 1
  int64_t n, k, c, num_adapters, max_rank;
  bool rank_limits_cols;  // shrink: columns >= rank are zero; expand: k >= rank is not read
};

template <typename TIn, typename TW, typename TOut, typename Acc>
__global__ void __launch_bounds__(kThreads) rows_gemm_kernel(RowsParams<TIn, TW, TOut, Acc> p) {
  __shared__ Acc s_in[kTileK][kTileRows + 1];  // +1: the transposing stores hit distinct banks
  __shared__ Acc s_w[kTileK][kTileCols + 1];
  __shared__ int64_t s_row[kTileRows], s_id[kTileRows], s_rank[kTileRows];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t i0 = int64_t{blockIdx.x} * kTileRows, c0 = int64_t{blockIdx.y} * kTileCols;
  if (tid == 0) {  // the sorted ids' first and last entries bound them all
    CUDA_KERNEL_ASSERT(p.sorted_ids[0] >= -1 && p.sorted_ids[p.n - 1] < p.num_adapters &&
                       "token_adapter_ids out of range");
  }
  if (p.ranks != nullptr && blockIdx.x == 0 && blockIdx.y == 0) {  // every rank, used or not (as the CPU checks)
    for (int64_t a = tid; a < p.num_adapters; a += kThreads)
      CUDA_KERNEL_ASSERT(p.ranks[a] >= 0 && p.ranks[a] <= p.max_rank && "ranks out of [0, R]");
  }
  if (tid < kTileRows) {
    const int64_t i = i0 + tid;
    const int64_t a = i < p.n ? p.sorted_ids[i] : -1;
    s_row[tid] = i < p.n ? p.perm[i] : -1;
    s_id[tid] = a;
    int64_t rank = 0;
    if (a >= 0) {
      // this row's own check: thread 0's may not have fired yet when ranks[a] is read
      CUDA_KERNEL_ASSERT(a < p.num_adapters && "token_adapter_ids out of range");
      rank = p.ranks != nullptr ? p.ranks[a] : p.max_rank;
      CUDA_KERNEL_ASSERT(rank >= 0 && rank <= p.max_rank && "ranks out of [0, R]");
    }
    s_rank[tid] = rank;
  }
  __syncthreads();

  Acc acc[kRowsPerThread][kColsPerThread] = {};
  for (int r0 = 0; r0 < kTileRows;) {  // the runs of one adapter in this tile (same on every thread)
    const int64_t a = s_id[r0];
    int r1 = r0 + 1;
    while (r1 < kTileRows && s_id[r1] == a) ++r1;
    // this thread's rows in the run: only they accumulate (0 * a non-finite weight of this
    // adapter must not reach another adapter's rows)
    bool live[kRowsPerThread];
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int r = ty * kRowsPerThread + i;
      live[i] = r >= r0 && r < r1;
    }
    if (a >= 0) {
      const int64_t rank = s_rank[r0];
      const int64_t k_end = p.rank_limits_cols ? p.k : rank, c_end = p.rank_limits_cols ? rank : p.c;
      const TW* wa = p.w + a * p.w_stride_s;
      for (int64_t k0 = 0; c0 < c_end && k0 < k_end; k0 += kTileK) {
        for (int e = tid; e < kTileRows * kTileK; e += kThreads) {  // consecutive threads: consecutive k
          const int r = e / kTileK, kk = e % kTileK;
          Acc v = 0;
          if (r >= r0 && r < r1 && k0 + kk < k_end) v = static_cast<Acc>(p.in[s_row[r] * p.ld_in + k0 + kk]);
          s_in[kk][r] = v;
        }
        for (int e = tid; e < kTileCols * kTileK; e += kThreads) {
          const int cc = e / kTileK, kk = e % kTileK;
          Acc v = 0;
          if (c0 + cc < c_end && k0 + kk < k_end)
            v = static_cast<Acc>(wa[(c0 + cc) * p.w_stride_c + (k0 + kk) * p.w_stride_k]);
          s_w[kk][cc] = v;
        }
        __syncthreads();
#pragma unroll 8
        for (int kk = 0; kk < kTileK; ++kk) {
          Acc in_frag[kRowsPerThread], w_frag[kColsPerThread];
#pragma unroll
          for (int i = 0; i < kRowsPerThread; ++i) in_frag[i] = s_in[kk][ty * kRowsPerThread + i];
#pragma unroll
          for (int j = 0; j < kColsPerThread; ++j) w_frag[j] = s_w[kk][tx + 16 * j];
#pragma unroll
          for (int i = 0; i < kRowsPerThread; ++i)
            if (live[i]) {
#pragma unroll
              for (int j = 0; j < kColsPerThread; ++j) acc[i][j] += in_frag[i] * w_frag[j];
            }
        }
        __syncthreads();
      }
    }
    r0 = r1;
  }

#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int r = ty * kRowsPerThread + i;
    const int64_t row = s_row[r], a = s_id[r], rank = s_rank[r];
    if (row < 0) continue;
    const Acc scale = (a >= 0 && p.scales != nullptr) ? p.scales[a] : Acc(1);
#pragma unroll
    for (int j = 0; j < kColsPerThread; ++j) {
      const int64_t col = c0 + tx + 16 * j;
      if (col >= p.c) continue;
      if (p.base == nullptr) {  // shrink: the product, zero for id -1 and past the rank
        p.out[row * p.ld_out + col] = static_cast<TOut>(col < rank ? scale * acc[i][j] : Acc(0));
      } else if (rank > 0) {
        const Acc v = static_cast<Acc>(p.base[row * p.ld_base + col]) + scale * acc[i][j];
        p.out[row * p.ld_out + col] = static_cast<TOut>(v);
      } else if (p.out != p.base) {  // out of place: rows without an adapter (or of rank 0) are y's
        p.out[row * p.ld_out + col] = p.base[row * p.ld_base + col];
      }
    }
  }
}

template <typename TIn, typename TW, typename TOut, typename Acc>
void launch_rows_gemm(const RowsParams<TIn, TW, TOut, Acc>& p) {
  if (p.n == 0 || p.c == 0) return;
  const dim3 grid(static_cast<unsigned>(ceil_div<int64_t>(p.n, kTileRows)),
                  static_cast<unsigned>(ceil_div<int64_t>(p.c, kTileCols)));
  TORCH_CHECK(grid.y <= 65535u, "multilora: too many output columns for one launch (", p.c, ")");
  rows_gemm_kernel<<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

struct SortedTokens {
  at::Tensor ids;   // int64, ascending (-1 first)
  at::Tensor perm;  // int64: sorted position -> token
};

SortedTokens sort_tokens(const at::Tensor& ids) {
  auto [sorted, perm] = at::sort(ids.to(at::kLong), /*stable=*/true, /*dim=*/0, /*descending=*/false);
  return {sorted.contiguous(), perm.contiguous()};
}

// ranks as int64 and scales in the accumulate dtype, on the device (no host reads)
struct AdapterArgs {
  at::Tensor ranks, scales;
};

AdapterArgs adapter_args(const std::optional<at::Tensor>& ranks, const std::optional<at::Tensor>& scales,
                         at::ScalarType acc) {
  return {ranks ? ranks->to(at::kLong).contiguous() : at::Tensor(),
          scales ? scales->to(acc).contiguous() : at::Tensor()};
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

at::Tensor lora_shrink_cuda(const at::Tensor& x, const at::Tensor& a_stack, const at::Tensor& ids,
                            const std::optional<at::Tensor>& ranks, const std::optional<at::Tensor>& scales) {
  constexpr const char* op = "lora_shrink";
  const StackShapes s = check_shrink_args(x, a_stack, ids, ranks, scales, op);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const auto acc = accumulate_type(x.scalar_type());
  at::Tensor xa = at::empty({s.n, s.max_rank}, x.options().dtype(acc));
  if (s.n == 0) return xa;
  const at::Tensor xc = x.contiguous();
  const SortedTokens st = sort_tokens(ids);
  const AdapterArgs args = adapter_args(ranks, scales, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_shrink_cuda", [&] {
    using Acc = acc_t<scalar_t>;
    RowsParams<scalar_t, scalar_t, Acc, Acc> p{};
    p.in = xc.const_data_ptr<scalar_t>();
    p.ld_in = xc.size(1);
    p.w = a_stack.const_data_ptr<scalar_t>();
    p.w_stride_s = a_stack.stride(0), p.w_stride_c = a_stack.stride(1), p.w_stride_k = a_stack.stride(2);
    p.base = nullptr;
    p.out = xa.mutable_data_ptr<Acc>();
    p.ld_base = p.ld_out = s.max_rank;
    p.sorted_ids = st.ids.const_data_ptr<int64_t>();
    p.perm = st.perm.const_data_ptr<int64_t>();
    p.ranks = ptr_or_null<int64_t>(args.ranks);
    p.scales = ptr_or_null<Acc>(args.scales);
    p.n = s.n, p.k = x.size(1), p.c = s.max_rank, p.num_adapters = s.num_adapters, p.max_rank = s.max_rank;
    p.rank_limits_cols = true;
    launch_rows_gemm(p);
  });
  return xa;
}

// out = base + products; out may be base (in place). Both [N, d_out] with unit column stride.
void expand_cuda(const at::Tensor& base, at::Tensor& out, const at::Tensor& xa, const at::Tensor& b_stack,
                 const at::Tensor& ids, const std::optional<at::Tensor>& ranks,
                 const std::optional<at::Tensor>& scales, const StackShapes& s) {
  if (s.n == 0 || base.size(1) == 0) return;
  const auto acc = accumulate_type(base.scalar_type());
  const at::Tensor xac = xa.to(acc).contiguous();
  const SortedTokens st = sort_tokens(ids);
  const AdapterArgs args = adapter_args(ranks, scales, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base.scalar_type(), "lora_expand_cuda", [&] {
    using Acc = acc_t<scalar_t>;
    RowsParams<Acc, scalar_t, scalar_t, Acc> p{};
    p.in = xac.const_data_ptr<Acc>();
    p.ld_in = s.max_rank;
    p.w = b_stack.const_data_ptr<scalar_t>();
    p.w_stride_s = b_stack.stride(0), p.w_stride_c = b_stack.stride(1), p.w_stride_k = b_stack.stride(2);
    p.base = base.const_data_ptr<scalar_t>();
    p.out = out.mutable_data_ptr<scalar_t>();
    p.ld_base = base.stride(0), p.ld_out = out.stride(0);
    p.sorted_ids = st.ids.const_data_ptr<int64_t>();
    p.perm = st.perm.const_data_ptr<int64_t>();
    p.ranks = ptr_or_null<int64_t>(args.ranks);
    p.scales = ptr_or_null<Acc>(args.scales);
    p.n = s.n, p.k = s.max_rank, p.c = base.size(1), p.num_adapters = s.num_adapters, p.max_rank = s.max_rank;
    p.rank_limits_cols = false;
    launch_rows_gemm(p);
  });
}

void lora_expand_inplace_cuda(at::Tensor& y, const at::Tensor& xa, const at::Tensor& b_stack, const at::Tensor& ids,
                              const std::optional<at::Tensor>& ranks, const std::optional<at::Tensor>& scales) {
  const StackShapes s = check_expand_args(y, xa, b_stack, ids, ranks, scales, "lora_expand_");
  const c10::cuda::OptionalCUDAGuard guard(y.device());
  const at::Tensor xa_in = inplace_expand_xa(y, xa, b_stack);
  // in place where y's rows are unit-stride and provably disjoint (a row-padded view, e.g.
  // one slice of a fused output, included); anything else goes through a contiguous copy
  const bool disjoint_rows = y.size(0) <= 1 || y.stride(0) >= y.size(1);
  if ((y.stride(1) == 1 || y.size(1) <= 1) && disjoint_rows) {
    expand_cuda(y, y, xa_in, b_stack, ids, ranks, scales, s);
  } else {  // rows not unit-stride: work on a contiguous copy, then write it back
    at::Tensor tmp = y.contiguous();
    expand_cuda(tmp, tmp, xa_in, b_stack, ids, ranks, scales, s);
    y.copy_(tmp);
  }
}

at::Tensor lora_expand_cuda(const at::Tensor& y, const at::Tensor& xa, const at::Tensor& b_stack,
                            const at::Tensor& ids, const std::optional<at::Tensor>& ranks,
                            const std::optional<at::Tensor>& scales) {
  const StackShapes s = check_expand_args(y, xa, b_stack, ids, ranks, scales, "lora_expand");
  const c10::cuda::OptionalCUDAGuard guard(y.device());
  const at::Tensor base = y.contiguous();
  at::Tensor out = at::empty(base.sizes(), base.options());  // standard strides, as the CPU and fake kernels
  if (s.n == 0) return out;
  expand_cuda(base, out, xa, b_stack, ids, ranks, scales, s);  // writes every row of out
  return out;
}

template <typename TL, typename TR, typename Acc>
__global__ void __launch_bounds__(kThreads) grouped_outer_kernel(
    const TL* __restrict__ left, const TR* __restrict__ right, int64_t ld_left, int64_t ld_right,
    const int64_t* __restrict__ sorted_ids, const int64_t* __restrict__ perm, const int64_t* __restrict__ offsets,
    const Acc* __restrict__ scales, Acc* __restrict__ out, int64_t n, int64_t rows_p, int64_t cols_q,
    int64_t num_adapters) {
  __shared__ Acc s_l[kTileK][kOuterTile + 1], s_r[kTileK][kOuterTile + 1];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t a = blockIdx.z, p0 = int64_t{blockIdx.y} * kOuterTile, q0 = int64_t{blockIdx.x} * kOuterTile;
  if (tid == 0 && n > 0) {
    CUDA_KERNEL_ASSERT(sorted_ids[0] >= -1 && sorted_ids[n - 1] < num_adapters && "token_adapter_ids out of range");
  }
  const int64_t begin = offsets[a], end = offsets[a + 1];
  Acc acc[kOuterPerThread][kOuterPerThread] = {};
  for (int64_t t0 = begin; t0 < end; t0 += kTileK) {
    for (int e = tid; e < kTileK * kOuterTile; e += kThreads) {  // consecutive threads: consecutive columns
      const int t = e / kOuterTile, j = e % kOuterTile;
      const int64_t row = t0 + t < end ? perm[t0 + t] : -1;
      s_l[t][j] = (row >= 0 && p0 + j < rows_p) ? static_cast<Acc>(left[row * ld_left + p0 + j]) : Acc(0);
      s_r[t][j] = (row >= 0 && q0 + j < cols_q) ? static_cast<Acc>(right[row * ld_right + q0 + j]) : Acc(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int t = 0; t < kTileK; ++t) {
      Acc lf[kOuterPerThread], rf[kOuterPerThread];
#pragma unroll
      for (int u = 0; u < kOuterPerThread; ++u) lf[u] = s_l[t][ty * kOuterPerThread + u];
#pragma unroll
      for (int v = 0; v < kOuterPerThread; ++v) rf[v] = s_r[t][tx + 16 * v];
#pragma unroll
      for (int u = 0; u < kOuterPerThread; ++u)
#pragma unroll
        for (int v = 0; v < kOuterPerThread; ++v) acc[u][v] += lf[u] * rf[v];
    }
    __syncthreads();
  }
  const Acc scale = scales != nullptr ? scales[a] : Acc(1);
#pragma unroll
  for (int u = 0; u < kOuterPerThread; ++u) {
    const int64_t pp = p0 + ty * kOuterPerThread + u;
#pragma unroll
    for (int v = 0; v < kOuterPerThread; ++v) {
      const int64_t qq = q0 + tx + 16 * v;
      // an adapter without tokens gets exact zeros (not scale * 0, NaN for an infinite scale)
      if (pp < rows_p && qq < cols_q) out[(a * rows_p + pp) * cols_q + qq] = end > begin ? scale * acc[u][v] : Acc(0);
    }
  }
}

at::Tensor lora_grouped_outer_cuda(const at::Tensor& left, const at::Tensor& right, const at::Tensor& ids,
                                   int64_t num_adapters, const std::optional<at::Tensor>& scales) {
  check_outer_args(left, right, ids, num_adapters, scales, "lora_grouped_outer");
  const c10::cuda::OptionalCUDAGuard guard(left.device());
  const auto acc = (left.scalar_type() == at::kDouble || right.scalar_type() == at::kDouble) ? at::kDouble
                                                                                              : at::kFloat;
  const int64_t n = left.size(0), rows_p = left.size(1), cols_q = right.size(1);
  at::Tensor out = at::empty({num_adapters, rows_p, cols_q}, left.options().dtype(acc));
  if (out.numel() == 0) return out;
  const at::Tensor lc = left.contiguous(), rc = right.contiguous();
  const SortedTokens st = sort_tokens(ids);
  // offsets[a] = first sorted position with id >= a: adapter a owns [offsets[a], offsets[a + 1])
  const at::Tensor offsets =
      at::searchsorted(st.ids, at::arange(num_adapters + 1, st.ids.options()), /*out_int32=*/false);
  const at::Tensor sc = scales ? scales->to(acc).contiguous() : at::Tensor();
  const int64_t tiles_q = ceil_div<int64_t>(cols_q, kOuterTile), tiles_p = ceil_div<int64_t>(rows_p, kOuterTile);
  TORCH_CHECK(tiles_q <= std::numeric_limits<int32_t>::max() && tiles_p <= 65535 && num_adapters <= 65535,
              "lora_grouped_outer: too many adapters (", num_adapters, ") or rows (", rows_p, ") for one launch");
  const dim3 grid(static_cast<unsigned>(tiles_q), static_cast<unsigned>(tiles_p), static_cast<unsigned>(num_adapters));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lc.scalar_type(), "lora_grouped_outer_l", [&] {
    using TL = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rc.scalar_type(), "lora_grouped_outer_r", [&] {
      using TR = scalar_t;
      using Acc = std::conditional_t<std::is_same_v<TL, double> || std::is_same_v<TR, double>, double, float>;
      grouped_outer_kernel<TL, TR, Acc><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          lc.const_data_ptr<TL>(), rc.const_data_ptr<TR>(), lc.size(1), rc.size(1),
          st.ids.const_data_ptr<int64_t>(), st.perm.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(),
          ptr_or_null<Acc>(sc), out.mutable_data_ptr<Acc>(), n, rows_p, cols_q, num_adapters);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CUDA, m) {
  m.impl("lora_shrink", TORCH_FN(lora_shrink_cuda));
  m.impl("lora_expand_", TORCH_FN(lora_expand_inplace_cuda));
  m.impl("lora_expand", TORCH_FN(lora_expand_cuda));
  m.impl("lora_grouped_outer", TORCH_FN(lora_grouped_outer_cuda));
}

}  // namespace lowrank::multilora
