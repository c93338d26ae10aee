"""Fused multi-tensor AdamW steps: ``torch.ops.lowrank.adamw_step_quantized_``,
``adamw_step_rank1_`` and ``adamw_step_fp32_``, with their fake registrations.

Both update every tensor of their lists in place in one call (one parallel region on
CPU, one kernel launch on CUDA), with no host synchronisation. The update is torch's
AdamW (decoupled weight decay, bias correction), computed in fp32; see
``csrc/optim/optim_math.h`` for the exact order of operations. The optimizers in
:mod:`lowrank_ext.optim` are the usual way to call them.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["adamw_step_quantized_", "adamw_step_rank1_", "adamw_step_fp32_"]


def adamw_step_quantized_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                          exp_avg_q: Sequence[torch.Tensor], exp_avg_absmax: Sequence[torch.Tensor],
                          exp_avg_sq_q: Sequence[torch.Tensor], exp_avg_sq_absmax: Sequence[torch.Tensor],
                          code_exp_avg: torch.Tensor, code_exp_avg_sq: torch.Tensor, *, lr: float, beta1: float,
                          beta2: float, eps: float, weight_decay: float, step: int, bits: int,
                          blocksize_exp_avg: int, blocksize_exp_avg_sq: int, stochastic_rounding: bool = False,
                          seed: int = 0, stochastic_exp_avg: bool = False,
                          stochastic_exp_avg_sq: bool = False) -> None:
    """One AdamW step with block-wise quantized moments, in place.

    Per tensor: ``exp_avg_q``/``exp_avg_sq_q`` are uint8 ``[numel]`` (8-bit) or
    ``[ceil(numel/2)]`` (4-bit) code indices with fp32 absmax ``[ceil(numel/blocksize)]``
    per moment (``quantize_blockwise``'s layout). Both moments are dequantized, updated in
    fp32 with the param, and re-quantized with a fresh absmax. ``step`` is the step count
    after this update (1 on the first). Params and grads are fp32/fp16/bf16 (contiguous);
    ``stochastic_rounding`` rounds bf16 params stochastically, ``stochastic_exp_avg`` /
    ``stochastic_exp_avg_sq`` re-quantize a moment stochastically (unbiased: a slow EMA such
    as beta2 = 0.999 moves by less than a code gap per step and would otherwise stall).
    Draws are Philox from ``seed`` and (tensor index, stream). An empty list is a no-op (the dispatcher needs a
    tensor to pick a device).
    """
    if not params:
        return
    torch.ops.lowrank.adamw_step_quantized_(
        list(params), list(grads), list(exp_avg_q), list(exp_avg_absmax), list(exp_avg_sq_q),
        list(exp_avg_sq_absmax), code_exp_avg, code_exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step, bits,
        blocksize_exp_avg, blocksize_exp_avg_sq, stochastic_rounding, seed, stochastic_exp_avg, stochastic_exp_avg_sq)


def adamw_step_rank1_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                      exp_avg_q: Sequence[torch.Tensor], exp_avg_absmax: Sequence[torch.Tensor],
                      exp_avg_sq_q: Sequence[torch.Tensor], exp_avg_sq_row: Sequence[torch.Tensor],
                      exp_avg_sq_col: Sequence[torch.Tensor], code_exp_avg: torch.Tensor,
                      code_exp_avg_sq: torch.Tensor, *, lr: float, beta1: float, beta2: float, eps: float,
                      weight_decay: float, step: int, bits: int, blocksize_exp_avg: int,
                      stochastic_rounding: bool = False, seed: int = 0, stochastic_exp_avg: bool = False,
                      stochastic_exp_avg_sq: bool = False) -> None:
    """:func:`adamw_step_quantized_` with the second moment rank-1 normalised (Li et al. 2023):
    param i is seen as ``[rows, cols]`` (``rows = exp_avg_sq_row[i].numel()``, ``cols =
    exp_avg_sq_col[i].numel()``, ``rows * cols = numel``), and entry (i, j) of the second moment
    is stored as a code index of ``v_ij / min(row_max[i], col_max[j])``, where the fp32 row and
    column maxima of ``|v|`` replace the per-block absmax. The first moment stays block-wise
    (``blocksize_exp_avg``). The new maxima are taken over the updated moment before it is
    re-quantized (a statistics pass, then the update pass). CPU and CUDA (its tests passed on an H100, 2026-11-25).
    """
    if not params:
        return
    torch.ops.lowrank.adamw_step_rank1_(
        list(params), list(grads), list(exp_avg_q), list(exp_avg_absmax), list(exp_avg_sq_q), list(exp_avg_sq_row),
        list(exp_avg_sq_col), code_exp_avg, code_exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step, bits,
        blocksize_exp_avg, stochastic_rounding, seed, stochastic_exp_avg, stochastic_exp_avg_sq)


def adamw_step_fp32_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                     exp_avg: Sequence[torch.Tensor], exp_avg_sq: Sequence[torch.Tensor], *, lr: float,
                     beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
                     stochastic_rounding: bool = False, seed: int = 0) -> None:
    """The same AdamW step with fp32 moments (same shapes as the params), in place."""
    if not params:
        return
    torch.ops.lowrank.adamw_step_fp32_(list(params), list(grads), list(exp_avg), list(exp_avg_sq), lr, beta1,
                                       beta2, eps, weight_decay, step, stochastic_rounding, seed)


@torch.library.register_fake("lowrank::adamw_step_quantized_")
def _adamw_step_quantized_fake(params, grads, exp_avg_q, exp_avg_absmax, exp_avg_sq_q, exp_avg_sq_absmax,
                               code_exp_avg, code_exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step, bits,
                               blocksize_exp_avg, blocksize_exp_avg_sq, stochastic_rounding=False, seed=0,
                               stochastic_exp_avg=False, stochastic_exp_avg_sq=False):
    torch._check(bits in (4, 8), lambda: f"bits must be 8 or 4, got {bits}")
    for name, lst in (("grads", grads), ("exp_avg_q", exp_avg_q), ("exp_avg_absmax", exp_avg_absmax),
                      ("exp_avg_sq_q", exp_avg_sq_q), ("exp_avg_sq_absmax", exp_avg_sq_absmax)):
        torch._check(len(lst) == len(params), lambda: f"{name} has {len(lst)} tensors but params has {len(params)}")
    return None


@torch.library.register_fake("lowrank::adamw_step_rank1_")
def _adamw_step_rank1_fake(params, grads, exp_avg_q, exp_avg_absmax, exp_avg_sq_q, exp_avg_sq_row, exp_avg_sq_col,
                           code_exp_avg, code_exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step, bits,
                           blocksize_exp_avg, stochastic_rounding=False, seed=0, stochastic_exp_avg=False,
                           stochastic_exp_avg_sq=False):
    torch._check(bits in (4, 8), lambda: f"bits must be 8 or 4, got {bits}")
    for name, lst in (("grads", grads), ("exp_avg_q", exp_avg_q), ("exp_avg_absmax", exp_avg_absmax),
                      ("exp_avg_sq_q", exp_avg_sq_q), ("exp_avg_sq_row", exp_avg_sq_row),
                      ("exp_avg_sq_col", exp_avg_sq_col)):
        torch._check(len(lst) == len(params), lambda: f"{name} has {len(lst)} tensors but params has {len(params)}")
    for p, row, col in zip(params, exp_avg_sq_row, exp_avg_sq_col):
        torch._check(row.numel() * col.numel() == p.numel(),
                     lambda: f"exp_avg_sq_row and exp_avg_sq_col ({row.numel()} x {col.numel()}) must view a param "
                             f"of {p.numel()} elements as [rows, cols]")
    return None


@torch.library.register_fake("lowrank::adamw_step_fp32_")
def _adamw_step_fp32_fake(params, grads, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step,
                          stochastic_rounding=False, seed=0):
    for name, lst in (("grads", grads), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        torch._check(len(lst) == len(params), lambda: f"{name} has {len(lst)} tensors but params has {len(params)}")
    return None
