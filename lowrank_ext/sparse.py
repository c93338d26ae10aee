"""Sparse adapters on a model: fuse (apply) and unfuse (remove) SHiRA-style adapters —
flat indices and values per linear layer — and save / load them with safetensors.

An adapter is a dict ``{module name: (indices, values)}``, the names those of the model's
``nn.Linear`` layers (or of :class:`~lowrank_ext.nn.SparseAdapterLinear` layers, whose base
weight is used). Switching is ``apply`` / ``remove``: one fused scatter per weight for any
number of adapters, no GEMM, no clone of the weights.

Example::

    import torch
    from torch import nn
    from lowrank_ext import sparse

    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    idx = torch.randperm(64 * 64)[:80].sort().values
    adapter = {"0": (idx, torch.randn(80) * 0.01)}
    handle = sparse.apply(model, adapter, alpha=1.0)      # W[idx] += alpha * values
    sparse.save(adapter, "/tmp/adapter.safetensors", model=model)  # records the weights' shapes
    sparse.remove(model, handle)                         # the weights back bit for bit
    again = sparse.load("/tmp/adapter.safetensors", model=model)   # checks them
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .nn.lora import check_weight_is_stored
from .ops._common import is_scalar
from .ops.sparse import sparse_scatter_add_

__all__ = ["apply", "remove", "save", "load", "from_model", "Handle"]

Adapter = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass(eq=False)  # handles compare by identity (remove looks one up in the model's stack)
class Handle:
    """What :func:`apply` did: per weight, the adapters' indices, values and alphas, and the
    weight's entries there before (restored exactly when this is the last apply not yet removed)."""
    entries: dict[str, tuple[list[torch.Tensor], list[torch.Tensor], list[float], torch.Tensor]] = \
        field(default_factory=dict)
    removed: bool = False
    # its backups hold an adapter applied earlier and removed since (out of order): subtract instead
    exact: bool = True
    # per name, the entries as this apply left them: where a weight holds others at remove time
    # (an optimizer step, a load), the adapter is subtracted and those writes are kept
    after: dict[str, torch.Tensor] = field(default_factory=dict)


def _weight(model: nn.Module, name: str, sync: bool = False, write: bool = False) -> torch.Tensor:
    module = model.get_submodule(name)
    if sync and hasattr(module, "_sync_if_stale"):
        # apply: a SparseAdapterLinear's W_eff current before others write into it (a sync after
        # the apply would drop them where the supports meet; remove must not sync: it would
        # drop the adapter it is about to take out)
        module._sync_if_stale()
    module = getattr(module, "base_layer", module)
    if not isinstance(module, nn.Linear):
        raise TypeError(f"{name!r} is a {type(module).__name__}, not an nn.Linear")
    if write:  # save / load only read the shape
        check_weight_is_stored(module, f"sparse adapters on {name!r}")
    return module.weight


def _applied(w: torch.Tensor) -> list[Handle]:
    """The handles applied to weight ``w`` and not removed, oldest first: an attribute of the
    weight, not of the model (a weight reached through a wrapper and through the inner model is
    one weight, and a handle is restored exactly only if no later handle touched its weights)."""
    if "_lowrank_sparse_handles" not in w.__dict__:
        w._lowrank_sparse_handles = []
    return w._lowrank_sparse_handles


def _unique_weights(model: nn.Module, names, write: bool = False) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for name in names:
        w = _weight(model, name, write=write)
        seen.setdefault(id(w), w)
    return list(seen.values())


def _check_adapter_entry(name: str, w: torch.Tensor, idx: torch.Tensor, val: torch.Tensor) -> None:
    if not w.is_contiguous():
        raise RuntimeError(f"the weight of {name!r} is not contiguous: flat indices do not address it; "
                           "nothing was written")
    if idx.dim() != 1 or val.dim() != 1 or idx.numel() != val.numel():
        raise ValueError(f"adapter for {name!r}: indices and values must be 1-D of one length, got "
                         f"{tuple(idx.shape)} and {tuple(val.shape)}; nothing was written")
    if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise TypeError(f"adapter indices for {name!r} must be integers, got {idx.dtype}; nothing was written")
    if not val.is_floating_point():
        raise TypeError(f"adapter values for {name!r} must be floating point, got {val.dtype}; nothing was written")


def _check_ranges(model: nn.Module, per_weight: dict[str, tuple[list, list, list]]) -> None:
    """Raises if any adapter index leaves its weight. The bounds of every index tensor on one
    device come back to the host in one transfer (one synchronisation per device for the whole
    apply, not one per weight), so the scatters can skip their own check."""
    by_device: dict[torch.device, list[tuple[str, int, torch.Tensor]]] = {}
    for name, (i, _, _) in per_weight.items():
        numel = _weight(model, name).numel()
        for t in i:
            if t.numel():
                by_device.setdefault(t.device, []).append((name, numel, torch.stack(torch.aminmax(t))))
    for entries in by_device.values():
        bounds = torch.stack([b for _, _, b in entries]).tolist()
        for (name, numel, _), (lo, hi) in zip(entries, bounds):
            if lo < 0 or hi >= numel:
                raise RuntimeError(f"adapter indices for {name!r} are out of range for its {numel} weights; "
                                   "nothing was written")


@torch.no_grad()
def apply(model: nn.Module, adapters: Adapter | Sequence[Adapter], alpha: float | Sequence[float] = 1.0) -> Handle:
    """Adds ``alpha * values`` at each adapter's indices into the named weights, in place: several
    adapters (a list, with one alpha each or one for all) fuse in one scatter per weight.
    Every index of every adapter is checked before any weight is written. Undo it with
    :func:`remove` only: each weight keeps the handle until then, so weights reset another way
    (e.g. ``load_state_dict`` of the base weights) leave it, and a later ``remove`` of it
    would subtract an adapter that is no longer there."""
    if isinstance(adapters, Mapping):
        adapters = [adapters]
    alphas = [float(alpha)] * len(adapters) if is_scalar(alpha) else [float(a) for a in alpha]
    if len(alphas) != len(adapters):
        raise ValueError(f"{len(adapters)} adapters but {len(alphas)} alphas")
    handle = Handle()
    per_weight: dict[str, tuple[list, list, list]] = {}
    for adapter, a in zip(adapters, alphas):  # everything is checked before the first write
        for name, (idx, val) in adapter.items():
            w = _weight(model, name, sync=True, write=True)
            _check_adapter_entry(name, w, idx, val)
            i, v, al = per_weight.setdefault(name, ([], [], []))
            i.append(idx.to(device=w.device, dtype=torch.int64))
            v.append(val.to(w.device))
            al.append(a)
    _check_ranges(model, per_weight)
    written: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    try:
        for name, (i, v, al) in per_weight.items():
            w = _weight(model, name)
            idx = torch.cat(i)
            before = w.view(-1)[idx].clone()
            written.append((w, idx, before))  # before the write: an interrupt inside it is rolled back too
            sparse_scatter_add_(w, i, v, al, check_indices=False)  # checked above, for every weight at once
            handle.entries[name] = (i, v, al, before)
    except BaseException:  # whatever stopped the writes: the weights go back as they were
        for w, idx, before in reversed(written):
            w.view(-1)[idx] = before
        raise
    for name, (i, _, _, _) in handle.entries.items():  # after every write (tied names share a weight)
        handle.after[name] = _weight(model, name).view(-1)[torch.cat(i)].clone()
    for w in _unique_weights(model, handle.entries):
        _applied(w).append(handle)
    return handle


@torch.no_grad()
def remove(model: nn.Module, handle: Handle) -> None:
    """Undoes :func:`apply`. The most recent apply not yet removed is undone exactly (its weights'
    previous entries are written back) unless its entries were written since (an optimizer
    step, a load: those writes are kept, the adapter subtracted); an older one is subtracted (exact up to
    rounding), and the applies made after it are subtracted too when their turn comes (their
    saved entries still hold it)."""
    if handle.removed:
        raise ValueError("this adapter handle was already removed")
    weights = _unique_weights(model, handle.entries, write=True)
    if any(handle not in _applied(w) for w in weights):
        raise ValueError("this handle was not applied to this model")
    last = all(_applied(w)[-1] is handle for w in weights)
    untouched = all(torch.equal(_weight(model, name).view(-1)[torch.cat(i)], handle.after[name])
                    for name, (i, _, _, _) in handle.entries.items())
    if not last:
        for w in weights:
            stack = _applied(w)
            for later in stack[stack.index(handle) + 1:]:
                later.exact = False
    # in reverse: where two names share one weight (tied), the later one's saved entries hold
    # the earlier adapter, so the earlier name must be written back last
    for name, (i, v, al, before) in reversed(list(handle.entries.items())):
        w = _weight(model, name)
        if last and handle.exact and untouched:
            w.view(-1)[torch.cat(i)] = before
        else:
            sparse_scatter_add_(w, i, v, [-a for a in al], check_indices=False)  # apply checked them
    for w in weights:
        _applied(w).remove(handle)
    handle.removed = True


def from_model(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The adapter trained in a model's SparseAdapterLinear layers, by module name."""
    from .nn.sparse import SparseAdapterLinear
    return {name: m.adapter() for name, m in model.named_modules() if isinstance(m, SparseAdapterLinear)}


def save(adapter: Adapter, path: str, model: nn.Module | None = None) -> None:
    """Writes ``{name}.indices`` and ``{name}.values`` tensors to a safetensors file. With the
    model the adapter belongs to, each weight's shape is recorded too, so that :func:`load` with
    a model can refuse one whose weights have other shapes (flat indices would land elsewhere
    in a weight of another shape, even of the same size)."""
    from safetensors.torch import save_file
    tensors, metadata = {}, {}
    for name, (idx, val) in adapter.items():
        # copies: layers may share one tensor, and safetensors refuses tensors sharing memory
        tensors[f"{name}.indices"] = idx.detach().to("cpu", torch.int64, memory_format=torch.contiguous_format,
                                                     copy=True)
        tensors[f"{name}.values"] = val.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
        if model is not None:
            metadata[f"{name}.shape"] = ",".join(str(d) for d in _weight(model, name).shape)
    save_file(tensors, path, metadata=metadata or None)


def load(path: str, device: str | torch.device = "cpu",
         model: nn.Module | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Reads an adapter written by :func:`save`. With a model, checks that every named layer is
    there and, where the file recorded shapes, that the weights have them."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    tensors = load_file(path, device=str(device))
    names = sorted({k.rsplit(".", 1)[0] for k in tensors})
    missing = [n for n in names if f"{n}.indices" not in tensors or f"{n}.values" not in tensors]
    if missing:
        raise ValueError(f"{path}: no indices or values for {missing}")
    if model is not None:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        for n in names:
            shape = tuple(_weight(model, n).shape)  # raises for a missing or non-Linear layer
            saved = metadata.get(f"{n}.shape")
            if saved is not None and tuple(int(d) for d in saved.split(",")) != shape:
                raise ValueError(f"{path}: the adapter for {n!r} was saved for a weight of shape "
                                 f"({saved}), but the model's is {shape}")
    return {n: (tensors[f"{n}.indices"], tensors[f"{n}.values"]) for n in names}
