// CUDA kernels of the galore family. Verified on a GPU: every CUDA test of
// tests/test_galore_ops.py passed on an H100 (2026-11-25, commit a7295fc, torch 2.11:
// benchmarks/results/gpu-check-h100-80gb-hbm3-2026-11-25-a7295fc-tests.md).
//
// fp32 gradients / params with a dense fp32 P (GaLore mode) go to cuBLAS as on the CPU: the
// projection is one at::mm, the apply one addmm_ into param (beta = the weight decay). On the
// H100 the SIMT tiles below ran that case at 9% of the fp32 peak (project + apply 0.24x the
// torch composition); the cuBLAS path is NOT YET RUN ON A GPU (2026-11-25). Everything else
// (quantized P, fp16/bf16, Fira and FRUGAL) stays on the tiles, which passed every CUDA test:
// SIMT tile products (64 x 64 outputs per block of 256 threads, 4 x 4 per
// thread, K in steps of 16) whose operands are read through loaders: the projection P is
// dense fp32 or block-wise INT8/INT4, dequantized as its tile is loaded (the fp32 P never
// exists in memory), and transposes are strides. galore_apply_ computes back(direction)
// (and back(low) for the residual modes) tile by tile and updates param in the epilogue:
// param is read and written once, grad read once (twice for Fira: the first pass only sums
// the scaled residual's squares, a one-thread kernel turns that into the limiter's factor
// and the new norm on the device, the second pass applies with the residual's product part
// folded into the direction, so it is one tile product too; no host synchronisation).
#include <torch/library.h>

#include <ATen/Dispatch.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/zeros.h>

#include "common/cuda_utils.cuh"
#include "common/dtype.h"
#include "galore/ops.h"
#include "quant/quant_math.h"

namespace lowrank::galore {
namespace {

constexpr int kThreads = 256, kTile = 64, kTileK = 16, kPerThread = kTile / 16;

// Element (r, c) of an fp32 matrix stored densely or block-wise quantized; any strides.
struct Operand {
  const float* dense = nullptr;  // null: quantized
  const uint8_t* q = nullptr;
  const float* absmax = nullptr;
  const float* code = nullptr;
  int bits = 32;
  int64_t blocksize = 0;
  int64_t stride_r = 0, stride_c = 0;
  __device__ __forceinline__ bool unit_c() const { return stride_c == 1; }  // (r, c) and (r, c + 1) adjacent
  __device__ __forceinline__ float operator()(int64_t r, int64_t c) const {
    const int64_t e = r * stride_r + c * stride_c;
    return dense != nullptr ? dense[e] : quant::dequantize_element(q, absmax, code, bits, blocksize, e);
  }
};

// Element (r, c) of a row-major [., ld] tensor of dtype T, as fp32.
template <typename T>
struct RowMajor {
  const T* p;
  int64_t ld;
  __device__ __forceinline__ bool unit_c() const { return true; }
  __device__ __forceinline__ float operator()(int64_t r, int64_t c) const { return static_cast<float>(p[r * ld + c]); }
};

Operand operand(const Projection& proj, bool transposed) {
  Operand o;
  if (proj.quantized()) {
    o.q = proj.q.const_data_ptr<uint8_t>();
    o.absmax = proj.absmax.const_data_ptr<float>();
    o.code = proj.code.const_data_ptr<float>();
    o.bits = proj.bits;
    o.blocksize = proj.blocksize;
  } else {
    o.dense = proj.dense.const_data_ptr<float>();
  }
  o.stride_r = transposed ? 1 : proj.cols;
  o.stride_c = transposed ? proj.cols : 1;
  return o;
}

Operand operand(const at::Tensor& fp32_rowmajor) {
  Operand o;
  o.dense = fp32_rowmajor.const_data_ptr<float>();
  o.stride_r = fp32_rowmajor.size(1);
  o.stride_c = 1;
  return o;
}

struct Smem {
  float a[kTileK][kTile + 1];
  float b[kTileK][kTile + 1];
};

// acc += A[a0 : a0 + 64, :K] B[:K, b0 : b0 + 64] (zero outside [M, N]).
template <typename LA, typename LB>
__device__ void tile_product(const LA& A, const LB& B, int64_t M, int64_t N, int64_t K, int64_t a0, int64_t b0,
                             float (&acc)[kPerThread][kPerThread], Smem& s) {
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
    // consecutive threads load consecutive addresses (coalesced): along k where the operand
    // is contiguous in k, else along its other index (uniform branches: the layouts are)
    const bool a_along_k = A.unit_c(), b_along_k = !B.unit_c();
    for (int e = tid; e < kTileK * kTile; e += kThreads) {
      const int kk = a_along_k ? e % kTileK : e / kTile, i = a_along_k ? e / kTileK : e % kTile;
      s.a[kk][i] = (k0 + kk < K && a0 + i < M) ? A(a0 + i, k0 + kk) : 0.f;
    }
    for (int e = tid; e < kTileK * kTile; e += kThreads) {
      const int kk = b_along_k ? e % kTileK : e / kTile, j = b_along_k ? e / kTileK : e % kTile;
      s.b[kk][j] = (k0 + kk < K && b0 + j < N) ? B(k0 + kk, b0 + j) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      float fa[kPerThread], fb[kPerThread];
#pragma unroll
      for (int u = 0; u < kPerThread; ++u) fa[u] = s.a[kk][ty * kPerThread + u];
#pragma unroll
      for (int v = 0; v < kPerThread; ++v) fb[v] = s.b[kk][tx + 16 * v];
#pragma unroll
      for (int u = 0; u < kPerThread; ++u)
#pragma unroll
        for (int v = 0; v < kPerThread; ++v) acc[u][v] += fa[u] * fb[v];
    }
    __syncthreads();
  }
}

// ---- galore_project: out [M, N] = A B ----

template <typename LA, typename LB>
__global__ void __launch_bounds__(kThreads) project_kernel(LA A, LB B, float* __restrict__ out, int64_t M,
                                                           int64_t N, int64_t K) {
  __shared__ Smem s;
  const int64_t a0 = int64_t{blockIdx.x} * kTile, b0 = int64_t{blockIdx.y} * kTile;
  float acc[kPerThread][kPerThread] = {};
  tile_product(A, B, M, N, K, a0, b0, acc, s);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int u = 0; u < kPerThread; ++u)
#pragma unroll
    for (int v = 0; v < kPerThread; ++v) {
      const int64_t a = a0 + ty * kPerThread + u, b = b0 + tx + 16 * v;
      if (a < M && b < N) out[a * N + b] = acc[u][v];
    }
}

// Row tiles on grid.x (up to 2^31 - 1: an embedding's millions of rows fit), column tiles on
// grid.y (at most 65535, i.e. 4.19M columns).
dim3 grid_for(int64_t rows, int64_t cols) {
  const int64_t gx = ceil_div<int64_t>(rows, kTile), gy = ceil_div<int64_t>(cols, kTile);
  TORCH_CHECK(gy <= 65535, "galore: too many columns for one launch (", cols, ")");
  return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
}

at::Tensor galore_project_cuda(const at::Tensor& grad, const at::Tensor& proj, const std::optional<at::Tensor>& absmax,
                               const std::optional<at::Tensor>& code, int64_t rank, int64_t blocksize, bool right) {
  constexpr const char* op = "galore_project";
  const at::NoGradGuard no_grad;  // the Autograd key falls through: keep the ATen calls below off the tape
  check_grad(grad, op, "grad");
  const int64_t m = grad.size(0), n = grad.size(1);
  const Projection p = check_projection(proj, absmax, code, rank, blocksize, right, m, n, grad, op);
  const c10::cuda::OptionalCUDAGuard guard(grad.device());
  const at::Tensor g = grad.contiguous();
  if (!p.quantized() && g.scalar_type() == at::kFloat) {  // fp32 P and G: cuBLAS, as on the CPU
    return right ? at::mm(g, p.dense.t()) : at::mm(p.dense.t(), g);
  }
  at::Tensor out = at::empty({right ? m : rank, right ? rank : n}, grad.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "galore_project_cuda", [&] {
    const RowMajor<scalar_t> gm{g.const_data_ptr<scalar_t>(), n};
    if (right) {  // R [m, rank] = G [m, n] P^T: B(k, b) = P(b, k)
      project_kernel<<<grid_for(m, rank), kThreads, 0, stream>>>(gm, operand(p, /*transposed=*/true),
                                                                  out.mutable_data_ptr<float>(), m, rank, n);
    } else {  // R [rank, n] = P^T [rank, m] G [m, n]: A(a, k) = P(k, a)
      project_kernel<<<grid_for(rank, n), kThreads, 0, stream>>>(operand(p, /*transposed=*/true), gm,
                                                                  out.mutable_data_ptr<float>(), rank, n, m);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ---- galore_apply_ ----

enum Pass : int { kUpdate = 0, kFiraNorm = 1 };

template <typename W>
struct ApplyParams {
  W* param;
  const W* grad;           // residual modes
  Operand a_dir, b_dir;    // back(direction) = a_dir b_dir
  Operand a_low, b_low;    // back(low) = a_low b_low (residual modes)
  const float* residual_scale;  // Fira: [n] (left) or [m] (right)
  const float* fira_factor;     // Fira: the limiter's factor, set on the device
  double* sumsq;                // Fira's norm pass
  int64_t m, n, rank;
  float decay, alpha, sign_step;
  int mode;
  bool right;
};

template <typename W>
__global__ void __launch_bounds__(kThreads) apply_kernel(ApplyParams<W> p, int pass) {
  __shared__ Smem s;
  const int64_t i0 = int64_t{blockIdx.x} * kTile, j0 = int64_t{blockIdx.y} * kTile;
  const bool residual = p.mode != static_cast<int>(Mode::Galore);
  const bool is_fira = p.mode == static_cast<int>(Mode::Fira);
  float acc_d[kPerThread][kPerThread] = {}, acc_r[kPerThread][kPerThread] = {};
  if (pass == kUpdate) tile_product(p.a_dir, p.b_dir, p.m, p.n, p.rank, i0, j0, acc_d, s);
  // Fira's update pass has back(low) folded into the direction (see galore_apply_cuda): acc_r stays 0
  if (residual && !(is_fira && pass == kUpdate)) tile_product(p.a_low, p.b_low, p.m, p.n, p.rank, i0, j0, acc_r, s);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const float fira = (is_fira && pass == kUpdate) ? p.alpha * *p.fira_factor : 0.f;
  double local = 0.0;
#pragma unroll
  for (int u = 0; u < kPerThread; ++u) {
    const int64_t i = i0 + ty * kPerThread + u;
#pragma unroll
    for (int v = 0; v < kPerThread; ++v) {
      const int64_t j = j0 + tx + 16 * v;
      if (i >= p.m || j >= p.n) continue;
      const int64_t e = i * p.n + j;
      float res = 0.f;
      if (residual) {
        res = static_cast<float>(p.grad[e]) - acc_r[u][v];
        if (is_fira) res *= p.residual_scale[p.right ? i : j];
      }
      if (pass == kFiraNorm) {
        local += static_cast<double>(res) * res;
        continue;
      }
      float w = p.decay * static_cast<float>(p.param[e]) + p.alpha * acc_d[u][v];
      if (is_fira) w += fira * res;
      if (p.mode == static_cast<int>(Mode::Frugal)) w += p.sign_step * static_cast<float>((res > 0.f) - (res < 0.f));
      p.param[e] = static_cast<W>(w);
    }
  }
  if (pass == kFiraNorm) {
#pragma unroll
    for (int mask = 16; mask > 0; mask >>= 1) local += __shfl_xor_sync(0xffffffffu, local, mask);
    if ((threadIdx.x & 31) == 0) atomicAdd(p.sumsq, local);
  }
}

// Fira's limiter on the device: factor = min(1, growth * prev / norm) when prev > 0; prev <- the applied norm.
__global__ void fira_limit_kernel(const double* sumsq, float* prev_norm, float* factor, float growth) {
  float norm = static_cast<float>(sqrt(*sumsq));
  const float prev = *prev_norm, limit = growth * prev;
  float f = 1.f;
  if (prev > 0.f && norm > limit) {
    f = limit / norm;
    norm = limit;
  }
  *factor = f;
  *prev_norm = norm;
}

void galore_apply_cuda(at::Tensor& param, const at::Tensor& direction, const at::Tensor& proj,
                       const std::optional<at::Tensor>& absmax, const std::optional<at::Tensor>& code, int64_t rank,
                       int64_t blocksize, bool right, double lr, double scale, double weight_decay,
                       int64_t residual_mode,
                       const std::optional<at::Tensor>& grad, const std::optional<at::Tensor>& low,
                       const std::optional<at::Tensor>& residual_prev_norm, double residual_growth) {
  constexpr const char* op = "galore_apply_";
  const at::NoGradGuard no_grad;  // as on CPU: a leaf param that requires grad is updated in place
  check_grad(param, op, "param");
  const int64_t m = param.size(0), n = param.size(1);
  const Projection p = check_projection(proj, absmax, code, rank, blocksize, right, m, n, param, op);
  const Mode mode = check_apply_args(param, direction, p, right, lr, scale, weight_decay, residual_mode, grad,
                                     low, residual_prev_norm, residual_growth);
  const bool residual = mode != Mode::Galore;
  const c10::cuda::OptionalCUDAGuard guard(param.device());
  if (param.numel() == 0) return;
  const at::Tensor d = direction.contiguous();
  const float decay = static_cast<float>(1.0 - lr * weight_decay);
  if (mode == Mode::Galore && !p.quantized() && param.scalar_type() == at::kFloat) {
    // fp32 param, fp32 P: one cuBLAS addmm_ into param, as the CPU kernel does
    addmm_back_into_fp32_(param, p.dense, d.mul(static_cast<float>(-lr * scale) * decay), right, decay);
    return;
  }
  at::Tensor work = param.is_contiguous() ? param : param.contiguous();
  const at::Tensor lo = residual ? low->contiguous() : at::Tensor();
  const at::Tensor g = residual ? grad->contiguous() : at::Tensor();
  const at::Tensor s = mode == Mode::Fira ? fira_residual_scale(d, lo, right) : at::Tensor();
  at::Tensor sumsq, factor;  // Fira, on the device: the scaled residual's sum of squares, the limiter's factor
  at::Tensor fira_direction;
  if (mode == Mode::Fira) {
    sumsq = at::zeros({1}, param.options().dtype(at::kDouble));
    factor = at::empty({1}, param.options().dtype(at::kFloat));
  }
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, work.scalar_type(), "galore_apply_cuda", [&] {
    ApplyParams<scalar_t> ap{};
    ap.param = work.mutable_data_ptr<scalar_t>();
    ap.grad = residual ? g.const_data_ptr<scalar_t>() : nullptr;
    // left: back(X) = P [m, rank] X [rank, n]; right: back(X) = X [m, rank] P [rank, n]
    ap.a_dir = right ? operand(d) : operand(p, false);
    ap.b_dir = right ? operand(p, false) : operand(d);
    if (residual) {
      ap.a_low = right ? operand(lo) : operand(p, false);
      ap.b_low = right ? operand(p, false) : operand(lo);
    }
    ap.residual_scale = mode == Mode::Fira ? s.const_data_ptr<float>() : nullptr;
    ap.sumsq = mode == Mode::Fira ? sumsq.mutable_data_ptr<double>() : nullptr;
    ap.fira_factor = mode == Mode::Fira ? factor.const_data_ptr<float>() : nullptr;
    ap.m = m, ap.n = n, ap.rank = rank;
    ap.decay = decay;
    ap.alpha = static_cast<float>(-lr * scale) * decay;
    ap.sign_step = static_cast<float>(-lr) * decay;
    ap.mode = static_cast<int>(mode);
    ap.right = right;
    const dim3 grid = grid_for(m, n);
    if (mode == Mode::Fira) {
      apply_kernel<<<grid, kThreads, 0, stream>>>(ap, kFiraNorm);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      fira_limit_kernel<<<1, 1, 0, stream>>>(sumsq.const_data_ptr<double>(),
                                             residual_prev_norm->mutable_data_ptr<float>(),
                                             factor.mutable_data_ptr<float>(), static_cast<float>(residual_growth));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      // fold the scaled residual's product part into the direction, on the device (after the
      // limiter, in stream order): back(d) - f back(low) * s = back(d - f low * s), so the update
      // pass is one tile product plus f * s * G in its epilogue
      fira_direction = at::sub(d, at::mul(at::mul(lo, right ? s.unsqueeze(1) : s.unsqueeze(0)), factor));
      ap.a_dir = right ? operand(fira_direction) : operand(p, false);
      ap.b_dir = right ? operand(p, false) : operand(fira_direction);
    }
    apply_kernel<<<grid, kThreads, 0, stream>>>(ap, kUpdate);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (!work.is_same(param)) param.copy_(work);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CUDA, m) {
  m.impl("galore_project", TORCH_FN(galore_project_cuda));
  m.impl("galore_apply_", TORCH_FN(galore_apply_cuda));
}

}  // namespace lowrank::galore
