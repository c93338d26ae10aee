"""SVD-based initialisations of LoRA adapters, over :mod:`lowrank_ext.linalg`.

- :func:`pissa_init`: the top-r singular triplets of W become the adapter, the rest stays in W
  (PiSSA): the layer computes the same function, and training starts on W's principal part.
- :func:`eva_init`: A from the top-r right singular vectors of each layer's inputs, computed by
  a streaming SVD over a few batches (EVA); B stays zero, so the model is unchanged.
- :func:`lora_sb_init`: A, B and the r x r core of a LoRA-XS layer from the truncated SVD of
  the first full fine-tuning step (LoRA-SB): the adapter starts at the best rank-r
  approximation of that step, with orthonormal A and B.

Each randomized SVD is reproducible for its ``seed``.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .linalg import StreamingSVD, rsvd
from .nn.lora import LoRALinear, check_weight_is_stored

__all__ = ["pissa_init", "eva_init", "lora_sb_init"]


def _as_lora(layer: nn.Module, r: int | None, alpha: float | None, **kwargs) -> LoRALinear:
    if isinstance(layer, LoRALinear):
        if r is not None and r != layer.r:
            raise ValueError(f"the LoRALinear has r={layer.r}, got r={r}")
        return layer
    if isinstance(layer, nn.Linear):
        if r is None:
            raise ValueError("r is needed to wrap an nn.Linear")
        return LoRALinear(layer, r, alpha, **kwargs)
    raise TypeError(f"expected an nn.Linear or a LoRALinear, got {type(layer).__name__}")


def _frozen_only_on_success(init):
    """An init given a plain nn.Linear wraps it (which freezes its parameters) before its own
    checks: a call that raises gives the layer back with its requires_grad flags as they were."""
    @functools.wraps(init)
    def wrapped(layer, *args, **kwargs):
        flags = [(p, p.requires_grad) for p in layer.parameters()] if not isinstance(layer, LoRALinear) else []
        try:
            return init(layer, *args, **kwargs)
        except BaseException:
            for p, flag in flags:
                p.requires_grad_(flag)
            raise
    return wrapped


def _top_r(w: torch.Tensor, r: int, n_iter: int | None, oversample: int, seed: int):
    if r > min(w.shape):  # slicing would return fewer columns, then broadcast into A and B
        raise ValueError(f"r={r} exceeds min(d_out, d_in) = {min(w.shape)} of the weight {tuple(w.shape)}")
    if n_iter is None:  # exact: LAPACK / cuSOLVER through torch
        u, s, vh = torch.linalg.svd(w.double() if w.dtype == torch.float64 else w.float(), full_matrices=False)
        return u[:, :r], s[:r], vh[:r]
    return rsvd(w, r, oversample=oversample, n_iter=n_iter, seed=seed)


@torch.no_grad()
@_frozen_only_on_success
def pissa_init(layer: nn.Module, r: int | None = None, alpha: float | None = None, *, n_iter: int | None = 4,
               oversample: int = 10, seed: int = 0) -> LoRALinear:
    """PiSSA: ``W = U S Vh``; ``B = U_r sqrt(S_r / scale)``, ``A = sqrt(S_r / scale) Vh_r``
    and ``W <- W - scale * B A`` (in fp32, with A and B as stored), so the layer's output is
    unchanged up to rounding. ``layer``: an ``nn.Linear`` (wrapped in a new
    :class:`LoRALinear` with ``r``, ``alpha``) or a plain LoRALinear (re-initialised in
    place; an adapter it already holds is part of what is decomposed, so its function
    stays). ``n_iter=None`` takes the exact SVD; otherwise the randomized one with that many
    power iterations (PiSSA's "fast SVD").

    >>> import torch
    >>> from lowrank_ext.init import pissa_init
    >>> base = torch.nn.Linear(64, 32)
    >>> x = torch.randn(5, 64)
    >>> y0 = base(x)
    >>> layer = pissa_init(base, r=8)
    >>> bool(torch.allclose(layer(x), y0, atol=1e-5))
    True
    """
    lora = _as_lora(layer, r, alpha)
    if lora.lora_core is not None or lora.lora_rank_scale is not None:
        raise ValueError("pissa_init initialises a plain LoRA adapter (no core, no rank scale)")
    if lora.merged:
        raise ValueError("unmerge the adapter before re-initialising it")
    check_weight_is_stored(lora.base_layer, "pissa_init")  # the residual is written into W
    w = lora.base_layer.weight
    a, b = lora.lora_A[lora.adapter_name].weight, lora.lora_B[lora.adapter_name].weight
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32  # fp64 weights keep fp64 accuracy
    # the layer's function: W, plus the adapter already there (a trained one, or an earlier
    # pissa_init's), which the new A, B replace
    w_now = w.to(acc) + lora.scaling * (b.to(acc) @ a.to(acc)) if b.any() else w
    u, s, vh = _top_r(w_now, lora.r, n_iter, oversample, seed)
    root = (s / lora.scaling).sqrt()
    a.copy_(root[:, None] * vh)
    b.copy_(u * root[None, :])
    w.copy_(w_now.to(acc) - lora.scaling * (b.to(acc) @ a.to(acc)))
    return lora


def _call(model: nn.Module, batch: Any):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


@torch.no_grad()
def eva_init(model: nn.Module, batches: Iterable[Any], r: int | None = None,
             oversample: int = 10) -> dict[str, torch.Tensor]:
    """EVA: run ``model`` (in eval mode, without gradients) over ``batches`` (each passed as
    ``model(**b)``, ``model(*b)`` or ``model(b)``) and feed the inputs of every
    :class:`LoRALinear` of the model, ``x [tokens, d_in]``, to a :class:`StreamingSVD` of
    ``x.T`` (tracking ``r + oversample`` directions); then set each layer's ``A`` to the
    top-``r`` right singular vectors of its inputs (``r`` defaults to the layer's rank).
    B is left as it is (zero for a fresh adapter), so
    the model's function does not change. Returns the singular values per layer name.
    EVA's redistribution of ranks between layers is not done here.
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not layers:
        raise ValueError("the model has no LoRALinear layer (use lowrank_ext.nn.inject_lora first)")
    merged = [name for name, m in layers.items() if m.merged]
    if merged:  # a new A would be unmerged from a weight that holds the old one
        raise ValueError(f"unmerge the adapters of {merged} before re-initialising them")
    streams = {name: StreamingSVD(r or m.r, oversample) for name, m in layers.items()}
    hooks = []
    for name, module in layers.items():
        def hook(mod, args, kwargs, name=name):
            x = args[0] if args else kwargs["x"]  # the layer called as layer(t) or layer(x=t)
            streams[name].update(x.detach().reshape(-1, x.shape[-1]).t())
        hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    modes = {m: m.training for m in model.modules()}  # each submodule's own (a frozen BatchNorm stays in eval)
    model.eval()
    try:
        for batch in batches:
            _call(model, batch)
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes.items():
            m.training = training
    for name, module in layers.items():  # every layer checked before any A is written
        stream, rank = streams[name], r or module.r
        if stream.U is None or stream.U.shape[1] < rank:
            seen = 0 if stream.U is None else stream.columns_seen
            raise ValueError(f"eva_init: layer {name} saw {seen} input vectors, fewer than r={rank}")
        if rank != module.lora_A[module.adapter_name].weight.shape[0]:
            raise ValueError(f"eva_init: r={rank} but layer {name} has rank {module.r}")
    values = {}
    for name, module in layers.items():
        rank = r or module.r
        module.lora_A[module.adapter_name].weight.copy_(streams[name].U[:, :rank].t())
        values[name] = streams[name].S[:rank].clone()
    return values


@torch.no_grad()
@_frozen_only_on_success
def lora_sb_init(layer: nn.Module, grad: torch.Tensor, lr: float, r: int | None = None, *, n_iter: int | None = 2,
                 oversample: int = 10, seed: int = 0) -> LoRALinear:
    """LoRA-SB: the first full fine-tuning step ``dW = -lr * grad`` (``grad`` the gradient of
    the loss w.r.t. the base weight, [d_out, d_in]) is truncated to rank r, ``dW ~ U_r S_r
    Vh_r``; then ``B = U_r`` and ``A = Vh_r`` (frozen, orthonormal) and the trainable core
    ``R = diag(S_r) / scale``, so the adapter ``scale * B R A`` starts at that projected
    step. ``layer``: an ``nn.Linear`` (wrapped in a new LoRALinear with ``core=True``) or a
    LoRALinear with a core.
    """
    lora = _as_lora(layer, r, None, core=True)
    if lora.lora_core is None:
        raise ValueError("lora_sb_init needs a LoRALinear with core=True (LoRA-XS)")
    if lora.merged:
        raise ValueError("unmerge the adapter before re-initialising it")
    w = lora.base_layer.weight
    if grad.shape != w.shape:
        raise ValueError(f"grad has shape {tuple(grad.shape)}, the base weight {tuple(w.shape)}")
    g = grad.double() if grad.dtype == torch.float64 else grad.float()  # fp64 layers keep fp64 accuracy
    u, s, vh = _top_r(-lr * g, lora.r, n_iter, oversample, seed)
    name = lora.adapter_name
    lora.lora_B[name].weight.copy_(u)
    lora.lora_A[name].weight.copy_(vh)
    lora.lora_core[name].copy_(torch.diag(s) / lora.scaling)
    if lora.lora_rank_scale is not None:
        lora.lora_rank_scale[name].fill_(1.0)
    return lora
