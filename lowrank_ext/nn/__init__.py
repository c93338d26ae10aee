"""Drop-in layers over the fused ops."""
from .lora import LoRALinear, inject_lora
from .monarch import MonarchLinear
from .sparse import SLTrainLinear, SparseAdapterLinear, choose_support

__all__ = ["LoRALinear", "MonarchLinear", "SLTrainLinear", "SparseAdapterLinear", "choose_support", "inject_lora"]
