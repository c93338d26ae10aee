#pragma once
// Op boundary of the lora family (see ops.cpp): checks, then the device-agnostic composition
// (dense GEMMs through ATen, which calls the BLAS / cuBLAS routine) around the three
// dropout-fused passes that each device implements.
#include <ATen/core/Tensor.h>

#include <array>
#include <optional>

#include "lora/lora_math.h"

namespace lowrank::lora {

// The passes that touch drop(x) or its gradient; the mask is regenerated inside each.
struct DropoutKernels {
  // xa = drop(x) A^T, [N, r] in x's dtype, fp32 accumulation
  at::Tensor (*x_dropped_a)(const at::Tensor& x, const at::Tensor& a, const Dropout& d);
  // The dropout part of the backward: grad_x += (t A) * mask in place when grad_x is defined
  // ([N, d_in] += [N, r] [r, d_in]), and, when want_grad_a, returns t^T drop(x) ([r, d_in] in
  // x's dtype, fp32 accumulation; else an undefined tensor). A device may draw the mask once
  // for both.
  at::Tensor (*dropped_backward)(const at::Tensor& t, const at::Tensor& x, const at::Tensor& a, const Dropout& d,
                                 at::Tensor& grad_x, bool want_grad_a);
};

std::tuple<at::Tensor, at::Tensor> lora_forward(const at::Tensor& x, const at::Tensor& weight,
                                                const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                                const at::Tensor& lora_b, const std::optional<at::Tensor>& core,
                                                const std::optional<at::Tensor>& rank_scale, double scale,
                                                double dropout_p, int64_t seed,
                                                const std::optional<at::Tensor>& seed_tensor, const DropoutKernels& k);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const std::optional<at::Tensor>& core, const std::optional<at::Tensor>& rank_scale,
    const at::Tensor& xa, double scale, double dropout_p, int64_t seed, const std::optional<at::Tensor>& seed_tensor,
    std::array<bool, 5> output_mask, const DropoutKernels& k);

void lora_merge_(at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
                 const std::optional<at::Tensor>& core, const std::optional<at::Tensor>& rank_scale, double scale);

}  // namespace lowrank::lora
