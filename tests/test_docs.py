"""The README's Python examples and the module docstring examples must run as written."""
from __future__ import annotations

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_blocks(path: str) -> list[str]:
    with open(path) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


@pytest.mark.parametrize("i,block", list(enumerate(_python_blocks(os.path.join(ROOT, "README.md")))))
def test_readme_example_runs(i, block):
    exec(compile(block, f"README.md example {i}", "exec"), {})


def _examples() -> list[tuple[str, str, str]]:
    """(where, module, code) of every "Example::" block in the public modules' and classes' docstrings
    (the block runs to the docstring's end), run in the module's namespace."""
    import importlib
    import inspect
    import textwrap

    found = []
    for name in ["lowrank_ext.quant", "lowrank_ext.sparse", "lowrank_ext.nn.lora", "lowrank_ext.nn.monarch",
                 "lowrank_ext.nn.multilora", "lowrank_ext.nn.sparse", "lowrank_ext.optim.adamw",
                 "lowrank_ext.optim.galore"]:
        module = importlib.import_module(name)
        objs = [(name, module)] + [(f"{name}.{n}", c) for n, c in vars(module).items()
                                   if inspect.isclass(c) and c.__module__ == name]
        found += [(where, name, textwrap.dedent(o.__doc__.split("Example::", 1)[1]))
                  for where, o in objs if "Example::" in (o.__doc__ or "")]
    return found


@pytest.mark.parametrize("where,module,code", _examples(), ids=[w for w, _, _ in _examples()])
def test_docstring_example_runs(where, module, code):
    import importlib

    exec(compile(code, f"{where} docstring", "exec"), dict(vars(importlib.import_module(module))))


@pytest.mark.parametrize("module", ["lowrank_ext.ops.monarch", "lowrank_ext.ops.sparse", "lowrank_ext.ops.svd",
                                    "lowrank_ext.init", "lowrank_ext.linalg"])
def test_module_doctests_pass(module):
    import doctest
    import importlib

    import torch

    torch.manual_seed(0)
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0, result
