"""Optional imports of the libraries we compare against.

None of them is a dependency of lowrank_ext: each loader returns ``(module, "")`` or
``(None, reason)`` and the harness prints the reason for every peer it skips. Whether a
peer supports a given device/dtype is a separate question, answered by the family's
provider (it tries a tiny call and reports the error).
"""
from __future__ import annotations

import functools
import importlib
import logging
import warnings
from types import ModuleType

# peer name -> module to import (the peer's own name is what tables show)
PEERS: dict[str, str] = {
    "bitsandbytes": "bitsandbytes",
    "torchao": "torchao",
    "peft": "peft",
    "galore_torch": "galore_torch",
}


@functools.cache
def load(name: str) -> tuple[ModuleType | None, str]:
    """Import peer `name`; (module, "") on success, (None, why) otherwise."""
    module_name = PEERS.get(name, name)
    try:
        # Peers warn at import about things irrelevant here (missing GPU, deprecations),
        # through warnings and through torch's loggers.
        torch_log = logging.getLogger("torch")
        level = torch_log.level
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch_log.setLevel(logging.ERROR)
            try:
                module = importlib.import_module(module_name)
            finally:
                torch_log.setLevel(level)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name.split(".")[0]):
            return None, f"{name}: not installed"
        return None, f"{name}: import failed: {e}"
    except Exception as e:  # a broken install raises anything (OSError for a missing .so, ...)
        return None, f"{name}: import failed: {type(e).__name__}: {e}"
    return module, ""


def version(name: str) -> str | None:
    module, _ = load(name)
    return getattr(module, "__version__", "?") if module is not None else None


def bitsandbytes() -> tuple[ModuleType | None, str]:
    return load("bitsandbytes")


def torchao() -> tuple[ModuleType | None, str]:
    return load("torchao")


def peft() -> tuple[ModuleType | None, str]:
    return load("peft")


def galore_torch() -> tuple[ModuleType | None, str]:
    return load("galore_torch")
