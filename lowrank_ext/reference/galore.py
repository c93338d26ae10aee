"""The published GaLore AdamW step (Zhao et al. 2024; the `std` projection of the authors'
release), in plain torch: full SVD (torch.linalg.svd) of the gradient every
``update_proj_gap`` steps, fp32 Adam on the projected gradient, the normalised update
projected back, scaled, applied, then decoupled weight decay. The reference the optimizer
in lowrank_ext.optim.galore is tested against; it is not an op reference (GaLore has no
op of its own yet)."""
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


@torch.no_grad()
def galore_adamw_step_ref(param: torch.Tensor, grad: torch.Tensor, state: dict, *, lr: float, betas=(0.9, 0.999),
                          eps: float = 1e-8, weight_decay: float = 0.0, rank: int | None = None,
                          update_proj_gap: int = 200, scale: float = 0.25) -> None:
    """One step on one parameter, in place; `state` starts as {} (rank None: plain AdamW)."""
    step = state.get("step", 0)
    g = grad.float()
    if rank is not None:
        if "proj" not in state or step % update_proj_gap == 0:
            state["side"], state["proj"] = galore_projection_ref(g, rank)
        g = project_ref(state["side"], state["proj"], g)
    if "exp_avg" not in state:
        state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(g), torch.zeros_like(g)
    step += 1
    state["step"] = step
    beta1, beta2 = betas
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m.mul_(beta1).add_(g, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    step_size = lr * math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)
    update = m / (v.sqrt() + eps)
    if rank is not None:
        update = project_back_ref(state["side"], state["proj"], update) * scale
    new = param.float() - step_size * update
    if weight_decay > 0:
        new = new - lr * weight_decay * new
    param.copy_(new)
