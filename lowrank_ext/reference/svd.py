"""References of the svd ops, in plain torch: the same Gaussian sketch (Philox, Box-Muller in
fp32), Householder QR and LAPACK's SVD (torch.linalg) in fp64. Results in the ops' dtypes:
fp64 for fp64 inputs, fp32 otherwise."""
from __future__ import annotations

import math

import torch

from .quant import philox4x32_10_ref

_MASK32 = 0xFFFFFFFF


def _work(a: torch.Tensor) -> torch.dtype:
    return torch.float64 if a.dtype == torch.float64 else torch.float32


def sketch_matrix_ref(n: int, l: int, seed: int, device=None) -> torch.Tensor:
    """Omega [n, l], fp32: element index e = c * n + j, four Gaussians per Philox call
    (counter e // 4, offset 0), Box-Muller on two 24-bit uniforms (csrc/svd/svd_math.h)."""
    seed &= (1 << 64) - 1
    e = torch.arange(l, dtype=torch.int64, device=device)[None, :] * n + torch.arange(n, dtype=torch.int64,
                                                                                     device=device)[:, None]
    group = e >> 2
    zeros = torch.zeros_like(group)
    bits = philox4x32_10_ref(torch.stack([group & _MASK32, group >> 32, zeros, zeros], dim=-1),
                             (seed & _MASK32, seed >> 32))
    pair = (e >> 1) & 1
    v1 = bits.gather(-1, (2 * pair).unsqueeze(-1)).squeeze(-1)
    v2 = bits.gather(-1, (2 * pair + 1).unsqueeze(-1)).squeeze(-1)
    u1 = ((v1 >> 8) + 1).to(torch.float32) * (1.0 / 16777216.0)
    u2 = (v2 >> 8).to(torch.float32) * (1.0 / 16777216.0)
    radius = torch.sqrt(-2.0 * torch.log(u1))
    theta = u2 * (2.0 * math.pi)
    return torch.where((e & 1) == 1, radius * torch.sin(theta), radius * torch.cos(theta))


def gaussian_sketch_ref(a: torch.Tensor, l: int, seed: int) -> torch.Tensor:
    omega = sketch_matrix_ref(a.shape[-1], l, seed, a.device).double()
    return (a.double() @ omega).to(_work(a))


def _fix_signs(u: torch.Tensor, vh: torch.Tensor | None):
    """The ops' sign rule: each column of U has its largest-|.| entry (first on ties) positive."""
    if u.numel() == 0:
        return u, vh
    idx = u.abs().argmax(dim=-2, keepdim=True)
    sign = u.gather(-2, idx).sign()
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return u * sign, (vh * sign.transpose(-2, -1) if vh is not None else None)


def jacobi_svd_ref(a: torch.Tensor):
    """torch.linalg.svd (reduced) in fp64 with the ops' sign rule. Singular vectors of repeated
    singular values are not unique: compare those through U S Vh or subspaces."""
    u, s, vh = torch.linalg.svd(a.double(), full_matrices=False)
    u, vh = _fix_signs(u, vh)
    return u.to(_work(a)), s.to(_work(a)), vh.to(_work(a))


def rsvd_ref(a: torch.Tensor, k: int, oversample: int = 10, n_iter: int = 2, seed: int = 0,
             start: torch.Tensor | None = None, omega: torch.Tensor | None = None):
    """Halko-Martinsson-Tropp with the op's sketch, Householder QR after every product and
    LAPACK's SVD of B = Q^T A, all in fp64. A warm start [.., m, j] takes the first j columns
    of the first basis (the sketch gives the other l - j). `omega` [n, l - j], if given, is the
    sketch matrix itself: sketch_matrix_ref's Box-Muller goes through torch's vectorised log,
    sin and cos, which differ from the kernel's by fp32 ulps (by how many depends on the torch
    build), and a comparison of the algorithms at fp64 rounding needs the kernel's own Omega."""
    m, n = a.shape[-2:]
    if not 1 <= k <= min(m, n):
        raise RuntimeError(f"rsvd: k must be in [1, min(m, n)], got {k}")
    l = min(k + oversample, m, n)
    ad = a.double()
    j = 0 if start is None else start.shape[-1]
    if start is not None and (not 1 <= j <= l or start.shape[:-1] != a.shape[:-1]):
        raise RuntimeError(f"rsvd: start must be [.., m, j] with 1 <= j <= {l}, got {tuple(start.shape)}")
    if omega is None:
        omega = sketch_matrix_ref(n, l - j, seed, a.device)  # Omega's columns nest: the first l - j
    y = ad @ omega.double()
    if start is not None:
        y = torch.cat([start.double(), y], dim=-1)
    q = torch.linalg.qr(y).Q
    for _ in range(n_iter):
        z = torch.linalg.qr(ad.transpose(-2, -1) @ q).Q
        q = torch.linalg.qr(ad @ z).Q
    ub, s, vh = torch.linalg.svd(q.transpose(-2, -1) @ ad, full_matrices=False)
    u, vh = _fix_signs(q @ ub[..., :k], vh[..., :k, :])
    return u.to(_work(a)), s[..., :k].to(_work(a)), vh.to(_work(a))


def batched_rsvd_ref(mats: list[torch.Tensor], k: int, oversample: int = 10, n_iter: int = 2, seed: int = 0,
                     start: torch.Tensor | None = None):
    """rsvd_ref of the matrices' stack (one shape, dtype and device)."""
    if not mats or any(m.dim() != 2 or m.shape != mats[0].shape or m.dtype != mats[0].dtype for m in mats):
        raise RuntimeError("batched_rsvd: needs 2-D matrices of one shape and dtype")
    return rsvd_ref(torch.stack(mats), k, oversample, n_iter, seed, start)


def svd_update_ref(u: torch.Tensor, s: torch.Tensor, x: torch.Tensor, k: int):
    """The top k of the exact SVD of [U diag(S), X] (what the incremental update computes when
    the first k0 + c singular values are kept; the op truncates per block of columns)."""
    wt = torch.float64 if torch.float64 in (u.dtype, x.dtype) else torch.float32
    m = torch.cat([u.double() * s.double(), x.double()], dim=1)
    uu, ss, _ = torch.linalg.svd(m, full_matrices=False)
    uu, _ = _fix_signs(uu[:, :k], None)
    return uu.to(wt), ss[:k].to(wt)
