"""References of the lora ops: plain PyTorch in fp64 (the inputs' dtype for the results),
the dropout mask drawn element by element from the Philox reference."""
from __future__ import annotations

import torch

from .quant import philox_random16_ref


def lora_dropout_mask_ref(seed: int, n: int, d_in: int, p: float) -> torch.Tensor:
    """The factor (0 or 65536 / (65536 - threshold)) that multiplies each element of an
    [n, d_in] input: kept when its 16 Philox bits (offset 0, index row * d_in + col) are
    >= threshold = round(p * 65536) (at most 65535)."""
    threshold = min(int(p * 65536.0 + 0.5), 65535)
    if threshold == 0:
        return torch.ones(n, d_in, dtype=torch.float64)
    bits = philox_random16_ref(seed, 0, torch.arange(n * d_in, dtype=torch.int64)).view(n, d_in)
    # the kernels scale by the fp32 value 65536 / (65536 - threshold)
    keep_scale = float(torch.tensor(65536.0 / (65536 - threshold), dtype=torch.float32))
    return (bits >= threshold).to(torch.float64) * keep_scale


def _forward64(x, weight, bias, lora_a, lora_b, core, rank_scale, scale, mask):
    xd = x.double() * mask.to(x.device)
    xa = xd @ lora_a.double().t()
    h = xa * rank_scale.double() if rank_scale is not None else xa
    if core is not None:
        h = h @ core.double().t()
    y = x.double() @ weight.double().t() + scale * (h @ lora_b.double().t())
    if bias is not None:
        y = y + bias.double()
    return y, xa


def lora_forward_ref(x, weight, bias, lora_a, lora_b, core=None, rank_scale=None, scale=1.0, dropout_p=0.0,
                     seed=0, seed_tensor=None):
    seed = int(seed_tensor) if seed_tensor is not None else seed
    mask = lora_dropout_mask_ref(seed, x.shape[0], x.shape[1], dropout_p)
    y, xa = _forward64(x, weight, bias, lora_a, lora_b, core, rank_scale, scale, mask)
    return y.to(x.dtype), xa.to(x.dtype)


def lora_backward_ref(grad_y, x, weight, lora_a, lora_b, core, rank_scale, xa, scale, dropout_p, seed,
                      seed_tensor=None, output_mask=(True, True, True, True, True)):
    """Autograd through the fp64 forward (xa is recomputed: it is a function of x and A)."""
    seed = int(seed_tensor) if seed_tensor is not None else seed
    mask = lora_dropout_mask_ref(seed, x.shape[0], x.shape[1], dropout_p)
    leaves = [t.detach().double().requires_grad_(t is not None) if t is not None else None
              for t in (x, lora_a, lora_b, core, rank_scale)]
    xd, ad, bd, cd, rd = leaves
    y, _ = _forward64(xd, weight, None, ad, bd, cd, rd, scale, mask)
    wanted = [t for t, m in zip(leaves, output_mask) if m and t is not None]
    grads = iter(torch.autograd.grad(y, wanted, grad_y.double()) if wanted else [])
    out = []
    for t, m in zip(leaves, output_mask):
        out.append(next(grads).to(x.dtype) if (m and t is not None) else x.new_empty(0))
    return tuple(out)


def lora_merge_ref(weight, lora_a, lora_b, core=None, rank_scale=None, scale=1.0) -> torch.Tensor:
    """The merged weight (a new tensor; the op updates weight in place)."""
    left = lora_b.double() @ core.double() if core is not None else lora_b.double()
    if rank_scale is not None:
        left = left * rank_scale.double()
    return (weight.double() + scale * (left @ lora_a.double())).to(weight.dtype)
