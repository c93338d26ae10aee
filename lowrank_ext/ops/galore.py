"""The projections of the GaLore-family optimizers: ``torch.ops.lowrank.galore_project`` and
``torch.ops.lowrank.galore_apply_`` with their fake registrations (no autograd: optimizer
math). :class:`lowrank_ext.optim.GaLoreAdamW` is the usual way to call them.

P is the projection of a gradient G ``[m, n]``: ``[m, rank]`` on the left (R = Pᵀ G
``[rank, n]``) or ``[rank, n]`` on the right (R = G Pᵀ ``[m, rank]``), in fp32 or in
:func:`lowrank_ext.ops.quant.quantize_blockwise` form (uint8 indices, absmax, a 256- or
16-entry code: Q-GaLore's INT8 / INT4 projections), dequantized inside the kernels as they
load it. ``back(X)`` is P X (left) or X P (right).

``galore_apply_`` applies one step in place, computed in fp32 and rounded once into the
param's dtype: ``param <- (1 - lr wd)(param - lr scale back(direction) - residual)`` where
the residual step is nothing (``mode="galore"``), Fira's ``lr scale S (G - back(low))`` with
S the per-column (left) / per-row (right) ratio ||direction|| / ||low|| and the norm of the
scaled residual limited to ``residual_growth`` times the previous one (``residual_prev_norm``,
a one-element fp32 tensor updated in place; 0 means no limit), or FRUGAL's state-free
``lr sign(G - back(low))``. Kernels: CPU and CUDA (its tests passed on an H100, 2026-11-25; fp32 with a dense P goes to cuBLAS
since, not yet run on a GPU: see the README).
"""
from __future__ import annotations

import torch

__all__ = ["galore_project", "galore_apply_", "MODES"]

MODES = {"galore": 0, "fira": 1, "frugal": 2}
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def galore_project(grad, proj, proj_absmax=None, proj_code=None, *, rank: int, blocksize: int = 0,
                   right: bool) -> torch.Tensor:
    """R = Pᵀ G ``[rank, n]`` (left) or G Pᵀ ``[m, rank]`` (right), fp32."""
    return torch.ops.lowrank.galore_project(grad, proj, proj_absmax, proj_code, rank, blocksize, right)


def galore_apply_(param, direction, proj, proj_absmax=None, proj_code=None, *, rank: int, blocksize: int = 0,
                  right: bool, lr: float, scale: float, weight_decay: float = 0.0, mode: str = "galore",
                  grad=None, low=None, residual_prev_norm=None, residual_growth: float = 1.01) -> None:
    """One projected step into ``param``, in place (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    torch.ops.lowrank.galore_apply_(param, direction, proj, proj_absmax, proj_code, rank, blocksize, right, lr,
                                    scale, weight_decay, MODES[mode], grad, low, residual_prev_norm,
                                    residual_growth)


def _check_fake(t, proj, rank, right):
    torch._check(t.dim() == 2 and t.dtype in _FLOATS, lambda: f"expected a 2-D float tensor, got {t.shape} {t.dtype}")
    m, n = t.shape
    for bound in (1 <= rank, rank <= m, rank <= n):  # not min(m, n): no guard on which is smaller
        torch._check(bound, lambda: f"rank must be in [1, min(m, n)], got {rank}")
    if proj.dtype != torch.uint8:
        want = (rank, n) if right else (m, rank)
        torch._check(tuple(proj.shape) == want and proj.dtype == torch.float32,
                     lambda: f"proj must be fp32 {want}, got {tuple(proj.shape)} {proj.dtype}")


@torch.library.register_fake("lowrank::galore_project")
def _galore_project_fake(grad, proj, proj_absmax, proj_code, rank, blocksize, right):
    _check_fake(grad, proj, rank, right)
    m, n = grad.shape
    return grad.new_empty((m, rank) if right else (rank, n), dtype=torch.float32)


@torch.library.register_fake("lowrank::galore_apply_")
def _galore_apply_fake(param, direction, proj, proj_absmax, proj_code, rank, blocksize, right, lr, scale,
                       weight_decay, residual_mode=0, grad=None, low=None, residual_prev_norm=None,
                       residual_growth=1.01):
    _check_fake(param, proj, rank, right)
    torch._check(0 <= residual_mode <= 2, lambda: f"residual_mode must be 0, 1 or 2, got {residual_mode}")
    return None
