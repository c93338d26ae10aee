"""Quantization codes and a small user-facing API over the block-wise quantization ops.

Codes are sorted float32 tensors of ``2**bits`` entries, spanning about [-1, 1] (signed; the
signed linear code reaches -2^(b-1) / (2^(b-1) - 1): -128/127 at 8 bits, -8/7 at 4) or [0, 1] (unsigned); a value ``x`` in a block with absolute maximum ``absmax`` is stored as the
index of the code entry nearest to ``x / absmax`` (the boundary between two entries is their
fp32-rounded midpoint, and a tie goes to the lower entry, so a value within an ulp of a
midpoint may go to the farther entry, by at most that ulp). Any sorted user code is accepted.

Example::

    import torch, lowrank_ext
    from lowrank_ext import quant
    x = torch.randn(10_000)
    qt = quant.quantize(x, bits=8, blocksize=256)           # dynamic signed code
    y = qt.dequantize()
    assert (x - y).abs().max() <= 0.02 * x.abs().max()
    print(qt.nbytes, "bytes instead of", x.numel() * 4)
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .ops.quant import dequantize_blockwise, packed_numel, quantize_blockwise

__all__ = ["dynamic_code", "linear_code", "log_code", "get_code", "QuantizedTensor", "quantize", "dequantize"]


@functools.lru_cache(maxsize=None)
def _dynamic_code_cpu(bits: int, signed: bool) -> torch.Tensor:
    # Dynamic (dynamic tree) code, Dettmers et al. 2022: after the sign bit (signed codes),
    # e leading zero bits pick the decade 10^-e, a one bit ends them, and the remaining
    # bits are a linear fraction in (0.1, 1]. Small magnitudes get precision where Adam's
    # moments live, large ones keep range. Signed codes get one spare entry, the next
    # decade down (+10^-(bits-1)), to fill 2^bits.
    magnitude_bits = bits - 1 if signed else bits
    mags = []
    for e in range(magnitude_bits):
        steps = 2 ** (magnitude_bits - 1 - e)
        frac = 0.1 + 0.9 * torch.arange(1, steps + 1, dtype=torch.float64) / steps
        mags.append(frac * 10.0 ** (-e))
    mags = torch.cat(mags)
    if signed:
        values = torch.cat([-mags, torch.zeros(1, dtype=torch.float64), mags,
                            torch.tensor([10.0 ** (-magnitude_bits)], dtype=torch.float64)])
    else:
        values = torch.cat([torch.zeros(1, dtype=torch.float64), mags])
    values = values.sort().values.to(torch.float32)
    assert values.numel() == 2 ** bits and bool((values[1:] > values[:-1]).all())
    return values


@functools.lru_cache(maxsize=None)
def _linear_code_cpu(bits: int, signed: bool, zero: bool = True) -> torch.Tensor:
    if signed:  # int8-style symmetric: k / (2^(bits-1) - 1), k in [-2^(bits-1), 2^(bits-1) - 1]
        half = 2 ** (bits - 1)
        return (torch.arange(-half, half, dtype=torch.float64) / (half - 1)).to(torch.float32)
    if not zero:
        return (torch.arange(1, 2 ** bits + 1, dtype=torch.float64) / 2 ** bits).to(torch.float32)
    return torch.linspace(0.0, 1.0, 2 ** bits, dtype=torch.float64).to(torch.float32)


def _check_bits(bits: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 8 or 4, got {bits}")


def dynamic_code(bits: int = 8, signed: bool = True, device: torch.device | str | None = None) -> torch.Tensor:
    """The dynamic code: 256 (bits=8) or 16 (bits=4) sorted float32 entries, including 0
    and 1.0. Signed for Adam's first moment, unsigned for the second. A new tensor each call."""
    _check_bits(bits)
    return _dynamic_code_cpu(bits, signed).to(device=device, copy=True)


def linear_code(bits: int = 8, signed: bool = True, zero: bool = True,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Evenly spaced code: signed is k/127 for k in [-128, 127] (8-bit; k/7 for 4-bit),
    unsigned is linspace(0, 1, 2**bits), or with ``zero=False`` (unsigned only) (k + 1) / 2**bits
    for k in [0, 2**bits): the linear mapping without zero of Li et al. (2023) for a rank-1
    normalised second moment, which is never rounded to 0."""
    _check_bits(bits)
    if signed and not zero:
        raise ValueError("zero=False is for the unsigned linear code (a signed code is symmetric about 0)")
    return _linear_code_cpu(bits, signed, zero).to(device=device, copy=True)


@functools.lru_cache(maxsize=None)
def _log_code_cpu(bits: int, decades: float, zero: bool) -> torch.Tensor:
    mags = torch.logspace(-decades, 0.0, 2 ** bits - (1 if zero else 0), dtype=torch.float64)
    if zero:
        mags = torch.cat([torch.zeros(1, dtype=torch.float64), mags])
    return mags.to(torch.float32)


def log_code(bits: int = 8, decades: float = 8.0, zero: bool = True,
             device: torch.device | str | None = None) -> torch.Tensor:
    """Unsigned code of log-spaced entries from ``10**-decades`` to 1 (and 0 first when
    ``zero``): the same relative precision at every magnitude. Made for Adam's second
    moment, whose entries span many decades within a block and enter the update through a
    square root. Without 0 (``zero=False``), no second moment is ever rounded to zero,
    which would turn its update into m / eps."""
    _check_bits(bits)
    if not (decades > 0 and math.isfinite(decades)):
        raise ValueError(f"decades must be finite and > 0, got {decades}")
    code = _log_code_cpu(bits, float(decades), bool(zero))
    if not zero and not bool((code > 0).all()):  # 10**-decades below fp32's smallest value
        raise ValueError(f"decades={decades} reaches below fp32's range: the code would hold 0")
    return code.to(device=device, copy=True)


def get_code(code: str | torch.Tensor, bits: int, signed: bool = True,
             device: torch.device | str | None = None) -> torch.Tensor:
    """Resolve ``"dynamic"``, ``"linear"`` or a user tensor (checked: float32-able, 2**bits
    entries, finite, ascending) into a float32 code on ``device``."""
    if isinstance(code, str):
        if code == "dynamic":
            return dynamic_code(bits, signed, device)
        if code == "linear":
            return linear_code(bits, signed, device=device)
        raise ValueError(f"unknown code {code!r}: expected 'dynamic', 'linear' or a tensor")
    _check_bits(bits)
    code = torch.as_tensor(code, dtype=torch.float32, device=device)
    if code.dim() != 1 or code.numel() != 2 ** bits:
        raise ValueError(f"a {bits}-bit code needs {2 ** bits} entries in a 1-D tensor, got shape {tuple(code.shape)}")
    if not bool(torch.isfinite(code).all()) or not bool((code[1:] >= code[:-1]).all()):
        raise ValueError("code entries must be finite and sorted ascending")
    return code.clone()  # the caller's tensor, written later, must not change what was quantized


@dataclass
class QuantizedTensor:
    """A block-wise quantized tensor: ``q`` (uint8 indices), ``absmax`` per block, the code."""
    q: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    bits: int
    shape: torch.Size
    dtype: torch.dtype

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_blockwise(self.q, self.absmax, self.code, self.blocksize, self.bits,
                                    self.shape, dtype or self.dtype)

    @property
    def nbytes(self) -> int:
        """Storage of q and absmax (the code is shared and not counted)."""
        return self.q.numel() + 4 * self.absmax.numel()

    @property
    def device(self) -> torch.device:
        return self.q.device

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "QuantizedTensor":
        """The same quantized values on ``device`` (q, absmax and the code move; nothing is
        re-quantized). The dequantized dtype is chosen by :meth:`dequantize`."""
        if isinstance(device, torch.dtype):
            raise TypeError(f"QuantizedTensor.to takes a device; the dtype ({device}) is dequantize(dtype)'s")
        move = lambda t: t.to(device=device, non_blocking=non_blocking)  # noqa: E731
        return QuantizedTensor(move(self.q), move(self.absmax), move(self.code), self.blocksize, self.bits,
                               self.shape, self.dtype)


# torch.load's default (weights_only=True) unpickles only allow-listed classes; a
# QuantizedTensor holds tensors, ints, a Size and a dtype, and building one runs no user code
torch.serialization.add_safe_globals([QuantizedTensor])


def quantize(x: torch.Tensor, bits: int = 8, blocksize: int | None = None, code: str | torch.Tensor = "dynamic",
             signed: bool = True, stochastic_rounding: bool = False, seed: int | None = None,
             offset: int = 0) -> QuantizedTensor:
    """Quantize ``x`` block-wise. ``blocksize`` defaults to 256 for 8-bit and 128 for 4-bit.

    With ``stochastic_rounding`` and no ``seed``, a seed is drawn from torch's default
    generator, so repeated calls round independently (a fixed seed would give every call
    the same draws, and re-quantizing a slowly changing tensor would then be biased).
    """
    _check_bits(bits)
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item()) if stochastic_rounding else 0
    blocksize = (256 if bits == 8 else 128) if blocksize is None else blocksize
    code_t = get_code(code, bits, signed, x.device)
    q, absmax = quantize_blockwise(x, code_t, blocksize, bits, stochastic_rounding, seed, offset)
    return QuantizedTensor(q, absmax, code_t, blocksize, bits, x.shape, x.dtype)


def dequantize(qt: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Inverse of :func:`quantize` (up to the quantization error)."""
    return qt.dequantize(dtype)
