#pragma once
// Op boundary of the sparse family (sparse adapters: SHiRA, SLTrain): argument checks shared
// by the CPU and CUDA kernels.
//   sparse_scatter_add_: weight (contiguous, any shape) viewed flat; per adapter a,
//                        weight.view(-1)[indices[a][i]] += alphas[a] * values[a][i]
//   sddmm:               grad_out [N, d_out], x [N, d_in], rows/cols int64 [nnz] -> [nnz]
#include <ATen/core/Tensor.h>

#include <vector>

namespace lowrank::sparse {

// Shapes, dtypes, devices and list lengths (not index ranges: the kernels check those
// before writing anything, as part of their first pass).
void check_scatter_args(const at::Tensor& weight, at::TensorList indices, at::TensorList values,
                        at::ArrayRef<double> alphas);

void check_sddmm_args(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& rows,
                      const at::Tensor& cols);

}  // namespace lowrank::sparse
