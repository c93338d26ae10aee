"""Small helpers shared by the op modules."""
from __future__ import annotations

import contextlib
import math
import numbers

import torch
import torch.autograd.forward_ad as fwAD


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, features], every leading dim flattened into rows (a 1-D x is one row).
    Unlike reshape(-1, d) it also works for an empty x with d = 0, whose rows reshape cannot infer."""
    if x.dim() == 2:
        return x  # no view: each would be one more autograd node per call
    if x.dim() == 0:
        raise ValueError("x must have a feature dimension (at least 1-D [..., d]), got a 0-d tensor")
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def from_rows(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The rows ``y [rows, f]`` computed from :func:`as_rows` of ``x``, back in x's leading dims."""
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])


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
    # under torch.func transforms a tensor tracked by an outer transform level reads
    # requires_grad=False here: every input goes to the node, and functorch links it where tracked
    functorch = torch._C._are_functorch_transforms_active()
    needing = [t for t in inputs if isinstance(t, torch.Tensor) and (functorch or t.requires_grad)]
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

    generate_vmap_rule = True  # clones: jacrev / vmap of a grad batch them

    @staticmethod
    def forward(message, n, *tensors):
        return tuple(g.clone() for g in tensors[:n])

    @staticmethod
    def setup_context(ctx, inputs, output):  # this form also runs under torch.func transforms
        ctx.message = inputs[0]

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(ctx.message)


# Which device types have autocast, asked at import for the known ones: Dynamo constant-folds
# torch.is_autocast_enabled and a dict lookup, but torch 2.11's cannot trace
# torch.amp.is_autocast_available (a graph break; an error under fullgraph=True). Another device
# type is asked on its first call (traced there if that call is compiled).
def _autocast_availability() -> dict[str, bool]:
    known = {}
    for t in ("cpu", "cuda", "meta", "xpu", "mps", "hpu", torch._C._get_privateuse1_backend_name()):
        try:
            known[t] = torch.amp.is_autocast_available(t)
        except RuntimeError:  # a device type this torch does not know
            pass
    return known


_AUTOCAST_AVAILABLE = _autocast_availability()


def autocast_on(device_type: str) -> bool:
    """torch.is_autocast_enabled(device_type), and False on device types without autocast (meta,
    where torch's check raises): the layers then run there as nn.Linear does."""
    available = _AUTOCAST_AVAILABLE.get(device_type)
    if available is None:
        available = _AUTOCAST_AVAILABLE[device_type] = torch.amp.is_autocast_available(device_type)
    return available and torch.is_autocast_enabled(device_type)


def autocast_off(device_type: str):
    """torch.autocast(device_type, enabled=False) where autocast is on, else no context (entering and
    leaving torch.autocast costs ~30 us a call: most calls run without autocast)."""
    return torch.autocast(device_type, enabled=False) if autocast_on(device_type) else contextlib.nullcontext()


def needs_autograd(args) -> bool:
    """Whether a call on args must go through autograd: grad mode with an input that requires
    grad, or a forward-mode AD dual tensor among them (inside fwAD.dual_level(); the fused ops
    have no forward-mode formula, so their Functions raise for one instead of dropping it).
    Plain Python, so that Dynamo traces it inside a compiled multi_lora_linear."""
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in args):
        return True
    return fwAD._current_level >= 0 and any(
        isinstance(t, torch.Tensor) and fwAD.unpack_dual(t).tangent is not None for t in args)


# The Autograd kernels of the differentiable ops. torch.library.register_autograd would do,
# but its generic kernel re-reads the op's schema argument by argument on every call (each
# read of schema.arguments builds the whole list again): ~80-110 us per forward for
# lora_forward's 11 arguments on the 2-core dev VMs, more than the rest of a small layer's
# overhead. This kernel reads the schema once, at registration.
_AUTOGRAD_LIB = torch.library.Library("lowrank", "IMPL")


def register_autograd(op_name: str, backward, *, setup_context, function: str):
    """Register ``backward`` / ``setup_context`` (torch.library.register_autograd's contract:
    ``setup_context(ctx, inputs, output)`` with every positional argument in ``inputs``;
    ``backward(ctx, *grads)`` returns one gradient or None per argument) as the Autograd kernel
    of ``torch.ops.lowrank.<op_name>``. For ops without keyword-only or tensor-list arguments.
    ``function`` names the public function that calls the op (for an error message).

    Returns the op as the package's own functions call it, every argument given: the same
    results as calling ``torch.ops.lowrank.<op_name>``, minus one round trip from the dispatcher
    into Python and back (~30 us a call), and it also runs under torch.func transforms."""
    op = getattr(torch.ops.lowrank, op_name).default
    arguments = op._schema.arguments
    if any(a.kwarg_only or "[]" in str(a.type) for a in arguments):
        raise TypeError(f"register_autograd: {op_name} has keyword-only or list arguments; use torch.library's")
    # the dispatcher drops trailing arguments that equal their defaults: put them back
    defaults = tuple(a.default_value if a.has_default_value() else None for a in arguments)

    def below_autograd(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    def forward_and_setup(ctx, *args):
        output = below_autograd(*args)
        setup_context(ctx, args, output)
        return output

    # One Function in two forms (grad_fn: lowrank_<op>Backward). torch.func transforms need the
    # one with a setup_context staticmethod: functorch applies it again at each transform level,
    # down to plain autograd, and generate_vmap_rule lets vmap run its forward on batched
    # tensors. torch binds that form's arguments through inspect.signature on every apply
    # (~60 us here), so the plain form runs everywhere else.
    name = f"lowrank_{op_name}"
    plain = type(name, (torch.autograd.Function,),
                 {"forward": staticmethod(forward_and_setup), "backward": staticmethod(backward)})
    func_form = type(name, (torch.autograd.Function,),
                     {"forward": staticmethod(below_autograd), "setup_context": staticmethod(setup_context),
                      "backward": staticmethod(backward), "generate_vmap_rule": True})

    def kernel(keyset, *args):
        if len(args) < len(defaults):
            args = args + defaults[len(args):]
        if needs_autograd(args):
            if torch._C._are_functorch_transforms_active():
                # here the call is already inside one transform level: a Function applied from
                # here would record at that level only, and tensors of outer levels (captured
                # parameters, an outer grad's input) would silently get no gradient
                raise RuntimeError(f"torch.ops.lowrank.{op_name} needs a gradient under a torch.func transform, "
                                   f"which it supports when called through lowrank_ext.ops.{function} in eager "
                                   f"mode (not torch.ops.lowrank.{op_name} directly, not inside torch.compile)")
            return plain.apply(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    _AUTOGRAD_LIB.impl(op_name, kernel, "Autograd", with_keyset=True)

    def call(*args):
        # through the dispatcher where it must see the op: a compiled graph records it (AOTAutograd
        # meets the kernel above), and so does torch.jit.trace
        if torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None:
            return op(*args)
        if torch._C._are_functorch_transforms_active():
            return func_form.apply(*args)
        if needs_autograd(args):
            return plain.apply(*args)
        return below_autograd(*args)

    return call
