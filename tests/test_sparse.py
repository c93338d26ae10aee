"""The sparse family: sparse_scatter_add_ against a serial loop and the fp64 reference
(repeated indices, several adapters, thread boundaries), its all-or-nothing index check,
sddmm against the dense gradient gathered, bad inputs."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank_ext.ops.sparse import sddmm, sparse_scatter_add_
from lowrank_ext.reference.sparse import sddmm_ref, sparse_scatter_add_ref
from tolerances import ACCUMULATE

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _serial_loop(weight, indices, values, alphas):
    """The documented semantics, one entry at a time: w = round(w + alpha * v) in fp32 (fp64 for fp64)."""
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    flat = weight.view(-1)
    for idx, val, alpha in zip(indices, values, alphas):
        a = torch.tensor(alpha, dtype=acc)
        for j, v in zip(idx.tolist(), val.to(acc)):
            flat[j] = (flat[j].to(acc) + a * v).to(weight.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unique_indices_match_the_formula_exactly(device, dtype):
    w = torch.randn(64, 129).to(dtype).to(device)
    idx = torch.randperm(w.numel(), device=device)[:1000]
    v = torch.randn(1000, device=device).to(dtype)
    want = w.clone()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    want.view(-1)[idx] = (w.view(-1)[idx].to(acc) + torch.tensor(0.3, dtype=acc) * v.to(acc)).to(dtype)
    sparse_scatter_add_(w, idx, v, 0.3)
    assert torch.equal(w, want)


def test_subnormal_weights_and_sums_are_kept(device):
    # fp32 on CUDA: atomicAdd (atom.add.f32) would flush these to 0; the CPU keeps them
    tiny = torch.finfo(torch.float32).tiny
    w0 = (torch.rand(4096) - 0.5) * tiny * 0.5           # subnormal weights, |w| < tiny / 4
    idx = torch.randperm(w0.numel())[:512]
    v = (torch.rand(512) - 0.5) * tiny * 0.5             # sums subnormal too: exact, no rounding
    want = w0.clone()
    want[idx] = w0[idx] + v
    assert (want[idx] != 0).all() and (want[idx].abs() < tiny).all()
    w = w0.to(device)
    sparse_scatter_add_(w, idx.to(device), v.to(device), 1.0)
    assert torch.equal(w.cpu(), want)
    sparse_scatter_add_(w, idx.to(device), v.to(device), -1.0)
    assert torch.equal(w.cpu(), w0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("order", ["sorted", "unsorted"])
def test_repeated_indices_equal_a_serial_loop(dtype, order):
    # 20000 entries over a small weight: many repeats, and several threads' ranges
    w = torch.randn(30, 50).to(dtype)
    idx = torch.randint(0, w.numel(), (20000,))
    if order == "sorted":
        idx = idx.sort().values
    v = torch.randn(20000).to(dtype)
    want = w.clone()
    _serial_loop(want, [idx], [v], [0.5])
    sparse_scatter_add_(w, idx, v, 0.5)
    assert torch.equal(w, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_several_adapters_match_reference(device, dtype):
    w = torch.randn(100, 77).to(dtype).to(device)
    idx = [torch.randint(0, w.numel(), (n,), device=device) for n in (3000, 10, 500)]
    idx[0] = idx[0].sort().values
    vals = [torch.randn(3000, device=device).to(dtype), torch.randn(10, device=device), torch.randn(500, device=device)]
    alphas = [1.0, -0.25, 2.0]
    want = w.cpu().clone()
    sparse_scatter_add_ref(want, [i.cpu() for i in idx], [v.cpu() for v in vals], alphas)
    sparse_scatter_add_(w, idx, vals, alphas)
    atol, rtol = ACCUMULATE[dtype]
    torch.testing.assert_close(w.cpu(), want, atol=4 * atol, rtol=4 * rtol)


def test_apply_then_remove_restores_within_rounding():
    w0 = torch.randn(256, 256)
    w = w0.clone()
    idx = torch.randperm(w.numel())[:655]
    v = torch.randn(655)
    sparse_scatter_add_(w, idx, v, 0.8)
    assert not torch.equal(w, w0)
    sparse_scatter_add_(w, idx, v, -0.8)
    # two roundings per touched entry, each at most half an ulp of |w| + |0.8 v|
    bound = (w0.abs() + 0.8 * v.abs().max()) * 2.0 ** -23
    assert bool(((w - w0).abs() <= bound).all())
    untouched = torch.ones(w.numel(), dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(w.view(-1)[untouched], w0.view(-1)[untouched])


def test_out_of_range_index_writes_nothing(device):
    w = torch.randn(10, 10, device=device)
    w0 = w.clone()
    good = torch.arange(0, 100, 3, device=device)
    for bad in (torch.tensor([5, 100], device=device), torch.tensor([-1, 2], device=device)):
        with pytest.raises(RuntimeError, match="out of range"):
            # the bad index is in the second adapter: the first must not be applied either
            sparse_scatter_add_(w, [good, bad], [torch.ones(34, device=device), torch.ones(2, device=device)], 1.0)
        assert torch.equal(w, w0)


def test_indices_checked_by_the_caller(device):
    # check_indices=False (what sparse.apply passes after its one check of every weight): the
    # same result where the indices are in range; the CPU kernel still checks and writes nothing
    w = torch.randn(40, 25, device=device)
    # no index repeats within an adapter: CUDA's atomic adds of a repeated one round in any order
    idx = [torch.randperm(1000, device=device)[:90], torch.tensor([7, 8, 999, 0], device=device)]
    vals = [torch.randn(90, device=device), torch.randn(4, device=device)]
    want = w.clone()
    sparse_scatter_add_(want, idx, vals, [0.5, -1.0])
    sparse_scatter_add_(w, idx, vals, [0.5, -1.0], check_indices=False)
    assert torch.equal(w, want)
    if device == "cpu":  # on CUDA an out-of-range index would trip a device assertion (context lost)
        with pytest.raises(RuntimeError, match="out of range"):
            sparse_scatter_add_(w, [idx[0], torch.tensor([5, 1000])], [vals[0], torch.ones(2)], 1.0,
                                check_indices=False)
        assert torch.equal(w, want)


def test_apply_checks_all_weights_in_one_transfer_then_skips_the_scatters_check(monkeypatch):
    import lowrank_ext.sparse as sparse_mod
    model = _model()
    real, flags = sparse_mod.sparse_scatter_add_, []

    def spy(*args, **kwargs):
        flags.append(kwargs.get("check_indices", True))
        return real(*args, **kwargs)
    monkeypatch.setattr(sparse_mod, "sparse_scatter_add_", spy)
    adapter = {"0": (torch.tensor([0, 5, 9]), torch.ones(3)), "2": (torch.tensor([1, 2]), torch.ones(2))}
    handle = sparse.apply(model, adapter, alpha=0.5)
    model[0].weight.data.view(-1)[0] += 1.0  # written since: remove subtracts through the scatter
    sparse.remove(model, handle)
    assert flags and not any(flags)


@pytest.mark.parametrize("descent_at", [1, 16384, 20000])
def test_one_descent_anywhere_is_seen_as_unsorted(descent_at):
    # The CPU scan checks order in parallel chunks (16384 or more indices; 20000 each on 2
    # threads): one descent, at a chunk's first index too, must send the scatter down the
    # unsorted path. Taken as sorted, the out-of-place largest index, among the first half,
    # would be skipped by every thread's binary search.
    n = 40000
    idx = torch.arange(0, 2 * n, 2)
    idx[descent_at - 1] = 2 * n + 1  # the only descent: idx[descent_at] < idx[descent_at - 1]
    v = torch.randn(n)
    w = torch.randn(2 * n + 2)
    want = w.clone()
    want[idx] += v
    sparse_scatter_add_(w, idx, v, 1.0)
    assert torch.equal(w, want)


def test_out_of_range_error_names_the_first_bad_position():
    idx = torch.arange(50000)
    idx[30000], idx[45000] = 50000, -3
    w = torch.zeros(50000)
    with pytest.raises(RuntimeError, match=r"indices\[0\]\[30000\] = 50000 is out of range"):
        sparse_scatter_add_(w, idx, torch.ones(50000), 1.0)
    assert not w.any()


@settings(max_examples=60, deadline=None)
@given(numel=st.integers(1, 3000), adapters=st.lists(st.tuples(st.integers(0, 400), st.floats(-4, 4)), min_size=1,
                                                        max_size=3),
       dtype=st.sampled_from(DTYPES), sort=st.booleans(), seed=st.integers(0, 2 ** 31))
def test_scatter_property_equals_the_serial_loop(numel, adapters, dtype, sort, seed):
    """Any weight size, any number of adapters, any (repeating, sorted or not) indices and
    alphas: exactly what the documented one-entry-at-a-time loop gives."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(numel, generator=g).to(dtype)
    indices = [torch.randint(0, numel, (n,), generator=g) for n, _ in adapters]
    if sort:
        indices = [i.sort().values for i in indices]
    values = [torch.randn(i.numel(), generator=g).to(dtype) for i in indices]
    alphas = [a for _, a in adapters]
    want = w.clone()
    _serial_loop(want, indices, values, alphas)
    sparse_scatter_add_(w, indices, values, alphas)
    assert torch.equal(w, want)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 300), d_out=st.integers(1, 40), d_in=st.integers(1, 40), nnz=st.integers(0, 200),
       seed=st.integers(0, 2 ** 31))
def test_sddmm_property_equals_the_dense_gradient_gathered(n, d_out, d_in, nnz, seed):
    g = torch.Generator().manual_seed(seed)
    grad_out, x = torch.randn(n, d_out, generator=g), torch.randn(n, d_in, generator=g)
    rows, cols = torch.randint(0, d_out, (nnz,), generator=g), torch.randint(0, d_in, (nnz,), generator=g)
    dense = grad_out.double().t() @ x.double()
    torch.testing.assert_close(sddmm(grad_out, x, rows, cols).double(), dense[rows, cols], atol=1e-4, rtol=1e-5)


def test_scatter_bad_inputs():
    w = torch.randn(8, 8)
    with pytest.raises(RuntimeError, match="contiguous"):
        sparse_scatter_add_(w.t(), torch.tensor([1]), torch.ones(1))
    with pytest.raises(TypeError, match="int64"):
        sparse_scatter_add_(w, torch.tensor([1], dtype=torch.int32), torch.ones(1))
    with pytest.raises(RuntimeError, match="one value per index"):
        sparse_scatter_add_(w, torch.tensor([1, 2]), torch.ones(3))
    with pytest.raises(RuntimeError, match="one length"):
        torch.ops.lowrank.sparse_scatter_add_(w, [torch.tensor([1])], [torch.ones(1)], [1.0, 2.0])
    with pytest.raises(TypeError, match="weight must be"):
        sparse_scatter_add_(torch.zeros(4, dtype=torch.int32), torch.tensor([1]), torch.ones(1))
    with pytest.raises(RuntimeError, match="finite"):
        sparse_scatter_add_(w, torch.tensor([1]), torch.ones(1), float("nan"))


@pytest.mark.parametrize("dtype", DTYPES)
# 260 x 700 x 600: several of the CPU kernel's column blocks, a token chunk and a feature tail
# outside its 16 x 16 transpose tiles
@pytest.mark.parametrize("shape", [(1, 3, 5, 4), (300, 17, 9, 50), (513, 64, 40, 2000), (0, 4, 4, 3),
                                   (260, 700, 600, 5000)],
                         ids=lambda s: "x".join(map(str, s)))
def test_sddmm_matches_reference_and_dense_gradient(device, dtype, shape):
    n, d_out, d_in, nnz = shape
    g = torch.randn(n, d_out).to(dtype).to(device)
    x = torch.randn(n, d_in).to(dtype).to(device)
    rows = torch.randint(0, d_out, (nnz,), device=device)
    cols = torch.randint(0, d_in, (nnz,), device=device)
    got = sddmm(g, x, rows, cols)
    assert got.dtype == dtype and got.shape == (nnz,)
    dense = g.cpu().double().t() @ x.cpu().double()  # the [d_out, d_in] gradient the op avoids
    want = dense[rows.cpu(), cols.cpu()]
    atol, rtol = ACCUMULATE[dtype]
    scale = max(float(want.abs().max()) if nnz else 0.0, 1.0) * max(n, 1) ** 0.5
    torch.testing.assert_close(got.cpu().double(), want, atol=atol * scale, rtol=rtol)
    torch.testing.assert_close(got.cpu(), sddmm_ref(g.cpu(), x.cpu(), rows.cpu(), cols.cpu()),
                               atol=atol * scale, rtol=rtol)


def test_sddmm_is_the_weight_gradient_of_the_sampled_entries():
    x = torch.randn(4, 6, 32)
    weight = torch.randn(24, 32, requires_grad=True)
    y = x @ weight.t()
    g = torch.randn_like(y)
    y.backward(g)
    rows, cols = torch.randint(0, 24, (100,)), torch.randint(0, 32, (100,))
    torch.testing.assert_close(sddmm(g, x, rows, cols), weight.grad[rows, cols], rtol=1e-5, atol=1e-5)


def test_sddmm_bad_inputs():
    g, x = torch.randn(5, 4), torch.randn(5, 6)
    ok = torch.tensor([0, 1])
    with pytest.raises(RuntimeError, match="out of range"):
        sddmm(g, x, torch.tensor([0, 4]), ok)
    with pytest.raises(RuntimeError, match="out of range"):
        sddmm(g, x, ok, torch.tensor([-1, 0]))
    with pytest.raises(RuntimeError, match="one N"):
        sddmm(torch.randn(4, 4), x, ok, ok)
    with pytest.raises(TypeError, match="grad_out is"):
        sddmm(g.double(), x, ok, ok)
    with pytest.raises(RuntimeError, match="one length"):
        sddmm(g, x, ok, torch.tensor([0]))


# ---- layers and adapter switching ---------------------------------------------------------------

from torch import nn  # noqa: E402

from lowrank_ext import sparse  # noqa: E402
from lowrank_ext.nn import SLTrainLinear, SparseAdapterLinear, choose_support  # noqa: E402


def _dense_mask_reference(base: nn.Linear, idx: torch.Tensor, values: torch.Tensor, x: torch.Tensor, g: torch.Tensor):
    """y and the values' gradient from a dense masked formulation: W_eff = W + scatter(values)."""
    v = values.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    s = torch.zeros(base.weight.numel(), dtype=v.dtype).index_put((idx,), v).view_as(base.weight)
    y = torch.nn.functional.linear(xr, base.weight.detach() + s, base.bias.detach())
    y.backward(g)
    return y.detach(), xr.grad, v.grad


@pytest.mark.parametrize("support", ["random", "magnitude", "gradient"])
def test_shira_layer_matches_dense_mask_reference_and_trains(support):
    base = nn.Linear(48, 40)
    w0 = base.weight.detach().clone()
    grad = torch.randn(40, 48) if support == "gradient" else None
    layer = SparseAdapterLinear(base, density=0.05, support=support, grad=grad, seed=3)
    nnz = layer.indices.numel()
    assert nnz == round(0.05 * 48 * 40) and torch.equal(layer.indices, layer.indices.unique(sorted=True))
    if support == "magnitude":
        assert torch.equal(layer.indices, w0.abs().flatten().topk(nnz).indices.sort().values)
    opt = torch.optim.SGD([layer.values], lr=0.5)
    x = torch.randn(3, 7, 48, requires_grad=True)
    for _ in range(3):  # the forward folds each step's change into W_eff
        g = torch.randn(3, 7, 40)
        y = layer(x)
        ref_base = nn.Linear(48, 40)
        with torch.no_grad():
            ref_base.weight.copy_(w0)
            ref_base.bias.copy_(base.bias)
        y_ref, gx_ref, gv_ref = _dense_mask_reference(ref_base, layer.indices, layer.values, x, g)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        x.grad = None
        opt.zero_grad()
        y.backward(g)
        torch.testing.assert_close(x.grad, gx_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.values.grad, gv_ref, rtol=1e-5, atol=1e-4)
        assert base.weight.grad is None  # no dense weight gradient
        opt.step()
    restored = layer.unfuse()
    assert restored is base and torch.equal(base.weight, w0)  # bit-exact


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])  # inductor also trusts the fake kernels' strides
def test_shira_layer_compiles_with_explicit_sync(backend):
    torch._dynamo.reset()
    layer = SparseAdapterLinear(nn.Linear(32, 16), nnz=40)
    with torch.no_grad():
        layer.values.normal_()
    layer.sync_()
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    x = torch.randn(5, 32, requires_grad=True)
    y = compiled(x)
    torch.testing.assert_close(y, layer(x), rtol=0, atol=0)
    gv, = torch.autograd.grad(y.sum(), [layer.values])
    torch.testing.assert_close(gv, sddmm(torch.ones(5, 16), x.detach(), layer.rows, layer.cols))


def test_shira_layer_bad_arguments():
    with pytest.raises(TypeError, match="nn.Linear"):
        SparseAdapterLinear(nn.Conv1d(2, 2, 1), density=0.1)
    with pytest.raises(ValueError, match="exactly one"):
        SparseAdapterLinear(nn.Linear(4, 4), density=0.1, nnz=2)
    with pytest.raises(ValueError, match="density"):
        SparseAdapterLinear(nn.Linear(4, 4), density=1.5)
    with pytest.raises(ValueError, match="support must be"):
        SparseAdapterLinear(nn.Linear(4, 4), nnz=2, support="best")
    with pytest.raises(ValueError, match="needs grad"):
        choose_support(torch.randn(4, 4), 2, "gradient")
    with pytest.raises(ValueError, match="out of range"):
        SparseAdapterLinear(nn.Linear(4, 4), support=torch.tensor([0, 16]))


def _model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))


def _adapter(model, names=("0", "2"), density=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in names:
        w = model.get_submodule(name).weight
        nnz = int(density * w.numel())
        out[name] = (torch.randperm(w.numel(), generator=g)[:nnz].sort().values, torch.randn(nnz, generator=g))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_then_remove_restores_bit_exactly(dtype):
    model = _model().to(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a, b = _adapter(model, seed=0), _adapter(model, seed=1)
    h1 = sparse.apply(model, a, alpha=0.5)
    w = model[0].weight.detach().clone()
    want = before["0.weight"].clone()
    sparse_scatter_add_ref(want, [a["0"][0]], [a["0"][1].to(dtype)], [0.5])
    atol, rtol = ACCUMULATE[dtype]
    torch.testing.assert_close(w, want, atol=atol, rtol=rtol)
    h2 = sparse.apply(model, [a, b], alpha=[1.0, -2.0])  # two adapters fused in one call
    sparse.remove(model, h2)
    sparse.remove(model, h1)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_remove_out_of_order_subtracts():
    model = _model()
    before = model[0].weight.detach().clone()
    h1 = sparse.apply(model, _adapter(model, seed=0))
    h2 = sparse.apply(model, _adapter(model, seed=1))
    sparse.remove(model, h1)  # not the last one: subtracted, exact up to rounding
    sparse.remove(model, h2)  # its saved entries still hold h1: subtracted as well
    torch.testing.assert_close(model[0].weight, before, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="already removed"):
        sparse.remove(model, h1)


def test_apply_checks_every_index_first():
    model = _model()
    before = model[0].weight.detach().clone()
    bad = {"0": (torch.tensor([0, 1]), torch.ones(2)), "2": (torch.tensor([5, 10 ** 6]), torch.ones(2))}
    with pytest.raises(RuntimeError, match="out of range"):
        sparse.apply(model, bad)
    assert torch.equal(model[0].weight, before)
    with pytest.raises(TypeError, match="not an nn.Linear"):
        sparse.apply(model, {"1": (torch.tensor([0]), torch.ones(1))})


def test_adapter_save_load_roundtrip_and_from_model(tmp_path):
    model = _model()
    model[0] = SparseAdapterLinear(model[0], density=0.1)
    with torch.no_grad():
        model[0].values.normal_()
    adapter = sparse.from_model(model)
    assert list(adapter) == ["0"]
    path = str(tmp_path / "a.safetensors")
    sparse.save(adapter, path)
    loaded = sparse.load(path)
    assert torch.equal(loaded["0"][0], adapter["0"][0]) and torch.equal(loaded["0"][1], adapter["0"][1])
    # applying the loaded adapter to a fresh copy of the base model gives the trained layer's output
    fresh = _model()
    sparse.apply(fresh, loaded)
    x = torch.randn(3, 64)
    torch.testing.assert_close(fresh(x), model(x), rtol=1e-5, atol=1e-5)


def test_sltrain_layer_matches_dense_and_has_no_dense_weight_grad():
    layer = SLTrainLinear(40, 24, rank=4, density=0.1)
    x = torch.randn(6, 40, requires_grad=True)
    y = layer(x)
    w = layer.to_dense()
    torch.testing.assert_close(y, x @ w.t() + layer.bias, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    dense_grad = g.t() @ x.detach()  # [24, 40]
    torch.testing.assert_close(layer.values.grad, dense_grad.view(-1)[layer.indices], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.grad, dense_grad @ layer.lora_A.detach().t(), rtol=1e-4, atol=1e-5)
    assert layer.sparse_weight.grad is None and not layer.sparse_weight.requires_grad
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    opt.step()  # the next forward picks the new values up
    torch.testing.assert_close(layer(x), x @ layer.to_dense().t() + layer.bias, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rank"):
        SLTrainLinear(8, 8, rank=9, density=0.1)


def test_sddmm_over_many_tokens_matches_the_dense_gradient(device):
    # more tokens than the CUDA kernel's transposed chunk (8192) and the CPU's (256)
    g = torch.randn(8300, 7, device=device)
    x = torch.randn(8300, 5, device=device)
    rows, cols = torch.randint(0, 7, (30,), device=device), torch.randint(0, 5, (30,), device=device)
    want = (g.double().t() @ x.double())[rows, cols]
    torch.testing.assert_close(sddmm(g, x, rows, cols).double(), want, atol=1e-3, rtol=1e-5)


def test_sltrain_bias_gets_its_gradient():
    layer = SLTrainLinear(16, 12, rank=2, density=0.1)
    x = torch.randn(3, 16)
    layer(x).square().sum().backward()
    w = layer.to_dense().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    torch.nn.functional.linear(x, w, b).square().sum().backward()
    torch.testing.assert_close(layer.bias.grad, b.grad)


@pytest.mark.parametrize("kind", ["shira", "sltrain"])
def test_sparse_layers_train_under_autocast(kind):
    # against the same layer as a dense weight under autocast: the values' gradient is that
    # weight's gradient gathered at the support
    torch.manual_seed(0)
    if kind == "shira":
        layer = SparseAdapterLinear(nn.Linear(16, 12), nnz=20)
        with torch.no_grad():
            layer.values.normal_()
    else:
        layer = SLTrainLinear(16, 12, rank=2, density=0.2)
    x = torch.randn(5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    layer(x)  # sync W_eff / S to the values
    dense = (layer.base_layer.weight if kind == "shira" else layer.sparse_weight).detach().clone().requires_grad_()
    bias = layer.base_layer.bias if kind == "shira" else layer.bias
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref = torch.nn.functional.linear(x, dense, bias.detach())
        if kind == "sltrain":
            y_ref = y_ref + torch.nn.functional.linear(torch.nn.functional.linear(x, layer.lora_A.detach()),
                                                       layer.lora_B.detach())
    y_ref.float().square().sum().backward()
    torch.testing.assert_close(y, y_ref)
    want = dense.grad.view(-1)[layer.indices]
    assert layer.values.grad.dtype == layer.values.dtype
    torch.testing.assert_close(layer.values.grad, want, atol=0.05 * float(want.abs().max()), rtol=0.02)


def test_sparse_layers_resync_after_a_copy():
    import copy
    layer = SparseAdapterLinear(nn.Linear(13, 7), nnz=9)
    x = torch.randn(4, 13)
    layer(x)
    with torch.no_grad():
        layer.values.add_(1.0)  # no forward since: W_eff is stale until the next one
    w = layer.base_layer.weight.detach().clone().view(-1)
    w[layer.indices] = layer.base_values + layer.values.detach()
    want = torch.nn.functional.linear(x, w.view(7, 13), layer.base_layer.bias)
    clone = copy.deepcopy(layer)  # its values' version counter restarts at 0
    torch.testing.assert_close(clone(x), want)


@pytest.mark.parametrize("kind", ["shira", "sltrain"])
def test_state_dict_right_after_a_step_holds_the_stepped_values(kind):
    # opt.step(); torch.save(model.state_dict()) with no forward in between: the dense tensor
    # (W_eff / S's buffer) saved must hold the values saved beside it, not the step before's
    torch.manual_seed(0)
    layer = SparseAdapterLinear(nn.Linear(16, 8), nnz=20) if kind == "shira" else SLTrainLinear(16, 8, 2, 0.2)
    opt = torch.optim.AdamW([layer.values], lr=1e-2)
    for _ in range(3):
        layer(torch.randn(5, 16)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    sd = layer.state_dict()
    if kind == "shira":
        got = sd["base_layer.weight"].view(-1)[sd["indices"]]
        want = sd["base_values"] + sd["values"]
    else:
        got, want = sd["sparse_weight"].view(-1)[sd["indices"]], sd["values"]
    assert torch.equal(got, want)
    fresh = SparseAdapterLinear(nn.Linear(16, 8), nnz=20) if kind == "shira" else SLTrainLinear(16, 8, 2, 0.2)
    fresh.load_state_dict(sd)
    x = torch.randn(3, 16)
    torch.testing.assert_close(fresh(x), layer(x))


def test_sltrain_compiled_forward_sees_s_from_the_start():
    torch.manual_seed(0)
    layer = SLTrainLinear(16, 8, rank=2, density=0.25)
    x = torch.randn(3, 16)
    want = torch.nn.functional.linear(x, layer.to_dense(), layer.bias)
    got = torch.compile(layer, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_scatter_raises_when_values_or_indices_overlap_the_weight():
    # read while the weight is written: the result would depend on the write order (torch's
    # index_add_ raises on such overlap too); nothing is written
    w = torch.tensor([10.0, 1.0, 3.0])
    with pytest.raises(RuntimeError, match="single memory location"):
        sparse_scatter_add_(w, torch.tensor([1, 0]), w[0:2], 1.0)
    assert torch.equal(w, torch.tensor([10.0, 1.0, 3.0]))
    w64 = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="single memory location"):
        sparse_scatter_add_(w64, w64.view(torch.int64)[:2], torch.ones(2, dtype=torch.float64), 1.0)


def test_shira_second_derivatives_raise_instead_of_losing_terms():
    torch.manual_seed(0)
    layer = SparseAdapterLinear(nn.Linear(4, 3).double(), nnz=5)
    with torch.no_grad():
        layer.values.normal_()
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    gx, gv = torch.autograd.grad((layer(x) ** 2).sum(), (x, layer.values), create_graph=True)
    for g in (gx, gv):  # gx depends on the values through W_eff, outside the graph; gv comes from sddmm
        with pytest.raises(RuntimeError, match="double backward"):
            (g ** 2).sum().backward()
    # also when asked through autograd.grad for the values alone (gx's path to them is outside the graph)
    gx, gv = torch.autograd.grad((layer(x) ** 2).sum(), (x, layer.values), create_graph=True)
    for g in (gx, gv):
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad((g ** 2).sum(), layer.values)
    # and for x alone (a gradient penalty): gx's path through the incoming gradient meets the node
    # too (it skipped it: SHiRA said x was unused, SLTrain's came back without this layer's term)
    sltrain = SLTrainLinear(4, 3, rank=2, density=0.5, seed=1, dtype=torch.float64)
    for module in (layer, sltrain):
        (gx,) = torch.autograd.grad((module(x) ** 2).sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad((gx ** 2).sum(), x)
    # frozen values: W_eff is a constant and x's gradient can be differentiated again
    layer.values.requires_grad_(False)
    (gx,) = torch.autograd.grad((layer(x) ** 2).sum(), x, create_graph=True)
    w = layer.base_layer.weight.detach()
    torch.testing.assert_close(torch.autograd.grad((gx ** 2).sum(), x)[0], 8 * (x.detach() @ w.t() + layer.base_layer.bias.detach()) @ w @ w.t() @ w)


def test_shira_layer_keeps_fp64_weights_exact():
    torch.manual_seed(0)
    base = nn.Linear(8, 4, dtype=torch.float64)
    w0 = base.weight.detach().clone()
    layer = SparseAdapterLinear(base, nnz=8)  # values start at 0: W_eff = W bit for bit
    x = torch.randn(3, 8, dtype=torch.float64)
    layer(x)
    assert torch.equal(base.weight, w0)
    with torch.no_grad():
        layer.values.normal_()
    mask_w = w0.clone().view(-1)
    mask_w[layer.indices] += layer.values.detach()
    torch.testing.assert_close(layer(x), x @ mask_w.view(4, 8).t() + base.bias, rtol=1e-12, atol=1e-12)


def test_scatter_refuses_what_autograd_cannot_record():
    w = torch.nn.Parameter(torch.zeros(6))
    idx, vals = torch.tensor([1, 4]), torch.tensor([2.0, 3.0])
    with pytest.raises(RuntimeError, match="weight is a leaf tensor that requires grad"):
        sparse_scatter_add_(w, idx, vals, 1.0)
    with pytest.raises(RuntimeError, match="requires grad, but the op has no derivative"):
        sparse_scatter_add_(torch.zeros(6), idx, vals.clone().requires_grad_(), 1.0)
    assert torch.equal(w.detach(), torch.zeros(6))
    with torch.no_grad():
        sparse_scatter_add_(w, idx, vals, 1.0)
    assert torch.equal(w.detach(), torch.tensor([0.0, 2.0, 0.0, 0.0, 3.0, 0.0]))


def test_remove_with_alike_handles_and_tied_weights_restores_exactly():
    # handles holding lists of one length (compared by identity, not field by field)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    w0 = model[0].weight.detach().clone()
    h1 = sparse.apply(model, {"0": (torch.tensor([1, 5, 9]), torch.randn(3))})
    h2 = sparse.apply(model, {"0": (torch.tensor([2, 5, 7]), torch.randn(3))})
    sparse.remove(model, h2)
    sparse.remove(model, h1)
    assert torch.equal(model[0].weight, w0)
    # one weight under two names, adapters overlapping at index 2
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    w0 = model[0].weight.detach().clone()
    h = sparse.apply(model, {"0": (torch.tensor([1, 2]), torch.ones(2)), "1": (torch.tensor([2, 3]), torch.ones(2))})
    assert float(model[0].weight.detach().view(-1)[2] - w0.view(-1)[2]) == pytest.approx(2.0)
    sparse.remove(model, h)
    assert torch.equal(model[0].weight, w0)


@pytest.mark.parametrize("how", ["assign", "data"])
def test_shira_layer_resyncs_when_its_values_tensor_is_replaced(how):
    # a new values tensor may carry the same version number as the one last synced
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    layer = SparseAdapterLinear(nn.Linear(16, 8), density=0.2)
    w = layer.base_layer.weight.detach().clone()
    layer(x)
    new = torch.randn(layer.values.numel())
    if how == "assign":
        sd = layer.state_dict()
        sd["values"] = new
        layer.load_state_dict(sd, assign=True)
    else:
        layer.values.data = new
    want = nn.functional.linear(x, w.view(-1).index_add(0, layer.indices, new).view(8, 16), layer.base_layer.bias)
    torch.testing.assert_close(layer(x), want)


def test_load_with_a_model_checks_the_saved_weight_shapes(tmp_path):
    model = nn.Sequential(nn.Linear(32, 8))
    adapter = {"0": (torch.tensor([3, 100]), torch.ones(2))}
    path = str(tmp_path / "a.safetensors")
    sparse.save(adapter, path, model=model)
    assert torch.equal(sparse.load(path, model=model)["0"][0], adapter["0"][0])
    # the same number of weights in another shape: the flat indices would land elsewhere
    with pytest.raises(ValueError, match=r"saved for a weight of shape \(8,32\)"):
        sparse.load(path, model=nn.Sequential(nn.Linear(16, 16)))
    with pytest.raises(AttributeError):
        sparse.load(path, model=nn.Sequential())  # no layer "0"
    sparse.save(adapter, path)  # without the model: no shapes recorded, nothing to compare
    assert "0" in sparse.load(path, model=nn.Sequential(nn.Linear(16, 16)))


def test_shira_output_of_an_nd_input_can_be_modified_in_place():
    # F.linear of a 3-D x returns a view; made inside the autograd.Function it could not be
    # modified in place (y += r, relu_), where nn.Linear's output can
    torch.manual_seed(0)
    layer = SparseAdapterLinear(nn.Linear(12, 10), nnz=9)
    x = torch.randn(2, 3, 12)
    compiled_add = torch.compile(lambda l, x: l(x).add_(1.0), fullgraph=True, backend="aot_eager")
    for fn, post in ((lambda l, x: l(x).add_(1.0), lambda y: y + 1.0), (lambda l, x: torch.relu_(l(x)), torch.relu),
                     (compiled_add, lambda y: y + 1.0)):
        y = fn(layer, x)
        with torch.no_grad():  # W_eff = W + S is the base layer's weight
            want = post(x @ layer.base_layer.weight.t() + layer.base_layer.bias)
        torch.testing.assert_close(y, want)
        y.sum().backward()
        assert layer.values.grad is not None and layer.values.grad.shape == layer.values.shape
        layer.values.grad = None


def test_shira_refuses_a_trainable_base_weight():
    # its backward never gives W a gradient: an unfrozen W would silently not train
    layer = SparseAdapterLinear(nn.Linear(12, 10), nnz=9)
    layer.base_layer.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="must stay frozen"):
        layer(torch.randn(3, 12))
    with torch.no_grad():
        assert layer(torch.randn(3, 12)).shape == (3, 10)


def test_apply_checks_shapes_and_layout_first_and_writes_nothing():
    # checked only by the scatter before: layer "0" had been written when layer "2" raised
    cases = [({"2": (torch.tensor([0, 1, 2]), torch.ones(2))}, ValueError, "1-D of one length"),
             ({"2": (torch.tensor([[0, 1]]), torch.ones(1, 2))}, ValueError, "1-D of one length"),
             ({"2": (torch.tensor([0.0, 1.0]), torch.ones(2))}, TypeError, "integers")]
    for later, error, match in cases:
        model = _model()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(error, match=match):
            sparse.apply(model, {"0": (torch.tensor([0, 1]), torch.ones(2)), **later})
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model = _model()
    before = model[0].weight.detach().clone()
    model[2].weight = nn.Parameter(model[2].weight.detach().t().contiguous().t())  # a transposed view
    with pytest.raises(RuntimeError, match="not contiguous"):
        sparse.apply(model, {"0": (torch.tensor([0, 1]), torch.ones(2)), "2": (torch.tensor([0]), torch.ones(1))})
    assert torch.equal(model[0].weight, before)


def test_apply_remove_through_a_wrapper_and_the_inner_model():
    # the stack of applied handles was per model object: removing the wrapper's handle "exactly"
    # wiped out the inner model's adapter applied after it
    inner = _model()
    outer = nn.Sequential(inner)
    w0 = inner[0].weight.detach().clone()
    a = {"0.0": (torch.tensor([0, 5]), torch.tensor([10.0, 20.0]))}
    b = {"0": (torch.tensor([0, 5]), torch.tensor([1.0, 2.0]))}
    h1 = sparse.apply(outer, a)
    h2 = sparse.apply(inner, b)
    sparse.remove(outer, h1)  # not the last on that weight: subtracted
    torch.testing.assert_close((inner[0].weight - w0).view(-1)[[0, 5]], torch.tensor([1.0, 2.0]))
    sparse.remove(inner, h2)
    torch.testing.assert_close(inner[0].weight, w0, rtol=0, atol=1e-5)
    h3 = sparse.apply(inner, b)
    with pytest.raises(ValueError, match="not applied to this model"):
        sparse.remove(_model(), h3)
    sparse.remove(inner, h3)
    torch.testing.assert_close(inner[0].weight, w0, rtol=0, atol=1e-5)


def test_save_an_adapter_whose_layers_share_tensors(tmp_path):
    model = _model()
    idx, val = torch.tensor([1, 4, 9]), torch.tensor([0.5, -1.0, 2.0])
    adapter = {"0": (idx, val), "2": (idx, val)}  # one tensor pair for both layers
    sparse.save(adapter, tmp_path / "shared.safetensors")
    loaded = sparse.load(tmp_path / "shared.safetensors")
    for name in ("0", "2"):
        assert torch.equal(loaded[name][0], idx) and torch.equal(loaded[name][1], val)


def test_sltrain_materialised_from_meta_gets_its_support_back():
    # reset_parameters() after to_empty() left the support (and S's buffer) uninitialised
    torch.manual_seed(0)
    want = SLTrainLinear(24, 16, rank=4, density=0.1, seed=5)
    layer = SLTrainLinear(24, 16, rank=4, density=0.1, seed=5, device="meta").to_empty(device="cpu")
    with torch.no_grad():
        layer.bias.fill_(float("nan"))  # what to_empty() may leave
    layer.reset_parameters()
    assert torch.equal(layer.indices, want.indices) and torch.equal(layer.bias, torch.zeros(16))
    dense = torch.zeros(16 * 24)
    dense[layer.indices] = layer.values.detach()
    torch.testing.assert_close(layer.sparse_weight.view(-1), dense, rtol=0, atol=0)
    x = torch.randn(3, 24)
    torch.testing.assert_close(layer(x), x @ layer.to_dense().t() + layer.bias)


def test_shira_support_as_a_bool_mask_or_indices():
    # a dense bool mask (PEFT's SHiRA mask_fn) was read as the flat indices {0, 1}
    base = nn.Linear(12, 10)
    mask = torch.zeros(10, 12, dtype=torch.bool)
    mask[2, 3] = mask[7, 0] = mask[9, 11] = True
    layer = SparseAdapterLinear(base, support=mask)
    assert layer.indices.tolist() == [2 * 12 + 3, 7 * 12 + 0, 9 * 12 + 11]
    same = SparseAdapterLinear(nn.Linear(12, 10), support=torch.tensor([84, 27, 119, 27]))
    assert same.indices.tolist() == layer.indices.tolist()
    with pytest.raises(ValueError, match="weight's shape"):
        SparseAdapterLinear(nn.Linear(12, 10), support=torch.ones(12, 10, dtype=torch.bool))
    with pytest.raises(TypeError, match="integer flat indices or a bool mask"):
        SparseAdapterLinear(nn.Linear(12, 10), support=mask.float())


def _shira_with_values(seed: int = 0) -> SparseAdapterLinear:
    torch.manual_seed(seed)
    layer = SparseAdapterLinear(nn.Linear(16, 12), density=0.2)
    with torch.no_grad():
        layer.values.normal_()
    return layer


def _w_plus_s(weight, layer) -> torch.Tensor:
    """W + S from the indices and values, independent of the layer's own bookkeeping."""
    s = torch.zeros(weight.numel()).index_put((layer.indices,), layer.values.detach().float())
    return weight.detach().float() + s.view_as(weight)


def test_shira_takes_base_weights_loaded_after_wrapping_as_the_new_w():
    # base_layer.load_state_dict(pretrained) after wrapping: the forward used the old W's entries
    # under the support (base_values were kept from construction) and unfuse() wrote them back
    pretrained = nn.Linear(16, 12)
    for forward_first in (False, True):
        layer = _shira_with_values()
        x = torch.randn(3, 16)
        if forward_first:
            layer(x)
        layer.base_layer.load_state_dict(pretrained.state_dict())
        torch.testing.assert_close(layer(x), x @ _w_plus_s(pretrained.weight, layer).T + pretrained.bias)
        assert torch.equal(layer.unfuse().weight, pretrained.weight)


def test_shira_own_state_dict_and_conversions_are_not_taken_as_a_new_base():
    layer = _shira_with_values()
    w0 = layer.base_layer.weight.detach().clone()  # W alone: no forward yet
    x = torch.randn(3, 16)
    y = layer(x)
    fresh = SparseAdapterLinear(nn.Linear(16, 12), density=0.2)
    fresh.load_state_dict(layer.state_dict())
    torch.testing.assert_close(fresh(x), y, rtol=0, atol=0)
    assert torch.equal(fresh.unfuse().weight, w0)
    half = copy.deepcopy(layer).to(torch.bfloat16)
    half(x.bfloat16())
    assert torch.equal(half.unfuse().weight, w0.bfloat16())


def test_shira_stays_unfused_through_state_dict_until_sync():
    # state_dict() after unfuse() re-applied the adapter into the base layer it had handed back
    layer = _shira_with_values()
    x = torch.randn(3, 16)
    y = layer(x)
    base = layer.unfuse()
    w0 = base.weight.detach().clone()
    sd = layer.state_dict()
    assert torch.equal(base.weight, w0) and torch.equal(sd["base_layer.weight"], w0)
    with pytest.raises(RuntimeError, match="unfused"):
        layer(x)
    layer.sync_()
    torch.testing.assert_close(layer(x), y, rtol=0, atol=0)


def test_apply_onto_a_shira_layer_adds_to_its_weight_also_on_its_support():
    # an adapter applied onto a SHiRA layer's own support was taken as a new base W: the layer
    # then computed W + 2S + D, and unfuse() returned a damaged W
    layer = _shira_with_values()
    w0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(3, 16)
    s = _w_plus_s(w0, layer) - w0
    model = nn.Sequential(layer)
    idx, val = layer.indices[:4].clone(), torch.randn(4)
    handle = sparse.apply(model, {"0": (idx, val)})
    d = torch.zeros(w0.numel()).index_put((idx,), val).view_as(w0)
    torch.testing.assert_close(model(x), x @ (w0 + s + d).T + layer.base_layer.bias)
    sparse.remove(model, handle)
    torch.testing.assert_close(model(x), x @ (w0 + s).T + layer.base_layer.bias)
    assert torch.equal(layer.unfuse().weight, w0)


def test_remove_keeps_writes_made_to_the_weight_after_apply():
    # the exact path wrote the pre-apply entries back over an update made since (an optimizer
    # step on the fused model), where the out-of-order path kept it
    idx, val = torch.arange(0, 256, 13), torch.randn(20)
    model = nn.Sequential(nn.Linear(16, 16))
    w0 = model[0].weight.detach().clone()
    handle = sparse.apply(model, {"0": (idx, val)})
    with torch.no_grad():
        model[0].weight.add_(0.5)
    sparse.remove(model, handle)
    torch.testing.assert_close(model[0].weight, w0 + 0.5, rtol=0, atol=1e-6)


@pytest.mark.parametrize("alpha", [torch.tensor(0.5), torch.tensor(0.5, dtype=torch.float64), 0.5])
def test_apply_takes_scalar_alphas_of_any_kind(alpha):
    import numpy as np
    for a in (alpha, np.float32(0.5)):
        model = nn.Sequential(nn.Linear(4, 4))
        w0 = model[0].weight.detach().clone()
        sparse.apply(model, {"0": (torch.tensor([0, 5]), torch.tensor([2.0, 4.0]))}, alpha=a)
        want = w0.clone().view(-1)
        want[0] += 1.0
        want[5] += 2.0
        torch.testing.assert_close(model[0].weight.view(-1), want)
        w = torch.zeros(6)
        sparse_scatter_add_(w, [torch.tensor([1])], [torch.tensor([2.0])], a)
        assert w[1] == 1.0


def test_remove_after_the_shira_values_stepped_keeps_w_plus_values():
    # remove() synced the layer first (dropping the applied adapter where the supports meet),
    # then found those entries changed and subtracted the adapter there too: W_eff - D
    layer = _shira_with_values()
    w0 = layer.base_layer.weight.detach().clone()
    model = nn.Sequential(layer)
    x = torch.randn(3, 16)
    layer(x)
    idx = layer.indices[:4].clone()
    handle = sparse.apply(model, {"0": (idx, torch.ones(4))})
    with torch.no_grad():
        layer.values.add_(0.5)  # an optimizer step on the SHiRA values
    sparse.remove(model, handle)
    torch.testing.assert_close(layer(x), x @ _w_plus_s(w0, layer).T + layer.base_layer.bias)


def test_unfuse_hands_back_a_plain_linear():
    # the load hook stayed on the returned base layer, bound to (and keeping alive) the SHiRA layer
    layer = _shira_with_values()
    base = layer.unfuse()
    assert not base._load_state_dict_post_hooks
    layer.sync_()
    assert len(base._load_state_dict_post_hooks) == 1


def _shira_trained(base, seed):
    layer = SparseAdapterLinear(copy.deepcopy(base), density=0.1, seed=seed)
    with torch.no_grad():
        layer.values.normal_()
    return layer


def _dense_with(w, layer):
    s = torch.zeros(w.numel(), dtype=w.dtype)
    s[layer.indices] = layer.values.detach()
    return w + s.view_as(w)


@pytest.mark.parametrize("keys", ["adapter_only", "indices_and_values"])
def test_shira_loading_another_adapter_replaces_the_one_applied(keys):
    # evaluating several adapter checkpoints on one wrapped model: each load must drop the
    # adapter applied before (its entries stayed in W_eff, and unfuse() could not remove them)
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    w, bias = base.weight.detach().clone(), base.bias.detach().clone()
    layer, other = _shira_trained(base, 1), _shira_trained(base, 2)
    x = torch.randn(5, 16)
    layer(x)  # layer's own adapter folded into W_eff
    if keys == "adapter_only":
        sd = {k: v for k, v in other.state_dict().items() if not k.startswith("base_layer.")}
    else:
        sd = {"indices": other.indices, "values": other.values.detach()}
    layer.load_state_dict(sd, strict=False)
    torch.testing.assert_close(layer(x), x @ _dense_with(w, other).t() + bias)
    assert torch.equal(layer.unfuse().weight, w)


def test_sltrain_loading_a_support_without_the_dense_buffer_clears_the_old_one():
    torch.manual_seed(0)
    layer, other = SLTrainLinear(16, 12, 4, 0.1, seed=7), SLTrainLinear(16, 12, 4, 0.1, seed=3)
    x = torch.randn(5, 16)
    layer(x)
    layer.load_state_dict({k: v for k, v in other.state_dict().items() if k != "sparse_weight"}, strict=False)
    torch.testing.assert_close(layer(x), x @ other.to_dense().t() + other.bias.detach())
    torch.testing.assert_close(layer.state_dict()["sparse_weight"], other.sparse_weight)


def test_shira_support_tensors_must_be_flat_indices_or_a_bool_mask():
    mask = torch.zeros(6, 10, dtype=torch.bool)
    mask[1, 2] = mask[3, 4] = True
    with pytest.raises(ValueError, match="1-D flat indices"):
        SparseAdapterLinear(nn.Linear(10, 6), support=mask.nonzero())  # (row, col) pairs
    with pytest.raises(ValueError, match="1-D flat indices"):
        SparseAdapterLinear(nn.Linear(10, 6), support=mask.to(torch.uint8))  # a 0/1 mask, not bool
    with pytest.raises(ValueError, match="not both"):
        SparseAdapterLinear(nn.Linear(10, 6), density=0.5, support=mask)
    with pytest.raises(TypeError, match="nnz must be an int"):
        SparseAdapterLinear(nn.Linear(10, 6), nnz=5.0)
    assert SparseAdapterLinear(nn.Linear(10, 6), support=mask).indices.tolist() == [12, 34]


@pytest.mark.parametrize("make", [lambda: SparseAdapterLinear(nn.Linear(6, 4), nnz=3, seed=0),
                                  lambda: SLTrainLinear(6, 4, 2, 0.2, seed=0)], ids=["shira", "sltrain"])
def test_loaded_supports_are_checked(make):
    layer = make()
    n = layer.indices.numel()
    for bad in (torch.tensor([-1] + list(range(1, n))), torch.tensor([24] + list(range(1, n))),
                torch.zeros(n, dtype=torch.int64), torch.arange(n).float()):
        sd = layer.state_dict()
        sd["indices"] = bad
        with pytest.raises(ValueError, match="loaded indices"):
            make().load_state_dict(sd)


def test_random_supports_differ_between_layers_unless_seeded():
    # per-layer random masks (SLTrain, SHiRA), reproducible through torch.manual_seed
    torch.manual_seed(0)
    a, b = SLTrainLinear(32, 32, 4, 0.05), SLTrainLinear(32, 32, 4, 0.05)
    s1, s2 = SparseAdapterLinear(nn.Linear(32, 32), nnz=50), SparseAdapterLinear(nn.Linear(32, 32), nnz=50)
    assert not torch.equal(a.indices, b.indices) and not torch.equal(s1.indices, s2.indices)
    torch.manual_seed(0)
    assert torch.equal(SLTrainLinear(32, 32, 4, 0.05).indices, a.indices)
    assert torch.equal(SLTrainLinear(32, 32, 4, 0.05, seed=5).indices, SLTrainLinear(32, 32, 4, 0.05, seed=5).indices)


def test_shira_adapter_only_load_with_assign_leaves_the_source_alone():
    # assign=True makes the loaded tensors the layer's buffers: the load must not write into them
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    w, bias = base.weight.detach().clone(), base.bias.detach().clone()
    layer, other = _shira_trained(base, 1), _shira_trained(base, 2)
    x = torch.randn(5, 16)
    layer(x)
    other(x)
    other_applied = other.applied.clone()
    sd = {k: v for k, v in other.state_dict().items() if not k.startswith("base_layer.")}
    layer.load_state_dict(sd, strict=False, assign=True)
    assert torch.equal(other.applied, other_applied)
    torch.testing.assert_close(other(x), x @ _dense_with(w, other).t() + bias)
    torch.testing.assert_close(layer(x), x @ _dense_with(w, other).t() + bias)
    assert torch.equal(other.unfuse().weight, w) and torch.equal(layer.unfuse().weight, w)


def test_sltrain_copies_after_a_support_only_load_are_right():
    torch.manual_seed(0)
    layer, other = SLTrainLinear(16, 12, 4, 0.1, seed=7), SLTrainLinear(16, 12, 4, 0.1, seed=3)
    layer.load_state_dict({k: v for k, v in other.state_dict().items() if k != "sparse_weight"}, strict=False)
    x = torch.randn(5, 16)
    want = x @ other.to_dense().t() + other.bias.detach()
    for copied in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        torch.testing.assert_close(copied(x), want)


def test_meta_layers_load_meta_state_dicts():
    with torch.device("meta"):
        shira = SparseAdapterLinear(nn.Linear(8, 6), nnz=4, seed=0)
        sl = SLTrainLinear(8, 6, 2, 0.2, seed=0)
    for layer in (shira, sl):
        layer.load_state_dict(layer.state_dict(), assign=True)


def test_shira_own_state_load_into_an_unfused_layer_leaves_later_base_loads_working():
    # the flag "this load brings W_eff" stayed set (no base hook on an unfused layer to take it
    # back), so a pretrained load after sync_() was ignored
    torch.manual_seed(0)
    layer = _shira_trained(nn.Linear(16, 12), 1)
    sd = layer.state_dict()
    layer.unfuse()
    layer.load_state_dict(sd)
    layer.sync_()
    pretrained = nn.Linear(16, 12)
    layer.base_layer.load_state_dict(pretrained.state_dict())
    x = torch.randn(5, 16)
    torch.testing.assert_close(layer(x), x @ _dense_with(pretrained.weight.detach(), layer).t() + pretrained.bias)
    assert torch.equal(layer.unfuse().weight, pretrained.weight)


def test_shira_layer_is_freed_at_del_and_copies_keep_their_own_hook():
    # the base layer's load hook holds the layer weakly (a bound method made a cycle)
    import gc
    import weakref
    torch.manual_seed(0)
    layer = _shira_trained(nn.Linear(16, 12), 1)
    copied = copy.deepcopy(layer)
    pretrained = nn.Linear(16, 12)
    copied.base_layer.load_state_dict(pretrained.state_dict())  # the copy takes it as its W ...
    x = torch.randn(4, 16)
    torch.testing.assert_close(copied(x), x @ _dense_with(pretrained.weight.detach(), copied).t() + pretrained.bias)
    assert not torch.equal(layer.base_values, copied.base_values)  # ... the original does not
    weight = weakref.ref(layer.base_layer.weight)
    gc.disable()
    try:
        del layer
        assert weight() is None
    finally:
        gc.enable()


def test_shira_resyncs_values_replaced_at_a_reused_address():
    # .data = new leaves the version at 0, and a new storage could land at the freed address of
    # the synced one: the stamp matched and the forward used stale W_eff. The stamp now keeps the
    # synced storage alive, so no new storage can share its address. (Whether an address repeats
    # depends on the allocator; with glibc this sequence of sizes hits one.)
    torch.manual_seed(0)
    for n in (200, 5000, 100000):
        layer = SparseAdapterLinear(nn.Linear(512, 512), nnz=n, seed=0)
        w = layer.base_layer.weight.detach().clone()
        x = torch.randn(2, 512)
        layer(x)
        synced_at = layer.values.data_ptr()
        for k in range(1, 50):  # swaps of values, as from other adapters, until an address repeats
            layer.values.data = torch.full((n,), float(k))
            if layer.values.data_ptr() == synced_at:
                break
        torch.testing.assert_close(layer(x), x @ _dense_with(w, layer).t() + layer.base_layer.bias)


@pytest.mark.parametrize("norm", ["parametrizations", "hooks"])
def test_sparse_adapters_refuse_a_computed_base_weight(norm):
    # weight_norm / spectral_norm recompute the weight on each access: an adapter written into
    # it was silently lost (the layer ran the base alone)
    from lowrank_ext import sparse as sparse_mod

    def normed():
        lin = nn.Linear(8, 6)
        if norm == "parametrizations":
            return torch.nn.utils.parametrizations.weight_norm(lin)
        return torch.nn.utils.weight_norm(lin)
    with pytest.raises(ValueError, match="computed on each access"):
        SparseAdapterLinear(normed(), nnz=4, seed=0)
    model = nn.Sequential(normed())
    with pytest.raises(ValueError, match="computed on each access"):
        sparse_mod.apply(model, {"0": (torch.tensor([1, 2]), torch.ones(2))})


def test_sparse_save_reads_a_weight_normed_model_and_moves_free_the_stamp(tmp_path):
    # save / load only read the weights' shapes: a weight-normed model is fine there
    from lowrank_ext import sparse as sparse_mod
    model = nn.Sequential(torch.nn.utils.weight_norm(nn.Linear(8, 6)))
    adapter = {"0": (torch.tensor([1, 2]), torch.ones(2))}
    sparse_mod.save(adapter, str(tmp_path / "a.safetensors"), model=model)
    loaded = sparse_mod.load(str(tmp_path / "a.safetensors"), model=model)
    assert torch.equal(loaded["0"][0], adapter["0"][0])
    # .to() / .half() make new values: the sync stamp must not pin the old storage
    layer = _shira_trained(nn.Linear(16, 12), 1)
    layer(torch.randn(2, 16))
    assert layer._synced is not None
    layer.half()
    assert layer._synced is None


def test_shira_failed_load_of_another_nnz_leaves_a_consistent_layer():
    # the load reset W and zeroed `applied`, then the buffers failed their size check while the
    # base weight (the other layer's W_eff) loaded: W_eff no longer matched the kept entries
    torch.manual_seed(0)
    layer = _shira_trained(nn.Linear(16, 12), 1)
    other = SparseAdapterLinear(nn.Linear(16, 12), nnz=7, seed=3)
    layer(torch.randn(2, 16))
    with pytest.raises(RuntimeError, match="size mismatch"):
        layer.load_state_dict(other.state_dict())
    flat = layer.base_layer.weight.detach().view(-1)
    assert torch.equal(flat[layer.indices], layer._w_eff_entries(layer.applied))


def test_apply_rolls_back_a_write_interrupted_after_it_landed(monkeypatch):
    # an interrupt (KeyboardInterrupt) right after a scatter returned left that weight written
    from lowrank_ext import sparse as sparse_mod
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    before = [m.weight.detach().clone() for m in model]
    real, calls = sparse_mod.sparse_scatter_add_, []

    def interrupted(*args, **kwargs):
        real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(sparse_mod, "sparse_scatter_add_", interrupted)
    adapter = {"0": (torch.tensor([1, 7]), torch.ones(2)), "1": (torch.tensor([0, 3]), torch.ones(2))}
    with pytest.raises(KeyboardInterrupt):
        sparse_mod.apply(model, adapter)
    assert all(torch.equal(m.weight.detach(), b) for m, b in zip(model, before))
