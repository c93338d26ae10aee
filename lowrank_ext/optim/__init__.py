"""Optimizers over the fused kernels: drop-in replacements for torch.optim classes."""
from .adamw import AdamW4bit, AdamW8bit, state_bytes_per_param
from .galore import GaLoreAdamW

__all__ = ["AdamW8bit", "AdamW4bit", "GaLoreAdamW", "state_bytes_per_param"]
