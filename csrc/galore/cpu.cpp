// CPU kernels of the galore family. P is small ([m, rank] or [rank, n]): a quantized P is
// dequantized once per call into an fp32 buffer (with the shared quant math) and the
// products go to BLAS. galore_apply_ on an fp32 param is one addmm_ into it (BLAS applies the
// weight decay inside its kernel) plus, for the residual modes, one pass over param and G;
// Fira first reads G once for the scaled residual's norm (the limiter), then folds the
// residual's product part into the same addmm_ (back(low) * s = back(low * s)). fp16 / bf16
// params go panel by panel (kPanel rows, in parallel): the panel's products into a per-thread
// buffer, then one fp32 pass and one rounding. No [m, n] temporary anywhere.
#include <torch/library.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>

#include <cmath>
#include <vector>

#include "common/cpu_parallel.h"
#include "common/dtype.h"
#include "galore/ops.h"
#include "quant/quant.h"

namespace lowrank::galore {
namespace {

// param rows per panel: few BLAS calls, so re-packing the [rank, n] operand for each stays cheap
constexpr int64_t kPanel = 256;

// P as an fp32 [rows, cols] tensor (a quantized P through the quant family's CPU launcher).
at::Tensor dense_projection(const Projection& p) {
  if (!p.quantized()) return p.dense;
  at::Tensor out = at::empty({p.rows, p.cols}, p.q.options().dtype(at::kFloat));
  quant::DequantizeParams dp{};
  dp.q = p.q.const_data_ptr<uint8_t>();
  dp.absmax = p.absmax.const_data_ptr<float>();
  dp.code = p.code.const_data_ptr<float>();
  dp.bits = p.bits;
  dp.blocksize = p.blocksize;
  dp.numel = p.rows * p.cols;
  dp.out = out.mutable_data_ptr<float>();
  dp.out_kind = FloatKind::F32;
  quant::dequantize_blockwise_cpu(dp);
  return out;
}

at::Tensor galore_project_cpu(const at::Tensor& grad, const at::Tensor& proj, const std::optional<at::Tensor>& absmax,
                              const std::optional<at::Tensor>& code, int64_t rank, int64_t blocksize, bool right) {
  constexpr const char* op = "galore_project";
  const at::NoGradGuard no_grad;
  check_grad(grad, op, "grad");
  const Projection p = check_projection(proj, absmax, code, rank, blocksize, right, grad.size(0), grad.size(1),
                                        grad, op);
  const at::Tensor pm = dense_projection(p), g = grad.to(at::kFloat);  // this CPU has no fast bf16 GEMM
  return right ? at::mm(g, pm.t()) : at::mm(pm.t(), g);
}

at::Tensor wrap(float* data, int64_t rows, int64_t cols) { return at::from_blob(data, {rows, cols}, at::kFloat); }

// out = back(x) for param rows [r0, r0 + rows): P[r0:] x (left) or x[r0:] P (right)
void back_panel(const at::Tensor& pm, const at::Tensor& x, bool right, int64_t r0, int64_t rows, at::Tensor& out) {
  if (right) at::mm_out(out, x.narrow(0, r0, rows), pm);
  else at::mm_out(out, pm.narrow(0, r0, rows), x);
}

// sum over j of ((g[j] - back[j]) * scale_j)^2, scale_j = s[j] (s given) or s_row, in 8
// independent fp64 lanes: vectorizes, and no long serial chain of dependent adds.
template <typename G>
double residual_sumsq(const G* g, const float* back, int64_t n, const float* s, float s_row) {
  double lanes[8] = {};
  int64_t j = 0;
  if (s != nullptr) {
    for (; j + 8 <= n; j += 8)
      for (int k = 0; k < 8; ++k) {
        const float v = (static_cast<float>(g[j + k]) - back[j + k]) * s[j + k];
        lanes[k] += static_cast<double>(v) * v;
      }
  } else {
    for (; j + 8 <= n; j += 8)
      for (int k = 0; k < 8; ++k) {
        const float v = (static_cast<float>(g[j + k]) - back[j + k]) * s_row;
        lanes[k] += static_cast<double>(v) * v;
      }
  }
  for (; j < n; ++j) {
    const float v = (static_cast<float>(g[j]) - back[j]) * (s != nullptr ? s[j] : s_row);
    lanes[0] += static_cast<double>(v) * v;
  }
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

// Runs fn(r0, rows, buf) over param's row panels in parallel, buf = back(x) of the panel.
template <typename Fn>
void for_each_panel(const at::Tensor& pm, const at::Tensor& x, bool right, int64_t m, int64_t n, Fn&& fn) {
  parallel_for_as_caller(0, (m + kPanel - 1) / kPanel, 1, [&](int64_t b, int64_t e) {
    std::vector<float> buf(static_cast<size_t>(kPanel * n));
    for (int64_t t = b; t < e; ++t) {
      const int64_t r0 = t * kPanel, rows = std::min(kPanel, m - r0);
      at::Tensor out = wrap(buf.data(), rows, n);
      back_panel(pm, x, right, r0, rows, out);
      fn(r0, rows, buf.data());
    }
  });
}

void galore_apply_cpu(at::Tensor& param, const at::Tensor& direction, const at::Tensor& proj,
                      const std::optional<at::Tensor>& absmax, const std::optional<at::Tensor>& code, int64_t rank,
                      int64_t blocksize, bool right, double lr, double scale, double weight_decay,
                      int64_t residual_mode,
                      const std::optional<at::Tensor>& grad, const std::optional<at::Tensor>& low,
                      const std::optional<at::Tensor>& residual_prev_norm, double residual_growth) {
  constexpr const char* op = "galore_apply_";
  const at::NoGradGuard no_grad;
  check_grad(param, op, "param");
  const int64_t m = param.size(0), n = param.size(1);
  const Projection p = check_projection(proj, absmax, code, rank, blocksize, right, m, n, param, op);
  const Mode mode = check_apply_args(param, direction, p, right, lr, scale, weight_decay, residual_mode, grad,
                                     low, residual_prev_norm, residual_growth);
  if (param.numel() == 0) return;
  const at::Tensor pm = dense_projection(p), d = direction.contiguous();
  const bool residual = mode != Mode::Galore;
  const at::Tensor lo = residual ? low->contiguous() : at::Tensor();
  const at::Tensor g = residual ? grad->contiguous() : at::Tensor();
  const float decay = static_cast<float>(1.0 - lr * weight_decay);
  const float alpha = static_cast<float>(-lr * scale) * decay;  // on back(direction) and Fira's residual
  const float sign_step = static_cast<float>(-lr) * decay;      // on FRUGAL's sign(residual)

  // What multiplies P: alpha D, or for Fira alpha D - fa (low scaled), since the scaled
  // residual's product part, fa back(low) * s, is back(low * s) (s per column of R on the
  // left, per row on the right): Fira's update is then one product plus fa * s * G.
  at::Tensor x = d.mul(alpha);
  at::Tensor s;
  float fa = 0.f;
  if (mode == Mode::Fira) {
    s = fira_residual_scale(d, lo, right);
    const at::Tensor s_b = right ? s.unsqueeze(1) : s.unsqueeze(0);
    // the limiter needs the scaled residual's norm before anything is written: one read of G
    std::vector<double> sumsq((m + kPanel - 1) / kPanel, 0.0);
    const float* sp = s.const_data_ptr<float>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "galore_fira_norm", [&] {
      const scalar_t* gp = g.const_data_ptr<scalar_t>();
      for_each_panel(pm, lo, right, m, n, [&](int64_t r0, int64_t rows, const float* back_low) {
        double acc = 0.0;
        for (int64_t i = 0; i < rows; ++i)
          acc += right ? residual_sumsq(gp + (r0 + i) * n, back_low + i * n, n, nullptr, sp[r0 + i])
                       : residual_sumsq(gp + (r0 + i) * n, back_low + i * n, n, sp, 0.f);
        sumsq[r0 / kPanel] = acc;
      });
    });
    double total = 0.0;
    for (double v : sumsq) total += v;  // panel order: the same result for any thread count
    float norm = static_cast<float>(std::sqrt(total)), factor = 1.f;
    float* prev = residual_prev_norm->mutable_data_ptr<float>();
    const float limit = static_cast<float>(residual_growth) * *prev;
    if (*prev > 0.f && norm > limit) {  // no limit after a zero residual: it would pin it at zero
      factor = limit / norm;
      norm = limit;
    }
    *prev = norm;
    fa = alpha * factor;
    x.sub_(at::mul(lo, s_b), fa);
  }

  if (param.scalar_type() == at::kFloat) {
    // fp32: the product goes straight into param through BLAS (beta = decay, inside its
    // kernel), then the residual term in one more pass
    addmm_back_into_fp32_(param, pm, x, right, decay);
    if (mode == Mode::Fira) param.addcmul_(g, right ? s.unsqueeze(1) : s.unsqueeze(0), fa);
    if (mode == Mode::Frugal) {
      at::Tensor work = param.is_contiguous() ? param : param.contiguous();
      float* wp = work.mutable_data_ptr<float>();
      const float* gp = g.const_data_ptr<float>();
      for_each_panel(pm, lo, right, m, n, [&](int64_t r0, int64_t rows, const float* back_low) {
        for (int64_t i = 0; i < rows * n; ++i) {
          const float res = gp[r0 * n + i] - back_low[i];
          wp[r0 * n + i] += sign_step * static_cast<float>((res > 0.f) - (res < 0.f));
        }
      });
      if (!work.is_same(param)) param.copy_(work);
    }
    return;
  }

  // fp16 / bf16 param: everything in fp32 per panel, one rounding into param
  at::Tensor work = param.is_contiguous() ? param : param.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, work.scalar_type(), "galore_apply", [&] {
    using W = scalar_t;
    W* wp = work.mutable_data_ptr<W>();
    const W* gp = residual ? g.const_data_ptr<W>() : nullptr;  // grad has param's dtype (checked)
    const float* sp = mode == Mode::Fira ? s.const_data_ptr<float>() : nullptr;
    for_each_panel(pm, x, right, m, n, [&](int64_t r0, int64_t rows, const float* prod) {
      W* w = wp + r0 * n;
      if (mode == Mode::Galore) {
        for (int64_t i = 0; i < rows * n; ++i) w[i] = static_cast<W>(decay * static_cast<float>(w[i]) + prod[i]);
      } else if (mode == Mode::Fira) {
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t j = 0; j < n; ++j) {
            const int64_t e = i * n + j;
            const float gs = static_cast<float>(gp[r0 * n + e]) * sp[right ? r0 + i : j];
            w[e] = static_cast<W>(decay * static_cast<float>(w[e]) + prod[e] + fa * gs);
          }
      } else {  // FRUGAL: the residual needs back(low) too
        std::vector<float> back_low(static_cast<size_t>(rows * n));
        at::Tensor bl = wrap(back_low.data(), rows, n);
        back_panel(pm, lo, right, r0, rows, bl);
        for (int64_t i = 0; i < rows * n; ++i) {
          const float res = static_cast<float>(gp[r0 * n + i]) - back_low[i];
          const float sgn = static_cast<float>((res > 0.f) - (res < 0.f));
          w[i] = static_cast<W>(decay * static_cast<float>(w[i]) + prod[i] + sign_step * sgn);
        }
      }
    });
  });
  if (!work.is_same(param)) param.copy_(work);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  m.impl("galore_project", TORCH_FN(galore_project_cpu));
  m.impl("galore_apply_", TORCH_FN(galore_apply_cpu));
}

}  // namespace lowrank::galore
