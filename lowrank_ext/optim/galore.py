"""GaLore AdamW (Zhao et al. 2024): Adam on a low-rank projection of each 2-D gradient.

For a weight gradient G [m, n] the optimizer keeps a projection P, refreshed every
``update_proj_gap`` steps from G's top-``rank`` singular vectors (the `std` rule of the
published code: the right factor Vh_r [r, n] when m >= n, R = G P^T; else the left one
U_r [m, r], R = P^T G), runs Adam on R (state 2 r max(m, n) instead of 2 m n) and applies
the normalised update projected back, times ``scale``. What this implementation adds:

- every parameter due for a refresh in a step is refreshed in **one batched randomized SVD
  per shape** (``torch.ops.lowrank.batched_rsvd`` on the gradients, which the CPU reads where
  they lie, with no stacked copy; ``proj_method="svd"`` takes the full LAPACK SVD, as the
  published code does);
- the update ``W <- (1 - lr wd) (W - s P N)`` is one in-place op (``galore_apply_``: the
  product computed tile by tile and added as W is read and written, the decoupled weight
  decay folded in; no [m, n] temporary);
- ``state_bits`` 8 or 4 keeps Adam's moments block-wise quantized (the codes and block sizes
  of ``AdamW8bit`` / ``AdamW4bit``), updated by the fused multi-tensor quantized AdamW op
  (one pass: dequantize, fp32 update, re-quantize) on the projected gradients.

Parameters that are not 2-D, or whose smaller side is not above ``rank``, or in a param
group with ``rank=None``, get the same Adam update on the full gradient. State (projection,
its side, moments, step) lives in ``optimizer.state`` and round-trips through
``state_dict``: a resumed run continues identically (the refresh schedule is the step count
and the randomized SVD's seed is a function of ``seed`` and the step).

``mode="fira"`` adds the gradient outside the subspace, G - back(R), scaled per column
(left projection) or row (right) of R by ||Adam direction|| / ||R|| and limited to 1.01x
norm growth per step (Fira, Chen et al. 2024); ``mode="frugal"`` adds a state-free signSGD
step lr * sign(G - back(R)) there (FRUGAL), both inside the same op: G is read once
(Fira: twice, on CPU and CUDA, since the limiter needs the scaled residual's norm before
anything is written; no [m, n] temporary on either).

``proj_bits`` 8 or 4 stores each projection block-wise quantized with a linear (integer)
code, dequantized each step for the two projection GEMMs (Q-GaLore's INT8/INT4
projections). ``adaptive_refresh=t`` stops refreshing a layer once ``refresh_patience``
consecutive refreshes found a subspace overlapping the previous one by at least t
(||P_old^T P_new||_F^2 / r, Q-GaLore's similarity rule taken on subspaces, so SVD signs and
rotations do not matter): its SVDs are saved from then on.

``warm_start_n_iter=w`` (rsvd only, w >= 1) starts each refresh of a param that has a
projection from that projection: rsvd's ``start`` is its r directions, to which rsvd adds
``oversample`` Gaussian ones, and it runs ``w`` power iterations instead of ``n_iter`` from a
fresh sketch, as PowerSGD warm-starts its power iteration. ``w = 1`` makes 3 products with G
instead of the cold refresh's 6 (n_iter 2), plus a thin sketch of ``oversample`` columns: on
the 2-core dev VM a refresh step of 12 x 2048^2 at rank 128 then takes 0.57-0.76x the time
(benchmarks/README.md). Its accuracy depends on how far the subspace moved since the last
refresh: on the galore benchmark's synthetic drift it beats the cold refresh (1.0034x the
optimal rank-r error against 1.0101x); on a digits MLP's real gradients
(``tools/galore_warm_start_grads.py``) it stays within 1% of optimal but trails the cold
default (within 0.1% there), and trails a cold refresh with one iteration early in training
(1.009 against 1.002-1.003x), leading it later; from an unrelated subspace it is a poor start
(a random one measured 1.012-1.017x against the cold refresh's <= 1.002x). Off by default.
It cannot be combined with ``adaptive_refresh``: a warm refresh is biased toward the
projection it starts from, so its overlap with that projection overstates how settled the
subspace is.

The projection and the update are the galore ops (``lowrank_ext.ops.galore``): a quantized
projection is dequantized inside them as it is loaded, and the update, Fira's or FRUGAL's
residual included, is one in-place call per parameter.

Example::

    import torch
    from lowrank_ext.optim import GaLoreAdamW
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    opt = GaLoreAdamW(model.parameters(), lr=1e-3, rank=32, update_proj_gap=50, state_bits=8)
    model(torch.randn(64, 256)).square().mean().backward()
    opt.step()
    opt.zero_grad()
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable

import torch

from .. import quant
from ..ops.svd import batched_rsvd
from ..ops.galore import galore_apply_, galore_project
from ..ops.optim import adamw_step_quantized_
from .adamw import (SettingsPickle, check_param_group, check_saved_groups, check_steppable, is_real_number,
                    quantized_moment_fits)
from ..ops.quant import dequantize_blockwise, quantize_blockwise

__all__ = ["GaLoreAdamW"]

# bits -> (first-moment code, second-moment code, block sizes, stochastic rounding (m, v)): AdamW8bit's / AdamW4bit's
_STATE_FORMATS = {
    8: (lambda: quant.dynamic_code(8, signed=True), lambda: quant.log_code(8, decades=8.0, zero=False), (256, 2048),
        (False, True)),
    4: (lambda: quant.dynamic_code(4, signed=True), lambda: quant.log_code(4, decades=3.0, zero=False), (128, 256),
        (True, True)),
}


_CPU = torch.device("cpu")
_FIRA_GAMMA = 1.01  # Fira's norm-growth limit
_PROJ_BLOCKSIZE = {8: 256, 4: 128}  # proj_bits -> block size of the INT8 / INT4 (linear code) projections


def _proj_state_fits(state: dict, proj_bits: int) -> bool:
    """Whether a saved param state's projection (if any) can be read with proj_bits: 32-bit is
    "proj"; 8- and 4-bit are "proj_q" + "proj_absmax", whose counts must agree with that format
    (one byte per entry or two entries per byte, blocks of _PROJ_BLOCKSIZE)."""
    if "proj" in state:
        return proj_bits == 32
    if "proj_q" not in state:
        return True  # no projection yet
    if proj_bits == 32 or "proj_absmax" not in state:
        return False
    q, blocks = state["proj_q"].numel(), state["proj_absmax"].numel()
    entries = q * (8 // proj_bits)  # the entries, or one more for an odd count at 4 bits
    bs = _PROJ_BLOCKSIZE[proj_bits]
    return blocks in (-(-entries // bs), -(-(entries - 1) // bs))


def _mix(*values: int) -> int:
    h = 0x243F6A8885A308D3
    for v in values:
        h = ((h ^ (v & ((1 << 64) - 1))) * 0x9E3779B97F4A7C15) & ((1 << 64) - 1)
        h ^= h >> 29
    return h & ((1 << 63) - 1)


def _check_galore_group(group: dict) -> None:
    """The GaLore options of a group (or of the constructor); absent ones take the defaults."""
    rank, gap = group.get("rank"), group.get("update_proj_gap", 1)
    if rank is not None and not (isinstance(rank, int) and rank >= 1):
        raise ValueError(f"rank must be a positive int or None, got {rank!r}")
    if not (isinstance(gap, int) and gap >= 1):
        raise ValueError(f"update_proj_gap must be a positive int, got {gap!r}")
    scale = group.get("scale", 1.0)
    if not (is_real_number(scale) and math.isfinite(float(scale))):
        raise ValueError(f"scale must be a finite number, got {scale!r}")


class GaLoreAdamW(SettingsPickle, torch.optim.Optimizer):
    """GaLore AdamW (see the module docstring for the method and what this implementation adds).

    Group options: ``lr`` (1e-3), ``betas``, ``eps``, ``weight_decay`` (0.0, the published code's
    default; torch AdamW's is 1e-2), ``rank`` (128; None: plain Adam for the group),
    ``update_proj_gap`` (200 steps between refreshes), ``scale`` (0.25). Optimizer options:
    ``state_bits`` (32, 8 or 4: Adam's moments), ``proj_bits`` (32, 8 or 4: the projections),
    ``mode`` ("galore", "fira" or "frugal"), ``proj_method`` ("rsvd", with ``oversample`` 10 and
    ``n_iter`` 2, or "svd"), ``seed`` (the refreshes' sketches), ``warm_start_n_iter`` (None: every
    refresh sketches afresh; w >= 1: refreshes start from the current projection, w power
    iterations; not with ``adaptive_refresh``),
    ``adaptive_refresh`` (None, or a similarity threshold in (0, 1], with ``refresh_patience`` 2).
    torch AdamW's ``foreach`` /
    ``fused`` are accepted and change nothing; ``maximize``, ``amsgrad``, ``capturable`` and
    ``differentiable`` must stay False. A group's rank cannot change once its params have state.

    Example::

        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 10))
        opt = GaLoreAdamW(model.parameters(), lr=1e-3, rank=8, update_proj_gap=50, state_bits=8)
        model(torch.randn(16, 64)).square().mean().backward()
        opt.step()
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, rank: int | None = 128, update_proj_gap: int = 200,
                 scale: float = 0.25, state_bits: int = 32, proj_method: str = "rsvd", oversample: int = 10,
                 n_iter: int = 2, seed: int = 0, mode: str = "galore", proj_bits: int = 32,
                 adaptive_refresh: float | None = None, refresh_patience: int = 2,
                 warm_start_n_iter: int | None = None, maximize: bool = False,
                 amsgrad: bool = False, foreach: bool | None = None, fused: bool | None = None,
                 capturable: bool = False, differentiable: bool = False):
        # torch.optim.AdamW's keywords are accepted (drop-in, as AdamW8bit's): foreach / fused
        # change nothing, the others must stay False
        check_param_group(dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize,
                               amsgrad=amsgrad, capturable=capturable, differentiable=differentiable),
                          type(self).__name__)
        _check_galore_group(dict(rank=rank, update_proj_gap=update_proj_gap))
        if state_bits not in (32, 8, 4):
            raise ValueError(f"state_bits must be 32, 8 or 4, got {state_bits!r}")
        if proj_bits not in (32, 8, 4):
            raise ValueError(f"proj_bits must be 32, 8 or 4, got {proj_bits!r}")
        if adaptive_refresh is not None and not 0.0 < adaptive_refresh <= 1.0:
            raise ValueError(f"adaptive_refresh must be a threshold in (0, 1] or None, got {adaptive_refresh!r}")
        if not (isinstance(refresh_patience, int) and refresh_patience >= 1):
            raise ValueError(f"refresh_patience must be a positive int, got {refresh_patience!r}")
        if mode not in ("galore", "fira", "frugal"):
            raise ValueError(f"mode must be 'galore', 'fira' or 'frugal', got {mode!r}")
        if proj_method not in ("rsvd", "svd"):
            raise ValueError(f"proj_method must be 'rsvd' or 'svd', got {proj_method!r}")
        if warm_start_n_iter is not None:
            # 0 would only re-fit the old subspace (plus oversample random directions): it never moves
            if not (isinstance(warm_start_n_iter, int) and not isinstance(warm_start_n_iter, bool)
                    and warm_start_n_iter >= 1):
                raise ValueError(f"warm_start_n_iter must be None or an int >= 1, got {warm_start_n_iter!r}")
            if proj_method != "rsvd":
                raise ValueError("warm_start_n_iter warm-starts the randomized SVD: it needs proj_method='rsvd'")
            if adaptive_refresh is not None:
                raise ValueError("warm_start_n_iter and adaptive_refresh cannot be combined: a warm-started refresh "
                                 "is biased toward the projection it starts from, so the adaptive rule's overlap "
                                 "with that projection would freeze layers whose subspace still moves")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                        update_proj_gap=update_proj_gap, scale=scale)
        super().__init__(params, defaults)
        self.state_bits, self.proj_method = state_bits, proj_method
        self.oversample, self.n_iter, self.seed, self.mode = oversample, n_iter, seed, mode
        self.proj_bits, self.adaptive_refresh, self.refresh_patience = proj_bits, adaptive_refresh, refresh_patience
        self.warm_start_n_iter = warm_start_n_iter
        self._proj_codes: dict[torch.device, torch.Tensor] = {}
        self._codes: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._build_cpu_codes()

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)  # the caches start empty
        self._build_cpu_codes()

    def _build_cpu_codes(self) -> None:
        # at construction, not in the first step(), which torch.compile may be tracing: Dynamo
        # traces past the code builders' lru_cache (and warns)
        if self.state_bits != 32:
            self._codes_on(_CPU)
        if self.proj_bits != 32:
            self._proj_code(_CPU)

    def add_param_group(self, param_group: dict) -> None:
        stepped = {**self.defaults, **param_group}  # the group as it will step
        check_param_group(stepped, type(self).__name__)
        _check_galore_group(stepped)
        super().add_param_group(param_group)

    _SETTINGS = ("state_bits", "proj_method", "oversample", "n_iter", "seed", "mode", "proj_bits",
                 "adaptive_refresh", "refresh_patience", "warm_start_n_iter")
    warm_start_n_iter: int | None = None  # what optimizers pickled before the setting existed have
    _CACHES = ("_proj_codes", "_codes")

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _uses_galore(p: torch.Tensor, group: dict) -> bool:
        return group["rank"] is not None and p.dim() == 2 and group["rank"] < min(p.shape)

    def _codes_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._codes:
            if _CPU not in self._codes:
                code_m, code_v = _STATE_FORMATS[self.state_bits][:2]
                self._codes[_CPU] = (code_m(), code_v())
            self._codes[device] = tuple(c.to(device) for c in self._codes[_CPU])
        return self._codes[device]

    def _init_quantized(self, state: dict, numel: int, device: torch.device) -> None:
        code_m, code_v = self._codes_on(device)
        bs_m, bs_v = _STATE_FORMATS[self.state_bits][2]
        zeros = torch.zeros(numel, device=device)
        state["exp_avg_q"], state["exp_avg_absmax"] = quantize_blockwise(zeros, code_m, bs_m, self.state_bits)
        state["exp_avg_sq_q"], state["exp_avg_sq_absmax"] = quantize_blockwise(zeros, code_v, bs_v, self.state_bits)

    def _projection(self, state: dict, shape: tuple[int, int], rank: int) -> torch.Tensor:
        """The fp32 projection: as stored, or dequantized from its 8/4-bit blocks."""
        if self.proj_bits == 32:
            return state["proj"]
        m, n = shape
        proj_shape = [rank, n] if state["proj_right"] else [m, rank]
        code = self._proj_code(state["proj_q"].device)
        return dequantize_blockwise(state["proj_q"], state["proj_absmax"], code, _PROJ_BLOCKSIZE[self.proj_bits],
                                    self.proj_bits, proj_shape)

    def _projection_args(self, state: dict, rank: int) -> tuple:
        """(proj, absmax, code, blocksize) as the galore ops take the stored projection."""
        if self.proj_bits == 32:
            return state["proj"], None, None, 0
        return (state["proj_q"], state["proj_absmax"], self._proj_code(state["proj_q"].device),
                _PROJ_BLOCKSIZE[self.proj_bits])

    def _proj_code(self, device: torch.device) -> torch.Tensor:
        if device not in self._proj_codes:
            if _CPU not in self._proj_codes:
                self._proj_codes[_CPU] = quant.linear_code(self.proj_bits, signed=True)
            self._proj_codes[device] = self._proj_codes[_CPU].to(device)
        return self._proj_codes[device]

    def _refresh(self, items: list[tuple[torch.Tensor, dict, dict]], step: int) -> dict[torch.Tensor, torch.Tensor]:
        """New projections for params of one shape and device, from their current grads.
        Returns, for fp32 projections, each param's projected gradient, which the SVD has
        already formed: P^T G = S_r Vh_r (left), G Q = U_r S_r (right), saving a GEMM pass
        over G. Exact (in exact arithmetic) for a full SVD, and for rsvd's left factor, as
        rsvd finds the column space (A ~ Q Q^T A): a right projection takes it from rsvd(G^T).
        With warm starts, a call warm-starts when every param in it has a projection (params
        are grouped by step count, so a call holds only new params or only older ones)."""
        has_proj = ["proj_right" in state for _, state, _ in items]
        warm = self.warm_start_n_iter is not None and all(has_proj)
        rank = items[0][2]["rank"]
        m, n = items[0][0].shape
        grads = [p.grad.float() for p, _, _ in items]  # batched_rsvd reads them where they lie
        right = m >= n
        seed = _mix(self.seed, step, m, n)
        # the current projections, where a warm start or the adaptive rule reads them
        reads_old = warm or self.adaptive_refresh is not None
        olds = [self._projection(state, (m, n), rank) if h and reads_old else None
                for (_, state, _), h in zip(items, has_proj)]
        # a warm start is the current basis: P [m, r] (left), or P^T [n, r] (right: rsvd of G^T)
        start = torch.stack([o.t() if right else o for o in olds]) if warm else None
        n_iter = self.n_iter if start is None else self.warm_start_n_iter
        if self.proj_method == "svd":
            u, s, vh = torch.linalg.svd(torch.stack(grads), full_matrices=False)
            u, s, vh = u[..., :rank], s[..., :rank], vh[..., :rank, :]
        elif right:
            # the range finder on G^T, whose left factor is G's right one: rsvd's left factor
            # is the one the identity P^T A = S_r Vh_r holds for exactly (A ~ Q Q^T A, not A Q Q^T)
            ut, s, vht = batched_rsvd([g.mT for g in grads], rank, self.oversample, n_iter, seed, start)
            u, vh = vht.mT, ut.mT
        else:
            u, s, vh = batched_rsvd(grads, rank, self.oversample, n_iter, seed, start)
        projected = {}
        if self.proj_bits == 32:
            low = (u * s.unsqueeze(-2) if right else s.unsqueeze(-1) * vh).contiguous()
            projected = {p: low[i] for i, (p, _, _) in enumerate(items)}
        for i, (_, state, _) in enumerate(items):
            new = (vh[i] if right else u[i]).contiguous()
            if self.adaptive_refresh is not None and olds[i] is not None:
                # Q-GaLore's rule on subspaces (sign- and rotation-free): ||P_old^T P_new||_F^2 / r
                old = olds[i]
                overlap = float(((old @ new.t()) if right else (old.t() @ new)).square().sum()) / rank
                similar = state.get("refresh_similar", 0) + 1 if overlap >= self.adaptive_refresh else 0
                state["refresh_similar"] = similar
                state["proj_frozen"] = similar >= self.refresh_patience
            # a bool, not "left"/"right": torch's load_state_dict would iterate a str
            state["proj_right"] = right
            if self.proj_bits == 32:
                state["proj"] = new
            else:
                state["proj_q"], state["proj_absmax"] = quantize_blockwise(
                    new, self._proj_code(new.device), _PROJ_BLOCKSIZE[self.proj_bits], self.proj_bits)
        return projected

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        due: dict[tuple, list] = defaultdict(list)
        for group in self.param_groups:
            check_param_group(group, type(self).__name__)  # also a flag set on the group after construction
            _check_galore_group(group)
            for p in group["params"]:
                if p.grad is None:
                    continue
                check_steppable(p, "GaLoreAdamW")
                state = self.state[p]
                galore = self._uses_galore(p, group)
                # the rank the state was made at (None: full Adam), stamped at a param's first step
                if "proj_rank" in state and state["proj_rank"] != (group["rank"] if galore else None):
                    # its moments are [rank, n] (or [m, rank]): they cannot step at another rank
                    made = state["proj_rank"] if state["proj_rank"] is not None else "None (full Adam)"
                    raise ValueError(f"GaLoreAdamW: a param of shape {tuple(p.shape)} has state at rank {made}, "
                                     f"but its group's rank is now {group['rank']!r}; a rank cannot change mid-run "
                                     f"(start a new optimizer, or put the param in a new group before its first step)")
                step = int(state.get("step", 0))
                due_now = "proj_right" not in state or step % group["update_proj_gap"] == 0
                if galore and due_now and not state.get("proj_frozen", False):
                    due[(tuple(p.shape), p.device, group["rank"], step)].append((p, state, group))
                work.append((p, state, group, galore))
        for p, state, group, galore in work:  # every check passed: the new params' state begins
            state.setdefault("step", 0)
            state.setdefault("proj_rank", group["rank"] if galore else None)
        projected = {}  # param -> its projected gradient, where a refresh formed it
        for (_, _, _, step), items in due.items():  # one batched (randomized) SVD per shape
            projected.update(self._refresh(items, step))
        # Project, then Adam per (group, device, step) bucket: fp32 moments in one foreach call
        # per elementwise op (not one call per param and op); quantized moments in one fused
        # multi-tensor call (dequantize -> fp32 update -> re-quantize)
        buckets: dict[tuple, list] = defaultdict(list)
        for p, state, group, galore in work:
            g = p.grad.float() if not galore else None
            proj = None
            if galore:
                proj = self._projection_args(state, group["rank"])
                g = projected.get(p)
                if g is None:
                    g = galore_project(p.grad, *proj[:3], rank=group["rank"], blocksize=proj[3],
                                       right=bool(state["proj_right"]))
            state["step"] = step = int(state["step"]) + 1
            if self.state_bits != 32 and "exp_avg_q" not in state:
                self._init_quantized(state, g.numel(), p.device)
            buckets[(id(group), p.device, step)].append((p, state, group, proj, g))
        for bucket_no, ((_, device, step), items) in enumerate(buckets.items()):
            if self.state_bits == 32:
                updates = self._adam_fp32(items, step)
            else:
                updates = self._adam_quantized(items, device, step, bucket_no)
            self._apply_full(items, updates)
            for (p, state, group, proj, g), update in zip(items, updates):
                if proj is not None:
                    self._apply(p, state, group, proj, update, g)
        return loss

    @staticmethod
    def _adam_fp32(items: list, step: int) -> list[torch.Tensor]:
        """The published code's Adam direction m / (sqrt(v) + eps) sqrt(1 - beta2^t) / (1 - beta1^t)
        for one bucket (one group: one set of betas and eps)."""
        group = items[0][2]
        beta1, beta2 = group["betas"]
        for _, state, _, _, g in items:
            if "exp_avg" not in state:
                state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(g), torch.zeros_like(g)
        m = [it[1]["exp_avg"] for it in items]
        v = [it[1]["exp_avg_sq"] for it in items]
        g = [it[4] for it in items]
        torch._foreach_mul_(m, beta1)
        torch._foreach_add_(m, g, alpha=1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, g, g, value=1 - beta2)
        denominators = torch._foreach_sqrt(v)
        torch._foreach_add_(denominators, group["eps"])
        directions = torch._foreach_div(m, denominators)
        torch._foreach_mul_(directions, math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step))
        return directions

    def _adam_quantized(self, items: list, device: torch.device, step: int, bucket_no: int) -> list[torch.Tensor]:
        """The fused quantized AdamW op run on zero buffers with lr = 1 and no decay leaves
        minus the bias-corrected direction m^ / (sqrt(v^) + eps) in them (torch AdamW's eps placement;
        the fp32 path keeps the published code's m / (sqrt(v) + eps) sqrt(bc2) / bc1: they
        differ only where sqrt(v^) is within a few eps)."""
        group = items[0][2]
        beta1, beta2 = group["betas"]
        code_m, code_v = self._codes_on(device)
        (bs_m, bs_v), (sr_m, sr_v) = _STATE_FORMATS[self.state_bits][2:]
        outs = [torch.zeros(g.shape, device=device) for *_, g in items]
        states = [it[1] for it in items]
        adamw_step_quantized_(outs, [g.contiguous() for *_, g in items],
                              [s["exp_avg_q"] for s in states], [s["exp_avg_absmax"] for s in states],
                              [s["exp_avg_sq_q"] for s in states], [s["exp_avg_sq_absmax"] for s in states],
                              code_m, code_v, lr=1.0, beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=0.0,
                              step=step, bits=self.state_bits, blocksize_exp_avg=bs_m, blocksize_exp_avg_sq=bs_v,
                              seed=_mix(self.seed, step, bucket_no), stochastic_exp_avg=sr_m,
                              stochastic_exp_avg_sq=sr_v)
        return [o.neg_() for o in outs]

    @staticmethod
    def _apply_full(items: list, directions: list[torch.Tensor]) -> None:
        """The params of a bucket that are not GaLore params: W <- (1 - lr wd) (W - lr direction),
        Adam on the full gradient (in foreach calls, as the moments)."""
        full = [(p, d) for (p, _, _, proj, _), d in zip(items, directions) if proj is None]
        if not full:
            return
        group = items[0][2]
        lr, decay = group["lr"], 1.0 - group["lr"] * group["weight_decay"]
        targets = [p if p.dtype == torch.float32 else p.float() for p, _ in full]
        torch._foreach_mul_(targets, decay)
        torch._foreach_add_(targets, [d for _, d in full], alpha=-lr * decay)
        for (p, _), target in zip(full, targets):
            if target is not p:
                p.copy_(target)

    def _apply(self, p: torch.Tensor, state: dict, group: dict, proj: tuple, direction: torch.Tensor,
               low: torch.Tensor) -> None:
        """W <- (1 - lr wd) (W - lr * scale * back(direction) [- the residual step]): for GaLore
        params one ``galore_apply_`` call, which reads W, the projection (dequantized as it
        loads) and, for Fira / FRUGAL, G (twice for Fira), with no [m, n] temporary (the published
        code's decoupled weight decay, applied after the update)."""
        lr = group["lr"]
        prev = None
        if self.mode == "fira":  # 0: no limit before the first residual
            prev = state.setdefault("fira_prev_norm", torch.zeros(1, device=p.device))
        grad = None
        if self.mode != "galore":  # the op reads G in the param's dtype (a grad_dtype grad is cast)
            grad = p.grad if p.grad.dtype == p.dtype else p.grad.to(p.dtype)
        galore_apply_(p, direction, *proj[:3], rank=group["rank"], blocksize=proj[3], right=bool(state["proj_right"]),
                      lr=lr, scale=group["scale"], weight_decay=group["weight_decay"], mode=self.mode,
                      grad=grad, low=low if self.mode != "galore" else None,
                      residual_prev_norm=prev, residual_growth=_FIRA_GAMMA)

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, except that state keeps its dtypes (torch casts floating state to the
        param's dtype: bf16 params would get bf16 moments and projections)."""
        check_saved_groups(state_dict, type(self).__name__, _check_galore_group)
        for saved_group in state_dict["param_groups"]:  # e.g. torch AdamW's: full-size moments, no schedule
            missing = [k for k in ("rank", "update_proj_gap", "scale") if k not in saved_group]
            if missing:
                raise ValueError(f"cannot continue this state_dict: its param groups have no {', '.join(missing)} "
                                 f"(not saved by a GaLoreAdamW)")
        for saved_state in state_dict["state"].values():  # moments in another format would restart from zero
            kind = "fp32" if "exp_avg" in saved_state else "quantized" if "exp_avg_q" in saved_state else None
            if kind is not None and (kind == "fp32") != (self.state_bits == 32):
                raise ValueError(f"this state_dict holds {kind} moments; this GaLoreAdamW has "
                                 f"state_bits={self.state_bits}")
            if kind == "quantized" and not all(
                    quantized_moment_fits(saved_state[f"{key}_q"], saved_state[f"{key}_absmax"], self.state_bits, bs)
                    for key, bs in zip(("exp_avg", "exp_avg_sq"), _STATE_FORMATS[self.state_bits][2])):
                raise ValueError(f"this state_dict holds quantized moments in another format than state_bits="
                                 f"{self.state_bits}")
            if not _proj_state_fits(saved_state, self.proj_bits):
                raise ValueError(f"this state_dict holds projections in another format than proj_bits="
                                 f"{self.proj_bits} ({'32-bit' if 'proj' in saved_state else 'quantized'})")
        super().load_state_dict(state_dict)
        saved = state_dict["state"]
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            for pid, p in zip(saved_group["params"], group["params"]):
                for key, value in saved.get(pid, {}).items():
                    if torch.is_tensor(value):
                        self.state[p][key] = value.to(device=p.device, copy=True)
