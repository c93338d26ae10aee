#pragma once
// Op boundary of the monarch family: argument checks shared by the CPU and CUDA kernels.
//   monarch:   x [N, nblocks*in_bs], w1 [nblocks, mid, in_bs], w2 [nblocks, out_bs, mid]
//              -> y [N, nblocks*out_bs]; h (saved for backward) is R x feature-major, [nblocks*mid, N]
//   blockdiag: x [N, nblocks*in_bs], w [nblocks, out_bs, in_bs] -> y [N, nblocks*out_bs]
#include <ATen/core/Tensor.h>

#include <optional>

#include "monarch/monarch_math.h"

namespace lowrank::monarch {

struct MonarchDims {
  int64_t n, nblocks, in_bs, mid, out_bs;
  int64_t d_in() const { return nblocks * in_bs; }
  int64_t d_mid() const { return nblocks * mid; }
  int64_t d_out() const { return nblocks * out_bs; }
};

// x, w1, w2 as the monarch ops take them (blockdiag: w2 absent, mid = out_bs = w.size(1)).
MonarchDims check_monarch_args(const at::Tensor& x, const at::Tensor& w1, const at::Tensor* w2, const char* op);

// grad_y [N, d_out] of the same dtype and device as x.
void check_grad_y(const at::Tensor& grad_y, const at::Tensor& x, int64_t d_out, const char* op);

// h, when given, is [nblocks*mid, N] in x's dtype on x's device.
void check_saved_h(const std::optional<at::Tensor>& h, const at::Tensor& x, const MonarchDims& d, const char* op);

}  // namespace lowrank::monarch
