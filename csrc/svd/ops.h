#pragma once
// Op boundary of the svd family (randomized and streaming SVD, batched small SVD).
//   gaussian_sketch: A [m, n] or [b, m, n] -> Y = A Omega [.., m, l], Omega the n x l Philox
//                    Gaussian of svd_math.h (never stored whole)
//   jacobi_svd:      A [.., m, n] -> U [.., m, p], S [.., p], Vh [.., p, n], p = min(m, n)
//   rsvd:            A [.., m, n] -> U [.., m, k], S [.., k], Vh [.., k, n]; optionally
//                    warm-started from a basis [.., m, j] (the sketch's first j columns)
//   batched_rsvd:    b matrices [m, n] of one shape -> U [b, m, k], S [b, k], Vh [b, k, n]
//                    (rsvd of their stack, which the CPU never forms: each is read in place)
//   svd_update:      U [m, k0], S [k0], X [m, c] -> U' [m, k], S' [k]
// The drivers (rsvd, svd_update, the Jacobi wrapper) are device-generic ATen code that calls
// the family's kernels through the dispatcher; each device registers them with its kernels.
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

namespace lowrank::svd {

// fp64 stays fp64; fp32/fp16/bf16 are computed (and returned) in fp32.
at::ScalarType work_dtype(at::ScalarType t);

// [b, m, n] laid out as the transposes of a contiguous [b, n, m] (e.g. G.mT of a stacked batch).
bool is_transposed_batch(const at::Tensor& a);

void check_matrix_arg(const at::Tensor& a, const char* op, const char* name);
void check_sketch_args(const at::Tensor& a, int64_t l);

// One-sided Jacobi on the columns of A [b, m, n] with m >= n, in place: on return the columns
// of `a` are U * S (mutually orthogonal) and `v` [b, n, n] (row-major, overwritten) holds V
// with A_in = (U S) V^T. A device's kernel; the driver below sorts, normalises, fixes signs.
using JacobiKernel = void (*)(at::Tensor& a_cols, at::Tensor& v);

// jacobi_svd for any [.., m, n]: wide inputs are transposed, tall ones (m >= 2n) reduced by a
// Householder QR first, then `kernel` runs on the n x n (or m x n) matrix.
std::tuple<at::Tensor, at::Tensor, at::Tensor> jacobi_svd_driver(const at::Tensor& a, JacobiKernel kernel);

std::tuple<at::Tensor, at::Tensor, at::Tensor> rsvd_driver(const at::Tensor& a, int64_t k, int64_t oversample,
                                                           int64_t n_iter, int64_t seed,
                                                           const std::optional<at::Tensor>& start);

std::tuple<at::Tensor, at::Tensor, at::Tensor> batched_rsvd_driver(at::TensorList a, int64_t k, int64_t oversample,
                                                                   int64_t n_iter, int64_t seed,
                                                                   const std::optional<at::Tensor>& start);

// The CPU sketch of matrices of one shape [m, n] read where they lie: Y [b, m, l] (what
// gaussian_sketch gives for their stack). Inputs already in the work dtype.
at::Tensor gaussian_sketch_list_cpu(const std::vector<at::Tensor>& a, int64_t l, int64_t seed);

std::tuple<at::Tensor, at::Tensor> svd_update_driver(const at::Tensor& u, const at::Tensor& s, const at::Tensor& x,
                                                     int64_t k);

}  // namespace lowrank::svd
