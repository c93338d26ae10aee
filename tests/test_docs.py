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


def test_quant_module_example_runs():
    import lowrank_ext.quant as quant

    example = quant.__doc__.split("Example::", 1)[1]
    code = "\n".join(line[4:] for line in example.splitlines())
    exec(compile(code, "lowrank_ext.quant docstring", "exec"), {})


@pytest.mark.parametrize("module", ["lowrank_ext.ops.monarch", "lowrank_ext.ops.sparse", "lowrank_ext.ops.svd",
                                    "lowrank_ext.init", "lowrank_ext.linalg"])
def test_module_doctests_pass(module):
    import doctest
    import importlib

    import torch

    torch.manual_seed(0)
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0, result
