"""Randomized and streaming SVD: ``torch.ops.lowrank.{gaussian_sketch, jacobi_svd, rsvd,
batched_rsvd, svd_update}`` with their fake registrations.

    gaussian_sketch(A, l, seed):    A @ Omega, Omega [n, l] Gaussian from Philox(seed), never stored
    jacobi_svd(A):                  U, S, Vh of small matrices [.., m, n] (one-sided Jacobi)
    rsvd(A, k, oversample, n_iter, seed, start):  the top-k SVD of A [.., m, n], randomized
                                    (start: an optional warm start, a basis [.., m, j])
    batched_rsvd([A1, A2, ..], k, ...):      rsvd of their stack, which the CPU never forms
    svd_update(U, S, X, k):         the top-k left factors of [U diag(S), X]

fp16/bf16 inputs are computed, and returned, in fp32; fp64 stays fp64. Results are
reproducible for a seed on one machine and thread count (other thread counts agree up to
rounding: LAPACK's multi-threaded QR and some small GEMMs round differently; known exception
on CPU: the first batched call after ``torch.set_num_threads`` can differ from later ones in
the last bits, from MKL's QR, cause not found) and sign-fixed: each column of U has its largest-magnitude entry positive. None of the ops has an autograd formula. Kernels: CPU, and
CUDA (its tests passed on an H100, 2026-11-25: see the README; no host synchronisation in rsvd there).
"""
from __future__ import annotations

import math

import torch

from ._common import as_int64_seed

__all__ = ["gaussian_sketch", "jacobi_svd", "rsvd", "batched_rsvd", "svd_update"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _work(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def gaussian_sketch(a: torch.Tensor, l: int, seed: int = 0) -> torch.Tensor:
    """``A @ Omega`` for ``A [m, n]`` or ``[b, m, n]``: ``Omega [n, l]`` standard normal from
    Philox(seed) (the same for every batch entry), generated panel by panel."""
    return torch.ops.lowrank.gaussian_sketch(a, l, as_int64_seed(seed))


def jacobi_svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reduced SVD ``A = U diag(S) Vh`` of ``A [..., m, n]`` (any leading dims), by one-sided
    Jacobi, one matrix per thread: for many small matrices (min(m, n) up to a few hundred).

    >>> import torch, lowrank_ext
    >>> a = torch.randn(8, 20, 6, dtype=torch.float64)
    >>> u, s, vh = lowrank_ext.ops.svd.jacobi_svd(a)
    >>> torch.allclose(u @ torch.diag_embed(s) @ vh, a)
    True
    """
    lead = a.shape[:-2]
    u, s, vh = torch.ops.lowrank.jacobi_svd(a.reshape(math.prod(lead), *a.shape[-2:]))  # -1 fails on empty a
    return u.reshape(*lead, *u.shape[1:]), s.reshape(*lead, s.shape[-1]), vh.reshape(*lead, *vh.shape[1:])


def rsvd(a: torch.Tensor, k: int, oversample: int = 10, n_iter: int = 2, seed: int = 0,
         start: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-``k`` SVD of ``A [m, n]`` or ``[b, m, n]`` by randomized range finding
    (``l = k + oversample`` sketch columns, ``n_iter`` power iterations). ``start`` ``[m, j]``
    (``[b, m, j]``), ``1 <= j <= l``: a warm start, e.g. the previous ``U`` of a slowly changing
    matrix; the first basis is then its columns followed by the first ``l - j`` columns of the
    Gaussian sketch (see :func:`lowrank_ext.linalg.rsvd`)."""
    return torch.ops.lowrank.rsvd(a, k, oversample, n_iter, as_int64_seed(seed), start)


def batched_rsvd(mats: list[torch.Tensor], k: int, oversample: int = 10, n_iter: int = 2, seed: int = 0,
                 start: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``rsvd(torch.stack(mats), ..., start)`` for matrices ``[m, n]`` of one shape, dtype and
    device, without the stacked copy on CPU (each matrix, transposed views included, is read
    where it lies): U ``[b, m, k]``, S ``[b, k]``, Vh ``[b, k, n]``; on CPU the same bits as rsvd
    of a stack laid out as the matrices are (``torch.stack(ms).mT`` for transposed views
    ``m.t()``). ``start``: ``[b, m, j]``, as rsvd's."""
    mats = list(mats)
    if not mats:  # the dispatcher picks a kernel by the tensors' device: an empty list has none
        raise ValueError("batched_rsvd: needs at least one matrix")
    return torch.ops.lowrank.batched_rsvd(mats, k, oversample, n_iter, as_int64_seed(seed), start)


def svd_update(u: torch.Tensor, s: torch.Tensor, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold new columns ``X [m, c]`` into a truncated SVD ``U [m, k0], S [k0]``: the top ``k``
    left singular vectors and values of ``[U diag(S), X]`` (exact when that matrix has rank
    <= k; X is taken in blocks of min(m, max(64, 2k)) columns, truncating to k after each)."""
    return torch.ops.lowrank.svd_update(u, s, x, k)


def _check_matrix(a, op):
    torch._check(a.dim() in (2, 3), lambda: f"{op}: A must be [m, n] or [b, m, n], got {tuple(a.shape)}")
    torch._check(a.dtype in _DTYPES, lambda: f"{op}: A must be a float tensor, got {a.dtype}")


@torch.library.register_fake("lowrank::gaussian_sketch")
def _gaussian_sketch_fake(a, l, seed):
    _check_matrix(a, "gaussian_sketch")
    torch._check(l >= 0, lambda: f"gaussian_sketch: l must be >= 0, got {l}")
    return a.new_empty(*a.shape[:-1], l, dtype=_work(a.dtype))


@torch.library.register_fake("lowrank::jacobi_svd")
def _jacobi_svd_fake(a):
    _check_matrix(a, "jacobi_svd")
    m, n = a.shape[-2:]
    p = torch.sym_min(m, n)  # not min(): a Python min over SymInts guards on which is smaller (a recompile)
    lead, wt = a.shape[:-2], _work(a.dtype)
    return a.new_empty(*lead, m, p, dtype=wt), a.new_empty(*lead, p, dtype=wt), a.new_empty(*lead, p, n, dtype=wt)


def _check_start(start, lead, m, n, k, oversample, op):
    """start [*lead, m, j] with 1 <= j <= min(k + oversample, m, n), a float tensor."""
    if start is None:
        return
    torch._check(start.dtype in _DTYPES, lambda: f"{op}: start must be a float tensor, got {start.dtype}")
    torch._check(start.dim() == len(lead) + 2 and tuple(start.shape[:-2]) == tuple(lead) and start.shape[-2] == m,
                 lambda: f"{op}: start must be [{', '.join(map(str, (*lead, m)))}, j], got {tuple(start.shape)}")
    j = start.shape[-1]
    for bound in (1 <= j, j <= k + oversample, j <= m, j <= n):  # no min(): no guard on the smaller
        torch._check(bound, lambda: f"{op}: start must have between 1 and l = min(k + oversample, m, n) columns, "
                                    f"got {j}")


@torch.library.register_fake("lowrank::rsvd")
def _rsvd_fake(a, k, oversample=10, n_iter=2, seed=0, start=None):
    _check_matrix(a, "rsvd")
    m, n = a.shape[-2:]
    for bound in (1 <= k, k <= m, k <= n):  # not min(m, n): no guard on which is smaller
        torch._check(bound, lambda: f"rsvd: k must be in [1, min(m, n)], got {k}")
    _check_start(start, a.shape[:-2], m, n, k, oversample, "rsvd")
    lead, wt = a.shape[:-2], _work(a.dtype)
    return a.new_empty(*lead, m, k, dtype=wt), a.new_empty(*lead, k, dtype=wt), a.new_empty(*lead, k, n, dtype=wt)


@torch.library.register_fake("lowrank::batched_rsvd")
def _batched_rsvd_fake(mats, k, oversample=10, n_iter=2, seed=0, start=None):
    torch._check(len(mats) > 0, lambda: "batched_rsvd: needs at least one matrix")
    a = mats[0]
    for t in mats:
        _check_matrix(t, "batched_rsvd")
        torch._check(t.dim() == 2 and t.shape == a.shape and t.dtype == a.dtype,
                     lambda: "batched_rsvd: the matrices must be 2-D and share one shape and dtype")
    m, n = a.shape
    for bound in (1 <= k, k <= m, k <= n):  # not min(m, n): no guard on which is smaller
        torch._check(bound, lambda: f"batched_rsvd: k must be in [1, min(m, n)], got {k}")
    _check_start(start, (len(mats),), m, n, k, oversample, "batched_rsvd")
    b, wt = len(mats), _work(a.dtype)
    return a.new_empty(b, m, k, dtype=wt), a.new_empty(b, k, dtype=wt), a.new_empty(b, k, n, dtype=wt)


@torch.library.register_fake("lowrank::svd_update")
def _svd_update_fake(u, s, x, k):
    torch._check(u.dim() == 2 and s.dim() == 1 and x.dim() == 2 and u.shape[0] == x.shape[0]
                 and s.shape[0] == u.shape[1], lambda: "svd_update: U [m, k0], S [k0], X [m, c]")
    for bound in (1 <= k, k <= x.shape[0], k <= u.shape[1] + x.shape[1]):  # no min(): no guard on the smaller
        torch._check(bound, lambda: f"svd_update: bad k = {k}")
    wt = torch.float64 if torch.float64 in (u.dtype, x.dtype) else torch.float32
    return x.new_empty(x.shape[0], k, dtype=wt), x.new_empty(k, dtype=wt)
