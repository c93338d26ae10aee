"""References of the monarch ops: the Monarch product as HazyResearch's
blockdiag_butterfly_multiply lays it out, y = P L P R x, in fp64 with plain bmm and
permuted copies (what the kernels avoid), and the dense matrix of a Monarch factor pair.

Layout: stage 1 (R = blockdiag(w1), w1 [nblocks, mid, in_bs]) maps x[k*in_bs + p] to
h[k*mid + q]; stage 2 (L = blockdiag(w2), w2 [nblocks, out_bs, mid]) maps h[r*nblocks + l]
to y[s*nblocks + l].
"""
from __future__ import annotations

import torch


def _stage1(x, w1):
    nb, mid, in_bs = w1.shape
    n = x.shape[0]
    h = torch.bmm(x.reshape(n, nb, in_bs).transpose(0, 1), w1.transpose(1, 2))  # [nb, N, mid]
    return h.transpose(0, 1).reshape(n, nb * mid)  # natural order h[k*mid + q]


def _stage2(h, w2):
    nb, out_bs, mid = w2.shape
    n = h.shape[0]
    g = h.reshape(n, mid, nb).permute(2, 0, 1)  # [l, N, r] = h[r*nb + l]
    y = torch.bmm(g, w2.transpose(1, 2))  # [l, N, s]
    return y.permute(1, 2, 0).reshape(n, out_bs * nb)  # y[s*nb + l]


def monarch_ref(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Differentiable fp64 Monarch product of x [N, nblocks*in_bs] (the result in x's dtype)."""
    return _stage2(_stage1(x.double(), w1.double()), w2.double()).to(x.dtype)


def monarch_forward_ref(x, w1, w2, save_intermediate=False):
    xd = x.double()
    h = _stage1(xd, w1.double())
    y = _stage2(h, w2.double()).to(x.dtype)
    return y, (h.t().to(x.dtype).contiguous() if save_intermediate else x.new_empty(0))


def monarch_backward_ref(grad_y, x, w1, w2, h=None, output_mask=(True, True, True)):
    xd, w1d, w2d = (t.double().requires_grad_() for t in (x, w1, w2))
    with torch.enable_grad():
        y = _stage2(_stage1(xd, w1d), w2d)
        grads = torch.autograd.grad(y, (xd, w1d, w2d), grad_y.double())
    return tuple(g.to(x.dtype) if m else x.new_empty(0) for g, m in zip(grads, output_mask))


def blockdiag_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Differentiable fp64 block-diagonal product: y[k*out_bs + o] = sum_p w[k, o, p] x[k*in_bs + p]."""
    nb, out_bs, in_bs = w.shape
    n = x.shape[0]
    y = torch.bmm(x.double().reshape(n, nb, in_bs).transpose(0, 1), w.double().transpose(1, 2))
    return y.transpose(0, 1).reshape(n, nb * out_bs).to(x.dtype)


def blockdiag_forward_ref(x, w):
    return blockdiag_ref(x, w)


def blockdiag_backward_ref(grad_y, x, w, output_mask=(True, True)):
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    with torch.enable_grad():
        grads = torch.autograd.grad(blockdiag_ref(xd, wd), (xd, wd), grad_y.double())
    return tuple(g.to(x.dtype) if m else x.new_empty(0) for g, m in zip(grads, output_mask))


def monarch_dense_ref(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The dense [nblocks*out_bs, nblocks*in_bs] matrix M with y = x M^T, in fp64."""
    eye = torch.eye(w1.shape[0] * w1.shape[2], dtype=torch.float64, device=w1.device)
    return _stage2(_stage1(eye, w1.double()), w2.double()).t()
