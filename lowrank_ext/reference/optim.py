"""Pure-PyTorch references for the optim family (never imports lowrank_ext._C).

They mirror csrc/optim/optim_math.h operation for operation in fp32 (every scalar operand
is a full fp32 tensor, so no scalar fast path rounds differently), and re-quantize with
the quant references, so the kernels must match them bit for bit. They are functional:
they return new tensors and leave their inputs alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .quant import _MASK32, code_indices_ref, dequantize_blockwise_ref, philox_random16_ref, quantize_blockwise_ref


def _f32(x: float) -> float:
    """Round a Python float (double) to the nearest fp32, as the C++ op boundary does."""
    return float(torch.tensor(x, dtype=torch.float64).to(torch.float32))


@dataclass(frozen=True)
class AdamWConstants:
    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    decay: float
    step_size: float
    bias_correction2_sqrt: float
    eps: float


def adamw_constants_ref(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                        step: int) -> AdamWConstants:
    return AdamWConstants(
        beta1=_f32(beta1), one_minus_beta1=_f32(1.0 - beta1), beta2=_f32(beta2), one_minus_beta2=_f32(1.0 - beta2),
        decay=_f32(1.0 - lr * weight_decay), step_size=_f32(lr / (1.0 - beta1 ** step)),
        bias_correction2_sqrt=_f32(math.sqrt(1.0 - beta2 ** step)), eps=_f32(eps))


def adamw_update_ref(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                     c: AdamWConstants) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One AdamW update in fp32 on fp32 tensors: returns (p', m', v')."""
    def full(x: float) -> torch.Tensor:
        return torch.full_like(p, x)

    m_new = m * full(c.beta1) + g * full(c.one_minus_beta1)
    v_new = v * full(c.beta2) + (g * full(c.one_minus_beta2)) * g
    # sqrt in fp64 then rounded: the correctly rounded fp32 sqrt (torch.sqrt's vectorized CPU
    # path is not always correctly rounded)
    sqrt_v = torch.sqrt(v_new.double()).float()
    denom = sqrt_v / full(c.bias_correction2_sqrt) + full(c.eps)
    p_new = p * full(c.decay) - full(c.step_size) * (m_new / denom)
    return p_new, m_new, v_new


def to_bf16_stochastic_ref(x: torch.Tensor, seed: int, offset: int) -> torch.Tensor:
    """fp32 -> bf16 with stochastic rounding (random low 16 bits added, then truncated)."""
    flat = x.reshape(-1).contiguous()
    b = flat.view(torch.int32).to(torch.int64) & _MASK32
    r = philox_random16_ref(seed, offset, torch.arange(flat.numel()))
    rounded = (b + r) >> 16
    nonfinite = (b & 0x7F800000) == 0x7F800000
    special = (b >> 16) | torch.where((b & 0xFFFF) != 0, 0x40, 0)
    out = torch.where(nonfinite, special, rounded) & 0xFFFF
    out = torch.where(out >= 0x8000, out - 0x10000, out).to(torch.int16)
    return out.view(torch.bfloat16).view(x.shape)


def stream_offset(tensor_index: int, stream: int) -> int:
    """Philox counter offset of a tensor's random stream: 0 param, 1 exp_avg, 2 exp_avg_sq."""
    return (tensor_index << 2) | stream


def _store_param(p_new: torch.Tensor, dtype: torch.dtype, stochastic_rounding: bool, seed: int,
                 tensor_index: int) -> torch.Tensor:
    if dtype == torch.bfloat16 and stochastic_rounding:
        return to_bf16_stochastic_ref(p_new, seed, stream_offset(tensor_index, 0))
    return p_new.to(dtype)


def adamw_step_fp32_ref(params, grads, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step,
                        stochastic_rounding=False, seed=0):
    """Returns (params', exp_avg', exp_avg_sq') as new lists."""
    c = adamw_constants_ref(lr, beta1, beta2, eps, weight_decay, step)
    out_p, out_m, out_v = [], [], []
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avg, exp_avg_sq)):
        p_new, m_new, v_new = adamw_update_ref(p.float(), g.float(), m, v, c)
        out_p.append(_store_param(p_new, p.dtype, stochastic_rounding, seed, i))
        out_m.append(m_new)
        out_v.append(v_new)
    return out_p, out_m, out_v


def adamw_step_quantized_ref(params, grads, exp_avg_q, exp_avg_absmax, exp_avg_sq_q, exp_avg_sq_absmax,
                             code_exp_avg, code_exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step, bits,
                             blocksize_exp_avg, blocksize_exp_avg_sq, stochastic_rounding=False, seed=0,
                             stochastic_exp_avg=False, stochastic_exp_avg_sq=False):
    """Dequantize -> AdamW in fp32 -> re-quantize. Returns
    (params', exp_avg_q', exp_avg_absmax', exp_avg_sq_q', exp_avg_sq_absmax') as new lists."""
    c = adamw_constants_ref(lr, beta1, beta2, eps, weight_decay, step)
    outs = ([], [], [], [], [])
    for i, p in enumerate(params):
        shape = list(p.shape)
        m = dequantize_blockwise_ref(exp_avg_q[i], exp_avg_absmax[i], code_exp_avg, blocksize_exp_avg, bits, shape)
        v = dequantize_blockwise_ref(exp_avg_sq_q[i], exp_avg_sq_absmax[i], code_exp_avg_sq, blocksize_exp_avg_sq,
                                     bits, shape)
        p_new, m_new, v_new = adamw_update_ref(p.float(), grads[i].float(), m, v, c)
        v_new = v_new.clamp(max=torch.finfo(torch.float32).max)  # an overflowed v is stored as FLT_MAX
        mq, ma = quantize_blockwise_ref(m_new, code_exp_avg, blocksize_exp_avg, bits, stochastic_exp_avg, seed,
                                        stream_offset(i, 1))
        vq, va = quantize_blockwise_ref(v_new, code_exp_avg_sq, blocksize_exp_avg_sq, bits, stochastic_exp_avg_sq,
                                        seed, stream_offset(i, 2))
        for lst, val in zip(outs, (_store_param(p_new, p.dtype, stochastic_rounding, seed, i), mq, ma, vq, va)):
            lst.append(val)
    return outs


def rank1_scale_ref(row_max: torch.Tensor, col_max: torch.Tensor) -> torch.Tensor:
    """[rows, cols] normalisers min(row_max[i], col_max[j]), NaN where either is NaN
    (torch.minimum propagates NaN)."""
    return torch.minimum(row_max[:, None], col_max[None, :])


def dequantize_rank1_ref(q: torch.Tensor, row_max: torch.Tensor, col_max: torch.Tensor, code: torch.Tensor,
                         bits: int) -> torch.Tensor:
    """A rank-1 normalised moment as fp32 [rows, cols]: code[index] * min(row max, column max)."""
    rows, cols = row_max.numel(), col_max.numel()
    idx = q.to(torch.int64)
    if bits == 4:
        idx = torch.stack([idx & 0xF, idx >> 4], dim=-1).reshape(-1)
    values = code.to(torch.float32)[idx[:rows * cols]].view(rows, cols)
    return values * rank1_scale_ref(row_max, col_max)


def quantize_rank1_ref(v: torch.Tensor, code: torch.Tensor, bits: int, stochastic_rounding: bool = False,
                       seed: int = 0, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """v [rows, cols] -> (q, row max, column max) of |v| (NaN where a row or column holds a NaN);
    entry (i, j) is quantized as v_ij / min(row max i, column max j) (0 where that is not > 0)."""
    a = v.abs()
    if a.numel() == 0:  # maxima over nothing
        row_max, col_max = a.new_zeros(a.shape[0]), a.new_zeros(a.shape[1])
    else:
        row_max, col_max = a.amax(dim=1), a.amax(dim=0)  # amax propagates NaN
    scale = rank1_scale_ref(row_max, col_max)
    normalised = torch.where(scale > 0, v / scale, torch.zeros_like(v)).reshape(-1)
    return code_indices_ref(normalised, code, bits, stochastic_rounding, seed, offset), row_max, col_max


def adamw_step_rank1_ref(params, grads, exp_avg_q, exp_avg_absmax, exp_avg_sq_q, exp_avg_sq_row, exp_avg_sq_col,
                         code_exp_avg, code_exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step, bits,
                         blocksize_exp_avg, stochastic_rounding=False, seed=0, stochastic_exp_avg=False,
                         stochastic_exp_avg_sq=False):
    """As adamw_step_quantized_ref, with the second moment rank-1 normalised: each param seen as
    [rows, cols] = [exp_avg_sq_row[i].numel(), exp_avg_sq_col[i].numel()]. Returns (params',
    exp_avg_q', exp_avg_absmax', exp_avg_sq_q', exp_avg_sq_row', exp_avg_sq_col') as new lists."""
    c = adamw_constants_ref(lr, beta1, beta2, eps, weight_decay, step)
    outs = ([], [], [], [], [], [])
    for i, p in enumerate(params):
        rows, cols = exp_avg_sq_row[i].numel(), exp_avg_sq_col[i].numel()
        m = dequantize_blockwise_ref(exp_avg_q[i], exp_avg_absmax[i], code_exp_avg, blocksize_exp_avg, bits,
                                     [p.numel()])
        v = dequantize_rank1_ref(exp_avg_sq_q[i], exp_avg_sq_row[i], exp_avg_sq_col[i], code_exp_avg_sq,
                                 bits).reshape(-1)
        p_new, m_new, v_new = adamw_update_ref(p.float().reshape(-1), grads[i].float().reshape(-1), m, v, c)
        v_new = v_new.clamp(max=torch.finfo(torch.float32).max)  # an overflowed v is stored as FLT_MAX
        mq, ma = quantize_blockwise_ref(m_new, code_exp_avg, blocksize_exp_avg, bits, stochastic_exp_avg, seed,
                                        stream_offset(i, 1))
        vq, vr, vc = quantize_rank1_ref(v_new.view(rows, cols), code_exp_avg_sq, bits, stochastic_exp_avg_sq, seed,
                                        stream_offset(i, 2))
        p_out = _store_param(p_new.view(p.shape), p.dtype, stochastic_rounding, seed, i)
        for lst, val in zip(outs, (p_out, mq, ma, vq, vr, vc)):
            lst.append(val)
    return outs
