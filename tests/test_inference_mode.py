"""Every family's ops under torch.inference_mode (serving code runs there) give what they give
outside it. CPU kernels that run ATen ops on worker threads must hand those threads the
caller's mode: a worker updating a tensor made under inference mode fails otherwise. Two
threads at least, so that the parallel paths run."""
from __future__ import annotations

import pytest
import torch

import lowrank_ext
from lowrank_ext import quant


@pytest.fixture(autouse=True)
def _two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))
    yield
    torch.set_num_threads(before)


def _cases():
    n, d, r, s = 512, 256, 16, 8
    x = torch.randn(n, d)
    a_stack, b_stack = torch.randn(s, r, d), torch.randn(s, d, r)
    ids = torch.randint(0, s, (n,))
    w1, w2 = torch.randn(4, 64, 64), torch.randn(4, 64, 64)
    lin = torch.nn.Linear(d, d)
    lora = lowrank_ext.nn.LoRALinear(lin, r=r, alpha=16)
    with torch.no_grad():
        lora.lora_B["default"].weight.normal_()  # B starts at zero: make the branch count
    rows, cols = torch.randint(0, d, (5000,)), torch.randint(0, d, (5000,))
    u0 = torch.linalg.qr(torch.randn(300, 10))[0]
    flat = torch.randn(1024 * 1024)
    support = torch.randperm(flat.numel())[:50000].sort().values
    vals = torch.randn(50000)

    def scatter():
        w = flat.clone()
        torch.ops.lowrank.sparse_scatter_add_(w, [support], [vals], [0.5])
        return w

    def expand():
        y = x.clone()
        torch.ops.lowrank.lora_expand_(y, torch.ops.lowrank.lora_shrink(x, a_stack, ids), b_stack, ids)
        return y

    return {
        "LoRALinear": lambda: lora(x),
        "lora_shrink + lora_expand_": expand,
        # 8 groups of ~64 tokens: one BLAS call per group, the groups spread over the threads
        "lora_grouped_outer": lambda: torch.ops.lowrank.lora_grouped_outer(x, x[:, :r], ids, s),
        "monarch_forward": lambda: torch.ops.lowrank.monarch_forward(x, w1, w2, True),
        "monarch_backward": lambda: torch.ops.lowrank.monarch_backward(x, x, w1, w2, None, [True, True, True]),
        "sparse_scatter_add_": scatter,
        "sddmm": lambda: torch.ops.lowrank.sddmm(x, x, rows, cols),
        "jacobi_svd": lambda: torch.ops.lowrank.jacobi_svd(torch.randn(8, 40, 30, generator=torch.Generator().manual_seed(1))),
        # a batch of 8: the CPU's Householder QRs run one matrix per thread
        "rsvd": lambda: torch.ops.lowrank.rsvd(torch.randn(8, 300, 200, generator=torch.Generator().manual_seed(2)), 10),
        "svd_update": lambda: torch.ops.lowrank.svd_update(u0, torch.ones(10), x[:300, :200], 10),
        "quantize round trip": lambda: quant.quantize(flat, bits=8, blocksize=256).dequantize(),
    }


CASES = _cases()


@pytest.mark.parametrize("name", list(CASES))
def test_op_under_inference_mode_equals_outside(name):
    fn = CASES[name]
    want = fn()
    with torch.inference_mode():
        got = fn()
    want = want if isinstance(want, (tuple, list)) else (want,)
    got = got if isinstance(got, (tuple, list)) else (got,)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_optimizers_step_under_inference_mode():
    for make in (lambda ps: lowrank_ext.optim.AdamW8bit(ps, min_quant_size=10),
                 lambda ps: lowrank_ext.optim.GaLoreAdamW([{"params": ps, "rank": 8}])):
        outside = torch.nn.Parameter(torch.randn(256, 256))
        inside = torch.nn.Parameter(outside.detach().clone())
        for p in (outside, inside):
            p.grad = torch.linspace(-1, 1, p.numel()).view_as(p)
        make([outside]).step()
        with torch.inference_mode():
            make([inside]).step()
        assert torch.equal(inside, outside)
