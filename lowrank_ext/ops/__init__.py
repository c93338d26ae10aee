"""Public functions over ``torch.ops.lowrank.*``, one module per op family. Each module
also holds its ops' fake (meta) and autograd registrations."""
from . import galore, lora, monarch, multilora, optim, quant, sparse, svd

# Ops whose CUDA kernels are not written yet: they have no CUDA registration (a CUDA call
# raises the dispatcher's "no kernel for CUDA" error), and the README's op table says so.
# tests/test_registry.py checks this set both ways.
CPU_ONLY_OPS: frozenset[str] = frozenset()

__all__ = ["CPU_ONLY_OPS", "galore", "lora", "monarch", "multilora", "optim", "quant", "sparse", "svd"]
