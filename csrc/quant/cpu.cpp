// CPU kernels of the quant family: parallel over blocks (at::parallel_for), one pass to
// find the block's absmax and one to quantize it. The nearest-code search goes through a
// table over the float's top 16 bits, which narrows the midpoint search to the one or two
// candidates of that bucket; the answer is exactly count_less over all midpoints.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "quant/cpu_search.h"
#include "quant/ops.h"
#include "quant/quant_math.h"

namespace lowrank::quant {
namespace {

// Fills idx[0..n) with the code indices of one block (first global element `base`),
// a chunk of NearestSearch::kChunk values at a time: normalize (vectorized), then search.
struct Rounder {
  const QuantizeParams& p;
  const NearestSearch& nearest;
  const FloorSearch& floor;
  int code_size;

  template <typename T>
  void operator()(const T* x, int64_t n, int64_t base, float absmax, uint8_t* idx) const {
    constexpr int kChunk = NearestSearch::kChunk;
    float v[kChunk];
    uint32_t key[kChunk];
    for (int64_t c = 0; c < n; c += kChunk) {
      const int m = static_cast<int>(std::min<int64_t>(kChunk, n - c));
      const float* xf = v;
      if constexpr (std::is_same_v<T, float>) {
        xf = x + c;
      } else {
        for (int i = 0; i < m; ++i) v[i] = static_cast<float>(x[c + i]);
      }
      if (!p.stochastic) {
        normalized_keys(xf, m, absmax, key);
        nearest.indices(key, m, idx + c);
        continue;
      }
      normalize_span(xf, m, absmax, v);
      float u[kChunk];  // base + c is a multiple of 8: whole Philox groups
      philox_uniforms(p.seed, p.offset, static_cast<uint64_t>(base + c) >> 3, (m + kPhiloxGroup - 1) / kPhiloxGroup, u);
      floor.indices(v, u, m, idx + c);
    }
  }
};

template <typename T>
void quantize_impl(const QuantizeParams& p) {
  const T* x = static_cast<const T*>(p.x);
  const int code_size = 1 << p.bits;
  // a search table costs ~0.1 ms to build: only the one the rounding uses is built
  const NearestSearch nearest(p.code, p.stochastic ? 0 : code_size);
  const FloorSearch floor(p.code, p.stochastic ? code_size : 0);
  const Rounder round{p, nearest, floor, code_size};
  const int64_t grain = std::max<int64_t>(1, 32768 / p.blocksize);
  at::parallel_for(0, p.nblocks, grain, [&](int64_t b0, int64_t b1) {
    std::vector<uint8_t> idx(p.bits == 4 ? p.blocksize : 0);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t base = b * p.blocksize;
      const int64_t n = std::min(p.blocksize, p.numel - base);
      const float absmax = block_absmax(x + base, n);
      p.absmax[b] = absmax;
      if (p.bits == 8) {
        round(x + base, n, base, absmax, p.q + base);
      } else {  // two indices per byte, even element in the low nibble
        round(x + base, n, base, absmax, idx.data());
        pack_nibbles(idx.data(), n, p.q + base / 2);
      }
    }
  });
}

template <typename T>
void dequantize_impl(const DequantizeParams& p) {
  T* out = static_cast<T*>(p.out);
  [[maybe_unused]] const bool avx2 = table_search_avx2();  // 4-bit to fp32: dequantize_nibbles_avx2
  const int64_t nblocks = (p.numel + p.blocksize - 1) / p.blocksize;
  const int64_t grain = std::max<int64_t>(1, 32768 / p.blocksize);
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t base = b * p.blocksize;
      const int64_t n = std::min(p.blocksize, p.numel - base);
      const float absmax = p.absmax[b];
      T* ob = out + base;
      if (p.bits == 8) {
        const uint8_t* qb = p.q + base;
        for (int64_t i = 0; i < n; ++i) ob[i] = static_cast<T>(dequantize_value(p.code, qb[i], absmax));
      } else {
        const uint8_t* qb = p.q + base / 2;
        int64_t i = 0;
#ifdef LOWRANK_X86_AVX2_PATHS
        if constexpr (std::is_same_v<T, float>) {
          if (avx2) i = dequantize_nibbles_avx2(qb, n, p.code, absmax, ob);
        }
#endif
        for (; i + 1 < n; i += 2) {  // a byte holds two values
          const uint8_t byte = qb[i >> 1];
          ob[i] = static_cast<T>(dequantize_value(p.code, byte & 0xF, absmax));
          ob[i + 1] = static_cast<T>(dequantize_value(p.code, byte >> 4, absmax));
        }
        if (n & 1) ob[n - 1] = static_cast<T>(dequantize_value(p.code, qb[(n - 1) >> 1] & 0xF, absmax));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cpu_op(const at::Tensor& x, const at::Tensor& code,
                                                             int64_t blocksize, int64_t bits,
                                                             bool stochastic_rounding, int64_t seed, int64_t offset) {
  PreparedQuantize prep = prepare_quantize(x, code, blocksize, bits, stochastic_rounding, seed, offset);
  quantize_blockwise_cpu(prep.params);
  return {prep.q, prep.absmax};
}

at::Tensor dequantize_blockwise_cpu_op(const at::Tensor& q, const at::Tensor& absmax, const at::Tensor& code,
                                       int64_t blocksize, int64_t bits, c10::SymIntArrayRef shape,
                                       at::ScalarType dtype) {
  PreparedDequantize prep = prepare_dequantize(q, absmax, code, blocksize, bits, shape, dtype);
  dequantize_blockwise_cpu(prep.params);
  return prep.out;
}

}  // namespace

void quantize_blockwise_cpu(const QuantizeParams& p) {
  LOWRANK_DISPATCH_FLOAT(p.x_kind, T, [&] { quantize_impl<T>(p); });
}

void dequantize_blockwise_cpu(const DequantizeParams& p) {
  LOWRANK_DISPATCH_FLOAT(p.out_kind, T, [&] { dequantize_impl<T>(p); });
}

TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  m.impl("quantize_blockwise", TORCH_FN(quantize_blockwise_cpu_op));
  m.impl("dequantize_blockwise", TORCH_FN(dequantize_blockwise_cpu_op));
}

}  // namespace lowrank::quant
