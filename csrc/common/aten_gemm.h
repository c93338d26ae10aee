#pragma once
// ATen GEMM helpers shared by the device-generic op code and the CPU kernels.
#include <ATen/core/Tensor.h>
#include <ATen/ops/mm.h>

namespace lowrank {

// c = beta c + alpha (a b), in place. ATen's addmm_ (BLAS) skips the product for alpha = 0;
// here alpha = 0 still carries a's and b's NaN/Inf into c, as s * (x A^T) B^T does in torch
// for an adapter's scale s = 0 (rare: the product is then formed apart). beta = 0 keeps BLAS's
// meaning: c is not read. rm_gemm (cpu_blas.h) does the same for raw pointers.
inline at::Tensor& addmm_carrying_nan_(at::Tensor& c, const at::Tensor& a, const at::Tensor& b, double beta,
                                      double alpha) {
  if (alpha != 0) return c.addmm_(a, b, beta, alpha);
  const at::Tensor zero_times_product = at::mm(a, b).mul_(0);
  if (beta == 0) return c.copy_(zero_times_product);
  if (beta != 1) c.mul_(beta);
  return c.add_(zero_times_product);
}

}  // namespace lowrank
