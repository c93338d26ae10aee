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


def _adamw_tensors(device: str, dtype: torch.dtype, shapes) -> tuple[list, list]:
    params = [torch.randn(s, device=device).to(dtype) for s in shapes]
    grads = [torch.randn(s, device=device).to(dtype) for s in shapes]
    return params, grads


ADAMW_HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)


def adamw_step_quantized_samples(device: str) -> Iterator[Sample]:
    # (bits, blocksize_exp_avg, blocksize_exp_avg_sq, param dtype, shapes)
    for bits, bs_m, bs_v, dtype, shapes in ((8, 256, 2048, torch.float32, [(1000,), (3, 129), (1,)]),
                                           (4, 128, 256, torch.bfloat16, [(777,), (64, 2)]),
                                           (8, 128, 128, torch.float16, [(257,)])):
        params, grads = _adamw_tensors(device, dtype, shapes)
        code_m = quant.dynamic_code(bits, signed=True, device=device)
        code_v = quant.dynamic_code(bits, signed=False, device=device)
        m_q, m_a, v_q, v_a = [], [], [], []
        for p in params:
            mq, ma = quantize_blockwise_ref(torch.randn(p.numel()) * 0.1, code_m.cpu(), bs_m, bits)
            vq, va = quantize_blockwise_ref(torch.rand(p.numel()) * 0.01, code_v.cpu(), bs_v, bits)
            for lst, t in ((m_q, mq), (m_a, ma), (v_q, vq), (v_a, va)):
                lst.append(t.to(device))
        for step, sr in ((1, False), (7, dtype == torch.bfloat16)):
            yield Sample((params, grads, m_q, m_a, v_q, v_a, code_m, code_v, *ADAMW_HYPER.values(), step, bits,
                          bs_m, bs_v, sr, 3, step > 1, step > 1), name=f"{bits}b-{dtype}-step{step}")


def adamw_step_fp32_samples(device: str) -> Iterator[Sample]:
    for dtype in FLOAT_DTYPES:
        params, grads = _adamw_tensors(device, dtype, [(1000,), (3, 129), (1,)])
        m = [torch.randn(p.shape, device=device) * 0.1 for p in params]
        v = [torch.rand(p.shape, device=device) * 0.01 for p in params]
        yield Sample((params, grads, m, v, *ADAMW_HYPER.values(), 2, dtype == torch.bfloat16, 5), name=f"{dtype}")


SAMPLES: dict[str, Callable[[str], Iterator[Sample]]] = {
    "lowrank::quantize_blockwise": quantize_blockwise_samples,
    "lowrank::dequantize_blockwise": dequantize_blockwise_samples,
    "lowrank::adamw_step_quantized_": adamw_step_quantized_samples,
    "lowrank::adamw_step_fp32_": adamw_step_fp32_samples,
}
