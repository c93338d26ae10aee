"""AdamW with block-wise 8-bit or 4-bit moments: drop-in for ``torch.optim.AdamW``.

Each step is one fused, in-place call per (device, dtype) group of parameters
(``torch.ops.lowrank.adamw_step_quantized_``): both moments are dequantized, the AdamW
update runs in fp32, the moments are re-quantized with a fresh absmax per block and the
parameter is written, in one pass over memory. Tensors smaller than ``min_quant_size``
keep fp32 moments (``adamw_step_fp32_``, the same update). With ``exp_avg_sq_norm="rank1"``
the second moment of every quantized param of two or more dims is normalised per entry by
min(row max, column max) instead of per block (Li et al. 2023; ``adamw_step_rank1_``).

Example::

    import torch
    from lowrank_ext.optim import AdamW8bit
    model = torch.nn.Linear(256, 256)
    opt = AdamW8bit(model.parameters(), lr=1e-3, weight_decay=0.01)
    loss = model(torch.randn(32, 256)).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
"""
from __future__ import annotations

import math
import numbers
from collections import defaultdict
from typing import Any, Callable

import torch

from .. import quant
from ..ops.optim import adamw_step_fp32_, adamw_step_quantized_, adamw_step_rank1_
from ..ops.quant import dequantize_blockwise, quantize_blockwise
# pure-PyTorch rank-1 (de)quantization, nearest rounding: converting state (fresh, loaded fp32,
# another code) is a one-off; the steps re-quantize inside adamw_step_rank1_
from ..reference.optim import dequantize_rank1_ref, quantize_rank1_ref

__all__ = ["AdamW8bit", "AdamW4bit", "state_bytes_per_param"]

_PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_QUANT_KEYS = ("exp_avg_q", "exp_avg_absmax", "exp_avg_sq_q", "exp_avg_sq_absmax")
_RANK1_KEYS = ("exp_avg_q", "exp_avg_absmax", "exp_avg_sq_q", "exp_avg_sq_row", "exp_avg_sq_col")


def check_steppable(p: torch.Tensor, optimizer: str) -> None:
    """The params and grads the fused steps take: dense, real, float32/float16/bfloat16."""
    if p.grad.is_sparse:
        raise RuntimeError(f"{optimizer} does not support sparse gradients")
    if torch.is_complex(p):
        raise RuntimeError(f"{optimizer} does not support complex parameters")
    if p.dtype not in _PARAM_DTYPES or p.grad.dtype not in _PARAM_DTYPES:
        raise TypeError(f"{optimizer} steps float32/float16/bfloat16 params and grads, got {p.dtype} with a "
                        f"{p.grad.dtype} grad")
    if torch._debug_has_internal_overlap(p) == 1:  # e.g. expanded: an in-place update cannot be written
        raise RuntimeError(f"{optimizer}: a param of shape {tuple(p.shape)} has elements that share memory "
                           f"(an expanded tensor); it cannot be updated in place")


# torch.optim.AdamW options these optimizers do not implement: a group (or constructor)
# asking for them raises rather than being silently stepped without them
_UNSUPPORTED_FLAGS = ("maximize", "amsgrad", "capturable", "differentiable")


def is_real_number(value) -> bool:
    """A real number: Python, numpy or a one-element float tensor (schedulers may set tensors)."""
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_param_group(group: dict, optimizer: str) -> None:
    for flag in _UNSUPPORTED_FLAGS:
        if group.get(flag, False):
            raise ValueError(f"{optimizer} does not support {flag}=True")
    # torch.optim.Adam's groups say decoupled_weight_decay=False: their weight_decay is an L2
    # term in the gradient, which these AdamW steps would apply as decoupled decay instead
    if group.get("decoupled_weight_decay", True) is False and group.get("weight_decay", 0.0) != 0.0:
        raise ValueError(f"{optimizer} applies decoupled weight decay (AdamW's); this group asks for Adam's L2 "
                         f"weight decay (decoupled_weight_decay=False, weight_decay={group['weight_decay']})")
    # values set on a group after construction too: the kernels would refuse them only after
    # earlier groups had stepped
    for key, ok, what in (("lr", lambda v: 0.0 <= v, "learning rate"), ("eps", lambda v: 0.0 <= v, "epsilon value"),
                          ("weight_decay", lambda v: 0.0 <= v, "weight_decay value")):
        if key in group and not (is_real_number(group[key]) and ok(float(group[key]))):
            raise ValueError(f"Invalid {what}: {group[key]!r}")
    if "betas" in group and not (len(group["betas"]) == 2 and all(is_real_number(b) for b in group["betas"])):
        raise ValueError(f"betas must be two numbers, got {group['betas']!r}")
    for i, beta in enumerate(group.get("betas", ())):
        if not 0.0 <= float(beta) < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")


def check_saved_groups(state_dict: dict, optimizer: str, *more_checks) -> None:
    """The param groups of a state_dict about to be loaded pass the groups' checks (torch's
    load_state_dict takes the saved groups' hyperparameters as they are)."""
    for group in state_dict["param_groups"]:
        try:
            check_param_group(group, optimizer)
            for check in more_checks:
                check(group)
        except ValueError as e:
            raise ValueError(f"cannot continue this state_dict: {e}") from None


def quantized_moment_fits(q: torch.Tensor, absmax: torch.Tensor, bits: int, blocksize: int,
                          numel: int | None = None) -> bool:
    """Whether a saved quantized moment's byte and block counts are those of ``bits`` and
    ``blocksize`` (for ``numel`` entries where known): state saved in another format would
    otherwise load and fail inside the first step's kernel."""
    per_byte = 8 // bits
    if numel is None:  # the entries: bytes * per_byte, or one fewer (an odd count at 4 bits)
        counts = {q.numel() * per_byte, max(q.numel() * per_byte - (per_byte - 1), 0)}
    elif q.numel() != -(-numel // per_byte):
        return False
    else:
        counts = {numel}
    return any(absmax.numel() == -(-n // blocksize) for n in counts)


def step_counter(value) -> torch.Tensor:
    """A saved step (a tensor, or a number as torch < 1.12 and hand-converted checkpoints hold
    it) as the CPU fp32 counter these optimizers keep (reading it never waits for a device)."""
    if torch.is_tensor(value):
        return value.detach().to(device="cpu", dtype=torch.float32, copy=True)
    return torch.tensor(float(value), dtype=torch.float32)


class SettingsPickle:
    """torch.optim.Optimizer pickles (and deep-copies) only defaults, state and param_groups:
    the settings an optimizer keeps as attributes (``_SETTINGS``) travel too, and its
    per-device caches (``_CACHES``) start empty in the copy."""
    _SETTINGS: tuple[str, ...] = ()
    _CACHES: tuple[str, ...] = ()

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), **{k: self.__dict__[k] for k in self._SETTINGS}}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for k in self._CACHES:
            setattr(self, k, {})


def rank1_view(p: torch.Tensor) -> tuple[int, int]:
    """The [rows, cols] a rank-1 normalised moment views a param of two or more dims as: its
    first dim against the rest (an nn.Linear weight's [out, in])."""
    return p.shape[0], math.prod(p.shape[1:])


class _BlockwiseAdamW(SettingsPickle, torch.optim.Optimizer):
    """The shared implementation of AdamW8bit and AdamW4bit. Keywords beyond torch AdamW's:
    ``blocksize_exp_avg`` / ``blocksize_exp_avg_sq`` (powers of two in [128, 4096]),
    ``min_quant_size`` (smaller tensors keep fp32 moments), ``stochastic_rounding`` (bf16
    params), ``code_exp_avg`` / ``code_exp_avg_sq`` (a name or a sorted tensor of 2**bits
    entries), ``stochastic_moments`` (re-quantize each moment stochastically), ``seed``, and
    ``exp_avg_sq_norm``: ``"block"`` (default, a fresh absmax per block) or ``"rank1"`` (Li et
    al. 2023): the second moment of each quantized param of two or more dims, seen as
    [size(0), numel / size(0)], is stored per entry as v_ij / min(row max, column max), with
    fp32 row and column maxima instead of block absmax; its default code is then the linear
    code without 0 and its default rounding nearest, as in the paper."""
    bits: int = 8
    default_blocksizes: tuple[int, int] = (256, 2048)
    # re-quantize (exp_avg, exp_avg_sq) with stochastic rounding
    default_stochastic_moments: tuple[bool, bool] = (False, True)

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, blocksize_exp_avg: int | None = None,
                 blocksize_exp_avg_sq: int | None = None, min_quant_size: int = 4096,
                 stochastic_rounding: bool = False, seed: int = 0,
                 code_exp_avg: torch.Tensor | None = None, code_exp_avg_sq: torch.Tensor | None = None,
                 stochastic_moments: tuple[bool, bool] | None = None, exp_avg_sq_norm: str = "block",
                 maximize: bool = False,
                 amsgrad: bool = False, foreach: bool | None = None, fused: bool | None = None,
                 capturable: bool = False, differentiable: bool = False):
        # torch.optim.AdamW's keywords are accepted (drop-in); foreach / fused change nothing
        # (the step is always one fused multi-tensor kernel), the others must stay False
        if isinstance(lr, torch.Tensor):
            lr = float(lr)
        check_param_group(dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize,
                               amsgrad=amsgrad, capturable=capturable, differentiable=differentiable),
                          type(self).__name__)
        if exp_avg_sq_norm not in ("block", "rank1"):
            raise ValueError(f"exp_avg_sq_norm must be 'block' or 'rank1', got {exp_avg_sq_norm!r}")
        self.exp_avg_sq_norm = exp_avg_sq_norm
        bs_m, bs_v = (default if bs is None else bs
                      for bs, default in zip((blocksize_exp_avg, blocksize_exp_avg_sq), self.default_blocksizes))
        for name, bs in (("blocksize_exp_avg", bs_m), ("blocksize_exp_avg_sq", bs_v)):
            if not (128 <= bs <= 4096 and bs & (bs - 1) == 0):
                raise ValueError(f"{name} must be a power of two in [128, 4096], got {bs}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.blocksizes = (bs_m, bs_v)
        self.min_quant_size = min_quant_size
        self.stochastic_rounding = stochastic_rounding
        if stochastic_moments is None:
            stochastic_moments = self.default_stochastic_moments
            if exp_avg_sq_norm == "rank1":  # Li et al.'s rank-1 / linear second moment rounds to nearest
                stochastic_moments = (stochastic_moments[0], False)
        self.stochastic_moments = tuple(stochastic_moments)
        self.seed = seed
        # the second moment is never negative: named codes for it are the unsigned ones
        self._codes_cpu = (quant.get_code(code_exp_avg if code_exp_avg is not None else self._default_code(True),
                                          self.bits, signed=True),
                           quant.get_code(code_exp_avg_sq if code_exp_avg_sq is not None else
                                          self._default_code(False), self.bits, signed=False))
        self._codes: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def add_param_group(self, param_group: dict) -> None:
        check_param_group({**self.defaults, **param_group}, type(self).__name__)  # as the group will step
        super().add_param_group(param_group)

    _SETTINGS = ("blocksizes", "min_quant_size", "stochastic_rounding", "stochastic_moments", "seed", "_codes_cpu",
                 "exp_avg_sq_norm")
    _CACHES = ("_codes",)
    exp_avg_sq_norm = "block"  # optimizers pickled before the setting existed

    def _default_code(self, first_moment: bool) -> torch.Tensor:
        if first_moment:
            return quant.dynamic_code(self.bits, signed=True)
        if self.exp_avg_sq_norm == "rank1":  # Li et al.'s linear mapping without zero
            return quant.linear_code(self.bits, signed=False, zero=False)
        return quant.log_code(self.bits, decades=8.0, zero=False)

    def _rank1(self, p: torch.Tensor) -> bool:
        """Whether p's second moment is rank-1 normalised (when quantized at all)."""
        return self.exp_avg_sq_norm == "rank1" and p.dim() >= 2

    def _codes_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._codes:
            self._codes[device] = tuple(c.to(device) for c in self._codes_cpu)
        return self._codes[device]

    def _quantize_state(self, state: dict, key: str, values: torch.Tensor, code: torch.Tensor, blocksize: int):
        q, absmax = quantize_blockwise(values.detach().reshape(-1).float(), code, blocksize, self.bits)
        state[key + "_q"], state[key + "_absmax"] = q, absmax

    def _quantize_second_moment(self, p: torch.Tensor, state: dict, values: torch.Tensor, code: torch.Tensor):
        if self._rank1(p):
            v = values.detach().float().reshape(rank1_view(p))
            q, row_max, col_max = quantize_rank1_ref(v, code, self.bits)
            state["exp_avg_sq_q"], state["exp_avg_sq_row"], state["exp_avg_sq_col"] = q, row_max, col_max
        else:
            self._quantize_state(state, "exp_avg_sq", values, code, self.blocksizes[1])

    def _prepare_state(self, p: torch.Tensor, state: dict) -> None:
        quantize = p.numel() >= self.min_quant_size
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            if not quantize:
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
                state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
                return
            code_m, code_v = self._codes_on(p.device)
            zeros = torch.zeros(p.numel(), device=p.device)
            self._quantize_state(state, "exp_avg", zeros, code_m, self.blocksizes[0])
            self._quantize_second_moment(p, state, zeros, code_v)
            state["exp_avg_code"], state["exp_avg_sq_code"] = code_m, code_v
        elif quantize and "exp_avg" in state:  # fp32 moments (e.g. from torch.optim.AdamW): quantize them
            code_m, code_v = self._codes_on(p.device)
            self._quantize_state(state, "exp_avg", state.pop("exp_avg"), code_m, self.blocksizes[0])
            self._quantize_second_moment(p, state, state.pop("exp_avg_sq"), code_v)
            state["exp_avg_code"], state["exp_avg_sq_code"] = code_m, code_v
        elif "exp_avg" in state:
            for key in ("exp_avg", "exp_avg_sq"):
                # .contiguous(), not to(memory_format=contiguous_format): that keeps a transposed
                # tensor's strides (torch AdamW's moments of a transposed param have them)
                moment = state[key]
                if moment.dtype != torch.float32 or not moment.is_contiguous():  # once, after a load
                    state[key] = moment.to(dtype=torch.float32).contiguous()

    def _step_seed(self, step: int, bucket: int) -> int:
        # Philox streams are (seed, tensor index in the call): fold the call (bucket) in, so
        # tensor 0 of two param groups does not draw the same numbers
        return (((self.seed * 0x9E3779B97F4A7C15 + step) * 0xBF58476D1CE4E5B9 + bucket) ^ (bucket << 32)) & ((1 << 63) - 1)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # every group and param is checked before any state changes: a step that raises
        # leaves every param, moment and step counter as it was
        for group in self.param_groups:
            check_param_group(group, type(self).__name__)  # also a flag set on the group after construction
            for p in group["params"]:
                if p.grad is not None:
                    check_steppable(p, type(self).__name__)
        for group_no, group in enumerate(self.param_groups):
            buckets: dict[tuple, list] = defaultdict(list)
            counters = []
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                state = self.state[p]
                self._prepare_state(p, state)
                counters.append(state["step"])
                step = int(state["step"].item()) + 1  # a CPU tensor: no device sync
                kind = "rank1" if "exp_avg_sq_row" in state else "quantized" if "exp_avg_q" in state else "fp32"
                # one call steps its tensors with one pair of codes (each state holds its own)
                codes = (id(state.get("exp_avg_code")), id(state.get("exp_avg_sq_code")))
                buckets[(p.device, p.dtype, grad.dtype, step, kind, codes)].append((p, state))
            if counters:
                torch._foreach_add_(counters, 1)  # one call, not one in-place add per param
            beta1, beta2 = group["betas"]
            for bucket_no, ((device, _, _, step, kind, _), items) in enumerate(buckets.items()):
                bucket_id = (group_no << 16) + bucket_no
                params = [p if p.is_contiguous() else p.contiguous() for p, _ in items]
                grads = [p.grad.contiguous() for p, _ in items]
                hyper = dict(lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                             weight_decay=group["weight_decay"], step=step,
                             stochastic_rounding=self.stochastic_rounding, seed=self._step_seed(step, bucket_id))
                states = [s for _, s in items]
                if kind == "rank1":
                    adamw_step_rank1_(params, grads, *([s[k] for s in states] for k in _RANK1_KEYS),
                                      states[0]["exp_avg_code"], states[0]["exp_avg_sq_code"], bits=self.bits,
                                      blocksize_exp_avg=self.blocksizes[0],
                                      stochastic_exp_avg=self.stochastic_moments[0],
                                      stochastic_exp_avg_sq=self.stochastic_moments[1], **hyper)
                elif kind == "quantized":
                    adamw_step_quantized_(params, grads, *([s[k] for s in states] for k in _QUANT_KEYS),
                                          states[0]["exp_avg_code"], states[0]["exp_avg_sq_code"], bits=self.bits,
                                          blocksize_exp_avg=self.blocksizes[0],
                                          blocksize_exp_avg_sq=self.blocksizes[1],
                                          stochastic_exp_avg=self.stochastic_moments[0],
                                          stochastic_exp_avg_sq=self.stochastic_moments[1], **hyper)
                else:
                    adamw_step_fp32_(params, grads, [s["exp_avg"] for s in states],
                                     [s["exp_avg_sq"] for s in states], **hyper)
                for (p, _), pc in zip(items, params):
                    if pc is not p:  # a non-contiguous param was stepped through a copy
                        p.copy_(pc)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, except that state keeps its dtypes: torch casts every floating state
        tensor to its param's dtype, which would turn absmax (and fp32 moments) into bf16."""
        check_saved_groups(state_dict, type(self).__name__)
        saved = state_dict["state"]
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            for pid, p in zip(saved_group["params"], group["params"]):
                state = saved.get(pid, {})
                if "exp_avg_q" in state and not all(k in state for k in ("exp_avg_code", "exp_avg_sq_code")):
                    raise ValueError(f"cannot continue this state_dict: the quantized moments of a param of shape "
                                     f"{tuple(p.shape)} come without their codes")
                if "exp_avg_q" in state and "exp_avg_sq_row" in state:  # a rank-1 normalised second moment
                    fits = (self._rank1(p) and (state["exp_avg_sq_row"].numel(), state["exp_avg_sq_col"].numel())
                            == rank1_view(p) and quantized_moment_fits(state["exp_avg_q"], state["exp_avg_absmax"],
                                                                       self.bits, self.blocksizes[0], p.numel())
                            and state["exp_avg_sq_q"].numel() == state["exp_avg_q"].numel())
                    if not fits:
                        raise ValueError(f"cannot continue this state_dict: the moments of a param of shape "
                                         f"{tuple(p.shape)} were saved rank-1 normalised, which does not fit this "
                                         f"{type(self).__name__} ({self.bits}-bit, blocks of {self.blocksizes[0]}, "
                                         f"exp_avg_sq_norm={self.exp_avg_sq_norm!r})")
                elif "exp_avg_q" in state and (self._rank1(p) or not all(
                        quantized_moment_fits(state[f"{key}_q"], state[f"{key}_absmax"], self.bits, bs, p.numel())
                        for key, bs in zip(("exp_avg", "exp_avg_sq"), self.blocksizes))):
                    raise ValueError(f"cannot continue this state_dict: the moments of a param of shape "
                                     f"{tuple(p.shape)} were saved in another format than this "
                                     f"{type(self).__name__}'s ({self.bits}-bit, blocks of {self.blocksizes}, "
                                     f"exp_avg_sq_norm={self.exp_avg_sq_norm!r})")
                for key in ("exp_avg", "exp_avg_sq"):  # fp32 moments (e.g. torch AdamW's): the param's size
                    if torch.is_tensor(state.get(key)) and state[key].numel() != p.numel():
                        raise ValueError(f"cannot continue this state_dict: its {key} has {state[key].numel()} "
                                         f"entries, the param of shape {tuple(p.shape)} {p.numel()}")
        super().load_state_dict(state_dict)
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            for pid, p in zip(saved_group["params"], group["params"]):
                for key, value in saved.get(pid, {}).items():
                    if key == "step":  # a CPU counter: no sync per step
                        self.state[p][key] = step_counter(value)
                    elif torch.is_tensor(value):
                        self.state[p][key] = value.to(device=p.device, copy=True)
                if "exp_avg_q" in self.state[p]:
                    self._adopt_codes(p, self.state[p])

    def _adopt_codes(self, p: torch.Tensor, state: dict) -> None:
        """Loaded moments in this optimizer's codes (re-quantized where saved with others), so
        that they share the code tensors of fresh state and step in the same calls."""
        for key, code, bs in zip(("exp_avg", "exp_avg_sq"), self._codes_on(p.device), self.blocksizes):
            saved = state[key + "_code"]
            if key == "exp_avg_sq" and "exp_avg_sq_row" in state:
                if not torch.equal(saved, code):
                    values = dequantize_rank1_ref(state["exp_avg_sq_q"], state["exp_avg_sq_row"], state["exp_avg_sq_col"],
                                              saved, self.bits)
                    self._quantize_second_moment(p, state, values, code)
            elif not torch.equal(saved, code):
                values = dequantize_blockwise(state[key + "_q"], state[key + "_absmax"], saved, bs, self.bits,
                                              [p.numel()])
                self._quantize_state(state, key, values, code, bs)
            state[key + "_code"] = code


class AdamW8bit(_BlockwiseAdamW):
    """AdamW with 8-bit block-wise moments. First moment: the dynamic signed code, blocks
    of 256, nearest rounding. Second moment: a log-spaced code (256 entries from 1e-8 to 1:
    the same relative precision at every magnitude; no 0), blocks of 2048, stochastic
    rounding, so that its slow EMA (beta2 = 0.999 changes it by 0.1% a step, far below a
    code gap) is not stalled. Without 0 in the code, a second moment below 1e-8 of its
    block's largest is stored as that floor, never as 0: with a 0 entry, an entry whose
    gradient was ~1e-4 of its block's and then stopped kept m != 0 (the first moment's code
    reaches 1e-7) with v rounded to 0, and moved by m / eps (hundreds of times torch AdamW's
    step). State: about 2.02 bytes per parameter instead of 8."""
    bits = 8
    default_blocksizes = (256, 2048)
    default_stochastic_moments = (False, True)


class AdamW4bit(_BlockwiseAdamW):
    """AdamW with 4-bit block-wise moments (after Li et al. 2023): the dynamic signed 4-bit
    code for the first moment (blocks of 128) and a zero-free log-spaced code for the second
    (16 entries from 1e-3 to 1; blocks of 256), both re-quantized with stochastic rounding.
    State: about 1.05 bytes per parameter. Why these choices (measured on the digits MLP of
    tests/test_optim.py, final loss vs torch AdamW): nearest rounding of the first moment
    lags by +175% (small entries round to 0); a code with 0 for the second moment can turn
    an update into m / eps and diverge; a log range of 3 decades stays within ~1.5% across
    learning rates and seeds, where 4 decades lands 6-10% off (coarser steps add noise
    that, through 1/sqrt(v), inflates the updates). ``exp_avg_sq_norm="rank1"`` switches to
    Li et al.'s rank-1 normalisation of the second moment (see ``_BlockwiseAdamW``).
    """
    bits = 4
    default_blocksizes = (128, 256)
    default_stochastic_moments = (True, True)

    def _default_code(self, first_moment: bool) -> torch.Tensor:
        if first_moment:
            return quant.dynamic_code(4, signed=True)
        if self.exp_avg_sq_norm == "rank1":
            return super()._default_code(first_moment)
        return quant.log_code(4, decades=3.0, zero=False)


def state_bytes_per_param(optimizer: torch.optim.Optimizer) -> float:
    """Bytes of optimizer state per parameter element (codes and step counters excluded)."""
    total_state, total_params = 0, 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            total_params += p.numel()
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and key not in ("step", "exp_avg_code", "exp_avg_sq_code"):
                    total_state += value.numel() * value.element_size()
    return total_state / max(total_params, 1)
