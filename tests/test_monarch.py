"""The monarch family: forward/backward against the fp64 reference and against the dense
matrix built independently from the index formula, blockdiag against torch.block_diag,
gradcheck, MonarchLinear (from_dense projection optimality, to_dense, torch.compile,
autocast), bad inputs."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lowrank_ext.nn import MonarchLinear
from lowrank_ext.ops.monarch import (blockdiag, blockdiag_backward, blockdiag_forward, monarch, monarch_backward,
                                     monarch_forward)
from lowrank_ext.reference.monarch import (blockdiag_backward_ref, blockdiag_forward_ref, blockdiag_ref,
                                           monarch_backward_ref, monarch_forward_ref, monarch_ref)
from tolerances import ACCUMULATE

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (N, nblocks, in_bs, mid, out_bs): square and rectangular blocks, mid < nblocks, nblocks = 1,
# N crossing the CPU kernel's row tiles (up to 512 rows), N = 1; blocks of 64 (the largest the
# CPU's small-k GEMM takes in fp32) and one dimension past it (BLAS for every product)
SHAPES = [(1, 4, 3, 2, 5), (37, 1, 7, 7, 3), (70, 3, 8, 6, 4), (600, 4, 6, 8, 8), (1100, 8, 16, 16, 16),
          (129, 16, 4, 4, 4), (301, 2, 64, 64, 64), (45, 2, 33, 65, 17)]


def _tensors(n, nb, in_bs, mid, out_bs, dtype, device="cpu"):
    def t(*shape, std=1.0):
        return (torch.randn(*shape) * std).to(dtype).to(device)
    return t(n, nb * in_bs), t(nb, mid, in_bs, std=in_bs ** -0.5), t(nb, out_bs, mid, std=mid ** -0.5)


def _assert_close(got, want, dtype, what):
    atol, rtol = ACCUMULATE[dtype]
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    scale = max(float(want.abs().max()) if want.numel() else 0.0, 1.0)
    err = float((got - want).abs().max()) if want.numel() else 0.0
    assert err <= (atol + rtol) * scale, f"{what}: max error {err:.3g} (scale {scale:.3g})"


def dense_by_formula(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """M [nb*out_bs, nb*in_bs] from the documented index maps, one rank-1 term per intermediate
    position i = k*mid + q = r*nb + l (independent of the reference's bmm/permute code)."""
    nb, mid, in_bs = w1.shape
    out_bs = w2.shape[1]
    m = torch.zeros(nb * out_bs, nb * in_bs, dtype=torch.float64)
    for i in range(nb * mid):
        k, q, l, r = i // mid, i % mid, i % nb, i // nb
        m[l::nb, k * in_bs:(k + 1) * in_bs] += torch.outer(w2[l, :, r].double().cpu(), w1[k, q].double().cpu())
    return m


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_backward_match_reference(device, dtype, shape):
    x, w1, w2 = _tensors(*shape, dtype, device)
    y, h = monarch_forward(x, w1, w2, save_intermediate=True)
    y_ref, h_ref = monarch_forward_ref(x.cpu(), w1.cpu(), w2.cpu(), True)
    _assert_close(y, y_ref, dtype, "y")
    _assert_close(h, h_ref, dtype, "h")
    g = torch.randn(y.shape).to(dtype).to(device)
    want = monarch_backward_ref(g.cpu(), x.cpu(), w1.cpu(), w2.cpu())
    for saved in (h, None):
        got = monarch_backward(g, x, w1, w2, saved)
        for name, gt, wt in zip(("x", "w1", "w2"), got, want):
            _assert_close(gt, wt, dtype, f"grad {name} (h {'saved' if saved is not None else 'recomputed'})")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_matches_dense_matrix(device, shape):
    x, w1, w2 = _tensors(*shape, torch.float64, device)
    y, _ = monarch_forward(x, w1, w2)
    _assert_close(y, x.cpu() @ dense_by_formula(w1, w2).t(), torch.float64, "y vs x M^T")


# nblocks a multiple of 8, blocks <= 64, nblocks * mid <= 1024: the CPU's token-major fp32
# forward, N across its 6-row register tiles and the 48-row groups whose h it transposes out;
# mid = 65 and nblocks * mid = 1536 are past it (the tiles)
TOKEN_MAJOR_SHAPES = [(1, 8, 5, 7, 3), (13, 8, 16, 16, 16), (129, 16, 4, 4, 4), (7, 24, 3, 40, 9),
                      (100, 16, 64, 17, 1), (61, 32, 32, 32, 32), (20, 8, 64, 65, 8), (9, 24, 3, 64, 9),
                      (97, 16, 8, 8, 8)]


@pytest.mark.parametrize("shape", TOKEN_MAJOR_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp32_forward_with_and_without_saved_intermediate(device, shape):
    x, w1, w2 = _tensors(*shape, torch.float32, device)
    y, h = monarch_forward(x, w1, w2)
    assert h.numel() == 0
    _assert_close(y, x.cpu().double() @ dense_by_formula(w1, w2).t(), torch.float32, "y vs x M^T")
    y_saved, h_saved = monarch_forward(x, w1, w2, save_intermediate=True)
    _, h_ref = monarch_forward_ref(x.cpu().double(), w1.cpu().double(), w2.cpu().double(), True)
    _assert_close(h_saved, h_ref, torch.float32, "h")
    # saving h changes only what is written: the same sums in the same order
    if device == "cpu":
        assert torch.equal(y, y_saved)
    else:
        _assert_close(y, y_saved, torch.float32, "y with and without h saved")


def test_output_mask_leaves_others_empty():
    x, w1, w2 = _tensors(50, 4, 8, 8, 8, torch.float32)
    g = torch.randn(50, 32)
    full = monarch_backward(g, x, w1, w2)
    for mask in ([True, False, False], [False, True, False], [False, False, True]):
        got = monarch_backward(g, x, w1, w2, None, mask)
        for m, gt, ft in zip(mask, got, full):
            assert (gt.shape == ft.shape and torch.equal(gt, ft)) if m else gt.numel() == 0
    gx, gw = blockdiag_backward(g, x, torch.randn(4, 8, 8), [False, True])
    assert gx.numel() == 0 and gw.shape == (4, 8, 8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_blockdiag_matches_reference_and_block_diag(device, dtype, shape):
    n, nb, in_bs, _, out_bs = shape
    x = torch.randn(n, nb * in_bs).to(dtype).to(device)
    w = (torch.randn(nb, out_bs, in_bs) * in_bs ** -0.5).to(dtype).to(device)
    y = blockdiag_forward(x, w)
    _assert_close(y, blockdiag_forward_ref(x.cpu(), w.cpu()), dtype, "y")
    dense = torch.block_diag(*w.cpu().double())  # [nb*out_bs, nb*in_bs]
    _assert_close(y, x.cpu().double() @ dense.t(), dtype, "y vs torch.block_diag")
    g = torch.randn(y.shape).to(dtype).to(device)
    for name, gt, wt in zip(("x", "w"), blockdiag_backward(g, x, w), blockdiag_backward_ref(g.cpu(), x.cpu(),
                                                                                             w.cpu())):
        _assert_close(gt, wt, dtype, f"grad {name}")


def test_gradcheck():
    x = torch.randn(7, 12, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: monarch(*a), (x, w1, w2))
    assert torch.autograd.gradcheck(lambda *a: monarch(*a, save_intermediate=False), (x, w1, w2))
    w = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(blockdiag, (x, w))


def test_leading_dims_and_partial_requires_grad():
    x = torch.randn(2, 3, 5, 16, requires_grad=True)
    w1, w2 = torch.randn(4, 4, 4), torch.randn(4, 6, 4, requires_grad=True)
    y = monarch(x, w1, w2)
    assert y.shape == (2, 3, 5, 24)
    y.square().sum().backward()
    assert x.grad is not None and w2.grad is not None and w1.grad is None
    xr, w2r = x.detach().clone().requires_grad_(), w2.detach().clone().requires_grad_()
    yr = (xr.reshape(-1, 16).double() @ dense_by_formula(w1, w2r.detach()).t())
    _assert_close(y.reshape(-1, 24), yr, torch.float32, "y")


def test_saved_and_recomputed_intermediate_give_same_gradients():
    x, w1, w2 = (t.requires_grad_() for t in _tensors(300, 4, 8, 8, 8, torch.float32))
    grads = []
    for save in (True, False):
        y = monarch(x, w1, w2, save_intermediate=save)
        grads.append(torch.autograd.grad(y.sin().sum(), (x, w1, w2)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---- MonarchLinear --------------------------------------------------------------------------

@pytest.mark.parametrize("dims", [(64, 64, 8), (64, 64, 4), (48, 96, 4), (96, 48, 4), (12, 8, 4), (32, 32, 1)])
def test_from_dense_recovers_a_monarch_matrix(dims):
    layer = MonarchLinear(*dims, dtype=torch.float64)
    dense = layer.to_dense()
    torch.testing.assert_close(dense, dense_by_formula(layer.blkdiag1, layer.blkdiag2), rtol=1e-12, atol=1e-12)
    proj = MonarchLinear.from_dense(dense, dims[2])
    torch.testing.assert_close(proj.to_dense(), dense, rtol=1e-10, atol=1e-10)


def _optimal_projection_error(weight: torch.Tensor, nblocks: int, mid: int) -> float:
    """Eckart-Young per block pair: the pair (l, k) holds as many rank-1 terms as positions
    i = k*mid + q = r*nblocks + l, so its best error is the tail of its singular values."""
    d_out, d_in = weight.shape
    out_bs, in_bs = d_out // nblocks, d_in // nblocks
    terms = torch.zeros(nblocks, nblocks, dtype=torch.int64)
    for i in range(nblocks * mid):
        terms[i % nblocks, i // mid] += 1
    err2 = 0.0
    for l in range(nblocks):
        for k in range(nblocks):
            s = torch.linalg.svdvals(weight[l::nblocks, k * in_bs:(k + 1) * in_bs].double())
            err2 += float(s[int(terms[l, k]):].square().sum())
    return err2 ** 0.5


@pytest.mark.parametrize("dims", [(64, 64, 8), (64, 64, 4), (48, 96, 4), (96, 48, 4), (12, 8, 4)])
def test_from_dense_projection_is_optimal(dims):
    d_in, d_out, nb = dims
    weight = torch.randn(d_out, d_in, dtype=torch.float64)
    proj = MonarchLinear.from_dense(weight, nb)
    err = float((proj.to_dense() - weight).norm())
    best = _optimal_projection_error(weight, nb, proj.blkdiag1.shape[1])
    assert err == pytest.approx(best, rel=1e-9)
    # and no small perturbation of the factors does better
    for _ in range(5):
        p = MonarchLinear.from_dense(weight, nb)
        with torch.no_grad():
            p.blkdiag1.add_(torch.randn_like(p.blkdiag1) * 1e-3)
            p.blkdiag2.add_(torch.randn_like(p.blkdiag2) * 1e-3)
        assert float((p.to_dense() - weight).norm()) >= err


def test_from_dense_linear_keeps_bias_and_dtype():
    lin = nn.Linear(32, 16)
    layer = MonarchLinear.from_dense(lin, nblocks=4)
    assert layer.blkdiag1.dtype == torch.float32 and torch.equal(layer.bias, lin.bias)
    x = torch.randn(5, 32)
    torch.testing.assert_close(layer(x), x @ layer.to_dense().t() + lin.bias, rtol=1e-5, atol=1e-5)


def test_monarch_linear_matches_dense_and_trains():
    layer = MonarchLinear(64, 32, nblocks=4)
    x = torch.randn(3, 7, 64)
    y = layer(x)
    dense = dense_by_formula(layer.blkdiag1.detach(), layer.blkdiag2.detach())
    _assert_close(y.reshape(-1, 32), x.reshape(-1, 64).double() @ dense.t() + layer.bias.detach().double(),
                  torch.float32, "layer")
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    target = torch.randn(3, 7, 32)
    losses = []
    for _ in range(20):
        loss = (layer(x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])  # inductor also trusts the fake kernels' strides
def test_monarch_linear_compile_fullgraph(backend):
    torch._dynamo.reset()
    layer = MonarchLinear(32, 48, nblocks=4)
    x = torch.randn(2, 5, 32, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    y = compiled(x)
    torch.testing.assert_close(y, layer(x), rtol=0, atol=0)
    g = torch.autograd.grad(y.sum(), (x, layer.blkdiag1))
    g_ref = torch.autograd.grad(layer(x).sum(), (x, layer.blkdiag1))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_autocast_runs_in_bf16():
    layer = MonarchLinear(32, 32, nblocks=4)
    x = torch.randn(4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    _assert_close(y.float(), layer(x), torch.bfloat16, "autocast")


def test_layer_rejects_bad_sizes():
    with pytest.raises(ValueError, match="must divide"):
        MonarchLinear(30, 32, nblocks=4)
    with pytest.raises(ValueError, match="must divide"):
        MonarchLinear(32, 30, nblocks=4)
    with pytest.raises(ValueError, match="positive"):
        MonarchLinear(32, 32, nblocks=0)


# ---- bad inputs -------------------------------------------------------------------------------

def test_bad_inputs_raise():
    x, w1, w2 = _tensors(5, 4, 3, 3, 3, torch.float32)
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        monarch_forward(x[0], w1, w2)
    with pytest.raises(RuntimeError, match="must equal nblocks"):
        monarch_forward(torch.randn(5, 13), w1, w2)
    with pytest.raises(RuntimeError, match="w2 must have shape"):
        monarch_forward(x, w1, torch.randn(4, 3, 2))
    with pytest.raises(RuntimeError, match="w2 must have shape"):
        monarch_forward(x, w1, torch.randn(2, 3, 3))
    with pytest.raises(RuntimeError, match="w1 must be 3-D"):
        monarch_forward(x, w1[0], w2)
    with pytest.raises(TypeError, match="w1 is c10::Half|w1 is Half"):
        monarch_forward(x, w1.half(), w2)
    with pytest.raises(TypeError, match="x must be float32"):
        monarch_forward(x.int(), w1, w2)
    with pytest.raises(RuntimeError, match="grad_y must have shape"):
        monarch_backward(torch.randn(5, 11), x, w1, w2)
    with pytest.raises(RuntimeError, match="h must be"):
        monarch_backward(torch.randn(5, 12), x, w1, w2, torch.randn(12, 4))
    with pytest.raises(RuntimeError, match="w must be 3-D"):
        blockdiag_forward(x, torch.randn(4, 3))
    with pytest.raises(RuntimeError, match="must equal nblocks"):
        blockdiag_forward(x, torch.randn(5, 3, 3))
    with pytest.raises(RuntimeError, match="grad_y must have shape"):
        blockdiag_backward(torch.randn(5, 3), x, torch.randn(4, 3, 3))


def test_double_backward_raises_instead_of_returning_zeros():
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(4, 4, 4, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(4, 4, 4, dtype=torch.float64, requires_grad=True)
    (g1,) = torch.autograd.grad((monarch(x, w1, w2) ** 2).sum(), w1, create_graph=True)
    with pytest.raises(RuntimeError, match="monarch_forward: double backward"):
        g1.sum().backward()
    (gx,) = torch.autograd.grad((blockdiag(x, w1) ** 2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="blockdiag_forward: double backward"):
        gx.sum().backward()


def test_monarch_linear_compiles_with_a_data_dependent_batch():
    # backward decided whether h was saved from h.numel(), a guard on a size only known at run time
    import torch._dynamo
    torch.manual_seed(0)
    layer = MonarchLinear(12, 8, nblocks=2)
    x = torch.randn(6, 12)
    keep = torch.tensor([True, False, True, True, False, True])
    want = layer(x[keep])
    gw_want = torch.autograd.grad(want.sum(), layer.blkdiag1)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        compiled = torch.compile(lambda x, m: layer(x[m]), fullgraph=True, backend="aot_eager")
        got = compiled(x, keep)
        gw = torch.autograd.grad(got.sum(), layer.blkdiag1)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(gw[0], gw_want[0], rtol=0, atol=0)
    for n in (0, 3):  # eager, with h saved and not
        for save in (True, False):
            xs = torch.randn(n, 12, requires_grad=True)
            y = monarch(xs, layer.blkdiag1, layer.blkdiag2, save_intermediate=save)
            y.sum().backward()
            assert xs.grad.shape == xs.shape


def test_second_derivatives_through_autograd_grad_raise_too():
    # autograd.grad to x (not .backward()): the raising node must sit on the path from the grads
    # to the formula's inputs, or the op's own term of the second derivative is silently dropped
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(4, 4, 4, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(4, 4, 4, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad((monarch(x, w1, w2) ** 2).sum() + (x ** 3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="monarch_forward: double backward"):
        torch.autograd.grad(gx.sum(), x)
    (gw,) = torch.autograd.grad((blockdiag(x, w1) ** 2).sum(), w1, create_graph=True)
    with pytest.raises(RuntimeError, match="blockdiag_forward: double backward"):
        torch.autograd.grad(gw.sum(), x)


def test_layer_sizes_take_numpy_ints_and_from_dense_refuses_a_second_bias():
    import numpy as np
    layer = MonarchLinear(np.int64(12), 12, np.int64(3))
    assert layer.nblocks == 3 and type(layer.nblocks) is int
    for bad in (3.0, True, 0):
        with pytest.raises(ValueError, match="nblocks must be a positive int"):
            MonarchLinear(12, 12, bad)
    with pytest.raises(ValueError, match="takes the bias of the nn.Linear"):
        MonarchLinear.from_dense(nn.Linear(8, 8), 2, bias=torch.zeros(8))


def test_torch_func_grad_matches_autograd_of_the_reference():
    g = torch.Generator().manual_seed(0)
    x, w1, w2 = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((5, 16), (4, 4, 4), (4, 4, 4)))
    got = torch.func.grad(lambda *t: monarch(*t).square().sum(), argnums=(0, 1, 2))(x, w1, w2)
    leaves = [t.clone().requires_grad_() for t in (x, w1, w2)]
    for g_, ref in zip(got, torch.autograd.grad(monarch_ref(*leaves).square().sum(), leaves)):
        torch.testing.assert_close(g_, ref)
    got = torch.func.grad(lambda *t: blockdiag(*t).square().sum(), argnums=(0, 1))(x, w1)
    leaves = [t.clone().requires_grad_() for t in (x, w1)]
    for g_, ref in zip(got, torch.autograd.grad(blockdiag_ref(*leaves).square().sum(), leaves)):
        torch.testing.assert_close(g_, ref)
    # a parameter captured from outside the transform keeps its (outer) gradient
    w1_outer = w1.clone().requires_grad_()
    y, _ = torch.func.vjp(lambda x: monarch(x, w1_outer, w2), x)
    leaf = w1.clone().requires_grad_()
    torch.testing.assert_close(torch.autograd.grad(y.square().sum(), w1_outer)[0],
                               torch.autograd.grad(monarch_ref(x, leaf, w2).square().sum(), leaf)[0])
    # the op called directly cannot reach outer levels from its kernel: it refuses, not drops them
    with pytest.raises(RuntimeError, match="through lowrank_ext.ops.monarch.monarch"):
        torch.func.grad(lambda w: torch.ops.lowrank.monarch_forward(x, w, w2)[0].square().sum())(w1)
    # vmap: torch's per-sample fallback (the ops have no batching rule)
    xs = torch.randn(3, 5, 16, generator=g, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        batched = torch.func.vmap(lambda x: monarch(x, w1, w2))(xs)
    torch.testing.assert_close(batched, torch.stack([monarch_ref(x, w1, w2) for x in xs]))


@pytest.mark.parametrize("strict", [True, False])
def test_torch_export_records_the_op(strict):
    torch.manual_seed(0)
    layer = MonarchLinear(16, 16, nblocks=4)
    x = torch.randn(3, 16)
    ep = torch.export.export(layer, (x,), strict=strict)
    assert any(n.target is torch.ops.lowrank.monarch_forward.default for n in ep.graph.nodes)
    want = monarch_ref(x, layer.blkdiag1, layer.blkdiag2).detach() + (0 if layer.bias is None else layer.bias.detach())
    torch.testing.assert_close(ep.module()(x), want)
