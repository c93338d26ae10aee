"""The published GaLore AdamW step (Zhao et al. 2024; the `std` projection of the authors'
release), in plain torch: full SVD (torch.linalg.svd) of the gradient every
``update_proj_gap`` steps, fp32 Adam on the projected gradient, the normalised update
projected back, scaled, applied, then decoupled weight decay. The reference the optimizer
in lowrank_ext.optim.galore is tested against; and the references of the two galore ops
(`galore_project_ref`, `galore_apply_ref`), in fp64."""
from __future__ import annotations

import math

import torch


def galore_projection_ref(grad: torch.Tensor, rank: int) -> tuple[str, torch.Tensor]:
    """`std`: for G [m, n] with m >= n the right factor Vh[:r] [r, n] (R = G P^T); otherwise
    the left one U[:, :r] [m, r] (R = P^T G). LAPACK's signs, as the published code."""
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    if grad.shape[0] >= grad.shape[1]:
        return "right", vh[:rank]
    return "left", u[:, :rank]


def project_ref(side: str, proj: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return grad.float() @ proj.t() if side == "right" else proj.t() @ grad.float()


def project_back_ref(side: str, proj: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    return low @ proj if side == "right" else proj @ low


FIRA_GAMMA = 1.01  # Fira's norm-growth limit


def residual_ref(side: str, proj: torch.Tensor, grad: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """The gradient outside the subspace: G - P P^T G (left) or G - G P^T P (right)."""
    return grad.float() - project_back_ref(side, proj, low)


def fira_scaled_residual_ref(side: str, low: torch.Tensor, update: torch.Tensor, resid: torch.Tensor,
                             state: dict) -> torch.Tensor:
    """Fira (Chen et al. 2024): the residual times Adam's norm ratio ||N|| / ||R|| of the
    matching column of R (left projection, R [r, n]) or row (right, R [m, r]); then the
    norm-growth limiter: if ||S_t|| > 1.01 ||S_{t-1}|| > 0, S_t is scaled down to 1.01 ||S_{t-1}||."""
    dim = 0 if side == "left" else 1
    ratio = update.norm(dim=dim) / low.norm(dim=dim).clamp_min(1e-30)
    scaled = resid * (ratio[None, :] if side == "left" else ratio[:, None])
    norm = float(scaled.norm())
    prev = state.get("fira_prev_norm")
    if prev is not None and prev > 0 and norm > FIRA_GAMMA * prev:
        scaled = scaled * (FIRA_GAMMA * prev / norm)
        norm = FIRA_GAMMA * prev
    state["fira_prev_norm"] = norm
    return scaled


@torch.no_grad()
def galore_adamw_step_ref(param: torch.Tensor, grad: torch.Tensor, state: dict, *, lr: float, betas=(0.9, 0.999),
                          eps: float = 1e-8, weight_decay: float = 0.0, rank: int | None = None,
                          update_proj_gap: int = 200, scale: float = 0.25, mode: str = "galore") -> None:
    """One step on one parameter, in place; `state` starts as {} (rank None: plain AdamW).

    mode "galore": W -= step_size * scale * back(N). "fira": also lr * scale * the residual
    G - back(R), norm-scaled by Adam's bias-corrected direction and growth-limited
    (fira_scaled_residual_ref).
    "frugal": also lr * sign(G - back(R)), a state-free signSGD step outside the subspace."""
    step = state.get("step", 0)
    g = grad.float()
    low = g
    if rank is not None:
        if "proj" not in state or step % update_proj_gap == 0:
            state["side"], state["proj"] = galore_projection_ref(g, rank)
        low = project_ref(state["side"], state["proj"], g)
    if "exp_avg" not in state:
        state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(low), torch.zeros_like(low)
    step += 1
    state["step"] = step
    beta1, beta2 = betas
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m.mul_(beta1).add_(low, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(low, low, value=1 - beta2)
    step_size = lr * math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)
    update = m / (v.sqrt() + eps)
    new = param.float()
    if rank is not None:
        if mode != "galore":
            resid = residual_ref(state["side"], state["proj"], g, low)
            if mode == "fira":  # Adam's bias-corrected direction sets the ratio; the step is lr * scale * S
                direction = update * (math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step))
                new = new - lr * scale * fira_scaled_residual_ref(state["side"], low, direction, resid, state)
            else:
                new = new - lr * torch.sign(resid)
        update = project_back_ref(state["side"], state["proj"], update) * scale
    new = new - step_size * update
    if weight_decay > 0:
        new = new - lr * weight_decay * new
    param.copy_(new)


# ---- op references ----

def _projection_ref(proj, proj_absmax, proj_code, rank, blocksize, right, m, n) -> torch.Tensor:
    """P in fp64: as given, or dequantized from its block-wise form."""
    if proj.dtype != torch.uint8:
        return proj.double()
    from .quant import dequantize_blockwise_ref
    bits = 8 if proj_code.numel() == 256 else 4
    shape = [rank, n] if right else [m, rank]
    return dequantize_blockwise_ref(proj, proj_absmax, proj_code, blocksize, bits, shape).double()


def galore_project_ref(grad, proj, proj_absmax, proj_code, rank, blocksize, right):
    m, n = grad.shape
    p = _projection_ref(proj, proj_absmax, proj_code, rank, blocksize, right, m, n)
    g = grad.double()
    return (g @ p.t() if right else p.t() @ g).float()


_MODES = {0: "galore", 1: "fira", 2: "frugal"}


def galore_apply_ref(param, direction, proj, proj_absmax, proj_code, rank, blocksize, right, lr, scale,
                     weight_decay, residual_mode=0, grad=None, low=None, residual_prev_norm=None,
                     residual_growth=1.01):
    """In place, like the op: param <- (1 - lr wd)(param - lr scale back(D) - residual step), fp64."""
    m, n = param.shape
    side = "right" if right else "left"
    p = _projection_ref(proj, proj_absmax, proj_code, rank, blocksize, right, m, n)
    decay = 1.0 - lr * weight_decay
    step = -lr * scale * project_back_ref(side, p, direction.double())
    mode = _MODES[residual_mode]
    if mode != "galore":
        resid = grad.double() - project_back_ref(side, p, low.double())
        if mode == "fira":
            dim = 0 if side == "left" else 1
            ratio = direction.double().norm(dim=dim) / low.double().norm(dim=dim).clamp_min(1e-30)
            scaled = resid * (ratio[None, :] if side == "left" else ratio[:, None])
            norm = float(scaled.norm())
            prev = float(residual_prev_norm)
            if prev > 0 and norm > residual_growth * prev:
                scaled = scaled * (residual_growth * prev / norm)
                norm = residual_growth * prev
            residual_prev_norm.fill_(norm)
            step = step - lr * scale * scaled
        else:
            step = step - lr * torch.sign(resid)
    param.copy_((decay * (param.double() + step)).to(param.dtype))
