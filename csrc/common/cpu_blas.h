#pragma once
// Host only: row-major GEMMs on raw pointers for CPU kernels that call BLAS on cache-sized
// tiles many times per op (a dispatcher call on from_blob views costs microseconds each).
// They go to the Fortran sgemm_/dgemm_ of the BLAS torch itself links (MKL, statically, in
// the x86-64 wheels, which export them), found once at load time. ATen's cpublas::gemm would
// be the natural call but libtorch_cpu does not export it; where the symbols are missing
// (another BLAS, another platform) each call goes through at::mm_out / addmm_ instead.
#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>

#include <dlfcn.h>

#include <algorithm>
#include <initializer_list>
#include <limits>
#include <type_traits>

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

}  // namespace lowrank
