"""Benchmark family `optim`: one AdamW ``optimizer.step()`` over ~50M parameters.

Cases (benchmarks/shapes/optim.csv): *full* is 12 x 2048x2048 weights + 12 biases of 2048
+ one 1000-element tensor (50.4M params), *quick* 3 x 1024x1024 + small ones; fp32 params
everywhere, bf16 params too on CUDA. Params ~ N(0, 0.02^2) and grads ~ N(0, 1e-3^2) are
drawn once per case (seeded); every provider steps its own copy of the params with the
same grads (one shared, read-only grad tensor per param), lr 1e-3, betas (0.9, 0.999),
eps 1e-8, weight decay 0.01. Providers:

* ``torch AdamW (foreach)``      the reference: torch.optim.AdamW(foreach=True)
* ``lowrank_ext AdamW8bit``      lowrank_ext.optim.AdamW8bit (fused quantized step)
* ``lowrank_ext AdamW4bit``      lowrank_ext.optim.AdamW4bit
* ``lowrank_ext AdamW8bit (bitsandbytes-like scheme)``  AdamW8bit set to a quantization like
                                 bitsandbytes': dynamic codes for both moments (unsigned for the
                                 second; ours, whose entries differ from bitsandbytes' tables by
                                 up to 0.007), nearest rounding, blocks of 256: the like-for-like kernel
                                 comparison (the
                                 default's stochastically rounded log-code second moment, chosen so
                                 that beta2's slow EMA is not stalled, is about half of its step on CPU)
* ``lowrank_ext AdamW8bit/4bit (rank-1 second moment)``  exp_avg_sq_norm="rank1": the second
                                 moment of each weight normalised by min(row max, column max)
                                 (Li et al. 2023; linear code without 0, nearest rounding; a
                                 statistics pass first; on CUDA its kernels are not yet verified on a GPU)
* ``lowrank_ext fp32 fused``     torch.ops.lowrank.adamw_step_fp32_ over all tensors with
                                 fp32 moments: our kernel with fp32 state (comparison point)
* ``torch AdamW (fused=True)``   torch.optim.AdamW(fused=True)
* ``bitsandbytes AdamW8bit``     bitsandbytes.optim.AdamW8bit (slow on CPU: small budget)
* ``torchao AdamW8bit/4bit``     torchao.optim.AdamW8bit/AdamW4bit (torch.compile'd per
                                 param; slow on CPU: small budget)

Each provider's setup builds its optimizer, takes the first step from zero state (the
step that is checked), then warm-up steps; ``opt.step()`` is what is timed.

Check: after that first step each provider's params must be close to the reference's:
max |p - p_ref| <= tol * max |p_ref| with tol 1e-3 for 8/4-bit optimizers and 1e-5 for
fp32-state ones (+ the param dtype's eps for bf16 params). See ``check`` for why.

Bytes moved per step (each provider's own count, ``_moved_bytes``): an ideal kernel
reads and writes the param and both moments once and reads the grad once. Per element,
with s the param/grad element size (4 for fp32):

* fp32 moments (our fp32 fused op):           3s + 2 * (4 + 4)  = 28 B (fp32 params)
* moments in the param's dtype (torch AdamW):  3s + 2 * 2s       = 28 B (fp32), 14 B (bf16)
* 8-bit moments (ours, bitsandbytes, torchao): 3s + 2 * (1 + 1)  = 16 B, + absmax (4 B
  read + written per block of each moment: 0.035 B for ours' blocks of 256/2048)
* 4-bit moments:                               3s + 2 * (0.5 + 0.5) = 14 B, + absmax
* rank-1 second moments (weights): the statistics pass reads the grad and the second
  moment's codes once more: + s + 1 B (8-bit), + s + 0.5 B (4-bit); no absmax for that moment
Tensors a provider does not quantize (under 4096 elements everywhere; torchao also those
whose size is not a multiple of its block) count at their real moment format: fp32 for
ours and bitsandbytes, the param's dtype for torchao. Codes (256 floats) are not counted.

The harness derives GB/s from one byte count per case (``Case.bytes``, here the
reference's); the counts differ per provider, so ``summary`` (which the harness calls
before printing and writing anything) re-derives each row's GB/s and % of peak from its
own count in ``case.params["moved_bytes"]``. Each row's note gives its bytes moved per
param and its optimizer state bytes per param.

The summary lines track the issue's targets for information (speed never fails a run):
CPU, 8-bit step >= 10x bitsandbytes' and faster than torch's default AdamW (torch's fp32
fused step, 28 B/param against 8-bit's 16, is the bar to aim past); CUDA (H100), 8-bit
step >= 80% of peak memory bandwidth and >= 1.3x bitsandbytes' throughput.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import device as _device
from . import peers
from .harness import Case, Family, Provider, Row, SkipProvider, Timed, load_shapes

LR, BETAS, EPS, WEIGHT_DECAY = 1e-3, (0.9, 0.999), 1e-8, 1e-2
PARAM_STD, GRAD_STD = 0.02, 1e-3
TOL_QUANT = 1e-3        # max |p - p_ref| / max |p_ref| after one step, 8/4-bit state
TOL_FP32 = 1e-5         # the same for fp32-state providers (same math, another op order)
CPU_TARGET_VS_BNB = 10.0
CUDA_TARGET_FRAC_PEAK = 0.8
CUDA_TARGET_VS_BNB = 1.3

REFERENCE = "torch AdamW (foreach)"
OURS_8BIT, OURS_4BIT = "lowrank_ext AdamW8bit", "lowrank_ext AdamW4bit"
OURS_8BIT_BNB_SCHEME = "lowrank_ext AdamW8bit (bitsandbytes-like scheme)"
OURS_8BIT_RANK1 = "lowrank_ext AdamW8bit (rank-1 second moment)"
OURS_4BIT_RANK1 = "lowrank_ext AdamW4bit (rank-1 second moment)"
OURS_FP32 = "lowrank_ext fp32 fused"
TORCH_FUSED = "torch AdamW (fused=True)"
BNB_8BIT = "bitsandbytes AdamW8bit"
TORCHAO_8BIT, TORCHAO_4BIT = "torchao AdamW8bit", "torchao AdamW4bit"
# fp32-state providers: checked at TOL_FP32 (the rest hold 8/4-bit moments)
_FP32_STATE = {REFERENCE, TORCH_FUSED, OURS_FP32}
_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# ----------------------------------------------------------------------------- bytes

@dataclass(frozen=True)
class _Quantized:
    """A provider's quantized moment layout, for counting bytes moved per step."""
    bits: int
    blocksize_exp_avg: int
    blocksize_exp_avg_sq: int
    min_numel: int = 4096          # smaller tensors keep unquantized moments
    multiple_of: int = 1           # torchao also needs numel % blocksize == 0
    small_moments: str = "fp32"    # "fp32" or "param" (the param's dtype)
    rank1: bool = False            # the second moment of 2-D tensors is rank-1 normalised


# provider -> moment format: "fp32", "param" (the param's dtype, as torch keeps it) or _Quantized
def _formats() -> dict[str, Any]:
    from lowrank_ext.optim import AdamW4bit, AdamW8bit
    min_q = 4096   # lowrank_ext.optim's default min_quant_size
    return {
        REFERENCE: "param",
        TORCH_FUSED: "param",
        OURS_FP32: "fp32",
        OURS_8BIT: _Quantized(8, *AdamW8bit.default_blocksizes, min_numel=min_q),
        OURS_4BIT: _Quantized(4, *AdamW4bit.default_blocksizes, min_numel=min_q),
        OURS_8BIT_BNB_SCHEME: _Quantized(8, 256, 256, min_numel=min_q),
        OURS_8BIT_RANK1: _Quantized(8, *AdamW8bit.default_blocksizes, min_numel=min_q, rank1=True),
        OURS_4BIT_RANK1: _Quantized(4, *AdamW4bit.default_blocksizes, min_numel=min_q, rank1=True),
        BNB_8BIT: _Quantized(8, 256, 256),                      # bnb: blocks of 256, fp32 small
        TORCHAO_8BIT: _Quantized(8, 256, 256, multiple_of=256, small_moments="param"),
        TORCHAO_4BIT: _Quantized(4, 128, 128, multiple_of=128, small_moments="param"),
    }


def _moved_bytes(shapes: list[tuple[int, ...]], dtype: torch.dtype, fmt: Any) -> int:
    """Bytes an ideal kernel reads + writes in one step (see the module docstring)."""
    s = torch.empty((), dtype=dtype).element_size()
    total = 0
    for shape in shapes:
        n = math.prod(shape)
        total += 3 * s * n                             # param read + write, grad read
        if isinstance(fmt, _Quantized) and n >= fmt.min_numel and n % fmt.multiple_of == 0:
            q = math.ceil(n * fmt.bits / 8)
            rank1 = fmt.rank1 and len(shape) >= 2
            blocks = (math.ceil(n / fmt.blocksize_exp_avg)
                      + (0 if rank1 else math.ceil(n / fmt.blocksize_exp_avg_sq)))
            total += 2 * 2 * q + 2 * 4 * blocks        # both moments' codes and absmax, read + write
            if rank1:  # the statistics pass: grad and codes again; row and column maxima read + written
                total += s * n + q + 2 * 4 * (shape[0] + n // shape[0])
        else:
            small = fmt.small_moments if isinstance(fmt, _Quantized) else fmt
            total += 2 * 2 * (4 if small == "fp32" else s) * n
    return total


# ----------------------------------------------------------------------------- cases

def _parse_tensors(spec: str) -> list[tuple[int, ...]]:
    """'12*2048x2048 + 12*2048 + 1*1000' -> the list of shapes."""
    shapes: list[tuple[int, ...]] = []
    for term in spec.split("+"):
        count, _, shape = term.strip().partition("*")
        dims = tuple(int(d) for d in shape.split("x"))
        shapes += [dims] * int(count)
    return shapes


def _human(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def cases(quick: bool, device: torch.device, dtype: torch.dtype | None) -> list[Case]:
    mode = "quick" if quick else "full"
    formats = _formats()
    seen: set[tuple] = set()
    out: list[Case] = []
    for r in load_shapes("optim"):
        if r["mode"] != mode or device.type not in r["devices"].split("|"):
            continue
        dt = dtype or getattr(torch, r["dtype"])
        shapes = _parse_tensors(r["tensors"])
        if (tuple(shapes), dt) in seen:   # --dtype can fold several rows into one
            continue
        seen.add((tuple(shapes), dt))
        numel = sum(math.prod(s) for s in shapes)
        big = max(shapes, key=math.prod)
        n_big = sum(s == big for s in shapes)
        moved = {name: _moved_bytes(shapes, dt, fmt) for name, fmt in formats.items()}
        out.append(Case(
            family="optim", op="adamw step",
            label=f"{_human(numel)} {_SHORT.get(dt, dt)} ({n_big}x{'x'.join(map(str, big))}"
                  f"+{len(shapes) - n_big} small)",
            params={"shapes": shapes, "numel": numel, "dtype": dt, "moved_bytes": moved},
            dtype=dt, bytes=moved[REFERENCE]))
    return out


def make_inputs(case: Case, device: torch.device) -> dict[str, list[torch.Tensor]]:
    """Initial params ~ N(0, 0.02^2) and fixed grads ~ N(0, 1e-3^2), seeded, in the case's dtype."""
    g = torch.Generator(device=device).manual_seed(0)
    dt = case.params["dtype"]

    def draw(shape, std):
        return (torch.randn(shape, generator=g, device=device) * std).to(dt)

    shapes = case.params["shapes"]
    return {"params": [draw(s, PARAM_STD) for s in shapes],
            "grads": [draw(s, GRAD_STD) for s in shapes]}


# ----------------------------------------------------------------------------- providers

def _fresh_params(inputs: dict) -> list[torch.nn.Parameter]:
    """This provider's own copy of the initial params, with the shared fixed grads."""
    params = [torch.nn.Parameter(p.clone()) for p in inputs["params"]]
    for p, g in zip(params, inputs["grads"]):
        p.grad = g      # read-only for every optimizer here, so shared between providers
    return params


def _tensor_nbytes(t: torch.Tensor, seen: set[int]) -> int:
    """Storage bytes of a state tensor. A tensor subclass (torchao's OptimState8bit/4bit:
    codes, scale, qmap) counts the sum over its inner tensors, not its own ``nbytes``
    (the logical fp32 size). A tensor object met twice (bitsandbytes' qmap1/qmap2, shared
    by every param) counts once."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_nbytes(getattr(t, n), seen) for n in names)
    if id(t) in seen:
        return 0
    seen.add(id(t))
    return t.numel() * t.element_size()


def _state_bytes_per_param(opt: torch.optim.Optimizer) -> float:
    """Peers' optimizer state per param: every tensor in ``opt.state`` except 'step'
    (moments, absmax/scales and the code tables, 256 or 16 floats, which are
    negligible here: ours, from lowrank_ext.optim.state_bytes_per_param, leaves codes out)."""
    seen: set[int] = set()
    total = sum(_tensor_nbytes(v, seen) for st in opt.state.values() for k, v in st.items()
                if torch.is_tensor(v) and k != "step")
    numel = sum(p.numel() for g in opt.param_groups for p in g["params"])
    return total / max(numel, 1)


def _note(case: Case, name: str, state_bpp: float) -> str:
    moved = case.params["moved_bytes"][name] / case.params["numel"]
    return f"moves {moved:.1f} B/param, state {state_bpp:.2f} B/param"


def _stepper(case: Case, inputs: dict, name: str, make: Callable[[list], Any],
             state_bpp: Callable[[Any], float], warmup: int = 0) -> Timed:
    """Build the optimizer over a fresh copy of the params, take the checked first step
    (from zero state), then `warmup` more (the harness adds two for non-slow providers)."""
    params = _fresh_params(inputs)
    opt = make(params)
    opt.step()
    first = [p.detach().clone() for p in params]
    for _ in range(warmup):
        opt.step()
    return Timed(fn=opt.step, output=first, note=_note(case, name, state_bpp(opt)))


def _torch_adamw(**kw) -> Callable[[Case, dict], Timed]:
    name = TORCH_FUSED if kw.get("fused") else REFERENCE

    def setup(case: Case, inputs: dict) -> Timed:
        return _stepper(case, inputs, name, lambda ps: torch.optim.AdamW(
            ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, **kw),
            _state_bytes_per_param)
    return setup


def _ours(bits: int, name: str, options: Callable[[], dict] = dict) -> Callable[[Case, dict], Timed]:
    """Our AdamW8bit / AdamW4bit, with its defaults or the keywords `options()` returns."""
    def setup(case: Case, inputs: dict) -> Timed:
        from lowrank_ext.optim import AdamW4bit, AdamW8bit, state_bytes_per_param
        cls = AdamW8bit if bits == 8 else AdamW4bit
        return _stepper(case, inputs, name, lambda ps: cls(
            ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, **options()), state_bytes_per_param)
    return setup


def _bnb_like_options() -> dict:
    from lowrank_ext import quant
    return dict(blocksize_exp_avg_sq=256, code_exp_avg_sq=quant.dynamic_code(8, signed=False),
                stochastic_moments=(False, False))


class _Fp32Fused:
    """All tensors stepped by one ``lowrank::adamw_step_fp32_`` call with fp32 moments: the
    same kernel machinery as the quantized step, without the codes (the comparison point)."""

    def __init__(self, params: list[torch.Tensor]):
        self.params = [p.detach() for p in params]
        self.grads = [p.grad for p in params]
        self.exp_avg = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        self.count = 0

    def step(self) -> None:
        from lowrank_ext.ops.optim import adamw_step_fp32_
        self.count += 1
        adamw_step_fp32_(self.params, self.grads, self.exp_avg, self.exp_avg_sq, lr=LR,
                         beta1=BETAS[0], beta2=BETAS[1], eps=EPS, weight_decay=WEIGHT_DECAY,
                         step=self.count)

    def state_bytes_per_param(self) -> float:
        state = sum(t.nbytes for t in self.exp_avg + self.exp_avg_sq)
        return state / max(sum(p.numel() for p in self.params), 1)


def _ours_fp32(case: Case, inputs: dict) -> Timed:
    return _stepper(case, inputs, OURS_FP32, _Fp32Fused, _Fp32Fused.state_bytes_per_param)


def _bitsandbytes(case: Case, inputs: dict) -> Timed:
    bnb, why = peers.bitsandbytes()
    if bnb is None:
        raise SkipProvider(why)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _stepper(case, inputs, BNB_8BIT, lambda ps: bnb.optim.AdamW8bit(
            ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY),
            _state_bytes_per_param, warmup=1)


def _torchao(bits: int) -> Callable[[Case, dict], Timed]:
    def setup(case: Case, inputs: dict) -> Timed:
        ao, why = peers.torchao()
        if ao is None:
            raise SkipProvider(why)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from torchao import optim as ao_optim
            cls = getattr(ao_optim, f"AdamW{bits}bit")
        except (ImportError, AttributeError) as e:
            raise SkipProvider(f"torchao {getattr(ao, '__version__', '?')}: no "
                               f"torchao.optim.AdamW{bits}bit: {e}") from e
        # The first step compiles (torch.compile per param shape); one more warms it.
        return _stepper(case, inputs, TORCHAO_8BIT if bits == 8 else TORCHAO_4BIT,
                        lambda ps: cls(ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY),
                        _state_bytes_per_param, warmup=1)
    return setup


def providers(device: torch.device) -> list[Provider]:
    return [
        Provider(REFERENCE, "reference", _torch_adamw(foreach=True)),
        Provider(OURS_8BIT, "ours", _ours(8, OURS_8BIT)),
        Provider(OURS_4BIT, "ours", _ours(4, OURS_4BIT)),
        Provider(OURS_8BIT_BNB_SCHEME, "ours", _ours(8, OURS_8BIT_BNB_SCHEME, _bnb_like_options)),
        Provider(OURS_8BIT_RANK1, "ours", _ours(8, OURS_8BIT_RANK1, lambda: dict(exp_avg_sq_norm="rank1"))),
        Provider(OURS_4BIT_RANK1, "ours", _ours(4, OURS_4BIT_RANK1, lambda: dict(exp_avg_sq_norm="rank1"))),
        Provider(OURS_FP32, "ours", _ours_fp32),
        Provider(TORCH_FUSED, "peer", _torch_adamw(fused=True)),
        # ~1 s (bitsandbytes) and ~2.7 s (torchao) per step on the 2-core CPUs: small budget
        Provider(BNB_8BIT, "peer", _bitsandbytes, peer="bitsandbytes", slow=device.type == "cpu"),
        Provider(TORCHAO_8BIT, "peer", _torchao(8), peer="torchao", slow=device.type == "cpu"),
        Provider(TORCHAO_4BIT, "peer", _torchao(4), peer="torchao", slow=device.type == "cpu"),
    ]


# ----------------------------------------------------------------------------- checks

def check(case: Case, inputs: dict, ref_out: list[torch.Tensor], out: list[torch.Tensor],
          provider: Provider) -> str | None:
    """Params after one step from identical params/grads/zero state vs torch AdamW's.

    Why these bounds: at step 1 every AdamW's update is lr * m_hat / (sqrt(v_hat) + eps)
    ~= lr * sign(g) (plus lr * wd * p), and the 8/4-bit optimizers here compute it from
    the fp32 moments before quantizing them, so they differ from torch's only by
    rounding. With max |p| ~= 0.11 (N(0, 0.02^2) params) the 8/4-bit bound, 1e-3 * max
    |p| ~= 1.1e-4, is ~11% of one update: a missing, doubled, sign-flipped or mis-scaled
    update fails, while a moment code's rounding (should a provider use its dequantized
    moments: <= 1% of the update at 8 bits) passes. The fp32-state providers do the
    same fp32 math in another order: 1e-5 * max |p| is ~150 ulps of the largest param,
    0.1% of an update. bf16 params add two ulps of bf16 at each element, per element: the
    reference (torch's foreach AdamW, bf16 state) rounds the param twice (the decay, then
    the update) where a fused step rounds once, and computes its update in bf16 (so every
    provider gets the 8/4-bit bound there; a bound of one ulp at the largest param,
    ~1e-3, was a whole update: a half-size update passed it)."""
    if len(out) != len(ref_out):
        return f"{len(out)} params, reference {len(ref_out)}"
    tol = TOL_FP32 if provider.name in _FP32_STATE else TOL_QUANT
    dt = case.params["dtype"]
    if dt != torch.float32:  # the reference's update itself is computed in bf16 (~1% of it off)
        tol = max(tol, TOL_QUANT)
    scale = max(float(r.float().abs().max()) for r in ref_out)
    worst, where = 0.0, -1
    for i, (p, r) in enumerate(zip(out, ref_out)):
        if p.shape != r.shape or p.dtype != r.dtype:
            return f"param {i}: {tuple(p.shape)} {p.dtype}, reference {tuple(r.shape)} {r.dtype}"
        excess = (p.float() - r.float()).abs()
        if dt != torch.float32:  # the roundings to dt: two ulps of that element
            excess = excess - torch.ldexp(torch.full_like(excess, 2 * torch.finfo(dt).eps),
                                          torch.frexp(r.float())[1] - 1)
        d = float(excess.max())
        if not math.isfinite(d):
            return f"param {i}: non-finite values"
        if d > worst:
            worst, where = d, i
    if worst > tol * scale:
        return (f"max |p - torch AdamW's p| (less two ulps of p's dtype) = {worst:.3g} (param {where}) > "
                f"{tol:.3g} * max |p| {scale:.3g}")
    return None


# ----------------------------------------------------------------------------- summary

def _quick_tag(r: Row) -> str:
    return " [quick shapes: indicative only]" if r.case.params["numel"] < 40_000_000 else ""


def summary(rows: list[Row], device: torch.device) -> list[str]:
    """Per-provider GB/s and % of peak (see the module docstring), then the issue's
    targets for information (speed is never asserted)."""
    peak = _device.peaks(device).mem_bw_gbs
    for r in rows:
        moved = r.case.params["moved_bytes"].get(r.provider)
        if r.status == "ok" and r.median_s and moved:
            r.gbs = moved / r.median_s / 1e9
            r.frac_peak = r.gbs / peak
    lines = ["GB/s and % peak use each provider's own bytes moved per step (its note: "
             "param r+w, grad r, both moments r+w incl. absmax; 16 B/param for 8-bit "
             "moments, ~14 for 4-bit, 28 for fp32); state = optimizer state bytes per param"]

    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    for r in rows:
        if r.provider != OURS_8BIT or r.status != "ok":
            continue
        ms = r.median_s * 1e3
        quick = _quick_tag(r)
        bnb = r.vs_peer.get(BNB_8BIT)
        if device.type == "cpu":
            msg = f"target, CPU 8-bit step {r.case.label}: {ms:.1f} ms"
            msg += (f"; {bnb:.1f}x bitsandbytes AdamW8bit (>= {CPU_TARGET_VS_BNB:g}x: "
                    f"{met(bnb >= CPU_TARGET_VS_BNB)})" if bnb else "; bitsandbytes not measured")
            # torch's CPU default is the single-tensor loop; its foreach path (the
            # reference) times about the same on these machines.
            msg += (f"; {r.vs_ref:.2f}x torch AdamW (foreach) (> 1x: {met(r.vs_ref > 1)})"
                    if r.vs_ref else "; torch AdamW not measured")
            fused = r.vs_peer.get(TORCH_FUSED)
            if fused:
                msg += f"; {fused:.2f}x torch AdamW (fused=True) (the bar to aim past)"
        else:
            msg = (f"target, {device.type} 8-bit step {r.case.label}: {ms:.2f} ms, "
                   f"{100 * (r.frac_peak or 0):.0f}% of peak bandwidth "
                   f"(>= {100 * CUDA_TARGET_FRAC_PEAK:.0f}%: "
                   f"{met((r.frac_peak or 0) >= CUDA_TARGET_FRAC_PEAK)})")
            msg += (f"; {bnb:.2f}x bitsandbytes AdamW8bit (>= {CUDA_TARGET_VS_BNB:g}x: "
                    f"{met(bnb >= CUDA_TARGET_VS_BNB)})" if bnb else "; bitsandbytes not measured")
        lines.append(msg + quick)
    for r in rows:  # the same kernel with a quantization scheme like bitsandbytes': like for like
        bnb = r.vs_peer.get(BNB_8BIT)
        if r.provider == OURS_8BIT_BNB_SCHEME and r.status == "ok" and bnb:
            lines.append(f"like for like, {device.type} {r.case.label}: our 8-bit step with a bitsandbytes-like "
                         f"scheme (dynamic codes, nearest, blocks of 256) {r.median_s * 1e3:.1f} ms, "
                         f"{bnb:.1f}x bitsandbytes AdamW8bit{_quick_tag(r)}")
    default_ms = {(r.case.label, r.provider): r.median_s for r in rows if r.status == "ok"}
    for r in rows:  # whether the rank-1 normalisation runs at the block-wise default's speed
        base = {OURS_8BIT_RANK1: OURS_8BIT, OURS_4BIT_RANK1: OURS_4BIT}.get(r.provider)
        if base and r.status == "ok" and default_ms.get((r.case.label, base)):
            lines.append(f"rank-1 second moment, {device.type} {r.case.label}: {r.provider} "
                         f"{r.median_s * 1e3:.1f} ms, {default_ms[(r.case.label, base)] / r.median_s:.2f}x the "
                         f"speed of {base} (block-wise default){_quick_tag(r)}")
    return lines


FAMILY = Family(
    name="optim",
    description="one AdamW step over ~50M params: lowrank_ext 8/4-bit and fp32 fused vs "
                "torch AdamW (foreach, fused), bitsandbytes and torchao 8/4-bit",
    cases=cases,
    providers=providers,
    make_inputs=make_inputs,
    check=check,
    plot_metric="speedup",
    summary=summary,
    ops=("lowrank::adamw_step_quantized_", "lowrank::adamw_step_rank1_", "lowrank::adamw_step_fp32_"),
)
