// CPU kernels of the optim family: one pass per superblock (max of the two moments'
// blocksizes): dequantize both moments, update param and moments in fp32
// (optim_math.h), write the param, then re-quantize each moment's blocks with a fresh
// absmax. Work is flattened over all superblocks of all tensors, so one parallel region
// serves a whole parameter list, large and small tensors alike.
// Rank-1 steps (second moment normalised by min(row max, column max), Li et al. 2023) first
// run a statistics pass: the new maxima are needed before any entry is re-quantized, so the
// second moment's update is computed twice (bit-identical: the same operations).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <vector>

#include "optim/ops.h"
#include "optim/optim_math.h"
#include "quant/cpu_search.h"
#include "quant/quant_math.h"

namespace lowrank::optim {
namespace {

using quant::NearestSearch;

template <typename P>
P store_param(float value, const AdamWStepParams& p, int64_t tensor_index, int64_t element) {
  if constexpr (std::is_same_v<P, c10::BFloat16>) {
    if (p.stochastic_rounding) {
      const Philox4 r = philox_group(p.seed, stream_offset(tensor_index, kParamStream),
                                     static_cast<uint64_t>(element) >> 3);
      return c10::BFloat16(bf16_bits_stochastic(value, random16(r, element)), c10::BFloat16::from_bits());
    }
  }
  return static_cast<P>(value);
}

struct Scratch {
  std::vector<float> param, grad, exp_avg, exp_avg_sq, scale;
  std::vector<uint8_t> idx;
  explicit Scratch(int64_t n) : param(n), grad(n), exp_avg(n), exp_avg_sq(n), scale(n), idx(n) {}
};

// adamw_update over fp32 arrays, in place (p, m, v). Compiled twice on x86-64 (AVX2 and the
// baseline, picked at load time) so it runs 8-wide: same IEEE operations in either (AVX2
// without FMA), so results do not depend on the CPU. Needs -fno-math-errno to vectorize sqrt.
// quantized_v: v is about to be re-quantized, so it is written as storable_exp_avg_sq stores it.
LOWRANK_CPU_CLONES void adamw_update_span(float* __restrict p, const float* __restrict g, float* __restrict m,
                                          float* __restrict v, int n, const AdamWConstants c, bool quantized_v) {
  for (int i = 0; i < n; ++i) {
    const AdamWResult r = adamw_update(p[i], g[i], m[i], v[i], c);
    p[i] = r.param;
    m[i] = r.exp_avg;
    v[i] = quantized_v ? storable_exp_avg_sq(r.exp_avg_sq) : r.exp_avg_sq;
  }
}

// out[i] = code[index of element first + i] * absmax (quant_math.h's dequantize_value), for
// the n elements of one chunk, which lies in one block. 8-bit: a loop the compiler
// vectorizes (a table load per value); 4-bit: quant::dequantize_nibbles_avx2 where `avx2`
// (the table searches' choice, LOWRANK_CPU_TABLE_SEARCH), else a byte (two nibbles) at a time. A 4-bit
// chunk starts at an even element (blocksizes are even), so element first + i is nibble
// i & 1 of byte i / 2.
LOWRANK_CPU_CLONES void dequantize_span(const uint8_t* __restrict q, int64_t first, int n, int bits,
                                        const float* __restrict code, float absmax, bool avx2,
                                        float* __restrict out) {
  if (bits == 8) {
    const uint8_t* qb = q + first;
    for (int i = 0; i < n; ++i) out[i] = code[qb[i]] * absmax;
  } else {
    const uint8_t* qb = q + first / 2;
    int done = 0;
#ifdef LOWRANK_X86_AVX2_PATHS
    if (avx2) done = static_cast<int>(quant::dequantize_nibbles_avx2(qb, n, code, absmax, out));
#endif
    const int pairs = n / 2;
    for (int j = done / 2; j < pairs; ++j) {  // a byte at a time: both nibbles
      out[2 * j] = code[qb[j] & 0xF] * absmax;
      out[2 * j + 1] = code[qb[j] >> 4] * absmax;
    }
    if (n & 1) out[n - 1] = code[qb[pairs] & 0xF] * absmax;
  }
}

// scale[k] = rank1_scale(row[i], col[j]) (optim_math.h; Li et al. 2023: it bounds |v_ij|) of
// elements first .. first + n - 1 of a row-major [rows, cols] tensor; one run per row the span
// crosses (the row's value is invariant in a run: the rule vectorizes as a compare and blends).
LOWRANK_CPU_CLONES void rank1_scales(const float* __restrict row, const float* __restrict col, int64_t cols,
                                     int64_t first, int n, float* __restrict scale) {
  int64_t i = first / cols, j = first % cols;
  for (int k = 0; k < n; ++i, j = 0) {
    const int len = static_cast<int>(std::min<int64_t>(n - k, cols - j));
    const float r = row[i];
    for (int t = 0; t < len; ++t) scale[k + t] = rank1_scale(r, col[j + t]);
    k += len;
  }
}

// v[k] = adamw_update's second moment as the state stores it, in place, for the statistics pass.
LOWRANK_CPU_CLONES void second_moment_span(float* __restrict v, const float* __restrict g, int n,
                                           const AdamWConstants c) {
  for (int k = 0; k < n; ++k) v[k] = storable_exp_avg_sq(second_moment_update(v[k], g[k], c));
}

// col_max[k] = nan_sticky_absmax(col_max[k], v[k]): independent lanes, vectorized.
LOWRANK_CPU_CLONES void column_maxima(float* __restrict col_max, const float* __restrict v, int n) {
  for (int k = 0; k < n; ++k) col_max[k] = nan_sticky_absmax(col_max[k], v[k]);
}

LOWRANK_CPU_CLONES void scale_span(float* __restrict out, const float* __restrict scale, int n) {
  for (int t = 0; t < n; ++t) out[t] = out[t] * scale[t];
}

// The rank-1 second moment of elements first .. first + n - 1 (any start; 4-bit codes too):
// out[k] = code[index] * scale[k], dequantize_value's product with the per-element scale.
void dequantize_rank1_span(const uint8_t* q, int64_t first, int n, int bits, const float* code, bool avx2,
                           const float* scale, float* out) {
  int k = 0;
  if (bits == 4 && (first & 1) && n > 0) {  // an odd start: the high nibble alone
    out[0] = code[quant::code_index(q, first, bits)];
    k = 1;
  }
  dequantize_span(q, first + k, n - k, bits, code, 1.0f, avx2, out + k);  // code[i] * 1 = code[i]
  scale_span(out, scale, n);
}

// How one moment is re-quantized: its code, blocks, rounding and random stream.
struct MomentCoding {
  int64_t blocksize;
  const NearestSearch* search;  // nearest rounding
  const quant::FloorSearch* floor;  // stochastic rounding
  bool stochastic;
  uint64_t seed, offset;        // stochastic rounding
};

// Re-quantizes vals[0..n) (elements base.. of the tensor) in blocks of mc.blocksize.
void requantize(const float* vals, int64_t n, int64_t base, int bits, const MomentCoding& mc, uint8_t* q,
                float* absmax, uint8_t* idx) {
  for (int64_t off = 0; off < n; off += mc.blocksize) {
    const int64_t len = std::min(mc.blocksize, n - off);
    absmax[(base + off) / mc.blocksize] =
        mc.stochastic ? quant::quantize_span_stochastic(vals + off, len, *mc.floor, mc.seed, mc.offset, base + off,
                                                         idx + off)
                      : quant::quantize_span_nearest(vals + off, len, *mc.search, idx + off);
  }
  if (bits == 8) {
    std::memcpy(q + base, idx, n);
  } else {
    quant::pack_nibbles(idx, n, q + base / 2);
  }
}

struct Searches {
  NearestSearch nearest_m, nearest_v;
  quant::FloorSearch floor_m, floor_v;
  bool avx2;  // quant::table_search_avx2(): the 4-bit dequantize follows the searches' choice
};

// A rank-1 step's new second-moment statistics, per tensor (the old ones stay in the slots
// until every entry is re-quantized: the dequantization reads them).
struct Rank1Stats {
  std::vector<std::vector<float>> row, col;
};

// Superblock sb of tensor t: its first element, length, and param/grad pointers there.
template <typename P, typename G>
struct Superblock {
  const TensorSlot& s;
  int64_t base, n;
  P* param;
  const G* grad;

  Superblock(const AdamWStepParams& p, int64_t t, int64_t sb)
      : s(p.tensors[t]),
        base(sb * superblock_size(p)),
        n(std::min(superblock_size(p), s.numel - base)),
        param(static_cast<P*>(s.param) + base),
        grad(static_cast<const G*>(s.grad) + base) {}
};

template <typename P, typename G>
void quantized_superblock(const AdamWStepParams& p, int64_t t, int64_t sb, const Searches& search,
                          const Rank1Stats* rank1, Scratch& scratch) {
  const auto [s, base, n, param, grad] = Superblock<P, G>(p, t, sb);
  // chunks of the smaller blocksize: each sits in one block of either moment, so the two
  // absmax values are loaded once per chunk rather than divided out per element
  const int64_t chunk = std::min(p.blocksize_exp_avg, p.blocksize_exp_avg_sq);
  for (int64_t c0 = 0; c0 < n; c0 += chunk) {
    const int64_t c1 = std::min(n, c0 + chunk);
    const float absmax_m = s.exp_avg_absmax[(base + c0) / p.blocksize_exp_avg];
    float* mf = scratch.exp_avg.data() + c0;
    float* vf = scratch.exp_avg_sq.data() + c0;
    const int len = static_cast<int>(c1 - c0);
    dequantize_span(s.exp_avg_q, base + c0, len, p.bits, p.code_exp_avg, absmax_m, search.avx2, mf);
    if (rank1 != nullptr) {
      float* scale = scratch.scale.data() + c0;
      rank1_scales(s.exp_avg_sq_row, s.exp_avg_sq_col, s.cols, base + c0, len, scale);
      dequantize_rank1_span(s.exp_avg_sq_q, base + c0, len, p.bits, p.code_exp_avg_sq, search.avx2, scale, vf);
    } else {
      const float absmax_v = s.exp_avg_sq_absmax[(base + c0) / p.blocksize_exp_avg_sq];
      dequantize_span(s.exp_avg_sq_q, base + c0, len, p.bits, p.code_exp_avg_sq, absmax_v, search.avx2, vf);
    }
    // fp32 params and grads are updated where they are; other dtypes through fp32 copies
    float* pf = scratch.param.data() + c0;
    const float* gf = scratch.grad.data() + c0;
    if constexpr (std::is_same_v<P, float>) {
      pf = param + c0;
    } else {
      for (int i = 0; i < len; ++i) pf[i] = static_cast<float>(param[c0 + i]);
    }
    if constexpr (std::is_same_v<G, float>) {
      gf = grad + c0;
    } else {
      for (int i = 0; i < len; ++i) scratch.grad[c0 + i] = static_cast<float>(grad[c0 + i]);
    }
    adamw_update_span(pf, gf, mf, vf, len, p.c, /*quantized_v=*/true);
    if constexpr (!std::is_same_v<P, float>) {
      for (int i = 0; i < len; ++i) param[c0 + i] = store_param<P>(pf[i], p, t, base + c0 + i);
    }
  }
  const MomentCoding mc_m{p.blocksize_exp_avg, &search.nearest_m, &search.floor_m, p.stochastic_exp_avg, p.seed,
                          stream_offset(t, kExpAvgStream)};
  requantize(scratch.exp_avg.data(), n, base, p.bits, mc_m, s.exp_avg_q, s.exp_avg_absmax, scratch.idx.data());
  if (rank1 != nullptr) {  // v / min(new row max, new column max), one divisor per entry
    float* scale = scratch.scale.data();
    rank1_scales(rank1->row[t].data(), rank1->col[t].data(), s.cols, base, static_cast<int>(n), scale);
    uint8_t* idx = scratch.idx.data();
    if (p.stochastic_exp_avg_sq) {
      quant::quantize_span_stochastic_scaled(scratch.exp_avg_sq.data(), scale, n, search.floor_v, p.seed,
                                             stream_offset(t, kExpAvgSqStream), base, idx);
    } else {
      quant::quantize_span_nearest_scaled(scratch.exp_avg_sq.data(), scale, n, search.nearest_v, idx);
    }
    if (p.bits == 8) {
      std::memcpy(s.exp_avg_sq_q + base, idx, n);
    } else {
      quant::pack_nibbles(idx, n, s.exp_avg_sq_q + base / 2);
    }
    return;
  }
  const MomentCoding mc_v{p.blocksize_exp_avg_sq, &search.nearest_v, &search.floor_v, p.stochastic_exp_avg_sq, p.seed,
                          stream_offset(t, kExpAvgSqStream)};
  requantize(scratch.exp_avg_sq.data(), n, base, p.bits, mc_v, s.exp_avg_sq_q, s.exp_avg_sq_absmax,
             scratch.idx.data());
}

// The new rank-1 statistics of tensor t: the second moment's update v' (as adamw_update
// computes and storable_exp_avg_sq stores it) of every entry, reduced to row and column
// maxima of |v'| (NaN-sticky). Rows are split between threads; each thread's column maxima
// are merged under a lock (max does not depend on the order: the same bits every run).
template <typename G>
void rank1_statistics(const AdamWStepParams& p, int64_t t, bool avx2, std::vector<float>& row_max,
                      std::vector<float>& col_max) {
  const TensorSlot& s = p.tensors[t];
  const int64_t cols = s.cols, rows = s.numel / cols;
  row_max.assign(rows, 0.f);
  col_max.assign(cols, 0.f);
  constexpr int kSpan = 1024;
  std::mutex merge;
  const G* grad = static_cast<const G*>(s.grad);
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / cols), [&](int64_t r0, int64_t r1) {
    std::vector<float> local_col(cols, 0.f);
    float scale[kSpan], v[kSpan], gf[kSpan];
    for (int64_t i = r0; i < r1; ++i) {
      float rmax = 0.f;
      for (int64_t j0 = 0; j0 < cols; j0 += kSpan) {
        const int len = static_cast<int>(std::min<int64_t>(kSpan, cols - j0));
        const int64_t first = i * cols + j0;
        rank1_scales(s.exp_avg_sq_row, s.exp_avg_sq_col, cols, first, len, scale);
        dequantize_rank1_span(s.exp_avg_sq_q, first, len, p.bits, p.code_exp_avg_sq, avx2, scale, v);
        const float* g = gf;
        if constexpr (std::is_same_v<G, float>) {
          g = grad + first;
        } else {
          for (int k = 0; k < len; ++k) gf[k] = static_cast<float>(grad[first + k]);
        }
        second_moment_span(v, g, len, p.c);
        // block_absmax: max |v'| of the run, NaN when it holds one (v' is finite or NaN)
        rmax = nan_sticky_absmax(rmax, quant::block_absmax(v, len));
        column_maxima(local_col.data() + j0, v, len);
      }
      row_max[i] = rmax;
    }
    const std::lock_guard<std::mutex> lock(merge);
    for (int64_t j = 0; j < cols; ++j) col_max[j] = nan_sticky_absmax(col_max[j], local_col[j]);
  });
}

constexpr int kFp32Chunk = 512;

template <typename P, typename G>
void fp32_superblock(const AdamWStepParams& p, int64_t t, int64_t sb) {
  const auto [s, base, n, param, grad] = Superblock<P, G>(p, t, sb);
  float* m = s.exp_avg + base;
  float* v = s.exp_avg_sq + base;
  float pf[kFp32Chunk], gf[kFp32Chunk];
  for (int64_t c0 = 0; c0 < n; c0 += kFp32Chunk) {
    const int len = static_cast<int>(std::min<int64_t>(kFp32Chunk, n - c0));
    for (int i = 0; i < len; ++i) {
      pf[i] = static_cast<float>(param[c0 + i]);
      gf[i] = static_cast<float>(grad[c0 + i]);
    }
    adamw_update_span(pf, gf, m + c0, v + c0, len, p.c, /*quantized_v=*/false);
    for (int i = 0; i < len; ++i) param[c0 + i] = store_param<P>(pf[i], p, t, base + c0 + i);
  }
}

void step(const AdamWStepParams& p, const std::vector<int64_t>& offsets) {
  const int64_t total = offsets.back();
  if (total == 0) return;
  // each table is built once per call, and only where its rounding is used
  std::unique_ptr<Searches> search;
  if (p.quantized) {
    const int n = 1 << p.bits;
    search.reset(new Searches{NearestSearch(p.code_exp_avg, p.stochastic_exp_avg ? 0 : n),
                              NearestSearch(p.code_exp_avg_sq, p.stochastic_exp_avg_sq ? 0 : n),
                              quant::FloorSearch(p.code_exp_avg, p.stochastic_exp_avg ? n : 0),
                              quant::FloorSearch(p.code_exp_avg_sq, p.stochastic_exp_avg_sq ? n : 0),
                              quant::table_search_avx2()});
  }
  const int64_t S = superblock_size(p);
  LOWRANK_DISPATCH_FLOAT(p.param_kind, P, [&] {
    LOWRANK_DISPATCH_FLOAT(p.grad_kind, G, [&] {
      std::unique_ptr<Rank1Stats> rank1;
      if (p.rank1) {
        rank1.reset(new Rank1Stats{std::vector<std::vector<float>>(p.num_tensors),
                                   std::vector<std::vector<float>>(p.num_tensors)});
        for (int64_t t = 0; t < p.num_tensors; ++t)
          if (p.tensors[t].numel > 0) rank1_statistics<G>(p, t, search->avx2, rank1->row[t], rank1->col[t]);
      }
      at::parallel_for(0, total, std::max<int64_t>(1, 16384 / S), [&](int64_t b0, int64_t b1) {
        Scratch scratch(p.quantized ? S : 0);
        int64_t t = std::upper_bound(offsets.begin(), offsets.end(), b0) - offsets.begin() - 1;
        for (int64_t b = b0; b < b1; ++b) {
          while (b >= offsets[t + 1]) ++t;
          if (p.quantized) {
            quantized_superblock<P, G>(p, t, b - offsets[t], *search, rank1.get(), scratch);
          } else {
            fp32_superblock<P, G>(p, t, b - offsets[t]);
          }
        }
      });
      if (rank1) {  // every entry is re-quantized: the new statistics replace the old
        for (int64_t t = 0; t < p.num_tensors; ++t) {
          const TensorSlot& s = p.tensors[t];
          if (s.numel == 0) continue;
          std::copy(rank1->row[t].begin(), rank1->row[t].end(), s.exp_avg_sq_row);
          std::copy(rank1->col[t].begin(), rank1->col[t].end(), s.exp_avg_sq_col);
        }
      }
    });
  });
}

void adamw_step_quantized_cpu_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avg_q,
                                 at::TensorList exp_avg_absmax, at::TensorList exp_avg_sq_q,
                                 at::TensorList exp_avg_sq_absmax, const at::Tensor& code_exp_avg,
                                 const at::Tensor& code_exp_avg_sq, double lr, double beta1, double beta2, double eps,
                                 double weight_decay, int64_t step_count, int64_t bits, int64_t blocksize_exp_avg,
                                 int64_t blocksize_exp_avg_sq, bool stochastic_rounding, int64_t seed,
                                 bool stochastic_exp_avg, bool stochastic_exp_avg_sq) {
  PreparedStep prep = prepare_quantized_step(params, grads, exp_avg_q, exp_avg_absmax, exp_avg_sq_q,
                                             exp_avg_sq_absmax, code_exp_avg, code_exp_avg_sq, lr, beta1, beta2, eps,
                                             weight_decay, step_count, bits, blocksize_exp_avg, blocksize_exp_avg_sq,
                                             stochastic_rounding, seed, stochastic_exp_avg, stochastic_exp_avg_sq);
  adamw_step_cpu(prep.params);
}

void adamw_step_rank1_cpu_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avg_q,
                             at::TensorList exp_avg_absmax, at::TensorList exp_avg_sq_q, at::TensorList exp_avg_sq_row,
                             at::TensorList exp_avg_sq_col, const at::Tensor& code_exp_avg,
                             const at::Tensor& code_exp_avg_sq, double lr, double beta1, double beta2, double eps,
                             double weight_decay, int64_t step_count, int64_t bits, int64_t blocksize_exp_avg,
                             bool stochastic_rounding, int64_t seed, bool stochastic_exp_avg,
                             bool stochastic_exp_avg_sq) {
  PreparedStep prep = prepare_rank1_step(params, grads, exp_avg_q, exp_avg_absmax, exp_avg_sq_q, exp_avg_sq_row,
                                         exp_avg_sq_col, code_exp_avg, code_exp_avg_sq, lr, beta1, beta2, eps,
                                         weight_decay, step_count, bits, blocksize_exp_avg, stochastic_rounding, seed,
                                         stochastic_exp_avg, stochastic_exp_avg_sq);
  adamw_step_cpu(prep.params);
}

void adamw_step_fp32_cpu_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avg,
                            at::TensorList exp_avg_sq, double lr, double beta1, double beta2, double eps,
                            double weight_decay, int64_t step_count, bool stochastic_rounding, int64_t seed) {
  PreparedStep prep = prepare_fp32_step(params, grads, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay,
                                        step_count, stochastic_rounding, seed);
  adamw_step_cpu(prep.params);
}

}  // namespace

void adamw_step_cpu(const AdamWStepParams& p) {
  step(p, superblock_offsets(p.tensors, p.num_tensors, superblock_size(p)));
}

TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  m.impl("adamw_step_quantized_", TORCH_FN(adamw_step_quantized_cpu_op));
  m.impl("adamw_step_fp32_", TORCH_FN(adamw_step_fp32_cpu_op));
  m.impl("adamw_step_rank1_", TORCH_FN(adamw_step_rank1_cpu_op));
}

}  // namespace lowrank::optim
