"""Randomized and streaming SVD over the ``svd`` ops family.

    U, S, Vh = rsvd(A, k)                    # top-k SVD of A [m, n] or [b, m, n]
    factors = batched_rsvd([W1, W2, ...], k) # many matrices, one batched call per shape
    svd = StreamingSVD(k); svd.update(X1); svd.update(X2); svd.U, svd.S

Results are fp32 for fp32/fp16/bf16 inputs and fp64 for fp64, reproducible for a seed (on one
machine and thread count: BLAS may sum in another order elsewhere), with
each column of U sign-fixed (its largest-magnitude entry positive). CPU and CUDA kernels
(CUDA: its tests passed on an H100, 2026-11-25).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .ops import svd as _ops

__all__ = ["rsvd", "batched_rsvd", "StreamingSVD"]


def rsvd(a: torch.Tensor, k: int, oversample: int = 10, n_iter: int = 2, seed: int = 0,
         start: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-``k`` singular triplets of ``A [m, n]`` (or a batch ``[b, m, n]``) by randomized
    SVD (Halko, Martinsson, Tropp): a Gaussian sketch of ``l = k + oversample`` columns,
    ``n_iter`` power iterations, then an exact SVD of the small projected matrix.

    ``start`` ``[m, j]`` (``[b, m, j]`` for a batch), ``1 <= j <= l``: a warm start for a matrix
    that changed little since its last SVD (a GaLore gradient between refreshes, say; PowerSGD
    warm-starts the same way): the range finder begins from those j columns (the previous ``U``)
    and the first ``l - j`` columns of the Gaussian sketch, instead of ``l`` Gaussian ones. Each
    power iteration then refines a nearly right subspace, so one iteration (3 products with A
    of l columns, plus the thin sketch of l - j) can match a cold start's two (6 products; the
    galore benchmark's drifting-gradient case). A start unrelated to A is as good as a random
    one: then one warm iteration is less accurate than two cold ones.

    >>> import torch
    >>> from lowrank_ext.linalg import rsvd
    >>> a = torch.randn(300, 20) @ torch.randn(20, 200)          # rank 20
    >>> u, s, vh = rsvd(a, k=20)
    >>> bool(torch.linalg.matrix_norm(u @ torch.diag(s) @ vh - a) < 1e-3 * torch.linalg.matrix_norm(a))
    True
    >>> u2, s2, _ = rsvd(a + 1e-3 * torch.randn(300, 200), k=20, n_iter=1, start=u)  # a small change
    >>> bool(torch.allclose(s2, s, rtol=1e-2))
    True
    """
    return _ops.rsvd(a, k, oversample, n_iter, seed, start)


def batched_rsvd(mats: Sequence[torch.Tensor], k: int, oversample: int = 10, n_iter: int = 2,
                 seed: int = 0, start: Sequence[torch.Tensor] | None = None,
                 ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """:func:`rsvd` of each matrix of a list (a model's layers, say), grouped by shape, dtype
    and device into one batched call per group (``torch.ops.lowrank.batched_rsvd``, which on
    CPU reads each matrix where it lies: no stacked copy); returns the factors in the list's
    order. Each matrix gets the same sketch as a lone ``rsvd(m, k, ..., seed)`` call, so the
    results equal those of a loop up to rounding. ``start``: one warm start ``[m_i, j]`` per
    matrix (one j per group), as :func:`rsvd`'s."""
    if start is not None and len(start) != len(mats):
        raise ValueError(f"batched_rsvd: start must give one tensor per matrix ({len(mats)}), got {len(start)}")
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(mats):
        if m.dim() != 2:
            raise ValueError(f"batched_rsvd takes 2-D matrices, got shape {tuple(m.shape)} at position {i}")
        groups.setdefault((tuple(m.shape), m.dtype, m.device), []).append(i)
    out: list = [None] * len(mats)
    for idx in groups.values():
        group_start = None
        if start is not None:
            if len({start[i].shape[-1] for i in idx}) > 1:
                raise ValueError(f"batched_rsvd: the starts of the matrices of shape {tuple(mats[idx[0]].shape)} "
                                 f"must have the same number of columns (one batched call per shape)")
            group_start = torch.stack([start[i] for i in idx])
        u, s, vh = _ops.batched_rsvd([mats[i] for i in idx], k, oversample, n_iter, seed, group_start)
        for j, i in enumerate(idx):
            out[i] = (u[j], s[j], vh[j])
    return out


class StreamingSVD:
    """The top-``k`` left singular vectors and values of a matrix seen a block of columns at
    a time: ``update(X)`` folds in ``X [m, c]`` (incremental SVD, :func:`svd_update`: project
    onto the current basis, orthonormalise the residual, SVD of a small square matrix,
    truncate). ``k + oversample`` directions are tracked and the top ``k`` reported: exact
    while everything seen has rank <= k + oversample; beyond that each truncation drops a tail,
    as every one-pass method must, and the extra directions keep that tail away from the top k.

    For the right singular vectors of activations ``X [tokens, d]`` (EVA), feed ``X.T``.

    >>> import torch
    >>> from lowrank_ext.linalg import StreamingSVD
    >>> a = torch.randn(64, 8, dtype=torch.float64) @ torch.randn(8, 500, dtype=torch.float64)
    >>> svd = StreamingSVD(k=8)
    >>> for block in a.split(100, dim=1):
    ...     _ = svd.update(block)  # update returns the StreamingSVD
    >>> bool(torch.allclose(svd.S, torch.linalg.svdvals(a)[:8]))
    True
    """

    def __init__(self, k: int, oversample: int = 10):
        if not (isinstance(k, int) and k >= 1):
            raise ValueError(f"k must be a positive int, got {k!r}")
        if not (isinstance(oversample, int) and oversample >= 0):
            raise ValueError(f"oversample must be an int >= 0, got {oversample!r}")
        self.k, self.oversample = k, oversample
        self._u: torch.Tensor | None = None  # [m, <= k + oversample]
        self._s: torch.Tensor | None = None
        self.columns_seen = 0

    @property
    def U(self) -> torch.Tensor | None:
        """[m, k] (fewer while fewer than k columns were seen); None before the first update."""
        return None if self._u is None else self._u[:, :self.k]

    @property
    def S(self) -> torch.Tensor | None:
        return None if self._s is None else self._s[:self.k]

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> "StreamingSVD":
        if x.dim() != 2:
            raise ValueError(f"update takes a block of columns X [m, c], got shape {tuple(x.shape)}")
        if self._u is None:
            wt = torch.float64 if x.dtype == torch.float64 else torch.float32
            self._u = x.new_zeros(x.shape[0], 0, dtype=wt)
            self._s = x.new_zeros(0, dtype=wt)
        elif x.shape[0] != self._u.shape[0]:
            raise ValueError(f"update: X has {x.shape[0]} rows but earlier blocks had {self._u.shape[0]}")
        if x.shape[1] == 0:
            return self
        k = min(self.k + self.oversample, x.shape[0], self._u.shape[1] + x.shape[1])
        self._u, self._s = _ops.svd_update(self._u, self._s, x, k)
        self.columns_seen += x.shape[1]
        return self
