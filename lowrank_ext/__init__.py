"""lowrank_ext: fused C++/CUDA kernels for low-rank and memory-efficient training.

Importing the package loads the compiled library (registering ``torch.ops.lowrank.*``)
and the fake/autograd registrations of every op family.
"""
from __future__ import annotations

import torch  # noqa: F401  (torch's libraries must be loaded before _C)

try:
    from . import _C
except ImportError as e:
    import glob as _glob
    import os as _os
    if not _glob.glob(_os.path.join(_os.path.dirname(__file__), "_C*")):
        raise ImportError("lowrank_ext's compiled module _C is not built: run `pip install --no-build-isolation -e .` "
                          "(or `make build`) with the torch you will use") from e
    raise ImportError(f"lowrank_ext's compiled module _C did not load ({e}); it may have been built against "
                      f"another torch than this one ({torch.__version__}): rebuild it") from e
# noqa below: importing registers the fakes; the modules are the user-facing helpers
from . import init, linalg, nn, ops, optim, quant, reference, sparse  # noqa: F401

__version__: str = _C.BUILD_INFO["version"]


def build_info() -> dict:
    """How the extension was built: version, torch version it was compiled against,
    whether CUDA kernels were compiled and for which archs, OpenMP, compilers."""
    info = dict(_C.BUILD_INFO)
    info["cuda_archs"] = [a for a in info["cuda_archs"].split(",") if a]
    info["torch_version_runtime"] = torch.__version__
    return info


__all__ = ["build_info", "init", "linalg", "nn", "ops", "optim", "quant", "reference", "sparse", "__version__"]
