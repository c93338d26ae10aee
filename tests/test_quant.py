"""Block-wise quantization: kernels against the pure-PyTorch reference (exact), error
bounds (hypothesis), non-finite inputs, stochastic rounding, codes, and every input check."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowrank_ext
from lowrank_ext import quant
from lowrank_ext.ops.quant import dequantize_blockwise, packed_numel, quantize_blockwise
from lowrank_ext.reference.quant import (dequantize_blockwise_ref, philox4x32_10_ref, philox_uniform_ref,
                                         quantize_blockwise_ref)
from samples import FLOAT_DTYPES
from tolerances import CAST_RTOL

BITS_BLOCKSIZES = [(8, 64), (8, 256), (8, 2048), (8, 4096), (4, 64), (4, 128), (4, 1024)]


def _roundtrip(x, code, blocksize, bits, **kw):
    q, absmax = quantize_blockwise(x, code, blocksize, bits, **kw)
    return q, absmax, dequantize_blockwise(q, absmax, code, blocksize, bits, x.shape, x.dtype)


# ---- equality with the reference ----

@pytest.mark.parametrize("bits,blocksize", BITS_BLOCKSIZES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("numel", [1, 63, 66, 1000, 1002, 4097, 12_345])
def test_matches_reference(device, cpu_table_search, bits, blocksize, dtype, numel):
    x = (torch.randn(numel) * 3).to(dtype).to(device)
    code = quant.dynamic_code(bits, device=device)
    q, absmax, y = _roundtrip(x, code, blocksize, bits)
    q_ref, absmax_ref = quantize_blockwise_ref(x.cpu(), code.cpu(), blocksize, bits)
    assert q.shape == (packed_numel(numel, bits),) and absmax.shape == (math.ceil(numel / blocksize),)
    torch.testing.assert_close(absmax.cpu(), absmax_ref, rtol=0, atol=0)
    assert torch.equal(q.cpu(), q_ref)
    y_ref = dequantize_blockwise_ref(q_ref, absmax_ref, code.cpu(), blocksize, bits, x.shape, dtype)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y.cpu(), y_ref)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_of_unaligned_q_matches_reference(device, bits, dtype):
    # q one byte into its storage: CUDA's vectorized dequantize needs 16-byte-aligned q and
    # output and hands this one to its scalar kernel; both paths give the reference's bits
    x = torch.randn(3001) * 2
    code = quant.dynamic_code(bits)
    q_ref, absmax_ref = quantize_blockwise_ref(x, code, 128, bits)
    buf = torch.zeros(q_ref.numel() + 1, dtype=torch.uint8, device=device)
    buf[1:].copy_(q_ref)
    want = dequantize_blockwise_ref(q_ref, absmax_ref, code, 128, bits, x.shape, dtype)
    for q in (buf[1:], buf[1:].clone()):  # unaligned, then aligned (a fresh tensor)
        y = dequantize_blockwise(q, absmax_ref.to(device), code.to(device), 128, bits, shape=x.shape, dtype=dtype)
        assert torch.equal(y.cpu(), want)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("code_kind", ["dynamic", "linear"])
@pytest.mark.parametrize("signed", [True, False])
def test_codes_match_reference(device, cpu_table_search, bits, code_kind, signed):
    code = quant.get_code(code_kind, bits, signed, device)
    x = torch.randn(5000, device=device)
    x = x if signed else x.abs()
    q, absmax = quantize_blockwise(x, code, 256, bits)
    q_ref, absmax_ref = quantize_blockwise_ref(x.cpu(), code.cpu(), 256, bits)
    assert torch.equal(q.cpu(), q_ref) and torch.equal(absmax.cpu(), absmax_ref)


def test_user_code_with_clustered_entries_matches_reference():
    # entries closer together than the CPU search table's buckets exercise its wide path
    dense = torch.tensor([0.5001, 0.5002, 0.5003, 0.50031, 0.50032, 0.50033])
    code = torch.cat([torch.linspace(-1, 1, 250), dense]).sort().values
    x = torch.rand(20_000) * 0.002 + 0.4995
    q, absmax = quantize_blockwise(x, code, 256, 8)
    q_ref, absmax_ref = quantize_blockwise_ref(x, code, 256, 8)
    assert torch.equal(q, q_ref) and torch.equal(absmax, absmax_ref)


@pytest.mark.parametrize("bits", [4, 8])
def test_signed_zeros_and_zero_midpoints_match_reference(device, cpu_table_search, bits):
    # a midpoint of exactly +-0 (from symmetric or duplicated -0.0 entries) and inputs of
    # -0.0 / +0.0 / tiny values: the kernels compare integer keys, the reference floats
    n = 2**bits
    half = torch.linspace(0.2, 1.0, n // 2 - 1)
    dup_neg_zero = torch.cat([-half.flip(0), torch.tensor([-0.0, -0.0]), half])
    symmetric = torch.linspace(-1.0, 1.0, n)
    x = torch.tensor([1.0, -0.0, 0.0, 1e-9, -1e-9, 1e-30, -1e-30, 0.5, -0.5] * 8)
    for code in (dup_neg_zero, symmetric):
        code = code.to(device)
        q, absmax = quantize_blockwise(x.to(device), code, 64, bits)
        q_ref, absmax_ref = quantize_blockwise_ref(x, code.cpu(), 64, bits)
        assert torch.equal(q.cpu(), q_ref) and torch.equal(absmax.cpu(), absmax_ref)


def test_ties_go_to_the_lower_entry(device, cpu_table_search):
    code = quant.linear_code(8, signed=False)
    mid = float((code[10] + code[11]) * 0.5)
    x = torch.tensor([1.0] + [mid] * 63)  # absmax 1, so v is exactly the midpoint
    q, _ = quantize_blockwise(x.to(device), code.to(device), 64, 8)
    assert q[1:].eq(10).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_values_on_and_next_to_every_midpoint(device, cpu_table_search, bits):
    # every midpoint, and the floats just below and above it, against the reference
    code = quant.dynamic_code(bits)
    mids = (code[:-1] + code[1:]) * 0.5
    x = torch.cat([mids, torch.nextafter(mids, torch.tensor(-2.0)), torch.nextafter(mids, torch.tensor(2.0))])
    x = torch.cat([torch.tensor([1.0]), x.clamp(-1, 1)])  # absmax exactly 1: v == x
    q, absmax = quantize_blockwise(x.to(device), code.to(device), 4096, bits)
    q_ref, absmax_ref = quantize_blockwise_ref(x, code, 4096, bits)
    assert torch.equal(q.cpu(), q_ref) and torch.equal(absmax.cpu(), absmax_ref)


def test_noncontiguous_and_shapes(device):
    base = torch.randn(64, 70, device=device)
    x = base.t()[3:, :]  # non-contiguous
    code = quant.dynamic_code(8, device=device)
    q, absmax, y = _roundtrip(x, code, 128, 8)
    q_ref, absmax_ref = quantize_blockwise_ref(x.contiguous().cpu(), code.cpu(), 128, 8)
    assert torch.equal(q.cpu(), q_ref) and torch.equal(absmax.cpu(), absmax_ref)
    assert y.shape == x.shape and y.is_contiguous()


def test_empty(device):
    code = quant.dynamic_code(8, device=device)
    q, absmax, y = _roundtrip(torch.empty(0, 5, device=device), code, 256, 8)
    assert q.numel() == 0 and absmax.numel() == 0 and y.shape == (0, 5)


# ---- error bounds (property) ----

def _largest_half_gap(code: torch.Tensor) -> float:
    return float((code[1:] - code[:-1]).max()) / 2


@settings(max_examples=60, deadline=None)
@given(numel=st.integers(1, 3000), bits_bs=st.sampled_from(BITS_BLOCKSIZES), scale=st.floats(1e-6, 1e6),
       signed=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_roundtrip_error_bound(numel, bits_bs, scale, signed, seed):
    bits, blocksize = bits_bs
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=g) * scale
    x = x if signed else x.abs()
    code = quant.dynamic_code(bits, signed)
    _, absmax, y = _roundtrip(x, code, blocksize, bits)
    bound = _largest_half_gap(code)
    nblocks = absmax.numel()
    pad = nblocks * blocksize - numel
    err = torch.nn.functional.pad((x - y).abs(), (0, pad)).view(nblocks, blocksize).amax(dim=1)
    # half the largest code gap of the block's scale, plus fp32 rounding of code * absmax
    assert bool((err <= absmax * (bound + 1e-6)).all()), (err / absmax).max()


@settings(max_examples=30, deadline=None)
@given(numel=st.integers(1, 2000), bits_bs=st.sampled_from(BITS_BLOCKSIZES), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float16, torch.bfloat16]))
def test_roundtrip_error_bound_half_dtypes(numel, bits_bs, seed, dtype):
    bits, blocksize = bits_bs
    x = torch.randn(numel, generator=torch.Generator().manual_seed(seed)).to(dtype)
    code = quant.dynamic_code(bits)
    _, absmax, y = _roundtrip(x, code, blocksize, bits)
    per_elem_absmax = absmax.repeat_interleave(blocksize)[:numel]
    bound = per_elem_absmax * (_largest_half_gap(code) + 1e-6) + y.float().abs() * CAST_RTOL[dtype]
    assert bool(((x.float() - y.float()).abs() <= bound).all())


# ---- non-finite and degenerate blocks (documented behaviour) ----

def test_nonfinite_blocks_become_nan_and_others_are_untouched(device, cpu_table_search):
    code = quant.dynamic_code(8, device=device)
    x = torch.randn(64 * 5, device=device)
    x[3] = float("nan")            # block 0
    x[64 + 7] = float("inf")       # block 1
    x[128 + 9] = float("-inf")     # block 2
    x[192:256] = 0.0               # block 3: all zeros
    q, absmax, y = _roundtrip(x, code, 64, 8)
    assert absmax[:3].isnan().all()
    assert y[:192].isnan().all(), "a block with a non-finite value dequantizes to NaN everywhere"
    assert absmax[3] == 0 and y[192:256].eq(0).all()
    assert torch.isfinite(y[256:]).all() and absmax[4] == x[256:].abs().max()


def test_absmax_element_roundtrips_exactly(device):
    # the dynamic code holds +-1.0, so each block's extreme value comes back exactly
    code = quant.dynamic_code(8, device=device)
    x = torch.randn(4096, device=device)
    _, absmax, y = _roundtrip(x, code, 256, 8)
    blocks_x, blocks_y = x.view(-1, 256), y.view(-1, 256)
    i = blocks_x.abs().argmax(dim=1, keepdim=True)
    assert torch.equal(blocks_x.gather(1, i), blocks_y.gather(1, i))


# ---- stochastic rounding ----

def test_philox_known_answers():
    # Random123's published known-answer vectors for philox4x32-10
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for ctr, key, want in cases:
        got = philox4x32_10_ref(torch.tensor([ctr], dtype=torch.int64), key)[0].tolist()
        assert got == list(want)


@pytest.mark.parametrize("bits,blocksize", [(8, 256), (4, 64)])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_stochastic_matches_reference(device, cpu_table_search, bits, blocksize, dtype):
    x = torch.randn(3001).to(dtype).to(device)
    code = quant.dynamic_code(bits, device=device)
    for seed, offset in ((0, 0), (2**40 + 7, 3), (-1, 2**33)):
        q, absmax = quantize_blockwise(x, code, blocksize, bits, stochastic_rounding=True, seed=seed, offset=offset)
        q_ref, absmax_ref = quantize_blockwise_ref(x.cpu(), code.cpu(), blocksize, bits, True, seed, offset)
        assert torch.equal(q.cpu(), q_ref) and torch.equal(absmax.cpu(), absmax_ref)


@pytest.mark.parametrize("code_name", ["dynamic", "dynamic_unsigned", "log", "log_zero_free"])
def test_stochastic_on_and_next_to_every_code_entry(device, cpu_table_search, code_name):
    # every entry and its float neighbours, with stochastic rounding: values below the first
    # entry (negative values for the unsigned codes, v < 1e-3 for the zero-free log code) and
    # v == 1 at the last one take the clamped ends of the search
    bits = 8 if code_name != "log_zero_free" else 4
    code = {"dynamic": lambda: quant.dynamic_code(bits), "dynamic_unsigned": lambda: quant.dynamic_code(bits, False),
            "log": lambda: quant.log_code(bits), "log_zero_free": lambda: quant.log_code(bits, 3.0, zero=False)}[code_name]()
    x = torch.cat([code, torch.nextafter(code, torch.tensor(-2.0)), torch.nextafter(code, torch.tensor(2.0)),
                   torch.tensor([-1.0, -0.5, -1e-4, -0.0, 0.0, 1e-6, 1e-4])])
    x = torch.cat([torch.tensor([1.0]), x.clamp(-1, 1)])  # absmax exactly 1: v == x
    for seed in (0, 12345):
        q, absmax = quantize_blockwise(x.to(device), code.to(device), 4096, bits, stochastic_rounding=True, seed=seed)
        q_ref, absmax_ref = quantize_blockwise_ref(x, code, 4096, bits, True, seed, 0)
        assert torch.equal(q.cpu(), q_ref) and torch.equal(absmax.cpu(), absmax_ref)


def test_bad_table_search_variable(monkeypatch):
    monkeypatch.setenv("LOWRANK_CPU_TABLE_SEARCH", "fast")
    with pytest.raises(RuntimeError, match="LOWRANK_CPU_TABLE_SEARCH must be 'avx2' or 'portable'"):
        quantize_blockwise(torch.randn(64), quant.dynamic_code(8), 64, 8)


def test_stochastic_rounding_is_unbiased_and_seeded(device):
    code = quant.dynamic_code(4)  # coarse code: nearest rounding has a visible bias
    x = (torch.rand(64) * 0.9 + 0.05).to(device)
    x[0] = 1.0  # fix absmax at 1
    draws = torch.stack([quant.quantize(x, 4, 64, stochastic_rounding=True, seed=s).dequantize() for s in range(2000)])
    stderr = draws.std(dim=0) / math.sqrt(draws.shape[0])
    assert ((draws.mean(dim=0) - x).abs() <= 5 * stderr + 1e-6).all()
    nearest_bias = (quant.quantize(x, 4, 64).dequantize() - x).abs().mean()
    assert (draws.mean(dim=0) - x).abs().mean() < nearest_bias / 4
    a = quant.quantize(x, 4, 64, stochastic_rounding=True, seed=7).q
    assert torch.equal(a, quant.quantize(x, 4, 64, stochastic_rounding=True, seed=7).q)
    assert not torch.equal(a, quant.quantize(x, 4, 64, stochastic_rounding=True, seed=8).q)


def test_philox_uniform_range():
    u = philox_uniform_ref(3, 0, torch.arange(100_000))
    assert u.min() >= 0 and u.max() < 1 and abs(float(u.mean()) - 0.5) < 0.01


# ---- codes and the user-facing API ----

@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_code_properties(bits, signed):
    code = quant.dynamic_code(bits, signed)
    assert code.dtype == torch.float32 and code.numel() == 2**bits
    assert (code[1:] > code[:-1]).all() and code.max() == 1.0 and (code == 0).any()
    assert code.min() == (-1.0 if signed else 0.0)


def test_quantized_tensor_api():
    x = torch.randn(10, 100, dtype=torch.bfloat16)
    qt = quant.quantize(x, bits=4)
    assert qt.blocksize == 128 and qt.q.numel() == 500 and qt.nbytes == 500 + 4 * 8
    y = quant.dequantize(qt)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    assert qt.dequantize(torch.float32).dtype == torch.float32


def test_quantized_tensor_saves_loads_with_default_weights_only_and_moves(tmp_path):
    x = torch.randn(7, 300)
    qt = quant.quantize(x, bits=8, blocksize=256)
    want = dequantize_blockwise_ref(*quantize_blockwise_ref(x, quant.dynamic_code(8), 256, 8), quant.dynamic_code(8),
                                    256, 8, x.shape, x.dtype)
    torch.save({"m": qt}, tmp_path / "qt.pt")
    loaded = torch.load(tmp_path / "qt.pt")  # weights_only=True is torch's default
    assert isinstance(loaded["m"], quant.QuantizedTensor) and loaded["m"].shape == x.shape
    assert torch.equal(loaded["m"].dequantize(), want)
    moved = qt.to("meta")
    assert moved.device.type == "meta" and moved.q.device.type == "meta" and moved.code.device.type == "meta"
    assert qt.device.type == "cpu" and torch.equal(qt.to("cpu").dequantize(), want)


def test_compile_fullgraph():
    code = quant.dynamic_code(8)

    def roundtrip(x):
        q, absmax = torch.ops.lowrank.quantize_blockwise(x, code, 256, 8)
        return torch.ops.lowrank.dequantize_blockwise(q, absmax, code, 256, 8, x.shape, x.dtype) * 2

    x = torch.randn(3, 1000)
    compiled = torch.compile(roundtrip, fullgraph=True, backend="aot_eager")
    q_ref, absmax_ref = quantize_blockwise_ref(x, code, 256, 8)
    want = dequantize_blockwise_ref(q_ref, absmax_ref, code, 256, 8, x.shape, x.dtype) * 2
    assert torch.equal(compiled(x), want)


def test_dequantize_default_shape():
    code8, code4 = quant.dynamic_code(8), quant.dynamic_code(4)
    x = torch.randn(1000)  # a partial last block
    q, absmax = quantize_blockwise(x, code8, 256, 8)
    assert torch.equal(dequantize_blockwise(q, absmax, code8, 256, 8), dequantize_blockwise(q, absmax, code8, 256, 8, [1000]))
    q4, absmax4 = quantize_blockwise(torch.randn(999), code4, 128, 4)
    with pytest.raises(ValueError, match="shape"):
        dequantize_blockwise(q4, absmax4, code4, 128, 4)


def test_no_grad_flows_through_quantization():
    # integer outputs: autograd passes through, nothing requires grad, no warning
    x = torch.randn(300, requires_grad=True)
    q, absmax = quantize_blockwise(x, quant.dynamic_code(8), 256, 8)
    assert not q.requires_grad and not absmax.requires_grad


# ---- every input check ----

def _bad(fn, match, exc=(RuntimeError, TypeError, ValueError)):
    with pytest.raises(exc, match=match):
        fn()


@pytest.mark.parametrize("blocksize", [32, 100, 8192, 0, -256])
def test_bad_blocksize(blocksize):
    _bad(lambda: quantize_blockwise(torch.randn(10), quant.dynamic_code(8), blocksize, 8), "blocksize")
    q, a = quantize_blockwise(torch.randn(10), quant.dynamic_code(8), 256, 8)
    _bad(lambda: dequantize_blockwise(q, a, quant.dynamic_code(8), blocksize, 8, [10]), "blocksize")


def test_bad_bits():
    _bad(lambda: quantize_blockwise(torch.randn(10), quant.dynamic_code(8), 256, 2), "bits")
    _bad(lambda: quant.dynamic_code(3), "bits")


def test_bad_code():
    x = torch.randn(10)
    _bad(lambda: quantize_blockwise(x, quant.dynamic_code(4), 256, 8), "2\\^bits")          # length
    _bad(lambda: quantize_blockwise(x, quant.dynamic_code(8).flip(0), 256, 8), "sorted")   # order
    _bad(lambda: quantize_blockwise(x, quant.dynamic_code(8).double(), 256, 8), "code must be Float")
    _bad(lambda: quantize_blockwise(x, quant.dynamic_code(8).view(16, 16), 256, 8), "1-D")
    nan_code = quant.dynamic_code(8)
    nan_code[5] = float("nan")
    _bad(lambda: quantize_blockwise(x, nan_code, 256, 8), "finite")
    _bad(lambda: quant.get_code(torch.arange(16.0).flip(0), 4), "sorted")
    _bad(lambda: quant.get_code("nope", 8), "unknown code")


def test_bad_dequantize_code():
    code = quant.dynamic_code(8)
    q, a = quantize_blockwise(torch.randn(10), code, 256, 8)
    _bad(lambda: dequantize_blockwise(q, a, code[:16], 256, 8, [10]), "2\\^bits")
    _bad(lambda: dequantize_blockwise(q, a, code.flip(0), 256, 8, [10]), "sorted")
    _bad(lambda: dequantize_blockwise(q, a.view(1, 1), code, 256, 8, [10]), "absmax must be 1-D")
    _bad(lambda: dequantize_blockwise(q, a, code, 256, 8, [2**40, 2**40]), "more elements than int64")


def test_bad_dtypes():
    code = quant.dynamic_code(8)
    _bad(lambda: quantize_blockwise(torch.arange(10), code, 256, 8), "x must be float32")
    _bad(lambda: quantize_blockwise(torch.randn(10, dtype=torch.float64), code, 256, 8), "x must be float32")
    q, a = quantize_blockwise(torch.randn(10), code, 256, 8)
    _bad(lambda: dequantize_blockwise(q, a, code, 256, 8, [10], torch.float64), "dtype must be float32")
    _bad(lambda: dequantize_blockwise(q.to(torch.int8), a, code, 256, 8, [10]), "q must be Byte")
    _bad(lambda: dequantize_blockwise(q, a.double(), code, 256, 8, [10]), "absmax must be Float")


def test_bad_sizes():
    code = quant.dynamic_code(8)
    q, a = quantize_blockwise(torch.randn(1000), code, 256, 8)
    _bad(lambda: dequantize_blockwise(q, a, code, 256, 8, [999]), "q must have 999")
    _bad(lambda: dequantize_blockwise(q, a[:3], code, 256, 8, [1000]), "absmax must have 4")
    _bad(lambda: dequantize_blockwise(q.view(10, 100), a, code, 256, 8, [1000]), "q must be 1-D")
    _bad(lambda: dequantize_blockwise(q, a, code, 256, 4, [1000], torch.float32), "2\\^bits|q must have 500")
    _bad(lambda: dequantize_blockwise(q, a, code, 256, 8, [-1000]), "shape entries must be >= 0")


def test_bad_device_mix_meta():
    # the fake kernels check devices too (meta tensors dispatch to them)
    _bad(lambda: quantize_blockwise(torch.randn(10, device="meta"), quant.dynamic_code(8), 256, 8), "one device")


@pytest.mark.cuda
def test_bad_device_mix():
    # x on the CPU, code on CUDA: the CUDA kernel is picked and must name the problem
    _bad(lambda: quantize_blockwise(torch.randn(10), quant.dynamic_code(8, device="cuda"), 256, 8), "one device")
    x = torch.randn(10, device="cuda")
    _bad(lambda: quantize_blockwise(x, quant.dynamic_code(8), 256, 8), "same device|one device")
    q, a = quantize_blockwise(x, quant.dynamic_code(8, device="cuda"), 256, 8)
    _bad(lambda: dequantize_blockwise(q, a.cpu(), quant.dynamic_code(8, device="cuda"), 256, 8, [10]), "one device")


def test_codes_and_quantize_arguments_are_checked():
    # log_code(decades=inf) gave NaN entries, decades=50 zeros in a zero-free code; blocksize=0
    # silently meant the default; a user code written after quantize changed the quantized values
    with pytest.raises(ValueError, match="finite"):
        quant.log_code(8, decades=float("inf"))
    with pytest.raises(ValueError, match="fp32"):
        quant.log_code(8, decades=50.0, zero=False)
    with pytest.raises(RuntimeError, match="blocksize"):
        quant.quantize(torch.randn(100), blocksize=0)
    code = quant.linear_code(8)
    x = torch.randn(300)
    qt = quant.quantize(x, code=code)
    want = qt.dequantize()
    code.zero_()
    torch.testing.assert_close(qt.dequantize(), want, rtol=0, atol=0)
    with pytest.raises(TypeError, match="dequantize"):
        qt.to(torch.float16)
