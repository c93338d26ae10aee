#pragma once
// Block-wise quantization: plain parameter structs and launcher prototypes. Kernels see
// raw pointers and sizes only; ops.cpp turns tensors into these after checking them.
#include <cstdint>

#include "common/dtype.h"

typedef struct CUstream_st* cudaStream_t;  // as cuda_runtime_api.h declares it

namespace lowrank::quant {

constexpr int kMinBlocksize = 64;
constexpr int kMaxBlocksize = 4096;

struct QuantizeParams {
  const void* x;         // [numel] contiguous, dtype x_kind
  FloatKind x_kind;
  int64_t numel;
  const float* code;     // [code_size] sorted ascending (2^bits entries)
  int bits;              // 8: one value per byte; 4: two per byte, even element in the low nibble
  int64_t blocksize;     // power of two in [64, 4096]
  int64_t nblocks;       // ceil(numel / blocksize); the last block may be partial
  uint8_t* q;            // [numel] (8-bit) or [ceil(numel / 2)] (4-bit)
  float* absmax;         // [nblocks]
  bool stochastic;       // stochastic rounding between the two neighbouring code entries
  uint64_t seed;         // Philox key
  uint64_t offset;       // Philox counter high word
};

struct DequantizeParams {
  const uint8_t* q;
  const float* absmax;
  const float* code;
  int bits;
  int64_t blocksize;
  int64_t numel;
  void* out;             // [numel] contiguous, dtype out_kind
  FloatKind out_kind;
};

void quantize_blockwise_cpu(const QuantizeParams& p);
void dequantize_blockwise_cpu(const DequantizeParams& p);
void quantize_blockwise_cuda(const QuantizeParams& p, cudaStream_t stream);
void dequantize_blockwise_cuda(const DequantizeParams& p, cudaStream_t stream);

}  // namespace lowrank::quant
