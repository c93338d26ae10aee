// CUDA kernels of the svd family. Every CUDA test of tests/test_svd.py passed on an H100
// (2026-11-25, commit a7295fc, torch 2.11:
// benchmarks/results/gpu-check-h100-80gb-hbm3-2026-11-25-a7295fc-tests.md); the Jacobi kernel
// has changed since (below).
//
// gaussian_sketch: Y = A Omega in one tiled SIMT GEMM whose B tiles are generated in shared
// memory from Philox (svd_math.h) and never written to global memory. Each 64 x 64 output
// tile regenerates its 16 x 64 Omega tiles (a few Philox rounds per element: cheap next to
// memory traffic). fp32 (fp16/bf16 inputs are widened by the op first) and fp64.
// jacobi_svd: one thread block per matrix, the round-robin order of the CPU kernel, each warp
// rotating whole column pairs of a step (warp-shuffle dot products in double), a block barrier
// between steps. Same order and formula as the CPU: results agree up to rounding. Since the
// H100 run (where one 256-thread block per matrix, columns in global memory, took ~11 ms per
// 64 x 64 matrix and set rsvd's ~8 ms floor, the warps waiting on L2 latency pair after pair):
// up to 32 warps, one per pair of a step, and the columns, V and the norms in shared memory
// where they fit (fp32 up to p ~ 140-165 columns on an H100, by the row count; larger ones
// stay in global memory).
// That version is compiled in CI but NOT YET RUN ON A GPU.
#include <torch/library.h>

#include <ATen/core/grad_mode.h>

#include <ATen/Dispatch.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/cuda_utils.cuh"
#include "svd/ops.h"
#include "svd/svd_math.h"

namespace lowrank::svd {
namespace {

constexpr int kTile = 64, kTileK = 16, kSketchThreads = 256;

// Y[rows, l] = A[rows, n] Omega[n, l]; 16 x 16 threads, each a 4 x 4 block of the tile.
template <typename T>
__global__ void gaussian_sketch_kernel(const T* __restrict__ a, T* __restrict__ y, int64_t rows, int64_t n,
                                       int64_t l, uint64_t seed) {
  __shared__ T a_tile[kTileK][kTile + 1];  // [k][row]
  __shared__ T w_tile[kTileK][kTile];      // [k][col]
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTile, col0 = static_cast<int64_t>(blockIdx.y) * kTile;
  T acc[4][4] = {};
  for (int64_t k0 = 0; k0 < n; k0 += kTileK) {
    for (int i = threadIdx.x; i < kTileK * kTile; i += kSketchThreads) {
      const int kk = i % kTileK, r = i / kTileK;  // A: consecutive threads read consecutive k of a row
      const int64_t gr = row0 + r, gk = k0 + kk;
      a_tile[kk][r] = (gr < rows && gk < n) ? a[gr * n + gk] : T(0);
      const int c = i / kTileK;                   // Omega: element index e = col * n + k
      const int64_t gc = col0 + c;
      w_tile[kk][c] = (gc < l && gk < n) ? static_cast<T>(sketch_entry(seed, static_cast<uint64_t>(gc * n + gk)))
                                         : T(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      T av[4], wv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = a_tile[kk][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) wv[j] = w_tile[kk][tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * wv[j];
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t gr = row0 + ty * 4 + i;
    if (gr >= rows) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t gc = col0 + tx * 4 + j;
      if (gc < l) y[gr * l + gc] = acc[i][j];
    }
  }
}

at::Tensor gaussian_sketch_cuda(const at::Tensor& a_in, int64_t l, int64_t seed) {
  const at::NoGradGuard no_grad;  // the Autograd key falls through: the output never requires grad
  check_sketch_args(a_in, l);
  const c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = a_in.to(work_dtype(a_in.scalar_type())).contiguous();
  const int64_t n = a.size(-1);
  const int64_t rows = a.numel() / std::max<int64_t>(n, 1);
  std::vector<int64_t> out_shape(a.sizes().begin(), a.sizes().end());
  out_shape.back() = l;
  at::Tensor y = at::zeros(out_shape, a.options());
  if (rows == 0 || l == 0 || n == 0) return y;
  // row tiles on grid.x (2^31 - 1: all batch entries together), sketch-column tiles on grid.y
  TORCH_CHECK(ceil_div<int64_t>(l, kTile) <= 65535, "gaussian_sketch: more than ", 65535 * kTile,
              " sketch columns are not supported on CUDA");
  const dim3 grid(static_cast<unsigned>(ceil_div<int64_t>(rows, kTile)), static_cast<unsigned>(ceil_div<int64_t>(l, kTile)));
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "gaussian_sketch_cuda", [&] {
    gaussian_sketch_kernel<scalar_t><<<grid, kSketchThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        a.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), rows, n, l, static_cast<uint64_t>(seed));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

constexpr int kJacobiMaxThreads = 1024;

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) v += __shfl_xor_sync(0xffffffffu, v, mask);
  return v;
}

template <typename T>
__device__ double warp_dot(const T* x, const T* y, int64_t m, int lane) {
  double acc = 0;
  for (int64_t i = lane; i < m; i += 32) acc += static_cast<double>(x[i]) * static_cast<double>(y[i]);
  return warp_sum(acc);
}

// One matrix per block: w [n][m] (row j = column j), v [n][n]; norm2 is n doubles of scratch.
// kInShared: w, v and norm2 are copied into dynamic shared memory first and back at the end
// (the launcher picks it where they fit): every dot product and rotation then reads shared
// memory instead of L2, whose latency each warp's chain of pairs otherwise waits on. A warp
// per pair of a step, up to 32 warps (the launcher sizes the block to the pairs).
template <typename T, bool kInShared>
__global__ void __launch_bounds__(kJacobiMaxThreads) jacobi_kernel(T* __restrict__ w_all, T* __restrict__ v_all,
                                                                   double* __restrict__ norm2_all, int64_t n,
                                                                   int64_t m, double tol) {
  constexpr int kMaxSweeps = 60;
  T* const w_global = w_all + static_cast<int64_t>(blockIdx.x) * n * m;
  T* const v_global = v_all + static_cast<int64_t>(blockIdx.x) * n * n;
  T* w = w_global;
  T* v = v_global;
  double* norm2;
  if constexpr (kInShared) {
    extern __shared__ double shared_words[];  // norm2 [n], then w [n * m], then v [n * n]
    norm2 = shared_words;
    w = reinterpret_cast<T*>(shared_words + n);
    v = w + n * m;
    for (int64_t i = threadIdx.x; i < n * m; i += blockDim.x) w[i] = w_global[i];
    for (int64_t i = threadIdx.x; i < n * n; i += blockDim.x) v[i] = v_global[i];
    __syncthreads();
  } else {
    norm2 = norm2_all + static_cast<int64_t>(blockIdx.x) * n;
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const int64_t players = n + (n & 1), half = players / 2;
  __shared__ int rotated;
  for (int sweep = 0; sweep < kMaxSweeps; ++sweep) {
    for (int64_t j = warp; j < n; j += warps) {
      const double d = warp_dot(w + j * m, w + j * m, m, lane);
      if (lane == 0) norm2[j] = d;
    }
    if (threadIdx.x == 0) rotated = 0;
    __syncthreads();
    for (int64_t step = 0; step + 1 < players; ++step) {
      for (int64_t i = warp; i < half; i += warps) {
        int64_t a = i == 0 ? players - 1 : (step + i) % (players - 1);
        int64_t b = (step - i + players - 1) % (players - 1);
        if (a >= n || b >= n) continue;
        if (a > b) { const int64_t t = a; a = b; b = t; }
        const double alpha = norm2[a], beta = norm2[b];
        if (alpha == 0.0 || beta == 0.0) continue;
        const double gamma = warp_dot(w + a * m, w + b * m, m, lane);
        if (fabs(gamma) <= tol * sqrt(alpha) * sqrt(beta)) continue;
        const double zeta = (beta - alpha) / (2.0 * gamma);
        const double t = copysign(1.0, zeta) / (fabs(zeta) + sqrt(1.0 + zeta * zeta));
        const double c = 1.0 / sqrt(1.0 + t * t), s = c * t;
        const T cc = static_cast<T>(c), ss = static_cast<T>(s);
        for (int64_t r = lane; r < m; r += 32) {
          const T x = w[a * m + r], y = w[b * m + r];
          w[a * m + r] = cc * x - ss * y;
          w[b * m + r] = ss * x + cc * y;
        }
        for (int64_t r = lane; r < n; r += 32) {
          const T x = v[a * n + r], y = v[b * n + r];
          v[a * n + r] = cc * x - ss * y;
          v[b * n + r] = ss * x + cc * y;
        }
        if (lane == 0) {
          norm2[a] = alpha - t * gamma;
          norm2[b] = beta + t * gamma;
          rotated = 1;
        }
      }
      __syncthreads();
    }
    const bool converged = !rotated;  // every thread reads it after the step's barrier
    __syncthreads();                  // before thread 0 resets it for the next sweep
    if (converged) break;
  }
  if constexpr (kInShared) {
    for (int64_t i = threadIdx.x; i < n * m; i += blockDim.x) w_global[i] = w[i];
    for (int64_t i = threadIdx.x; i < n * n; i += blockDim.x) v_global[i] = v[i];
  }
}

// The dynamic shared memory a matrix needs in the kInShared kernel, or 0 where it does not fit.
template <typename T>
size_t jacobi_shared_bytes(int64_t n, int64_t m) {
  const auto optin = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(double)) + (n * m + n * n) * static_cast<int64_t>(sizeof(T));
  return bytes + 64 <= optin ? static_cast<size_t>(bytes) : 0;  // 64: the static `rotated` and slack
}

void jacobi_columns_cuda(at::Tensor& cols, at::Tensor& v) {
  const int64_t batch = cols.size(0), n = cols.size(1), m = cols.size(2);
  if (batch == 0) return;
  TORCH_CHECK(batch <= 2147483647, "jacobi_svd: batch too large for one CUDA grid");
  const int64_t pairs = (n + 1) / 2;
  const int threads = 32 * static_cast<int>(std::clamp<int64_t>(pairs, 1, kJacobiMaxThreads / 32));
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(cols.scalar_type(), "jacobi_svd_cuda", [&] {
    const double tol = std::sqrt(static_cast<double>(m)) * std::numeric_limits<scalar_t>::epsilon();
    const size_t shared = jacobi_shared_bytes<scalar_t>(n, m);
    if (shared > 0) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(jacobi_kernel<scalar_t, true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(shared)));
      jacobi_kernel<scalar_t, true><<<static_cast<unsigned>(batch), threads, shared, stream>>>(
          cols.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), nullptr, n, m, tol);
    } else {
      at::Tensor norm2 = at::zeros({batch, n}, cols.options().dtype(at::kDouble));
      jacobi_kernel<scalar_t, false><<<static_cast<unsigned>(batch), threads, 0, stream>>>(
          cols.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), norm2.data_ptr<double>(), n, m, tol);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> jacobi_svd_cuda(const at::Tensor& a) {
  const c10::cuda::OptionalCUDAGuard guard(first_cuda_device(a));
  return jacobi_svd_driver(a, jacobi_columns_cuda);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rsvd_cuda(const at::Tensor& a, int64_t k, int64_t oversample,
                                                         int64_t n_iter, int64_t seed,
                                                         const std::optional<at::Tensor>& start) {
  const c10::cuda::OptionalCUDAGuard guard(first_cuda_device(a));
  return rsvd_driver(a, k, oversample, n_iter, seed, start);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batched_rsvd_cuda(at::TensorList a, int64_t k, int64_t oversample,
                                                                 int64_t n_iter, int64_t seed,
                                                                 const std::optional<at::Tensor>& start) {
  const c10::cuda::OptionalCUDAGuard guard(first_cuda_device(a));  // the driver checks the list
  return batched_rsvd_driver(a, k, oversample, n_iter, seed, start);
}

std::tuple<at::Tensor, at::Tensor> svd_update_cuda(const at::Tensor& u, const at::Tensor& s, const at::Tensor& x,
                                                   int64_t k) {
  const c10::cuda::OptionalCUDAGuard guard(first_cuda_device(u, s, x));
  return svd_update_driver(u, s, x, k);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CUDA, m) {
  m.impl("gaussian_sketch", TORCH_FN(gaussian_sketch_cuda));
  m.impl("jacobi_svd", TORCH_FN(jacobi_svd_cuda));
  m.impl("rsvd", TORCH_FN(rsvd_cuda));
  m.impl("batched_rsvd", TORCH_FN(batched_rsvd_cuda));
  m.impl("svd_update", TORCH_FN(svd_update_cuda));
}

}  // namespace lowrank::svd
