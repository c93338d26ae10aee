// Checks of the galore ops (see ops.h), shared by the CPU and CUDA kernels.
#include "galore/ops.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/ops/clamp_min.h>
#include <ATen/ops/div.h>
#include <ATen/ops/linalg_vector_norm.h>

#include <cmath>
#include <vector>

#include "common/checks.h"

namespace lowrank::galore {
namespace {

void check_fp32_2d(const at::Tensor& t, int64_t rows, int64_t cols, const at::Tensor& ref, const char* op,
                   const char* arg) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, op, ": ", arg, " must have shape [", rows,
              ", ", cols, "], got ", t.sizes());
  check_dtype(t, at::kFloat, op, arg);
  check_same_device(t, ref, op, arg, "param / grad");
}

}  // namespace

void check_grad(const at::Tensor& grad, const char* op, const char* arg) {
  TORCH_CHECK(grad.dim() == 2, op, ": ", arg, " must be 2-D [m, n], got ", grad.sizes());
  float_kind(grad.scalar_type(), op, arg);
}

Projection check_projection(const at::Tensor& proj, const std::optional<at::Tensor>& absmax,
                            const std::optional<at::Tensor>& code, int64_t rank, int64_t blocksize, bool right,
                            int64_t m, int64_t n, const at::Tensor& ref, const char* op) {
  TORCH_CHECK(rank >= 1 && rank <= std::min(m, n), op, ": rank must be in [1, min(m, n)] = [1, ", std::min(m, n),
              "], got ", rank);
  Projection p;
  p.rows = right ? rank : m;
  p.cols = right ? n : rank;
  check_same_device(proj, ref, op, "proj", "param / grad");
  if (proj.scalar_type() != at::kByte) {
    TORCH_CHECK(!absmax && !code, op, ": proj_absmax and proj_code are for a quantized (uint8) proj; proj is ",
                proj.scalar_type());
    check_fp32_2d(proj, p.rows, p.cols, ref, op, right ? "proj (right: [rank, n])" : "proj (left: [m, rank])");
    p.dense = proj.contiguous();
    return p;
  }
  TORCH_CHECK(absmax && code, op, ": a quantized (uint8) proj needs proj_absmax and proj_code");
  check_dtype(*code, at::kFloat, op, "proj_code");
  TORCH_CHECK(code->dim() == 1 && (code->numel() == 256 || code->numel() == 16), op,
              ": proj_code must have 256 (8-bit) or 16 (4-bit) entries, got ", code->sizes());
  p.bits = code->numel() == 256 ? 8 : 4;
  TORCH_CHECK(blocksize >= 64 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0, op,
              ": blocksize must be a power of two in [64, 4096], got ", blocksize);
  p.blocksize = blocksize;
  const int64_t numel = p.rows * p.cols;
  check_numel(proj, p.bits == 8 ? numel : (numel + 1) / 2, op, "proj (quantized)");
  check_dtype(*absmax, at::kFloat, op, "proj_absmax");
  check_numel(*absmax, (numel + blocksize - 1) / blocksize, op, "proj_absmax");
  check_same_device(*absmax, ref, op, "proj_absmax", "param / grad");
  check_same_device(*code, ref, op, "proj_code", "param / grad");
  p.q = proj.contiguous();
  p.absmax = absmax->contiguous();
  p.code = code->contiguous();
  return p;
}

namespace {

// param (and Fira's residual_prev_norm) are written while every other argument is read: any
// overlap raises here, before a write (the kernels would read updated values, or fail halfway
// with residual_prev_norm already advanced).
void check_apply_overlap(const at::Tensor& param, const at::Tensor& direction, const Projection& p,
                         const std::optional<at::Tensor>& grad, const std::optional<at::Tensor>& low,
                         const std::optional<at::Tensor>& residual_prev_norm) {
  std::vector<at::Tensor> read = {direction};
  for (const at::Tensor& t : {p.dense, p.q, p.absmax, p.code})
    if (t.defined()) read.push_back(t);
  for (const auto* t : {&grad, &low})
    if (t->has_value()) read.push_back(**t);
  constexpr const char* op = "galore_apply_";
  at::assert_no_internal_overlap(param);
  for (const at::Tensor& t : read) check_no_overlap(param, t, op, "param", "an input");
  if (residual_prev_norm.has_value()) {
    check_no_overlap(param, *residual_prev_norm, op, "param", "residual_prev_norm");
    for (const at::Tensor& t : read) check_no_overlap(*residual_prev_norm, t, op, "residual_prev_norm", "an input");
  }
}

}  // namespace

Mode check_apply_args(const at::Tensor& param, const at::Tensor& direction, const Projection& p, bool right,
                      double lr, double scale, double weight_decay, int64_t residual_mode,
                      const std::optional<at::Tensor>& grad, const std::optional<at::Tensor>& low,
                      const std::optional<at::Tensor>& residual_prev_norm, double residual_growth) {
  constexpr const char* op = "galore_apply_";
  const int64_t m = param.size(0), n = param.size(1), rank = right ? p.rows : p.cols;
  const int64_t d_rows = right ? m : rank, d_cols = right ? rank : n;
  check_fp32_2d(direction, d_rows, d_cols, param, op, "direction");
  TORCH_CHECK(std::isfinite(lr) && std::isfinite(scale) && std::isfinite(weight_decay), op,
              ": lr, scale and weight_decay must be finite, got ", lr, ", ", scale, ", ", weight_decay);
  TORCH_CHECK(residual_mode >= 0 && residual_mode <= 2, op,
              ": residual_mode must be 0 (galore), 1 (fira) or 2 (frugal), got ", residual_mode);
  check_apply_overlap(param, direction, p, grad, low, residual_prev_norm);
  if (residual_mode == 0) return Mode::Galore;
  TORCH_CHECK(grad && low, op, ": the fira and frugal modes need grad and low (the projected gradient)");
  check_grad(*grad, op, "grad");
  TORCH_CHECK(grad->size(0) == m && grad->size(1) == n, op, ": grad must have param's shape ", param.sizes(),
              ", got ", grad->sizes());
  check_same_device(*grad, param, op, "grad", "param");
  TORCH_CHECK_TYPE(grad->scalar_type() == param.scalar_type(), op, ": grad must have param's dtype (",
                   param.scalar_type(), "), got ", grad->scalar_type());
  check_fp32_2d(*low, d_rows, d_cols, param, op, "low");
  if (residual_mode == 2) return Mode::Frugal;
  TORCH_CHECK(residual_prev_norm.has_value(), op, ": the fira mode needs residual_prev_norm (a one-element fp32 "
              "tensor, 0 before the first step)");
  check_dtype(*residual_prev_norm, at::kFloat, op, "residual_prev_norm");
  check_numel(*residual_prev_norm, 1, op, "residual_prev_norm");
  check_same_device(*residual_prev_norm, param, op, "residual_prev_norm", "param");
  TORCH_CHECK(std::isfinite(residual_growth) && residual_growth >= 1.0, op,
              ": residual_growth must be finite and >= 1, got ", residual_growth);
  return Mode::Fira;
}

at::Tensor fira_residual_scale(const at::Tensor& direction, const at::Tensor& low, bool right) {
  const int64_t dim = right ? 1 : 0;
  const at::Tensor num = at::linalg_vector_norm(direction, 2, at::IntArrayRef{dim});
  return at::div(num, at::clamp_min(at::linalg_vector_norm(low, 2, at::IntArrayRef{dim}), 1e-30)).contiguous();
}

void addmm_back_into_fp32_(at::Tensor& param, const at::Tensor& pm, const at::Tensor& x, bool right, float decay) {
  float beta = decay;
  if (decay == 0.f) {
    param.mul_(0.0);
    beta = 1.f;
  }
  if (right) param.addmm_(x, pm, beta, 1.0);
  else param.addmm_(pm, x, beta, 1.0);
}

}  // namespace lowrank::galore
