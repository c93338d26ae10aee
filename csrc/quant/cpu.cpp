// CPU kernels of the quant family: parallel over blocks (at::parallel_for), one pass to
// find the block's absmax and one to quantize it. The nearest-code search goes through a
// table over the float's top 16 bits, which narrows the midpoint search to the one or two
// candidates of that bucket; the answer is exactly count_less over all midpoints.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "quant/ops.h"
#include "quant/quant_math.h"

namespace lowrank::quant {
namespace {

// The division loops are compiled twice on x86-64 (target_clones: AVX2 and the baseline,
// picked at load time) so they run 8-wide where they can; the arithmetic is the same in
// both (IEEE division, integer ops), so results do not depend on the CPU. The table search
// stays scalar: AVX2 gathers measured slower than it on the AMD EPYC dev machines.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LOWRANK_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define LOWRANK_CPU_CLONES
#endif


// v[i] = normalize(x[i], absmax), with the block-constant branch hoisted.
LOWRANK_CPU_CLONES void normalize_span(const float* x, int n, float absmax, float* v) {  // may run in place
  if (absmax > 0.f) {
    for (int i = 0; i < n; ++i) v[i] = x[i] / absmax;
  } else {  // all-zero or non-finite block
    for (int i = 0; i < n; ++i) v[i] = 0.f;
  }
}

// key[i] = ordered_key(normalize(x[i], absmax)): the nearest search works on these keys.
LOWRANK_CPU_CLONES void normalized_keys(const float* __restrict x, int n, float absmax, uint32_t* __restrict key) {
  if (absmax > 0.f) {
    for (int i = 0; i < n; ++i) key[i] = ordered_key(x[i] / absmax);
  } else {
    for (int i = 0; i < n; ++i) key[i] = ordered_key(0.f);
  }
}

// count_less(mids, 0, n_mids, v) for v in [-1, 1], through a per-call table indexed by the
// top 16 bits of ordered_key(v) (sign, exponent and 7 mantissa bits: buckets 1/128 wide in
// relative terms). start[k] counts the midpoints below the first float of bucket k, so the
// answer for v in bucket k is start[k] + #{j < width : mids[start[k] + j] < v}, where width
// is the largest start[k+1] - start[k] (1 for the built-in codes). Counting with a fixed
// width and +inf padding keeps the loop free of data-dependent branches; candidates past
// start[k+1] are >= the next bucket's first float > v, so they never count.
// Comparisons run on ordered keys (integers): for floats that are not NaN, a < b exactly
// when ordered_key(a) < ordered_key(b), once a midpoint of -0 is stored as +0 (so that it
// compares equal to both zeros, as floats do). v is never NaN.
class NearestSearch {
 public:
  NearestSearch(const float* code, int code_size) {
    const int n_mids = code_size - 1;
    first_bucket_ = ordered_key(-1.0f) >> 16;
    const uint32_t last_bucket = ordered_key(1.0f) >> 16;
    std::vector<float> mids(n_mids);
    for (int j = 0; j < n_mids; ++j) mids[j] = code_midpoint(code, j) + 0.f;  // -0 + 0 = +0
    std::vector<uint32_t> start(last_bucket - first_bucket_ + 2);
    int j = 0;
    width_ = 0;
    for (uint32_t k = 0; k < start.size(); ++k) {
      const float first = key_to_float((first_bucket_ + k) << 16);
      while (j < n_mids && mids[j] < first) ++j;
      start[k] = static_cast<uint32_t>(j);
      if (k > 0) width_ = std::max<int>(width_, start[k] - start[k - 1]);
    }
    width_ = std::max(width_, 1);
    mid_keys_.assign(n_mids + width_, ordered_key(std::numeric_limits<float>::infinity()));
    for (int m = 0; m < n_mids; ++m) mid_keys_[m] = ordered_key(mids[m]);
    buckets_.resize(start.size());
    for (size_t k = 0; k < start.size(); ++k) buckets_[k] = Bucket{mid_keys_[start[k]], start[k]};
  }

  // idx[i] = count_less(mids, 0, n_mids, v[i]) for the ordered keys of v, branch-free.
  void indices(const uint32_t* __restrict key, int n, uint8_t* __restrict idx) const {
    const uint32_t first = first_bucket_;
    if (width_ == 1) {  // one candidate per bucket: one table load per value
      const Bucket* table = buckets_.data();
      for (int i = 0; i < n; ++i) {
        const Bucket b = table[(key[i] >> 16) - first];
        idx[i] = static_cast<uint8_t>(b.start + (b.mid_key < key[i] ? 1 : 0));
      }
    } else {
      for (int i = 0; i < n; ++i) {
        const uint32_t s = buckets_[(key[i] >> 16) - first].start;
        uint32_t count = s;
        for (int c = 0; c < width_; ++c) count += mid_keys_[s + c] < key[i];
        idx[i] = static_cast<uint8_t>(count);
      }
    }
  }

  static constexpr int kChunk = 256;

 private:
  struct Bucket {
    uint32_t mid_key;  // key of the bucket's first candidate midpoint (+inf if none)
    uint32_t start;    // midpoints below the bucket's first float
  };
  uint32_t first_bucket_;
  int width_;
  std::vector<Bucket> buckets_;
  std::vector<uint32_t> mid_keys_;  // padded with +inf keys to n_mids + width
};

// absmax_step over the block with eight independent lanes, so the compiler vectorizes it
// (the max of |x| does not depend on the order it is taken in).
template <typename T>
float block_absmax(const T* x, int64_t n) {
  constexpr int kLanes = 8;
  float amax[kLanes] = {};
  bool nonfinite[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) absmax_step(static_cast<float>(x[i + l]), amax[l], nonfinite[l]);
  for (; i < n; ++i) absmax_step(static_cast<float>(x[i]), amax[0], nonfinite[0]);
  for (int l = 1; l < kLanes; ++l) {
    amax[0] = amax[l] > amax[0] ? amax[l] : amax[0];
    nonfinite[0] |= nonfinite[l];
  }
  return finish_absmax(amax[0], nonfinite[0]);
}

// Fills idx[0..n) with the code indices of one block (first global element `base`),
// a chunk of NearestSearch::kChunk values at a time: normalize (vectorized), then search.
struct Rounder {
  const QuantizeParams& p;
  const NearestSearch& nearest;
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
      Philox4 r{};
      for (int i = 0; i < m; ++i) {  // base + c is a multiple of 4: one Philox call per 4 values
        const uint64_t g = static_cast<uint64_t>(base + c + i);
        if ((g & 3) == 0) r = philox_group(p.seed, p.offset, g >> 2);
        idx[c + i] = static_cast<uint8_t>(stochastic_index(p.code, code_size, v[i], uniform_from_bits(r.v[g & 3])));
      }
    }
  }
};

template <typename T>
void quantize_impl(const QuantizeParams& p) {
  const T* x = static_cast<const T*>(p.x);
  const int code_size = 1 << p.bits;
  const NearestSearch nearest(p.code, code_size);
  const Rounder round{p, nearest, code_size};
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
        uint8_t* qb = p.q + base / 2;
        for (int64_t i = 0; i < n / 2; ++i) qb[i] = static_cast<uint8_t>(idx[2 * i] | (idx[2 * i + 1] << 4));
        if (n & 1) qb[n / 2] = idx[n - 1];
      }
    }
  });
}

template <typename T>
void dequantize_impl(const DequantizeParams& p) {
  T* out = static_cast<T*>(p.out);
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
        for (int64_t i = 0; i < n; ++i) {
          const int nibble = (qb[i >> 1] >> ((i & 1) * 4)) & 0xF;
          ob[i] = static_cast<T>(dequantize_value(p.code, nibble, absmax));
        }
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
