#pragma once
// Op boundary of the optim family (see ops.cpp): tensor lists in, checked params out.
#include <ATen/core/Tensor.h>

#include <vector>

#include "optim/optim.h"

namespace lowrank::optim {

struct PreparedStep {
  std::vector<TensorSlot> slots;
  at::Tensor code_exp_avg, code_exp_avg_sq;  // contiguous (kept alive)
  AdamWStepParams params;               // params.tensors points into slots
  at::Device device{at::kCPU};
};

AdamWConstants adamw_constants(double lr, double beta1, double beta2, double eps, double weight_decay,
                               int64_t step, const char* op);

PreparedStep prepare_quantized_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avg_q,
                                    at::TensorList exp_avg_absmax, at::TensorList exp_avg_sq_q,
                                    at::TensorList exp_avg_sq_absmax, const at::Tensor& code_exp_avg,
                                    const at::Tensor& code_exp_avg_sq, double lr, double beta1, double beta2,
                                    double eps, double weight_decay, int64_t step, int64_t bits,
                                    int64_t blocksize_exp_avg, int64_t blocksize_exp_avg_sq,
                                    bool stochastic_rounding, int64_t seed, bool stochastic_exp_avg,
                                    bool stochastic_exp_avg_sq);

// Block-wise first moment as above; second moment rank-1 normalised.
PreparedStep prepare_rank1_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avg_q,
                                at::TensorList exp_avg_absmax, at::TensorList exp_avg_sq_q,
                                at::TensorList exp_avg_sq_row, at::TensorList exp_avg_sq_col,
                                const at::Tensor& code_exp_avg, const at::Tensor& code_exp_avg_sq, double lr,
                                double beta1, double beta2, double eps, double weight_decay, int64_t step,
                                int64_t bits, int64_t blocksize_exp_avg, bool stochastic_rounding, int64_t seed,
                                bool stochastic_exp_avg, bool stochastic_exp_avg_sq);

PreparedStep prepare_fp32_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avg,
                               at::TensorList exp_avg_sq, double lr, double beta1, double beta2, double eps,
                               double weight_decay, int64_t step, bool stochastic_rounding, int64_t seed);

}  // namespace lowrank::optim
