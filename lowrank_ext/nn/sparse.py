"""Sparse adapters as layers: SparseAdapterLinear (SHiRA) and SLTrainLinear (SLTrain)."""
from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import nn

from .._weak import WeakModuleRef
from .lora import check_weight_is_stored, state_mismatches
from ..ops._common import as_rows, autocast_off, autocast_on, first_order_only, from_rows
from ..ops.sparse import sddmm

__all__ = ["SparseAdapterLinear", "SLTrainLinear", "choose_support"]


def choose_support(weight: torch.Tensor, nnz: int, how: str = "random", grad: torch.Tensor | None = None,
                   seed: int = 0) -> torch.Tensor:
    """Sorted unique flat indices of ``nnz`` entries of ``weight``: ``random`` (seeded),
    ``magnitude`` (largest |W|) or ``gradient`` (largest |grad|, e.g. accumulated over a few
    batches, as SHiRA's gradient mask)."""
    numel = weight.numel()
    try:
        nnz = operator.index(nnz)  # ints, numpy ints; not 5.0
    except TypeError:
        raise TypeError(f"nnz must be an int, got {type(nnz).__name__}") from None
    if not 1 <= nnz <= numel:
        raise ValueError(f"nnz must be in [1, {numel}], got {nnz}")
    if how == "random":
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(numel, generator=g)[:nnz]
    elif how == "magnitude":
        idx = weight.detach().abs().flatten().float().topk(nnz).indices.cpu()
    elif how == "gradient":
        if grad is None or grad.shape != weight.shape:
            raise ValueError("support='gradient' needs grad, a tensor of the weight's shape")
        idx = grad.detach().abs().flatten().float().topk(nnz).indices.cpu()
    else:
        raise ValueError(f"support must be 'random', 'magnitude' or 'gradient', got {how!r}")
    return idx.sort().values.to(weight.device)


def _layer_seed(seed: int | None) -> int:
    """A random support's seed: the given one, or (None) one drawn from torch's global generator, so
    that layers of one shape get different supports (SLTrain's and SHiRA's random masks are
    per layer) and ``torch.manual_seed`` makes a model's supports reproducible."""
    return int(torch.randint(0, 2 ** 62, (1,), device="cpu")) if seed is None else seed


def _check_loaded_support(state_dict, prefix: str, numel: int, layer: str) -> None:
    """A support in a state_dict being loaded: unique flat indices into the weight (a negative
    one would wrap around, an out-of-range one fail at the next forward)."""
    idx = state_dict.get(prefix + "indices")
    if idx is None:
        return
    if not isinstance(idx, torch.Tensor) or idx.dim() != 1 or idx.is_floating_point() or idx.dtype == torch.bool:
        raise ValueError(f"{layer}: the loaded indices must be a 1-D integer tensor of flat indices")
    if idx.numel() and not idx.is_meta and (int(idx.min()) < 0 or int(idx.max()) >= numel
                                            or idx.unique().numel() != idx.numel()):
        raise ValueError(f"{layer}: the loaded indices must be unique flat indices in [0, {numel}) of the weight")


def _values_stamp(values: torch.Tensor) -> tuple:
    """What identifies the values a layer last synced into its weight: the tensor object, a
    view of its storage then (kept, so that a replaced storage's memory, and its address, cannot
    be reused), and its version counter. A changed version is an optimizer step; a changed
    object or storage is load_state_dict(assign=True) or .data = ..., whose new tensor may carry
    the same version number."""
    return values, values.detach(), values._version


def _is_synced(values: torch.Tensor, stamp: tuple | None) -> bool:
    return (stamp is not None and stamp[0] is values and stamp[1].data_ptr() == values.data_ptr()
            and stamp[2] == values._version)


class _LazySync:
    """The lazy fold of a sparse layer's values into its dense tensor (W_eff or S's buffer):
    before a forward, and before the layer's state is saved, so that ``opt.step();
    torch.save(model.state_dict())`` saves the dense tensor of the values it saves."""

    def _sync_if_stale(self) -> None:
        if not torch.compiler.is_compiling() and not _is_synced(self.values, self._synced):
            self.sync_()

    def _apply(self, fn, recurse: bool = True):
        # .to() / .half() / .cpu() make new values: the stamp would keep the old storage alive
        # (on a GPU after model.cpu(), for instance); the next forward syncs anyway
        self._synced = None
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # runs before the children's (SHiRA's base_layer holds W_eff): both see the synced state
        self._sync_if_stale()
        super()._save_to_state_dict(destination, prefix, keep_vars)


class _BaseLoadHook:
    """SparseAdapterLinear's load hook on its base layer, holding the layer weakly (a bound
    method would make base_layer -> layer -> base_layer a cycle)."""

    def __init__(self, layer: nn.Module):
        self.layer = WeakModuleRef(layer)

    def __call__(self, base_layer, incompatible_keys) -> None:
        layer = self.layer()
        if layer is not None:
            layer._base_layer_loaded(base_layer, incompatible_keys)


class _FusedSparseLinear(torch.autograd.Function):
    """y = x W_eff^T + b, with W_eff = W + S already in place: one GEMM. Backward: grad x by
    the same W_eff, grad of S's values by SDDMM at its support; W gets no gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, values, indices, in_features):
        device_type = x.device.type
        if autocast_on(device_type):  # cast as autocast casts nn.Linear's inputs, and save those
            dt = torch.get_autocast_dtype(device_type)
            x, weight = x.to(dt), weight.to(dt)
            bias = bias.to(dt) if bias is not None else None
        # the flat indices, not rows and cols: split in backward only where the values need a
        # gradient (no two index passes per forward, half the saved index bytes)
        ctx.save_for_backward(x, weight, indices)
        ctx.in_features = in_features
        ctx.values = values  # held in W_eff: grad x depends on it (first_order_only's edge)
        with autocast_off(device_type):
            return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, indices = ctx.saved_tensors
        grad_y = grad_y.to(x.dtype)
        grad_x = grad_y @ weight if ctx.needs_input_grad[0] else None
        grad_bias = as_rows(grad_y).sum(0) if ctx.needs_input_grad[2] else None
        grad_values = None
        if ctx.needs_input_grad[3]:
            grad_values = sddmm(grad_y, x, indices // ctx.in_features, indices % ctx.in_features)
        # second derivatives that autograd cannot see raise instead of coming back as zeros:
        # grad_x's through the values (W_eff holds them, outside the graph), and sddmm's (no derivative).
        # grad_x's node also takes grad_y: its own path through grad_y is cut by the node, so a
        # derivative along it (d/dx of a gradient penalty) must meet the node too, not skip it
        if ctx.needs_input_grad[3]:
            (grad_x,) = first_order_only("SparseAdapterLinear/SLTrainLinear (through the values)", (grad_x,),
                                         (ctx.values, grad_y))
            (grad_values,) = first_order_only("SparseAdapterLinear/SLTrainLinear (the values' gradient)",
                                              (grad_values,), (grad_y, x))
        return grad_x, None, grad_bias, grad_values, None, None


class SparseAdapterLinear(_LazySync, nn.Module):
    """SHiRA: a frozen ``nn.Linear`` plus trainable values on a fixed sparse support, with
    zero forward overhead: the layer keeps ``W_eff = W + S`` in ``base_layer.weight`` itself
    (no clone of W, one GEMM per forward) and the values' gradient comes from SDDMM (no dense
    weight gradient). The forward is that GEMM, not a call of ``base_layer``: hooks registered on
    the base layer, or the forward of an ``nn.Linear`` subclass, do not run.

    W_eff follows the values lazily: each forward, and ``state_dict()``, first folds in what
    changed since the last one (the parameter's version counter tells), so an optimizer step
    needs no extra call; ``base_layer.weight`` read directly is current after a forward or
    :meth:`sync_`. Call :meth:`sync_` yourself after each step, and after any other change of
    the values or a load, under ``torch.compile`` and under torch's selective activation
    checkpointing (a traced forward never syncs; a sync recorded by selective checkpointing is
    not replayed by its recompute, which may then fail), before ``torch.export``, and with code
    that writes the values without bumping their version counter: torch's ``fused=True`` optimizers, and writes through ``values.data`` (as some EMA helpers and
    third-party optimizers do), e.g. through
    ``optimizer.register_step_post_hook(lambda *_: layer.sync_())``. The base entries under
    the support are kept (``nnz`` values), so :meth:`unfuse` restores ``W`` bit for bit.
    Weights loaded into ``base_layer`` after wrapping (``layer.base_layer.load_state_dict``, or a
    model's state_dict without this layer's own entries) are taken as the new W, with the
    adapter on top; other writes into the weight (``lowrank_ext.sparse.apply``) add to W_eff,
    until a sync writes the support's entries again (W + values: training this layer while
    another adapter is applied onto its weight drops that adapter where the supports meet).

    The base weight must not be shared with another module (e.g. an ``lm_head`` tied to the
    input embedding): W_eff is written into it in place, so the other user would see S too,
    and the values' gradient would miss its path. Untie it first
    (``head.weight = nn.Parameter(head.weight.detach().clone())``).

    ``support``: ``"random"`` (from ``seed``; None draws one from torch's generator, so layers
    differ and ``torch.manual_seed`` reproduces them), ``"magnitude"`` or ``"gradient"`` (with ``grad``) and
    ``density`` or ``nnz``; or a tensor: integer flat indices into the weight, or a bool mask of
    the weight's shape (as PEFT's SHiRA ``mask_fn`` gives).

    Example::

        layer = SparseAdapterLinear(nn.Linear(256, 256), density=0.02)    # random support
        opt = torch.optim.AdamW([layer.values], lr=1e-3)
        layer(torch.randn(8, 256)).square().mean().backward(); opt.step()
        adapter = layer.adapter()                   # (indices, values), see lowrank_ext.sparse
        base = layer.unfuse()                       # the original nn.Linear, weight restored exactly
    """

    def __init__(self, base_layer: nn.Linear, density: float | None = None, nnz: int | None = None,
                 support: str | torch.Tensor = "random", grad: torch.Tensor | None = None, seed: int | None = None):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"SparseAdapterLinear wraps an nn.Linear, got {type(base_layer).__name__}")
        check_weight_is_stored(base_layer, "SparseAdapterLinear")  # W_eff is written into it in place
        weight = base_layer.weight
        if not weight.is_contiguous():
            raise ValueError("the base layer's weight must be contiguous")
        if isinstance(support, torch.Tensor):
            if support.dtype == torch.bool:  # a mask: read as indices, it would be the support {0, 1}
                if support.shape != weight.shape:
                    raise ValueError(f"a bool support mask must have the weight's shape {tuple(weight.shape)}, "
                                     f"got {tuple(support.shape)}")
                support = support.flatten().nonzero().flatten()
            elif support.is_floating_point() or support.is_complex():
                raise TypeError(f"support must be integer flat indices or a bool mask, got {support.dtype}")
            elif support.dim() != 1:  # e.g. mask.nonzero()'s [nnz, 2] (row, col) pairs, or a 0/1 integer mask
                raise ValueError(f"integer support must be 1-D flat indices into the weight (row * in_features + "
                                 f"col), got shape {tuple(support.shape)}; pass a mask as a bool tensor")
            if density is not None or nnz is not None:
                raise ValueError("density and nnz choose a support: give them, or a support tensor, not both")
            idx = support.to(device=weight.device, dtype=torch.int64).flatten().unique(sorted=True)
            if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= weight.numel()):
                raise ValueError(f"support indices out of range for a weight of {weight.numel()} elements")
        else:
            if (density is None) == (nnz is None):
                raise ValueError("give exactly one of density and nnz")
            if nnz is None:
                if not 0.0 < density <= 1.0:
                    raise ValueError(f"density must be in (0, 1], got {density}")
                nnz = max(1, round(density * weight.numel()))
            idx = choose_support(weight, nnz, support, grad, _layer_seed(seed) if support == "random" else 0)
        self.base_layer = base_layer.requires_grad_(False)
        self.register_buffer("indices", idx)
        self.register_buffer("base_values", weight.detach().view(-1)[idx].clone())  # W under the support
        self.values = nn.Parameter(torch.zeros(idx.numel(), dtype=weight.dtype, device=weight.device))
        self.register_buffer("applied", torch.zeros_like(self.values.detach()))  # what W_eff holds now
        self._synced = None
        self._unfused = False  # unfuse() ran: W alone in the weight until sync_()
        self._loading_own_state = False
        # weights loaded into base_layer after wrapping (pretrained ones) are the new W; a load of
        # this layer's own state_dict brings W_eff and the kept entries together (see the hooks)
        self._base_hook = base_layer.register_load_state_dict_post_hook(_BaseLoadHook(self))

    def __setstate__(self, state):  # a copy's version counters restart: sync on its first forward
        super().__setstate__(state)
        self._synced = None
        self.__dict__.setdefault("_unfused", False)
        self.__dict__.setdefault("_loading_own_state", False)
        self.__dict__.setdefault("_base_hook", None)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # runs before base_layer's load: whether this load brings the kept entries with W_eff
        _check_loaded_support(state_dict, prefix, self.base_layer.weight.numel(), type(self).__name__)
        # (an unfused layer has no hook on its base layer to take the flag back)
        # a load that fails its size checks changes nothing here (the base layer's hook then
        # takes whatever weight did load as a new W, with nothing applied: consistent)
        fits = not state_mismatches(self, state_dict, prefix)
        self._loading_own_state = fits and prefix + "base_values" in state_dict and not self._unfused
        own = fits and any(prefix + k in state_dict for k in ("indices", "values", "base_values", "applied"))
        with_base = prefix + "base_layer.weight" in state_dict
        if own and not self._unfused:
            # the weight back to W first: a new support (another adapter's checkpoint) would
            # otherwise leave this adapter's entries in it, which nothing could remove later
            with torch.no_grad():
                self.base_layer.weight.view(-1)[self.indices] = self.base_values
            self.applied = torch.zeros_like(self.applied)  # new tensors, not writes: see below
            self._synced = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if own and not with_base:
            # an adapter-only load: the weight is W, so the kept entries are read from it (saved
            # ones describe the saving model's W) and nothing is applied until the next sync.
            # Rebound, not written in place: with assign=True the buffers are the state_dict's
            # tensors, which may be another layer's own
            self.base_values = self.base_layer.weight.detach().view(-1)[self.indices].clone()
            self.applied = torch.zeros_like(self.values.detach())
            self._synced = None

    @torch.no_grad()
    def _base_layer_loaded(self, base_layer, incompatible_keys) -> None:
        """After a load into base_layer: unless this layer's own state came with it, a weight that
        no longer holds W_eff of the kept entries is a new W (e.g. pretrained weights loaded
        after wrapping): its entries under the support are kept, and the values go on top at the
        next sync. Other writes into the weight (``lowrank_ext.sparse.apply``) add to W_eff."""
        if self._loading_own_state:
            self._loading_own_state = False
            return
        flat = base_layer.weight.detach().view(-1)
        if not torch.equal(flat[self.indices], self._w_eff_entries(self.applied)):
            self.base_values.copy_(flat[self.indices])
            self.applied.zero_()
            self._synced = None

    def _w_eff_entries(self, values: torch.Tensor) -> torch.Tensor:
        """W_eff under the support for these values: W + values in the scatter kernel's
        accumulation type, rounded once to the weight's dtype (from the kept W entries, so
        rounding never accumulates over syncs)."""
        dtype = self.base_layer.weight.dtype
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        return (self.base_values.to(acc) + values.detach().to(acc)).to(dtype)

    def _sync_if_stale(self) -> None:
        if not self._unfused:
            super()._sync_if_stale()

    @property
    def rows(self) -> torch.Tensor:
        return self.indices // self.base_layer.in_features

    @property
    def cols(self) -> torch.Tensor:
        return self.indices % self.base_layer.in_features

    @torch.no_grad()
    def sync_(self) -> None:
        """Fold the values' change since the last sync into W_eff (W_eff[support] = W + values,
        written from the kept base entries, so rounding never accumulates over steps)."""
        self.base_layer.weight.view(-1)[self.indices] = self._w_eff_entries(self.values)
        self.applied.copy_(self.values)
        self._synced = _values_stamp(self.values)
        if self._unfused:  # the base layer is this layer's again (unfuse() let it go)
            self._base_hook = self.base_layer.register_load_state_dict_post_hook(_BaseLoadHook(self))
        self._unfused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._unfused:
            raise RuntimeError("this SparseAdapterLinear was unfused (its base layer holds W alone): use the "
                               "returned base layer, or call sync_() to apply the adapter again")
        self._sync_if_stale()
        w = self.base_layer.weight
        if w.requires_grad and torch.is_grad_enabled():
            # the fused backward gives the values their gradient, never W (it holds W + S)
            raise RuntimeError("SparseAdapterLinear trains its values only: base_layer.weight must stay frozen "
                               "(requires_grad=False)")
        # the Function sees rows: F.linear of an N-D x returns a view, and a view made inside
        # a custom Function cannot be modified in place (y += r, relu_) as nn.Linear's output can
        y = _FusedSparseLinear.apply(as_rows(x), w, self.base_layer.bias, self.values, self.indices,
                                     self.base_layer.in_features)
        return from_rows(y, x)

    def adapter(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, values) of this layer's adapter (flat indices into the weight)."""
        return self.indices.clone(), self.values.detach().clone()

    @torch.no_grad()
    def unfuse(self) -> nn.Linear:
        """The base layer with W restored exactly (the adapter leaves it). The layer stays
        unfused, its weight W alone, also through ``state_dict()``: its forward raises until
        :meth:`sync_` applies the adapter again."""
        self.base_layer.weight.view(-1)[self.indices] = self.base_values
        self.applied.zero_()
        self._synced = None
        if not self._unfused and self._base_hook is not None:  # a plain nn.Linear goes back
            self._base_hook.remove()
        self._unfused = True
        return self.base_layer

    def extra_repr(self) -> str:
        w = self.base_layer.weight
        return f"nnz={self.indices.numel()} ({self.indices.numel() / w.numel():.2%} of {tuple(w.shape)})"


class SLTrainLinear(_LazySync, nn.Module):
    """SLTrain: ``W = B A + S`` trained from scratch, with B [out, r], A [r, in] and S sparse
    on a random fixed support (``density`` of the entries; from ``seed``, or with None, the default,
    from a seed drawn from torch's generator: each layer its own support). ``y = (x A^T) B^T + x S^T``: the
    sparse part runs as one GEMM against a dense buffer holding S in place (zeros elsewhere)
    and its values' gradient comes from SDDMM, so there is no dense weight gradient and no
    optimizer state of weight size (the buffer is weight-sized).

    S's buffer follows the values as SparseAdapterLinear's W_eff does (synced before a forward
    and a ``state_dict()``; call :meth:`sync_` after each step, change of the values or load
    under ``torch.compile`` and selective activation checkpointing, before ``torch.export``,
    with ``fused=True`` optimizers or after writes through ``values.data``).

    Example::

        layer = SLTrainLinear(512, 512, rank=64, density=0.03)
        layer(torch.randn(4, 512)).sum().backward()    # grads of lora-style A, B and S's values
    """

    def __init__(self, in_features: int, out_features: int, rank: int, density: float, bias: bool = True,
                 seed: int | None = None, *, device=None, dtype=None):
        super().__init__()
        if not (isinstance(rank, int) and 1 <= rank <= min(in_features, out_features)):
            raise ValueError(f"rank must be an int in [1, {min(in_features, out_features)}], got {rank!r}")
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {density}")
        kw = dict(device=device, dtype=dtype)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, **kw))
        # all set by reset_parameters (also after a meta-device build and to_empty())
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.register_buffer("sparse_weight", torch.empty(out_features, in_features, **kw))
        nnz = max(1, round(density * in_features * out_features))
        self.seed = _layer_seed(seed)  # kept: reset_parameters draws the same support again
        self.register_buffer("indices", torch.empty(nnz, dtype=torch.int64, device=device))
        self.values = nn.Parameter(torch.empty(nnz, **kw))
        self._synced = self._synced_indices = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # the support too (from the seed) and S's buffer: a layer made on the meta device and
        # materialised with to_empty() holds garbage in both until this runs
        with torch.no_grad():
            self.sparse_weight.zero_()
            self.indices.copy_(choose_support(self.sparse_weight, self.values.numel(), "random", seed=self.seed))
            if self.bias is not None:
                self.bias.zero_()
        # bound = nn.Linear's init bound 1/sqrt(in): S's values are drawn as nn.Linear's entries
        # (variance bound^2 / 3); B A's entries have variance bound^2 / 9 (r terms of
        # (bound / 3r) (bound / 3)), a third of nn.Linear's
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.lora_A, -math.sqrt(bound), math.sqrt(bound))
        nn.init.uniform_(self.lora_B, -math.sqrt(bound / self.rank), math.sqrt(bound / self.rank))
        nn.init.uniform_(self.values, -bound, bound)
        self.sync_()  # S in its buffer now: a compiled forward (which never syncs) sees it

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _check_loaded_support(state_dict, prefix, self.in_features * self.out_features, type(self).__name__)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _sync_if_stale(self) -> None:
        if not torch.compiler.is_compiling() and not _is_synced(self.indices, self._synced_indices):
            self.sync_()  # a loaded support (load_state_dict without the buffer)
        super()._sync_if_stale()

    @torch.no_grad()
    def sync_(self) -> None:
        """Write the current values into the dense S buffer (done by forward when they changed);
        a support changed since the last sync (a loaded one) clears the buffer first."""
        if not _is_synced(self.indices, self._synced_indices):
            self.sparse_weight.zero_()
        self.sparse_weight.view(-1)[self.indices] = self.values.to(self.sparse_weight.dtype)
        self._synced = _values_stamp(self.values)
        self._synced_indices = _values_stamp(self.indices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._sync_if_stale()
        y = _FusedSparseLinear.apply(x, self.sparse_weight, self.bias, self.values, self.indices, self.in_features)
        return y + F.linear(F.linear(x, self.lora_A), self.lora_B)

    def _apply(self, fn, recurse: bool = True):  # the indices' stamp too (it keeps their storage)
        self._synced_indices = None
        return super()._apply(fn, recurse)

    def __setstate__(self, state):  # as SparseAdapterLinear's; the copied buffer may be stale too
        super().__setstate__(state)
        self._synced = self._synced_indices = None

    def to_dense(self) -> torch.Tensor:
        """The dense weight B A + S."""
        s = torch.zeros(self.out_features * self.in_features, dtype=self.values.dtype, device=self.values.device)
        s[self.indices] = self.values.detach()
        return self.lora_B.detach() @ self.lora_A.detach() + s.view(self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"nnz={self.indices.numel()}")
