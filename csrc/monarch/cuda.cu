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
// fp32 accumulation (fp64 for fp64); intermediates are kept in the accumulation type.
// Not tuned: no tensor cores, no split over N for the weight gradients (small blocks give
// few CTAs there). A tensor-core (mma) version is the next step once this is verified.
#include <torch/library.h>

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

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

template <typename TA, typename TB, typename TC, typename Acc>
void launch_strided_bmm(const at::Tensor& a, const at::Tensor& b, at::Tensor& c) {
  const int64_t batch = a.size(0), m = a.size(1), k = a.size(2), n = b.size(2);
  if (batch == 0 || m == 0 || n == 0) return;
  TORCH_CHECK(batch <= 65535, "monarch: at most 65535 blocks on CUDA, got ", batch);
  const dim3 grid(static_cast<unsigned>(ceil_div<int64_t>(m, kBM)), static_cast<unsigned>(ceil_div<int64_t>(n, kBN)),
                  static_cast<unsigned>(batch));
  TORCH_CHECK(ceil_div<int64_t>(n, kBN) <= 65535, "monarch: a block of more than ", 65535 * kBN, " columns");
  strided_bmm_kernel<TA, TB, TC, Acc><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      a.const_data_ptr<TA>(), strides_of(a), b.const_data_ptr<TB>(), strides_of(b), c.mutable_data_ptr<TC>(),
      strides_of(c), m, n, k);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// c = a b over strided views whose dtypes are each T (the inputs' dtype) or its accumulation
// type: the combinations the family uses.
template <typename T>
void strided_bmm(const at::Tensor& a, const at::Tensor& b, at::Tensor& c) {
  using Acc = acc_t<T>;
  if constexpr (std::is_same_v<T, Acc>) {
    launch_strided_bmm<T, T, T, Acc>(a, b, c);
  } else {
    const auto acc = c10::CppTypeToScalarType<Acc>::value;
    const bool a_acc = a.scalar_type() == acc, b_acc = b.scalar_type() == acc, c_acc = c.scalar_type() == acc;
    if (!a_acc && !b_acc && c_acc) return launch_strided_bmm<T, T, Acc, Acc>(a, b, c);
    if (a_acc && !b_acc && !c_acc) return launch_strided_bmm<Acc, T, T, Acc>(a, b, c);
    if (!a_acc && !b_acc && !c_acc) return launch_strided_bmm<T, T, T, Acc>(a, b, c);
    if (a_acc && !b_acc && c_acc) return launch_strided_bmm<Acc, T, Acc, Acc>(a, b, c);
    if (!a_acc && b_acc && c_acc) return launch_strided_bmm<T, Acc, Acc, Acc>(a, b, c);
    TORCH_INTERNAL_ASSERT(false, "monarch: unexpected operand dtypes");
  }
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

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
  // R x in the accumulation type, feature-major [d_mid, N] (the saved h's layout); its
  // transpose is the token-major [N, d_mid] both stages index
  at::Tensor ht = at::empty({d.d_mid(), d.n}, x.options().dtype(acc_type(x.scalar_type())));
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
  const auto acc = acc_type(x.scalar_type());
  at::Tensor gx = mask[0] ? at::empty({d.n, d.d_in()}, x.options()) : at::empty({0}, x.options());
  at::Tensor gw1 = at::empty({0}, x.options()), gw2 = at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "monarch_backward_cuda", [&] {
    const at::Tensor gy_blocks = blocks_interleaved(grad_y, d.nblocks);  // [nb, N, out_bs]
    if (mask[2]) {  // grad w2[l] = gy_l^T h_l, h saved or recomputed
      at::Tensor h_tokens;
      if (h) {
        h_tokens = h->t();
      } else {
        h_tokens = at::empty({d.d_mid(), d.n}, x.options().dtype(acc)).t();
        at::Tensor out = blocks_contiguous(h_tokens, d.nblocks);
        strided_bmm<scalar_t>(blocks_contiguous(x, d.nblocks), w1.transpose(1, 2), out);
      }
      at::Tensor dw2 = at::empty(w2.sizes(), x.options().dtype(acc));
      strided_bmm<scalar_t>(gy_blocks.transpose(1, 2), blocks_interleaved(h_tokens, d.nblocks), dw2);
      gw2 = dw2.to(x.scalar_type());
    }
    if (!mask[0] && !mask[1]) return;
    // grad of h, token-major [N, d_mid] in the accumulation type: block l = gy_l w2[l] (P^T by view)
    at::Tensor dh = at::empty({d.n, d.d_mid()}, x.options().dtype(acc));
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
