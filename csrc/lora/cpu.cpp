// CPU kernels of the lora family: the dropout-fused passes. Each walks x (and grad_x) in
// tiles of kRows rows: the tile's mask is regenerated from Philox in chunks of 2048 draws
// and applied by vectorized loops, as drop(x) into a per-thread buffer (or to t A before it
// is added), and a BLAS call on the tile does the rank-r product while the tile is in
// cache. drop(x) is never a whole tensor. The backward draws each mask once for both
// gradients (grad_x and grad_a) in one pass over the tiles.
#include <torch/library.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/cpu_blas.h"
#include "common/cpu_clones.h"
#include "common/dtype.h"
#include "common/philox_cpu.h"
#include "lora/ops.h"

namespace lowrank::lora {
namespace {

constexpr int64_t kRows = 32;  // rows per tile: a 32 x 4096 fp32 tile is 512 KiB

// Calls op(lo, hi, r16) over consecutive chunks [lo, hi) of the elements [e0, e1), r16[i]
// holding the 16 Philox bits of element lo + i (common/philox_cpu.h: AVX2 lanes where the
// CPU has them, the same bits), up to 256 Philox groups per chunk.
template <typename Op>
inline void for_each_chunk(const Dropout& d, int64_t e0, int64_t e1, Op&& op) {
  constexpr int kGroups = 256;
  uint16_t r16[kGroups * kPhiloxGroup];
  const int64_t g_end = (e1 + kPhiloxGroup - 1) / kPhiloxGroup;
  for (int64_t g0 = e0 / kPhiloxGroup; g0 < g_end; g0 += kGroups) {
    const int groups = static_cast<int>(std::min<int64_t>(kGroups, g_end - g0));
    philox_random16(d.seed, kDropoutOffset, static_cast<uint64_t>(g0), groups, r16);
    const int64_t first = g0 * kPhiloxGroup;
    const int64_t lo = std::max(e0, first), hi = std::min(e1, first + int64_t{groups} * kPhiloxGroup);
    op(lo, hi, r16 + (lo - first));
  }
}

// The chunk loops (LOWRANK_CPU_CLONES: AVX2 and baseline; the arithmetic of
// dropout_factor16, element by element, with no FMA contraction):
// out[i] = x[i] * mask_i
template <typename T, typename Acc>
LOWRANK_CPU_CLONES void dropped_chunk(const T* __restrict x, const uint16_t* __restrict r16, int64_t n,
                                      uint32_t threshold, float keep, Acc* __restrict out) {
  const Acc k = static_cast<Acc>(keep);
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<Acc>(x[i]) * (r16[i] >= threshold ? k : Acc(0));
}

// gx[i] = gx[i] + prod[i] * mask_i, rounded once into gx's dtype
template <typename T, typename Acc>
LOWRANK_CPU_CLONES void masked_add_chunk(const Acc* __restrict prod, const uint16_t* __restrict r16, int64_t n,
                                         uint32_t threshold, float keep, T* __restrict gx) {
  const Acc k = static_cast<Acc>(keep);
  for (int64_t i = 0; i < n; ++i)
    gx[i] = static_cast<T>(static_cast<Acc>(gx[i]) + prod[i] * (r16[i] >= threshold ? k : Acc(0)));
}

at::Tensor x_dropped_a_cpu(const at::Tensor& x, const at::Tensor& a, const Dropout& d) {
  const int64_t n = x.size(0), d_in = x.size(1), r = a.size(0);
  at::Tensor xa;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_x_dropped_a", [&] {
    using Acc = acc_t<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<Acc>::value;
    const at::Tensor a_acc = a.detach().to(acc).contiguous();
    xa = at::empty({n, r}, x.options().dtype(acc));
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const Acc* ap = a_acc.const_data_ptr<Acc>();
    Acc* xap = xa.mutable_data_ptr<Acc>();
    at::parallel_for(0, (n + kRows - 1) / kRows, 1, [&](int64_t t0, int64_t t1) {
      std::vector<Acc> tile(static_cast<size_t>(kRows * d_in));
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r0 = t * kRows, rows = std::min(kRows, n - r0), e0 = r0 * d_in;
        for_each_chunk(d, e0, e0 + rows * d_in, [&](int64_t lo, int64_t hi, const uint16_t* r16) {
          dropped_chunk(xp + lo, r16, hi - lo, d.threshold, d.keep_scale, tile.data() + (lo - e0));
        });
        // xa rows [rows, r] = drop(x) tile [rows, d_in] A^T
        rm_gemm<Acc>(false, true, rows, r, d_in, tile.data(), d_in, ap, d_in, Acc(0), xap + r0 * r, r);
      }
    });
  });
  return xa.to(x.scalar_type());
}

at::Tensor dropped_backward_cpu(const at::Tensor& t, const at::Tensor& x, const at::Tensor& a, const Dropout& d,
                                at::Tensor& grad_x, bool want_grad_a) {
  const int64_t n = x.size(0), d_in = x.size(1), r = t.size(1);
  const bool want_grad_x = grad_x.defined();
  TORCH_INTERNAL_ASSERT(!want_grad_x || grad_x.is_contiguous());
  at::Tensor grad_a;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_dropped_backward", [&] {
    using Acc = acc_t<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<Acc>::value;
    const at::Tensor t_acc = t.detach().to(acc).contiguous(), a_acc = a.detach().to(acc).contiguous();
    // one partial grad_a per thread, summed in thread order
    at::Tensor partial = want_grad_a ? at::zeros({at::get_num_threads(), r, d_in}, x.options().dtype(acc)) : at::Tensor();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* gxp = want_grad_x ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;
    const Acc* tp = t_acc.const_data_ptr<Acc>();
    const Acc* ap = a_acc.const_data_ptr<Acc>();
    at::parallel_for(0, (n + kRows - 1) / kRows, 1, [&](int64_t i0, int64_t i1) {
      std::vector<Acc> dropped(want_grad_a ? static_cast<size_t>(kRows * d_in) : 0);
      std::vector<Acc> prod(want_grad_x ? static_cast<size_t>(kRows * d_in) : 0);
      Acc* mine = want_grad_a ? partial.select(0, at::get_thread_num()).mutable_data_ptr<Acc>() : nullptr;
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t r0 = i * kRows, rows = std::min(kRows, n - r0), e0 = r0 * d_in;
        const Acc* t_rows = tp + r0 * r;
        if (want_grad_x)  // prod [rows, d_in] = t rows [rows, r] A
          rm_gemm<Acc>(false, false, rows, d_in, r, t_rows, r, ap, d_in, Acc(0), prod.data(), d_in);
        for_each_chunk(d, e0, e0 + rows * d_in, [&](int64_t lo, int64_t hi, const uint16_t* r16) {
          if (want_grad_a) dropped_chunk(xp + lo, r16, hi - lo, d.threshold, d.keep_scale, dropped.data() + (lo - e0));
          if (want_grad_x) masked_add_chunk(prod.data() + (lo - e0), r16, hi - lo, d.threshold, d.keep_scale, gxp + lo);
        });
        if (want_grad_a)  // grad_a [r, d_in] += t rows^T drop(x) tile
          rm_gemm<Acc>(true, false, r, d_in, rows, t_rows, r, dropped.data(), d_in, Acc(1), mine, d_in);
      }
    });
    if (want_grad_a) grad_a = partial.sum(0).to(x.scalar_type());
  });
  return grad_a;
}

constexpr DropoutKernels kCpuKernels{x_dropped_a_cpu, dropped_backward_cpu};

std::tuple<at::Tensor, at::Tensor> lora_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                    const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                                    const at::Tensor& lora_b, const std::optional<at::Tensor>& core,
                                                    const std::optional<at::Tensor>& rank_scale, double scale,
                                                    double dropout_p, int64_t seed,
                                                    const std::optional<at::Tensor>& seed_tensor) {
  return lora_forward(x, weight, bias, lora_a, lora_b, core, rank_scale, scale, dropout_p, seed, seed_tensor,
                      kCpuKernels);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const std::optional<at::Tensor>& core, const std::optional<at::Tensor>& rank_scale,
    const at::Tensor& xa, double scale, double dropout_p, int64_t seed, const std::optional<at::Tensor>& seed_tensor,
    std::array<bool, 5> output_mask) {
  return lora_backward(grad_y, x, weight, lora_a, lora_b, core, rank_scale, xa, scale, dropout_p, seed, seed_tensor,
                       output_mask, kCpuKernels);
}

void lora_merge_cpu(at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
                    const std::optional<at::Tensor>& core, const std::optional<at::Tensor>& rank_scale, double scale) {
  lora_merge_(weight, lora_a, lora_b, core, rank_scale, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  m.impl("lora_forward", TORCH_FN(lora_forward_cpu));
  m.impl("lora_backward", TORCH_FN(lora_backward_cpu));
  m.impl("lora_merge_", TORCH_FN(lora_merge_cpu));
}

}  // namespace lowrank::lora
