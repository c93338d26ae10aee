// CPU kernels of the lora family: the three dropout-fused passes. Each walks x (or grad_x)
// in tiles of kRows rows: the tile's mask is regenerated from Philox into a per-thread
// buffer as drop(x) (or applied to t A before it is added), and a BLAS call on the tile
// does the rank-r product while the tile is in cache. drop(x) is never a whole tensor.
#include <torch/library.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <vector>

#include "common/philox_cpu.h"
#include "lora/ops.h"

namespace lowrank::lora {
namespace {

constexpr int64_t kRows = 32;  // rows per tile: a 32 x 4096 fp32 tile is 512 KiB

// Calls op(e, factor) for every element e in [e0, e1): the 16-bit draws of up to 256 Philox
// groups at a time (common/philox_cpu.h: AVX2 lanes where the CPU has them, the same bits),
// then one compare per element against the dropout threshold.
template <typename Op>
inline void for_each_factor(const Dropout& d, int64_t e0, int64_t e1, Op&& op) {
  constexpr int kGroups = 256;
  uint16_t r16[kGroups * kPhiloxGroup];
  const int64_t g_end = (e1 + kPhiloxGroup - 1) / kPhiloxGroup;
  for (int64_t g0 = e0 / kPhiloxGroup; g0 < g_end; g0 += kGroups) {
    const int groups = static_cast<int>(std::min<int64_t>(kGroups, g_end - g0));
    philox_random16(d.seed, kDropoutOffset, static_cast<uint64_t>(g0), groups, r16);
    const int64_t first = g0 * kPhiloxGroup;
    const int64_t lo = std::max(e0, first), hi = std::min(e1, first + int64_t{groups} * kPhiloxGroup);
    for (int64_t e = lo; e < hi; ++e) op(e, dropout_factor16(d, r16[e - first]));
  }
}

// out[i] = x[e0 + i] * mask(e0 + i) for the elements [e0, e1) of the flattened input.
template <typename T, typename Acc>
void dropped_span(const T* x, int64_t e0, int64_t e1, const Dropout& d, Acc* out) {
  for_each_factor(d, e0, e1, [&](int64_t e, float f) { out[e - e0] = static_cast<Acc>(x[e]) * static_cast<Acc>(f); });
}

template <typename Acc>
at::Tensor wrap(Acc* data, int64_t rows, int64_t cols) {
  return at::from_blob(data, {rows, cols}, at::TensorOptions().dtype(c10::CppTypeToScalarType<Acc>::value));
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor x_dropped_a_cpu(const at::Tensor& x, const at::Tensor& a, const Dropout& d) {
  const int64_t n = x.size(0), d_in = x.size(1), r = a.size(0);
  const auto acc = acc_type(x.scalar_type());
  const at::Tensor a_t = a.detach().to(acc).t();  // detached: worker threads do not inherit no-grad mode
  at::Tensor xa = at::empty({n, r}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_x_dropped_a", [&] {
    using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, (n + kRows - 1) / kRows, 1, [&](int64_t t0, int64_t t1) {
      std::vector<Acc> tile(static_cast<size_t>(kRows * d_in));
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r0 = t * kRows, rows = std::min(kRows, n - r0);
        dropped_span(xp, r0 * d_in, (r0 + rows) * d_in, d, tile.data());
        at::Tensor out = xa.narrow(0, r0, rows);
        at::mm_out(out, wrap(tile.data(), rows, d_in), a_t);
      }
    });
  });
  return xa.to(x.scalar_type());
}

void add_masked_ta_cpu(at::Tensor& grad_x, const at::Tensor& t, const at::Tensor& a, const Dropout& d) {
  const int64_t n = grad_x.size(0), d_in = grad_x.size(1);
  const auto acc = acc_type(grad_x.scalar_type());
  const at::Tensor a_acc = a.detach().to(acc), t_acc = t.detach().to(acc);
  TORCH_INTERNAL_ASSERT(grad_x.is_contiguous());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_x.scalar_type(), "lora_add_masked_ta", [&] {
    using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    scalar_t* gx = grad_x.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, (n + kRows - 1) / kRows, 1, [&](int64_t t0, int64_t t1) {
      std::vector<Acc> tile(static_cast<size_t>(kRows * d_in));
      for (int64_t i = t0; i < t1; ++i) {
        const int64_t r0 = i * kRows, rows = std::min(kRows, n - r0);
        at::Tensor prod = wrap(tile.data(), rows, d_in);
        at::mm_out(prod, t_acc.narrow(0, r0, rows), a_acc);
        const int64_t e0 = r0 * d_in, e1 = (r0 + rows) * d_in;
        const Acc* prod_p = tile.data();
        for_each_factor(d, e0, e1, [&](int64_t e, float f) {
          gx[e] = static_cast<scalar_t>(static_cast<Acc>(gx[e]) + prod_p[e - e0] * static_cast<Acc>(f));
        });
      }
    });
  });
}

at::Tensor t_dropped_x_cpu(const at::Tensor& t, const at::Tensor& x, const Dropout& d) {
  const int64_t n = x.size(0), d_in = x.size(1), r = t.size(1);
  const auto acc = acc_type(x.scalar_type());
  const at::Tensor t_acc = t.detach().to(acc);
  // one partial per thread, summed in thread order
  at::Tensor partial = at::zeros({at::get_num_threads(), r, d_in}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_t_dropped_x", [&] {
    using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, (n + kRows - 1) / kRows, 1, [&](int64_t t0, int64_t t1) {
      std::vector<Acc> tile(static_cast<size_t>(kRows * d_in));
      at::Tensor mine = partial.select(0, at::get_thread_num());
      for (int64_t i = t0; i < t1; ++i) {
        const int64_t r0 = i * kRows, rows = std::min(kRows, n - r0);
        dropped_span(xp, r0 * d_in, (r0 + rows) * d_in, d, tile.data());
        mine.addmm_(t_acc.narrow(0, r0, rows).t(), wrap(tile.data(), rows, d_in));
      }
    });
  });
  return partial.sum(0).to(x.scalar_type());
}

constexpr DropoutKernels kCpuKernels{x_dropped_a_cpu, add_masked_ta_cpu, t_dropped_x_cpu};

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
