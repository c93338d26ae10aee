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
}
