"""References of the multilora ops: a loop over adapters with boolean row masks, in fp64
(results in the ops' dtypes). Ids and ranks are checked as the CPU kernels check them."""
from __future__ import annotations

import torch


def _check(ids, ranks, num_adapters, max_rank, op):
    if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= num_adapters):
        raise IndexError(f"{op}: token_adapter_ids out of range for a stack of {num_adapters} adapters")
    if ranks is not None and ranks.numel() and (int(ranks.min()) < 0 or int(ranks.max()) > max_rank):
        raise RuntimeError(f"{op}: ranks outside [0, R] = [0, {max_rank}]")


def _rank(ranks, a, max_rank):
    return max_rank if ranks is None else int(ranks[a])


def _scale(scales, a):
    return 1.0 if scales is None else float(scales[a])


def lora_shrink_ref(x, a_stack, token_adapter_ids, ranks=None, scales=None):
    s, max_rank, _ = a_stack.shape
    _check(token_adapter_ids, ranks, s, max_rank, "lora_shrink")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.zeros(x.shape[0], max_rank, dtype=torch.float64, device=x.device)
    for a in range(s):
        rows = token_adapter_ids == a
        rk = _rank(ranks, a, max_rank)
        if rows.any() and rk:
            out[rows, :rk] = _scale(scales, a) * (x[rows].double() @ a_stack[a, :rk].double().t())
    return out.to(acc)


def _expanded(y, xa, b_stack, token_adapter_ids, ranks, scales, op):
    s, _, max_rank = b_stack.shape
    _check(token_adapter_ids, ranks, s, max_rank, op)
    out = y.double().clone()
    for a in range(s):
        rows = token_adapter_ids == a
        rk = _rank(ranks, a, max_rank)
        if rows.any() and rk:
            out[rows] += _scale(scales, a) * (xa[rows, :rk].double() @ b_stack[a, :, :rk].double().t())
    return out.to(y.dtype)


def lora_expand_ref(y, xa, b_stack, token_adapter_ids, ranks=None, scales=None):
    return _expanded(y, xa, b_stack, token_adapter_ids, ranks, scales, "lora_expand")


def lora_expand_inplace_ref(y, xa, b_stack, token_adapter_ids, ranks=None, scales=None):
    """In place, like the op."""
    y.copy_(_expanded(y, xa, b_stack, token_adapter_ids, ranks, scales, "lora_expand_"))


def lora_grouped_outer_ref(left, right, token_adapter_ids, num_adapters, scales=None):
    _check(token_adapter_ids, None, num_adapters, 0, "lora_grouped_outer")
    acc = torch.float64 if torch.float64 in (left.dtype, right.dtype) else torch.float32
    out = torch.zeros(num_adapters, left.shape[1], right.shape[1], dtype=torch.float64, device=left.device)
    for a in range(num_adapters):
        rows = token_adapter_ids == a
        out[a] = _scale(scales, a) * (left[rows].double().t() @ right[rows].double())
    return out.to(acc)


def multi_lora_linear_ref(x, weight, bias, a_stack, b_stack, token_adapter_ids, ranks=None, scales=None):
    """The layer's math as a loop of single-adapter LoRA over the token groups (fp64)."""
    lead = x.shape[:-1]
    x2, ids = x.reshape(-1, x.shape[-1]).double(), token_adapter_ids.reshape(-1)
    y = x2 @ weight.double().t() + (0 if bias is None else bias.double())
    for a in range(a_stack.shape[0]):
        rows = ids == a
        rk = _rank(ranks, a, a_stack.shape[1])
        if rows.any() and rk:
            y[rows] += _scale(scales, a) * (x2[rows] @ a_stack[a, :rk].double().t()) @ b_stack[a, :, :rk].double().t()
    return y.reshape(*lead, weight.shape[0]).to(x.dtype)
