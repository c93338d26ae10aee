"""Public functions over ``torch.ops.lowrank.*``, one module per op family. Each module
also holds its ops' fake (meta) and autograd registrations."""
from . import optim, quant

__all__ = ["optim", "quant"]
