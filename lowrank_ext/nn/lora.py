"""LoRALinear: a frozen ``nn.Linear`` plus a LoRA branch, run by the fused lora ops."""
from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module
from torch.nn.utils import parametrize

from ..ops.lora import lora_linear, lora_merge_

__all__ = ["LoRALinear", "inject_lora"]


# the forwards the fused paths compute: a module whose forward is another runs code they skip
_FUSABLE_FORWARDS = (nn.Linear.forward, nn.Dropout.forward, nn.Identity.forward)


def check_weight_is_stored(module: nn.Module, what: str) -> None:
    """Refuses a ``weight`` computed on each access (torch.nn.utils.parametrize, e.g. the
    parametrizations' weight_norm / spectral_norm, or the older hook-based weight_norm /
    spectral_norm, which recompute it in a forward pre-hook): writing into it in place would
    change a temporary, and the adapter would be silently lost. A weight kept as a buffer or a
    plain attribute is stored, and passes."""
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm
    recomputed = any(isinstance(h, (WeightNorm, SpectralNorm)) and h.name == "weight"
                     for h in module._forward_pre_hooks.values())
    if parametrize.is_parametrized(module, "weight") or recomputed:
        raise ValueError(f"{what}: the weight of {type(module).__name__} is computed on each access "
                         f"(parametrized, e.g. weight_norm or spectral_norm), so it cannot be written in place")


def state_mismatches(module: nn.Module, state_dict, prefix: str, recurse: bool = True) -> list[tuple]:
    """(name, saved shape, shape) of each tensor of ``module`` (and its children, with
    ``recurse``) that ``state_dict`` holds in another shape: a load with one fails (torch
    reports a size mismatch), and a layer that keeps flags or derived state beside its tensors
    must then change neither."""
    tensors = [*module.named_parameters(recurse=recurse), *module.named_buffers(recurse=recurse)]
    return [(name, tuple(saved.shape), tuple(t.shape)) for name, t in tensors
            if isinstance(saved := state_dict.get(prefix + name), torch.Tensor) and saved.shape != t.shape]


def calls_module_code(*modules: nn.Module) -> bool:
    """Whether calling any of these modules would run code of its own beyond the plain
    ``nn.Linear`` / ``nn.Dropout`` / ``nn.Identity`` forward: forward or backward hooks (the
    module's or global ones), a forward replaced on the instance (accelerate's ``add_hook_to_module``, as
    ``cpu_offload`` and ``dispatch_model`` use), or a subclass's own forward (fake
    quantization, a custom Linear). The fused paths read the weights instead of calling the
    modules, so they must not stand in for them then."""
    if (_module._global_forward_hooks or _module._global_forward_pre_hooks or _module._global_backward_hooks
            or _module._global_backward_pre_hooks):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               or "forward" in m.__dict__ or type(m).forward not in _FUSABLE_FORWARDS for m in modules)


class _ZeroInitLinear(nn.Linear):
    """PEFT's ``lora_B``: an ``nn.Linear`` whose ``reset_parameters`` zeros it. torch's recipe
    for a model built on the meta device (``to_empty()``, then ``reset_parameters()`` on every
    module that has one, as FSDP does) would otherwise give B ``nn.Linear``'s random init,
    and the layer would not start as its base."""

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)


class LoRALinear(nn.Module):
    """``y = base(x) + scale * B A drop(x)`` with ``scale = alpha / r`` (``alpha / sqrt(r)``
    with ``use_rslora``), through :func:`lowrank_ext.ops.lora.lora_linear`: one fused op,
    the dropout mask regenerated in backward instead of saved.

    State dict keys are PEFT's (``base_layer.weight``, ``lora_A.<adapter>.weight``,
    ``lora_B.<adapter>.weight``), so a PEFT model's ``state_dict()`` loads as is (the files of
    PEFT's ``save_pretrained`` leave the adapter name out of the keys: load those with PEFT,
    or put ``.<adapter>`` back after ``lora_A`` / ``lora_B``). Variants:
    ``core=True`` adds a trainable r x r core between A and B and freezes A and B
    (LoRA-XS; ``lora_core.<adapter>``), ``rank_scale=True`` a trainable per-rank scale
    vector (AdaLoRA's diagonal; ``lora_rank_scale.<adapter>``: the diagonal only, not AdaLoRA's
    importance-based rank pruning, budget schedule or orthogonality regulariser; PEFT's AdaLoRA
    layers stay on PEFT's own path under ``accelerate``). The base layer is frozen.
    A merged layer's state_dict adds ``lora_merged`` (its base weight holds the adapter);
    loading takes the saved form, merged or not.

    Example::

        layer = LoRALinear(nn.Linear(64, 32), r=8, alpha=16, dropout=0.1)
        y = layer(torch.randn(4, 10, 64))      # any leading dims
        layer.merge(); layer.unmerge()         # fold the adapter into base_layer.weight and back
    """

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float | None = None, dropout: float = 0.0,
                 use_rslora: bool = False, adapter_name: str = "default", core: bool = False,
                 rank_scale: bool = False, init_lora_weights: bool = True):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base_layer).__name__}")
        if not (isinstance(r, int) and r >= 1):
            raise ValueError(f"r must be a positive int, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        alpha = float(r if alpha is None else alpha)
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        self.r, self.alpha, self.dropout, self.adapter_name = r, alpha, float(dropout), adapter_name
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        d_in, d_out = base_layer.in_features, base_layer.out_features
        kw = dict(device=base_layer.weight.device, dtype=base_layer.weight.dtype)
        self.lora_A = nn.ModuleDict({adapter_name: nn.Linear(d_in, r, bias=False, **kw)})
        plain = not core and not rank_scale  # B starts at zero (else B is random: see reset_lora_parameters)
        self.lora_B = nn.ModuleDict({adapter_name: (_ZeroInitLinear if plain else nn.Linear)(r, d_out, bias=False,
                                                                                          **kw)})
        self.lora_core = nn.ParameterDict({adapter_name: nn.Parameter(torch.zeros(r, r, **kw))}) if core else None
        self.lora_rank_scale = (nn.ParameterDict({adapter_name: nn.Parameter(torch.zeros(r, **kw))})
                                if rank_scale else None)
        self.merged = False
        self._reset_core_and_rank_scale()
        if init_lora_weights:
            self.reset_lora_parameters()
        if core:  # LoRA-XS: A and B are fixed bases, the core is trained
            self.lora_A[adapter_name].weight.requires_grad_(False)
            self.lora_B[adapter_name].weight.requires_grad_(False)

    @torch.no_grad()
    def _reset_core_and_rank_scale(self) -> None:
        # with a core, the scale starts at ones: both at zero would be a fixed point of training
        if self.lora_core is not None:
            self.lora_core[self.adapter_name].zero_()
        if self.lora_rank_scale is not None:
            self.lora_rank_scale[self.adapter_name].fill_(1.0 if self.lora_core is not None else 0.0)

    def reset_parameters(self) -> None:
        """The adapter as a new layer has it (:meth:`reset_lora_parameters`, core and rank scale
        too; a merged adapter is subtracted first; the base layer resets itself): what torch's
        recipe for a model built on the meta device needs (``to_empty()``, then
        ``reset_parameters()`` on every module that has one)."""
        self.unmerge()
        self._reset_core_and_rank_scale()
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """PEFT's default: A Kaiming-uniform, B zero (so the layer starts as the base).
        With a core or a rank scale, those start at zero instead (the scale at ones when both
        are there) and B is random."""
        a, b = self.lora_A[self.adapter_name].weight, self.lora_B[self.adapter_name].weight
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if self.lora_core is None and self.lora_rank_scale is None:
            nn.init.zeros_(b)
        else:
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))

    def _adapter_parts(self):
        """The active adapter's lora_A and lora_B modules, core and rank scale (None where absent)."""
        name = self.adapter_name
        core = self.lora_core[name] if self.lora_core is not None else None
        rank_scale = self.lora_rank_scale[name] if self.lora_rank_scale is not None else None
        return self.lora_A[name], self.lora_B[name], core, rank_scale

    def _lora_tensors(self):
        module_a, module_b, core, rank_scale = self._adapter_parts()
        return module_a.weight, module_b.weight, core, rank_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if self.merged:
            return base(x)
        module_a, module_b, core, rank_scale = self._adapter_parts()
        if calls_module_code(base, module_a, module_b):
            # the same function with the modules called, so that their hooks run (PEFT's form)
            h = module_a(F.dropout(x, self.dropout, self.training))
            if rank_scale is not None:
                h = h * rank_scale
            if core is not None:
                h = h @ core.t()
            return base(x) + self.scaling * module_b(h)
        p = self.dropout if self.training else 0.0
        # a CPU scalar tensor from torch's default generator: no device sync, and traceable
        seed = torch.randint(0, 2 ** 62, (), dtype=torch.int64) if p > 0.0 else 0
        return lora_linear(x, base.weight, base.bias, module_a.weight, module_b.weight, core, rank_scale,
                           scale=self.scaling, dropout_p=p, seed=seed)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into ``base_layer.weight`` (forward then runs the base alone)."""
        check_weight_is_stored(self.base_layer, "merge")  # a merge would write into a temporary
        if not self.merged:
            a, b, core, rank_scale = self._lora_tensors()
            lora_merge_(self.base_layer.weight, a, b, core, rank_scale, scale=self.scaling)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the adapter again (exact up to one rounding of the weight's dtype)."""
        if self.merged:
            a, b, core, rank_scale = self._lora_tensors()
            lora_merge_(self.base_layer.weight, a, b, core, rank_scale, scale=-self.scaling)
            self.merged = False

    # merged or not travels with the state_dict: a merged layer adds the key "lora_merged" (an
    # unmerged one saves PEFT's keys alone, so its checkpoints stay PEFT's), and a load takes
    # the checkpoint's form. Without it a merged checkpoint loaded into an unmerged layer added
    # the adapter twice, and an unmerged one loaded into a merged layer dropped it.
    _MERGED_KEY = "lora_merged"
    _ADAPTER_PARTS = ("lora_A.", "lora_B.", "lora_core.", "lora_rank_scale.")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            destination[prefix + self._MERGED_KEY] = torch.tensor(True)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        merged_key = prefix + self._MERGED_KEY
        has_base = prefix + "base_layer.weight" in state_dict
        has_adapter = any(k.startswith(prefix + part) for k in state_dict for part in self._ADAPTER_PARTS)
        # the flag describes the saved base weight: without that weight it says nothing
        saved_merged = has_base and merged_key in state_dict and bool(state_dict[merged_key])
        name = prefix or "LoRALinear"
        if saved_merged and not has_adapter:
            raise RuntimeError(f"{name}: the state_dict's base_layer.weight holds a merged adapter that it does not "
                               f"include; load the adapter with it")
        if self.merged and not (has_base and has_adapter):
            # the weight and the adapter it holds would come from two places
            raise RuntimeError(f"{name}: this LoRALinear is merged, so a load must replace base_layer.weight and the "
                               f"adapter together (this state_dict has "
                               f"{'the base weight' if has_base else 'the adapter' if has_adapter else 'neither'} "
                               f"only); unmerge() before loading a part")
        fits = not state_mismatches(self, state_dict, prefix)
        if self.merged and not fits:
            # a failed load would leave the merged weight and the adapter it holds from two places
            # (the children load what fits): refused before anything of this layer is written
            raise RuntimeError(f"{name}: this LoRALinear is merged and the state_dict's tensors do not all have its "
                               f"shapes (a size mismatch); nothing was loaded into it")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if merged_key in unexpected_keys:
            unexpected_keys.remove(merged_key)
        if has_base and has_adapter and fits:
            self.merged = saved_merged  # the children load both next: the layer takes the saved form

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, dropout={self.dropout}, "
                f"core={self.lora_core is not None}, rank_scale={self.lora_rank_scale is not None}, "
                f"merged={self.merged}")


def _matches(name: str, targets: str | Iterable[str]) -> bool:
    if isinstance(targets, str):  # a regex over the full module name, as PEFT takes it
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def inject_lora(model: nn.Module, target_modules: str | Iterable[str], r: int, alpha: float | None = None,
                dropout: float = 0.0, **kwargs) -> nn.Module:
    """Replace every ``nn.Linear`` whose name matches ``target_modules`` (names or name
    suffixes, or one regex over full names, as PEFT reads them) with a :class:`LoRALinear`
    around it, in place; returns ``model``. Raises if nothing matched. A module registered under
    several names (tied) gets one LoRALinear, set at each of its matching names; the Linears of
    a LoRALinear already there (its base layer, A and B) are never targets."""
    modules = list(model.named_modules(remove_duplicate=False))
    # the Linears inside a LoRALinear (its base layer and A, B) are its own, not targets
    # (a second call with a broad pattern would wrap them again)
    inside_lora = tuple(name + "." for name, m in modules if isinstance(m, LoRALinear))
    found = [(name, m) for name, m in modules
             if isinstance(m, nn.Linear) and name and not name.startswith(inside_lora)
             and _matches(name, target_modules)]
    if not found:
        if isinstance(model, nn.Linear) and _matches("", target_modules):
            raise ValueError("the model itself is an nn.Linear and cannot be replaced in place: wrap it as "
                             "LoRALinear(model, r, ...) instead")
        already = " outside its LoRALinear layers" if inside_lora else ""
        raise ValueError(f"no nn.Linear of the model{already} matches target_modules={target_modules!r}")
    for name, _ in found:
        parent_name = name.rpartition(".")[0]
        if isinstance(model.get_submodule(parent_name) if parent_name else model, nn.MultiheadAttention):
            # its forward reads out_proj.weight / .bias instead of calling out_proj
            raise ValueError(f"{name} belongs to an nn.MultiheadAttention, which reads its weight directly: a "
                             f"LoRA there would never run; leave it out of target_modules")
    wrapped: dict[int, LoRALinear] = {}
    for name, module in found:
        if id(module) not in wrapped:
            wrapped[id(module)] = LoRALinear(module, r, alpha, dropout, **kwargs)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, wrapped[id(module)])
    return model
