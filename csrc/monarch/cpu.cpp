// CPU kernels of the monarch family. Each thread walks x in tiles of rows; within a tile
// the Monarch intermediate is kept feature-major, ht [nblocks*mid, rows], so that both
// block-diagonal products are one strided-batched GEMM each and the permutation P between
// them is only a leading dimension: stage-2 block l reads the rows l, l+nb, ... of ht
// (ld = nblocks*rows) and writes the rows l, l+nb, ... of yt. Nothing is permuted in memory;
// the one copy is the final [d_out, rows] -> [rows, d_out] transpose of the (cache-resident)
// output tile (AVX2 tiles, common/cpu_transpose.h). The GEMMs are BLAS calls, or for small
// fp32 blocks the register-blocked small-k kernel of common/cpu_blas.h (see
// small_block_gemms). fp16/bf16 tiles are widened to fp32 first; fp64 stays fp64.
// fp32 forwards with small blocks and nblocks a multiple of 8 take a token-major path instead
// (token_major_forward below: a few token rows at a time in L1, no transposes), which also
// writes the saved h in the tiles' feature-major layout, so the backward is the same for both.
#include <torch/library.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <array>
#include <type_traits>
#include <vector>

#include "common/cpu_blas.h"
#include "common/cpu_transpose.h"
#include "common/dtype.h"
#include "monarch/ops.h"

namespace lowrank::monarch {
namespace {

// Rows [r0, r0+rows) of a row-major [*, cols] matrix as Acc: the matrix itself when it is
// already Acc, else widened into `buf`. Returns the pointer; the row stride is `cols`.
template <typename T, typename Acc>
const Acc* rows_as_acc(const T* src, int64_t r0, int64_t rows, int64_t cols, std::vector<Acc>& buf) {
  if constexpr (std::is_same_v<T, Acc>) {
    return src + r0 * cols;
  } else {
    buf.resize(static_cast<size_t>(rows * cols));
    const T* s = src + r0 * cols;
    for (int64_t i = 0; i < rows * cols; ++i) buf[i] = static_cast<Acc>(s[i]);
    return buf.data();
  }
}

// Where a kernel writes rows [r0, r0+rows) of a row-major [*, cols] output: in place when it
// is Acc, else in `buf` (then store_rows narrows it).
template <typename T, typename Acc>
Acc* out_rows_acc(T* dst, int64_t r0, int64_t rows, int64_t cols, std::vector<Acc>& buf) {
  if constexpr (std::is_same_v<T, Acc>) {
    return dst + r0 * cols;
  } else {
    buf.resize(static_cast<size_t>(rows * cols));
    return buf.data();
  }
}

template <typename T, typename Acc>
void store_rows(T* dst, int64_t r0, int64_t rows, int64_t cols, const std::vector<Acc>& buf) {
  if constexpr (!std::is_same_v<T, Acc>) {
    T* d = dst + r0 * cols;
    for (int64_t i = 0; i < rows * cols; ++i) d[i] = static_cast<T>(buf[i]);
  }
}

// Rows per tile. Small blocks do few FLOPs per byte: their feature-major tiles (the
// intermediate and the output, or their gradients) should stay in 512 KiB of L2 (measured
// against 256 KiB - 2 MiB, d = 1024 and 4096, 16-64 wide blocks: forward up to 12% faster
// than with 1 MiB, forward + backward the same within noise). Large
// blocks are compute-bound and the weight-gradient GEMMs reduce over the tile's rows, so
// they get longer tiles (8 MiB, measured: d = 4096, nblocks = 4 runs ~1.3x faster with 256
// rows than with 32). Every thread gets a tile; a tile is never narrower than 32 columns.
int64_t tile_rows(const MonarchDims& d) {
  const int64_t per_row = (d.d_mid() + std::max(d.d_out(), d.d_in())) * static_cast<int64_t>(sizeof(float));
  const bool large_blocks = std::min({d.in_bs, d.mid, d.out_bs}) >= 128;
  const int64_t budget = large_blocks ? (int64_t{8} << 20) : (int64_t{512} << 10);
  const int64_t by_cache = budget / std::max<int64_t>(per_row, 1);
  const int64_t by_threads = (d.n + at::get_num_threads() - 1) / at::get_num_threads();
  return std::clamp<int64_t>(std::min(by_cache, by_threads + 15) / 16 * 16, 32, 512);
}

// blockdiag reads and writes the row-major tensors in place: tiles only split the rows
// between threads (at most 256 rows each, so the per-thread partials of grad w stay few).
int64_t blockdiag_tile_rows(int64_t n) {
  const int64_t by_threads = (n + at::get_num_threads() - 1) / at::get_num_threads();
  return std::clamp<int64_t>((by_threads + 15) / 16 * 16, 16, 256);
}

// Small blocks (every block dimension <= kSmallGemmMaxK) in fp32 go through the register-
// blocked small-k GEMM of common/cpu_blas.h: BLAS's per-call packing would cost about as much
// as the block's few FLOPs. It reads B row-major, so stage 1 transposes the x tile first.
template <typename Acc>
bool small_block_gemms(const MonarchDims& d) {
  return std::is_same_v<Acc, float> && std::max({d.in_bs, d.mid, d.out_bs}) <= kSmallGemmMaxK &&
         small_gemm_available();
}

// C_k [rows, n] = A_k [rows, k_len] B_k for every block k, all row-major, with six rows of A
// and C at a time across all blocks (the rows stay in L1 while each block's small B streams
// through), rather than all rows of one block at a time (rm_gemm_small_k's order, which
// re-reads a block's rows from L2 for every 16 columns of C). Same sums in the same order.
// Measured (blockdiag forward, N = 4096, d = 1024, interleaved): 32-wide blocks 1.38x, 64-wide
// 1.03x faster. A_k = a + k a_block, B_k = b + k b_block, C_k = c + k c_block.
// Only where small_block_gemms<Acc> holds (fp32, a CPU with AVX2 and FMA).
template <typename Acc>
void block_rows_small_gemm(int64_t rows, int64_t nblocks, int64_t n, int64_t k_len, const Acc* a, int64_t lda,
                           int64_t a_block, const Acc* b, int64_t ldb, int64_t b_block, Acc* c, int64_t ldc,
                           int64_t c_block) {
#ifdef LOWRANK_X86_AVX2_PATHS
  if constexpr (std::is_same_v<Acc, float>) {
    for (int64_t r = 0; r < rows; r += 6)
      for (int64_t k = 0; k < nblocks; ++k)
        small_gemm_f32(std::min<int64_t>(6, rows - r), n, k_len, a + r * lda + k * a_block, lda, 1, b + k * b_block,
                       ldb, c + r * ldc + k * c_block, ldc, /*accumulate=*/false);
    return;
  }
#endif
  TORCH_INTERNAL_ASSERT(false, "block_rows_small_gemm: needs fp32 and the small-k kernel");
}

// ht [d_mid, rows] (row stride ld_h) = R x_tile^T: block k is w1[k] [mid, in_bs] times x_k^T.
template <typename Acc>
void stage1(const MonarchDims& d, int64_t rows, const Acc* x, const Acc* w1, Acc* ht, int64_t ld_h,
            std::vector<Acc>& xt_buf) {
  if (small_block_gemms<Acc>(d)) {
    xt_buf.resize(static_cast<size_t>(d.d_in() * rows));  // x tile feature-major, [d_in, rows]
    transpose_matrix(x, d.d_in(), rows, d.d_in(), xt_buf.data(), rows);
    rm_gemm_small_k<Acc>(false, false, d.nblocks, d.mid, rows, d.in_bs, w1, d.in_bs, d.mid * d.in_bs, xt_buf.data(),
                         rows, d.in_bs * rows, Acc(0), ht, ld_h, d.mid * ld_h);
    return;
  }
  rm_gemm<Acc>(false, true, d.nblocks, d.mid, rows, d.in_bs, w1, d.in_bs, d.mid * d.in_bs, x, d.d_in(), d.in_bs,
               Acc(0), ht, ld_h, d.mid * ld_h);
}

#ifdef LOWRANK_X86_AVX2_PATHS
// ---- token-major forward for small blocks (fp32, nblocks a multiple of 8; h written if saved) ----
// The feature-major tiles above cost two transposes per tile (x in, y out: ~30% of the
// forward at 32-64 wide blocks). Here both stages work on a few token rows at a time, all
// in L1, with no transpose and no permuted copy:
//   stage 1, a GEMM per block: H[t, k mid + q] = sum_p x[t, k in_bs + p] w1[k, q, p]
//            (small_gemm_f32 on x's rows in place, B = w1[k]^T packed once per call);
//   stage 2, lane-wise: y[t, s nb + l] = sum_r w2[l, s, r] H[t, r nb + l]. For fixed s and
//            r, eight consecutive l are eight consecutive floats of both H's row and y's
//            row, so the interleaving P is the lanes themselves: a vector of H is multiplied
//            by a vector of w2[l, s, r] over l (packed once per call as w2v[s, r, l]).
// Measured (N = 4096, d = 1024, interleaved against the tiles): 64-wide blocks 11-21% faster,
// 32-wide 30-67% faster, at or above the same-size bmm GEMMs' rate. A tile of 12 rows (two
// register tiles sharing each weight pass) was slower: its intermediate no longer fits L1.
// An earlier token-major attempt (README) looped the lane groups outermost, so each w2v
// cache line came from L2 once per lane group; here the groups share it in L1.
constexpr int kTokenRows = 6;  // token rows per register tile (12 accumulators in stage 2)
// The rows of the intermediate are d_mid + kRowPad floats apart: at d_mid = 1024 unpadded rows
// would be 4 KiB apart and all map to the same L1 set.
constexpr int64_t kRowPad = 16;

// Where it pays: the rows' intermediate (kTokenRows x d_mid fp32) must stay in L1 and both
// packed weights (re-read for every kTokenRows rows) in L2. Measured (N = 4096, square
// blocks, interleaved against the tiles): faster at d = 512 with 64-wide blocks (1.09x) and
// d = 1024 with 64- and 32-wide blocks (1.1-1.6x); slower at d = 2048 (0.63-0.91x: the
// intermediate is 48 KiB) and at d = 4096 (0.72-0.88x).
bool token_major_forward(const MonarchDims& d) {
  const int64_t weight_bytes = 4 * d.nblocks * (d.mid * d.in_bs + d.out_bs * d.mid);
  return small_block_gemms<float>(d) && d.nblocks % 8 == 0 &&
         4 * kTokenRows * (d.d_mid() + kRowPad) <= (25 << 10) && weight_bytes <= (512 << 10);
}

// y rows [t, t + M) for the output columns s nb + 8 g + [0, 8), s in [s0, s0 + S): M x S
// accumulators of 8 lanes; per r, S loads of w2v and M of H feed M S FMAs.
template <int M, int S>
__attribute__((target("avx2,fma"), always_inline)) inline void lanewise_tile(const float* h, int64_t ldh,
                                                                             const float* w2v, int64_t mid,
                                                                             int64_t nb, int64_t g, int64_t s0,
                                                                             float* y, int64_t ldy) {
  __m256 acc[M][S];
  for (int t = 0; t < M; ++t)
    for (int j = 0; j < S; ++j) acc[t][j] = _mm256_setzero_ps();
  const float* hl = h + 8 * g;
  const float* wl = w2v + s0 * mid * nb + 8 * g;
  for (int64_t r = 0; r < mid; ++r) {
    __m256 w[S];
    for (int j = 0; j < S; ++j) w[j] = _mm256_loadu_ps(wl + (j * mid + r) * nb);
    for (int t = 0; t < M; ++t) {
      __m256 hv = _mm256_loadu_ps(hl + t * ldh + r * nb);
      // one load of h per row into a register: left alone, GCC folds the load into each of
      // the S FMAs (14 loads per 12 FMAs at S = 2, load-bound on Zen 3)
      __asm__("" : "+x"(hv));
      for (int j = 0; j < S; ++j) acc[t][j] = _mm256_fmadd_ps(hv, w[j], acc[t][j]);
    }
  }
  for (int t = 0; t < M; ++t)
    for (int j = 0; j < S; ++j) _mm256_storeu_ps(y + t * ldy + (s0 + j) * nb + 8 * g, acc[t][j]);
}

template <int M>
__attribute__((target("avx2,fma"))) void lanewise_stage2(const float* h, int64_t ldh, const float* w2v,
                                                         const MonarchDims& d, float* y, int64_t ldy) {
  // the lane groups g innermost: they share w2v's cache lines (w2v[s, r, 8g..8g+8]), which stay
  // in L1 across them (~8 KiB per pair of s at 64-wide blocks) instead of coming from L2 twice
  int64_t s = 0;
  for (; s + 2 <= d.out_bs; s += 2)
    for (int64_t g = 0; g < d.nblocks / 8; ++g) lanewise_tile<M, 2>(h, ldh, w2v, d.mid, d.nblocks, g, s, y, ldy);
  if (s < d.out_bs)
    for (int64_t g = 0; g < d.nblocks / 8; ++g) lanewise_tile<M, 1>(h, ldh, w2v, d.mid, d.nblocks, g, s, y, ldy);
}

// Training forwards also write h, feature-major [d_mid, N] (the op's layout): the register
// tiles of a group of kSavedGroupRows rows leave their intermediate in a [rows, d_mid] buffer
// (L2), which is then transposed into h through the AVX2 16 x 16 tiles, 192 contiguous bytes
// per feature row. Each register tile still runs stage 2 on its rows right after stage 1,
// while they are in L1. Measured (N = 4096, interleaved against the feature-major tiles, which
// write h directly; the same bits): the h-saving forward 1.22x faster at d = 1024 with 32-wide
// blocks, 1.18x with 64-wide, 1.12x at d = 512 with 64-wide; fwd+bwd 7%, 3%, 4%.
constexpr int64_t kSavedGroupRows = 8 * kTokenRows;

void monarch_forward_token_major(const float* x, const at::Tensor& w1, const at::Tensor& w2, const MonarchDims& d,
                                 float* y, float* h) {
  // w1t[k, p, q] = w1[k, q, p] (stage 1's B, row-major [in_bs, mid] per block);
  // w2v[s, r, l] = w2[l, s, r] (stage 2's lanes); both small, packed once per call
  const at::Tensor w1t = w1.to(at::kFloat).transpose(1, 2).contiguous();
  const at::Tensor w2v = w2.to(at::kFloat).permute({1, 2, 0}).contiguous();
  const float* w1p = w1t.const_data_ptr<float>();
  const float* w2p = w2v.const_data_ptr<float>();
  const int64_t groups = (d.n + kSavedGroupRows - 1) / kSavedGroupRows;
  at::parallel_for(0, groups, 1, [&](int64_t i0, int64_t i1) {
    const int64_t ldh = d.d_mid() + kRowPad;  // [rows, d_mid]
    std::vector<float> hbuf(static_cast<size_t>((h ? kSavedGroupRows : kTokenRows) * ldh));
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t g0 = i * kSavedGroupRows, rows = std::min(kSavedGroupRows, d.n - g0);
      for (int64_t r = 0; r < rows; r += kTokenRows) {
        const int64_t t0 = g0 + r, m = std::min<int64_t>(kTokenRows, rows - r);
        float* hb = hbuf.data() + (h ? r * ldh : 0);  // without h, one tile's rows, reused (L1)
        block_rows_small_gemm<float>(m, d.nblocks, d.mid, d.in_bs, x + t0 * d.d_in(), d.d_in(), d.in_bs, w1p, d.mid,
                                     d.in_bs * d.mid, hb, ldh, d.mid);
        float* yt = y + t0 * d.d_out();
        switch (m) {
          case 6: lanewise_stage2<6>(hb, ldh, w2p, d, yt, d.d_out()); break;
          case 5: lanewise_stage2<5>(hb, ldh, w2p, d, yt, d.d_out()); break;
          case 4: lanewise_stage2<4>(hb, ldh, w2p, d, yt, d.d_out()); break;
          case 3: lanewise_stage2<3>(hb, ldh, w2p, d, yt, d.d_out()); break;
          case 2: lanewise_stage2<2>(hb, ldh, w2p, d, yt, d.d_out()); break;
          default: lanewise_stage2<1>(hb, ldh, w2p, d, yt, d.d_out()); break;
        }
      }
      if (h) transpose_matrix(hbuf.data(), ldh, rows, d.d_mid(), h + g0, d.n);
    }
  });
}
#endif

template <typename T>
void monarch_forward_kernel(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2, const MonarchDims& d,
                            at::Tensor& y, at::Tensor* h) {
#ifdef LOWRANK_X86_AVX2_PATHS
  if constexpr (std::is_same_v<T, float>) {
    if (token_major_forward(d)) {
      monarch_forward_token_major(x.const_data_ptr<float>(), w1, w2, d, y.mutable_data_ptr<float>(),
                                  h ? h->mutable_data_ptr<float>() : nullptr);
      return;
    }
  }
#endif
  using Acc = acc_t<T>;
  const at::Tensor w1a = w1.to(c10::CppTypeToScalarType<Acc>::value).contiguous();
  const at::Tensor w2a = w2.to(c10::CppTypeToScalarType<Acc>::value).contiguous();
  const Acc* w1p = w1a.const_data_ptr<Acc>();
  const Acc* w2p = w2a.const_data_ptr<Acc>();
  const T* xp = x.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  T* hp = h ? h->mutable_data_ptr<T>() : nullptr;
  const int64_t tile = tile_rows(d), ntiles = (d.n + tile - 1) / tile;
  at::parallel_for(0, ntiles, 1, [&](int64_t i0, int64_t i1) {
    std::vector<Acc> xbuf, xt_buf, hbuf(static_cast<size_t>(d.d_mid() * tile)), ybuf(static_cast<size_t>(d.d_out() * tile));
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r0 = i * tile, rows = std::min(tile, d.n - r0);
      const Acc* xt = rows_as_acc<T, Acc>(xp, r0, rows, d.d_in(), xbuf);
      // the intermediate goes straight into the saved h when it is already Acc
      Acc* ht = hbuf.data();
      int64_t ld_h = tile;
      if constexpr (std::is_same_v<T, Acc>) {
        if (hp != nullptr) ht = hp + r0, ld_h = d.n;
      }
      stage1<Acc>(d, rows, xt, w1p, ht, ld_h, xt_buf);
      if (hp != nullptr && ht == hbuf.data())
        for (int64_t f = 0; f < d.d_mid(); ++f)
          for (int64_t t = 0; t < rows; ++t) hp[f * d.n + r0 + t] = static_cast<T>(ht[f * ld_h + t]);
      // stage 2, block l: rows l, l+nb, ... of ht -> rows l, l+nb, ... of yt (the permutation P)
      Acc* yt = ybuf.data();
      rm_gemm_small_k<Acc>(false, false, d.nblocks, d.out_bs, rows, d.mid, w2p, d.mid, d.out_bs * d.mid, ht,
                           d.nblocks * ld_h, ld_h, Acc(0), yt, d.nblocks * tile, tile);
      transpose_matrix(yt, tile, d.d_out(), rows, yp + r0 * d.d_out(), d.d_out());
    }
  });
}

template <typename T>
void monarch_backward_kernel(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w1,
                             const at::Tensor& w2, const std::optional<at::Tensor>& h, const MonarchDims& d,
                             std::array<bool, 3> mask, at::Tensor& grad_x, at::Tensor& grad_w1,
                             at::Tensor& grad_w2) {
  using Acc = acc_t<T>;
  const auto acc = c10::CppTypeToScalarType<Acc>::value;
  const at::Tensor w1a = w1.to(acc).contiguous(), w2a = w2.to(acc).contiguous();
  const Acc* w1p = w1a.const_data_ptr<Acc>();
  const Acc* w2p = w2a.const_data_ptr<Acc>();
  const T* xp = x.const_data_ptr<T>();
  const T* gp = grad_y.const_data_ptr<T>();
  const T* hp = h ? h->const_data_ptr<T>() : nullptr;
  T* dxp = mask[0] ? grad_x.mutable_data_ptr<T>() : nullptr;
  const bool need_dht = mask[0] || mask[1];
  // one fp32 (fp64) partial weight gradient per thread, summed in thread order
  const int64_t nthreads = at::get_num_threads();
  at::Tensor dw1_part = mask[1] ? at::zeros({nthreads, d.nblocks, d.mid, d.in_bs}, x.options().dtype(acc)) : at::Tensor();
  at::Tensor dw2_part = mask[2] ? at::zeros({nthreads, d.nblocks, d.out_bs, d.mid}, x.options().dtype(acc)) : at::Tensor();
  const int64_t tile = tile_rows(d), ntiles = (d.n + tile - 1) / tile;
  at::parallel_for(0, ntiles, 1, [&](int64_t i0, int64_t i1) {
    const int64_t me = at::get_thread_num();
    Acc* dw1 = mask[1] ? dw1_part.select(0, me).mutable_data_ptr<Acc>() : nullptr;
    Acc* dw2 = mask[2] ? dw2_part.select(0, me).mutable_data_ptr<Acc>() : nullptr;
    std::vector<Acc> xbuf, xt_buf, dxbuf, hbuf, gbuf(static_cast<size_t>(d.d_out() * tile)), dhbuf;
    if (need_dht) dhbuf.resize(static_cast<size_t>(d.d_mid() * tile));
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r0 = i * tile, rows = std::min(tile, d.n - r0);
      Acc* gt = gbuf.data();  // grad_y tile, feature-major [d_out, tile]
      transpose_matrix(gp + r0 * d.d_out(), d.d_out(), rows, d.d_out(), gt, tile);
      const Acc* xt = (mask[1] || (mask[2] && hp == nullptr)) ? rows_as_acc<T, Acc>(xp, r0, rows, d.d_in(), xbuf)
                                                              : nullptr;
      if (mask[2]) {  // grad w2[l] += gt_l [out_bs, rows] ht_l^T [rows, mid]
        const Acc* ht;
        int64_t ld_h;
        if (hp == nullptr) {  // not saved: recompute R x
          hbuf.resize(static_cast<size_t>(d.d_mid() * tile));
          stage1<Acc>(d, rows, xt, w1p, hbuf.data(), tile, xt_buf);
          ht = hbuf.data(), ld_h = tile;
        } else if constexpr (std::is_same_v<T, Acc>) {
          ht = hp + r0, ld_h = d.n;
        } else {
          hbuf.resize(static_cast<size_t>(d.d_mid() * tile));
          for (int64_t f = 0; f < d.d_mid(); ++f)
            for (int64_t t = 0; t < rows; ++t) hbuf[f * tile + t] = static_cast<Acc>(hp[f * d.n + r0 + t]);
          ht = hbuf.data(), ld_h = tile;
        }
        rm_gemm<Acc>(false, true, d.nblocks, d.out_bs, d.mid, rows, gt, d.nblocks * tile, tile, ht,
                     d.nblocks * ld_h, ld_h, Acc(1), dw2, d.mid, d.out_bs * d.mid);
      }
      if (!need_dht) continue;
      // dht_l [mid, rows] = w2[l]^T gt_l, written to rows l, l+nb, ... (P^T by leading dimension)
      Acc* dht = dhbuf.data();
      rm_gemm_small_k<Acc>(true, false, d.nblocks, d.mid, rows, d.out_bs, w2p, d.mid, d.out_bs * d.mid, gt,
                           d.nblocks * tile, tile, Acc(0), dht, d.nblocks * tile, tile);
      if (mask[1])  // grad w1[k] += dht_k [mid, rows] x_k [rows, in_bs]
        rm_gemm<Acc>(false, false, d.nblocks, d.mid, d.in_bs, rows, dht, tile, d.mid * tile, xt, d.d_in(), d.in_bs,
                     Acc(1), dw1, d.in_bs, d.mid * d.in_bs);
      if (mask[0]) {  // grad x_k [rows, in_bs] = dht_k^T w1[k]
        Acc* dxt = out_rows_acc<T, Acc>(dxp, r0, rows, d.d_in(), dxbuf);
        rm_gemm_small_k<Acc>(true, false, d.nblocks, rows, d.in_bs, d.mid, dht, tile, d.mid * tile, w1p, d.in_bs,
                             d.mid * d.in_bs, Acc(0), dxt, d.d_in(), d.in_bs);
        store_rows<T, Acc>(dxp, r0, rows, d.d_in(), dxbuf);
      }
    }
  });
  if (mask[1]) grad_w1.copy_(dw1_part.sum(0));
  if (mask[2]) grad_w2.copy_(dw2_part.sum(0));
}

template <typename T>
void blockdiag_forward_kernel(const at::Tensor& x, const at::Tensor& w, const MonarchDims& d, at::Tensor& y) {
  using Acc = acc_t<T>;
  // w^T per block, [nblocks, in_bs, out_bs]: the small-k GEMM reads B row-major
  const bool small = small_block_gemms<Acc>(d);
  at::Tensor wa = w.to(c10::CppTypeToScalarType<Acc>::value);
  wa = small ? wa.transpose(1, 2).contiguous() : wa.contiguous();
  const Acc* wp = wa.const_data_ptr<Acc>();
  const T* xp = x.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  const int64_t tile = blockdiag_tile_rows(d.n);
  at::parallel_for(0, (d.n + tile - 1) / tile, 1, [&](int64_t i0, int64_t i1) {
    std::vector<Acc> xbuf, ybuf;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r0 = i * tile, rows = std::min(tile, d.n - r0);
      const Acc* xt = rows_as_acc<T, Acc>(xp, r0, rows, d.d_in(), xbuf);
      Acc* yt = out_rows_acc<T, Acc>(yp, r0, rows, d.d_out(), ybuf);
      // y_k [rows, out_bs] = x_k w[k]^T, straight from and into the row-major tensors
      if (small)
        block_rows_small_gemm<Acc>(rows, d.nblocks, d.out_bs, d.in_bs, xt, d.d_in(), d.in_bs, wp, d.out_bs,
                                   d.out_bs * d.in_bs, yt, d.d_out(), d.out_bs);
      else
        rm_gemm<Acc>(false, true, d.nblocks, rows, d.out_bs, d.in_bs, xt, d.d_in(), d.in_bs, wp, d.in_bs,
                     d.out_bs * d.in_bs, Acc(0), yt, d.d_out(), d.out_bs);
      store_rows<T, Acc>(yp, r0, rows, d.d_out(), ybuf);
    }
  });
}

template <typename T>
void blockdiag_backward_kernel(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w,
                               const MonarchDims& d, std::array<bool, 2> mask, at::Tensor& grad_x,
                               at::Tensor& grad_w) {
  using Acc = acc_t<T>;
  const auto acc = c10::CppTypeToScalarType<Acc>::value;
  const at::Tensor wa = w.to(acc).contiguous();
  const Acc* wp = wa.const_data_ptr<Acc>();
  const T* xp = x.const_data_ptr<T>();
  const T* gp = grad_y.const_data_ptr<T>();
  T* dxp = mask[0] ? grad_x.mutable_data_ptr<T>() : nullptr;
  const int64_t nthreads = at::get_num_threads();
  at::Tensor dw_part = mask[1] ? at::zeros({nthreads, d.nblocks, d.out_bs, d.in_bs}, x.options().dtype(acc)) : at::Tensor();
  const int64_t tile = blockdiag_tile_rows(d.n);
  at::parallel_for(0, (d.n + tile - 1) / tile, 1, [&](int64_t i0, int64_t i1) {
    Acc* dw = mask[1] ? dw_part.select(0, at::get_thread_num()).mutable_data_ptr<Acc>() : nullptr;
    std::vector<Acc> xbuf, gbuf, dxbuf;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r0 = i * tile, rows = std::min(tile, d.n - r0);
      const Acc* gt = rows_as_acc<T, Acc>(gp, r0, rows, d.d_out(), gbuf);
      if (mask[0]) {  // grad x_k = g_k w[k]
        Acc* dxt = out_rows_acc<T, Acc>(dxp, r0, rows, d.d_in(), dxbuf);
        if (small_block_gemms<Acc>(d))  // 32-wide blocks: 1.34x, measured as the forward's
          block_rows_small_gemm<Acc>(rows, d.nblocks, d.in_bs, d.out_bs, gt, d.d_out(), d.out_bs, wp, d.in_bs,
                                     d.out_bs * d.in_bs, dxt, d.d_in(), d.in_bs);
        else
          rm_gemm_small_k<Acc>(false, false, d.nblocks, rows, d.in_bs, d.out_bs, gt, d.d_out(), d.out_bs, wp, d.in_bs,
                               d.out_bs * d.in_bs, Acc(0), dxt, d.d_in(), d.in_bs);
        store_rows<T, Acc>(dxp, r0, rows, d.d_in(), dxbuf);
      }
      if (mask[1]) {  // grad w[k] += g_k^T x_k
        const Acc* xt = rows_as_acc<T, Acc>(xp, r0, rows, d.d_in(), xbuf);
        rm_gemm<Acc>(true, false, d.nblocks, d.out_bs, d.in_bs, rows, gt, d.d_out(), d.out_bs, xt, d.d_in(),
                     d.in_bs, Acc(1), dw, d.in_bs, d.out_bs * d.in_bs);
      }
    }
  });
  if (mask[1]) grad_w.copy_(dw_part.sum(0));
}

#define LOWRANK_MONARCH_DISPATCH(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)

std::tuple<at::Tensor, at::Tensor> monarch_forward_cpu(const at::Tensor& x_in, const at::Tensor& w1,
                                                       const at::Tensor& w2, bool save_intermediate) {
  const MonarchDims d = check_monarch_args(x_in, w1, &w2, "monarch_forward");
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty({d.n, d.d_out()}, x.options());
  at::Tensor h = save_intermediate ? at::empty({d.d_mid(), d.n}, x.options()) : at::empty({0}, x.options());
  LOWRANK_MONARCH_DISPATCH(x.scalar_type(), "monarch_forward", [&] {
    monarch_forward_kernel<scalar_t>(x, w1, w2, d, y, save_intermediate ? &h : nullptr);
  });
  return {y, h};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> monarch_backward_cpu(const at::Tensor& grad_y_in,
                                                                    const at::Tensor& x_in, const at::Tensor& w1,
                                                                    const at::Tensor& w2,
                                                                    const std::optional<at::Tensor>& h_in,
                                                                    std::array<bool, 3> mask) {
  const MonarchDims d = check_monarch_args(x_in, w1, &w2, "monarch_backward");
  check_grad_y(grad_y_in, x_in, d.d_out(), "monarch_backward");
  check_saved_h(h_in, x_in, d, "monarch_backward");
  const at::Tensor x = x_in.contiguous(), grad_y = grad_y_in.contiguous();
  const std::optional<at::Tensor> h = h_in ? std::optional<at::Tensor>(h_in->contiguous()) : std::nullopt;
  at::Tensor gx = mask[0] ? at::empty({d.n, d.d_in()}, x.options()) : at::empty({0}, x.options());
  at::Tensor gw1 = mask[1] ? at::empty(w1.sizes(), x.options()) : at::empty({0}, x.options());
  at::Tensor gw2 = mask[2] ? at::empty(w2.sizes(), x.options()) : at::empty({0}, x.options());
  LOWRANK_MONARCH_DISPATCH(x.scalar_type(), "monarch_backward", [&] {
    monarch_backward_kernel<scalar_t>(grad_y, x, w1, w2, h, d, mask, gx, gw1, gw2);
  });
  return {gx, gw1, gw2};
}

at::Tensor blockdiag_forward_cpu(const at::Tensor& x_in, const at::Tensor& w) {
  const MonarchDims d = check_monarch_args(x_in, w, nullptr, "blockdiag_forward");
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty({d.n, d.d_out()}, x.options());
  LOWRANK_MONARCH_DISPATCH(x.scalar_type(), "blockdiag_forward",
                           [&] { blockdiag_forward_kernel<scalar_t>(x, w, d, y); });
  return y;
}

std::tuple<at::Tensor, at::Tensor> blockdiag_backward_cpu(const at::Tensor& grad_y_in, const at::Tensor& x_in,
                                                          const at::Tensor& w, std::array<bool, 2> mask) {
  const MonarchDims d = check_monarch_args(x_in, w, nullptr, "blockdiag_backward");
  check_grad_y(grad_y_in, x_in, d.d_out(), "blockdiag_backward");
  const at::Tensor x = x_in.contiguous(), grad_y = grad_y_in.contiguous();
  at::Tensor gx = mask[0] ? at::empty({d.n, d.d_in()}, x.options()) : at::empty({0}, x.options());
  at::Tensor gw = mask[1] ? at::empty(w.sizes(), x.options()) : at::empty({0}, x.options());
  LOWRANK_MONARCH_DISPATCH(x.scalar_type(), "blockdiag_backward",
                           [&] { blockdiag_backward_kernel<scalar_t>(grad_y, x, w, d, mask, gx, gw); });
  return {gx, gw};
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  m.impl("monarch_forward", TORCH_FN(monarch_forward_cpu));
  m.impl("monarch_backward", TORCH_FN(monarch_backward_cpu));
  m.impl("blockdiag_forward", TORCH_FN(blockdiag_forward_cpu));
  m.impl("blockdiag_backward", TORCH_FN(blockdiag_backward_cpu));
}

}  // namespace lowrank::monarch
