// The op boundary of the lora family: checks every argument, then composes the step from
// ATen GEMMs (the frozen base product and the rank-r products, where BLAS / cuBLAS is
// already optimal) and the device's dropout-fused passes. The LoRA product is accumulated
// into y in place (addmm_ with alpha = scale): no [N, d_out] LoRA tensor, no scale or add pass.
// The small [N, r] and [r, r] work runs in fp32.
#include "lora/ops.h"

#include <ATen/core/grad_mode.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <cmath>
#include <tuple>

#include "common/aten_gemm.h"
#include "common/checks.h"

namespace lowrank::lora {
namespace {

bool is_lora_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

void check_2d(const at::Tensor& t, int64_t rows, int64_t cols, const char* op, const char* arg, const char* want) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, op, ": ", arg, " must have shape ", want,
              " = [", rows, ", ", cols, "], got ", t.sizes());
}

// x [N, d_in] sets N, d_in and the dtype; lora_a sets r; everything else must agree.
struct Shapes {
  int64_t n, d_in, d_out, r;
};

Shapes check_lora_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
                       const at::Tensor& lora_b, const std::optional<at::Tensor>& core,
                       const std::optional<at::Tensor>& rank_scale, double scale, const char* op) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [N, d_in] (lowrank_ext.ops.lora flattens leading dims), got ",
              x.sizes());
  TORCH_CHECK_TYPE(is_lora_dtype(x.scalar_type()), op, ": x must be float32, float16, bfloat16 or float64, got ",
                   x.scalar_type());
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [d_out, d_in], got ", weight.sizes());
  TORCH_CHECK(lora_a.dim() == 2 && lora_a.size(0) >= 1, op, ": lora_a must be 2-D [r, d_in] with r >= 1, got ",
              lora_a.sizes());
  const Shapes s{x.size(0), x.size(1), weight.size(0), lora_a.size(0)};
  check_2d(weight, s.d_out, s.d_in, op, "weight", "[d_out, d_in]");
  check_2d(lora_a, s.r, s.d_in, op, "lora_a", "[r, d_in]");
  check_2d(lora_b, s.d_out, s.r, op, "lora_b", "[d_out, r]");
  if (core) check_2d(*core, s.r, s.r, op, "core", "[r, r]");
  if (rank_scale)
    TORCH_CHECK(rank_scale->dim() == 1 && rank_scale->size(0) == s.r, op, ": rank_scale must have shape [r] = [",
                s.r, "], got ", rank_scale->sizes());
  const std::pair<const char*, const at::Tensor*> others[] = {
      {"weight", &weight}, {"lora_a", &lora_a}, {"lora_b", &lora_b},
      {"core", core ? &*core : nullptr}, {"rank_scale", rank_scale ? &*rank_scale : nullptr}};
  for (const auto& [name, t] : others) {
    if (t == nullptr) continue;
    check_same_device(*t, x, op, name, "x");
    TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type(), op, ": ", name, " is ", t->scalar_type(), " but x is ",
                     x.scalar_type(), "; cast them to one dtype (under autocast the Python wrapper does)");
  }
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  return s;
}

void check_dropout(double p, const char* op) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": dropout_p must be in [0, 1), got ", p);
}

// seed_tensor, when given, is a CPU int64 scalar (reading it never waits for a device)
int64_t resolve_seed(int64_t seed, const std::optional<at::Tensor>& seed_tensor, const char* op) {
  if (!seed_tensor) return seed;
  TORCH_CHECK(seed_tensor->device().is_cpu() && seed_tensor->scalar_type() == at::kLong &&
                  seed_tensor->numel() == 1,
              op, ": seed_tensor must be a CPU int64 tensor of one element, got ", seed_tensor->scalar_type(), " ",
              seed_tensor->sizes(), " on ", seed_tensor->device());
  return seed_tensor->item<int64_t>();
}

// The dtype of the small [N, r] work: fp32, or fp64 for fp64 inputs (gradcheck).
at::ScalarType accumulate_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// h = (xa * rank_scale) core^T in the accumulate dtype; also returns u = xa * rank_scale.
std::pair<at::Tensor, at::Tensor> branch(const at::Tensor& xa, const std::optional<at::Tensor>& core,
                                         const std::optional<at::Tensor>& rank_scale) {
  const auto acc = accumulate_type(xa.scalar_type());
  at::Tensor u = xa.to(acc);
  if (rank_scale) u = at::mul(u, rank_scale->to(acc));
  at::Tensor h = core ? at::mm(u, core->to(acc).t()) : u;
  return {u, h};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lora_forward(const at::Tensor& x, const at::Tensor& weight,
                                                const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                                const at::Tensor& lora_b, const std::optional<at::Tensor>& core,
                                                const std::optional<at::Tensor>& rank_scale, double scale,
                                                double dropout_p, int64_t seed,
                                                const std::optional<at::Tensor>& seed_tensor, const DropoutKernels& k) {
  constexpr const char* op = "lora_forward";
  const at::NoGradGuard no_grad;  // a kernel: the ATen calls below record no graph (autograd is ops/lora.py's)
  const Shapes s = check_lora_args(x, weight, lora_a, lora_b, core, rank_scale, scale, op);
  check_dropout(dropout_p, op);
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == s.d_out, op, ": bias must have shape [d_out] = [", s.d_out,
                "], got ", bias->sizes());
    check_same_device(*bias, x, op, "bias", "x");
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), op, ": bias is ", bias->scalar_type(), " but x is ",
                     x.scalar_type());
  }
  const Dropout d = make_dropout(dropout_p, resolve_seed(seed, seed_tensor, op));
  const at::Tensor xc = x.contiguous(), ac = lora_a.contiguous();
  const at::Tensor xa = d.threshold ? k.x_dropped_a(xc, ac, d) : at::mm(xc, ac.t());
  // without a core or rank scale h is xa itself: no fp32 round trip (two launches on CUDA)
  const at::Tensor h = (core || rank_scale) ? branch(xa, core, rank_scale).second.to(x.scalar_type()) : xa;
  at::Tensor y = bias ? at::addmm(*bias, xc, weight.t()) : at::mm(xc, weight.t());
  addmm_carrying_nan_(y, h, lora_b.t(), /*beta=*/1, /*alpha=*/scale);
  return {y, xa};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const std::optional<at::Tensor>& core, const std::optional<at::Tensor>& rank_scale,
    const at::Tensor& xa, double scale, double dropout_p, int64_t seed, const std::optional<at::Tensor>& seed_tensor,
    std::array<bool, 5> output_mask, const DropoutKernels& k) {
  constexpr const char* op = "lora_backward";
  const at::NoGradGuard no_grad;
  const Shapes s = check_lora_args(x, weight, lora_a, lora_b, core, rank_scale, scale, op);
  check_dropout(dropout_p, op);
  check_2d(grad_y, s.n, s.d_out, op, "grad_y", "[N, d_out]");
  check_2d(xa, s.n, s.r, op, "xa", "[N, r]");
  for (const auto& [name, t] : {std::pair{"grad_y", &grad_y}, std::pair{"xa", &xa}}) {
    check_same_device(*t, x, op, name, "x");
    TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type(), op, ": ", name, " is ", t->scalar_type(), " but x is ",
                     x.scalar_type());
  }
  const auto dtype = x.scalar_type(), acc = accumulate_type(dtype);
  const Dropout d = make_dropout(dropout_p, resolve_seed(seed, seed_tensor, op));
  const at::Tensor g = grad_y.contiguous(), xc = x.contiguous(), ac = lora_a.contiguous();
  // a gradient not asked for comes back empty (a new tensor each: outputs never alias)
  auto none = [&] { return at::empty({0}, x.options()); };
  at::Tensor grad_x = none(), grad_a = none(), grad_b = none(), grad_core = none(), grad_rank_scale = none();

  // u, h of the forward (fp32); h_x: h in x's dtype, xa itself without a core or rank scale
  const bool plain = !core && !rank_scale;
  at::Tensor u, h;
  if (!plain) std::tie(u, h) = branch(xa, core, rank_scale);
  const at::Tensor h_x = plain ? xa : h.to(dtype);
  // dB = scale * g^T h. On CPU it is formed as (h^T g)^T, the same products with alpha applied
  // once as before (BLAS may sum in another order): MKL takes a slow path for g^T h
  // ([d_out, N] x [N, r], r small), 5.8 ms against 0.7 ms at N = 2048, d = 1024, r = 8 (2-core
  // CPU), and the swap was never slower over the benchmark's shapes
  if (output_mask[2]) {
    if (g.is_cpu()) {
      at::Tensor grad_b_t = at::empty({s.r, s.d_out}, x.options());
      grad_b = addmm_carrying_nan_(grad_b_t, h_x.t(), g, /*beta=*/0, /*alpha=*/scale).t().contiguous();
    } else {
      grad_b = at::empty({s.d_out, s.r}, x.options());
      addmm_carrying_nan_(grad_b, g.t(), h_x, /*beta=*/0, /*alpha=*/scale);
    }
  }
  if (output_mask[0]) grad_x = at::mm(g, weight);
  // t: the gradient reaching h, then u, then xa ([N, r], accumulate dtype); g B is computed once.
  // It feeds the grads of x and A, and those of the core and rank scale on its way there: when
  // none is asked (LoRA-FA: dB alone), neither t nor the mask pass is computed. fp16 forms it
  // in fp32: an fp16 g B can pass 65504 where t = scale g B fits (a loss-scaled g with
  // scale < 1), and folding the scale into B first would push small B entries into fp16's
  // subnormals. On CUDA, fp16 and bf16 take cuBLAS's 16-bit-in, fp32-out GEMM (aten::mm.dtype,
  // CUDA only): no fp32 copy of g, no rounding of g B to 16 bits, tensor cores (since 2026-11-25,
  // not yet run on a GPU).
  const bool x_or_a = output_mask[0] || output_mask[1];
  if (!(x_or_a || (core && output_mask[3]) || (rank_scale && output_mask[4])))
    return {grad_x, grad_a, grad_b, grad_core, grad_rank_scale};
  const bool sixteen_bit = dtype == at::kHalf || dtype == at::kBFloat16;
  at::Tensor t = (g.is_cuda() && sixteen_bit ? at::mm(g, lora_b, acc)
                  : dtype == at::kHalf       ? at::mm(g.to(acc), lora_b.to(acc))
                                             : at::mm(g, lora_b).to(acc))
                     .mul_(scale);
  if (core) {
    if (output_mask[3]) grad_core = at::mm(t.t(), u).to(dtype);
    t = at::mm(t, core->to(acc));
  }
  if (rank_scale) {
    if (output_mask[4]) grad_rank_scale = at::mul(t, xa.to(acc)).sum(0).to(dtype);
    t = at::mul(t, rank_scale->to(acc));
  }
  if (!x_or_a) return {grad_x, grad_a, grad_b, grad_core, grad_rank_scale};
  if (d.threshold) {
    at::Tensor masked_grad_x = output_mask[0] ? grad_x : at::Tensor();
    at::Tensor dropped_grad_a = k.dropped_backward(t, xc, ac, d, masked_grad_x, output_mask[1]);
    if (output_mask[1]) grad_a = dropped_grad_a;
  } else {
    const at::Tensor t_x = t.to(dtype);  // once for both products
    if (output_mask[1]) grad_a = at::mm(t_x.t(), xc);
    if (output_mask[0]) grad_x.addmm_(t_x, ac);
  }
  return {grad_x, grad_a, grad_b, grad_core, grad_rank_scale};
}

void lora_merge_(at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
                 const std::optional<at::Tensor>& core, const std::optional<at::Tensor>& rank_scale, double scale) {
  constexpr const char* op = "lora_merge_";
  const at::NoGradGuard no_grad;
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [d_out, d_in], got ", weight.sizes());
  TORCH_CHECK_TYPE(is_lora_dtype(weight.scalar_type()), op, ": weight must be a float tensor, got ",
                   weight.scalar_type());
  TORCH_CHECK(lora_a.dim() == 2 && lora_a.size(0) >= 1, op, ": lora_a must be 2-D [r, d_in] with r >= 1, got ",
              lora_a.sizes());
  const int64_t r = lora_a.size(0), d_out = weight.size(0), d_in = weight.size(1);
  check_2d(lora_a, r, d_in, op, "lora_a", "[r, d_in]");
  check_2d(lora_b, d_out, r, op, "lora_b", "[d_out, r]");
  if (core) check_2d(*core, r, r, op, "core", "[r, r]");
  if (rank_scale)
    TORCH_CHECK(rank_scale->dim() == 1 && rank_scale->size(0) == r, op, ": rank_scale must have shape [r] = [", r,
                "], got ", rank_scale->sizes());
  const std::pair<const char*, const at::Tensor*> others[] = {
      {"lora_a", &lora_a}, {"lora_b", &lora_b}, {"core", core ? &*core : nullptr},
      {"rank_scale", rank_scale ? &*rank_scale : nullptr}};
  for (const auto& [name, t] : others) {
    if (t == nullptr) continue;
    check_same_device(*t, weight, op, name, "weight");
    TORCH_CHECK_TYPE(is_lora_dtype(t->scalar_type()), op, ": ", name, " must be a float tensor, got ",
                     t->scalar_type());
  }
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  // the forward's y = x A^T diag(rank_scale) core^T B^T is x (B core diag(rank_scale) A)^T:
  // fp32 (fp64) delta, then one rounding into weight's dtype
  const auto acc = accumulate_type(weight.scalar_type());
  at::Tensor left = lora_b.to(acc);
  if (core) left = at::mm(left, core->to(acc));
  if (rank_scale) left = at::mul(left, rank_scale->to(acc));
  at::Tensor merged = weight.to(acc, /*non_blocking=*/false, /*copy=*/true);
  addmm_carrying_nan_(merged, left, lora_a.to(acc), /*beta=*/1, /*alpha=*/scale);
  weight.copy_(merged);
}

}  // namespace lowrank::lora
