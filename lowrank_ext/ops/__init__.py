"""Public functions over ``torch.ops.lowrank.*``, one module per op family. Each module
also holds its ops' fake (meta) and autograd registrations."""
from . import quant

__all__ = ["quant"]
