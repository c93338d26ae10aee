"""The one tolerance table of the test suite: (atol, rtol) per dtype and purpose.

Kernels whose arithmetic mirrors the reference operation for operation (quantization)
are compared exactly; accumulating kernels (GEMMs, reductions) use the rows below.
"""
from __future__ import annotations

import torch

# comparisons of an fp32-accumulating kernel against an fp32/fp64 reference
ACCUMULATE = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (1e-3, 1e-2),
    torch.bfloat16: (1e-2, 2e-2),
}

# rounding error of casting an fp32 result to the output dtype (half an ulp, relative)
CAST_RTOL = {
    torch.float32: 0.0,
    torch.float16: 2.0 ** -11,
    torch.bfloat16: 2.0 ** -8,
    torch.float64: 0.0,
}


def tol(dtype: torch.dtype) -> dict:
    atol, rtol = ACCUMULATE[dtype]
    return {"atol": atol, "rtol": rtol}


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    """Bit-for-bit equality (so -0.0 != 0.0), except that a NaN matches any NaN: the sign
    and payload of a NaN made by invalid arithmetic are the hardware's (x86 makes
    0xFFC00000, CUDA 0x7FFFFFFF), while where NaNs appear is the kernel's."""
    assert got.dtype == want.dtype and got.shape == want.shape, f"{what}: {got.dtype}{tuple(got.shape)} vs " \
                                                                f"{want.dtype}{tuple(want.shape)}"
    if got.is_floating_point():
        nan = torch.isnan(got)
        assert torch.equal(nan, torch.isnan(want)), f"{what}: NaNs at different places"
        got, want = got[~nan], want[~nan]
    assert torch.equal(got.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8)), f"{what}: bits differ"
