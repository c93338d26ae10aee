// CUDA kernels of the monarch family. Verified on a GPU: every CUDA test of
// tests/test_monarch.py passed on an H100 (2026-11-25, commit a7295fc, torch 2.11:
// benchmarks/results/gpu-check-h100-80gb-hbm3-2026-11-25-a7295fc-tests.md).
//
// Every product of the family, forward and backward, is one batched GEMM over the blocks
// whose operands are strided 3-D views: element (b, r, c) of an operand lives at
// b*sb + r*sr + c*sc. The permutation P is such a view (stage 2 reads h[r*nblocks + l],
// strides (1, d_mid, nblocks) over (l, n, r)) — cuBLAS needs a unit stride in every
// operand and would need a permuted copy, so this kernel reads the permuted elements
// straight into its shared-memory tiles. fp32 SIMT tiles (64 x 64 x 16, 4 x 4 per thread),
// fp32 accumulation (fp64 for fp64). That SIMT kernel passed every CUDA test on an H100
// (2026-11-25), at 10-28% of the fp32 GEMM rate and 2-4% of the bf16 one there.
// fp16/bf16 (since then; compiled in CI, NOT YET RUN ON A GPU): on compute capability >= 8.0
// the same strided tiles go through tensor cores (strided_bmm_tc_kernel: WMMA 16 x 16 x 16
// fragments, fp32 accumulators), so the intermediates h and grad h are kept in the inputs'
// dtype, as torch's bf16 bmm reference keeps them (fp32 before, which no tensor-core product
// takes). Not tuned: scalar tile loads, no double buffering, no split over N for the weight
// gradients (small blocks give few CTAs there).
#include <torch/library.h>

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "common/cuda_utils.cuh"
#include "common/dtype.h"
#include "monarch/ops.h"

namespace lowrank::monarch {
namespace {

constexpr int kBM = 64, kBN = 64, kBK = 16, kTM = 4, kTN = 4;
constexpr int kThreads = (kBM / kTM) * (kBN / kTN);  // 256

struct Strides3 {
  int64_t sb, sr, sc;
};

Strides3 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// C[b] = A[b] B[b] with A [batch, M, K], B [batch, K, N], C [batch, M, N] strided views.
template <typename TA, typename TB, typename TC, typename Acc>
__global__ void __launch_bounds__(kThreads)
    strided_bmm_kernel(const TA* __restrict__ a, Strides3 sa, const TB* __restrict__ b, Strides3 sb,
                       TC* __restrict__ c, Strides3 sc, int64_t m_size, int64_t n_size, int64_t k_size) {
  __shared__ Acc tile_a[kBK][kBM + 1];
  __shared__ Acc tile_b[kBK][kBN + 1];
  const int64_t batch = blockIdx.z;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM, n0 = static_cast<int64_t>(blockIdx.y) * kBN;
  a += batch * sa.sb;
  b += batch * sb.sb;
  c += batch * sc.sb;
  const int tid = threadIdx.x, tm = tid / (kBN / kTN), tn = tid % (kBN / kTN);
  // load order: consecutive threads along the operand's unit-stride axis when it has one
  const bool a_m_fast = sa.sr == 1, b_n_fast = sb.sc == 1;
  Acc acc[kTM][kTN] = {};
  for (int64_t k0 = 0; k0 < k_size; k0 += kBK) {
    for (int e = tid; e < kBM * kBK; e += kThreads) {
      const int mm = a_m_fast ? e % kBM : e / kBK, kk = a_m_fast ? e / kBM : e % kBK;
      const int64_t m = m0 + mm, k = k0 + kk;
      tile_a[kk][mm] = (m < m_size && k < k_size) ? static_cast<Acc>(a[m * sa.sr + k * sa.sc]) : Acc(0);
    }
    for (int e = tid; e < kBN * kBK; e += kThreads) {
      const int nn = b_n_fast ? e % kBN : e / kBK, kk = b_n_fast ? e / kBN : e % kBK;
      const int64_t n = n0 + nn, k = k0 + kk;
      tile_b[kk][nn] = (n < n_size && k < k_size) ? static_cast<Acc>(b[k * sb.sr + n * sb.sc]) : Acc(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      Acc av[kTM], bv[kTN];
#pragma unroll
      for (int i = 0; i < kTM; ++i) av[i] = tile_a[kk][tm * kTM + i];
#pragma unroll
      for (int j = 0; j < kTN; ++j) bv[j] = tile_b[kk][tn * kTN + j];
#pragma unroll
      for (int i = 0; i < kTM; ++i)
#pragma unroll
        for (int j = 0; j < kTN; ++j) acc[i][j] += av[i] * bv[j];
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < kTM; ++i) {
    const int64_t m = m0 + tm * kTM + i;
    if (m >= m_size) continue;
#pragma unroll
    for (int j = 0; j < kTN; ++j) {
      const int64_t n = n0 + tn * kTN + j;
      if (n < n_size) c[m * sc.sr + n * sc.sc] = static_cast<TC>(acc[i][j]);
    }
  }
}

// One CTA per 64 x 64 output tile of each block (both kernels below).
dim3 tile_grid(int64_t batch, int64_t m, int64_t n) {
  TORCH_CHECK(batch <= 65535, "monarch: at most 65535 blocks on CUDA, got ", batch);
  TORCH_CHECK(ceil_div<int64_t>(n, kBN) <= 65535, "monarch: a block of more than ", 65535 * kBN, " columns");
  return dim3(static_cast<unsigned>(ceil_div<int64_t>(m, kBM)), static_cast<unsigned>(ceil_div<int64_t>(n, kBN)),
              static_cast<unsigned>(batch));
}

template <typename TA, typename TB, typename TC, typename Acc>
void launch_strided_bmm(const at::Tensor& a, const at::Tensor& b, at::Tensor& c) {
  const int64_t batch = a.size(0), m = a.size(1), k = a.size(2), n = b.size(2);
  if (batch == 0 || m == 0 || n == 0) return;
  const dim3 grid = tile_grid(batch, m, n);
  strided_bmm_kernel<TA, TB, TC, Acc><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      a.const_data_ptr<TA>(), strides_of(a), b.const_data_ptr<TB>(), strides_of(b), c.mutable_data_ptr<TC>(),
      strides_of(c), m, n, k);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The WMMA element type of a 16-bit ATen type (same bits).
template <typename T>
struct WmmaType;
template <>
struct WmmaType<c10::Half> {
  using type = __half;
};
template <>
struct WmmaType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

// C[b] = A[b] B[b] as strided_bmm_kernel, A and B 16-bit (passed as their bits), on tensor
// cores: the 64 x 64 output tile in eight warps of 16 x 32 (two 16 x 16 fp32 accumulator
// fragments each), K staged 32 at a time in shared memory (raw bits: a zero pad is +0), the
// finished tile written back through shared memory to C's strides.
constexpr int kTcBK = 32, kTcLdAB = kTcBK + 8, kTcLdB = kBN + 8, kTcLdC = kBN + 4;  // WMMA: ldm % 8 (16-bit), % 4 (fp32)

template <typename WT, typename TC>
__global__ void __launch_bounds__(kThreads)
    strided_bmm_tc_kernel(const uint16_t* __restrict__ a, Strides3 sa, const uint16_t* __restrict__ b, Strides3 sb,
                          TC* __restrict__ c, Strides3 sc, int64_t m_size, int64_t n_size, int64_t k_size) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  __shared__ __align__(32) uint16_t tile_a[kBM][kTcLdAB];  // (m, k)
  __shared__ __align__(32) uint16_t tile_b[kTcBK][kTcLdB];  // (k, n)
  __shared__ __align__(32) float tile_c[kBM][kTcLdC];
  const int64_t batch = blockIdx.z;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM, n0 = static_cast<int64_t>(blockIdx.y) * kBN;
  a += batch * sa.sb;
  b += batch * sb.sb;
  c += batch * sc.sb;
  const int tid = threadIdx.x, warp = tid / 32, warp_m = warp % 4, warp_n = warp / 4;
  const bool a_m_fast = sa.sr == 1, b_n_fast = sb.sc == 1, c_m_fast = sc.sr == 1;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
  wmma::fill_fragment(acc[0], 0.0f);
  wmma::fill_fragment(acc[1], 0.0f);
  for (int64_t k0 = 0; k0 < k_size; k0 += kTcBK) {
    for (int e = tid; e < kBM * kTcBK; e += kThreads) {
      const int mm = a_m_fast ? e % kBM : e / kTcBK, kk = a_m_fast ? e / kBM : e % kTcBK;
      const int64_t m = m0 + mm, k = k0 + kk;
      tile_a[mm][kk] = (m < m_size && k < k_size) ? a[m * sa.sr + k * sa.sc] : uint16_t{0};
    }
    for (int e = tid; e < kBN * kTcBK; e += kThreads) {
      const int nn = b_n_fast ? e % kBN : e / kTcBK, kk = b_n_fast ? e / kBN : e % kTcBK;
      const int64_t n = n0 + nn, k = k0 + kk;
      tile_b[kk][nn] = (n < n_size && k < k_size) ? b[k * sb.sr + n * sb.sc] : uint16_t{0};
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTcBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, WT, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, reinterpret_cast<const WT*>(&tile_a[warp_m * 16][kk]), kTcLdAB);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, WT, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, reinterpret_cast<const WT*>(&tile_b[kk][warp_n * 32 + j * 16]), kTcLdB);
        wmma::mma_sync(acc[j], fa, fb, acc[j]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < 2; ++j)
    wmma::store_matrix_sync(&tile_c[warp_m * 16][warp_n * 32 + j * 16], acc[j], kTcLdC, wmma::mem_row_major);
  __syncthreads();
  for (int e = tid; e < kBM * kBN; e += kThreads) {
    const int mm = c_m_fast ? e % kBM : e / kBN, nn = c_m_fast ? e / kBM : e % kBN;
    const int64_t m = m0 + mm, n = n0 + nn;
    if (m < m_size && n < n_size) c[m * sc.sr + n * sc.sc] = static_cast<TC>(tile_c[mm][nn]);
  }
#else
  __trap();  // not launched: strided_bmm takes this kernel on compute capability >= 8.0 only
#endif
}

// Whether strided_bmm takes the tensor-core kernel on the current device: compute capability
// >= 8.0 and the kernel image it runs compiled for >= 8.0 (a build for older archs,
// JIT-compiled from their PTX on a newer GPU, has only the kernel's __trap() branch). The image
// is per device, so the answer is too (a host call; cheap next to a launch).
bool tensor_cores_for_16_bit() {
  if (at::cuda::getCurrentDeviceProperties()->major < 8) return false;
  cudaFuncAttributes attr{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, strided_bmm_tc_kernel<__nv_bfloat16, float>));
  return attr.ptxVersion >= 80;
}

template <typename T, typename TC>
void launch_strided_bmm_tc(const at::Tensor& a, const at::Tensor& b, at::Tensor& c) {
  const int64_t batch = a.size(0), m = a.size(1), k = a.size(2), n = b.size(2);
  if (batch == 0 || m == 0 || n == 0) return;
  const dim3 grid = tile_grid(batch, m, n);  // k = 0: no K step runs, the zeroed accumulators are stored
  strided_bmm_tc_kernel<typename WmmaType<T>::type, TC><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const uint16_t*>(a.const_data_ptr<T>()), strides_of(a),
      reinterpret_cast<const uint16_t*>(b.const_data_ptr<T>()), strides_of(b), c.mutable_data_ptr<TC>(),
      strides_of(c), m, n, k);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// c = a b over strided views whose dtypes are each T (the inputs' dtype) or its accumulation
// type: the combinations the family uses. fp16/bf16 a and b go to the tensor-core kernel where
// the GPU has one for them.
template <typename T>
void strided_bmm(const at::Tensor& a, const at::Tensor& b, at::Tensor& c) {
  using Acc = acc_t<T>;
  if constexpr (std::is_same_v<T, Acc>) {
    launch_strided_bmm<T, T, T, Acc>(a, b, c);
  } else {
    const auto acc = c10::CppTypeToScalarType<Acc>::value;
    const bool a_acc = a.scalar_type() == acc, b_acc = b.scalar_type() == acc, c_acc = c.scalar_type() == acc;
    if (!a_acc && !b_acc && tensor_cores_for_16_bit())
      return c_acc ? launch_strided_bmm_tc<T, Acc>(a, b, c) : launch_strided_bmm_tc<T, T>(a, b, c);
    if (!a_acc && !b_acc && c_acc) return launch_strided_bmm<T, T, Acc, Acc>(a, b, c);
    if (a_acc && !b_acc && !c_acc) return launch_strided_bmm<Acc, T, T, Acc>(a, b, c);
    if (!a_acc && !b_acc && !c_acc) return launch_strided_bmm<T, T, T, Acc>(a, b, c);
    if (a_acc && !b_acc && c_acc) return launch_strided_bmm<Acc, T, Acc, Acc>(a, b, c);
    if (!a_acc && b_acc && c_acc) return launch_strided_bmm<T, Acc, Acc, Acc>(a, b, c);
    TORCH_INTERNAL_ASSERT(false, "monarch: unexpected operand dtypes");
  }
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The dtype of the intermediates h and grad h: the inputs' own where tensor cores take fp16/bf16
// products (which need both operands 16-bit), else the accumulation type.
at::ScalarType intermediate_type(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) && tensor_cores_for_16_bit() ? t : acc_type(t);
}

// The views of the family, each [nblocks, rows, cols] over a 2-D row-major tensor:
// block k of the contiguous layout (x[n, k*bs + p], and h in stage 1) ...
at::Tensor blocks_contiguous(const at::Tensor& t, int64_t nb) {  // t [N, nb*bs] -> [nb, N, bs]
  return t.view({t.size(0), nb, t.size(1) / nb}).permute({1, 0, 2});
}
// ... and block l of the interleaved layout (h[n, r*nb + l] in stage 2, y[n, s*nb + l]): P.
at::Tensor blocks_interleaved(const at::Tensor& t, int64_t nb) {  // t [N, bs*nb] -> [nb, N, bs]
  return t.view({t.size(0), t.size(1) / nb, nb}).permute({2, 0, 1});
}

std::tuple<at::Tensor, at::Tensor> monarch_forward_cuda(const at::Tensor& x_in, const at::Tensor& w1,
                                                        const at::Tensor& w2, bool save_intermediate) {
  const MonarchDims d = check_monarch_args(x_in, w1, &w2, "monarch_forward");
  const c10::cuda::OptionalCUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();  // the weights may have any strides
  at::Tensor y = at::empty({d.n, d.d_out()}, x.options());
  // R x in the intermediate type, feature-major [d_mid, N] (the saved h's layout); its
  // transpose is the token-major [N, d_mid] both stages index
  at::Tensor ht = at::empty({d.d_mid(), d.n}, x.options().dtype(intermediate_type(x.scalar_type())));
  at::Tensor h_tokens = ht.t();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "monarch_forward_cuda", [&] {
    at::Tensor stage1_out = blocks_contiguous(h_tokens, d.nblocks);
    strided_bmm<scalar_t>(blocks_contiguous(x, d.nblocks), w1.transpose(1, 2), stage1_out);
    at::Tensor stage2_out = blocks_interleaved(y, d.nblocks);
    strided_bmm<scalar_t>(blocks_interleaved(h_tokens, d.nblocks), w2.transpose(1, 2), stage2_out);
  });
  at::Tensor h = save_intermediate ? ht.to(x.scalar_type()) : at::empty({0}, x.options());
  return {y, h};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> monarch_backward_cuda(const at::Tensor& grad_y_in,
                                                                     const at::Tensor& x_in, const at::Tensor& w1,
                                                                     const at::Tensor& w2,
                                                                     const std::optional<at::Tensor>& h_in,
                                                                     std::array<bool, 3> mask) {
  const MonarchDims d = check_monarch_args(x_in, w1, &w2, "monarch_backward");
  check_grad_y(grad_y_in, x_in, d.d_out(), "monarch_backward");
  check_saved_h(h_in, x_in, d, "monarch_backward");
  const c10::cuda::OptionalCUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), grad_y = grad_y_in.contiguous();
  const std::optional<at::Tensor> h = h_in ? std::optional<at::Tensor>(h_in->contiguous()) : std::nullopt;
  const auto acc = acc_type(x.scalar_type()), inter = intermediate_type(x.scalar_type());
  at::Tensor gx = mask[0] ? at::empty({d.n, d.d_in()}, x.options()) : at::empty({0}, x.options());
  at::Tensor gw1 = at::empty({0}, x.options()), gw2 = at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "monarch_backward_cuda", [&] {
    const at::Tensor gy_blocks = blocks_interleaved(grad_y, d.nblocks);  // [nb, N, out_bs]
    if (mask[2]) {  // grad w2[l] = gy_l^T h_l, h saved or recomputed
      at::Tensor h_tokens;
      if (h) {
        h_tokens = h->t();
      } else {
        h_tokens = at::empty({d.d_mid(), d.n}, x.options().dtype(inter)).t();
        at::Tensor out = blocks_contiguous(h_tokens, d.nblocks);
        strided_bmm<scalar_t>(blocks_contiguous(x, d.nblocks), w1.transpose(1, 2), out);
      }
      at::Tensor dw2 = at::empty(w2.sizes(), x.options().dtype(acc));
      strided_bmm<scalar_t>(gy_blocks.transpose(1, 2), blocks_interleaved(h_tokens, d.nblocks), dw2);
      gw2 = dw2.to(x.scalar_type());
    }
    if (!mask[0] && !mask[1]) return;
    // grad of h, token-major [N, d_mid] in the intermediate type: block l = gy_l w2[l] (P^T by view)
    at::Tensor dh = at::empty({d.n, d.d_mid()}, x.options().dtype(inter));
    at::Tensor dh_out = blocks_interleaved(dh, d.nblocks);
    strided_bmm<scalar_t>(gy_blocks, w2, dh_out);
    const at::Tensor dh_blocks = blocks_contiguous(dh, d.nblocks);  // [nb, N, mid]
    if (mask[1]) {  // grad w1[k] = dh_k^T x_k
      at::Tensor dw1 = at::empty(w1.sizes(), x.options().dtype(acc));
      strided_bmm<scalar_t>(dh_blocks.transpose(1, 2), blocks_contiguous(x, d.nblocks), dw1);
      gw1 = dw1.to(x.scalar_type());
    }
    if (mask[0]) {  // grad x_k = dh_k w1[k]
      at::Tensor out = blocks_contiguous(gx, d.nblocks);
      strided_bmm<scalar_t>(dh_blocks, w1, out);
    }
  });
  return {gx, gw1, gw2};
}

at::Tensor blockdiag_forward_cuda(const at::Tensor& x_in, const at::Tensor& w) {
  const MonarchDims d = check_monarch_args(x_in, w, nullptr, "blockdiag_forward");
  const c10::cuda::OptionalCUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty({d.n, d.d_out()}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "blockdiag_forward_cuda", [&] {
    at::Tensor out = blocks_contiguous(y, d.nblocks);
    strided_bmm<scalar_t>(blocks_contiguous(x, d.nblocks), w.transpose(1, 2), out);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> blockdiag_backward_cuda(const at::Tensor& grad_y_in, const at::Tensor& x_in,
                                                           const at::Tensor& w, std::array<bool, 2> mask) {
  const MonarchDims d = check_monarch_args(x_in, w, nullptr, "blockdiag_backward");
  check_grad_y(grad_y_in, x_in, d.d_out(), "blockdiag_backward");
  const c10::cuda::OptionalCUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), grad_y = grad_y_in.contiguous();
  at::Tensor gx = mask[0] ? at::empty({d.n, d.d_in()}, x.options()) : at::empty({0}, x.options());
  at::Tensor gw = at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "blockdiag_backward_cuda", [&] {
    const at::Tensor gy_blocks = blocks_contiguous(grad_y, d.nblocks);  // [nb, N, out_bs]
    if (mask[0]) {
      at::Tensor out = blocks_contiguous(gx, d.nblocks);
      strided_bmm<scalar_t>(gy_blocks, w, out);
    }
    if (mask[1]) {
      at::Tensor dw = at::empty(w.sizes(), x.options().dtype(acc_type(x.scalar_type())));
      strided_bmm<scalar_t>(gy_blocks.transpose(1, 2), blocks_contiguous(x, d.nblocks), dw);
      gw = dw.to(x.scalar_type());
    }
  });
  return {gx, gw};
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CUDA, m) {
  m.impl("monarch_forward", TORCH_FN(monarch_forward_cuda));
  m.impl("monarch_backward", TORCH_FN(monarch_backward_cuda));
  m.impl("blockdiag_forward", TORCH_FN(blockdiag_forward_cuda));
  m.impl("blockdiag_backward", TORCH_FN(blockdiag_backward_cuda));
}

}  // namespace lowrank::monarch
