"""References of the sparse ops, in fp64 (results in the inputs' dtypes)."""
from __future__ import annotations

import torch


def sparse_scatter_add_ref(weight, indices, values, alphas, check_indices=True):
    """In place, like the op: each adapter's alpha * values summed per position in fp64 and
    added to the weight with one rounding (the kernels round once per entry: equal where no
    index repeats within an adapter, within rounding where one does). Indices are checked
    whatever ``check_indices`` says (the op's flag only lets a device skip its own check)."""
    flat = weight.view(-1)
    numel = flat.numel()
    for idx in indices:
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
            raise RuntimeError(f"sparse_scatter_add_: index out of range for a weight of {numel} elements")
    for idx, val, alpha in zip(indices, values, alphas):
        delta = torch.zeros(numel, dtype=torch.float64, device=flat.device)
        delta.index_add_(0, idx, val.double() * alpha)
        touched = torch.zeros(numel, dtype=torch.bool, device=flat.device)
        touched[idx] = True
        flat[touched] = (flat[touched].double() + delta[touched]).to(flat.dtype)


def sddmm_ref(grad_out, x, rows, cols):
    """Gathers the columns, multiplies and sums over tokens in fp64 (1024 entries at a time)."""
    g, xd = grad_out.double(), x.double()
    parts = [(g[:, r] * xd[:, c]).sum(0) for r, c in zip(rows.split(1024), cols.split(1024))]
    return (torch.cat(parts) if parts else g.new_empty(0)).to(x.dtype)
