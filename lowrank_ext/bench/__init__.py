"""Microbenchmarks: ``python -m lowrank_ext.bench [family ...]`` (see benchmarks/README.md).

Each family lives in its own module exposing ``FAMILY`` (a :class:`harness.Family`);
modules are imported lazily so that one family's optional peers never slow down or break
another's run. To add a family: write ``bench/<name>.py`` and add one line below.
"""
from __future__ import annotations

import importlib

from .harness import Case, Family, Provider, RunConfig, SkipProvider, Timed

# family name -> module defining FAMILY
FAMILIES: dict[str, str] = {
    "quant": "lowrank_ext.bench.quant",
    "optim": "lowrank_ext.bench.optim",
    "lora": "lowrank_ext.bench.lora",
    "multilora": "lowrank_ext.bench.multilora",
    "monarch": "lowrank_ext.bench.monarch",
    "sparse": "lowrank_ext.bench.sparse",
    "svd": "lowrank_ext.bench.svd",
    "galore": "lowrank_ext.bench.galore",
}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise KeyError(f"unknown benchmark family {name!r}; known: {', '.join(FAMILIES)}")
    return importlib.import_module(FAMILIES[name]).FAMILY


__all__ = ["FAMILIES", "get_family", "Case", "Family", "Provider", "RunConfig",
           "SkipProvider", "Timed"]
