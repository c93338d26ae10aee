#pragma once
// Op boundary of the multilora family (many adapters in one batch): the argument checks
// the CPU and CUDA kernels share. The kernels themselves are per device:
//   cpu.cpp  groups the tokens by adapter (a counting sort that also checks every id) and
//            runs BLAS per adapter on its rows, gathered in cache-sized chunks (views when
//            they are one long contiguous range);
//   cuda.cu  sorts the ids on the device and runs tiled kernels over the sorted rows, no host
//            synchronisation and launch shapes that depend on sizes only (CUDA-graph safe).
#include <ATen/core/Tensor.h>

#include <optional>

namespace lowrank::multilora {

// Shapes every op of the family agrees on.
struct StackShapes {
  int64_t n;             // tokens
  int64_t num_adapters;  // S, slots in the stack
  int64_t max_rank;      // R, the padded rank
};

// x [N, d_in], a_stack [S, R, d_in] (x's dtype and device), ids [N], ranks [S]?, scales [S]?
StackShapes check_shrink_args(const at::Tensor& x, const at::Tensor& a_stack, const at::Tensor& ids,
                              const std::optional<at::Tensor>& ranks, const std::optional<at::Tensor>& scales,
                              const char* op);

// y [N, d_out], xa [N, R] (any float dtype), b_stack [S, d_out, R] (y's dtype), ids, ranks, scales
StackShapes check_expand_args(const at::Tensor& y, const at::Tensor& xa, const at::Tensor& b_stack,
                              const at::Tensor& ids, const std::optional<at::Tensor>& ranks,
                              const std::optional<at::Tensor>& scales, const char* op);

// lora_expand_'s shared preconditions and input: y must not overlap itself (the rows of a
// broadcast y would alias) nor b_stack (weights read while y is written: an error, as torch's
// in-place index ops raise), and an xa that lives in y's memory (one GEMM's output split in
// two, a view of y) is copied, so that it is read as it was before the call. Returns the xa
// the kernels read.
at::Tensor inplace_expand_xa(const at::Tensor& y, const at::Tensor& xa, const at::Tensor& b_stack);

// left [N, P], right [N, Q] (float dtypes, may differ), ids [N], num_adapters >= 0, scales [S]?
void check_outer_args(const at::Tensor& left, const at::Tensor& right, const at::Tensor& ids,
                      int64_t num_adapters, const std::optional<at::Tensor>& scales, const char* op);

// The dtype the products accumulate in and xa / the outer products are returned in.
at::ScalarType accumulate_type(at::ScalarType t);

}  // namespace lowrank::multilora
