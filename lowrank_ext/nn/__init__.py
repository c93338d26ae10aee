"""Drop-in layers over the fused ops."""
from .lora import LoRALinear, inject_lora

__all__ = ["LoRALinear", "inject_lora"]
