"""Small helpers shared by the op modules."""
from __future__ import annotations

import contextlib
import math
import numbers

import torch


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, features], every leading dim flattened into rows (a 1-D x is one row).
    Unlike reshape(-1, d) it also works for an empty x with d = 0, whose rows reshape cannot infer."""
    if x.dim() == 0:
        raise ValueError("x must have a feature dimension (at least 1-D [..., d]), got a 0-d tensor")
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def as_int64_seed(seed: int) -> int:
    """A Python int seed as the ops' int64 argument, same low 64 bits: torch's own seeds are
    unsigned 64-bit (``torch.initial_seed()`` can pass 2**63), and Philox reads the seed as
    unsigned, so 2**64 - 1 and -1 draw the same numbers."""
    return ((int(seed) + 2 ** 63) % 2 ** 64) - 2 ** 63


def is_scalar(value) -> bool:
    """A Python, numpy or 0-d tensor number (where a per-item sequence is also accepted)."""
    return isinstance(value, numbers.Number) or getattr(value, "ndim", None) == 0


def first_order_only(op: str, grads: tuple, inputs: tuple) -> tuple:
    """The grads a backward formula returns, made to raise if they are differentiated again.
    The formulas here call backward ops that have no autograd kernel of their own: under
    create_graph=True their outputs would carry no graph, and a second derivative through them
    would come back as silent zeros. Where grad mode is on (create_graph) and any input of the
    formula (incoming grads or saved tensors) requires grad, the grads become aliases made by
    a node whose backward raises and whose inputs are those tensors, so that every path from
    the grads to them (``.backward()`` and ``torch.autograd.grad`` alike) meets it.
    (torch.autograd.function.once_differentiable looks at the incoming grads only, and its
    node has no edges to the saved tensors: ``autograd.grad`` then gets silent zeros.)
    ``inputs``: every tensor the grads depend on, also one autograd cannot see (values held in
    a weight outside the graph)."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return grads
    needing = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    present = [i for i, g in enumerate(grads) if g is not None]
    if not needing or not present:
        return grads
    copies = [grads[i].detach() for i in present]
    aliases = _RaiseOnBackward.apply(f"{op}: double backward (a derivative of its gradients) is not supported",
                                     len(copies), *copies, *needing)
    out = list(grads)
    for i, a in zip(present, aliases):
        out[i] = a
    return tuple(out)


class _RaiseOnBackward(torch.autograd.Function):
    """Copies of the first n tensors (the grads), on a node whose backward raises; the rest
    are the tensors the grads depend on (edges only)."""

    @staticmethod
    def forward(ctx, message, n, *tensors):
        ctx.message = message
        return tuple(g.clone() for g in tensors[:n])

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(ctx.message)


def autocast_on(device_type: str) -> bool:
    """torch.is_autocast_enabled(device_type), and False on device types without autocast (meta,
    where torch's check raises): the layers then run there as nn.Linear does."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def autocast_off(device_type: str):
    """torch.autocast(device_type, enabled=False), or no context on device types without autocast."""
    return torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(device_type) \
        else contextlib.nullcontext()
