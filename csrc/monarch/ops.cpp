// Argument checks of the monarch family (kernels in cpu.cpp and cuda.cu).
#include "monarch/ops.h"

#include "common/checks.h"

namespace lowrank::monarch {
namespace {

bool is_monarch_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

void check_weight(const at::Tensor& w, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(w.dim() == 3 && w.size(0) >= 1 && w.size(1) >= 1 && w.size(2) >= 1, op, ": ", name,
              " must be 3-D [nblocks, rows, cols] with every size >= 1, got ", w.sizes());
  check_same_device(w, x, op, name, "x");
  TORCH_CHECK_TYPE(w.scalar_type() == x.scalar_type(), op, ": ", name, " is ", w.scalar_type(), " but x is ",
                   x.scalar_type(), "; cast them to one dtype (under autocast the Python wrapper does)");
}

}  // namespace

MonarchDims check_monarch_args(const at::Tensor& x, const at::Tensor& w1, const at::Tensor* w2, const char* op) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [N, d_in] (lowrank_ext.ops.monarch flattens leading dims), got ",
              x.sizes());
  TORCH_CHECK_TYPE(is_monarch_dtype(x.scalar_type()), op, ": x must be float32, float16, bfloat16 or float64, got ",
                   x.scalar_type());
  const char* w1_name = w2 ? "w1" : "w";
  check_weight(w1, x, op, w1_name);
  MonarchDims d{x.size(0), w1.size(0), w1.size(2), w1.size(1), w1.size(1)};
  TORCH_CHECK(x.size(1) == d.d_in(), op, ": x.size(-1) = ", x.size(1), " must equal nblocks * in_bs = ", d.nblocks,
              " * ", d.in_bs, " (", w1_name, " has shape ", w1.sizes(), ")");
  if (w2 != nullptr) {
    check_weight(*w2, x, op, "w2");
    TORCH_CHECK(w2->size(0) == d.nblocks && w2->size(2) == d.mid, op, ": w2 must have shape [nblocks, out_bs, mid] = [",
                d.nblocks, ", out_bs, ", d.mid, "] to follow w1 ", w1.sizes(), ", got ", w2->sizes());
    d.out_bs = w2->size(1);
  }
  return d;
}

void check_grad_y(const at::Tensor& grad_y, const at::Tensor& x, int64_t d_out, const char* op) {
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == x.size(0) && grad_y.size(1) == d_out, op,
              ": grad_y must have shape [N, d_out] = [", x.size(0), ", ", d_out, "], got ", grad_y.sizes());
  check_same_device(grad_y, x, op, "grad_y", "x");
  TORCH_CHECK_TYPE(grad_y.scalar_type() == x.scalar_type(), op, ": grad_y is ", grad_y.scalar_type(), " but x is ",
                   x.scalar_type());
}

void check_saved_h(const std::optional<at::Tensor>& h, const at::Tensor& x, const MonarchDims& d, const char* op) {
  if (!h) return;
  TORCH_CHECK(h->dim() == 2 && h->size(0) == d.d_mid() && h->size(1) == d.n, op,
              ": h must be monarch_forward's saved intermediate of shape [nblocks * mid, N] = [", d.d_mid(), ", ",
              d.n, "], got ", h->sizes());
  check_same_device(*h, x, op, "h", "x");
  TORCH_CHECK_TYPE(h->scalar_type() == x.scalar_type(), op, ": h is ", h->scalar_type(), " but x is ",
                   x.scalar_type());
}

}  // namespace lowrank::monarch
