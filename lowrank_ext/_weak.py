"""A weak reference to a module for the callables a module installs on itself or on a child
(a patched ``forward``, a load hook): a strong one there is a reference cycle, which keeps the
module's weights alive after ``del`` until Python's cycle collector runs (a reloaded model's
memory, on a GPU too)."""
from __future__ import annotations

import copy
import weakref

from torch import nn


class WeakModuleRef:
    """``ref()`` is the module, or None once it is gone. Follows ``copy.deepcopy`` (the copy
    refers to the module's copy, made in the same deepcopy) and pickles as the module itself."""

    def __init__(self, module: nn.Module | None):
        self._ref = weakref.ref(module) if module is not None else None

    def __call__(self) -> nn.Module | None:
        return self._ref() if self._ref is not None else None

    def __deepcopy__(self, memo) -> "WeakModuleRef":
        return type(self)(copy.deepcopy(self(), memo))

    def __getstate__(self) -> dict:
        return {"module": self()}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["module"])
