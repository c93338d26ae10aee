"""Monarch matrices: ``torch.ops.lowrank.monarch_forward`` / ``monarch_backward`` and the
one-factor ``blockdiag_forward`` / ``blockdiag_backward``, their fake and autograd
registrations, and the differentiable entry points :func:`monarch` and :func:`blockdiag`.

    monarch:   y = P L P R x,  R = blockdiag(w1), w1 [nblocks, mid, in_bs]
                               L = blockdiag(w2), w2 [nblocks, out_bs, mid]
    blockdiag: y = blockdiag(w) x,               w  [nblocks, out_bs, in_bs]

The layout is HazyResearch's ``blockdiag_butterfly_multiply`` (fly / m2): stage 1 maps
``x[k*in_bs + p]`` to ``h[k*mid + q]``; stage 2 reads ``h[r*nblocks + l]`` and writes
``y[s*nblocks + l]``. The kernels apply the permutation P by indexing, never as a permuted
copy. Backward saves x and, by default, the intermediate h = R x ([nblocks*mid, N], in x's
dtype); with ``save_intermediate=False`` it recomputes R x instead (less memory, one more
block GEMM). Kernels: CPU, and CUDA (a strided batched-GEMM kernel; its tests passed on an H100,
2026-11-25; fp16/bf16 on tensor cores since, not yet run on a GPU: see the README).
"""
from __future__ import annotations

import torch

from ._common import as_rows, autocast_off, autocast_on, first_order_only, from_rows, register_autograd

__all__ = ["monarch", "blockdiag", "monarch_forward", "monarch_backward", "blockdiag_forward", "blockdiag_backward"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def monarch_forward(x, w1, w2, save_intermediate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw op on 2-D ``x [N, nblocks*in_bs]``: ``(y [N, nblocks*out_bs], h)`` with h the
    intermediate R x ``[nblocks*mid, N]`` when ``save_intermediate``, else empty. No autograd:
    use :func:`monarch`."""
    return torch.ops.lowrank.monarch_forward(x, w1, w2, save_intermediate)


def monarch_backward(grad_y, x, w1, w2, h=None, output_mask=(True, True, True)):
    """Gradients ``(x, w1, w2)`` of :func:`monarch_forward`'s y, each only where
    ``output_mask`` asks (the others come back empty). ``h`` None: R x is recomputed."""
    return torch.ops.lowrank.monarch_backward(grad_y, x, w1, w2, h, list(output_mask))


def blockdiag_forward(x, w) -> torch.Tensor:
    """The raw op: ``x [N, nblocks*in_bs]`` -> ``[N, nblocks*out_bs]``, block k of y is
    ``x_k w[k]^T``. No autograd: use :func:`blockdiag`."""
    return torch.ops.lowrank.blockdiag_forward(x, w)


def blockdiag_backward(grad_y, x, w, output_mask=(True, True)):
    """Gradients ``(x, w)`` of :func:`blockdiag_forward`, each only where ``output_mask`` asks."""
    return torch.ops.lowrank.blockdiag_backward(grad_y, x, w, list(output_mask))


def _autocast(device_type, *tensors):
    """autocast's rule for nn.Linear: fp32/fp16/bf16 inputs cast to the autocast dtype, fp64 left alone."""
    if not autocast_on(device_type):
        return tensors
    dt = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dt) if t.dtype in (torch.float32, torch.float16, torch.bfloat16) else t for t in tensors)


def monarch(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, *, save_intermediate: bool | None = None
            ) -> torch.Tensor:
    """Differentiable Monarch product on ``x [..., nblocks*in_bs]`` -> ``[..., nblocks*out_bs]``.

    ``save_intermediate`` (default: when a gradient will be needed) keeps R x for backward;
    False recomputes it there. Under ``torch.autocast`` the inputs are cast as ``nn.Linear``'s are.

    >>> import torch, lowrank_ext
    >>> x, w1, w2 = torch.randn(8, 64), torch.randn(4, 16, 16), torch.randn(4, 16, 16)
    >>> lowrank_ext.ops.monarch.monarch(x, w1, w2).shape
    torch.Size([8, 64])
    """
    x, w1, w2 = _autocast(x.device.type, x, w1, w2)
    if save_intermediate is None:
        save_intermediate = torch.is_grad_enabled() and (x.requires_grad or w1.requires_grad or w2.requires_grad)
    with autocast_off(x.device.type):
        y, _ = _monarch_forward(as_rows(x), w1, w2, save_intermediate)
    return from_rows(y, x)


def blockdiag(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Differentiable block-diagonal product on ``x [..., nblocks*in_bs]`` -> ``[..., nblocks*out_bs]``
    (BOFT / Bone-style factors applied to activations; no dense matrix is built).

    >>> import torch, lowrank_ext
    >>> lowrank_ext.ops.monarch.blockdiag(torch.randn(3, 2, 32), torch.randn(4, 8, 8)).shape
    torch.Size([3, 2, 32])
    """
    x, w = _autocast(x.device.type, x, w)
    with autocast_off(x.device.type):
        y = _blockdiag_forward(as_rows(x), w)
    return from_rows(y, x)


def _check_fake(x, w1, w2, op):
    torch._check(x.dim() == 2, lambda: f"{op}: x must be 2-D [N, d_in], got {tuple(x.shape)}")
    torch._check(x.dtype in _DTYPES, lambda: f"{op}: x must be a float tensor, got {x.dtype}")
    torch._check(w1.dim() == 3 and x.shape[1] == w1.shape[0] * w1.shape[2],
                 lambda: f"{op}: x {tuple(x.shape)} does not fit w1 {tuple(w1.shape)} [nblocks, mid, in_bs]")
    torch._check(w2 is None or (w2.dim() == 3 and w2.shape[0] == w1.shape[0] and w2.shape[2] == w1.shape[1]),
                 lambda: f"{op}: w2 {tuple(w2.shape)} must be [nblocks, out_bs, mid] after w1 {tuple(w1.shape)}")
    for t in (w1, w2):
        torch._check(t is None or t.dtype == x.dtype, lambda: f"{op}: every tensor must have x's dtype")


@torch.library.register_fake("lowrank::monarch_forward")
def _monarch_forward_fake(x, w1, w2, save_intermediate=False):
    _check_fake(x, w1, w2, "monarch_forward")
    nb, mid, _ = w1.shape
    h = x.new_empty(nb * mid, x.shape[0]) if save_intermediate else x.new_empty(0)
    return x.new_empty(x.shape[0], nb * w2.shape[1]), h


@torch.library.register_fake("lowrank::monarch_backward")
def _monarch_backward_fake(grad_y, x, w1, w2, h, output_mask):
    _check_fake(x, w1, w2, "monarch_backward")
    return tuple(x.new_empty(t.shape) if m else x.new_empty(0) for t, m in zip((x, w1, w2), output_mask))


@torch.library.register_fake("lowrank::blockdiag_forward")
def _blockdiag_forward_fake(x, w):
    _check_fake(x, w, None, "blockdiag_forward")
    return x.new_empty(x.shape[0], w.shape[0] * w.shape[1])


@torch.library.register_fake("lowrank::blockdiag_backward")
def _blockdiag_backward_fake(grad_y, x, w, output_mask):
    _check_fake(x, w, None, "blockdiag_backward")
    return tuple(x.new_empty(t.shape) if m else x.new_empty(0) for t, m in zip((x, w), output_mask))


def _monarch_setup_context(ctx, inputs, output):
    x, w1, w2, save_h = inputs
    _, h = output
    ctx.mark_non_differentiable(h)
    ctx.save_for_backward(x, w1, w2, h)
    ctx.h_saved = bool(save_h)  # not h.numel(): with a data-dependent batch that would guard on it


def _monarch_backward(ctx, grad_y, _grad_h):
    x, w1, w2, h = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:3])
    if not any(mask):
        return None, None, None, None
    out = torch.ops.lowrank.monarch_backward(grad_y.contiguous(), x, w1, w2, h if ctx.h_saved else None, mask)
    grads = first_order_only("monarch_forward", tuple(g if m else None for g, m in zip(out, mask)), (grad_y, x, w1, w2))
    return *grads, None


def _blockdiag_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _blockdiag_backward(ctx, grad_y):
    x, w = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:2])
    if not any(mask):
        return None, None
    out = torch.ops.lowrank.blockdiag_backward(grad_y.contiguous(), x, w, mask)
    return first_order_only("blockdiag_forward", tuple(g if m else None for g, m in zip(out, mask)), (grad_y, x, w))


_monarch_forward = register_autograd("monarch_forward", _monarch_backward, setup_context=_monarch_setup_context,
                                     function="monarch.monarch")
_blockdiag_forward = register_autograd("blockdiag_forward", _blockdiag_backward,
                                       setup_context=_blockdiag_setup_context, function="monarch.blockdiag")
