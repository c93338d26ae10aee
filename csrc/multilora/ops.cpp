// Argument checks of the multilora ops (see ops.h). Value checks that need the ids' or
// ranks' contents (-1 <= id < S, 0 <= rank <= R) are the kernels': the CPU kernel checks
// them before writing anything; the CUDA kernels assert on the device (as torch's own
// index kernels do), since a host-side check would synchronise.
#include "multilora/ops.h"

#include <ATen/MemoryOverlap.h>

#include <cmath>

#include "common/checks.h"

namespace lowrank::multilora {
namespace {

bool is_multilora_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

void check_ids(const at::Tensor& ids, int64_t n, const at::Tensor& ref, const char* op) {
  TORCH_CHECK(ids.dim() == 1 && ids.size(0) == n, op, ": token_adapter_ids must have shape [N] = [", n, "], got ",
              ids.sizes());
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt, op,
                   ": token_adapter_ids must be int64 or int32, got ", ids.scalar_type());
  check_same_device(ids, ref, op, "token_adapter_ids", "the activations");
}

void check_ranks_scales(const std::optional<at::Tensor>& ranks, const std::optional<at::Tensor>& scales,
                        int64_t num_adapters, const at::Tensor& ref, const char* op) {
  if (ranks) {
    TORCH_CHECK(ranks->dim() == 1 && ranks->size(0) == num_adapters, op, ": ranks must have shape [S] = [",
                num_adapters, "], got ", ranks->sizes());
    TORCH_CHECK_TYPE(ranks->scalar_type() == at::kLong || ranks->scalar_type() == at::kInt, op,
                     ": ranks must be int64 or int32, got ", ranks->scalar_type());
    check_same_device(*ranks, ref, op, "ranks", "the activations");
  }
  if (scales) {
    TORCH_CHECK(scales->dim() == 1 && scales->size(0) == num_adapters, op, ": scales must have shape [S] = [",
                num_adapters, "], got ", scales->sizes());
    TORCH_CHECK_TYPE(is_multilora_float(scales->scalar_type()), op, ": scales must be a float tensor, got ",
                     scales->scalar_type());
    check_same_device(*scales, ref, op, "scales", "the activations");
  }
}

void check_float(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK_TYPE(is_multilora_float(t.scalar_type()), op, ": ", arg,
                   " must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
}

}  // namespace

at::ScalarType accumulate_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

StackShapes check_shrink_args(const at::Tensor& x, const at::Tensor& a_stack, const at::Tensor& ids,
                              const std::optional<at::Tensor>& ranks, const std::optional<at::Tensor>& scales,
                              const char* op) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [N, d_in] (lowrank_ext.ops.multilora flattens leading dims), got ",
              x.sizes());
  check_float(x, op, "x");
  TORCH_CHECK(a_stack.dim() == 3 && a_stack.size(0) >= 1 && a_stack.size(1) >= 1 && a_stack.size(2) == x.size(1),
              op, ": a_stack must have shape [S, R, d_in] with S, R >= 1 and d_in = ", x.size(1), ", got ",
              a_stack.sizes());
  check_same_device(a_stack, x, op, "a_stack", "x");
  TORCH_CHECK_TYPE(a_stack.scalar_type() == x.scalar_type(), op, ": a_stack is ", a_stack.scalar_type(),
                   " but x is ", x.scalar_type());
  const StackShapes s{x.size(0), a_stack.size(0), a_stack.size(1)};
  check_ids(ids, s.n, x, op);
  check_ranks_scales(ranks, scales, s.num_adapters, x, op);
  return s;
}

StackShapes check_expand_args(const at::Tensor& y, const at::Tensor& xa, const at::Tensor& b_stack,
                              const at::Tensor& ids, const std::optional<at::Tensor>& ranks,
                              const std::optional<at::Tensor>& scales, const char* op) {
  TORCH_CHECK(y.dim() == 2, op, ": y must be 2-D [N, d_out], got ", y.sizes());
  check_float(y, op, "y");
  check_float(xa, op, "xa");
  TORCH_CHECK(b_stack.dim() == 3 && b_stack.size(0) >= 1 && b_stack.size(2) >= 1 && b_stack.size(1) == y.size(1),
              op, ": b_stack must have shape [S, d_out, R] with S, R >= 1 and d_out = ", y.size(1), ", got ",
              b_stack.sizes());
  TORCH_CHECK(xa.dim() == 2 && xa.size(0) == y.size(0) && xa.size(1) == b_stack.size(2), op,
              ": xa must have shape [N, R] = [", y.size(0), ", ", b_stack.size(2), "], got ", xa.sizes());
  check_same_device(xa, y, op, "xa", "y");
  check_same_device(b_stack, y, op, "b_stack", "y");
  TORCH_CHECK_TYPE(b_stack.scalar_type() == y.scalar_type(), op, ": b_stack is ", b_stack.scalar_type(),
                   " but y is ", y.scalar_type());
  const StackShapes s{y.size(0), b_stack.size(0), b_stack.size(2)};
  check_ids(ids, s.n, y, op);
  check_ranks_scales(ranks, scales, s.num_adapters, y, op);
  return s;
}

at::Tensor inplace_expand_xa(const at::Tensor& y, const at::Tensor& xa, const at::Tensor& b_stack) {
  at::assert_no_internal_overlap(y);
  check_no_overlap(y, b_stack, "lora_expand_", "y", "b_stack");
  return xa.is_alias_of(y) ? xa.clone(at::MemoryFormat::Contiguous) : xa;
}

void check_outer_args(const at::Tensor& left, const at::Tensor& right, const at::Tensor& ids,
                      int64_t num_adapters, const std::optional<at::Tensor>& scales, const char* op) {
  TORCH_CHECK(left.dim() == 2 && right.dim() == 2 && left.size(0) == right.size(0), op,
              ": left and right must be 2-D with one row per token, got ", left.sizes(), " and ", right.sizes());
  check_float(left, op, "left");
  check_float(right, op, "right");
  check_same_device(right, left, op, "right", "left");
  TORCH_CHECK(num_adapters >= 0, op, ": num_adapters must be >= 0, got ", num_adapters);
  check_ids(ids, left.size(0), left, op);
  check_ranks_scales(std::nullopt, scales, num_adapters, left, op);
}

}  // namespace lowrank::multilora
