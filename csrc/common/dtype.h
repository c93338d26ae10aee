#pragma once
// The floating dtypes kernels accept, as a plain enum (kernels never see at::Tensor),
// and one dispatch helper: LOWRANK_DISPATCH_FLOAT(kind, scalar_t, ...) runs the body with
// scalar_t = float, c10::Half or c10::BFloat16. c10's Half/BFloat16 convert to and from
// float on host and device alike.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

namespace lowrank {

enum class FloatKind : uint8_t { F32 = 0, F16 = 1, BF16 = 2 };

// The accumulation type of a kernel on T: double for double, float for float/half/bfloat16.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

}  // namespace lowrank

#define LOWRANK_DISPATCH_FLOAT(KIND, NAME, ...)                                   \
  [&] {                                                                           \
    switch (KIND) {                                                               \
      case ::lowrank::FloatKind::F32: { using NAME = float; return __VA_ARGS__(); } \
      case ::lowrank::FloatKind::F16: { using NAME = c10::Half; return __VA_ARGS__(); } \
      case ::lowrank::FloatKind::BF16: { using NAME = c10::BFloat16; return __VA_ARGS__(); } \
    }                                                                             \
  }()
