"""The multilora family: every op against its fp64 reference on its samples; the layer
against a loop of single-adapter LoRA over the token groups (the fused single-adapter op
and an fp64 loop), mixed ranks, ids -1, empty groups, one adapter for all tokens, many
small groups; gradients of every adapter against fp64 autograd and gradcheck; bad ids and
ranks; MultiLoRALinear's slots (no reallocation), PEFT state_dict loading and torch.compile."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lowrank_ext.nn import LoRALinear, MultiLoRALinear
from lowrank_ext.ops.lora import lora_linear
from lowrank_ext.ops.multilora import (lora_expand, lora_expand_, lora_grouped_outer, lora_shrink,
                                       multi_lora_linear)
from lowrank_ext.reference import REFERENCES
from lowrank_ext.reference.multilora import multi_lora_linear_ref
from samples import SAMPLES
from tolerances import tol

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
OPS = ["lowrank::lora_shrink", "lowrank::lora_expand", "lowrank::lora_expand_", "lowrank::lora_grouped_outer"]


def _detached(args):
    return tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args)


def _close(got, want, dtype, scale=1.0):
    atol, rtol = tol(dtype).values()
    torch.testing.assert_close(got, want, atol=atol * max(scale, 1.0), rtol=rtol)


@pytest.mark.parametrize("op", OPS)
def test_samples_match_reference(device, op):
    fn = getattr(torch.ops.lowrank, op.split("::")[1])
    for s in SAMPLES[op](device):
        args, ref_args = _detached(s.args), _detached(s.args)
        got = fn(*args)
        want = REFERENCES[op](*ref_args)
        if op.endswith("_"):  # in place: compare the mutated y
            got, want = args[0], ref_args[0]
        low = [a.dtype for a in s.args[:2] if isinstance(a, torch.Tensor) and a.dtype != torch.float32]
        dtype = low[0] if low else torch.float32
        _close(got, want, dtype, scale=float(want.abs().max()) if want.numel() else 1.0)


def _stack(device, dtype, s, r, d_in, d_out, ranks, scale_b=1.0):
    a = torch.randn(s, r, d_in, device=device, dtype=torch.float64)
    b = torch.randn(s, d_out, r, device=device, dtype=torch.float64) * scale_b
    for i, rk in enumerate(ranks):  # padding is garbage: the ops must never read it
        a[i, rk:] = float("nan")
        b[i, :, rk:] = float("nan")
    return a.to(dtype), b.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_equals_loop_of_single_adapter_lora(device, dtype):
    n, s, r, d_in, d_out = 300, 6, 16, 40, 24
    ranks = torch.tensor([16, 1, 8, 5, 16, 3], device=device)
    scales = torch.tensor([0.5, 2.0, 1.0, 0.25, 1.5, 3.0], device=device)
    a, b = _stack(device, dtype, s, r, d_in, d_out, ranks.tolist())
    ids = torch.randint(-1, 5, (n,), device=device)  # unsorted, with -1; slot 5 stays empty
    x = torch.randn(n, d_in, device=device, dtype=dtype)
    w = torch.randn(d_out, d_in, device=device, dtype=dtype) * 0.2
    bias = torch.randn(d_out, device=device, dtype=dtype)
    got = multi_lora_linear(x, w, bias, a, b, ids, ranks, scales)

    loop = torch.nn.functional.linear(x, w, bias)  # the fused single-adapter op, once per group
    for i in range(s):
        rows = ids == i
        rk = int(ranks[i])
        if rows.any():
            loop[rows] = lora_linear(x[rows], w, bias, a[i, :rk].contiguous(), b[i, :, :rk].contiguous(),
                                     scale=float(scales[i]))
    want = multi_lora_linear_ref(x, w, bias, a, b, ids, ranks, scales)
    scale = float(want.abs().max())
    _close(got, want, dtype, scale)
    _close(got, loop, dtype, scale)
    assert torch.isfinite(got).all()


def test_one_adapter_for_all_tokens_equals_lora_linear(device):
    base = nn.Linear(33, 17).to(device)
    single = LoRALinear(base, r=4, alpha=8).to(device)
    nn.init.normal_(single.lora_B["default"].weight)
    multi = MultiLoRALinear(base, max_adapters=3, max_rank=8)
    multi.load_lora_linear("only", single)
    x = torch.randn(2, 50, 33, device=device)
    with torch.no_grad():
        torch.testing.assert_close(multi(x, ["only", "only"]), single(x), **tol(torch.float32))


def test_many_small_groups_and_int32_ids(device):
    # 512 adapters over 4096 tokens: ~8 tokens each, gathered rows, the parallel path on CPU
    n, s, r, d = 4096, 512, 8, 64
    ranks = torch.randint(1, r + 1, (s,), device=device)
    a, b = _stack(device, torch.float32, s, r, d, d, ranks.tolist())
    ids = torch.randint(-1, s, (n,), device=device, dtype=torch.int32)
    x = torch.randn(n, d, device=device)
    w = torch.randn(d, d, device=device) * 0.1
    got = multi_lora_linear(x, w, None, a, b, ids, ranks)
    want = multi_lora_linear_ref(x, w, None, a, b, ids.long(), ranks)
    _close(got, want, torch.float32, float(want.abs().max()))


def test_contiguous_segments_and_all_minus_one(device):
    # per-sequence ids: every group a contiguous range (the view path), plus a batch with no adapter
    x = torch.randn(4, 25, 12, device=device)
    ids = torch.tensor([2, 0, -1, 2], device=device).repeat_interleave(25)
    a, b = torch.randn(3, 5, 12, device=device), torch.randn(3, 7, 5, device=device)
    w = torch.randn(7, 12, device=device)
    got = multi_lora_linear(x.reshape(100, 12), w, None, a, b, ids)
    want = multi_lora_linear_ref(x.reshape(100, 12), w, None, a, b, ids)
    _close(got, want, torch.float32, float(want.abs().max()))
    none = torch.full((100,), -1, device=device)
    torch.testing.assert_close(multi_lora_linear(x.reshape(100, 12), w, None, a, b, none),
                               x.reshape(100, 12) @ w.t())
    xa = lora_shrink(x.reshape(100, 12), a, none)
    assert torch.equal(xa, torch.zeros_like(xa))


def test_a_non_finite_adapter_does_not_leak_into_other_tokens(device):
    # tokens of several adapters share kernel tiles: an inf in one adapter's weights must only
    # reach that adapter's own tokens (and exact zeros stay exact)
    n, s, r, d = 64, 3, 4, 16
    a, b = torch.randn(s, r, d, device=device), torch.randn(s, d, r, device=device)
    a[1, 0, 3] = float("inf")
    b[1, 5, 0] = float("nan")
    ids = torch.arange(n, device=device) % s
    ids[::7] = -1
    x = torch.randn(n, d, device=device)
    xa = lora_shrink(x, a, ids, torch.tensor([4, 4, 2], device=device))
    y = torch.zeros(n, d, device=device)
    lora_expand_(y, xa, b, ids, torch.tensor([4, 4, 2], device=device))
    clean = (ids != 1)
    assert torch.isfinite(xa[clean]).all() and torch.isfinite(y[clean]).all()
    assert torch.equal(xa[ids == 2][:, 2:], torch.zeros_like(xa[ids == 2][:, 2:]))
    assert torch.equal(y[ids < 0], torch.zeros_like(y[ids < 0]))
    out = lora_grouped_outer(torch.randn(n, 2, device=device), x, ids, 4, torch.full((4,), float("inf"),
                                                                                       device=device))
    assert torch.equal(out[3], torch.zeros_like(out[3]))  # no tokens: exact zeros, whatever the scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_of_every_adapter_match_fp64_autograd(device, dtype):
    n, s, r, d_in, d_out = 200, 5, 8, 24, 20
    ranks = torch.tensor([8, 3, 0, 8, 5], device=device)
    scales = torch.tensor([1.0, 0.5, 2.0, 1.5, 0.75], device=device)
    ids = torch.randint(-1, 4, (n,), device=device)  # slot 4: no tokens
    x0 = torch.randn(n, d_in, device=device, dtype=torch.float64)
    w = torch.randn(d_out, d_in, device=device, dtype=torch.float64)
    a0 = torch.randn(s, r, d_in, device=device, dtype=torch.float64)
    b0 = torch.randn(s, d_out, r, device=device, dtype=torch.float64)
    g = torch.randn(n, d_out, device=device, dtype=torch.float64)

    x, a, b = (t.to(dtype).requires_grad_() for t in (x0, a0, b0))
    multi_lora_linear(x, w.to(dtype), None, a, b, ids, ranks, scales).backward(g.to(dtype))

    xr, ar, br = (t.to(dtype).double().requires_grad_() for t in (x0, a0, b0))
    multi_lora_linear_ref(xr, w.to(dtype).double(), None, ar, br, ids, ranks, scales).backward(g)
    for name, got, want in (("x", x.grad, xr.grad), ("a", a.grad, ar.grad), ("b", b.grad, br.grad)):
        want = want.clone()
        for i, rk in enumerate(ranks.tolist()):  # the reference never touches padding: zero grads there
            if name == "a":
                want[i, rk:] = 0
            if name == "b":
                want[i, :, rk:] = 0
        assert got.dtype == dtype, name
        _close(got.double(), want, dtype, float(want.abs().max()))
    assert torch.equal(a.grad[2], torch.zeros_like(a.grad[2])) and torch.equal(a.grad[4], torch.zeros_like(a.grad[4]))


def test_gradcheck_float64():
    ids = torch.tensor([1, -1, 0, 1, 1, 2, 0])
    ranks = torch.tensor([2, 3, 1])
    scales = torch.tensor([0.5, 1.5, -1.0], dtype=torch.float64)
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, 3, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    xa = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a: lora_shrink(x, a, ids, ranks, scales), (x, a))
    assert torch.autograd.gradcheck(lambda y, xa, b: lora_expand(y, xa, b, ids, ranks, scales), (y, xa, b))
    # second derivatives: those of the activations' gradients are right (built from these
    # differentiable ops; gradgradcheck only sees outputs that require grad, so the stacks are fixed
    # here), and a derivative of a stack's gradient (lora_grouped_outer: none) raises
    a_fixed, b_fixed = a.detach(), b.detach()
    assert torch.autograd.gradgradcheck(lambda x: lora_shrink(x, a_fixed, ids, ranks, scales), (x,))
    assert torch.autograd.gradgradcheck(lambda y, xa: lora_expand(y, xa, b_fixed, ids, ranks, scales), (y, xa))
    (ga,) = torch.autograd.grad((lora_shrink(x, a, ids, ranks, scales) ** 2).sum(), a, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        ga.sum().backward()
    (gb,) = torch.autograd.grad((lora_expand(y, xa, b, ids, ranks, scales) ** 2).sum(), b, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gb.sum().backward()
    # autograd.grad to the activations meets the raising node as well (no silent partial answer)
    (ga,) = torch.autograd.grad((lora_shrink(x, a, ids, ranks, scales) ** 2).sum(), a, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(ga.sum(), x)
    (gb,) = torch.autograd.grad((lora_expand(y, xa, b, ids, ranks, scales) ** 2).sum(), b, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(gb.sum(), xa)


def test_torch_func_grad_matches_autograd_of_the_reference():
    g = torch.Generator().manual_seed(0)
    ids, ranks = torch.tensor([1, -1, 0, 1, 2, 0]), torch.tensor([2, 3, 1])
    scales = torch.tensor([0.5, 1.5, -1.0], dtype=torch.float64)
    x, w, b = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((6, 5), (4, 5), (4,)))
    a, bs = torch.randn(3, 3, 5, generator=g, dtype=torch.float64), torch.randn(3, 4, 3, generator=g,
                                                                                dtype=torch.float64)
    got = torch.func.grad(lambda *t: multi_lora_linear(t[0], w, b, t[1], t[2], ids, ranks, scales).square().sum(),
                          argnums=(0, 1, 2))(x, a, bs)
    leaves = [t.clone().requires_grad_() for t in (x, a, bs)]
    ref = multi_lora_linear_ref(leaves[0], w, b, leaves[1], leaves[2], ids, ranks, scales)
    for g_, want in zip(got, torch.autograd.grad(ref.square().sum(), leaves)):
        torch.testing.assert_close(g_, want)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch's forward-AD module scripts a helper
def test_forward_mode_ad_raises_instead_of_dropping_the_tangent():
    # also on the in-place serving path (nothing requires grad): it wrote the LoRA term without one
    import torch.autograd.forward_ad as fwAD
    x, w, b = torch.randn(5, 8), torch.randn(6, 8), torch.randn(6)
    a, bs, ids = torch.randn(3, 4, 8), torch.randn(3, 6, 4), torch.tensor([0, 1, 2, -1, 1])
    with fwAD.dual_level(), torch.no_grad():
        for args in ((x, w, b, a, fwAD.make_dual(bs, torch.ones_like(bs))), (fwAD.make_dual(x, torch.ones_like(x)),
                                                                           w, b, a, bs)):
            with pytest.raises(NotImplementedError, match="jvp"):
                multi_lora_linear(*args, ids)


def test_scales_that_require_grad_are_refused():
    # scales are per-adapter constants: a trained one would silently get no gradient
    x, a = torch.randn(4, 6), torch.randn(2, 3, 6, requires_grad=True)
    ids = torch.tensor([0, 1, 1, 0])
    scales = torch.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(RuntimeError, match="scales has no gradient"):
        lora_shrink(x, a, ids, None, scales)
    with pytest.raises(RuntimeError, match="scales has no gradient"):
        lora_expand(torch.zeros(4, 5), torch.randn(4, 3, requires_grad=True), torch.randn(2, 5, 3), ids, None, scales)
    lora_shrink(x, a, ids, None, scales.detach()).sum().backward()  # detached: fine
    assert a.grad is not None


def test_grouped_outer_is_the_stacks_gradient(device):
    left, right = torch.randn(50, 3, device=device), torch.randn(50, 6, device=device)
    ids = torch.randint(-1, 4, (50,), device=device)
    got = lora_grouped_outer(left, right, ids, 5)
    for a in range(5):
        rows = ids == a
        torch.testing.assert_close(got[a], left[rows].t() @ right[rows], **tol(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d_in, d_out, r", [(40, 24, 8), (33, 1047, 8), (20, 300, 64), (16, 70, 72), (600, 40, 16)])
def test_shrink_expand_groups_across_chunk_boundaries(device, dtype, d_in, d_out, r):
    """Groups of 0 to 300 tokens (the CPU kernels gather chunks of 32 rows here, and take a
    long contiguous group in place), some contiguous in the batch and some shuffled, mixed
    ranks and scales, into a y that is a non-contiguous view: against the fp64 references.
    The shapes cut the CPU expand's column panels (1024 wide at rank 8, 128 at rank 64) with
    a ragged last panel, and rank 72 is past its register-blocked kernel (BLAS then); d_in
    600 crosses the CPU shrink's 256-wide k-panels (A[a]^T transposed a panel at a time for
    a chunk whose adapter no later chunk of its thread takes)."""
    from lowrank_ext.reference.multilora import lora_expand_inplace_ref, lora_shrink_ref
    sizes = [0, 1, 31, 32, 33, 70, 2, 300]
    contiguous = torch.cat([torch.full((n,), a) for a, n in enumerate(sizes) if a % 2 == 1])
    shuffled = torch.cat([torch.full((n,), a) for a, n in enumerate(sizes) if a % 2 == 0] + [torch.full((9,), -1)])
    ids = torch.cat([contiguous, shuffled[torch.randperm(len(shuffled))]]).to(device)
    n = len(ids)
    ranks = torch.tensor([r, 3, r, 5, 1, r, 0, r - 1], device=device)
    scales = torch.tensor([0.5, 2.0, 1.0, -1.0, 3.0, 0.25, 1.0, 1.5], device=device)
    a, b = _stack(device, dtype, len(sizes), r, d_in, d_out, ranks.tolist())
    x = torch.randn(n, d_in, device=device, dtype=dtype)
    xa = lora_shrink(x, a, ids, ranks, scales)
    xa_ref = lora_shrink_ref(x.double(), a.double(), ids, ranks, scales)
    _close(xa.double(), xa_ref, dtype, scale=float(xa_ref.abs().max()))
    base = torch.randn(d_out, n, device=device, dtype=dtype)
    y = base.t()  # non-contiguous
    y_ref, before = y.double().clone(), y.clone()
    lora_expand_(y, xa_ref.to(xa.dtype), b, ids, ranks, scales)
    lora_expand_inplace_ref(y_ref, xa_ref, b.double(), ids, ranks, scales)
    _close(y.double(), y_ref, dtype, scale=float(y_ref.abs().max()))
    assert torch.equal(y[ids < 0], before[ids < 0]) and y.data_ptr() == base.data_ptr()


def test_inplace_expand_writes_y_and_leaves_unadapted_rows_bitwise(device):
    y = torch.randn(40, 8, device=device, dtype=torch.bfloat16)
    before = y.clone()
    ids = torch.randint(-1, 2, (40,), device=device)
    lora_expand_(y, torch.randn(40, 4, device=device), torch.randn(2, 8, 4, device=device, dtype=torch.bfloat16),
                 ids)
    assert torch.equal(y[ids < 0], before[ids < 0])
    assert not torch.equal(y[ids >= 0], before[ids >= 0])


def test_autocast_casts_like_nn_linear():
    layer = MultiLoRALinear(nn.Linear(32, 16), max_adapters=2, max_rank=4)
    layer.load_adapter("a", torch.randn(4, 32), torch.randn(16, 4))
    x, ids = torch.randn(10, 32), torch.tensor([0, -1] * 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x, ids)
        plain = layer.base_layer(x)
    assert y.dtype == plain.dtype == torch.bfloat16
    bf = [t.to(torch.bfloat16) for t in (x, layer.base_layer.weight, layer.base_layer.bias, layer.lora_a, layer.lora_b)]
    want = multi_lora_linear_ref(*bf, ids, layer.ranks, layer.scales)
    torch.testing.assert_close(y, want, **tol(torch.bfloat16))


# ---- bad inputs ----

@pytest.mark.parametrize("bad", [3, -2, 100])
def test_out_of_range_ids_raise_before_writing(bad):
    x, a, b = torch.randn(6, 4), torch.randn(3, 2, 4), torch.randn(3, 5, 2)
    ids = torch.tensor([0, 1, 2, bad, 0, 1])
    with pytest.raises(IndexError, match="out of range"):
        lora_shrink(x, a, ids)
    y = torch.randn(6, 5)
    before = y.clone()
    with pytest.raises(IndexError, match="out of range"):
        lora_expand_(y, torch.randn(6, 2), b, ids)
    assert torch.equal(y, before)
    with pytest.raises(IndexError, match="out of range"):
        lora_grouped_outer(torch.randn(6, 2), x, ids, 3)


def test_bad_arguments_raise():
    x, a, ids = torch.randn(6, 4), torch.randn(3, 2, 4), torch.zeros(6, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="ranks"):
        lora_shrink(x, a, ids, torch.tensor([1, 3, 0]))  # rank 3 > R = 2
    with pytest.raises(RuntimeError, match="ranks must have shape"):
        lora_shrink(x, a, ids, torch.tensor([1, 1]))
    with pytest.raises(RuntimeError, match="a_stack must have shape"):
        lora_shrink(x, torch.randn(3, 2, 5), ids)
    with pytest.raises(RuntimeError, match="token_adapter_ids must have shape"):
        lora_shrink(x, a, ids[:5])
    with pytest.raises(TypeError, match="int64 or int32"):
        lora_shrink(x, a, ids.float())
    with pytest.raises(TypeError, match="a_stack is"):
        lora_shrink(x, a.double(), ids)
    with pytest.raises(RuntimeError, match="xa must have shape"):
        lora_expand(torch.randn(6, 5), torch.randn(6, 3), torch.randn(3, 5, 2), ids)
    with pytest.raises(RuntimeError, match="scales must have shape"):
        lora_expand(torch.randn(6, 5), torch.randn(6, 2), torch.randn(3, 5, 2), ids, None, torch.ones(2))
    with pytest.raises(ValueError, match="one id per token"):
        multi_lora_linear(torch.randn(2, 3, 4), torch.randn(5, 4), None, a, torch.randn(3, 5, 2), ids)


def test_inplace_expand_reads_xa_inside_y_as_it_was(device):
    """xa in y's own memory (a view of y, one buffer holding [y | xa], or contiguous rows inside
    y's) is read as it was before the call, not as the expand overwrites it: against the fp64
    reference."""
    from lowrank_ext.reference.multilora import lora_expand_inplace_ref
    ids = torch.tensor([0, 1, -1, 1, 0, 0], device=device)
    b = torch.randn(2, 5, 2, device=device)
    buf_a, buf_b, flat = torch.randn(6, 5, device=device), torch.randn(6, 7, device=device), torch.randn(30, device=device)
    cases = [(buf_a, buf_a[:, :2], ids, b), (buf_b[:, :5], buf_b[:, 5:], ids, b),
             (flat.view(6, 5), flat[10:22].view(6, 2), ids, b)]
    # one adapter, contiguous xa in y's first rows: rows 6.. of xa are overwritten by the first
    # rows' results unless xa is read as it was, whatever the thread order
    for n in (12, 300):  # 300: one long contiguous group (a BLAS call on views)
        big = torch.randn(n * 8, device=device)
        cases.append((big.view(n, 8), big[: n * 4].view(n, 4), torch.zeros(n, dtype=torch.int64, device=device),
                      torch.randn(1, 8, 4, device=device)))
    for y, xa, ids_, b_ in cases:
        y_ref = y.double().clone()
        lora_expand_inplace_ref(y_ref, xa.double().clone(), b_.double(), ids_)
        lora_expand_(y, xa, b_, ids_)
        torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)


# ---- MultiLoRALinear ----

def test_layer_load_replace_unload_without_reallocation():
    layer = MultiLoRALinear(nn.Linear(16, 8), max_adapters=2, max_rank=4)
    ptrs = (layer.lora_a.data_ptr(), layer.lora_b.data_ptr())
    x = torch.randn(5, 16)
    a1, b1 = torch.randn(4, 16), torch.randn(8, 4)
    a2, b2 = torch.randn(2, 16), torch.randn(8, 2)
    assert layer.load_adapter("one", a1, b1, alpha=8) == 0
    assert layer.load_adapter("two", a2, b2, scale=0.5) == 1
    with pytest.raises(RuntimeError, match="slots are taken"):
        layer.load_adapter("three", a2, b2)
    base = layer.base_layer(x)
    with torch.no_grad():
        torch.testing.assert_close(layer(x, ["one"] * 5), base + 2.0 * x @ a1.t() @ b1.t())
        layer.load_adapter("one", a2, b2)  # replace: rank 4 -> 2, scale 1, same slot
        torch.testing.assert_close(layer(x, ["one", "two", None, "one", "two"]),
                                   base + torch.tensor([1.0, 0.5, 0.0, 1.0, 0.5]).unsqueeze(1) * (x @ a2.t() @ b2.t()))
        layer.unload_adapter("two")
        torch.testing.assert_close(layer(x, torch.tensor([1, 1, 1, 1, 1])), base)  # a freed slot adds nothing
    assert layer.load_adapter("three", a1, b1) == 1
    assert (layer.lora_a.data_ptr(), layer.lora_b.data_ptr()) == ptrs
    with pytest.raises(KeyError, match="no adapter named"):
        layer(x, ["nope"] * 5)
    with pytest.raises(KeyError):
        layer.unload_adapter("two")
    with pytest.raises(ValueError, match="lora_a must be"):
        layer.load_adapter("big", torch.randn(5, 16), torch.randn(8, 5))


def test_layer_per_sequence_ids_and_training_several_adapters():
    torch.manual_seed(1)
    layer = MultiLoRALinear(nn.Linear(12, 6), max_adapters=3, max_rank=4)
    for i, name in enumerate(("p", "q", "r")):
        layer.load_adapter(name, torch.randn(4 - i, 12), torch.randn(6, 4 - i) * 0.1, alpha=2.0)
    x = torch.randn(3, 7, 12)
    per_seq = layer(x, ["q", None, "p"])
    per_tok = layer(x, layer.adapter_ids(["q", None, "p"]).repeat_interleave(7).reshape(3, 7))
    torch.testing.assert_close(per_seq, per_tok)
    per_seq.square().sum().backward()
    assert layer.base_layer.weight.grad is None
    ga, gb = layer.lora_a.grad, layer.lora_b.grad
    assert ga[0, :4].abs().sum() > 0 and ga[1, :3].abs().sum() > 0
    assert torch.equal(ga[2], torch.zeros_like(ga[2]))  # "r" had no tokens
    assert torch.equal(ga[1, 3:], torch.zeros_like(ga[1, 3:])) and torch.equal(gb[1, :, 3:],
                                                                               torch.zeros_like(gb[1, :, 3:]))


peft = pytest.importorskip("peft")  # a test dependency (requirements-dev.txt)


def test_layer_loads_a_peft_adapter_state_dict():
    torch.manual_seed(2)
    base = nn.Linear(20, 10)
    model = peft.get_peft_model(nn.Sequential(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    lora = model.base_model.model[0]
    nn.init.normal_(lora.lora_B["default"].weight)
    state = peft.get_peft_model_state_dict(model)  # the keys of a saved adapter file
    multi = MultiLoRALinear(nn.Linear(20, 10), max_adapters=2, max_rank=8)
    multi.base_layer.load_state_dict(lora.base_layer.state_dict())
    multi.load_peft_state_dict("peft", state, alpha=8)
    x = torch.randn(9, 20)
    with torch.no_grad():
        torch.testing.assert_close(multi(x, ["peft"] * 9), model(x), **tol(torch.float32))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])  # inductor also trusts the fake kernels' strides
def test_layer_compiles_fullgraph(backend):
    torch._dynamo.reset()
    layer = MultiLoRALinear(nn.Linear(16, 8), max_adapters=3, max_rank=4)
    layer.load_adapter("a", torch.randn(4, 16), torch.randn(8, 4))
    layer.load_adapter("b", torch.randn(2, 16), torch.randn(8, 2))
    ids = torch.tensor([0, 1, -1, 1, 0, 0])
    x = torch.randn(6, 16, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    y = compiled(x, ids)
    y.sum().backward()
    want = multi_lora_linear_ref(x.detach(), layer.base_layer.weight, layer.base_layer.bias, layer.lora_a.detach(),
                                 layer.lora_b.detach(), ids, layer.ranks, layer.scales)
    torch.testing.assert_close(y.detach(), want, **tol(torch.float32))
    grad_a = layer.lora_a.grad.clone()
    layer.zero_grad()
    layer(x, ids).sum().backward()
    torch.testing.assert_close(grad_a, layer.lora_a.grad)
    with torch.no_grad():  # the in-place serving path
        torch.testing.assert_close(compiled(x, ids), want)


@pytest.mark.cuda
def test_cuda_graph_capture_and_replay():
    # no host sync and size-only launch shapes: the serving forward can be captured once and
    # replayed with new ids and activations written into the static inputs
    layer = MultiLoRALinear(nn.Linear(64, 48), max_adapters=8, max_rank=16).cuda()
    for i in range(6):
        layer.load_adapter(f"a{i}", torch.randn(16 - 2 * i, 64), torch.randn(48, 16 - 2 * i), alpha=8)
    x = torch.randn(300, 64, device="cuda")
    ids = torch.randint(-1, 6, (300,), device="cuda")
    with torch.no_grad():
        layer(x, ids)  # warm-up outside the capture (allocator, lazy init)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            layer(x, ids)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = layer(x, ids)
        x.copy_(torch.randn_like(x))
        ids.copy_(torch.randint(-1, 6, (300,), device="cuda"))
        graph.replay()
        want = multi_lora_linear_ref(x, layer.base_layer.weight, layer.base_layer.bias, layer.lora_a, layer.lora_b,
                                     ids, layer.ranks, layer.scales)
        torch.testing.assert_close(y, want, **tol(torch.float32))


def test_stacks_in_another_dtype_than_the_base():
    # fp32 adapters on a bf16 base layer (no autocast): the branch runs in fp32, as PEFT's does
    torch.manual_seed(0)
    base = nn.Linear(13, 7).bfloat16()
    layer = MultiLoRALinear(base, max_adapters=2, max_rank=4, dtype=torch.float32)
    a, b = torch.randn(3, 13), torch.randn(7, 3)
    layer.load_adapter("a", a, b, scale=0.5)
    x = torch.randn(5, 13).bfloat16()
    y = layer(x, ["a", None, "a", "a", None])
    assert y.dtype == torch.bfloat16
    delta = 0.5 * (x.float() @ a.t()) @ b.t()
    delta[[1, 4]] = 0
    want = base(x).float() + delta
    torch.testing.assert_close(y.float(), want, atol=0.05 * float(want.abs().max()), rtol=0.02)


def test_state_dict_keeps_the_adapter_names():
    layer = MultiLoRALinear(nn.Linear(13, 7), max_adapters=3, max_rank=4)
    layer.load_adapter("fr", torch.randn(2, 13), torch.randn(7, 2))
    layer.load_adapter("de", torch.randn(4, 13), torch.randn(7, 4))
    fresh = MultiLoRALinear(nn.Linear(13, 7), max_adapters=3, max_rank=4)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.adapter_names == ["fr", "de"]
    fresh.load_adapter("es", torch.randn(1, 13), torch.randn(7, 1))  # a free slot, not one of the loaded
    x = torch.randn(4, 13)
    torch.testing.assert_close(fresh(x, ["fr", "de", None, "fr"]), layer(x, ["fr", "de", None, "fr"]))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_empty_feature_dims_are_no_ops(dtype):
    # d_out = 0 (and d_in = 0 in the shrink's backward): nothing to compute, no crash
    ids = torch.tensor([0, 1] * 4)
    y = torch.zeros(8, 0, dtype=dtype)
    xa = torch.randn(8, 4, dtype=dtype)
    lora_expand_(y, xa, torch.zeros(2, 0, 4, dtype=dtype), ids)
    assert lora_expand(y, xa, torch.zeros(2, 0, 4, dtype=dtype), ids).shape == (8, 0)
    layer = MultiLoRALinear(nn.Linear(16, 0, dtype=dtype), 2, 4)
    layer.load_adapter("a", torch.randn(4, 16, dtype=dtype), torch.randn(0, 4, dtype=dtype))
    assert layer(torch.randn(8, 16, dtype=dtype), ids).shape == (8, 0)
    x = torch.randn(8, 0, dtype=dtype, requires_grad=True)
    a_stack = torch.randn(2, 4, 0, dtype=dtype, requires_grad=True)
    xa = lora_shrink(x, a_stack, ids)
    assert torch.equal(xa, torch.zeros(8, 4, dtype=dtype))
    xa.sum().backward()
    assert x.grad.shape == (8, 0) and a_stack.grad.shape == (2, 4, 0)


def test_inplace_expand_raises_when_b_stack_overlaps_y():
    y = torch.randn(300, 8)
    before = y.clone()
    b_stack = y[:4].t().unsqueeze(0)  # B read from the rows being written
    with pytest.raises(RuntimeError, match="single memory location"):
        lora_expand_(y, torch.randn(300, 4), b_stack, torch.zeros(300, dtype=torch.long))
    assert torch.equal(y, before)


def test_inplace_expand_raises_when_a_strided_b_stack_shares_y():
    # a non-dense view: torch's overlap check cannot decide, so a shared storage is refused
    y = torch.randn(8, 12)
    before = y.clone()
    b_stack = y[:, ::3][:, :2].unsqueeze(0)  # [1, 8, 2], every third column of y
    with pytest.raises(RuntimeError, match="b_stack shares memory with y"):
        lora_expand_(y, torch.randn(8, 2), b_stack, torch.zeros(8, dtype=torch.long))
    assert torch.equal(y, before)


def test_load_adapter_from_its_own_slot_changes_only_the_scale():
    # the only way to change a scale: reload the slot's tensors (views of the stacks)
    layer = MultiLoRALinear(nn.Linear(16, 12), max_adapters=2, max_rank=4)
    a, b = torch.randn(3, 16), torch.randn(12, 3)
    slot = layer.load_adapter("a", a, b, scale=1.0)
    layer.load_adapter("a", layer.lora_a[slot, :3].detach(), layer.lora_b[slot, :, :3].detach(), scale=2.0)
    assert torch.equal(layer.lora_a[slot, :3], a) and torch.equal(layer.lora_b[slot, :, :3], b)
    assert float(layer.scales[slot]) == 2.0
    with pytest.raises(ValueError, match="lora_a must be"):
        layer.load_adapter("z", torch.tensor(1.0), b)


def test_layer_loads_fp64_lora_linear_exactly():
    torch.manual_seed(0)
    base = nn.Linear(16, 8, dtype=torch.float64)
    lora = LoRALinear(base, r=4)
    with torch.no_grad():
        lora.lora_B["default"].weight.normal_()
    multi = MultiLoRALinear(nn.Linear(16, 8, dtype=torch.float64), 1, 4)
    multi.base_layer.load_state_dict(base.state_dict())
    multi.load_lora_linear("a", lora)
    assert torch.equal(multi.lora_b[0], lora.lora_B["default"].weight.detach())
    x = torch.randn(5, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(multi(x, torch.zeros(5, dtype=torch.long)), lora(x), rtol=1e-12, atol=1e-12)


def test_inplace_expand_refuses_what_autograd_cannot_record():
    ids = torch.zeros(5, dtype=torch.long)
    b_stack = torch.randn(1, 3, 2)
    x = torch.randn(5, 3)
    w = torch.randn(3, 3, requires_grad=True)
    y = x @ w.t()  # a non-leaf that requires grad: adding a constant (to autograd) into it is fine
    xa = torch.randn(5, 2)
    lora_expand_(y, xa, b_stack, ids)
    y.sum().backward()
    torch.testing.assert_close(w.grad, torch.ones(5, 3).t() @ x)  # the base's gradient is unchanged
    with pytest.raises(RuntimeError, match="xa requires grad"):
        lora_expand_(torch.zeros(5, 3), xa.requires_grad_(), b_stack, ids)
    with pytest.raises(RuntimeError, match="y is a leaf tensor that requires grad"):
        lora_expand_(torch.zeros(5, 3, requires_grad=True), torch.randn(5, 2), b_stack, ids)


def test_layer_state_dict_round_trips_through_safetensors(tmp_path):
    # the name -> slot map was a dict in the state_dict, which safetensors cannot write
    from safetensors.torch import load_file, save_file
    torch.manual_seed(0)
    layer = MultiLoRALinear(nn.Linear(12, 10), max_adapters=3, max_rank=4)
    layer.load_adapter("fr", torch.randn(2, 12), torch.randn(10, 2), alpha=4)
    layer.load_adapter("de", torch.randn(4, 12), torch.randn(10, 4), scale=0.5)
    layer.unload_adapter("fr")
    layer.load_adapter("it", torch.randn(3, 12), torch.randn(10, 3))
    save_file(layer.state_dict(), tmp_path / "multi.safetensors")
    fresh = MultiLoRALinear(nn.Linear(12, 10), max_adapters=3, max_rank=4)
    fresh.load_state_dict(load_file(tmp_path / "multi.safetensors"), strict=True)
    assert fresh.adapter_ids(["de", "it"]).tolist() == layer.adapter_ids(["de", "it"]).tolist()
    x = torch.randn(4, 12)
    names = ["de", None, "it", "de"]
    torch.testing.assert_close(fresh(x, names), layer(x, names), rtol=0, atol=0)
    # a state_dict saved with the map as a dict (before) still loads; a map that does not fit raises
    old = {**layer.state_dict(), "_extra_state": {"slots": {"de": 1, "it": 0}}}
    fresh.load_state_dict(old)
    assert fresh.adapter_ids(["de", "it"]).tolist() == [1, 0]
    with pytest.raises(ValueError, match="max_adapters"):
        fresh.load_state_dict({**layer.state_dict(), "_extra_state": {"slots": {"de": 5}}})


def test_half_and_bf16_layers_keep_exact_fp32_scales():
    layer = MultiLoRALinear(nn.Linear(12, 10), max_adapters=2, max_rank=4)
    layer.load_adapter("a", torch.randn(3, 12), torch.randn(10, 3), alpha=4.0)  # scale 4/3, inexact in bf16
    want = layer.scales.clone()
    for convert in (lambda m: m.bfloat16(), lambda m: m.half(), lambda m: m.to(torch.float64), lambda m: m.float()):
        convert(layer)
        assert layer.scales.dtype == torch.float32 and torch.equal(layer.scales, want)


def test_layer_built_on_meta_has_free_zeroed_slots_after_materialising():
    # ranks and scales stayed uninitialised memory (the forward failed on a garbage rank)
    with torch.device("meta"):
        layer = MultiLoRALinear(nn.Linear(16, 12), max_adapters=3, max_rank=4)
    layer = layer.to_empty(device="cpu")
    for m in layer.modules():
        if callable(getattr(m, "reset_parameters", None)):
            m.reset_parameters()
    assert layer.adapter_names == [] and not layer.ranks.any() and not layer.scales.any()
    x = torch.randn(5, 16)
    torch.testing.assert_close(layer(x, torch.tensor([0, 1, -1, 2, 0])), layer.base_layer(x), rtol=0, atol=0)
    layer.load_adapter("a", torch.randn(2, 16), torch.randn(12, 2))
    assert layer.adapter_names == ["a"]


def test_load_peft_state_dict_refuses_adapter_parts_it_cannot_serve():
    # DoRA's magnitude vector and lora_bias's B bias were dropped: the adapter loaded wrong
    layer = MultiLoRALinear(nn.Linear(16, 12), max_adapters=2, max_rank=4)
    plain = {"m.0.lora_A.weight": torch.randn(2, 16), "m.0.lora_B.weight": torch.randn(12, 2)}
    for extra in ({"m.0.lora_magnitude_vector": torch.ones(12)}, {"m.0.lora_B.bias": torch.zeros(12)}):
        with pytest.raises(ValueError, match="plain LoRA"):
            layer.load_peft_state_dict("a", {**plain, **extra}, alpha=4)
        assert layer.adapter_names == []
    layer.load_peft_state_dict("a", {**plain, "m.0.base_layer.weight": torch.randn(12, 16)}, alpha=4)
    assert layer.adapter_names == ["a"]


def test_base_layer_hooks_run():
    layer = MultiLoRALinear(nn.Linear(16, 12), max_adapters=2, max_rank=4)
    layer.load_adapter("a", torch.randn(2, 16), torch.randn(12, 2))
    x, ids = torch.randn(4, 16), torch.tensor([0, -1, 0, 0])
    want = layer(x, ids).detach()
    fired = []
    layer.base_layer.register_forward_hook(lambda *_: fired.append("fwd"))
    torch.testing.assert_close(layer(x, ids), want)
    assert fired == ["fwd"]


def test_fake_kernels_refuse_empty_stacks_as_the_kernels_do():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        y, xa, ids = torch.empty(3, 8), torch.empty(3, 4), torch.zeros(3, dtype=torch.int64)
        with pytest.raises(RuntimeError, match="S, R >= 1"):
            torch.ops.lowrank.lora_expand(y, xa, torch.empty(0, 8, 4), ids)
        with pytest.raises(RuntimeError, match="S, R >= 1"):
            torch.ops.lowrank.lora_shrink(torch.empty(3, 16), torch.empty(0, 4, 16), ids)


def test_hooked_base_layer_keeps_the_output_dtype_under_autocast():
    layer = MultiLoRALinear(nn.Linear(16, 12), max_adapters=2, max_rank=4)
    layer.load_adapter("a", torch.randn(2, 16), torch.randn(12, 2))
    x, ids = torch.randn(3, 16), torch.zeros(3, dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = layer(x, ids)
        layer.base_layer.register_forward_hook(lambda *_: None)
        hooked = layer(x, ids)
    assert hooked.dtype == plain.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("n", [40, 600])  # chunked groups, and one whole group (straight BLAS calls)
def test_a_zero_scale_still_carries_nan_on_every_path(dtype, n):
    # 0 * (x A^T) is NaN where x's row is: the whole-group BLAS calls with alpha = 0 gave 0
    torch.manual_seed(0)
    ids = torch.zeros(n, dtype=torch.long)
    x = torch.randn(n, 8, dtype=dtype)
    x[3, 2] = float("nan")
    zero = torch.tensor([0.0])
    xa = lora_shrink(x, torch.randn(1, 4, 8, dtype=dtype), ids, None, zero)
    assert xa[3].isnan().all() and torch.equal(xa[torch.arange(n) != 3], torch.zeros(n - 1, 4, dtype=xa.dtype))
    b = torch.randn(1, 6, 4, dtype=dtype)
    b[0, 1, 0] = float("nan")
    y = lora_expand(torch.zeros(n, 6, dtype=dtype), torch.randn(n, 4, dtype=xa.dtype), b, ids, None, zero)
    assert y[:, 1].isnan().all() and torch.equal(y[:, [0, 2, 3, 4, 5]], torch.zeros(n, 5, dtype=dtype))
    outer = lora_grouped_outer(x, torch.randn(n, 5, dtype=dtype), ids, 1, zero)
    assert outer[0, 2].isnan().all() and (outer[0, [0, 1, 3]] == 0).all()


def test_adapter_names_must_be_strings():
    layer = MultiLoRALinear(nn.Linear(8, 6), max_adapters=2, max_rank=2)
    with pytest.raises(TypeError, match="must be a str"):
        layer.load_adapter(7, torch.randn(2, 8), torch.randn(6, 2))
    assert layer.adapter_names == []


def test_a_load_of_stacks_of_another_size_leaves_names_and_scales_alone():
    # ranks, scales and names loaded without their stacks pointed a name at another adapter
    small = MultiLoRALinear(nn.Linear(5, 6), max_adapters=2, max_rank=4)
    small.load_adapter("fr", torch.randn(2, 5), torch.randn(6, 2))
    big = MultiLoRALinear(nn.Linear(5, 6), max_adapters=2, max_rank=8)
    big.load_adapter("de", torch.randn(3, 5), torch.randn(6, 3), scale=3.0)
    before = {k: v.clone() for k, v in small.state_dict().items() if k in ("lora_a", "lora_b", "ranks", "scales")}
    with pytest.raises(RuntimeError, match="size mismatch for lora_a"):
        small.load_state_dict(big.state_dict())
    assert small.adapter_names == ["fr"]
    assert all(torch.equal(v, small.state_dict()[k]) for k, v in before.items())
