#pragma once
// Op boundary of the galore family: the projection P of a GaLore-family optimizer, as the
// kernels see it (fp32, or block-wise INT8/INT4 dequantized as it is loaded), and the checks
// both devices share.
//   galore_project: R = P^T G (left, P [m, rank]) or G P^T (right, P [rank, n]), fp32
//   galore_apply_:  param <- (1 - lr wd)(param - lr scale back(D) - residual step), in place
#include <ATen/core/Tensor.h>

#include <optional>

namespace lowrank::galore {

enum class Mode : int64_t { Galore = 0, Fira = 1, Frugal = 2 };

struct Projection {
  at::Tensor dense;             // fp32 contiguous [rows, cols]; undefined when quantized
  at::Tensor q, absmax, code;   // the quantize_blockwise form (q flat uint8, absmax fp32, code fp32)
  int bits = 32;                // 32, 8 or 4
  int64_t blocksize = 0;
  int64_t rows = 0, cols = 0;   // left: [m, rank]; right: [rank, n]
  bool quantized() const { return bits != 32; }
};

// Checks P against the gradient's shape [m, n] and returns its kernel view.
Projection check_projection(const at::Tensor& proj, const std::optional<at::Tensor>& absmax,
                            const std::optional<at::Tensor>& code, int64_t rank, int64_t blocksize, bool right,
                            int64_t m, int64_t n, const at::Tensor& ref, const char* op);

void check_grad(const at::Tensor& grad, const char* op, const char* arg);

// Everything galore_apply_ takes; returns the mode.
Mode check_apply_args(const at::Tensor& param, const at::Tensor& direction, const Projection& p, bool right,
                      double lr, double scale, double weight_decay, int64_t residual_mode,
                      const std::optional<at::Tensor>& grad, const std::optional<at::Tensor>& low,
                      const std::optional<at::Tensor>& residual_prev_norm, double residual_growth);

// Fira's per-column (left) or per-row (right) residual scale ||direction|| / ||low||, fp32
// [n] or [m] on the device (ATen reductions of the small [rank, .] tensors: no host sync).
at::Tensor fira_residual_scale(const at::Tensor& direction, const at::Tensor& low, bool right);

// param = decay param + back(x) for an fp32 param, in place, as one BLAS / cuBLAS addmm_ with the
// decay as its beta: back(x) = pm x (left, pm [m, rank]) or x pm (right, pm [rank, n]), pm the
// dense fp32 P. beta = 0 (lr wd = 1) would let BLAS ignore param: it is zeroed first then, so
// NaN/Inf in param stay NaN as in (0 * param).
void addmm_back_into_fp32_(at::Tensor& param, const at::Tensor& pm, const at::Tensor& x, bool right, float decay);

}  // namespace lowrank::galore
