"""Drop-in layers over the fused ops."""
from .lora import LoRALinear, inject_lora
from .monarch import MonarchLinear

__all__ = ["LoRALinear", "MonarchLinear", "inject_lora"]
