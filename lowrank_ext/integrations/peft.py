"""One call to run a PEFT model's LoRA Linear layers through the fused lora ops.

    model = peft.get_peft_model(base, peft.LoraConfig(r=16, target_modules=["q_proj", "v_proj"]))
    n = lowrank_ext.integrations.peft.accelerate(model)   # n layers now run fused
    lowrank_ext.integrations.peft.restore(model)          # back to PEFT's own forward

Only the forward method of each ``peft.tuners.lora.layer.Linear`` instance is replaced:
parameters, state_dict, merge/unmerge and adapter management stay PEFT's. A call runs
fused when exactly one active adapter is plain LoRA (no DoRA or other variant, no
``lora_bias``, dropout p < 1) on an ``nn.Linear`` base (not ``fan_in_fan_out``), with x, the
base weight and the adapter in one dtype (or under autocast, which casts them to one) and no
per-call ``adapter_names``, and when calling the base layer, the adapter's Linears and its
dropout would run no code of their own (hooks, a subclass's forward, a forward replaced on
the instance: see ``calls_module_code``); otherwise that call runs PEFT's own forward, which
computes the same function. A layer whose forward was already replaced on the instance
(accelerate's ``add_hook_to_module``, as ``cpu_offload`` / ``dispatch_model`` use) is not
patched; one hooked after :func:`accelerate` keeps its hook through :func:`restore`.
"""
from __future__ import annotations


import torch
from torch import nn

from .._weak import WeakModuleRef
from ..nn.lora import calls_module_code
from ..ops._common import autocast_on
from ..ops.lora import lora_linear

__all__ = ["accelerate", "restore", "is_fused_call"]

_PATCHED = "_lowrank_ext_fused_forward"  # the layer's _FusedForward while accelerated


def _lora_linear_class():
    from peft.tuners.lora.layer import Linear  # the real PEFT package
    return Linear


def is_fused_call(layer, x: torch.Tensor, kwargs: dict) -> bool:
    """Whether ``layer(x, **kwargs)`` takes the fused path (see the module docstring)."""
    if layer.disable_adapters or layer.merged or kwargs or not isinstance(layer.base_layer, nn.Linear):
        return False
    if getattr(layer, "fan_in_fan_out", False):
        return False
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1 or active[0] in getattr(layer, "lora_variant", {}):
        return False
    name = active[0]
    dropout = layer.lora_dropout[name]
    if not isinstance(dropout, (nn.Dropout, nn.Identity)):
        return False
    if isinstance(dropout, nn.Dropout) and dropout.training and dropout.p >= 1.0:
        return False  # p = 1 zeroes the branch: the op takes p in [0, 1)
    if getattr(layer, "lora_bias", {}).get(name, False) or layer.lora_B[name].bias is not None:
        return False  # lora_bias=True: lora_B has a bias the fused op does not add
    if calls_module_code(layer.base_layer, layer.lora_A[name], layer.lora_B[name], dropout):
        return False  # PEFT's forward calls these modules (and so runs, e.g., accelerate's offload hooks)
    if layer.base_layer.weight.device != x.device:
        return False  # e.g. offloaded to meta, brought in by a hook
    dtypes = {x.dtype, layer.base_layer.weight.dtype, layer.lora_A[name].weight.dtype,
              layer.lora_B[name].weight.dtype}
    if autocast_on(x.device.type):
        # autocast casts fp32/fp16/bf16 to one dtype but leaves fp64 alone: all fp64 or none
        return torch.float64 not in dtypes or len(dtypes) == 1
    return len(dtypes) == 1


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if args or not is_fused_call(self, x, kwargs):
        return type(self).forward(self, x, *args, **kwargs)  # PEFT's own
    name = next(a for a in self.active_adapters if a in self.lora_A)
    dropout = self.lora_dropout[name]
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    seed = torch.randint(0, 2 ** 62, (), dtype=torch.int64) if p > 0.0 else 0  # CPU: no device sync
    base = self.base_layer
    return lora_linear(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                       scale=float(self.scaling[name]), dropout_p=float(p), seed=seed)


class _FusedForward:
    """A patched layer's ``forward``: an object of an importable class (a bound method of a
    plain function would not pickle with the model). After :func:`restore` it runs PEFT's
    forward: a wrapper installed on top of it (accelerate's hooks) may still call it."""

    def __init__(self, module: nn.Module):
        self._module = WeakModuleRef(module)  # the module holds this object: no cycle
        self.active = True

    @property
    def module(self) -> nn.Module:
        module = self._module()
        if module is None:  # e.g. a shallow copy (copy.copy) of the layer outliving the model
            raise ReferenceError("the PEFT layer of this fused forward is gone (it holds its layer weakly: a "
                                 "shallow copy of an accelerated layer, or a forward kept after its model was "
                                 "dropped, outlived it); restore() the model before a shallow copy")
        return module

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self.active:
            return type(self.module).forward(self.module, x, *args, **kwargs)
        return _fused_forward(self.module, x, *args, **kwargs)


def accelerate(model: nn.Module) -> int:
    """Route every PEFT LoRA ``Linear`` in ``model`` through the fused ops; returns how many
    layers were patched (0 if already accelerated). Reversible with :func:`restore`. A layer
    whose forward is already replaced on the instance (accelerate's hooks) is left as it is."""
    linear_cls = _lora_linear_class()
    count = 0
    for module in model.modules():
        if isinstance(module, linear_cls) and "forward" not in module.__dict__ and not hasattr(module, _PATCHED):
            fused = _FusedForward(module)
            setattr(module, _PATCHED, fused)
            module.forward = fused
            count += 1
    return count


def restore(model: nn.Module) -> int:
    """Undo :func:`accelerate`; returns how many layers were restored. A hook installed on a
    layer after :func:`accelerate` stays, and then wraps PEFT's forward."""
    count = 0
    for module in model.modules():
        fused = module.__dict__.get(_PATCHED)
        if fused is None:
            continue
        fused.active = False
        delattr(module, _PATCHED)
        if module.__dict__.get("forward") is fused:
            del module.forward  # the class's forward shows through again
        count += 1
    return count
