"""Pure-PyTorch references for the quant family (never imports lowrank_ext._C).

They mirror csrc/quant/quant_math.h operation for operation in fp32, so the kernels
must match them exactly (the same q bytes and absmax), including stochastic rounding,
whose Philox stream is re-implemented here with int64 arithmetic.
"""
from __future__ import annotations

from typing import Sequence

import torch

_MASK32 = 0xFFFFFFFF
_PHILOX_MUL = (0xD2511F53, 0xCD9E8D57)
_PHILOX_WEYL = (0x9E3779B9, 0xBB67AE85)


def _mulhilo32(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    # a (int64 holding uint32) * b without overflowing int64: split b into 16-bit halves.
    p_lo = a * (b & 0xFFFF)            # < 2^48
    p_hi = a * (b >> 16)               # < 2^48
    mid = (p_lo >> 16) + p_hi          # a*b == mid * 2^16 + (p_lo & 0xFFFF)
    lo = ((mid & 0xFFFF) << 16) | (p_lo & 0xFFFF)
    hi = mid >> 16
    return hi, lo


def philox4x32_10_ref(counter: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
    """Philox4x32-10 over int64 tensors. counter: [..., 4] of uint32 values; returns [..., 4]."""
    c0, c1, c2, c3 = (counter[..., i].to(torch.int64) for i in range(4))
    k0, k1 = key[0] & _MASK32, key[1] & _MASK32
    for _ in range(10):
        hi0, lo0 = _mulhilo32(c0, _PHILOX_MUL[0])
        hi1, lo1 = _mulhilo32(c2, _PHILOX_MUL[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _PHILOX_WEYL[0]) & _MASK32
        k1 = (k1 + _PHILOX_WEYL[1]) & _MASK32
    return torch.stack([c0, c1, c2, c3], dim=-1)


def philox_random16_ref(seed: int, offset: int, index: torch.Tensor) -> torch.Tensor:
    """Each element's 16 random bits (int64): counter {index/8, offset}, 32-bit lane
    (index/2)%4 of the Philox output, its low half for even index, high half for odd."""
    seed &= (1 << 64) - 1
    offset &= (1 << 64) - 1
    index = index.to(torch.int64)
    group = index >> 3
    counter = torch.stack(
        [group & _MASK32, group >> 32, torch.full_like(group, offset & _MASK32),
         torch.full_like(group, offset >> 32)], dim=-1)
    bits = philox4x32_10_ref(counter, (seed & _MASK32, seed >> 32))
    lane = bits.gather(-1, ((index >> 1) & 3).unsqueeze(-1)).squeeze(-1)
    return (lane >> ((index & 1) * 16)) & 0xFFFF


def philox_uniform_ref(seed: int, offset: int, index: torch.Tensor) -> torch.Tensor:
    """The float32 draw in [0, 1) of each element index (16 random bits)."""
    return philox_random16_ref(seed, offset, index).to(torch.float32) * (1.0 / 65536.0)


def _blocks(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    flat = x.reshape(-1).to(torch.float32)
    nblocks = -(-flat.numel() // blocksize)
    pad = nblocks * blocksize - flat.numel()
    return torch.nn.functional.pad(flat, (0, pad)).view(nblocks, blocksize)


def quantize_blockwise_ref(x: torch.Tensor, code: torch.Tensor, blocksize: int = 256, bits: int = 8,
                           stochastic_rounding: bool = False, seed: int = 0,
                           offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    numel = x.numel()
    code = code.to(torch.float32)
    blocks = _blocks(x, blocksize)
    amax = blocks.abs().amax(dim=1) if blocks.numel() else blocks.new_zeros(blocks.shape[0])
    nonfinite = ~torch.isfinite(blocks).all(dim=1)
    absmax = torch.where(nonfinite, torch.full_like(amax, float("nan")), amax)
    v = torch.where(absmax[:, None] > 0, blocks / absmax[:, None], torch.zeros_like(blocks))
    v = v.reshape(-1)[:numel]
    return code_indices_ref(v, code, bits, stochastic_rounding, seed, offset), absmax


def code_indices_ref(v: torch.Tensor, code: torch.Tensor, bits: int, stochastic_rounding: bool = False,
                     seed: int = 0, offset: int = 0) -> torch.Tensor:
    """The code index of each normalised value of the flat ``v`` (element i draws from the
    Philox stream (seed, offset) at index i), as uint8: one per byte (8-bit) or packed two
    per byte, even elements in the low nibble (4-bit)."""
    numel = v.numel()
    code = code.to(torch.float32)
    if not stochastic_rounding:
        mids = (code[:-1] + code[1:]) * 0.5
        idx = torch.searchsorted(mids, v, right=False)       # number of midpoints < v
    else:
        n = code.numel()
        i = torch.searchsorted(code, v, right=True) - 1       # largest i with code[i] <= v
        inner = (i >= 0) & (i < n - 1)
        ic = i.clamp(0, n - 2)
        lo, hi = code[ic], code[ic + 1]
        u = philox_uniform_ref(seed, offset, torch.arange(numel, device=v.device))
        up = u * (hi - lo) < v - lo                          # up with probability (v - lo) / (hi - lo)
        idx = torch.where(inner, ic + up.to(ic.dtype), i.clamp(0, n - 1))
    idx = idx.to(torch.uint8)
    if bits == 4:
        if numel % 2:
            idx = torch.cat([idx, idx.new_zeros(1)])
        idx = idx[0::2] | (idx[1::2] << 4)
    return idx


def dequantize_blockwise_ref(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int = 256,
                             bits: int = 8, shape: Sequence[int] = (), dtype: torch.dtype = torch.float32
                             ) -> torch.Tensor:
    numel = 1
    for s in shape:
        numel *= int(s)
    idx = q.to(torch.int64)
    if bits == 4:
        idx = torch.stack([idx & 0xF, idx >> 4], dim=-1).reshape(-1)
    idx = idx[:numel]
    nblocks = absmax.numel()
    pad = nblocks * blocksize - numel
    vals = torch.nn.functional.pad(code.to(torch.float32)[idx], (0, pad)).view(nblocks, blocksize)
    out = (vals * absmax.to(torch.float32)[:, None]).reshape(-1)[:numel]
    return out.to(dtype).reshape(tuple(int(s) for s in shape))
