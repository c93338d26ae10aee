// CPU kernels of the galore family. P is small ([m, rank] or [rank, n]): a quantized P is
// dequantized once per call into an fp32 buffer (with the shared quant math) and the
// products go to BLAS. An fp32 param in plain GaLore mode is one addmm_ (BLAS applies the
// weight decay and the step inside its kernel). Otherwise galore_apply_ walks param in panels
// of kPanel rows, in parallel:
// each panel's back(direction) (and back(low) for the residual modes) is one BLAS product
// into a per-thread buffer, and the update is one pass over the panel while it is in cache:
// no [m, n] temporary except Fira's residual, whose norm must be known before any write.
#include <torch/library.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>

#include <cmath>
#include <vector>

#include "common/dtype.h"
#include "galore/ops.h"
#include "quant/quant_math.h"

namespace lowrank::galore {
namespace {

constexpr int64_t kPanel = 16;  // param rows per panel: 16 x 4096 fp32 = 256 KiB per buffer (stays in L2)

// P as an fp32 [rows, cols] tensor.
at::Tensor dense_projection(const Projection& p) {
  if (!p.quantized()) return p.dense;
  at::Tensor out = at::empty({p.rows, p.cols}, p.q.options().dtype(at::kFloat));
  const uint8_t* q = p.q.const_data_ptr<uint8_t>();
  const float *absmax = p.absmax.const_data_ptr<float>(), *code = p.code.const_data_ptr<float>();
  float* o = out.mutable_data_ptr<float>();
  at::parallel_for(0, p.rows * p.cols, 16384, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) o[i] = quant::dequantize_element(q, absmax, code, p.bits, p.blocksize, i);
  });
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
  const at::Tensor pm = dense_projection(p), d = direction.contiguous();
  const bool residual = mode != Mode::Galore;
  const at::Tensor lo = residual ? low->contiguous() : at::Tensor();
  const at::Tensor g = residual ? grad->contiguous() : at::Tensor();
  const float decay = static_cast<float>(1.0 - lr * weight_decay);
  const float alpha = static_cast<float>(-lr * scale) * decay;  // on back(direction) and Fira's residual
  const float sign_step = static_cast<float>(-lr) * decay;      // on FRUGAL's sign(residual)
  if (mode == Mode::Galore && param.scalar_type() == at::kFloat) {
    // fp32 and nothing but the product: BLAS applies beta and alpha inside its own kernel,
    // which the panel pass below cannot beat on a CPU
    if (right) param.addmm_(d, pm, decay, alpha);
    else param.addmm_(pm, d, decay, alpha);
    return;
  }
  at::Tensor work = param.is_contiguous() ? param : param.contiguous();
  const int64_t panels = (m + kPanel - 1) / kPanel;

  // Fira: the scaled residual first (its norm sets the limiter), kept for the update pass
  at::Tensor fira_resid;
  float fira_factor = 1.f;
  if (mode == Mode::Fira) {
    const at::Tensor s = fira_residual_scale(d, lo, right);
    const float* sp = s.const_data_ptr<float>();
    fira_resid = at::empty({m, n}, param.options().dtype(at::kFloat));
    std::vector<double> sumsq(panels, 0.0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "galore_fira_residual", [&] {
      const scalar_t* gp = g.const_data_ptr<scalar_t>();
      at::parallel_for(0, panels, 1, [&](int64_t b, int64_t e) {
        const at::NoGradGuard ng;
        for (int64_t t = b; t < e; ++t) {
          const int64_t r0 = t * kPanel, rows = std::min(kPanel, m - r0);
          at::Tensor out = fira_resid.narrow(0, r0, rows);
          back_panel(pm, lo, right, r0, rows, out);
          float* rp = out.mutable_data_ptr<float>();
          double acc = 0.0;
          for (int64_t i = 0; i < rows; ++i)
            for (int64_t j = 0; j < n; ++j) {
              const float v = (static_cast<float>(gp[(r0 + i) * n + j]) - rp[i * n + j]) * sp[right ? r0 + i : j];
              rp[i * n + j] = v;
              acc += static_cast<double>(v) * v;
            }
          sumsq[t] = acc;
        }
      });
    });
    double total = 0.0;
    for (double v : sumsq) total += v;  // panel order: the same result for any thread count
    float norm = static_cast<float>(std::sqrt(total));
    float* prev = residual_prev_norm->mutable_data_ptr<float>();
    const float limit = static_cast<float>(residual_growth) * *prev;
    if (*prev > 0.f && norm > limit) {  // no limit after a zero residual: it would pin it at zero
      fira_factor = limit / norm;
      norm = limit;
    }
    *prev = norm;
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, work.scalar_type(), "galore_apply", [&] {
    using W = scalar_t;
    W* wp = work.mutable_data_ptr<W>();
    at::parallel_for(0, panels, 1, [&](int64_t b, int64_t e) {
      const at::NoGradGuard ng;
      std::vector<float> buf_d(static_cast<size_t>(kPanel * n)), buf_r(residual ? kPanel * n : 0);
      for (int64_t t = b; t < e; ++t) {
        const int64_t r0 = t * kPanel, rows = std::min(kPanel, m - r0);
        at::Tensor bd = wrap(buf_d.data(), rows, n);
        back_panel(pm, d, right, r0, rows, bd);
        const float* bdp = buf_d.data();
        W* wrow = wp + r0 * n;
        if (mode == Mode::Galore) {
          for (int64_t i = 0; i < rows * n; ++i)
            wrow[i] = static_cast<W>(decay * static_cast<float>(wrow[i]) + alpha * bdp[i]);
        } else if (mode == Mode::Fira) {
          const float* fr = fira_resid.const_data_ptr<float>() + r0 * n;
          const float fa = alpha * fira_factor;
          for (int64_t i = 0; i < rows * n; ++i)
            wrow[i] = static_cast<W>(decay * static_cast<float>(wrow[i]) + alpha * bdp[i] + fa * fr[i]);
        } else {  // FRUGAL: signSGD on the residual
          at::Tensor br = wrap(buf_r.data(), rows, n);
          back_panel(pm, lo, right, r0, rows, br);
          const float* brp = buf_r.data();
          AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "galore_frugal", [&] {
            const scalar_t* gp = g.const_data_ptr<scalar_t>() + r0 * n;
            for (int64_t i = 0; i < rows * n; ++i) {
              const float res = static_cast<float>(gp[i]) - brp[i];
              const float sgn = static_cast<float>((res > 0.f) - (res < 0.f));
              wrow[i] = static_cast<W>(decay * static_cast<float>(wrow[i]) + alpha * bdp[i] + sign_step * sgn);
            }
          });
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
