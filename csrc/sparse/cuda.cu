// CUDA kernels of the sparse family. Verified on a GPU: every CUDA test of
// tests/test_sparse.py passed on an H100 (2026-11-25, commit a7295fc, torch 2.11:
// benchmarks/results/gpu-check-h100-80gb-hbm3-2026-11-25-a7295fc-tests.md).
//
// sparse_scatter_add_: the index check is a device reduction (aminmax per adapter) whose
// results the host must read to raise before anything is written: one synchronisation per
// call, by design (nothing may be written when an index is out of range). On the H100 that
// round trip made a 16-weight apply+remove 0.23x torch's unchecked scatter_add_; a caller that
// checked the indices itself passes check_indices=False (since 2026-11-25, not yet run on a
// GPU): no synchronisation, and the kernel's own range check trips a device assertion instead.
// Then one thread per entry adds alpha * value atomically, computed in fp32 and rounded once
// into the weight's dtype as on the CPU: a compare-and-swap loop for fp16/bf16 (on the 32-bit
// word holding the value) and for fp32 (atomicAdd would flush subnormals to zero), atomicAdd
// for fp64. Repeated indices accumulate in an unspecified order, so bitwise results may
// differ from the CPU's only where indices repeat.
// sddmm: grad_out and x are transposed in chunks of tokens (ATen copies, bounded memory), then
// one warp per entry reads the two feature rows coalesced and reduces their dot product with
// shuffles, accumulating over chunks in fp32 (fp64 for fp64). Its output
// is new, so its indices are checked on the device (an out-of-range one trips a device
// assertion, as torch's index kernels do): no host synchronisation in the backward pass.
#include <torch/library.h>

#include <ATen/Dispatch.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/cuda_utils.cuh"
#include "common/dtype.h"
#include "sparse/ops.h"

namespace lowrank::sparse {
namespace {

constexpr int kThreads = 256;

// *addr = round(float(*addr) + delta), atomically.
template <typename W>
__device__ __forceinline__ void atomic_add_rounded_once(W* addr, acc_t<W> delta) {
  if constexpr (sizeof(W) == 2) {
    auto* word = reinterpret_cast<unsigned int*>(reinterpret_cast<uintptr_t>(addr) & ~uintptr_t{3});
    const int shift = (reinterpret_cast<uintptr_t>(addr) & 2) ? 16 : 0;
    unsigned int old = *word, assumed;
    do {
      assumed = old;
      const unsigned short bits = static_cast<unsigned short>(assumed >> shift);
      W cur;
      memcpy(&cur, &bits, 2);
      const W upd = static_cast<W>(sum_rn(static_cast<float>(cur), delta));
      unsigned short ub;
      memcpy(&ub, &upd, 2);
      const unsigned int replaced = (assumed & ~(0xffffu << shift)) | (static_cast<unsigned int>(ub) << shift);
      old = atomicCAS(word, assumed, replaced);
    } while (old != assumed);
  } else if constexpr (std::is_same_v<W, float>) {
    // Not atomicAdd: PTX's atom.add.f32 flushes subnormal inputs and results to zero, so a
    // subnormal weight (or sum) would come out as 0 where the CPU keeps it, and an adapter's
    // remove would not restore the weight bit for bit. A compare-and-swap with an IEEE add.
    auto* word = reinterpret_cast<unsigned int*>(addr);
    unsigned int old = *word, assumed;
    do {
      assumed = old;
      old = atomicCAS(word, assumed, __float_as_uint(__fadd_rn(__uint_as_float(assumed), delta)));
    } while (old != assumed);
  } else {
    atomicAdd(addr, delta);  // double: atom.add.f64 is IEEE (no flush); the add is the one rounding
  }
}

// The range check here is for check_indices=False (the host checked nothing): an out-of-range
// index trips a device assertion and is not written (the CUDA context is lost, as with torch's
// index kernels). With the host's check it never fires.
template <typename W, typename V>
__global__ void scatter_add_kernel(W* __restrict__ w, int64_t numel, const int64_t* __restrict__ idx,
                                   const V* __restrict__ val, int64_t n, acc_t<W> alpha) {
  for (int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x; i < n; i += int64_t{gridDim.x} * kThreads) {
    const int64_t j = idx[i];
    CUDA_KERNEL_ASSERT(j >= 0 && j < numel && "sparse_scatter_add_: index out of range (check_indices=False)");
    if (j >= 0 && j < numel) atomic_add_rounded_once(w + j, product_rn(alpha, static_cast<acc_t<W>>(val[i])));
  }
}

// Raises if any adapter's indices leave [0, limit): every adapter's min and max are read back
// to the host in one transfer (the one synchronisation of the op).
void check_ranges(const std::vector<at::Tensor>& idx, int64_t limit) {
  std::vector<at::Tensor> bounds;
  std::vector<size_t> which;
  for (size_t a = 0; a < idx.size(); ++a) {
    if (idx[a].numel() == 0) continue;
    const auto [lo, hi] = at::aminmax(idx[a]);
    bounds.push_back(lo.reshape({1}));
    bounds.push_back(hi.reshape({1}));
    which.push_back(a);
  }
  if (bounds.empty()) return;
  const at::Tensor host = at::cat(bounds).cpu();
  const int64_t* b = host.const_data_ptr<int64_t>();
  for (size_t j = 0; j < which.size(); ++j)
    TORCH_CHECK(b[2 * j] >= 0 && b[2 * j + 1] < limit, "sparse_scatter_add_: indices[", which[j], "] hold values in [",
                b[2 * j], ", ", b[2 * j + 1], "], out of range for a weight of ", limit, " elements; nothing was written");
}

int blocks_for(int64_t n) { return static_cast<int>(std::min<int64_t>(ceil_div<int64_t>(n, kThreads), 65535)); }

void sparse_scatter_add_cuda(const at::Tensor& weight, at::TensorList indices, at::TensorList values,
                             at::ArrayRef<double> alphas, bool check_indices) {
  check_scatter_args(weight, indices, values, alphas);
  const c10::cuda::OptionalCUDAGuard guard(weight.device());
  const at::NoGradGuard no_grad;  // the Autograd key falls through: keep the ATen calls below off the tape
  std::vector<at::Tensor> idx(indices.size()), val(values.size());
  for (size_t a = 0; a < indices.size(); ++a) {
    idx[a] = indices[a].contiguous();
    val[a] = values[a].contiguous();
  }
  if (check_indices) check_ranges(idx, weight.numel());  // every check before the first write
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "sparse_scatter_add_cuda", [&] {
    using W = scalar_t;
    for (size_t a = 0; a < idx.size(); ++a) {
      const int64_t n = idx[a].numel();
      if (n == 0) continue;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, val[a].scalar_type(), "sparse_scatter_add_values",
                                      [&] {
                                        scatter_add_kernel<W, scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
                                            weight.mutable_data_ptr<W>(), weight.numel(),
                                            idx[a].const_data_ptr<int64_t>(),
                                            val[a].const_data_ptr<scalar_t>(), n,
                                            static_cast<acc_t<W>>(alphas[a]));
                                        C10_CUDA_KERNEL_LAUNCH_CHECK();
                                      });
    }
  });
}

// One warp per entry: acc[i] (+)= dot(gt[rows_i, :], xt[cols_i, :]) over the chunk's n tokens,
// feature-major inputs; the first chunk sets acc, later ones add to it.
template <typename T>
__global__ void sddmm_kernel(const T* __restrict__ gt, const T* __restrict__ xt, const int64_t* __restrict__ rows,
                             const int64_t* __restrict__ cols, int64_t nnz, int64_t n, int64_t d_out, int64_t d_in,
                             bool first, acc_t<T>* __restrict__ acc) {
  using Acc = acc_t<T>;
  const int lane = threadIdx.x % 32;
  const int64_t warps = int64_t{gridDim.x} * (kThreads / 32);
  for (int64_t i = (blockIdx.x * int64_t{kThreads} + threadIdx.x) / 32; i < nnz; i += warps) {
    CUDA_KERNEL_ASSERT(rows[i] >= 0 && rows[i] < d_out && cols[i] >= 0 && cols[i] < d_in &&
                       "sddmm: rows or cols out of range");
    const T* g = gt + rows[i] * n;
    const T* x = xt + cols[i] * n;
    Acc s = 0;
    for (int64_t k = lane; k < n; k += 32) s += static_cast<Acc>(g[k]) * static_cast<Acc>(x[k]);
#pragma unroll
    for (int mask = 16; mask > 0; mask >>= 1) s += __shfl_xor_sync(0xffffffffu, s, mask);
    if (lane == 0) acc[i] = first ? s : acc[i] + s;
  }
}

// Tokens per transposed chunk: the chunk copies of grad_out and x stay bounded (8192 tokens x
// 4096 features in fp32 is 128 MiB each) however long the batch is.
constexpr int64_t kSddmmTokens = 8192;

at::Tensor sddmm_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& rows_in,
                      const at::Tensor& cols_in) {
  check_sddmm_args(grad_out, x, rows_in, cols_in);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const at::NoGradGuard no_grad;
  const at::Tensor rows = rows_in.contiguous(), cols = cols_in.contiguous();
  const int64_t nnz = rows.numel(), n = x.size(0);
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (nnz == 0) return at::empty({0}, x.options());
  at::Tensor acc = at::empty({nnz}, x.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sddmm_cuda", [&] {
    const int blocks = static_cast<int>(std::min<int64_t>(ceil_div<int64_t>(nnz, kThreads / 32), 65535));
    const int64_t chunks = std::max<int64_t>(1, ceil_div<int64_t>(n, kSddmmTokens));  // one for n = 0: the checks
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t n0 = c * kSddmmTokens, len = std::min(kSddmmTokens, n - n0);
      // [d_out, len], [d_in, len]: each entry's two rows are then contiguous (coalesced)
      const at::Tensor gt = grad_out.narrow(0, n0, len).t().contiguous();
      const at::Tensor xt = x.narrow(0, n0, len).t().contiguous();
      sddmm_kernel<scalar_t><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          gt.const_data_ptr<scalar_t>(), xt.const_data_ptr<scalar_t>(), rows.const_data_ptr<int64_t>(),
          cols.const_data_ptr<int64_t>(), nnz, len, grad_out.size(1), x.size(1), n0 == 0,
          acc.mutable_data_ptr<acc_t<scalar_t>>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return acc.scalar_type() == x.scalar_type() ? acc : acc.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CUDA, m) {
  m.impl("sparse_scatter_add_", TORCH_FN(sparse_scatter_add_cuda));
  m.impl("sddmm", TORCH_FN(sddmm_cuda));
}

}  // namespace lowrank::sparse
