"""Drop-in layers over the fused ops."""
from .lora import LoRALinear, inject_lora
from .monarch import MonarchLinear
from .multilora import MultiLoRALinear
from .sparse import SLTrainLinear, SparseAdapterLinear, choose_support

__all__ = ["LoRALinear", "MonarchLinear", "MultiLoRALinear", "SLTrainLinear", "SparseAdapterLinear", "choose_support",
           "inject_lora"]
