#pragma once
// Fused multi-tensor AdamW steps: plain parameter structs and launcher prototypes.
// One call updates many tensors; each tensor is split into superblocks of
// max(blocksize_exp_avg, blocksize_exp_avg_sq) values, the unit of work of the kernels.
#include <cstdint>
#include <vector>

#include "common/dtype.h"
#include "optim/optim_math.h"

typedef struct CUstream_st* cudaStream_t;  // as cuda_runtime_api.h declares it

namespace lowrank::optim {

// One parameter tensor and its state. Quantized steps use the *_q / *_absmax fields,
// fp32 steps the exp_avg / exp_avg_sq fields; the others are null. Rank-1 steps keep the
// second moment's row and column maxima of the tensor seen as [numel / cols, cols] instead of
// exp_avg_sq_absmax.
struct TensorSlot {
  void* param;
  const void* grad;
  int64_t numel;
  uint8_t* exp_avg_q;
  float* exp_avg_absmax;
  uint8_t* exp_avg_sq_q;
  float* exp_avg_sq_absmax;
  float* exp_avg;
  float* exp_avg_sq;
  float* exp_avg_sq_row;  // rank-1 steps: [numel / cols]
  float* exp_avg_sq_col;  // rank-1 steps: [cols]
  int64_t cols;
};

struct AdamWStepParams {
  const TensorSlot* tensors;  // host pointer on CPU, device pointer on CUDA
  int64_t num_tensors;
  FloatKind param_kind;       // one param dtype and one grad dtype per call
  FloatKind grad_kind;
  AdamWConstants c;
  bool quantized;
  int bits;                   // 8 or 4 (quantized steps)
  int64_t blocksize_exp_avg;  // powers of two in [128, 4096]
  int64_t blocksize_exp_avg_sq;
  int log2_blocksize_exp_avg;     // their log2 (element -> block is a shift on the GPU)
  int log2_blocksize_exp_avg_sq;
  const float* code_exp_avg;     // 2^bits sorted entries (signed)
  const float* code_exp_avg_sq;  // 2^bits sorted entries (unsigned)
  bool stochastic_rounding;   // bf16 params: round the written value stochastically
  bool stochastic_exp_avg;    // re-quantize a moment with stochastic rounding: unbiased, so
  bool stochastic_exp_avg_sq; // a slow EMA (beta2 = 0.999) is not stalled by the code's gaps
  uint64_t seed;              // Philox key; counter offset (tensor index << 2) | stream
  bool rank1 = false;         // the second moment is rank-1 normalised (see cpu.cpp, cuda.cu)
};

// Philox counter offsets of the three random streams of tensor t.
enum RandomStream : uint64_t { kParamStream = 0, kExpAvgStream = 1, kExpAvgSqStream = 2 };
LOWRANK_HD uint64_t stream_offset(int64_t t, RandomStream s) { return (static_cast<uint64_t>(t) << 2) | s; }

LOWRANK_HD int64_t superblock_size(const AdamWStepParams& p) {
  if (!p.quantized) return 2048;
  return p.blocksize_exp_avg > p.blocksize_exp_avg_sq ? p.blocksize_exp_avg : p.blocksize_exp_avg_sq;
}

// The first superblock of each tensor, [num_tensors + 1] (prefix sums of their counts).
inline std::vector<int64_t> superblock_offsets(const TensorSlot* tensors, int64_t num_tensors, int64_t superblock) {
  std::vector<int64_t> offsets(num_tensors + 1, 0);
  for (int64_t i = 0; i < num_tensors; ++i)
    offsets[i + 1] = offsets[i] + (tensors[i].numel + superblock - 1) / superblock;
  return offsets;
}

void adamw_step_cpu(const AdamWStepParams& p);
// block_offsets: [num_tensors + 1] device array, the first work unit of each tensor (the
// CUDA kernels size their own units: see optim/cuda.cu).
void adamw_step_cuda(const AdamWStepParams& p, const int64_t* block_offsets, int64_t total_blocks,
                     cudaStream_t stream);

}  // namespace lowrank::optim
