#pragma once
// Op-boundary checks shared by every family. Each names the op and the argument, and says
// what was expected, so a bad call reads as a sentence. Only light ATen headers here.
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/dtype.h"

namespace lowrank {

inline bool is_float_kind(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline FloatKind float_kind(at::ScalarType t, const char* op, const char* arg) {
  switch (t) {
    case at::kFloat: return FloatKind::F32;
    case at::kHalf: return FloatKind::F16;
    case at::kBFloat16: return FloatKind::BF16;
    default:
      TORCH_CHECK_TYPE(false, op, ": ", arg, " must be float32, float16 or bfloat16, got ", t);
  }
  return FloatKind::F32;  // unreachable
}

inline void check_dtype(const at::Tensor& t, at::ScalarType want, const char* op, const char* arg) {
  TORCH_CHECK_TYPE(t.scalar_type() == want, op, ": ", arg, " must be ", want, ", got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op,
                              const char* arg, const char* ref_arg) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", arg, " is on ", t.device(), " but ", ref_arg,
              " is on ", ref.device(), "; all tensors must be on one device");
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* arg) {
  TORCH_CHECK(t.dim() == dim, op, ": ", arg, " must be ", dim, "-D, got shape ", t.sizes());
}

inline void check_numel(const at::Tensor& t, int64_t numel, const char* op, const char* arg) {
  TORCH_CHECK(t.numel() == numel, op, ": ", arg, " must have ", numel, " elements, got ", t.numel(),
              " (shape ", t.sizes(), ")");
}

// at::assert_no_overlap(written, read), which lets pass what it cannot decide (either tensor
// not dense, e.g. a strided slice): such a pair sharing memory raises here too, since the op
// would read what it writes.
inline void check_no_overlap(const at::Tensor& written, const at::Tensor& read, const char* op, const char* written_arg,
                             const char* read_arg) {
  at::assert_no_overlap(written, read);
  TORCH_CHECK(at::get_overlap_status(written, read) != at::MemOverlapStatus::TooHard || !written.is_alias_of(read), op,
              ": ", read_arg, " shares memory with ", written_arg,
              ", which the op writes, and their layouts do not rule out an overlap; pass a copy (.clone())");
}

}  // namespace lowrank
