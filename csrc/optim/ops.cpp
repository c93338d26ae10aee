// The op boundary of the optim family, shared by the CPU and CUDA registrations: checks
// every list entry (the kernels write in place, so a bad entry must be caught before any
// tensor is touched), then fills one TensorSlot per parameter.
#include "optim/ops.h"

#include <cmath>

#include "common/checks.h"
#include "quant/ops.h"

namespace lowrank::optim {
namespace {

void check_lengths(size_t n, size_t m, const char* op, const char* arg) {
  TORCH_CHECK(n == m, op, ": ", arg, " has ", m, " tensors but params has ", n);
}

// In-place state must be contiguous: the kernels write it through raw pointers.
void check_state(const at::Tensor& t, const at::Tensor& param, at::ScalarType dtype, int64_t numel, size_t i,
                 const char* op, const char* arg) {
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", arg, "[", i, "] must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == param.device(), op, ": ", arg, "[", i, "] is on ", t.device(), " but params[", i,
              "] is on ", param.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", arg, "[", i, "] must be contiguous");
  TORCH_CHECK(t.numel() == numel, op, ": ", arg, "[", i, "] must have ", numel, " elements, got ", t.numel());
}

void check_param_and_grad(const at::Tensor& p, const at::Tensor& g, const at::Device& device, size_t i,
                          const char* op, TensorSlot& slot) {
  TORCH_CHECK(p.device() == device, op, ": params[", i, "] is on ", p.device(), " but params[0] is on ", device,
              "; one call steps tensors of one device");
  TORCH_CHECK(g.device() == device, op, ": grads[", i, "] is on ", g.device(), " but params[", i, "] is on ",
              device);
  TORCH_CHECK(!g.is_sparse() && g.layout() == at::kStrided, op, ": grads[", i, "] is sparse; AdamW does not "
              "support sparse gradients");
  TORCH_CHECK(!p.is_complex() && !g.is_complex(), op, ": params[", i, "] or its grad is complex; not supported");
  float_kind(p.scalar_type(), op, "params");
  float_kind(g.scalar_type(), op, "grads");
  TORCH_CHECK(p.is_contiguous(), op, ": params[", i, "] must be contiguous (it is updated in place)");
  TORCH_CHECK(g.sizes() == p.sizes(), op, ": grads[", i, "] has shape ", g.sizes(), " but params[", i,
              "] has shape ", p.sizes());
  slot.param = p.data_ptr();
  slot.numel = p.numel();
}

void check_blocksize(int64_t bs, const char* op, const char* arg) {
  TORCH_CHECK(bs >= 128 && bs <= 4096 && (bs & (bs - 1)) == 0, op, ": ", arg,
              " must be a power of two in [128, 4096], got ", bs);
}


// One call steps tensors of one param dtype and one grad dtype (the kernels are compiled
// per pair); the optimizers group their params accordingly.
void check_uniform_dtypes(at::TensorList params, at::TensorList grads, const char* op, AdamWStepParams& p) {
  for (size_t i = 1; i < params.size(); ++i) {
    TORCH_CHECK(params[i].scalar_type() == params[0].scalar_type(), op, ": params[", i, "] is ",
                params[i].scalar_type(), " but params[0] is ", params[0].scalar_type(),
                "; one call steps params of one dtype");
    TORCH_CHECK(grads[i].scalar_type() == grads[0].scalar_type(), op, ": grads[", i, "] is ", grads[i].scalar_type(),
                " but grads[0] is ", grads[0].scalar_type(), "; one call steps grads of one dtype");
  }
  p.param_kind = params.empty() ? FloatKind::F32 : float_kind(params[0].scalar_type(), op, "params");
  p.grad_kind = grads.empty() ? FloatKind::F32 : float_kind(grads[0].scalar_type(), op, "grads");
}

int log2_exact(int64_t power_of_two) {
  int k = 0;
  while ((int64_t{1} << k) < power_of_two) ++k;
  return k;
}

// The tensor table; each device splits it into its own work units (optim/cpu.cpp, optim/cuda.cu).
void finish(PreparedStep& out) {
  out.params.tensors = out.slots.data();
  out.params.num_tensors = static_cast<int64_t>(out.slots.size());
}

}  // namespace

AdamWConstants adamw_constants(double lr, double beta1, double beta2, double eps, double weight_decay,
                               int64_t step, const char* op) {
  TORCH_CHECK(lr >= 0.0, op, ": invalid learning rate: ", lr);
  TORCH_CHECK(eps >= 0.0, op, ": invalid epsilon value: ", eps);
  TORCH_CHECK(beta1 >= 0.0 && beta1 < 1.0, op, ": invalid beta parameter at index 0: ", beta1);
  TORCH_CHECK(beta2 >= 0.0 && beta2 < 1.0, op, ": invalid beta parameter at index 1: ", beta2);
  TORCH_CHECK(weight_decay >= 0.0, op, ": invalid weight_decay value: ", weight_decay);
  TORCH_CHECK(step >= 1, op, ": step must be >= 1 (the count after this update), got ", step);
  AdamWConstants c;
  c.beta1 = static_cast<float>(beta1);
  c.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  c.beta2 = static_cast<float>(beta2);
  c.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  c.decay = static_cast<float>(1.0 - lr * weight_decay);
  c.step_size = static_cast<float>(lr / (1.0 - std::pow(beta1, static_cast<double>(step))));
  c.bias_correction2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step))));
  c.eps = static_cast<float>(eps);
  return c;
}

namespace {

// What both quantized steps check and fill: params, grads, the block-wise first moment, the
// second moment's codes and the step's settings; the second moment's scales (block absmax or
// rank-1 maxima) are the caller's, checked per slot by `check_scales` before anything is written.
template <typename CheckScales>
PreparedStep prepare_quantized_slots(const char* op, at::TensorList params, at::TensorList grads,
                                     at::TensorList exp_avg_q, at::TensorList exp_avg_absmax,
                                     at::TensorList exp_avg_sq_q, const at::Tensor& code_exp_avg,
                                     const at::Tensor& code_exp_avg_sq, double lr, double beta1, double beta2,
                                     double eps, double weight_decay, int64_t step, int64_t bits,
                                     int64_t blocksize_exp_avg, bool stochastic_rounding, int64_t seed,
                                     bool stochastic_exp_avg, bool stochastic_exp_avg_sq, CheckScales check_scales) {
  const size_t n = params.size();
  check_lengths(n, grads.size(), op, "grads");
  check_lengths(n, exp_avg_q.size(), op, "exp_avg_q");
  check_lengths(n, exp_avg_absmax.size(), op, "exp_avg_absmax");
  check_lengths(n, exp_avg_sq_q.size(), op, "exp_avg_sq_q");
  TORCH_CHECK(bits == 8 || bits == 4, op, ": bits must be 8 or 4, got ", bits);
  check_blocksize(blocksize_exp_avg, op, "blocksize_exp_avg");

  PreparedStep out;
  out.device = n ? params[0].device() : code_exp_avg.device();
  out.code_exp_avg = quant::check_code(code_exp_avg, bits, out.device, op, "code_exp_avg");
  out.code_exp_avg_sq = quant::check_code(code_exp_avg_sq, bits, out.device, op, "code_exp_avg_sq");
  out.params.c = adamw_constants(lr, beta1, beta2, eps, weight_decay, step, op);
  check_uniform_dtypes(params, grads, op, out.params);
  out.slots.resize(n);
  for (size_t i = 0; i < n; ++i) {
    TensorSlot& s = out.slots[i];
    check_param_and_grad(params[i], grads[i], out.device, i, op, s);
    const int64_t qbytes = bits == 8 ? s.numel : (s.numel + 1) / 2;
    check_state(exp_avg_q[i], params[i], at::kByte, qbytes, i, op, "exp_avg_q");
    check_state(exp_avg_sq_q[i], params[i], at::kByte, qbytes, i, op, "exp_avg_sq_q");
    check_state(exp_avg_absmax[i], params[i], at::kFloat, (s.numel + blocksize_exp_avg - 1) / blocksize_exp_avg,
                i, op, "exp_avg_absmax");
    check_scales(i, s);
    TORCH_CHECK(grads[i].is_contiguous(), op, ": grads[", i, "] must be contiguous");
    s.grad = grads[i].const_data_ptr();  // null for an empty tensor, which no kernel touches
    s.exp_avg_q = exp_avg_q[i].mutable_data_ptr<uint8_t>();
    s.exp_avg_absmax = exp_avg_absmax[i].mutable_data_ptr<float>();
    s.exp_avg_sq_q = exp_avg_sq_q[i].mutable_data_ptr<uint8_t>();
  }
  AdamWStepParams& p = out.params;
  p.quantized = true;
  p.bits = static_cast<int>(bits);
  p.blocksize_exp_avg = blocksize_exp_avg;
  p.log2_blocksize_exp_avg = log2_exact(blocksize_exp_avg);
  p.code_exp_avg = out.code_exp_avg.const_data_ptr<float>();
  p.code_exp_avg_sq = out.code_exp_avg_sq.const_data_ptr<float>();
  p.stochastic_rounding = stochastic_rounding;
  p.stochastic_exp_avg = stochastic_exp_avg;
  p.stochastic_exp_avg_sq = stochastic_exp_avg_sq;
  p.seed = static_cast<uint64_t>(seed);
  finish(out);
  return out;
}

}  // namespace

PreparedStep prepare_quantized_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avg_q,
                                    at::TensorList exp_avg_absmax, at::TensorList exp_avg_sq_q,
                                    at::TensorList exp_avg_sq_absmax, const at::Tensor& code_exp_avg,
                                    const at::Tensor& code_exp_avg_sq, double lr, double beta1, double beta2,
                                    double eps, double weight_decay, int64_t step, int64_t bits,
                                    int64_t blocksize_exp_avg, int64_t blocksize_exp_avg_sq,
                                    bool stochastic_rounding, int64_t seed, bool stochastic_exp_avg,
                                    bool stochastic_exp_avg_sq) {
  constexpr const char* op = "adamw_step_quantized_";
  check_lengths(params.size(), exp_avg_sq_absmax.size(), op, "exp_avg_sq_absmax");
  check_blocksize(blocksize_exp_avg_sq, op, "blocksize_exp_avg_sq");
  PreparedStep out = prepare_quantized_slots(
      op, params, grads, exp_avg_q, exp_avg_absmax, exp_avg_sq_q, code_exp_avg, code_exp_avg_sq, lr, beta1, beta2,
      eps, weight_decay, step, bits, blocksize_exp_avg, stochastic_rounding, seed, stochastic_exp_avg,
      stochastic_exp_avg_sq, [&](size_t i, TensorSlot& s) {
        check_state(exp_avg_sq_absmax[i], params[i], at::kFloat,
                    (s.numel + blocksize_exp_avg_sq - 1) / blocksize_exp_avg_sq, i, op, "exp_avg_sq_absmax");
        s.exp_avg_sq_absmax = exp_avg_sq_absmax[i].mutable_data_ptr<float>();
      });
  out.params.blocksize_exp_avg_sq = blocksize_exp_avg_sq;
  out.params.log2_blocksize_exp_avg_sq = log2_exact(blocksize_exp_avg_sq);
  return out;
}

PreparedStep prepare_rank1_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avg_q,
                                at::TensorList exp_avg_absmax, at::TensorList exp_avg_sq_q,
                                at::TensorList exp_avg_sq_row, at::TensorList exp_avg_sq_col,
                                const at::Tensor& code_exp_avg, const at::Tensor& code_exp_avg_sq, double lr,
                                double beta1, double beta2, double eps, double weight_decay, int64_t step,
                                int64_t bits, int64_t blocksize_exp_avg, bool stochastic_rounding, int64_t seed,
                                bool stochastic_exp_avg, bool stochastic_exp_avg_sq) {
  constexpr const char* op = "adamw_step_rank1_";
  check_lengths(params.size(), exp_avg_sq_row.size(), op, "exp_avg_sq_row");
  check_lengths(params.size(), exp_avg_sq_col.size(), op, "exp_avg_sq_col");
  PreparedStep out = prepare_quantized_slots(
      op, params, grads, exp_avg_q, exp_avg_absmax, exp_avg_sq_q, code_exp_avg, code_exp_avg_sq, lr, beta1, beta2,
      eps, weight_decay, step, bits, blocksize_exp_avg, stochastic_rounding, seed, stochastic_exp_avg,
      stochastic_exp_avg_sq, [&](size_t i, TensorSlot& s) {
        // the second moment's rows x columns: the statistics' lengths give the matrix view
        const int64_t rows = exp_avg_sq_row[i].numel(), cols = exp_avg_sq_col[i].numel();
        TORCH_CHECK(rows * cols == s.numel && (s.numel == 0 || (rows >= 1 && cols >= 1)), op, ": exp_avg_sq_row[",
                    i, "] and exp_avg_sq_col[", i, "] have ", rows, " and ", cols, " entries, but params[", i,
                    "] has ", s.numel,
                    " elements (a rank-1 moment views its param as [rows, cols] with rows * cols = numel)");
        check_state(exp_avg_sq_row[i], params[i], at::kFloat, rows, i, op, "exp_avg_sq_row");
        check_state(exp_avg_sq_col[i], params[i], at::kFloat, cols, i, op, "exp_avg_sq_col");
        s.exp_avg_sq_row = exp_avg_sq_row[i].mutable_data_ptr<float>();
        s.exp_avg_sq_col = exp_avg_sq_col[i].mutable_data_ptr<float>();
        s.cols = cols;
      });
  for (size_t i = 0; i < out.slots.size(); ++i) {  // every check passed: an empty param's maxima are over nothing
    if (out.slots[i].numel == 0) {
      exp_avg_sq_row[i].zero_();
      exp_avg_sq_col[i].zero_();
    }
  }
  // the first moment's blocks set the superblocks (the second moment has no blocks)
  AdamWStepParams& p = out.params;
  p.rank1 = true;
  p.blocksize_exp_avg_sq = p.blocksize_exp_avg;
  p.log2_blocksize_exp_avg_sq = p.log2_blocksize_exp_avg;
  return out;
}

PreparedStep prepare_fp32_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avg,
                               at::TensorList exp_avg_sq, double lr, double beta1, double beta2, double eps,
                               double weight_decay, int64_t step, bool stochastic_rounding, int64_t seed) {
  constexpr const char* op = "adamw_step_fp32_";
  const size_t n = params.size();
  check_lengths(n, grads.size(), op, "grads");
  check_lengths(n, exp_avg.size(), op, "exp_avg");
  check_lengths(n, exp_avg_sq.size(), op, "exp_avg_sq");
  PreparedStep out;
  out.device = n ? params[0].device() : at::Device(at::kCPU);
  out.params.c = adamw_constants(lr, beta1, beta2, eps, weight_decay, step, op);
  check_uniform_dtypes(params, grads, op, out.params);
  out.slots.resize(n);
  for (size_t i = 0; i < n; ++i) {
    TensorSlot& s = out.slots[i];
    check_param_and_grad(params[i], grads[i], out.device, i, op, s);
    check_state(exp_avg[i], params[i], at::kFloat, s.numel, i, op, "exp_avg");
    check_state(exp_avg_sq[i], params[i], at::kFloat, s.numel, i, op, "exp_avg_sq");
    TORCH_CHECK(grads[i].is_contiguous(), op, ": grads[", i, "] must be contiguous");
    s.grad = grads[i].const_data_ptr();
    s.exp_avg = exp_avg[i].mutable_data_ptr<float>();
    s.exp_avg_sq = exp_avg_sq[i].mutable_data_ptr<float>();
    s.exp_avg_q = s.exp_avg_sq_q = nullptr;
    s.exp_avg_absmax = s.exp_avg_sq_absmax = nullptr;
  }
  AdamWStepParams& p = out.params;
  p.quantized = false;
  p.bits = 32;
  p.blocksize_exp_avg = p.blocksize_exp_avg_sq = 0;
  p.log2_blocksize_exp_avg = p.log2_blocksize_exp_avg_sq = 0;
  p.code_exp_avg = p.code_exp_avg_sq = nullptr;
  p.stochastic_rounding = stochastic_rounding;
  p.stochastic_exp_avg = p.stochastic_exp_avg_sq = false;
  p.seed = static_cast<uint64_t>(seed);
  finish(out);
  return out;
}

}  // namespace lowrank::optim
