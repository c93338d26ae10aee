"""Sample inputs per op: odd sizes (not multiples of the block), size 1, empty, rank-1
and non-contiguous tensors, every dtype an op accepts. Used by the opcheck test, the
registry test and the reference tests."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from lowrank_ext import quant
from lowrank_ext.reference.quant import quantize_blockwise_ref


@dataclass
class Sample:
    args: tuple
    kwargs: dict = field(default_factory=dict)
    name: str = ""


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _noncontiguous(n: int, dtype, device) -> torch.Tensor:
    return torch.randn(n, 3, dtype=dtype, device=device)[:, 1]  # stride 3


def quantize_blockwise_samples(device: str) -> Iterator[Sample]:
    for bits, blocksize in ((8, 256), (8, 64), (4, 128), (8, 4096), (4, 64)):
        code = quant.dynamic_code(bits, device=device)
        for dtype in FLOAT_DTYPES:
            for shape in ((1,), (1000,), (7, 33), (3, 5, 129)):
                x = torch.randn(shape, dtype=dtype, device=device)
                yield Sample((x, code, blocksize, bits), name=f"{bits}b-bs{blocksize}-{dtype}-{shape}")
        yield Sample((_noncontiguous(301, torch.float32, device), code, blocksize, bits), name=f"{bits}b-noncontig")
        yield Sample((torch.randn(777, device=device), code, blocksize, bits, True, 1234, 5), name=f"{bits}b-stochastic")
        yield Sample((torch.empty(0, device=device), code, blocksize, bits), name=f"{bits}b-empty")


def dequantize_blockwise_samples(device: str) -> Iterator[Sample]:
    for s in quantize_blockwise_samples(device):
        x, code, blocksize, bits = s.args[:4]
        q, absmax = quantize_blockwise_ref(x.cpu(), code.cpu(), blocksize, bits)
        q, absmax = q.to(device), absmax.to(device)
        for dtype in (x.dtype, torch.float32):
            yield Sample((q, absmax, code, blocksize, bits, list(x.shape), dtype), name=f"{s.name}->{dtype}")


SAMPLES: dict[str, Callable[[str], Iterator[Sample]]] = {
    "lowrank::quantize_blockwise": quantize_blockwise_samples,
    "lowrank::dequantize_blockwise": dequantize_blockwise_samples,
}
