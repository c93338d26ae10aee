"""Fused LoRA: ``torch.ops.lowrank.lora_forward`` / ``lora_backward`` / ``lora_merge_``,
their fake and autograd registrations, and :func:`lora_linear`, the differentiable
entry point the layers use.

    y = x W^T + b + scale * h B^T,   h = ((drop(x) A^T) * rank_scale) core^T

with x ``[..., d_in]``, W ``[d_out, d_in]``, A ``[r, d_in]``, B ``[d_out, r]``, the optional
``core`` ``[r, r]`` (LoRA-XS / LoRA-SB: A and B frozen, the core trained) and ``rank_scale``
``[r]`` (AdaLoRA's diagonal). Dropout acts on the LoRA branch's input only; its mask comes
from Philox(seed) and is regenerated in backward, so backward saves x, xa = drop(x) A^T
``[N, r]`` and the seed, nothing else of size N x d_in. Kernels: CPU, and CUDA (cuBLAS
GEMMs plus Philox kernels for the dropout passes; p = 0 verified on an H100, the p > 0 passes
rewritten since and not yet run on a GPU: see the README).
"""
from __future__ import annotations

import torch

from ._common import (as_int64_seed, as_rows, autocast_off, autocast_on, first_order_only, from_rows,
                      register_autograd)

__all__ = ["lora_linear", "lora_forward", "lora_backward", "lora_merge_"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _seed_args(seed: int | torch.Tensor) -> tuple[int, torch.Tensor | None]:
    """An int seed, or a CPU int64 scalar tensor (what a compiled graph can draw)."""
    return (0, seed) if isinstance(seed, torch.Tensor) else (as_int64_seed(seed), None)


def lora_forward(x, weight, bias, lora_a, lora_b, core=None, rank_scale=None, *, scale: float,
                 dropout_p: float = 0.0, seed: int | torch.Tensor = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw op on 2-D ``x [N, d_in]``: returns ``(y [N, d_out], xa [N, r])``. No autograd:
    use :func:`lora_linear` for a differentiable call."""
    return torch.ops.lowrank.lora_forward(x, weight, bias, lora_a, lora_b, core, rank_scale, scale, dropout_p,
                                          *_seed_args(seed))


def lora_backward(grad_y, x, weight, lora_a, lora_b, core, rank_scale, xa, *, scale: float, dropout_p: float,
                  seed: int | torch.Tensor, output_mask=(True, True, True, True, True)):
    """Gradients ``(x, lora_a, lora_b, core, rank_scale)`` of :func:`lora_forward`'s y, each
    computed only where ``output_mask`` asks (the others come back as empty tensors)."""
    return torch.ops.lowrank.lora_backward(grad_y, x, weight, lora_a, lora_b, core, rank_scale, xa, scale,
                                           dropout_p, *_seed_args(seed), list(output_mask))


def lora_merge_(weight, lora_a, lora_b, core=None, rank_scale=None, *, scale: float) -> None:
    """``weight += scale * B core diag(rank_scale) A`` (the forward's product) in place, accumulated in fp32 and
    rounded once into weight's dtype. ``scale=-s`` unmerges."""
    torch.ops.lowrank.lora_merge_(weight, lora_a, lora_b, core, rank_scale, scale)


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, core: torch.Tensor | None = None, rank_scale: torch.Tensor | None = None, *,
                scale: float, dropout_p: float = 0.0, seed: int | torch.Tensor = 0) -> torch.Tensor:
    """Differentiable LoRA linear on ``x [..., d_in]`` -> ``[..., d_out]``. ``seed`` is an int
    or a CPU int64 scalar tensor (draw it with ``torch.randint`` inside a compiled model). Under
    ``torch.autocast`` the inputs are cast to the autocast dtype first, as ``nn.Linear``'s
    are. Gradients flow to x, A, B, core, rank_scale, and also to weight and bias if they
    require grad (plain GEMMs; LoRA normally freezes them)."""
    device_type = x.device.type
    if autocast_on(device_type):
        dt = torch.get_autocast_dtype(device_type)

        def cast(t):  # autocast's rule for nn.Linear: low-precision floats, fp64 left alone
            return t.to(dt) if t is not None and t.dtype in (torch.float32, torch.float16, torch.bfloat16) else t
        x, weight, bias, lora_a, lora_b, core, rank_scale = map(cast, (x, weight, bias, lora_a, lora_b, core,
                                                                       rank_scale))
    with autocast_off(device_type):
        y, _ = _lora_forward(as_rows(x), weight, bias, lora_a, lora_b, core, rank_scale, scale, dropout_p,
                             *_seed_args(seed))
    return from_rows(y, x)


@torch.library.register_fake("lowrank::lora_forward")
def _lora_forward_fake(x, weight, bias, lora_a, lora_b, core, rank_scale, scale, dropout_p=0.0, seed=0,
                       seed_tensor=None):
    _check_fake(x, weight, lora_a, lora_b, core, rank_scale, dropout_p)
    torch._check(bias is None or tuple(bias.shape) == (weight.shape[0],), lambda: "bias must have shape [d_out]")
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_a.shape[0])


@torch.library.register_fake("lowrank::lora_backward")
def _lora_backward_fake(grad_y, x, weight, lora_a, lora_b, core, rank_scale, xa, scale, dropout_p, seed,
                        seed_tensor, output_mask):
    _check_fake(x, weight, lora_a, lora_b, core, rank_scale, dropout_p)
    shapes = [x.shape, lora_a.shape, lora_b.shape, None if core is None else core.shape,
              None if rank_scale is None else rank_scale.shape]
    return tuple(x.new_empty(s) if (want and s is not None) else x.new_empty(0) for want, s in zip(output_mask, shapes))


@torch.library.register_fake("lowrank::lora_merge_")
def _lora_merge_fake(weight, lora_a, lora_b, core, rank_scale, scale):
    torch._check(weight.dim() == 2 and lora_a.dim() == 2 and lora_b.dim() == 2,
                 lambda: "weight, lora_a and lora_b must be 2-D")
    torch._check(tuple(lora_b.shape) == (weight.shape[0], lora_a.shape[0]) and lora_a.shape[1] == weight.shape[1],
                 lambda: f"lora_a {tuple(lora_a.shape)} / lora_b {tuple(lora_b.shape)} do not fit weight "
                 f"{tuple(weight.shape)}")
    return None


def _check_fake(x, weight, lora_a, lora_b, core, rank_scale, dropout_p):
    torch._check(x.dim() == 2, lambda: f"x must be 2-D [N, d_in], got {tuple(x.shape)}")
    torch._check(x.dtype in _DTYPES, lambda: f"x must be a float tensor, got {x.dtype}")
    torch._check(0.0 <= dropout_p < 1.0, lambda: f"dropout_p must be in [0, 1), got {dropout_p}")
    r = lora_a.shape[0]
    torch._check(tuple(weight.shape) == (weight.shape[0], x.shape[1]) and tuple(lora_a.shape) == (r, x.shape[1])
                 and tuple(lora_b.shape) == (weight.shape[0], r) and r >= 1,
                 lambda: f"shapes do not fit: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                 f"lora_a {tuple(lora_a.shape)}, lora_b {tuple(lora_b.shape)}")
    torch._check(core is None or tuple(core.shape) == (r, r), lambda: "core must have shape [r, r]")
    torch._check(rank_scale is None or tuple(rank_scale.shape) == (r,), lambda: "rank_scale must have shape [r]")
    for t in (weight, lora_a, lora_b, core, rank_scale):
        torch._check(t is None or t.dtype == x.dtype, lambda: "every tensor must have x's dtype")


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, core, rank_scale, scale, dropout_p, seed, seed_tensor = inputs
    _, xa = output
    ctx.mark_non_differentiable(xa)
    ctx.save_for_backward(x, weight, lora_a, lora_b, core, rank_scale, xa, seed_tensor)
    ctx.scale, ctx.dropout_p, ctx.seed = scale, dropout_p, seed
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y, _grad_xa):
    x, weight, lora_a, lora_b, core, rank_scale, xa, seed_tensor = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], need[3], need[4], core is not None and need[5], rank_scale is not None and need[6]]
    grads = [None] * 5
    if any(mask):
        out = torch.ops.lowrank.lora_backward(grad_y.contiguous(), x, weight, lora_a, lora_b, core, rank_scale, xa,
                                              ctx.scale, ctx.dropout_p, ctx.seed, seed_tensor, mask)
        grads = first_order_only("lora_forward", tuple(g if m else None for g, m in zip(out, mask)),
                                 (grad_y, x, weight, lora_a, lora_b, core, rank_scale))
    grad_w = grad_y.t().mm(x) if need[1] else None  # ATen ops: differentiable again
    grad_b = grad_y.sum(0) if ctx.has_bias and need[2] else None
    gx, ga, gb, gc, gr = grads
    return gx, grad_w, grad_b, ga, gb, gc, gr, None, None, None, None


_lora_forward = register_autograd("lora_forward", _backward, setup_context=_setup_context,
                                  function="lora.lora_linear")
