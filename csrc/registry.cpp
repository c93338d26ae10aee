// Every schema of the `lowrank` namespace, grouped by family: this file is the table of
// contents of the library. Kernels are registered per device in <family>/cpu.cpp and
// <family>/cuda.cu; fake (meta) and autograd registrations live in lowrank_ext/ops/.
#include <torch/library.h>

TORCH_LIBRARY(lowrank, m) {
  // ---- quant: block-wise 8-bit / 4-bit quantization with a 2^bits-entry code ----
  // x (any shape, fp32/fp16/bf16) -> q uint8 [numel] or [ceil(numel/2)], absmax fp32 [ceil(numel/blocksize)]
  m.def("quantize_blockwise(Tensor x, Tensor code, int blocksize, int bits, bool stochastic_rounding=False, "
        "int seed=0, int offset=0) -> (Tensor q, Tensor absmax)");
  // (q, absmax, code) -> tensor of `shape` and `dtype`: code[q] * absmax of each block
  m.def("dequantize_blockwise(Tensor q, Tensor absmax, Tensor code, int blocksize, int bits, SymInt[] shape, "
        "ScalarType dtype) -> Tensor");

  // ---- optim: fused multi-tensor AdamW steps, in place, one pass over memory ----
  // moments block-wise quantized (8/4-bit, re-quantized with a fresh absmax every step)
  m.def("adamw_step_quantized_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avg_q, "
        "Tensor(c!)[] exp_avg_absmax, Tensor(d!)[] exp_avg_sq_q, Tensor(e!)[] exp_avg_sq_absmax, "
        "Tensor code_exp_avg, Tensor code_exp_avg_sq, float lr, float beta1, float beta2, float eps, "
        "float weight_decay, int step, int bits, int blocksize_exp_avg, int blocksize_exp_avg_sq, "
        "bool stochastic_rounding=False, int seed=0, bool stochastic_exp_avg=False, "
        "bool stochastic_exp_avg_sq=False) -> ()");
  // the same update with fp32 moments (small tensors; the comparison point)
  m.def("adamw_step_fp32_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avg, Tensor(c!)[] exp_avg_sq, "
        "float lr, float beta1, float beta2, float eps, float weight_decay, int step, "
        "bool stochastic_rounding=False, int seed=0) -> ()");
}

// Non-differentiable ops (integer outputs, in-place optimizer updates): autograd passes
// straight through to the kernels, so outputs never require grad and torch does not warn
// about a missing autograd kernel.
TORCH_LIBRARY_IMPL(lowrank, Autograd, m) {
  m.impl("quantize_blockwise", torch::CppFunction::makeFallthrough());
  m.impl("dequantize_blockwise", torch::CppFunction::makeFallthrough());
}
