#pragma once
// CPU building blocks of block-wise quantization, shared by the quant kernels and the
// fused optimizer steps (csrc/optim/cpu.cpp): the block absmax, normalisation to ordered
// keys, and the nearest-code search. CPU only (host compiler); CUDA uses quant_math.h.
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#endif

#include "common/cpu_clones.h"
#include "common/philox_cpu.h"
#include "quant/quant_math.h"

namespace lowrank::quant {

// The division loops are LOWRANK_CPU_CLONES (AVX2 and baseline; same arithmetic in both:
// IEEE division, integer ops). The table lookups have hand-written AVX2 paths that load a
// table entry's two 32-bit words with one 64-bit load per element (gather_pairs8): on the
// Zen 3 dev machines the AVX2 gather instruction measured slower than scalar loads, and the
// compiler's own vectorization of the lookups spends two uops per word on inserts. Each
// search runs as separate passes over a chunk (keys, counts, decisions), not one long
// dependent chain per element, so that out-of-order execution overlaps the table loads:
// with the AVX2 paths, the 8-bit AdamW step of 50M params runs ~1.4x faster (interleaved
// A/B, bits identical). Same integer and IEEE operations on every path.


// v[i] = normalize(x[i], absmax), with the block-constant branch hoisted.
static LOWRANK_CPU_CLONES void normalize_span(const float* x, int n, float absmax, float* v) {  // may run in place
  if (absmax > 0.f) {
    for (int i = 0; i < n; ++i) v[i] = x[i] / absmax;
  } else {  // all-zero or non-finite block
    for (int i = 0; i < n; ++i) v[i] = 0.f;
  }
}

// key[i] = ordered_key(normalize(x[i], absmax)): the nearest search works on these keys.
static LOWRANK_CPU_CLONES void normalized_keys(const float* __restrict x, int n, float absmax,
                                               uint32_t* __restrict key) {
  if (absmax > 0.f) {
    for (int i = 0; i < n; ++i) key[i] = ordered_key(x[i] / absmax);
  } else {
    for (int i = 0; i < n; ++i) key[i] = ordered_key(0.f);
  }
}

// Whether the table searches take their hand-written AVX2 paths: where the CPU has AVX2,
// unless LOWRANK_CPU_TABLE_SEARCH=portable (read when a search is built, once per op call;
// the tests run both paths against the reference, bit for bit).
inline bool table_search_avx2() {
  const char* env = std::getenv("LOWRANK_CPU_TABLE_SEARCH");
  const bool portable = env != nullptr && std::strcmp(env, "portable") == 0;
  TORCH_CHECK(env == nullptr || portable || std::strcmp(env, "avx2") == 0,
              "LOWRANK_CPU_TABLE_SEARCH must be 'avx2' or 'portable', got '", env, "'");
#ifdef LOWRANK_X86_AVX2_PATHS
  return !portable && cpu_has_avx2();
#else
  return false;
#endif
}

#ifdef LOWRANK_X86_AVX2_PATHS
// The 8-byte entries q & 0xffffffff and q >> 32 of table, in one register (low, high half).
// A function of its own, not a lambda: a lambda would not inherit target("avx2").
__attribute__((always_inline, target("avx2"))) inline __m128i load_entry_pair(const char* table, uint64_t q) {
  const char* e0 = table + 8 * (q & 0xffffffffu);
  const char* e1 = table + 8 * (q >> 32);
  const __m128d lo = _mm_castsi128_pd(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(e0)));
  return _mm_castpd_si128(_mm_loadh_pd(lo, reinterpret_cast<const double*>(e1)));  // movhpd: bits, not a double
}

// first[k], second[k] = the two 32-bit words of the 8-byte entry table[index[k]] (index >= 0).
__attribute__((always_inline, target("avx2"))) inline void gather_pairs8(const char* table, __m256i index,
                                                                      __m256i& first, __m256i& second) {
  // the indices leave the vector two per 64-bit move (fewer uops than an extract each)
  const __m128i lo4 = _mm256_castsi256_si128(index), hi4 = _mm256_extracti128_si256(index, 1);
  const uint64_t q0 = static_cast<uint64_t>(_mm_cvtsi128_si64(lo4));
  const uint64_t q1 = static_cast<uint64_t>(_mm_extract_epi64(lo4, 1));
  const uint64_t q2 = static_cast<uint64_t>(_mm_cvtsi128_si64(hi4));
  const uint64_t q3 = static_cast<uint64_t>(_mm_extract_epi64(hi4, 1));
  // a: entries 0 1 | 4 5, b: entries 2 3 | 6 7; shuffle_ps picks per 128-bit lane
  const __m256 a = _mm256_castsi256_ps(
      _mm256_inserti128_si256(_mm256_castsi128_si256(load_entry_pair(table, q0)), load_entry_pair(table, q2), 1));
  const __m256 b = _mm256_castsi256_ps(
      _mm256_inserti128_si256(_mm256_castsi128_si256(load_entry_pair(table, q1)), load_entry_pair(table, q3), 1));
  first = _mm256_castps_si256(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0)));
  second = _mm256_castps_si256(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
}

// 4-bit dequantize, out[i] = code[nibble i] * absmax for the first n / 8 * 8 values of a
// block whose element 0 is the low nibble of qb[0] (returns how many were done): the
// 16-entry code sits in two registers, and code[nibble] is two in-register permutes (vpermps,
// low 3 bits) and a blend on the nibble's bit 3, not a table load per value. The same
// product as dequantize_value. Used by the dequantize op and the fused 4-bit AdamW step
// (step of 50M params ~8% faster, interleaved).
__attribute__((target("avx2"))) inline int64_t dequantize_nibbles_avx2(const uint8_t* __restrict qb, int64_t n,
                                                                      const float* __restrict code, float absmax,
                                                                      float* __restrict out) {
  const __m256 low_entries = _mm256_loadu_ps(code), high_entries = _mm256_loadu_ps(code + 8);
  const __m256 scale = _mm256_set1_ps(absmax);
  const __m128i nibble = _mm_set1_epi8(0x0F);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {  // four bytes, eight values
    int32_t word;
    std::memcpy(&word, qb + i / 2, sizeof(word));
    const __m128i bytes = _mm_cvtsi32_si128(word);
    const __m128i nibbles = _mm_unpacklo_epi8(_mm_and_si128(bytes, nibble),  // element order: low, high
                                              _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble));
    const __m256i index = _mm256_cvtepu8_epi32(nibbles);
    const __m256 entry = _mm256_blendv_ps(_mm256_permutevar8x32_ps(low_entries, index),
                                          _mm256_permutevar8x32_ps(high_entries, index),
                                          _mm256_castsi256_ps(_mm256_slli_epi32(index, 28)));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(entry, scale));
  }
  return i;
}

// Eight int32 values stored as eight bytes, saturated to [0, 255].
__attribute__((always_inline, target("avx2"))) inline void store_bytes8(__m256i v, uint8_t* out) {
  const __m128i v16 = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm_packus_epi16(v16, v16));
}
#endif

// Counts #{j : a[j] < key} over a sorted array of ordered keys, for the keys of v in
// [-1, 1], through a per-call table indexed by the top 16 bits of the key (sign, exponent
// and 7 mantissa bits: buckets 1/128 wide in relative terms). start[k] counts the entries
// below the first key of bucket k, so the answer for a key in bucket k is start[k] +
// #{j < width : a[start[k] + j] < key}, where width is the largest start[k+1] - start[k]
// (1 for the built-in codes). Counting with a fixed width and +inf padding keeps the loop
// free of data-dependent branches; candidates past start[k+1] are >= the next bucket's
// first key > key, so they never count.
// Precondition of every count (both paths index the table without a range check): the key
// comes from a finite v in [-1, 1] (+1 for the floor search), which normalize() guarantees
// (|x| <= absmax; v = 0 for a zero or non-finite absmax).
// Keys are integers: for floats that are not NaN, a < b exactly when ordered_key(a) <
// ordered_key(b), except that -0 and +0 are equal as floats and not as keys; callers
// store a zero entry as the key that makes their comparison agree with floats.
class KeyCounter {
 public:
  KeyCounter() = default;
  explicit KeyCounter(std::vector<uint32_t> keys) {
    const int n = static_cast<int>(keys.size());
    first_bucket_ = ordered_key(-1.0f) >> 16;
    const uint32_t last_bucket = (ordered_key(1.0f) + 1) >> 16;  // +1: queries for "<=" add one
    std::vector<uint32_t> start(last_bucket - first_bucket_ + 2);
    int j = 0;
    width_ = 0;
    for (uint32_t k = 0; k < start.size(); ++k) {
      const uint32_t first = (first_bucket_ + k) << 16;
      while (j < n && keys[j] < first) ++j;
      start[k] = static_cast<uint32_t>(j);
      if (k > 0) width_ = std::max<int>(width_, start[k] - start[k - 1]);
    }
    width_ = std::max(width_, 1);
    keys_ = std::move(keys);
    keys_.resize(n + width_, 0xffffffffu);  // padding: never below a query key
    avx2_ = table_search_avx2();
    buckets_.resize(start.size());
    for (size_t k = 0; k < start.size(); ++k) buckets_[k] = Bucket{keys_[start[k]], start[k]};
  }

  bool avx2() const { return avx2_; }

  uint32_t count(uint32_t key) const {
    const uint32_t s = buckets_[(key >> 16) - first_bucket_].start;
    uint32_t c = s;
    for (int w = 0; w < width_; ++w) c += keys_[s + w] < key;
    return c;
  }

  // out[i] = count(key[i]); Out is int32_t (a count can reach 256) or uint8_t (the nearest
  // search: at most 255 midpoints). One table load per value when width is 1.
  template <typename Out>
  void counts(const uint32_t* __restrict key, int n, Out* __restrict out) const {
#ifdef LOWRANK_X86_AVX2_PATHS
    if (width_ == 1 && avx2_) return counts_width1_avx2(key, n, out);
#endif
    const uint32_t first = first_bucket_;
    if (width_ == 1) {
      const Bucket* table = buckets_.data();
      for (int i = 0; i < n; ++i) {
        const Bucket b = table[(key[i] >> 16) - first];
        out[i] = static_cast<Out>(b.start + (b.key < key[i] ? 1 : 0));
      }
    } else {
      for (int i = 0; i < n; ++i) out[i] = static_cast<Out>(count(key[i]));
    }
  }

 private:
  struct Bucket {
    uint32_t key;    // the bucket's first candidate key (padding if none)
    uint32_t start;  // entries below the bucket's first key
  };
  static_assert(sizeof(Bucket) == 8, "gather_pairs8 loads a bucket as one 8-byte entry");

#ifdef LOWRANK_X86_AVX2_PATHS
  // counts for width 1, eight keys at a time: start + (bucket key < key), the unsigned
  // compare done as a signed one on sign-flipped words. Out is int32_t or uint8_t.
  template <typename Out>
  __attribute__((target("avx2"))) void counts_width1_avx2(const uint32_t* __restrict key, int n,
                                                          Out* __restrict out) const {
    const char* table = reinterpret_cast<const char*>(buckets_.data());
    const __m256i first = _mm256_set1_epi32(static_cast<int>(first_bucket_));
    const __m256i flip = _mm256_set1_epi32(INT32_MIN);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256i k = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(key + i));
      __m256i bucket_key, bucket_start;
      gather_pairs8(table, _mm256_sub_epi32(_mm256_srli_epi32(k, 16), first), bucket_key, bucket_start);
      const __m256i below = _mm256_cmpgt_epi32(_mm256_xor_si256(k, flip), _mm256_xor_si256(bucket_key, flip));
      const __m256i c = _mm256_sub_epi32(bucket_start, below);  // below is -1 where true
      if constexpr (std::is_same_v<Out, int32_t>) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), c);
      } else {
        store_bytes8(c, out + i);
      }
    }
    for (; i < n; ++i) out[i] = static_cast<Out>(count(key[i]));
  }
#endif
  uint32_t first_bucket_ = 0;
  int width_ = 0;
  bool avx2_ = false;
  std::vector<Bucket> buckets_;
  std::vector<uint32_t> keys_;  // padded to n + width
};

// Nearest rounding: count_less over the code's midpoints. A midpoint of -0 is stored as +0,
// so that it is below neither zero, as for floats.
class NearestSearch {
 public:
  // code_size 0 builds an empty search (for callers that will not use it).
  NearestSearch(const float* code, int code_size) {
    if (code_size == 0) return;
    std::vector<uint32_t> keys(code_size - 1);
    for (int j = 0; j + 1 < code_size; ++j) keys[j] = ordered_key(code_midpoint(code, j) + 0.f);  // -0 + 0 = +0
    counter_ = KeyCounter(std::move(keys));
  }

  // idx[i] = count_less(mids, 0, n_mids, v[i]) for the ordered keys of v.
  void indices(const uint32_t* __restrict key, int n, uint8_t* __restrict idx) const { counter_.counts(key, n, idx); }

  static constexpr int kChunk = 256;

 private:
  KeyCounter counter_;
};

// Stochastic rounding: the largest i with code[i] <= v, as count(code <= v) - 1 =
// count(code < key + 1) - 1 on integer keys. A zero entry is stored as the key of -0, so
// that it is <= both zeros, as for floats.
class FloorSearch {
 public:
  FloorSearch(const float* code, int code_size) {
    if (code_size == 0) return;
    std::vector<uint32_t> keys(code_size);
    for (int j = 0; j < code_size; ++j) keys[j] = code[j] == 0.f ? ordered_key(-0.f) : ordered_key(code[j]);
    counter_ = KeyCounter(std::move(keys));
    // per count c of code entries <= v (0 .. code_size), the interval it rounds in: code[c-1]
    // and code[c] - code[c-1] (what stochastic_index subtracts, done once here). Outside
    // [1, code_size - 1] there is no interval: lo = +inf makes "u * gap < v - lo" false for
    // every finite v, so the value stays at the clamped index.
    const int last = code_size - 1;
    lo_gap_.resize(2 * (code_size + 1));
    for (int c = 0; c <= code_size; ++c) {
      const bool interval = c >= 1 && c <= last;
      lo_gap_[2 * c] = interval ? code[c - 1] : std::numeric_limits<float>::infinity();
      lo_gap_[2 * c + 1] = interval ? code[c] - code[c - 1] : 0.f;
    }
  }

  // idx[i] = stochastic_index(code, code_size, v[i], u[i]) for a span of at most kChunk
  // finite values: the keys, then the counts (table), then the decisions (one table load,
  // branch-free). The index is c - 1 clamped to [0, code_size - 1], plus one when rounding up.
  void indices(const float* __restrict v, const float* __restrict u, int n, uint8_t* __restrict idx) const {
    uint32_t key[kChunk];
    int32_t count[kChunk];
    for (int i = 0; i < n; ++i) key[i] = ordered_key(v[i]) + 1;
    counter_.counts(key, n, count);
    int i = 0;
#ifdef LOWRANK_X86_AVX2_PATHS
    if (counter_.avx2()) i = decisions_avx2(v, u, count, n, idx);
#endif
    for (; i < n; ++i) {
      const int32_t c = count[i];
      const float lo = lo_gap_[2 * c], gap = lo_gap_[2 * c + 1];
      const int32_t up = u[i] * gap < v[i] - lo;  // round_up() of quant_math.h
      idx[i] = static_cast<uint8_t>(c - 1 + (c == 0) + up);
    }
  }

  static constexpr int kChunk = 256;

 private:
#ifdef LOWRANK_X86_AVX2_PATHS
  // The decisions of the first n / 8 * 8 values; returns how many were done.
  __attribute__((target("avx2"))) int decisions_avx2(const float* __restrict v, const float* __restrict u,
                                                     const int32_t* __restrict count, int n,
                                                     uint8_t* __restrict idx) const {
    const char* table = reinterpret_cast<const char*>(lo_gap_.data());
    const __m256i one = _mm256_set1_epi32(1);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(count + i));
      __m256i lo, gap;
      gather_pairs8(table, c, lo, gap);
      const __m256 up = _mm256_cmp_ps(_mm256_mul_ps(_mm256_loadu_ps(u + i), _mm256_castsi256_ps(gap)),
                                      _mm256_sub_ps(_mm256_loadu_ps(v + i), _mm256_castsi256_ps(lo)), _CMP_LT_OQ);
      // c - 1 + up (up is -1 where true); c = 0 gives -1 (never rounded up), which the
      // saturating pack of store_bytes8 clamps to 0
      store_bytes8(_mm256_sub_epi32(_mm256_sub_epi32(c, one), _mm256_castps_si256(up)), idx + i);
    }
    return i;
  }
#endif

  KeyCounter counter_;
  std::vector<float> lo_gap_;  // [code_size + 1][2]: (lo, gap) per count
};

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// block_absmax for fp32 in AVX2: max_ps(a, m) is a > m ? a : m, absmax_step's rule; the
// non-finite flag is a compare that is true for inf and NaN. Same result as the scalar loop
// (a max does not depend on order), ~9x faster on the dev machines' in-cache blocks.
__attribute__((target("avx2"))) inline float block_absmax_f32_avx2(const float* x, int64_t n) {
  const __m256 sign = _mm256_set1_ps(-0.0f), largest = _mm256_set1_ps(3.402823466e+38f);
  __m256 m0 = _mm256_setzero_ps(), m1 = m0, bad = m0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 a = _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i));
    const __m256 b = _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i + 8));
    m0 = _mm256_max_ps(a, m0);
    m1 = _mm256_max_ps(b, m1);
    bad = _mm256_or_ps(bad, _mm256_or_ps(_mm256_cmp_ps(a, largest, _CMP_NLE_UQ),
                                         _mm256_cmp_ps(b, largest, _CMP_NLE_UQ)));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_max_ps(m0, m1));
  float amax = 0.f;
  bool nonfinite = _mm256_movemask_ps(bad) != 0;
  for (float v : lanes) amax = v > amax ? v : amax;
  for (; i < n; ++i) absmax_step(x[i], amax, nonfinite);
  return finish_absmax(amax, nonfinite);
}
#endif

// absmax_step over the block with eight independent lanes, so the compiler vectorizes it
// (the max of |x| does not depend on the order it is taken in); fp32 blocks take the AVX2
// version where the CPU has it.
template <typename T>
float block_absmax(const T* x, int64_t n) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  if constexpr (std::is_same_v<T, float>) {
    if (cpu_has_avx2()) return block_absmax_f32_avx2(x, n);
  }
#endif
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
static LOWRANK_CPU_CLONES float quantize_span_nearest(const float* vals, int64_t n, const NearestSearch& nearest, uint8_t* idx) {
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
static LOWRANK_CPU_CLONES float quantize_span_stochastic(const float* vals, int64_t n, const FloorSearch& floor, uint64_t seed,
                                      uint64_t offset, int64_t base, uint8_t* idx) {
  const float absmax = block_absmax(vals, n);
  constexpr int kChunk = FloorSearch::kChunk;
  float v[kChunk], u[kChunk];
  for (int64_t c = 0; c < n; c += kChunk) {  // base + c is a multiple of 8: whole Philox groups
    const int m = static_cast<int>(std::min<int64_t>(kChunk, n - c));
    normalize_span(vals + c, m, absmax, v);
    philox_uniforms(seed, offset, static_cast<uint64_t>(base + c) >> 3, (m + kPhiloxGroup - 1) / kPhiloxGroup, u);
    floor.indices(v, u, m, idx + c);
  }
  return absmax;
}

// The same two quantizations with a divisor per value instead of a block absmax (rank-1
// normalised moments, csrc/optim/cpu.cpp): v = x / scale, 0 where the scale is not > 0 (zero
// or NaN), as normalize() does per block. Writes n indices. The division is unconditional (a
// discarded lane may divide by 0: no trap, the flags are not read) and the discarded lanes are
// masked to +0 with a bitwise and: GCC turned a select into a branch per value and a scalar
// division (~4x slower).
LOWRANK_HD float positive_scale_quotient(float x, float scale) {
  const uint32_t keep = 0u - static_cast<uint32_t>(scale > 0.f);
  return bits_as_float(float_as_bits(x / scale) & keep);
}

static LOWRANK_CPU_CLONES void normalized_keys_scaled(const float* __restrict x, const float* __restrict scale, int n,
                                                      uint32_t* __restrict key) {
  for (int i = 0; i < n; ++i) key[i] = ordered_key(positive_scale_quotient(x[i], scale[i]));
}

static LOWRANK_CPU_CLONES void normalize_span_scaled(const float* __restrict x, const float* __restrict scale, int n,
                                                     float* __restrict v) {
  for (int i = 0; i < n; ++i) v[i] = positive_scale_quotient(x[i], scale[i]);
}

static void quantize_span_nearest_scaled(const float* vals, const float* scale, int64_t n,
                                         const NearestSearch& nearest, uint8_t* idx) {
  uint32_t key[NearestSearch::kChunk];
  for (int64_t c = 0; c < n; c += NearestSearch::kChunk) {
    const int m = static_cast<int>(std::min<int64_t>(NearestSearch::kChunk, n - c));
    normalized_keys_scaled(vals + c, scale + c, m, key);
    nearest.indices(key, m, idx + c);
  }
}

// Element i of the span is element base + i of its tensor (base a multiple of 8: whole Philox groups).
static void quantize_span_stochastic_scaled(const float* vals, const float* scale, int64_t n, const FloorSearch& floor,
                                            uint64_t seed, uint64_t offset, int64_t base, uint8_t* idx) {
  constexpr int kChunk = FloorSearch::kChunk;
  float v[kChunk], u[kChunk];
  for (int64_t c = 0; c < n; c += kChunk) {
    const int m = static_cast<int>(std::min<int64_t>(kChunk, n - c));
    normalize_span_scaled(vals + c, scale + c, m, v);
    philox_uniforms(seed, offset, static_cast<uint64_t>(base + c) >> 3, (m + kPhiloxGroup - 1) / kPhiloxGroup, u);
    floor.indices(v, u, m, idx + c);
  }
}

// Packs n 4-bit indices two per byte (even element in the low nibble; a last odd one
// alone in its byte).
// Written as a loop over output bytes, which GCC vectorizes (stride-2 loads): 4-bit AdamW step
// of 50M params 136 -> 124 ms against the scalar byte-pair loop (interleaved).
static LOWRANK_CPU_CLONES void pack_nibbles(const uint8_t* __restrict idx, int64_t n, uint8_t* __restrict out) {
  const int64_t pairs = n / 2;
  for (int64_t j = 0; j < pairs; ++j) out[j] = static_cast<uint8_t>(idx[2 * j] | (idx[2 * j + 1] << 4));
  if (n & 1) out[pairs] = idx[n - 1];
}

}  // namespace lowrank::quant
