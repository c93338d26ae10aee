"""MultiLoRALinear: one frozen ``nn.Linear`` serving (or training) many LoRA adapters in one batch."""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..ops._common import as_rows, autocast_on
from ..ops.multilora import lora_expand, lora_shrink, multi_lora_linear
from .lora import calls_module_code, state_mismatches

__all__ = ["MultiLoRALinear"]


class MultiLoRALinear(nn.Module):
    """``y[n] = base(x[n]) + scale_a B_a A_a x[n]`` where ``a`` is token n's adapter, for up to
    ``max_adapters`` adapters of rank up to ``max_rank`` held in two preallocated stacks
    (``lora_a [S, R, d_in]``, ``lora_b [S, d_out, R]``, with ``ranks`` and ``scales`` buffers).
    Adapters are loaded, replaced and unloaded by name by copying into their slot: the
    stacks are never reallocated (a captured CUDA graph or compiled model stays valid).

    ``forward(x, adapter_ids)`` takes one id per token (``x.shape[:-1]``) or, for ``x [B, T, d]``,
    one per sequence (``[B]``): slot indices from :meth:`adapter_ids` (``-1``: base layer
    only), or a list of adapter names (``None``: base only). Under ``torch.compile`` pass the
    ids tensor: a list of names is a Python constant, so each new list compiles again (and past
    Dynamo's cache limit the layer runs eagerly). Both stacks are parameters, so
    several adapters train at once (each slot's gradient comes from its own tokens only);
    the base layer is frozen. No dropout on the adapter branch. An optimizer steps each stack
    as one parameter: slots without tokens get a zero gradient, not none, so weight decay
    (and momentum left from earlier steps) still moves them, and an adapter loaded into a
    freed slot inherits that slot's optimizer state. Train with ``weight_decay=0`` on the
    stacks (a zero-gradient slot with no history then stays exactly as loaded), and keep
    serve-only adapters in a layer whose stacks no optimizer steps.

    Example::

        layer = MultiLoRALinear(nn.Linear(64, 32), max_adapters=4, max_rank=16)
        layer.load_adapter("fr", torch.randn(8, 64), torch.randn(32, 8), alpha=16)
        layer.load_adapter("de", torch.randn(16, 64), torch.randn(32, 16), scale=0.5)
        y = layer(torch.randn(3, 10, 64), ["fr", None, "de"])   # one adapter per sequence
    """

    def __init__(self, base_layer: nn.Linear, max_adapters: int, max_rank: int, dtype: torch.dtype | None = None):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"MultiLoRALinear wraps an nn.Linear, got {type(base_layer).__name__}")
        for arg, v in (("max_adapters", max_adapters), ("max_rank", max_rank)):
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"{arg} must be a positive int, got {v!r}")
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        d_in, d_out, device = base_layer.in_features, base_layer.out_features, base_layer.weight.device
        kw = dict(device=device, dtype=dtype or base_layer.weight.dtype)
        self.max_adapters, self.max_rank = max_adapters, max_rank
        self.lora_a = nn.Parameter(torch.zeros(max_adapters, max_rank, d_in, **kw))
        self.lora_b = nn.Parameter(torch.zeros(max_adapters, d_out, max_rank, **kw))
        self.register_buffer("ranks", torch.zeros(max_adapters, dtype=torch.int64, device=device))
        self.register_buffer("scales", torch.zeros(max_adapters, dtype=torch.float32, device=device))
        self._slots: dict[str, int] = {}

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Every slot free and zeroed, as a new layer has them (the base layer resets itself):
        what torch's recipe for a model built on the meta device needs (``to_empty()``, then
        ``reset_parameters()`` on every module that has one)."""
        for t in (self.lora_a, self.lora_b, self.ranks, self.scales):
            t.zero_()
        self._slots = {}

    def _apply(self, fn, recurse: bool = True):
        # .half() / .to(dtype) convert every floating buffer; the scales stay exact in fp32
        # (16/12 in bf16 would put a systematic +0.2% on every adapter's term)
        scales = self.scales
        out = super()._apply(fn, recurse)
        if self.scales.dtype != torch.float32:
            self.scales = scales.to(device=self.scales.device)
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        mismatched = state_mismatches(self, state_dict, prefix, recurse=False)
        if mismatched:
            # stacks of another size: nothing of this layer's own state loads (ranks, scales and
            # names alone would point the names at other adapters' weights); the mismatches are
            # reported as torch reports them
            for name, saved, shape in mismatched:
                error_msgs.append(f"size mismatch for {prefix}{name}: copying a param with shape {saved} "
                                  f"from checkpoint, the shape in current model is {shape}.")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # the name -> slot map travels with the state_dict, as a uint8 tensor of JSON: a state_dict
    # of tensors only is what safetensors (save_file / save_model) can write
    def get_extra_state(self) -> torch.Tensor:
        text = json.dumps({"slots": self._slots}).encode()
        return torch.frombuffer(bytearray(text), dtype=torch.uint8)

    def set_extra_state(self, state: torch.Tensor | dict) -> None:
        if isinstance(state, torch.Tensor):  # a dict in state_dicts saved before 2026-11-24
            state = json.loads(bytes(state.cpu().tolist()).decode())
        slots = {str(name): int(slot) for name, slot in state["slots"].items()}
        if any(not 0 <= slot < self.max_adapters for slot in slots.values()) or len(set(slots.values())) != len(slots):
            raise ValueError(f"the state_dict's adapter slots {slots} do not fit max_adapters={self.max_adapters}")
        self._slots = slots

    # ---- adapters ----

    @property
    def adapter_names(self) -> list[str]:
        return list(self._slots)

    @torch.no_grad()
    def load_adapter(self, name: str, lora_a: torch.Tensor, lora_b: torch.Tensor, *, scale: float | None = None,
                     alpha: float | None = None) -> int:
        """Copy ``lora_a [r, d_in]`` and ``lora_b [d_out, r]`` into ``name``'s slot (a free one for
        a new name); returns the slot. ``scale`` defaults to ``alpha / r`` (PEFT's), and to 1
        without alpha."""
        if not isinstance(name, str):  # the names travel in the state_dict as JSON keys
            raise TypeError(f"an adapter name must be a str, got {type(name).__name__}")
        d_out, d_in = self.lora_b.shape[1], self.lora_a.shape[2]
        r = lora_a.shape[0] if lora_a.dim() == 2 else 0
        if lora_a.dim() != 2 or lora_a.shape[1] != d_in or not 1 <= r <= self.max_rank:
            raise ValueError(f"lora_a must be [r, {d_in}] with 1 <= r <= max_rank = {self.max_rank}, "
                             f"got {tuple(lora_a.shape)}")
        if tuple(lora_b.shape) != (d_out, r):
            raise ValueError(f"lora_b must be [{d_out}, {r}] to match lora_a, got {tuple(lora_b.shape)}")
        if scale is not None and alpha is not None:
            raise ValueError("give scale or alpha, not both")
        scale = float(scale) if scale is not None else (float(alpha) / r if alpha is not None else 1.0)
        slot = self._slots.get(name)
        if slot is None:
            free = sorted(set(range(self.max_adapters)) - set(self._slots.values()))
            if not free:
                raise RuntimeError(f"all {self.max_adapters} adapter slots are taken ({', '.join(self._slots)}); "
                                   f"unload one first")
            slot = free[0]
        # copies first: the source may share memory with the stacks (re-loading a slot's own
        # tensors, e.g. to change its scale), which zeroing the slot would wipe
        lora_a = lora_a.to(self.lora_a.device, self.lora_a.dtype, copy=True)
        lora_b = lora_b.to(self.lora_b.device, self.lora_b.dtype, copy=True)
        self.lora_a[slot].zero_()
        self.lora_a[slot, :r].copy_(lora_a)
        self.lora_b[slot].zero_()
        self.lora_b[slot, :, :r].copy_(lora_b)
        self.ranks[slot] = r
        self.scales[slot] = scale
        self._slots[name] = slot
        return slot

    def load_lora_linear(self, name: str, layer: nn.Module) -> int:
        """Load the adapter of a :class:`lowrank_ext.nn.LoRALinear` (its core and rank scale, if
        any, folded into B: the same forward)."""
        a, b, core, rank_scale = layer._lora_tensors()
        acc = torch.float64 if b.dtype == torch.float64 else torch.float32  # fold in the accumulation type
        b = b.detach().to(acc)
        if core is not None:
            b = b @ core.detach().to(acc)
        if rank_scale is not None:
            b = b * rank_scale.detach().to(acc)
        return self.load_adapter(name, a.detach(), b, scale=layer.scaling)

    def load_peft_state_dict(self, name: str, state_dict: Mapping[str, torch.Tensor], *, scale: float | None = None,
                             alpha: float | None = None) -> int:
        """Load one layer's adapter from a PEFT state_dict (keys ending in ``lora_A[.<adapter>].weight``
        and ``lora_B[.<adapter>].weight``; exactly one of each). PEFT keeps ``lora_alpha`` in its
        config, not in the state_dict: pass ``alpha`` (scale = alpha / r) or ``scale``."""
        # adapter parts a plain LoRA does not have (DoRA's lora_magnitude_vector, lora_B's bias
        # with lora_bias=True, ...) change the function: refused, not dropped
        extra = [k for k in state_dict if any(part.startswith("lora_") for part in k.split("."))
                 and not (k.endswith(".weight") and ({"lora_A", "lora_B"} & set(k.split("."))))]
        if extra:
            raise ValueError(f"the state_dict holds adapter parts a plain LoRA adapter does not have: {extra} "
                             f"(DoRA, a LoRA bias, ...); MultiLoRALinear serves plain LoRA adapters only")

        def one(kind):
            keys = [k for k in state_dict if k.endswith(".weight") and f"lora_{kind}" in k.split(".")]
            if len(keys) != 1:
                raise KeyError(f"expected exactly one lora_{kind} weight in the state_dict, found {keys}")
            return state_dict[keys[0]]
        return self.load_adapter(name, one("A"), one("B"), scale=scale, alpha=alpha)

    @torch.no_grad()
    def unload_adapter(self, name: str) -> None:
        """Free ``name``'s slot (zeroed; ids still pointing at it then add nothing)."""
        if name not in self._slots:
            raise KeyError(f"no adapter named {name!r} (loaded: {', '.join(self._slots) or 'none'})")
        slot = self._slots.pop(name)
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self.ranks[slot] = 0
        self.scales[slot] = 0.0

    def adapter_ids(self, names: Sequence[str | None], device: torch.device | None = None) -> torch.Tensor:
        """Slot indices (int64) of adapter names; ``None`` gives -1 (base layer only)."""
        try:
            ids = [-1 if n is None else self._slots[n] for n in names]
        except KeyError as e:
            raise KeyError(f"no adapter named {e.args[0]!r} (loaded: {', '.join(self._slots) or 'none'})") from None
        return torch.tensor(ids, dtype=torch.int64, device=device or self.lora_a.device)

    # ---- forward ----

    def forward(self, x: torch.Tensor, adapter_ids: torch.Tensor | Sequence[str | None]) -> torch.Tensor:
        ids = adapter_ids if isinstance(adapter_ids, torch.Tensor) else self.adapter_ids(adapter_ids, x.device)
        lead = tuple(x.shape[:-1])
        if tuple(ids.shape) != lead:
            if x.dim() >= 3 and tuple(ids.shape) == lead[:1]:  # one id per sequence
                ids = ids.reshape(-1, *([1] * (len(lead) - 1))).expand(lead)
            else:
                raise ValueError(f"adapter_ids must have one id per token {lead} or, for x [B, T, d], one per "
                                 f"sequence ({lead[:1]}), got {tuple(ids.shape)}")
        if (self.lora_a.dtype != x.dtype and not autocast_on(x.device.type)) or calls_module_code(self.base_layer):
            # stacks kept in another dtype than the base (e.g. fp32 adapters on a bf16 model), or a
            # base layer with hooks or its own forward (called, so they run): the branch runs in the
            # stacks' dtype, as PEFT's does, and is added to the base output once in x's dtype (an
            # extra [N, d_out] buffer: the fused in-place add needs one dtype and no base call)
            dt = self.lora_a.dtype
            x2, flat_ids = as_rows(x), ids.reshape(-1)
            xa = lora_shrink(x2.to(dt), self.lora_a, flat_ids, self.ranks, self.scales)
            zeros = x2.new_zeros(x2.shape[0], self.base_layer.out_features, dtype=dt)
            delta = lora_expand(zeros, xa, self.lora_b, flat_ids, self.ranks, None)
            base = self.base_layer(x)  # its dtype (autocast's, say) is the output's, as without a hook
            return base + delta.to(base.dtype).reshape(*lead, -1)
        return multi_lora_linear(x, self.base_layer.weight, self.base_layer.bias, self.lora_a, self.lora_b, ids,
                                 self.ranks, self.scales)

    def extra_repr(self) -> str:
        return (f"max_adapters={self.max_adapters}, max_rank={self.max_rank}, "
                f"adapters={dict(self._slots)}")
