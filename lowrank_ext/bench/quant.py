"""Benchmark family `quant`: block-wise quantization with a dynamic signed code.

Ops: quantize, dequantize and the round trip (quantize then dequantize), for the shapes
in benchmarks/shapes/quant.csv. Providers:

* ``lowrank_ext``       lowrank_ext.ops.quant.{quantize,dequantize}_blockwise (the kernels)
* ``reference``         lowrank_ext.reference.quant.*_ref (pure PyTorch; timed briefly)
* ``bitsandbytes``      bitsandbytes.functional.{quantize,dequantize}_blockwise with its own
                        dynamic code (8-bit); quantize_4bit/dequantize_4bit nf4 (4-bit)
* ``torchao``           torch.compile'd symmetric int8 absmax from torchao's
                        quantize_affine primitives (8-bit only)
* ``torch-int8-linear`` eager PyTorch linear int8 absmax, written below (8-bit only)

Checks: lowrank_ext must equal the reference bit for bit (q bytes, absmax and the
dequantized tensor; nearest rounding). Peers use other codes, so they (and the reference
itself) are checked loosely: per block, max |dequant(quant(x)) - x| <= tol * absmax.

Metrics: GB/s counts the bytes an ideal kernel reads and writes (input, q, absmax);
"in GB/s" is input bytes / time: the issue states its CPU target in that form, for the
round trip (>= 2.5 GB/s and >= 5x bitsandbytes).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch

from . import peers
from .harness import Case, Family, Provider, Row, SkipProvider, Timed, load_shapes, met

OPS = ("quantize", "dequantize", "roundtrip")
# Loose bound for peers, in units of the block's absmax: half the widest gap between
# neighbouring code values is the worst nearest-rounding error. The 8-bit codes here
# (dynamic, linear int8) stay under 0.01; 4-bit codes (nf4, dynamic 4-bit) under 0.2.
LOOSE_TOL = {8: 0.02, 4: 0.25}
CPU_TARGET_IN_GBS = 2.5      # issue target: CPU round trip, input bytes / time
CPU_TARGET_VS_BNB = 5.0      # issue target: round trip >= 5x bitsandbytes

Packed = Any                 # each provider's own quantized form
QuantFns = tuple[Callable[[torch.Tensor], Packed], Callable[[Packed], torch.Tensor], str]


# ----------------------------------------------------------------------------- cases

def _human(n: int) -> str:
    for unit, div in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def cases(quick: bool, device: torch.device, dtype: torch.dtype | None) -> list[Case]:
    mode = "quick" if quick else "full"
    seen: set[tuple] = set()
    out: list[Case] = []
    for r in load_shapes("quant"):
        if r["mode"] != mode or device.type not in r["devices"].split("|"):
            continue
        n, bits, bs = int(r["numel"]), int(r["bits"]), int(r["blocksize"])
        dt = dtype or getattr(torch, r["dtype"])
        if (n, dt, bits, bs) in seen:   # --dtype can fold several rows into one
            continue
        seen.add((n, dt, bits, bs))
        item = torch.empty((), dtype=dt).element_size()
        nblocks = math.ceil(n / bs)
        x_bytes, q_bytes, a_bytes = n * item, math.ceil(n * bits / 8), nblocks * 4
        moved = {
            "quantize": x_bytes + q_bytes + a_bytes,
            "dequantize": q_bytes + a_bytes + x_bytes,
            "roundtrip": 2 * (x_bytes + q_bytes + a_bytes),   # q and absmax materialised
        }
        for op in OPS:
            out.append(Case(
                family="quant", op=op, label=f"{_human(n)} {_SHORT.get(dt, dt)} {bits}b bs{bs}",
                params={"numel": n, "dtype": dt, "bits": bits, "blocksize": bs},
                dtype=dt, bytes=moved[op], extra_bytes={"in GB/s": x_bytes}))
    return out


_inputs_cache: dict[tuple, torch.Tensor] = {}


def make_inputs(case: Case, device: torch.device) -> torch.Tensor:
    """x ~ N(0, 1), seeded; consecutive cases share it (64M values take a while)."""
    p = case.params
    key = (p["numel"], p["dtype"], str(device))
    if key not in _inputs_cache:
        _inputs_cache.clear()   # keep one input alive at a time
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(p["numel"], generator=g, device=device, dtype=torch.float32)
        _inputs_cache[key] = x.to(p["dtype"])
    return _inputs_cache[key]


# ----------------------------------------------------------------------------- providers

def _timed(case: Case, x: torch.Tensor, fns: QuantFns) -> Timed:
    """Turn a provider's (quantize, dequantize) pair into the callable for `case.op`.

    The checked output is always {"packed", "y"}: the quantized form and its round trip,
    so every op is checked on both halves."""
    quantize, dequantize, note = fns
    packed = quantize(x)
    y = dequantize(packed)
    fn: Callable[[], Any] = {
        "quantize": lambda: quantize(x),
        "dequantize": lambda: dequantize(packed),
        "roundtrip": lambda: dequantize(quantize(x)),
    }[case.op]
    return Timed(fn=fn, output={"packed": packed, "y": y}, note=note)


def _provider(name: str, kind, make: Callable[[Case, torch.Tensor], QuantFns], *,
              peer: str | None = None, slow: bool = False, eight_bit_only: bool = False
              ) -> Provider:
    return Provider(
        name=name, kind=kind, peer=peer, slow=slow,
        setup=lambda case, x: _timed(case, x, make(case, x)),
        applies=(lambda case: case.params["bits"] == 8) if eight_bit_only else None)


def _code(bits: int, device: torch.device) -> torch.Tensor:
    from lowrank_ext import quant as lq
    return lq.dynamic_code(bits=bits, signed=True).to(device)


def _same_signature(quantize: Callable, dequantize: Callable, case: Case, x: torch.Tensor) -> QuantFns:
    """Ours and the reference share one signature: bind the case's code, bits and blocks."""
    bits, bs = case.params["bits"], case.params["blocksize"]
    code = _code(bits, x.device)
    return (
        lambda t: quantize(t, code, blocksize=bs, bits=bits, stochastic_rounding=False, seed=0, offset=0),
        lambda p: dequantize(p[0], p[1], code, blocksize=bs, bits=bits, shape=x.shape, dtype=x.dtype),
        "")


def _ours(case: Case, x: torch.Tensor) -> QuantFns:
    from lowrank_ext.ops.quant import dequantize_blockwise, quantize_blockwise
    return _same_signature(quantize_blockwise, dequantize_blockwise, case, x)


def _reference(case: Case, x: torch.Tensor) -> QuantFns:
    from lowrank_ext.reference.quant import dequantize_blockwise_ref, quantize_blockwise_ref
    return _same_signature(quantize_blockwise_ref, dequantize_blockwise_ref, case, x)


def _bitsandbytes(case: Case, x: torch.Tensor) -> QuantFns:
    bnb, why = peers.bitsandbytes()
    if bnb is None:
        raise SkipProvider(why)
    F = bnb.functional
    bits, bs = case.params["bits"], case.params["blocksize"]
    where = f"{x.device.type} {_SHORT.get(x.dtype, x.dtype)} bs{bs}"
    if bits == 8:
        code = F.create_dynamic_map(signed=True).to(x.device)   # its own dynamic code
        fns: QuantFns = (
            lambda t: F.quantize_blockwise(t, code=code, blocksize=bs),
            lambda p: F.dequantize_blockwise(p[0], p[1]),
            "")
        kind = "blockwise"
    else:
        fns = (lambda t: F.quantize_4bit(t, blocksize=bs, quant_type="nf4"),
               # bnb's 4-bit path returns [1, n] for a 1-D input (our inputs are 1-D)
               lambda p: F.dequantize_4bit(p[0], p[1]).view(-1),
               "nf4 code")
        kind = "4-bit"
    try:  # a tiny call first, so "no kernel here" reads as a skip with bnb's reason
        probe = torch.randn(2 * bs, device=x.device, dtype=x.dtype)
        fns[1](fns[0](probe))
    except Exception as e:
        raise SkipProvider(f"no {where} {kind} kernel: {type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}") from e
    return fns


# torch.compile'd functions, one per (blocksize, device, dtype): distinct function
# objects keep each under dynamo's recompile limit and out of each other's guards.
_torchao_fns: dict[tuple, tuple[Callable, Callable]] = {}


def _torchao(case: Case, x: torch.Tensor) -> QuantFns:
    ao, why = peers.torchao()
    if ao is None:
        raise SkipProvider(why)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization.quant_primitives import (
                MappingType, choose_qparams_affine, dequantize_affine, quantize_affine)
    except ImportError as e:
        raise SkipProvider(f"torchao {getattr(ao, '__version__', '?')} has no affine "
                           f"quantization primitives: {e}") from e
    bs = case.params["blocksize"]
    if x.numel() % bs:
        raise SkipProvider(f"numel {x.numel()} not a multiple of blocksize {bs}")
    key = (bs, str(x.device), x.dtype)
    if key not in _torchao_fns:
        block = (1, bs)

        def quantize(t: torch.Tensor):
            tb = t.view(-1, bs)
            scale, zp = choose_qparams_affine(tb, MappingType.SYMMETRIC, block, torch.int8,
                                              scale_dtype=torch.float32)
            return quantize_affine(tb, block, scale, zp, torch.int8), scale, zp

        def dequantize(p):
            q, scale, zp = p
            return dequantize_affine(q, block, scale, zp, torch.int8,
                                     output_dtype=x.dtype).view(-1)

        _torchao_fns[key] = (torch.compile(quantize, dynamic=False),
                             torch.compile(dequantize, dynamic=False))
    cq, cdq = _torchao_fns[key]
    return cq, cdq, "compiled, linear int8"


def _torch_int8_linear(case: Case, x: torch.Tensor) -> QuantFns:
    """The obvious eager PyTorch block-wise absmax int8: what users write by hand."""
    bs = case.params["blocksize"]
    if x.numel() % bs:
        raise SkipProvider(f"numel {x.numel()} not a multiple of blocksize {bs}")

    def quantize(t: torch.Tensor):
        tb = t.view(-1, bs).float()
        absmax = tb.abs().amax(dim=1, keepdim=True)
        scale = 127.0 / absmax.clamp_min(torch.finfo(torch.float32).tiny)
        return torch.round(tb * scale).to(torch.int8), absmax

    def dequantize(p):
        q, absmax = p
        return (q.float() * (absmax / 127.0)).to(x.dtype).view(-1)

    return quantize, dequantize, "eager"


def providers(device: torch.device) -> list[Provider]:
    return [
        _provider("reference", "reference", _reference, slow=True),
        _provider("lowrank_ext", "ours", _ours),
        _provider("bitsandbytes", "peer", _bitsandbytes, peer="bitsandbytes"),
        _provider("torchao", "peer", _torchao, peer="torchao", eight_bit_only=True),
        _provider("torch-int8-linear", "peer", _torch_int8_linear, eight_bit_only=True),
    ]


# ----------------------------------------------------------------------------- checks

def _first_mismatch(what: str, got: torch.Tensor, want: torch.Tensor) -> str | None:
    if got.shape != want.shape or got.dtype != want.dtype:
        return (f"{what}: got {tuple(got.shape)} {got.dtype}, "
                f"reference {tuple(want.shape)} {want.dtype}")
    if torch.equal(got, want):
        return None
    ne = (got != want).reshape(-1)
    i = int(ne.nonzero()[0])
    return (f"{what} differs at {int(ne.sum())} of {ne.numel()} elements "
            f"(first at {i}: {got.reshape(-1)[i].item()} vs {want.reshape(-1)[i].item()})")


def _block_absmax(t: torch.Tensor, bs: int) -> torch.Tensor:
    flat = t.reshape(-1).float()
    pad = (-flat.numel()) % bs
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, bs).abs().amax(dim=1)


def check(case: Case, x: torch.Tensor, ref_out: dict, out: dict, provider: Provider
          ) -> str | None:
    y = out["y"]
    if y.shape != x.shape or y.dtype != x.dtype:
        return f"dequantized {tuple(y.shape)} {y.dtype}, expected {tuple(x.shape)} {x.dtype}"
    if provider.kind == "ours":   # same code, same rounding: bit-exact
        (q, absmax), (rq, rabsmax) = out["packed"], ref_out["packed"]
        for what, got, want in (("absmax", absmax, rabsmax), ("q", q, rq),
                                ("dequantized", y, ref_out["y"])):
            err = _first_mismatch(what, got, want)
            if err:
                return err
        return None
    bs, bits = case.params["blocksize"], case.params["bits"]
    # A low-precision output adds its own rounding (bf16: 2^-8 relative) on top of the code's.
    tol = LOOSE_TOL[bits] + (0.0 if y.dtype == torch.float32 else torch.finfo(y.dtype).eps)
    err = _block_absmax(y.float() - x.float(), bs)
    bound = tol * _block_absmax(x, bs)
    bad = err > bound
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        return (f"round-trip error too large in {int(bad.sum())} blocks "
                f"(block {i}: {err[i].item():.4g} > {tol} * absmax {bound[i].item() / tol:.4g})")
    return None


# ----------------------------------------------------------------------------- summary

def summary(rows: list[Row], device: torch.device) -> list[str]:
    """Progress against the issue's CPU targets (informational: speed is never asserted)."""
    if device.type != "cpu":
        return []
    lines = []
    for r in rows:
        if not (r.provider == "lowrank_ext" and r.case.op == "roundtrip"
                and r.case.params["bits"] == 8 and r.status == "ok"):
            continue
        in_gbs = r.extra_gbs["in GB/s"]
        msg = (f"target, CPU round trip {r.case.label}: {in_gbs:.2f} input GB/s "
               f"(>= {CPU_TARGET_IN_GBS}: {met(in_gbs >= CPU_TARGET_IN_GBS)})")
        vs = r.vs_peer.get("bitsandbytes")
        if vs is not None:
            msg += (f"; {vs:.2f}x bitsandbytes "
                    f"(>= {CPU_TARGET_VS_BNB}x: {met(vs >= CPU_TARGET_VS_BNB)})")
        else:
            msg += "; bitsandbytes not measured"
        if r.case.params["numel"] < (1 << 26):
            msg += " [quick shapes: indicative only]"
        lines.append(msg)
    return lines


FAMILY = Family(
    name="quant",
    description="block-wise 8/4-bit quantize, dequantize and round trip vs reference, "
                "bitsandbytes, torchao, eager int8",
    cases=cases,
    providers=providers,
    make_inputs=make_inputs,
    check=check,
    plot_metric="GB/s",
    summary=summary,
    ops=("lowrank::quantize_blockwise", "lowrank::dequantize_blockwise"),
)
