// Argument checks of the sparse family (kernels in cpu.cpp and cuda.cu).
#include "sparse/ops.h"

#include <ATen/MemoryOverlap.h>

#include <cmath>

#include "common/checks.h"

namespace lowrank::sparse {
namespace {

bool is_weight_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

void check_index(const at::Tensor& idx, const at::Tensor& ref, const char* op, const char* name,
                 const char* ref_name) {
  TORCH_CHECK(idx.dim() == 1, op, ": ", name, " must be 1-D, got shape ", idx.sizes());
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", idx.scalar_type());
  check_same_device(idx, ref, op, name, ref_name);
}

}  // namespace

void check_scatter_args(const at::Tensor& weight, at::TensorList indices, at::TensorList values,
                        at::ArrayRef<double> alphas) {
  const char* op = "sparse_scatter_add_";
  TORCH_CHECK_TYPE(is_weight_dtype(weight.scalar_type()), op,
                   ": weight must be float32, float16, bfloat16 or float64, got ", weight.scalar_type());
  TORCH_CHECK(weight.is_contiguous(), op, ": weight must be contiguous (it is updated in place through its flat "
              "view), got strides ", weight.strides());
  TORCH_CHECK(indices.size() == values.size() && values.size() == alphas.size(), op,
              ": indices, values and alphas must be lists of one length (one entry per adapter), got ",
              indices.size(), ", ", values.size(), " and ", alphas.size());
  for (size_t a = 0; a < indices.size(); ++a) {
    check_index(indices[a], weight, op, "indices", "weight");
    const at::Tensor& v = values[a];
    TORCH_CHECK(v.dim() == 1 && v.numel() == indices[a].numel(), op, ": values[", a,
                "] must be 1-D with one value per index (", indices[a].numel(), "), got shape ", v.sizes());
    TORCH_CHECK_TYPE(is_weight_dtype(v.scalar_type()), op, ": values[", a, "] must be a float tensor, got ",
                     v.scalar_type());
    check_same_device(v, weight, op, "values", "weight");
    // read while weight is written: torch's index_add_ raises on such overlap too
    check_no_overlap(weight, v, op, "weight", "values");
    check_no_overlap(weight, indices[a], op, "weight", "indices");
    TORCH_CHECK(std::isfinite(alphas[a]), op, ": alphas[", a, "] must be finite, got ", alphas[a]);
  }
}

void check_sddmm_args(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& rows,
                      const at::Tensor& cols) {
  const char* op = "sddmm";
  TORCH_CHECK(grad_out.dim() == 2 && x.dim() == 2 && grad_out.size(0) == x.size(0), op,
              ": grad_out [N, d_out] and x [N, d_in] must be 2-D with one N (lowrank_ext.ops.sparse flattens "
              "leading dims), got ", grad_out.sizes(), " and ", x.sizes());
  TORCH_CHECK_TYPE(is_weight_dtype(x.scalar_type()), op, ": x must be float32, float16, bfloat16 or float64, got ",
                   x.scalar_type());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type(), op, ": grad_out is ", grad_out.scalar_type(),
                   " but x is ", x.scalar_type());
  check_same_device(grad_out, x, op, "grad_out", "x");
  check_index(rows, x, op, "rows", "x");
  check_index(cols, x, op, "cols", "x");
  TORCH_CHECK(rows.numel() == cols.numel(), op, ": rows and cols must have one length, got ", rows.numel(), " and ",
              cols.numel());
}

}  // namespace lowrank::sparse
