#pragma once
// Host only: row-major GEMMs on raw pointers for CPU kernels that call BLAS on cache-sized
// tiles many times per op (a dispatcher call on from_blob views costs microseconds each).
// They go to the Fortran sgemm_/dgemm_ of the BLAS torch itself links (MKL, statically, in
// the x86-64 wheels, which export them), found once at load time. ATen's cpublas::gemm would
// be the natural call but libtorch_cpu does not export it; where the symbols are missing
// (another BLAS, another platform) each call goes through at::mm_out / addmm_ instead.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>

#include <dlfcn.h>

#include "common/cpu_clones.h"

#ifdef LOWRANK_X86_AVX2_PATHS
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>
#include <vector>

namespace lowrank {

template <typename Acc>
using blas_gemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const Acc*, const Acc*,
                              const int*, const Acc*, const int*, const Acc*, Acc*, const int*);

template <typename Acc>
blas_gemm_fn<Acc> find_blas_gemm() {
  static const blas_gemm_fn<Acc> fn = [] {
    void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
    void* sym = lib ? dlsym(lib, std::is_same_v<Acc, float> ? "sgemm_" : "dgemm_") : nullptr;
    return reinterpret_cast<blas_gemm_fn<Acc>>(sym);
  }();
  return fn;
}

// MKL's LAPACK on a worker of a parallel region, single-threaded for the guard's lifetime.
// After torch.set_num_threads (which calls mkl_set_num_threads), an MKL geqrf called inside
// an OpenMP parallel region opens its own thread team and waits for threads that nested
// OpenMP never gives it: it hangs (seen: every rsvd of a batch). mkl_set_num_threads_local
// is per thread and returns the previous value, restored on exit; with another BLAS the
// symbol is missing and nothing is done. The exported symbol is the Fortran entry point
// (the C name is an alias of it in torch's static MKL): its argument goes by pointer.
// ATen sets up each thread's thread count lazily, at its first parallel op there (inside
// linalg_qr_out: the triu), by at::set_num_threads, whose mkl_set_num_threads_local(intra-op
// threads) undid the guard on a fresh worker: its first QR ran MKL's nested team (seen in gdb
// with torch 2.11 and 2.14; the batched rsvd hung on the 16-core H100 machine).
// at::get_num_threads does that setup now, before the guard.
class SingleThreadedBlas {
 public:
  SingleThreadedBlas() {
    (void)at::get_num_threads();
    int one = 1;
    if (set_local_ != nullptr) previous_ = set_local_(&one);
  }
  ~SingleThreadedBlas() {
    if (set_local_ != nullptr) set_local_(&previous_);
  }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  using set_local_fn = int (*)(const int*);
  static inline const set_local_fn set_local_ = [] {
    void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
    return reinterpret_cast<set_local_fn>(lib ? dlsym(lib, "mkl_set_num_threads_local_") : nullptr);
  }();
  int previous_ = 0;
};

inline bool fits_blas_int(std::initializer_list<int64_t> v) {
  return std::all_of(v.begin(), v.end(), [](int64_t x) { return x <= std::numeric_limits<int>::max(); });
}

// Row-major batched GEMM: C[b] = alpha op(A[b]) op(B[b]) + beta C[b] with op(A) [m, k],
// op(B) [k, n]; `ta` means A is stored [k, m] (lda its row stride), `tb` that B is stored
// [n, k]. BLAS is column-major, so this is C^T = op(B)^T op(A)^T there. Acc: float or double.
template <typename Acc>
void rm_gemm(bool ta, bool tb, int64_t batch, int64_t m, int64_t n, int64_t k, const Acc* a, int64_t lda,
             int64_t stride_a, const Acc* b, int64_t ldb, int64_t stride_b, Acc beta, Acc* c, int64_t ldc,
             int64_t stride_c, Acc alpha = Acc(1)) {
  if (m == 0 || n == 0) return;
  if (alpha == Acc(0) && k > 0) {
    // BLAS (and addmm_) skip the product for alpha = 0, but C = beta C + 0 (A B) must carry A's
    // and B's NaN/Inf (an adapter's scale of 0, as 0 * (x A^T) in torch): the product is formed
    // (rare: a zero scale) and added times 0
    std::vector<Acc> prod(static_cast<size_t>(m * n));
    for (int64_t i = 0; i < batch; ++i) {
      rm_gemm<Acc>(ta, tb, 1, m, n, k, a + i * stride_a, lda, 0, b + i * stride_b, ldb, 0, Acc(0), prod.data(), n, 0,
                   Acc(1));
      Acc* ci = c + i * stride_c;
      for (int64_t r = 0; r < m; ++r)
        for (int64_t j = 0; j < n; ++j)
          ci[r * ldc + j] = (beta == Acc(0) ? Acc(0) : beta * ci[r * ldc + j]) + Acc(0) * prod[r * n + j];
    }
    return;
  }
  const blas_gemm_fn<Acc> gemm = find_blas_gemm<Acc>();
  if (gemm != nullptr && k > 0 && fits_blas_int({m, n, k, lda, ldb, ldc})) {
    const int mi = static_cast<int>(n), ni = static_cast<int>(m), ki = static_cast<int>(k);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    const char op_a = tb ? 'T' : 'N', op_b = ta ? 'T' : 'N';
    for (int64_t i = 0; i < batch; ++i)
      gemm(&op_a, &op_b, &mi, &ni, &ki, &alpha, b + i * stride_b, &la, a + i * stride_a, &lb, &beta, c + i * stride_c,
           &lc);
    return;
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<Acc>::value);
  for (int64_t i = 0; i < batch; ++i) {
    auto view = [&](const Acc* p, int64_t rows, int64_t cols, int64_t ld, bool t) {
      at::Tensor v = at::from_blob(const_cast<Acc*>(p), t ? at::IntArrayRef{cols, rows} : at::IntArrayRef{rows, cols},
                                   {ld, 1}, opts);
      return t ? v.t() : v;
    };
    at::Tensor cv = at::from_blob(c + i * stride_c, {m, n}, {ldc, 1}, opts);
    const at::Tensor av = view(a + i * stride_a, m, k, lda, ta), bv = view(b + i * stride_b, k, n, ldb, tb);
    if (beta == Acc(0) && alpha == Acc(1)) {
      at::mm_out(cv, av, bv);
    } else if (beta == Acc(0)) {
      cv.zero_().addmm_(av, bv, 1, alpha);  // beta = 0 must not read C (it may hold NaN)
    } else {
      cv.addmm_(av, bv, beta, alpha);
    }
  }
}

// The unbatched form.
template <typename Acc>
void rm_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const Acc* a, int64_t lda, const Acc* b, int64_t ldb,
             Acc beta, Acc* c, int64_t ldc, Acc alpha = Acc(1)) {
  rm_gemm<Acc>(ta, tb, 1, m, n, k, a, lda, 0, b, ldb, 0, beta, c, ldc, 0, alpha);
}

// ---- register-blocked fp32 GEMM for small blocks ----
// BLAS pays a fixed price per call (packing both operands, a separate beta = 0 pass) that
// dominates when a kernel calls it per cache tile on small operands: Monarch's blocks with
// k = 16-64 (MKL's sgemm_scopy / sgemm_mscale were ~18% of that forward's profile), and the
// multilora shrink's [rows, d_in] x [d_in, rank] per chunk of scattered tokens, whose x rows
// it reads in place (a_rows) instead of gathering them. small_gemm_f32 reads the operands
// where they lie: 6 x 16 blocks of C in twelve AVX2 accumulators, B's row (16 values) loaded
// once per k and A broadcast, FMA. Results differ from BLAS only by rounding (FMA, summation
// order), as BLAS differs between CPUs.

#ifdef LOWRANK_X86_AVX2_PATHS
inline bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

// The lanes j < n of 8 (n may be <= 0 or >= 8).
__attribute__((target("avx2"), always_inline)) inline __m256i first_lanes(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// The first 8 lanes at p: all of them (kFull), or those `mask` selects (the others are never
// touched, so a partial block may end at the edge of an allocation).
template <bool kFull>
__attribute__((target("avx2"), always_inline)) inline __m256 load_lanes(const float* p, __m256i mask) {
  if constexpr (kFull) return _mm256_loadu_ps(p);
  else return _mm256_maskload_ps(p, mask);
}

template <bool kFull>
__attribute__((target("avx2"), always_inline)) inline void store_lanes(float* p, __m256i mask, __m256 v) {
  if constexpr (kFull) _mm256_storeu_ps(p, v);
  else _mm256_maskstore_ps(p, mask, v);
}

// C[i, 0:nj] (+)= sum_k A[i, k] B[k, 0:nj] for i < MR, nj <= 16 (kFull: nj == 16), where
// A[i, k] = a[ri sa_i + k sa_k] with ri = a_rows ? a_rows[i] : i and C's row i is
// c + (c_rows ? c_rows[i] : i) ldc (rows of A or C may be scattered: a batch's tokens).
template <int MR, bool kFull>
__attribute__((target("avx2,fma"), always_inline)) inline void small_gemm_tile(
    int64_t k_len, const float* a, int64_t sa_i, int64_t sa_k, const int64_t* a_rows, const float* b, int64_t ldb,
    float* c, int64_t ldc, const int64_t* c_rows, int nj, bool accumulate) {
  const float* ap[MR];
  for (int i = 0; i < MR; ++i) ap[i] = a + (a_rows ? a_rows[i] : i) * sa_i;
  const __m256i m0 = first_lanes(nj), m1 = first_lanes(nj - 8);
  float* cp[MR];
  for (int i = 0; i < MR; ++i) cp[i] = c + (c_rows ? c_rows[i] : i) * ldc;
  // C is read only after the k loop, too late for out-of-order execution to overlap a miss:
  // where it is accumulated into (the multilora expand's scattered y rows, from DRAM), its
  // lines are requested now (64 adapters, d = 4096, rank 64 or 16: expand 3-4% faster)
  if (accumulate)
    for (int i = 0; i < MR; ++i) {
      _mm_prefetch(reinterpret_cast<const char*>(cp[i]), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(cp[i] + 15), _MM_HINT_T0);
    }
  __m256 acc0[MR], acc1[MR];
  for (int i = 0; i < MR; ++i) acc0[i] = acc1[i] = _mm256_setzero_ps();
  for (int64_t k = 0; k < k_len; ++k) {
    const __m256 b0 = load_lanes<kFull>(b + k * ldb, m0), b1 = load_lanes<kFull>(b + k * ldb + 8, m1);
    for (int i = 0; i < MR; ++i) {
      const __m256 av = _mm256_broadcast_ss(ap[i] + k * sa_k);
      acc0[i] = _mm256_fmadd_ps(av, b0, acc0[i]);
      acc1[i] = _mm256_fmadd_ps(av, b1, acc1[i]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    float* ci = cp[i];
    if (accumulate) {
      acc0[i] = _mm256_add_ps(load_lanes<kFull>(ci, m0), acc0[i]);
      acc1[i] = _mm256_add_ps(load_lanes<kFull>(ci + 8, m1), acc1[i]);
    }
    store_lanes<kFull>(ci, m0, acc0[i]);
    store_lanes<kFull>(ci + 8, m1, acc1[i]);
  }
}

template <int MR>
__attribute__((target("avx2,fma"), always_inline)) inline void small_gemm_block(
    int64_t k_len, const float* a, int64_t sa_i, int64_t sa_k, const int64_t* a_rows, const float* b, int64_t ldb,
    float* c, int64_t ldc, const int64_t* c_rows, int nj, bool accumulate) {
  if (nj == 16) small_gemm_tile<MR, true>(k_len, a, sa_i, sa_k, a_rows, b, ldb, c, ldc, c_rows, nj, accumulate);
  else small_gemm_tile<MR, false>(k_len, a, sa_i, sa_k, a_rows, b, ldb, c, ldc, c_rows, nj, accumulate);
}

// C [m, n] (row stride ldc) = (C +) A B, A [m, k] read as a[ri sa_i + k sa_k] (either layout;
// ri = a_rows ? a_rows[i] : i), B [k, n] row-major (row stride ldb), C's row i at
// c + (c_rows ? c_rows[i] : i) ldc. Callers check small_gemm_available().
__attribute__((target("avx2,fma"))) inline void small_gemm_f32(int64_t m, int64_t n, int64_t k, const float* a,
                                                                int64_t sa_i, int64_t sa_k, const float* b,
                                                                int64_t ldb, float* c, int64_t ldc, bool accumulate,
                                                                const int64_t* a_rows = nullptr,
                                                                const int64_t* c_rows = nullptr) {
  // k in panels of kPanelK: a panel's slice of A's rows stays in L2 across C's 16-column blocks
  // (the shrink's [128 rows, d_in] chunk at rank 64 would otherwise come from L3 four times)
  constexpr int64_t kPanelK = 256;
  for (int64_t k0 = 0; k0 < k || (k == 0 && k0 == 0); k0 += kPanelK) {
    const int64_t kk = std::min(kPanelK, k - k0);
    const bool acc = accumulate || k0 > 0;
    for (int64_t j = 0; j < n; j += 16) {
      const int nj = static_cast<int>(std::min<int64_t>(16, n - j));
      const float* bj = b + k0 * ldb + j;
      for (int64_t i = 0; i < m; i += 6) {
        const float* ai = (a_rows ? a : a + i * sa_i) + k0 * sa_k;
        const int64_t* ri = a_rows ? a_rows + i : nullptr;
        float* ci = (c_rows ? c : c + i * ldc) + j;
        const int64_t* rc = c_rows ? c_rows + i : nullptr;
        switch (std::min<int64_t>(6, m - i)) {
          case 6: small_gemm_block<6>(kk, ai, sa_i, sa_k, ri, bj, ldb, ci, ldc, rc, nj, acc); break;
          case 5: small_gemm_block<5>(kk, ai, sa_i, sa_k, ri, bj, ldb, ci, ldc, rc, nj, acc); break;
          case 4: small_gemm_block<4>(kk, ai, sa_i, sa_k, ri, bj, ldb, ci, ldc, rc, nj, acc); break;
          case 3: small_gemm_block<3>(kk, ai, sa_i, sa_k, ri, bj, ldb, ci, ldc, rc, nj, acc); break;
          case 2: small_gemm_block<2>(kk, ai, sa_i, sa_k, ri, bj, ldb, ci, ldc, rc, nj, acc); break;
          default: small_gemm_block<1>(kk, ai, sa_i, sa_k, ri, bj, ldb, ci, ldc, rc, nj, acc); break;
        }
      }
    }
  }
}
#endif

// Whether small_gemm_f32 can run here.
inline bool small_gemm_available() {
#ifdef LOWRANK_X86_AVX2_PATHS
  return cpu_has_avx2_fma();
#else
  return false;
#endif
}

// rm_gemm's arguments, through small_gemm_f32 where it applies (fp32, B not transposed,
// beta 0 or 1, alpha 1, k <= kSmallGemmMaxK, a CPU with AVX2 and FMA), else rm_gemm.
constexpr int64_t kSmallGemmMaxK = 64;

template <typename Acc>
void rm_gemm_small_k(bool ta, bool tb, int64_t batch, int64_t m, int64_t n, int64_t k, const Acc* a, int64_t lda,
                     int64_t stride_a, const Acc* b, int64_t ldb, int64_t stride_b, Acc beta, Acc* c, int64_t ldc,
                     int64_t stride_c) {
#ifdef LOWRANK_X86_AVX2_PATHS
  if constexpr (std::is_same_v<Acc, float>) {
    if (!tb && (beta == 0.f || beta == 1.f) && k <= kSmallGemmMaxK && small_gemm_available()) {
      const int64_t sa_i = ta ? 1 : lda, sa_k = ta ? lda : 1;
      for (int64_t i = 0; i < batch; ++i)
        small_gemm_f32(m, n, k, a + i * stride_a, sa_i, sa_k, b + i * stride_b, ldb, c + i * stride_c, ldc,
                       beta == 1.f);
      return;
    }
  }
#endif
  rm_gemm<Acc>(ta, tb, batch, m, n, k, a, lda, stride_a, b, ldb, stride_b, beta, c, ldc, stride_c);
}

}  // namespace lowrank
