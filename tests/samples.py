"""Sample inputs per op: odd sizes (not multiples of the block), size 1, empty, rank-1
and non-contiguous tensors, every dtype an op accepts. Used by the opcheck test, the
registry test and the reference tests."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from lowrank_ext import quant
from lowrank_ext.reference.quant import quantize_blockwise_ref


@dataclass
class Sample:
    args: tuple
    kwargs: dict = field(default_factory=dict)
    name: str = ""


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _noncontiguous(n: int, dtype, device) -> torch.Tensor:
    return torch.randn(n, 3, dtype=dtype, device=device)[:, 1]  # stride 3


def quantize_blockwise_samples(device: str) -> Iterator[Sample]:
    for bits, blocksize in ((8, 256), (8, 64), (4, 128), (8, 4096), (4, 64)):
        code = quant.dynamic_code(bits, device=device)
        for dtype in FLOAT_DTYPES:
            for shape in ((1,), (1000,), (7, 33), (3, 5, 129)):
                x = torch.randn(shape, dtype=dtype, device=device)
                yield Sample((x, code, blocksize, bits), name=f"{bits}b-bs{blocksize}-{dtype}-{shape}")
        yield Sample((_noncontiguous(301, torch.float32, device), code, blocksize, bits), name=f"{bits}b-noncontig")
        yield Sample((torch.randn(777, device=device), code, blocksize, bits, True, 1234, 5), name=f"{bits}b-stochastic")
        yield Sample((torch.empty(0, device=device), code, blocksize, bits), name=f"{bits}b-empty")


def dequantize_blockwise_samples(device: str) -> Iterator[Sample]:
    for s in quantize_blockwise_samples(device):
        x, code, blocksize, bits = s.args[:4]
        q, absmax = quantize_blockwise_ref(x.cpu(), code.cpu(), blocksize, bits)
        q, absmax = q.to(device), absmax.to(device)
        for dtype in (x.dtype, torch.float32):
            yield Sample((q, absmax, code, blocksize, bits, list(x.shape), dtype), name=f"{s.name}->{dtype}")


def _adamw_tensors(device: str, dtype: torch.dtype, shapes) -> tuple[list, list]:
    params = [torch.randn(s, device=device).to(dtype) for s in shapes]
    grads = [torch.randn(s, device=device).to(dtype) for s in shapes]
    return params, grads


ADAMW_HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)


def adamw_step_quantized_samples(device: str) -> Iterator[Sample]:
    # (bits, blocksize_exp_avg, blocksize_exp_avg_sq, param dtype, shapes)
    for bits, bs_m, bs_v, dtype, shapes in ((8, 256, 2048, torch.float32, [(1000,), (3, 129), (1,)]),
                                           (4, 128, 256, torch.bfloat16, [(777,), (64, 2)]),
                                           (8, 128, 128, torch.float16, [(257,)])):
        params, grads = _adamw_tensors(device, dtype, shapes)
        code_m = quant.dynamic_code(bits, signed=True, device=device)
        code_v = quant.dynamic_code(bits, signed=False, device=device)
        m_q, m_a, v_q, v_a = [], [], [], []
        for p in params:
            mq, ma = quantize_blockwise_ref(torch.randn(p.numel()) * 0.1, code_m.cpu(), bs_m, bits)
            vq, va = quantize_blockwise_ref(torch.rand(p.numel()) * 0.01, code_v.cpu(), bs_v, bits)
            for lst, t in ((m_q, mq), (m_a, ma), (v_q, vq), (v_a, va)):
                lst.append(t.to(device))
        for step, sr in ((1, False), (7, dtype == torch.bfloat16)):
            yield Sample((params, grads, m_q, m_a, v_q, v_a, code_m, code_v, *ADAMW_HYPER.values(), step, bits,
                          bs_m, bs_v, sr, 3, step > 1, step > 1), name=f"{bits}b-{dtype}-step{step}")


def rank1_state(shapes, bits: int, bs_m: int, code_m, code_v, device: str) -> tuple[list, ...]:
    """Random quantized moments for params of these 2-D shapes: block-wise first moments and
    rank-1 normalised second moments ([rows, cols] = the shape), from the references."""
    from lowrank_ext.reference.optim import quantize_rank1_ref
    state = ([], [], [], [], [])
    for rows, cols in shapes:
        mq, ma = quantize_blockwise_ref(torch.randn(rows * cols) * 0.1, code_m.cpu(), bs_m, bits)
        vq, vr, vc = quantize_rank1_ref(torch.rand(rows, cols) * 0.01, code_v.cpu(), bits)
        for lst, t in zip(state, (mq, ma, vq, vr, vc)):
            lst.append(t.to(device))
    return state


def adamw_step_rank1_samples(device: str) -> Iterator[Sample]:
    # (bits, blocksize_exp_avg, param dtype, [rows, cols] shapes): odd columns (4-bit rows
    # starting at odd elements), one row, one column
    for bits, bs_m, dtype, shapes in ((8, 256, torch.float32, [(20, 50), (3, 129), (1, 7)]),
                                      (4, 128, torch.bfloat16, [(37, 21), (64, 2)]),
                                      (8, 128, torch.float16, [(257, 1)])):
        params, grads = _adamw_tensors(device, dtype, shapes)
        code_m = quant.dynamic_code(bits, signed=True, device=device)
        code_v = quant.linear_code(bits, signed=False, zero=False, device=device)
        state = rank1_state(shapes, bits, bs_m, code_m, code_v, device)
        for step, sr in ((1, False), (7, dtype == torch.bfloat16)):
            yield Sample((params, grads, *state, code_m, code_v, *ADAMW_HYPER.values(), step, bits, bs_m, sr, 3,
                          step > 1, step > 1), name=f"{bits}b-{dtype}-step{step}")


def adamw_step_fp32_samples(device: str) -> Iterator[Sample]:
    for dtype in FLOAT_DTYPES:
        params, grads = _adamw_tensors(device, dtype, [(1000,), (3, 129), (1,)])
        m = [torch.randn(p.shape, device=device) * 0.1 for p in params]
        v = [torch.rand(p.shape, device=device) * 0.01 for p in params]
        yield Sample((params, grads, m, v, *ADAMW_HYPER.values(), 2, dtype == torch.bfloat16, 5), name=f"{dtype}")


# (N, d_in, d_out, r): N = 1, dims not multiples of 8, r = 1, a tile-crossing N
LORA_SHAPES = ((1, 13, 7, 1), (37, 24, 11, 3), (70, 9, 16, 8))


def _lora_tensors(device, dtype, n, d_in, d_out, r, variant, requires_grad=False):
    def t(*shape):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(requires_grad)
    core = t(r, r) if variant in ("core", "both") else None
    rank_scale = t(r) if variant in ("rank_scale", "both") else None
    return t(n, d_in), t(d_out, d_in), t(d_out), t(r, d_in), t(d_out, r), core, rank_scale


def lora_forward_samples(device: str) -> Iterator[Sample]:
    for dtype in FLOAT_DTYPES:
        for (n, d_in, d_out, r), variant, p in zip(LORA_SHAPES * 2, ("plain", "core", "rank_scale", "both", "plain",
                                                                      "plain"), (0.0, 0.25, 0.0, 0.5, 0.1, 0.0)):
            x, w, b, a, bb, core, rs = _lora_tensors(device, dtype, n, d_in, d_out, r, variant, requires_grad=True)
            seed_tensor = torch.tensor(17) if variant == "both" else None  # the traceable seed
            yield Sample((x, w, b if variant != "rank_scale" else None, a, bb, core, rs, 0.5, p, 17, seed_tensor),
                         name=f"{dtype}-{n}x{d_in}x{d_out}-r{r}-{variant}-p{p}")


def lora_backward_samples(device: str) -> Iterator[Sample]:
    for s in lora_forward_samples(device):
        x, w, _, a, bb, core, rs, scale, p, seed, seed_tensor = (v.detach() if isinstance(v, torch.Tensor) else v
                                                                  for v in s.args)
        _, xa = torch.ops.lowrank.lora_forward(x, w, None, a, bb, core, rs, scale, p, seed, seed_tensor)
        g = torch.randn(x.shape[0], w.shape[0], device=device, dtype=x.dtype)
        for mask in ([True] * 5, [True, False, True, False, True]):
            yield Sample((g, x, w, a, bb, core, rs, xa, scale, p, seed, seed_tensor, mask),
                         name=f"{s.name}-mask{sum(mask)}")


def lora_merge_samples(device: str) -> Iterator[Sample]:
    for dtype in FLOAT_DTYPES:
        for (_, d_in, d_out, r), variant in zip(LORA_SHAPES, ("plain", "core", "both")):
            _, w, _, a, bb, core, rs = _lora_tensors(device, dtype, 1, d_in, d_out, r, variant)
            yield Sample((w, a, bb, core, rs, 0.75), name=f"{dtype}-{d_out}x{d_in}-r{r}-{variant}")
        w = torch.randn(8, 5, device=device, dtype=dtype)  # fp32 adapters on a low-precision weight
        yield Sample((w, torch.randn(2, 5, device=device), torch.randn(8, 2, device=device), None, None, -1.0),
                     name=f"{dtype}-fp32-adapter")


# multilora: (N, S, R, d_in, d_out); ids mix every adapter, -1 and an empty slot; rank 1
MULTILORA_SHAPES = ((1, 1, 1, 5, 3), (37, 3, 4, 9, 7), (70, 5, 8, 33, 17), (0, 2, 2, 4, 4))


def _multilora_ids(n: int, s: int, device) -> torch.Tensor:
    """Unsorted ids over -1 .. s-1, slot s-1 left empty when s > 2."""
    hi = s - 1 if s > 2 else s
    return torch.randint(-1, hi, (n,), device=device)


def _multilora_ranks(s: int, r: int, device) -> torch.Tensor:
    return torch.tensor([max(r - i, 0) if i % 3 else r for i in range(s)], device=device)


def lora_shrink_samples(device: str) -> Iterator[Sample]:
    for dtype in FLOAT_DTYPES + (torch.float64,):
        for i, (n, s, r, d_in, _) in enumerate(MULTILORA_SHAPES):
            x = torch.randn(n, d_in, device=device, dtype=dtype, requires_grad=True)
            a = torch.randn(s, r, d_in, device=device, dtype=dtype, requires_grad=True)
            ids = _multilora_ids(n, s, device)
            ranks = _multilora_ranks(s, r, device) if i % 2 else None
            scales = torch.rand(s, device=device) if i >= 1 else None
            yield Sample((x, a, ids, ranks, scales), name=f"{dtype}-{n}x{d_in}-S{s}-R{r}")
    yield Sample((torch.randn(9, 6, device=device).t(), torch.randn(2, 9, 3, device=device).transpose(1, 2),
                  torch.tensor([0, 1, -1, 1, 0, 0], device=device, dtype=torch.int32)), name="noncontiguous-int32")


def _expand_args(device, dtype, n, s, r, d_out, i, xa_dtype=None):
    y = torch.randn(n, d_out, device=device, dtype=dtype, requires_grad=True)
    xa = torch.randn(n, r, device=device, dtype=xa_dtype or dtype, requires_grad=True)
    b = torch.randn(s, d_out, r, device=device, dtype=dtype, requires_grad=True)
    ids = _multilora_ids(n, s, device)
    ranks = _multilora_ranks(s, r, device) if i % 2 else None
    scales = torch.rand(s, device=device) if i >= 1 else None
    return y, xa, b, ids, ranks, scales


def lora_expand_samples(device: str) -> Iterator[Sample]:
    for dtype in FLOAT_DTYPES + (torch.float64,):
        for i, (n, s, r, _, d_out) in enumerate(MULTILORA_SHAPES):
            yield Sample(_expand_args(device, dtype, n, s, r, d_out, i), name=f"{dtype}-{n}x{d_out}-S{s}-R{r}")
        yield Sample(_expand_args(device, dtype, 20, 3, 4, 6, 1, torch.float32), name=f"{dtype}-fp32-xa")
    y = torch.randn(6, 9, device=device).t()  # non-contiguous y and stack
    yield Sample((y, torch.randn(9, 2, device=device), torch.randn(2, 2, 6, device=device).transpose(1, 2),
                  torch.tensor([1, -1, 0, 0, 1, 1, 1, 0, -1], device=device)), name="noncontiguous")


def lora_expand_inplace_samples(device: str) -> Iterator[Sample]:
    for s in lora_expand_samples(device):
        yield Sample(tuple(v.detach() if isinstance(v, torch.Tensor) else v for v in s.args), name=s.name)


def lora_grouped_outer_samples(device: str) -> Iterator[Sample]:
    for dtype in FLOAT_DTYPES + (torch.float64,):
        for i, (n, s, r, d_in, _) in enumerate(MULTILORA_SHAPES):
            left = torch.randn(n, r, device=device)  # fp32, as the gradients of xa are
            right = torch.randn(n, d_in, device=device, dtype=dtype)
            scales = torch.rand(s, device=device) if i >= 1 else None
            yield Sample((left, right, _multilora_ids(n, s, device), s, scales), name=f"{dtype}-{n}-S{s}")
    yield Sample((torch.randn(5, 3, device=device), torch.randn(7, 5, device=device).t(),
                  torch.full((5,), -1, device=device), 2), name="all-minus-one-noncontiguous")
    yield Sample((torch.randn(4, 3, device=device), torch.randn(4, 2, device=device),
                  torch.full((4,), -1, device=device), 0), name="no-adapters")


# (N, nblocks, in_bs, mid, out_bs): N = 1 and a tile-crossing N, nblocks = 1, rectangular
# blocks, mid smaller than nblocks (pairs of blocks share no intermediate), mid > in_bs
MONARCH_SHAPES = ((1, 4, 3, 2, 5), (37, 1, 7, 7, 3), (70, 3, 8, 6, 4), (600, 4, 6, 8, 8), (0, 2, 4, 4, 4))


def _monarch_tensors(device, dtype, n, nb, in_bs, mid, out_bs, requires_grad=False):
    def t(*shape):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(requires_grad)
    return t(n, nb * in_bs), t(nb, mid, in_bs), t(nb, out_bs, mid)


def monarch_forward_samples(device: str) -> Iterator[Sample]:
    for dtype in FLOAT_DTYPES:
        for i, shape in enumerate(MONARCH_SHAPES):
            x, w1, w2 = _monarch_tensors(device, dtype, *shape, requires_grad=True)
            yield Sample((x, w1, w2, i % 2 == 0), name=f"{dtype}-{'x'.join(map(str, shape))}")
    x, w1, w2 = _monarch_tensors(device, torch.float32, 9, 2, 5, 5, 5)
    yield Sample((x.t().contiguous().t()[:, :], w1.transpose(1, 2).contiguous().transpose(1, 2), w2, True),
                 name="noncontiguous")


def monarch_backward_samples(device: str) -> Iterator[Sample]:
    for s in monarch_forward_samples(device):
        x, w1, w2, save = (v.detach() if isinstance(v, torch.Tensor) else v for v in s.args)
        y, h = torch.ops.lowrank.monarch_forward(x, w1, w2, True)
        g = torch.randn_like(y)
        for mask in ([True] * 3, [False, True, False], [True, False, True]):
            yield Sample((g, x, w1, w2, h if save else None, mask), name=f"{s.name}-h{int(save)}-mask{mask}")


def blockdiag_forward_samples(device: str) -> Iterator[Sample]:
    for dtype in FLOAT_DTYPES:
        for n, nb, in_bs, _, out_bs in MONARCH_SHAPES:
            x = torch.randn(n, nb * in_bs, device=device, dtype=dtype, requires_grad=True)
            w = torch.randn(nb, out_bs, in_bs, device=device, dtype=dtype, requires_grad=True)
            yield Sample((x, w), name=f"{dtype}-{n}x{nb}x{in_bs}x{out_bs}")


def blockdiag_backward_samples(device: str) -> Iterator[Sample]:
    for s in blockdiag_forward_samples(device):
        x, w = (v.detach() for v in s.args)
        g = torch.randn(x.shape[0], w.shape[0] * w.shape[1], device=device, dtype=x.dtype)
        for mask in ([True, True], [False, True], [True, False]):
            yield Sample((g, x, w, mask), name=f"{s.name}-mask{mask}")


def sparse_scatter_add_samples(device: str) -> Iterator[Sample]:
    for dtype in FLOAT_DTYPES + (torch.float64,):
        for shape, nnz in (((7, 13), 9), ((1,), 1), ((64, 33), 200), ((5, 4, 3), 0)):
            w = torch.randn(shape, device=device, dtype=dtype)
            numel = w.numel()
            idx = torch.randint(0, numel, (nnz,), device=device)
            yield Sample((w, [idx], [torch.randn(nnz, device=device, dtype=dtype)], [0.5]),
                         name=f"{dtype}-{shape}-nnz{nnz}")
        w = torch.randn(40, 20, device=device, dtype=dtype)  # two adapters, sorted + repeated, fp32 values
        yield Sample((w, [torch.arange(0, 800, 7, device=device), torch.tensor([3, 3, 799, 0], device=device)],
                      [torch.randn(115, device=device), torch.randn(4, device=device, dtype=dtype)], [1.0, -2.0]),
                     name=f"{dtype}-two-adapters")
        yield Sample((w, [torch.randperm(800, device=device)[:50]], [torch.randn(50, device=device, dtype=dtype)],
                      [0.25], False), name=f"{dtype}-checked-by-the-caller")


def sddmm_samples(device: str) -> Iterator[Sample]:
    for dtype in FLOAT_DTYPES + (torch.float64,):
        for n, d_out, d_in, nnz in ((1, 3, 5, 4), (300, 17, 9, 50), (0, 4, 4, 3), (37, 8, 8, 0)):
            g = torch.randn(n, d_out, device=device, dtype=dtype)
            x = torch.randn(n, d_in, device=device, dtype=dtype)
            rows = torch.randint(0, d_out, (nnz,), device=device)
            cols = torch.randint(0, d_in, (nnz,), device=device)
            yield Sample((g, x, rows, cols), name=f"{dtype}-{n}x{d_out}x{d_in}-nnz{nnz}")
    g = torch.randn(20, 6, device=device).t().contiguous().t()  # non-contiguous operands
    yield Sample((g, torch.randn(6, 20, device=device).t(), torch.tensor([5, 0], device=device),
                  torch.tensor([0, 5], device=device)), name="noncontiguous")


def _decaying(m: int, n: int, device, dtype=torch.float32, batch: tuple = ()) -> torch.Tensor:
    """A [.., m, n] with singular values 0.8^i (orthogonal factors from QR of Gaussians)."""
    p = min(m, n)
    u = torch.linalg.qr(torch.randn(*batch, m, p, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(*batch, n, p, dtype=torch.float64)).Q
    s = 0.8 ** torch.arange(p, dtype=torch.float64)
    return ((u * s) @ v.transpose(-2, -1)).to(device=device, dtype=dtype)


def gaussian_sketch_samples(device: str) -> Iterator[Sample]:
    for dtype in FLOAT_DTYPES + (torch.float64,):
        for shape, l in (((7, 13), 5), ((1, 1), 1), ((2, 40, 600), 9), ((5, 3), 0)):
            yield Sample((torch.randn(shape, device=device, dtype=dtype), l, 1234), name=f"{dtype}-{shape}-l{l}")
    yield Sample((torch.randn(30, 20, device=device).t(), 4, -1), name="noncontiguous-negative-seed")


def jacobi_svd_samples(device: str) -> Iterator[Sample]:
    for dtype in FLOAT_DTYPES + (torch.float64,):
        for shape in ((6, 4), (4, 6), (1, 1), (3, 17, 17), (2, 50, 9), (0, 5, 5)):
            yield Sample((torch.randn(shape, device=device, dtype=dtype),), name=f"{dtype}-{shape}")
    yield Sample((torch.zeros(5, 3, device=device),), name="zero")
    yield Sample((torch.randn(40, 10, device=device).t(),), name="noncontiguous")


def rsvd_samples(device: str) -> Iterator[Sample]:
    for dtype in FLOAT_DTYPES + (torch.float64,):
        yield Sample((_decaying(40, 30, device, dtype), 5), name=f"{dtype}-tall")
        yield Sample((_decaying(20, 70, device, dtype), 3, 4, 1, 7), name=f"{dtype}-wide")
    yield Sample((_decaying(33, 33, device, batch=(3,)), 8, 2, 0, 1), name="batched-no-power")
    yield Sample((torch.zeros(9, 6, device=device), 2), name="zero")
    yield Sample((torch.randn(12, 1, device=device), 1, 0), name="one-column")
    yield Sample((_decaying(40, 30, device), 5, 3, 1, 2, torch.randn(40, 6, device=device)), name="warm-start")
    yield Sample((_decaying(33, 33, device, batch=(2,)), 4, 2, 1, 0, torch.randn(2, 33, 2, device=device,
                                                                              dtype=torch.float64)),
                 name="batched-warm-start-fp64-start")


def batched_rsvd_samples(device: str) -> Iterator[Sample]:
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        yield Sample(([_decaying(40, 30, device, dtype) for _ in range(3)], 5), name=f"{dtype}-tall")
    yield Sample(([_decaying(20, 70, device) for _ in range(2)], 3, 4, 1, 7), name="wide")
    yield Sample(([_decaying(30, 24, device).t() for _ in range(2)], 4), name="transposed-views")
    yield Sample(([_decaying(33, 33, device)], 8, 2, 0, 1), name="one-matrix-no-power")
    yield Sample(([_decaying(40, 30, device) for _ in range(2)], 5, 3, 1, 2, torch.randn(2, 40, 8, device=device)),
                 name="warm-start")


def svd_update_samples(device: str) -> Iterator[Sample]:
    for dtype in (torch.float32, torch.float64):
        a = _decaying(30, 12, device, dtype)
        u, s, _ = torch.linalg.svd(a[:, :6], full_matrices=False)
        yield Sample((u[:, :4], s[:4], a[:, 6:], 5), name=f"{dtype}")
        yield Sample((u[:, :0], s[:0], a, 3), name=f"{dtype}-empty-start")
    yield Sample((torch.linalg.qr(torch.randn(8, 3, device=device)).Q, torch.ones(3, device=device),
                  torch.randn(8, 200, device=device, dtype=torch.bfloat16), 8), name="blocks-bf16-k=m")


# galore: (m, n, rank); left when m < n, right otherwise (the optimizer's rule), plus the other side
# ranks 20 and 33: several K steps of the CUDA tile products; 150 x 200: edges of its 64-wide tiles
GALORE_SHAPES = ((20, 37, 4), (37, 20, 4), (9, 9, 1), (130, 70, 8), (130, 70, 20), (150, 200, 33))


def _galore_projection(m, n, rank, right, bits, device):
    """(proj, absmax, code, blocksize): an orthonormal P, in fp32 or quantized (linear code, as GaLoreAdamW)."""
    rows, cols = (rank, n) if right else (m, rank)
    p = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols))).Q
    p = (p.t() if rows < cols else p).contiguous().to(device)
    if bits == 32:
        return p, None, None, 0
    code = quant.linear_code(bits, signed=True).to(device)
    blocksize = 64 if bits == 4 else 128
    q, absmax = quantize_blockwise_ref(p.cpu(), code.cpu(), blocksize, bits)
    return q.to(device), absmax.to(device), code, blocksize


def galore_project_samples(device: str) -> Iterator[Sample]:
    for m, n, rank in GALORE_SHAPES:
        for right in (m >= n, m < n):
            for bits, dtype in ((32, torch.float32), (8, torch.bfloat16), (4, torch.float16)):
                proj, absmax, code, bs = _galore_projection(m, n, rank, right, bits, device)
                g = torch.randn(m, n, device=device, dtype=dtype)
                yield Sample((g, proj, absmax, code, rank, bs, right), name=f"{m}x{n}-r{rank}-right{right}-{bits}b")
    yield Sample((torch.randn(40, 12, device=device).t(), *_galore_projection(12, 40, 3, False, 32, device)[:3], 3, 0,
                  False), name="noncontiguous-grad")


def galore_apply_samples(device: str) -> Iterator[Sample]:
    for i, (m, n, rank) in enumerate(GALORE_SHAPES):
        right = m >= n
        low_shape = (m, rank) if right else (rank, n)
        for mode, bits, dtype in ((0, 32, torch.float32), (1, 8, torch.float32), (2, 4, torch.bfloat16),
                                  (1, 32, torch.float16), (0, 4, torch.bfloat16), (2, 32, torch.float32)):
            proj, absmax, code, bs = _galore_projection(m, n, rank, right, bits, device)
            param = torch.randn(m, n, device=device, dtype=dtype)
            d = torch.randn(low_shape, device=device)
            extra = ()
            if mode:
                prev = torch.tensor([0.0 if i % 2 else 1e-3], device=device)  # no limit / a binding one
                extra = (torch.randn(m, n, device=device, dtype=dtype), torch.randn(low_shape, device=device), prev)
            yield Sample((param, d, proj, absmax, code, rank, bs, right, 0.01, 0.25, 0.1, mode, *extra),
                         name=f"{m}x{n}-r{rank}-mode{mode}-{bits}b-{dtype}")
    for dtype in (torch.float32, torch.bfloat16):  # a non-contiguous param (and grad), Fira
        proj, absmax, code, bs = _galore_projection(12, 30, 3, False, 32, device)
        param = torch.randn(30, 12, device=device, dtype=dtype).t()
        grad = torch.randn(30, 12, device=device, dtype=dtype).t()
        yield Sample((param, torch.randn(3, 30, device=device), proj, absmax, code, 3, bs, False, 0.1, 0.5, 0.0, 1,
                      grad, torch.randn(3, 30, device=device), torch.tensor([0.5], device=device)),
                     name=f"noncontiguous-fira-{dtype}")


SAMPLES: dict[str, Callable[[str], Iterator[Sample]]] = {
    "lowrank::quantize_blockwise": quantize_blockwise_samples,
    "lowrank::dequantize_blockwise": dequantize_blockwise_samples,
    "lowrank::adamw_step_quantized_": adamw_step_quantized_samples,
    "lowrank::adamw_step_rank1_": adamw_step_rank1_samples,
    "lowrank::adamw_step_fp32_": adamw_step_fp32_samples,
    "lowrank::lora_forward": lora_forward_samples,
    "lowrank::lora_backward": lora_backward_samples,
    "lowrank::lora_merge_": lora_merge_samples,
    "lowrank::lora_shrink": lora_shrink_samples,
    "lowrank::lora_expand_": lora_expand_inplace_samples,
    "lowrank::lora_expand": lora_expand_samples,
    "lowrank::lora_grouped_outer": lora_grouped_outer_samples,
    "lowrank::monarch_forward": monarch_forward_samples,
    "lowrank::monarch_backward": monarch_backward_samples,
    "lowrank::blockdiag_forward": blockdiag_forward_samples,
    "lowrank::blockdiag_backward": blockdiag_backward_samples,
    "lowrank::sparse_scatter_add_": sparse_scatter_add_samples,
    "lowrank::sddmm": sddmm_samples,
    "lowrank::gaussian_sketch": gaussian_sketch_samples,
    "lowrank::jacobi_svd": jacobi_svd_samples,
    "lowrank::rsvd": rsvd_samples,
    "lowrank::batched_rsvd": batched_rsvd_samples,
    "lowrank::svd_update": svd_update_samples,
    "lowrank::galore_project": galore_project_samples,
    "lowrank::galore_apply_": galore_apply_samples,
}
