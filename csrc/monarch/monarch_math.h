#pragma once
// Index maps of the Monarch product y = P L P R x (Dao et al.; the layout of HazyResearch's
// blockdiag_butterfly_multiply, so its checkpoints load as they are):
//   stage 1 (R = blockdiag(w1)): block k reads x[k*in_bs + p] and writes h[k*mid + q];
//   stage 2 (L = blockdiag(w2)): block l reads h[r*nblocks + l] and writes y[s*nblocks + l].
// P, the [b, k] <-> [k, b] reshape-transpose, is the "r*nblocks + l" of stage 2: each kernel
// applies it through its index arithmetic (strides), never as a permuted copy in memory.
#include <cstdint>

#include "common/host_device.h"

namespace lowrank::monarch {

// Position of element `elem` of stage-2 block `block` in the interleaved vector (h or y).
LOWRANK_HD int64_t interleaved_index(int64_t block, int64_t elem, int64_t nblocks) {
  return elem * nblocks + block;
}

// Position of element `elem` of block `block` in a block-contiguous vector (x, or h in stage 1).
LOWRANK_HD int64_t contiguous_index(int64_t block, int64_t elem, int64_t block_size) {
  return block * block_size + elem;
}

}  // namespace lowrank::monarch
