"""Block-wise quantization ops: ``torch.ops.lowrank.quantize_blockwise`` and
``torch.ops.lowrank.dequantize_blockwise``, with their fake (meta) registrations.

Neither op is differentiable (q is an integer code index), so no autograd formula is
registered; use them on optimizer state, buffers and checkpoints. Codes come from
:mod:`lowrank_ext.quant`.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["quantize_blockwise", "dequantize_blockwise", "packed_numel"]


def packed_numel(numel: int, bits: int) -> int:
    """Bytes of ``q`` for ``numel`` values: one per value (8-bit) or one per two (4-bit)."""
    return numel if bits == 8 else (numel + 1) // 2


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int = 256, bits: int = 8,
                       stochastic_rounding: bool = False, seed: int = 0,
                       offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` block by block with a sorted code of ``2**bits`` float32 entries.

    Args:
        x: any shape, float32/float16/bfloat16 (non-contiguous input is copied once).
        code: float32 ``[2**bits]``, ascending, on ``x``'s device.
        blocksize: power of two in [64, 4096]; the last block may be partial.
        bits: 8 (one value per byte) or 4 (two per byte, even element in the low nibble).
        stochastic_rounding: round to one of the two neighbouring code entries with
            probability given by the distance (unbiased); the draw is Philox from
            ``(seed, offset, element index)``, the same on CPU and CUDA.

    Returns:
        ``q``: uint8 ``[packed_numel(x.numel(), bits)]``; ``absmax``: float32
        ``[ceil(x.numel() / blocksize)]``. A block holding a NaN or an infinity gets
        ``absmax = NaN`` and dequantizes to NaN; an all-zero block dequantizes to zeros.
    """
    return torch.ops.lowrank.quantize_blockwise(x, code, blocksize, bits, stochastic_rounding, seed, offset)


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int = 256,
                         bits: int = 8, shape: Sequence[int] | None = None,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``code[q] * absmax`` per block, as a tensor of ``shape`` and ``dtype``.

    ``shape`` defaults to ``[q.numel()]`` for 8-bit; 4-bit needs it (a byte holds two
    values, so q alone does not say whether the count is odd).
    """
    if shape is None:
        if bits != 8:
            raise ValueError("dequantize_blockwise: pass `shape` for 4-bit data (q's size does not fix the count)")
        shape = [q.numel()]
    return torch.ops.lowrank.dequantize_blockwise(q, absmax, code, blocksize, bits, list(shape), dtype)


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_code(code: torch.Tensor, bits: int) -> None:
    torch._check(code.dtype == torch.float32 and code.dim() == 1 and code.numel() == 2 ** bits,
                 lambda: f"code must be a 1-D float32 tensor of 2^bits = {2 ** bits} entries")


def _check_static_args(blocksize: int, bits: int) -> None:
    torch._check(bits in (4, 8), lambda: f"bits must be 8 or 4, got {bits}")
    torch._check(64 <= blocksize <= 4096 and blocksize & (blocksize - 1) == 0,
                 lambda: f"blocksize must be a power of two in [64, 4096], got {blocksize}")


@torch.library.register_fake("lowrank::quantize_blockwise")
def _quantize_blockwise_fake(x, code, blocksize, bits, stochastic_rounding=False, seed=0, offset=0):
    _check_static_args(blocksize, bits)
    torch._check(x.dtype in _FLOAT_DTYPES, lambda: f"x must be float32, float16 or bfloat16, got {x.dtype}")
    _check_code(code, bits)
    torch._check(code.device == x.device, lambda: f"code is on {code.device} but x is on {x.device}; "
                 "all tensors must be on one device")
    numel = x.numel()
    q = x.new_empty([packed_numel(numel, bits)], dtype=torch.uint8)
    absmax = x.new_empty([(numel + blocksize - 1) // blocksize], dtype=torch.float32)
    return q, absmax


@torch.library.register_fake("lowrank::dequantize_blockwise")
def _dequantize_blockwise_fake(q, absmax, code, blocksize, bits, shape, dtype):
    _check_static_args(blocksize, bits)
    torch._check(dtype in _FLOAT_DTYPES, lambda: f"dtype must be float32, float16 or bfloat16, got {dtype}")
    torch._check(q.dtype == torch.uint8 and absmax.dtype == torch.float32,
                 lambda: f"q must be uint8 and absmax float32, got {q.dtype} and {absmax.dtype}")
    _check_code(code, bits)
    torch._check(absmax.device == q.device and code.device == q.device,
                 lambda: "q, absmax and code must be on one device")
    return q.new_empty(shape, dtype=dtype)
