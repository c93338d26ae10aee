"""MonarchLinear: a linear layer whose weight is a Monarch matrix, run by the monarch ops."""
from __future__ import annotations

import math
import operator

import torch
from torch import nn

from ..ops.monarch import monarch

__all__ = ["MonarchLinear"]


class MonarchLinear(nn.Module):
    """``y = x M^T + b`` with ``M = P L P R`` a Monarch matrix: two block-diagonal factors of
    ``nblocks`` blocks, ``blkdiag1`` [nblocks, mid, in/nblocks] and ``blkdiag2``
    [nblocks, out/nblocks, mid] with ``mid = min(in, out) / nblocks``, about
    ``2 * d * d/nblocks`` FLOPs per token instead of ``d^2``.

    Parameter names and layout are those of HazyResearch's fly ``MonarchLinear`` (for
    ``nblocks`` dividing both sizes), so its checkpoints load as they are.

    Example::

        layer = MonarchLinear(1024, 1024, nblocks=4)
        y = layer(torch.randn(8, 16, 1024))                        # any leading dims
        approx = MonarchLinear.from_dense(nn.Linear(1024, 1024), nblocks=4)  # closed-form projection
        dense = approx.to_dense()                                  # [out, in]
    """

    def __init__(self, in_features: int, out_features: int, nblocks: int, bias: bool = True, *,
                 device=None, dtype=None):
        super().__init__()
        sizes = {}
        for name, v in (("in_features", in_features), ("out_features", out_features), ("nblocks", nblocks)):
            try:
                sizes[name] = operator.index(v)  # ints and numpy ints (not floats or bools)
            except TypeError:
                sizes[name] = None
            if sizes[name] is None or isinstance(v, bool) or sizes[name] < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        in_features, out_features, nblocks = sizes["in_features"], sizes["out_features"], sizes["nblocks"]
        if in_features % nblocks or out_features % nblocks:
            raise ValueError(f"nblocks = {nblocks} must divide in_features = {in_features} and out_features = "
                             f"{out_features}")
        self.in_features, self.out_features, self.nblocks = in_features, out_features, nblocks
        in_bs, out_bs = in_features // nblocks, out_features // nblocks
        mid = min(in_bs, out_bs)
        kw = dict(device=device, dtype=dtype)
        self.blkdiag1 = nn.Parameter(torch.empty(nblocks, mid, in_bs, **kw))
        self.blkdiag2 = nn.Parameter(torch.empty(nblocks, out_bs, mid, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # each factor as nn.Linear initialises a layer of its block's fan-in
        for w in (self.blkdiag1, self.blkdiag2):
            bound = 1.0 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = monarch(x, self.blkdiag1, self.blkdiag2)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @torch.no_grad()
    def to_dense(self) -> torch.Tensor:
        """The dense weight ``[out_features, in_features]`` (the bias is not included)."""
        eye = torch.eye(self.in_features, device=self.blkdiag1.device, dtype=self.blkdiag1.dtype)
        return monarch(eye, self.blkdiag1, self.blkdiag2).t().contiguous()

    @classmethod
    @torch.no_grad()
    def from_dense(cls, linear: nn.Linear | torch.Tensor, nblocks: int, bias: torch.Tensor | None = None
                   ) -> "MonarchLinear":
        """The Monarch matrix nearest to a dense weight in Frobenius norm (and its bias).

        Closed form: M's block pair (output block l, input block k) is a sum of rank-1 terms
        ``w2[l, :, r] w1[k, q, :]`` over the intermediate positions ``k*mid + q = r*nblocks + l``,
        and those parameters belong to no other pair, so the optimum is each pair's truncated
        SVD (rank-1 when ``mid == nblocks``, the square Monarch case), computed as one batched
        SVD in fp64.
        """
        if isinstance(linear, nn.Linear):
            if bias is not None:
                raise ValueError("from_dense takes the bias of the nn.Linear; pass bias with a weight tensor only")
            weight, bias = linear.weight, linear.bias
        else:
            weight = linear
        d_out, d_in = weight.shape
        layer = cls(d_in, d_out, nblocks, bias=bias is not None, device=weight.device, dtype=weight.dtype)
        w1, w2 = _project_to_monarch(weight.double(), nblocks, layer.blkdiag1.shape[1])
        layer.blkdiag1.copy_(w1)
        layer.blkdiag2.copy_(w2)
        if bias is not None:
            layer.bias.copy_(bias)
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nblocks={self.nblocks}, "
                f"bias={self.bias is not None}")


def _project_to_monarch(weight: torch.Tensor, nblocks: int, mid: int) -> tuple[torch.Tensor, torch.Tensor]:
    d_out, d_in = weight.shape
    nb, in_bs, out_bs = nblocks, d_in // nblocks, d_out // nblocks
    # blocks[l, k] = M[s*nb + l, k*in_bs + p] over (s, p)
    blocks = weight.reshape(out_bs, nb, nb, in_bs).permute(1, 2, 0, 3)
    u, s, vh = torch.linalg.svd(blocks, full_matrices=False)  # [nb, nb, out_bs, c], [nb, nb, c], [nb, nb, c, in_bs]
    # intermediate position i = k*mid + q = r*nb + l; it is the j-th rank-1 term of pair (l, k)
    i = torch.arange(nb * mid, device=weight.device)
    k, q, l, r = i // mid, i % mid, i % nb, i // nb
    j = r - torch.div(k * mid - l + nb - 1, nb, rounding_mode="floor")  # r minus the pair's first r
    rank_cap = s.shape[-1]
    keep = (j < rank_cap).to(weight.dtype)
    jc = j.clamp(max=rank_cap - 1)
    root = s[l, k, jc].sqrt() * keep  # [nb*mid]
    w1 = torch.zeros(nb, mid, in_bs, dtype=weight.dtype, device=weight.device)
    w2 = torch.zeros(nb, out_bs, mid, dtype=weight.dtype, device=weight.device)
    w1[k, q] = vh[l, k, jc] * root[:, None]
    w2[l, :, r] = u[l, k, :, jc] * root[:, None]
    return w1, w2
