#pragma once
// CPU building blocks of block-wise quantization, shared by the quant kernels and the
// fused optimizer steps (csrc/optim/cpu.cpp): the block absmax, normalisation to ordered
// keys, and the nearest-code search. CPU only (host compiler); CUDA uses quant_math.h.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "quant/quant_math.h"

namespace lowrank::quant {

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
static LOWRANK_CPU_CLONES void normalize_span(const float* x, int n, float absmax, float* v) {  // may run in place
  if (absmax > 0.f) {
    for (int i = 0; i < n; ++i) v[i] = x[i] / absmax;
  } else {  // all-zero or non-finite block
    for (int i = 0; i < n; ++i) v[i] = 0.f;
  }
}

// key[i] = ordered_key(normalize(x[i], absmax)): the nearest search works on these keys.
static LOWRANK_CPU_CLONES void normalized_keys(const float* __restrict x, int n, float absmax, uint32_t* __restrict key) {
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
  // code_size 0 builds an empty search (for callers that will not use it).
  NearestSearch(const float* code, int code_size) {
    if (code_size == 0) return;
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
  uint32_t first_bucket_ = 0;
  int width_ = 0;
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

// Quantizes vals[0..n) (already in fp32) of one block with the nearest code entry:
// absmax first, then keys, then the search. Writes the absmax and n indices.
inline float quantize_span_nearest(const float* vals, int64_t n, const NearestSearch& nearest, uint8_t* idx) {
  const float absmax = block_absmax(vals, n);
  uint32_t key[NearestSearch::kChunk];
  for (int64_t c = 0; c < n; c += NearestSearch::kChunk) {
    const int m = static_cast<int>(std::min<int64_t>(NearestSearch::kChunk, n - c));
    normalized_keys(vals + c, m, absmax, key);
    nearest.indices(key, m, idx + c);
  }
  return absmax;
}

// The same with stochastic rounding: element i of the span is global element base + i of
// its tensor, drawing from the Philox stream (seed, offset).
inline float quantize_span_stochastic(const float* vals, int64_t n, const float* code, int code_size, uint64_t seed,
                                      uint64_t offset, int64_t base, uint8_t* idx) {
  const float absmax = block_absmax(vals, n);
  Philox4 r{};
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t e = static_cast<uint64_t>(base + i);
    if (i == 0 || (e & 3) == 0) r = philox_group(seed, offset, e >> 2);
    idx[i] = static_cast<uint8_t>(stochastic_index(code, code_size, normalize(vals[i], absmax), uniform_from_bits(r.v[e & 3])));
  }
  return absmax;
}

// Packs n 4-bit indices two per byte (even element in the low nibble; a last odd one
// alone in its byte).
inline void pack_nibbles(const uint8_t* idx, int64_t n, uint8_t* out) {
  for (int64_t i = 0; i + 1 < n; i += 2) out[i / 2] = static_cast<uint8_t>(idx[i] | (idx[i + 1] << 4));
  if (n & 1) out[n / 2] = idx[n - 1];
}

}  // namespace lowrank::quant
