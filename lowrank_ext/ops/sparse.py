"""Sparse adapters (SHiRA, SLTrain): ``torch.ops.lowrank.sparse_scatter_add_`` and
``torch.ops.lowrank.sddmm`` with their fake registrations.

    sparse_scatter_add_:  W.view(-1)[indices[a]] += alphas[a] * values[a]   (each adapter a, in place)
    sddmm:                v_i = sum_n grad_out[n, rows_i] * x[n, cols_i]

The scatter checks every index before writing anything (an out-of-range index raises and
leaves the weight untouched); repeated indices accumulate. On CPU entries are applied in
order, one rounding each, so the result is what a serial loop gives; on CUDA they are
atomic adds (unordered where indices repeat). sddmm is the gradient of the values of a
sparse adapter W + S: it never forms the dense d_out x d_in gradient. Neither op has an
autograd formula (an in-place update and a gradient). Kernels: CPU, and CUDA (its tests
passed on an H100, 2026-11-25: see the README).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ._common import as_rows, is_scalar

__all__ = ["sparse_scatter_add_", "sddmm"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def sparse_scatter_add_(weight: torch.Tensor, indices: torch.Tensor | Sequence[torch.Tensor],
                        values: torch.Tensor | Sequence[torch.Tensor], alpha: float | Sequence[float] = 1.0, *,
                        check_indices: bool = True) -> None:
    """``weight.view(-1)[indices] += alpha * values`` in place, for one adapter (tensors and a
    float) or several fused in one call (lists). Indices are flat int64 positions into the
    contiguous weight; values any float dtype (added in fp32, rounded into weight's dtype).

    Every index is checked before anything is written: an out-of-range one raises and the
    weight is unchanged. On CUDA that check reads the indices' bounds back to the host, one
    synchronisation per call. ``check_indices=False`` says the caller has checked them (as
    :func:`lowrank_ext.sparse.apply` does, once for all weights, and :func:`~lowrank_ext.sparse.remove`
    with the indices apply checked): CUDA then does not synchronise, and an out-of-range index
    trips a device-side assertion instead (the CUDA context is lost, as with torch's index
    kernels; entries may have been written). The CPU checks either way.

    >>> import torch, lowrank_ext
    >>> w = torch.zeros(2, 3)
    >>> lowrank_ext.ops.sparse.sparse_scatter_add_(w, torch.tensor([1, 5, 1]), torch.tensor([1.0, 2.0, 3.0]), 0.5)
    >>> w
    tensor([[0., 2., 0.],
            [0., 0., 1.]])
    """
    if isinstance(indices, torch.Tensor):
        indices, values, alpha = [indices], [values], [alpha]
    elif is_scalar(alpha):
        alpha = [float(alpha)] * len(indices)
    torch.ops.lowrank.sparse_scatter_add_(weight, list(indices), list(values), [float(a) for a in alpha],
                                          bool(check_indices))


def sddmm(grad_out: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``[nnz]`` values ``sum_n grad_out[n, rows_i] * x[n, cols_i]`` for ``grad_out [..., d_out]``
    and ``x [..., d_in]`` (leading dims flattened), accumulated in fp32: the gradient of the
    entries (rows, cols) of a weight W with y = x W^T. Out-of-range rows or cols raise on CPU;
    on CUDA they trip a device assertion (checked in the kernel: no host synchronisation in a
    backward pass)."""
    return torch.ops.lowrank.sddmm(as_rows(grad_out), as_rows(x), rows, cols)


@torch.library.register_fake("lowrank::sparse_scatter_add_")
def _sparse_scatter_add_fake(weight, indices, values, alphas, check_indices=True):
    torch._check(weight.dtype in _DTYPES, lambda: f"weight must be a float tensor, got {weight.dtype}")
    torch._check(len(indices) == len(values) == len(alphas), lambda: "indices, values and alphas: one entry each")
    for i, v in zip(indices, values):
        torch._check(i.dim() == 1 and i.dtype == torch.int64, lambda: "indices must be 1-D int64")
        torch._check(v.dim() == 1 and v.shape[0] == i.shape[0], lambda: "values must be 1-D, one per index")
    return None


@torch.library.register_fake("lowrank::sddmm")
def _sddmm_fake(grad_out, x, rows, cols):
    torch._check(grad_out.dim() == 2 and x.dim() == 2 and grad_out.shape[0] == x.shape[0],
                 lambda: f"grad_out {tuple(grad_out.shape)} and x {tuple(x.shape)} must be [N, d_out] and [N, d_in]")
    torch._check(x.dtype in _DTYPES and grad_out.dtype == x.dtype, lambda: "grad_out and x: one float dtype")
    torch._check(rows.dim() == 1 and cols.dim() == 1 and rows.shape[0] == cols.shape[0],
                 lambda: "rows and cols must be 1-D of one length")
    return x.new_empty(rows.shape[0])
