// CUDA kernels of the lora family. UNVERIFIED: compiled in CI but never yet run on a GPU
// (see the README's op table); the first GPU session runs tests/test_lora.py on them.
//
// The three dropout passes are composed from cuBLAS (through ATen) and two Philox
// elementwise kernels, over chunks of rows so that the transient dropped copy of x stays
// bounded (kChunkElems values): nothing of size N x d_in is kept or saved, but each pass
// reads x twice more than a fully fused kernel would. The fused skinny-GEMM kernels that
// make xa in one pass over x are the next step (issue: fused LoRA).
#include <torch/library.h>

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <algorithm>

#include "common/cuda_utils.cuh"
#include "lora/ops.h"

namespace lowrank::lora {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunkElems = int64_t{1} << 24;  // 16M values per transient chunk

// Calls op(i, factor) for the elements e0 + i, i < count: one thread per Philox group of 8
// (grid-stride), the mask factors drawn once per group.
template <typename Op>
__device__ __forceinline__ void for_each_factor(const Dropout& d, int64_t e0, int64_t count, Op&& op) {
  const int64_t first_group = e0 / kPhiloxGroup;
  const int64_t groups = (e0 + count + kPhiloxGroup - 1) / kPhiloxGroup - first_group;
  for (int64_t gi = blockIdx.x * int64_t{kThreads} + threadIdx.x; gi < groups; gi += int64_t{gridDim.x} * kThreads) {
    const int64_t g = first_group + gi;
    const Philox4 r = philox_group(d.seed, kDropoutOffset, static_cast<uint64_t>(g));
#pragma unroll
    for (int k = 0; k < kPhiloxGroup; ++k) {
      const int64_t e = g * kPhiloxGroup + k;
      if (e >= e0 && e < e0 + count) op(e - e0, dropout_factor(d, r, static_cast<uint64_t>(e)));
    }
  }
}

// out[i] = x[i] * mask(e0 + i)
template <typename T, typename Out, typename Acc = std::conditional_t<std::is_same_v<T, double>, double, float>>
__global__ void __launch_bounds__(kThreads) dropout_kernel(const T* x, Out* out, int64_t e0, int64_t count,
                                                          Dropout d) {
  for_each_factor(d, e0, count, [&](int64_t i, float f) {
    out[i] = static_cast<Out>(static_cast<Acc>(x[i]) * static_cast<Acc>(f));
  });
}

// gx[i] += prod[i] * mask(e0 + i) (prod in the accumulate type: fp32, fp64 for fp64)
template <typename T, typename Acc = std::conditional_t<std::is_same_v<T, double>, double, float>>
__global__ void __launch_bounds__(kThreads) masked_add_kernel(T* gx, const Acc* prod, int64_t e0, int64_t count,
                                                             Dropout d) {
  for_each_factor(d, e0, count, [&](int64_t i, float f) {
    gx[i] = static_cast<T>(sum_rn(static_cast<Acc>(gx[i]), product_rn(prod[i], static_cast<Acc>(f))));
  });
}

int grid_for(int64_t count) {
  const int64_t groups = count / kPhiloxGroup + 2;
  return static_cast<int>(std::min<int64_t>(ceil_div<int64_t>(groups, kThreads), 65535));
}

int64_t chunk_rows(int64_t d_in) { return std::max<int64_t>(1, kChunkElems / std::max<int64_t>(d_in, 1)); }

// drop(x[r0:r0+rows]) as a new [rows, d_in] tensor of dtype `out_dtype`
at::Tensor dropped_rows(const at::Tensor& x, int64_t r0, int64_t rows, const Dropout& d, at::ScalarType out_dtype) {
  const int64_t d_in = x.size(1), count = rows * d_in;
  at::Tensor out = at::empty({rows, d_in}, x.options().dtype(out_dtype));
  if (count == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_dropout_rows", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>() + r0 * d_in;
    if (out_dtype == x.scalar_type()) {
      dropout_kernel<scalar_t, scalar_t><<<grid_for(count), kThreads, 0, stream>>>(
          src, out.mutable_data_ptr<scalar_t>(), r0 * d_in, count, d);
    } else {
      TORCH_INTERNAL_ASSERT(out_dtype == at::kFloat || out_dtype == at::kDouble);
      if (out_dtype == at::kFloat)
        dropout_kernel<scalar_t, float><<<grid_for(count), kThreads, 0, stream>>>(
            src, out.mutable_data_ptr<float>(), r0 * d_in, count, d);
      else
        dropout_kernel<scalar_t, double><<<grid_for(count), kThreads, 0, stream>>>(
            src, out.mutable_data_ptr<double>(), r0 * d_in, count, d);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor x_dropped_a_cuda(const at::Tensor& x, const at::Tensor& a, const Dropout& d) {
  const c10::cuda::CUDAGuard guard(x.device());
  // the dropped chunk in fp32 (as on CPU): no rounding of x * keep_scale to fp16/bf16
  const int64_t n = x.size(0), d_in = x.size(1), step = chunk_rows(d_in);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor xa = at::empty({n, a.size(0)}, x.options().dtype(acc));
  const at::Tensor a_t = a.to(acc).t();
  for (int64_t r0 = 0; r0 < n; r0 += step) {
    const int64_t rows = std::min(step, n - r0);
    at::Tensor out = xa.narrow(0, r0, rows);
    at::mm_out(out, dropped_rows(x, r0, rows, d, acc), a_t);
  }
  return xa.to(x.scalar_type());
}

void add_masked_ta_cuda(at::Tensor& grad_x, const at::Tensor& t, const at::Tensor& a, const Dropout& d) {
  const c10::cuda::CUDAGuard guard(grad_x.device());
  TORCH_INTERNAL_ASSERT(grad_x.is_contiguous());
  const int64_t n = grad_x.size(0), d_in = grad_x.size(1), step = chunk_rows(d_in);
  const auto acc = grad_x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor t_acc = t.to(acc), a_acc = a.to(acc);
  const auto stream = at::cuda::getCurrentCUDAStream();
  for (int64_t r0 = 0; r0 < n; r0 += step) {
    const int64_t rows = std::min(step, n - r0), count = rows * d_in;
    const at::Tensor prod = at::mm(t_acc.narrow(0, r0, rows), a_acc);  // [rows, d_in], accumulate dtype
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_x.scalar_type(), "lora_masked_add", [&] {
      using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      masked_add_kernel<scalar_t><<<grid_for(count), kThreads, 0, stream>>>(
          grad_x.mutable_data_ptr<scalar_t>() + r0 * d_in, prod.const_data_ptr<Acc>(), r0 * d_in, count, d);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

at::Tensor t_dropped_x_cuda(const at::Tensor& t, const at::Tensor& x, const Dropout& d) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0), d_in = x.size(1), step = chunk_rows(d_in);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor t_acc = t.to(acc);
  at::Tensor grad_a = at::zeros({t.size(1), d_in}, x.options().dtype(acc));
  for (int64_t r0 = 0; r0 < n; r0 += step) {
    const int64_t rows = std::min(step, n - r0);
    grad_a.addmm_(t_acc.narrow(0, r0, rows).t(), dropped_rows(x, r0, rows, d, acc));
  }
  return grad_a.to(x.scalar_type());
}

// The two backward passes one after the other (each regenerates the mask).
at::Tensor dropped_backward_cuda(const at::Tensor& t, const at::Tensor& x, const at::Tensor& a, const Dropout& d,
                                 at::Tensor& grad_x, bool want_grad_a) {
  at::Tensor grad_a = want_grad_a ? t_dropped_x_cuda(t, x, d) : at::Tensor();
  if (grad_x.defined()) add_masked_ta_cuda(grad_x, t, a, d);
  return grad_a;
}

constexpr DropoutKernels kCudaKernels{x_dropped_a_cuda, dropped_backward_cuda};

std::tuple<at::Tensor, at::Tensor> lora_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                     const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                                     const at::Tensor& lora_b, const std::optional<at::Tensor>& core,
                                                     const std::optional<at::Tensor>& rank_scale, double scale,
                                                     double dropout_p, int64_t seed,
                                                     const std::optional<at::Tensor>& seed_tensor) {
  const c10::cuda::OptionalCUDAGuard guard(
      first_cuda_device(x, weight, bias, lora_a, lora_b, core, rank_scale, seed_tensor));
  return lora_forward(x, weight, bias, lora_a, lora_b, core, rank_scale, scale, dropout_p, seed, seed_tensor,
                      kCudaKernels);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const std::optional<at::Tensor>& core, const std::optional<at::Tensor>& rank_scale,
    const at::Tensor& xa, double scale, double dropout_p, int64_t seed, const std::optional<at::Tensor>& seed_tensor,
    std::array<bool, 5> output_mask) {
  const c10::cuda::OptionalCUDAGuard guard(
      first_cuda_device(grad_y, x, weight, lora_a, lora_b, core, rank_scale, xa, seed_tensor));
  return lora_backward(grad_y, x, weight, lora_a, lora_b, core, rank_scale, xa, scale, dropout_p, seed, seed_tensor,
                       output_mask, kCudaKernels);
}

void lora_merge_cuda(at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
                     const std::optional<at::Tensor>& core, const std::optional<at::Tensor>& rank_scale,
                     double scale) {
  const c10::cuda::OptionalCUDAGuard guard(first_cuda_device(weight, lora_a, lora_b, core, rank_scale));
  lora_merge_(weight, lora_a, lora_b, core, rank_scale, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CUDA, m) {
  m.impl("lora_forward", TORCH_FN(lora_forward_cuda));
  m.impl("lora_backward", TORCH_FN(lora_backward_cuda));
  m.impl("lora_merge_", TORCH_FN(lora_merge_cuda));
}

}  // namespace lowrank::lora
