"""Multi-adapter LoRA (S-LoRA / Punica style): one batch, many adapters.

``torch.ops.lowrank.lora_shrink`` / ``lora_expand_`` / ``lora_expand`` / ``lora_grouped_outer``,
their fake and autograd registrations, and :func:`multi_lora_linear`, the entry point the
layer uses. Token ``n`` of a batch uses adapter ``token_adapter_ids[n]`` of a stack (``-1``:
no adapter); tokens need not be sorted by adapter::

    xa[n, :rank_a]  = scale_a * x[n] A[a, :rank_a]^T          (lora_shrink; xa fp32)
    y[n]           += xa[n, :rank_a] B[a, :, :rank_a]^T        (lora_expand_, in place)

with ``a_stack [S, R, d_in]`` and ``b_stack [S, d_out, R]`` padded to the largest rank R,
``ranks [S]`` (each adapter's own rank; padding is never read) and ``scales [S]``. The scale
is applied once, in the shrink: ``multi_lora_linear`` passes it there.

Gradients (training several adapters at once): ``lora_shrink`` and the out-of-place
``lora_expand`` are differentiable. The data gradients are the same two ops on the
transposed stacks; the stacks' gradients are ``lora_grouped_outer``, a per-adapter sum of
outer products over that adapter's tokens. ``ranks`` and ``scales`` are constants.

Kernels: CPU (tokens grouped by adapter, one BLAS product per adapter) and CUDA (device
sort + tiled kernels over the sorted rows, no host synchronisation; its tests passed on an H100,
2026-11-25: see the README).
"""
from __future__ import annotations

import torch

from ._common import (as_rows, autocast_off, autocast_on, first_order_only, from_rows, needs_autograd,
                      register_autograd)

__all__ = ["lora_shrink", "lora_expand", "lora_expand_", "lora_grouped_outer", "multi_lora_linear"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_ID_DTYPES = (torch.int64, torch.int32)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def lora_shrink(x, a_stack, token_adapter_ids, ranks=None, scales=None) -> torch.Tensor:
    """``x [N, d_in]`` -> ``xa [N, R]`` (fp32; fp64 for fp64 x): each row times its adapter's A,
    scaled by its adapter's scale; zero past the adapter's rank and on rows with id -1."""
    return _lora_shrink(x, a_stack, token_adapter_ids, ranks, scales)


def lora_expand_(y, xa, b_stack, token_adapter_ids, ranks=None, scales=None) -> None:
    """``y[n] += scale * xa[n, :rank] B[a, :, :rank]^T`` in place (rows with id -1 untouched).
    No autograd: use :func:`lora_expand` where gradients must flow."""
    torch.ops.lowrank.lora_expand_(y, xa, b_stack, token_adapter_ids, ranks, scales)


def lora_expand(y, xa, b_stack, token_adapter_ids, ranks=None, scales=None) -> torch.Tensor:
    """Out-of-place :func:`lora_expand_`: returns a new tensor (differentiable in y, xa, b_stack)."""
    return _lora_expand(y, xa, b_stack, token_adapter_ids, ranks, scales)


def lora_grouped_outer(left, right, token_adapter_ids, num_adapters: int, scales=None) -> torch.Tensor:
    """``out[a] = scale[a] * sum over tokens n of adapter a of left[n]^T right[n]``:
    ``left [N, P]``, ``right [N, Q]`` -> ``[num_adapters, P, Q]`` fp32 (fp64 if either is)."""
    return torch.ops.lowrank.lora_grouped_outer(left, right, token_adapter_ids, num_adapters, scales)


def multi_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a_stack: torch.Tensor,
                      b_stack: torch.Tensor, token_adapter_ids: torch.Tensor, ranks: torch.Tensor | None = None,
                      scales: torch.Tensor | None = None) -> torch.Tensor:
    """``y[n] = x[n] W^T + b + scale_a B_a A_a x[n]`` with ``a = token_adapter_ids[n]``, for
    ``x [..., d_in]`` and ids of shape ``x.shape[:-1]``. When autograd needs nothing from the
    LoRA branch the products are added into the base output in place (``lora_expand_``);
    otherwise through the differentiable ``lora_expand`` (one copy of y more). Under
    ``torch.autocast`` the float inputs are cast as ``nn.Linear``'s are."""
    if tuple(token_adapter_ids.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"token_adapter_ids must have shape {tuple(x.shape[:-1])} (one id per token), "
                         f"got {tuple(token_adapter_ids.shape)}")
    device_type = x.device.type
    if autocast_on(device_type):
        dt = torch.get_autocast_dtype(device_type)

        def cast(t):  # autocast's rule for nn.Linear: low-precision floats, fp64 left alone
            return t.to(dt) if t is not None and t.dtype in (torch.float32, torch.float16, torch.bfloat16) else t
        x, weight, bias, a_stack, b_stack = map(cast, (x, weight, bias, a_stack, b_stack))
    with autocast_off(device_type):
        x2 = as_rows(x)
        ids = token_adapter_ids.reshape(-1)
        y = torch.nn.functional.linear(x2, weight, bias)
        xa = _lora_shrink(x2, a_stack, ids, ranks, scales)
        if needs_autograd((x, weight, bias, a_stack, b_stack)):
            y = _lora_expand(y, xa, b_stack, ids, ranks, None)
        else:
            torch.ops.lowrank.lora_expand_(y, xa, b_stack, ids, ranks, None)
    return from_rows(y, x)


# ---- fake kernels ----

def _check_ids_fake(ids, n):
    torch._check(ids.dim() == 1 and ids.shape[0] == n, lambda: f"token_adapter_ids must have shape [{n}]")
    torch._check(ids.dtype in _ID_DTYPES, lambda: f"token_adapter_ids must be int64 or int32, got {ids.dtype}")


def _check_ranks_scales_fake(ranks, scales, s):
    torch._check(ranks is None or (tuple(ranks.shape) == (s,) and ranks.dtype in _ID_DTYPES),
                 lambda: f"ranks must be an int tensor of shape [{s}]")
    torch._check(scales is None or (tuple(scales.shape) == (s,) and scales.dtype in _DTYPES),
                 lambda: f"scales must be a float tensor of shape [{s}]")


@torch.library.register_fake("lowrank::lora_shrink")
def _lora_shrink_fake(x, a_stack, token_adapter_ids, ranks=None, scales=None):
    torch._check(x.dim() == 2 and x.dtype in _DTYPES, lambda: f"x must be a 2-D float tensor, got {x.shape} {x.dtype}")
    torch._check(a_stack.dim() == 3 and a_stack.shape[0] >= 1 and a_stack.shape[1] >= 1
                 and a_stack.shape[2] == x.shape[1] and a_stack.dtype == x.dtype,
                 lambda: f"a_stack must be [S, R, d_in] with S, R >= 1 in x's dtype, got {tuple(a_stack.shape)} "
                         f"{a_stack.dtype}")
    _check_ids_fake(token_adapter_ids, x.shape[0])
    _check_ranks_scales_fake(ranks, scales, a_stack.shape[0])
    return x.new_empty(x.shape[0], a_stack.shape[1], dtype=_acc(x.dtype))


def _check_expand_fake(y, xa, b_stack, token_adapter_ids, ranks, scales):
    torch._check(y.dim() == 2 and y.dtype in _DTYPES, lambda: f"y must be a 2-D float tensor, got {y.shape} {y.dtype}")
    torch._check(b_stack.dim() == 3 and b_stack.shape[0] >= 1 and b_stack.shape[2] >= 1
                 and b_stack.shape[1] == y.shape[1] and b_stack.dtype == y.dtype,
                 lambda: f"b_stack must be [S, d_out, R] with S, R >= 1 in y's dtype, got {tuple(b_stack.shape)} "
                         f"{b_stack.dtype}")
    torch._check(xa.dim() == 2 and tuple(xa.shape) == (y.shape[0], b_stack.shape[2]) and xa.dtype in _DTYPES,
                 lambda: f"xa must be a float tensor [N, R], got {tuple(xa.shape)}")
    _check_ids_fake(token_adapter_ids, y.shape[0])
    _check_ranks_scales_fake(ranks, scales, b_stack.shape[0])


@torch.library.register_fake("lowrank::lora_expand_")
def _lora_expand_inplace_fake(y, xa, b_stack, token_adapter_ids, ranks=None, scales=None):
    _check_expand_fake(y, xa, b_stack, token_adapter_ids, ranks, scales)
    return None


@torch.library.register_fake("lowrank::lora_expand")
def _lora_expand_fake(y, xa, b_stack, token_adapter_ids, ranks=None, scales=None):
    _check_expand_fake(y, xa, b_stack, token_adapter_ids, ranks, scales)
    return torch.empty_like(y, memory_format=torch.contiguous_format)


@torch.library.register_fake("lowrank::lora_grouped_outer")
def _lora_grouped_outer_fake(left, right, token_adapter_ids, num_adapters, scales=None):
    torch._check(left.dim() == 2 and right.dim() == 2 and left.shape[0] == right.shape[0],
                 lambda: "left and right must be 2-D with one row per token")
    torch._check(left.dtype in _DTYPES and right.dtype in _DTYPES, lambda: "left and right must be float tensors")
    torch._check(num_adapters >= 0, lambda: f"num_adapters must be >= 0, got {num_adapters}")
    _check_ids_fake(token_adapter_ids, left.shape[0])
    _check_ranks_scales_fake(None, scales, num_adapters)
    acc = torch.float64 if torch.float64 in (left.dtype, right.dtype) else torch.float32
    return left.new_empty(num_adapters, left.shape[1], right.shape[1], dtype=acc)


# ---- autograd ----

def _rank_mask(ids, ranks, max_rank, dtype):
    """[N, R] 1 where column j < rank of the row's adapter (0 on rows with id -1)."""
    valid = ids >= 0
    if ranks is None:
        return valid.unsqueeze(1).expand(-1, max_rank).to(dtype)
    row_rank = torch.where(valid, ranks.to(torch.int64)[ids.clamp(min=0).to(torch.int64)], 0)
    return (torch.arange(max_rank, device=ids.device) < row_rank.unsqueeze(1)).to(dtype)


def _refuse_trained_scales(op: str, scales) -> None:
    if scales is not None and scales.requires_grad:  # a constant here: its gradient would be dropped
        raise RuntimeError(f"{op}: scales has no gradient (per-adapter constants); pass scales.detach(), or fold a "
                           f"trained scale into the stacks")


def _shrink_setup(ctx, inputs, output):
    x, a_stack, ids, ranks, scales = inputs
    _refuse_trained_scales("lora_shrink", scales)
    ctx.save_for_backward(x, a_stack, ids, ranks, scales)


def _shrink_backward(ctx, grad_xa):
    x, a_stack, ids, ranks, scales = ctx.saved_tensors
    need_x, need_a = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_x = grad_a = None
    if need_x:  # x[n] -> scale A^T: the expand of grad_xa through the transposed stack
        grad_x = _lora_expand(x.new_zeros(x.shape), grad_xa, a_stack.transpose(1, 2), ids, ranks, scales)
    if need_a:  # the padding of the stack gets no gradient: xa does not depend on it
        g = grad_xa * _rank_mask(ids, ranks, a_stack.shape[1], grad_xa.dtype)
        grad_a = torch.ops.lowrank.lora_grouped_outer(g, x, ids, a_stack.shape[0], scales).to(a_stack.dtype)
        # lora_grouped_outer has no derivative: a second one through the stack's gradient raises
        (grad_a,) = first_order_only("lora_shrink (the stack's gradient)", (grad_a,), (grad_xa, x))
    return grad_x, grad_a, None, None, None


def _expand_setup(ctx, inputs, output):
    y, xa, b_stack, ids, ranks, scales = inputs
    _refuse_trained_scales("lora_expand", scales)
    ctx.save_for_backward(xa, b_stack, ids, ranks, scales)
    ctx.xa_dtype = xa.dtype


def _expand_backward(ctx, grad_out):
    xa, b_stack, ids, ranks, scales = ctx.saved_tensors
    need_y, need_xa, need_b = ctx.needs_input_grad[:3]
    grad_out = grad_out.contiguous()
    grad_xa = grad_b = None
    if need_xa:  # zero past each rank and on rows with id -1, as the forward reads xa
        grad_xa = _lora_shrink(grad_out, b_stack.transpose(1, 2), ids, ranks, scales)
        grad_xa = grad_xa.to(ctx.xa_dtype)
    if need_b:
        xm = xa * _rank_mask(ids, ranks, b_stack.shape[2], xa.dtype)
        grad_b = torch.ops.lowrank.lora_grouped_outer(grad_out, xm, ids, b_stack.shape[0], scales).to(b_stack.dtype)
        (grad_b,) = first_order_only("lora_expand (the stack's gradient)", (grad_b,), (grad_out, xa))
    return grad_out if need_y else None, grad_xa, grad_b, None, None, None


_lora_shrink = register_autograd("lora_shrink", _shrink_backward, setup_context=_shrink_setup,
                                 function="multilora.lora_shrink")
_lora_expand = register_autograd("lora_expand", _expand_backward, setup_context=_expand_setup,
                                 function="multilora.lora_expand")
