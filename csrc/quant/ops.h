#pragma once
// Op boundary of the quant family (see ops.cpp): tensors in, checked params struct out.
#include <ATen/core/Tensor.h>
#include <c10/core/SymIntArrayRef.h>

#include "quant/quant.h"

namespace lowrank::quant {

struct PreparedQuantize {
  at::Tensor x, code;   // contiguous inputs (kept alive while the kernel runs)
  at::Tensor q, absmax; // outputs
  QuantizeParams params;
};

struct PreparedDequantize {
  at::Tensor q, absmax, code;
  at::Tensor out;
  DequantizeParams params;
};

// Checks a code argument (float32, 1-D, 2^bits entries, on `device`; a CPU code also
// finite and ascending) and returns it contiguous. Shared with the optim family.
at::Tensor check_code(const at::Tensor& code, int64_t bits, const at::Device& device, const char* op,
                      const char* arg);

PreparedQuantize prepare_quantize(const at::Tensor& x, const at::Tensor& code, int64_t blocksize, int64_t bits,
                                  bool stochastic_rounding, int64_t seed, int64_t offset);

PreparedDequantize prepare_dequantize(const at::Tensor& q, const at::Tensor& absmax, const at::Tensor& code,
                                      int64_t blocksize, int64_t bits, c10::SymIntArrayRef shape,
                                      at::ScalarType dtype);

}  // namespace lowrank::quant
