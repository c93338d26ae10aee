"""The lora family: fused forward/backward/merge against the fp64 references, the dropout
mask (Philox, regenerated in backward), gradcheck, bad inputs, LoRALinear against PEFT's
LoRA layer, inject_lora, PEFT acceleration, torch.compile and autocast."""
from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from torch import nn

from lowrank_ext.nn import LoRALinear, inject_lora
from lowrank_ext.ops.lora import lora_backward, lora_forward, lora_linear, lora_merge_
from lowrank_ext.reference.lora import (lora_backward_ref, lora_dropout_mask_ref, lora_forward_ref,
                                        lora_merge_ref)
from tolerances import ACCUMULATE

peft = pytest.importorskip("peft")  # a test dependency (requirements-dev.txt)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 13, 7, 1), (37, 24, 11, 3), (70, 9, 16, 8), (33, 64, 40, 16)]  # (N, d_in, d_out, r)
VARIANTS = ["plain", "core", "rank_scale", "both"]


def _tensors(n, d_in, d_out, r, dtype, variant, device="cpu"):
    def t(*shape, std=1.0):
        return (torch.randn(*shape) * std).to(dtype).to(device)
    core = t(r, r, std=r ** -0.5) if variant in ("core", "both") else None
    rank_scale = t(r) if variant in ("rank_scale", "both") else None
    return t(n, d_in), t(d_out, d_in, std=d_in ** -0.5), t(d_out), t(r, d_in, std=d_in ** -0.5), t(d_out, r), \
        core, rank_scale


def _assert_close(got, want, dtype, what):
    atol, rtol = ACCUMULATE[dtype]
    got, want = got.detach(), want.detach()
    scale = max(float(want.double().abs().max()), 1.0)
    err = float((got.double() - want.double()).abs().max())
    assert err <= atol * scale + rtol * scale, f"{what}: max error {err:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_forward_backward_match_reference(device, dtype, shape, variant, p):
    x, w, b, a, bb, core, rs = _tensors(*shape, dtype, variant, device)
    y, xa = lora_forward(x, w, b, a, bb, core, rs, scale=0.8, dropout_p=p, seed=99)
    y_ref, xa_ref = lora_forward_ref(x.cpu(), w.cpu(), b.cpu(), a.cpu(), bb.cpu(), *(
        t.cpu() if t is not None else None for t in (core, rs)), 0.8, p, 99)
    _assert_close(y.cpu(), y_ref, dtype, "y")
    _assert_close(xa.cpu(), xa_ref, dtype, "xa")
    g = torch.randn(y.shape).to(dtype).to(device)
    got = lora_backward(g, x, w, a, bb, core, rs, xa, scale=0.8, dropout_p=p, seed=99)
    want = lora_backward_ref(g.cpu(), x.cpu(), w.cpu(), a.cpu(), bb.cpu(), *(
        t.cpu() if t is not None else None for t in (core, rs)), xa.cpu(), 0.8, p, 99)
    for name, gt, wt in zip(["x", "lora_a", "lora_b", "core", "rank_scale"], got, want):
        assert gt.shape == wt.shape, f"grad {name}: shape {tuple(gt.shape)} vs {tuple(wt.shape)}"
        if wt.numel():
            _assert_close(gt.cpu(), wt, dtype, f"grad {name}")


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("mask", [(False, True, False, True, False), (True, False, True, False, True)])
def test_output_mask_skips_gradients(p, mask):
    """Each gradient asked for alone is the full backward's (with dropout, grad_x and grad_a
    share one pass over the mask when both are asked for)."""
    x, w, _, a, bb, core, rs = _tensors(70, 12, 5, 2, torch.float32, "both")
    _, xa = lora_forward(x, w, None, a, bb, core, rs, scale=1.0, dropout_p=p, seed=3)
    g = torch.randn(70, 5)
    got = lora_backward(g, x, w, a, bb, core, rs, xa, scale=1.0, dropout_p=p, seed=3, output_mask=mask)
    assert [t.numel() == 0 for t in got] == [not m for m in mask]
    full = lora_backward(g, x, w, a, bb, core, rs, xa, scale=1.0, dropout_p=p, seed=3)
    for m, t, f in zip(mask, got, full):
        if m:
            assert torch.equal(t, f)


def _identity_branch(n, d, p, seed):
    """W = 0, A = B = I, scale 1: y = drop(x) exactly, xa = drop(x)."""
    x = torch.randn(n, d)
    zero, eye = torch.zeros(d, d), torch.eye(d)
    y, xa = lora_forward(x, zero, None, eye, eye, scale=1.0, dropout_p=p, seed=seed)
    return x, y, xa


def test_dropout_is_the_reference_philox_mask():
    x, y, xa = _identity_branch(50, 24, 0.3, seed=7)
    mask = lora_dropout_mask_ref(7, 50, 24, 0.3).float()
    assert torch.equal(xa, x * mask), "xa = drop(x) with the reference's mask, bit for bit"
    assert torch.equal(y, x * mask)


def test_dropout_rate_and_scale():
    p, n, d = 0.25, 400, 100
    _, _, xa = _identity_branch(n, d, p, seed=3)
    x = torch.ones(n, d)
    _, xa = lora_forward(x, torch.zeros(d, d), None, torch.eye(d), torch.eye(d), scale=1.0, dropout_p=p, seed=3)
    kept = (xa != 0).double().mean().item()
    sigma = math.sqrt(p * (1 - p) / (n * d))
    assert abs((1 - kept) - p) < 5 * sigma, f"dropped fraction {1 - kept:.4f}, p = {p}"
    threshold = round(p * 65536)
    assert torch.all((xa == 0) | (xa == torch.tensor(65536 / (65536 - threshold), dtype=torch.float32)))
    assert abs(xa.double().mean().item() - 1.0) < 5 * sigma / (1 - p), "unbiased: E[drop(x)] = x"


def test_dropout_seed_decides_the_mask():
    _, _, a = _identity_branch(20, 16, 0.5, seed=1)
    torch.manual_seed(0)
    _, _, b = _identity_branch(20, 16, 0.5, seed=1)
    torch.manual_seed(0)
    _, _, c = _identity_branch(20, 16, 0.5, seed=2)
    assert torch.equal(a != 0, b != 0) and not torch.equal(b != 0, c != 0)


def test_backward_regenerates_the_forward_mask():
    # W = 0, A = B = I, scale 1: dx = g * mask and dA = g^T (x * mask): the forward's mask
    n, d, p, seed = 30, 16, 0.4, 21
    x, g = torch.randn(n, d), torch.randn(n, d)
    eye = torch.eye(d)
    _, xa = lora_forward(x, torch.zeros(d, d), None, eye, eye, scale=1.0, dropout_p=p, seed=seed)
    mask = (xa / x).nan_to_num()  # the factor each element got
    dx, da, _, _, _ = lora_backward(g, x, torch.zeros(d, d), eye, eye, None, None, xa, scale=1.0, dropout_p=p,
                                    seed=seed)
    torch.testing.assert_close(dx, g * mask, rtol=0, atol=1e-6)
    torch.testing.assert_close(da, g.t() @ (x * mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_float64(variant, p):
    x, w, b, a, bb, core, rs = _tensors(6, 5, 4, 3, torch.float64, variant)
    leaves = [t.requires_grad_() for t in (x, a, bb, core, rs) if t is not None]
    x, a, bb = leaves[:3]
    rest = leaves[3:]
    core = rest.pop(0) if core is not None else None
    rs = rest.pop(0) if rs is not None else None

    def f(*ts):
        it = iter(ts)
        xx, aa, bbb = next(it), next(it), next(it)
        cc = next(it) if core is not None else None
        rr = next(it) if rs is not None else None
        return lora_linear(xx, w, b, aa, bbb, cc, rr, scale=0.7, dropout_p=p, seed=5)
    assert torch.autograd.gradcheck(f, tuple(leaves))


def test_gradients_reach_a_trainable_base():
    x, w, b, a, bb, _, _ = _tensors(8, 6, 5, 2, torch.float64, "plain")
    w.requires_grad_()
    b.requires_grad_()
    assert torch.autograd.gradcheck(lambda ww, bb_: lora_linear(x, ww, bb_, a, bb, scale=0.5), (w, b))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_merge_matches_reference_and_unmerge_restores(device, dtype, variant):
    _, w, _, a, bb, core, rs = _tensors(1, 40, 24, 4, dtype, variant, device)
    original = w.clone()
    lora_merge_(w, a, bb, core, rs, scale=0.5)
    want = lora_merge_ref(original.cpu(), a.cpu(), bb.cpu(), *(t.cpu() if t is not None else None
                                                                for t in (core, rs)), 0.5)
    # fp32 accumulation vs the reference's fp64, each rounded once into dtype: one ulp apart at most
    torch.testing.assert_close(w.cpu(), want, rtol=0, atol=float(want.double().abs().max()) * torch.finfo(dtype).eps)
    lora_merge_(w, a, bb, core, rs, scale=-0.5)
    eps = torch.finfo(dtype).eps
    bound = 4 * eps * float(want.double().abs().max()) + (1e-6 if dtype == torch.float32 else 0)
    assert float((w.double() - original.double()).abs().max()) <= bound, "unmerge restores the weight"


@pytest.mark.parametrize("variant", VARIANTS)
def test_merged_weight_computes_the_forward(variant):
    # independent of the merge reference: the merged base alone must give the LoRA forward
    x, w, b, a, bb, core, rs = _tensors(9, 20, 12, 4, torch.float64, variant)
    y, _ = lora_forward(x, w, b, a, bb, core, rs, scale=0.6)
    merged = w.clone()
    lora_merge_(merged, a, bb, core, rs, scale=0.6)
    torch.testing.assert_close(x @ merged.t() + b, y, rtol=1e-12, atol=1e-12)


def test_merge_fp32_adapters_into_bf16_weight():
    w = torch.randn(8, 5).bfloat16()
    a, b = torch.randn(2, 5), torch.randn(8, 2)
    want = (w.double() + 0.3 * (b.double() @ a.double())).bfloat16()
    lora_merge_(w, a, b, scale=0.3)
    assert torch.equal(w, want)


BAD = [
    (dict(a=torch.randn(3, 11)), "lora_a must have shape"),
    (dict(bb=torch.randn(7, 2)), "lora_b must have shape"),
    (dict(w=torch.randn(7, 9)), "lora_a must have shape|weight"),
    (dict(a=torch.randn(0, 12)), "r >= 1"),
    (dict(a=torch.randn(3, 12, dtype=torch.float64)), "lora_a is Double but x is Float"),
    (dict(p=1.0), "dropout_p must be in"),
    (dict(p=-0.1), "dropout_p must be in"),
    (dict(b=torch.randn(6)), "bias must have shape"),
    (dict(core=torch.randn(2, 2)), "core must have shape"),
    (dict(rs=torch.randn(4)), "rank_scale must have shape"),
    (dict(x=torch.randn(5, 12).long()), "x must be float32"),
    (dict(scale=float("nan")), "scale must be finite"),
]


@pytest.mark.parametrize("over,match", BAD, ids=[m for _, m in BAD])
def test_bad_inputs(over, match):
    args = dict(x=torch.randn(5, 12), w=torch.randn(7, 12), b=torch.randn(7), a=torch.randn(3, 12),
                bb=torch.randn(7, 3), core=None, rs=None, p=0.0, scale=1.0)
    args.update(over)
    with pytest.raises((RuntimeError, TypeError, ValueError), match=match):
        lora_forward(args["x"], args["w"], args["b"], args["a"], args["bb"], args["core"], args["rs"],
                     scale=args["scale"], dropout_p=args["p"], seed=0)


def test_bad_merge_inputs():
    w = torch.randn(7, 12)
    before = w.clone()
    with pytest.raises(RuntimeError, match="lora_b must have shape"):
        lora_merge_(w, torch.randn(3, 12), torch.randn(6, 3), scale=1.0)
    with pytest.raises(RuntimeError, match="lora_a must have shape"):
        lora_merge_(w, torch.randn(3, 11), torch.randn(7, 3), scale=1.0)
    assert torch.equal(w, before), "a refused merge writes nothing"


def test_x_must_be_2d_for_the_raw_op_but_not_for_lora_linear():
    x, w, b, a, bb, _, _ = _tensors(6, 10, 4, 2, torch.float32, "plain")
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        lora_forward(x.view(2, 3, 10), w, b, a, bb, scale=1.0)
    y = lora_linear(x.view(2, 3, 10), w, b, a, bb, scale=1.0)
    assert y.shape == (2, 3, 4)
    torch.testing.assert_close(y.view(6, 4), lora_forward(x, w, b, a, bb, scale=1.0)[0])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_and_cuda_draw_the_same_mask(dtype):
    n, d = 300, 40  # W = 0, A = B = I: xa = drop(x); the kept positions must coincide
    x = torch.randn(n, d).to(dtype)
    eye, zero = torch.eye(d).to(dtype), torch.zeros(d, d).to(dtype)
    _, xa_cpu = lora_forward(x, zero, None, eye, eye, scale=1.0, dropout_p=0.3, seed=4242)
    _, xa_cuda = lora_forward(x.cuda(), zero.cuda(), None, eye.cuda(), eye.cuda(), scale=1.0, dropout_p=0.3,
                              seed=torch.tensor(4242))
    assert torch.equal(xa_cpu != 0, xa_cuda.cpu() != 0)
    _assert_close(xa_cuda.cpu(), xa_cpu, dtype, "xa")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_dropout_passes_over_several_chunks(dtype):
    # x larger than the 64 MiB chunk of kept rows of the CUDA dropout passes (csrc/lora/cuda.cu):
    # each chunk's mask offset, its GEMMs, and grad A summed over the chunks (in fp32 for bf16).
    # Against the CPU kernel (the same Philox mask; checked against the reference by the tests
    # above): the fp64 reference's mask takes ~10 s to draw at this size
    n, d_in, d_out, r = (9000 if dtype == torch.float32 else 17000), 2048, 16, 8
    assert n * d_in * torch.finfo(dtype).bits // 8 > 64 * 2 ** 20
    x, w, b, a, bb, _, _ = _tensors(n, d_in, d_out, r, dtype, "plain")
    g = torch.randn(n, d_out).to(dtype)
    outs = {}
    for dev in ("cpu", "cuda"):
        x_, w_, b_, a_, bb_, g_ = (t.to(dev) for t in (x, w, b, a, bb, g))
        y, xa = lora_forward(x_, w_, b_, a_, bb_, scale=0.5, dropout_p=0.2, seed=77)
        grads = lora_backward(g_, x_, w_, a_, bb_, None, None, xa, scale=0.5, dropout_p=0.2, seed=77)
        outs[dev] = [t.cpu() for t in (y, xa, *grads[:3])]
    for name, got, want in zip(["y", "xa", "grad x", "grad lora_a", "grad lora_b"], outs["cuda"], outs["cpu"]):
        _assert_close(got, want, dtype, name)


# ----------------------------------------------------------------------------- layers

def _peft_layer(base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, **kw):
    model = peft.get_peft_model(nn.Sequential(base), peft.LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["0"], **kw))
    return model, model.base_model.model[0]


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_linear_matches_peft(use_rslora):
    base = nn.Linear(20, 12)
    _, ref = _peft_layer(nn.Linear(20, 12), r=4, alpha=8, use_rslora=use_rslora)
    ref.base_layer.load_state_dict(base.state_dict())
    nn.init.normal_(ref.lora_B["default"].weight)
    ours = LoRALinear(base, r=4, alpha=8, use_rslora=use_rslora)
    assert set(ours.state_dict()) == set(ref.state_dict()), "PEFT's state_dict keys"
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5, 20)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), ref(x2)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    for name in ("lora_A", "lora_B"):
        torch.testing.assert_close(getattr(ours, name)["default"].weight.grad, getattr(ref, name)["default"].weight.grad,
                                   rtol=1e-5, atol=1e-5)
    assert ours.base_layer.weight.grad is None, "the base layer is frozen"


def test_lora_linear_starts_as_base_and_merges():
    base = nn.Linear(16, 8)
    layer = LoRALinear(base, r=4, alpha=4, dropout=0.2)
    x = torch.randn(6, 16)
    layer.eval()
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)  # B = 0: the base exactly
    nn.init.normal_(layer.lora_B["default"].weight)
    w0 = base.weight.detach().clone()
    y = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(base.weight, w0, rtol=0, atol=1e-6)  # up to fp32 rounding of merge + unmerge
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)


def test_lora_linear_dropout_trains_and_eval_is_deterministic():
    layer = LoRALinear(nn.Linear(32, 32), r=4, dropout=0.5)
    nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(8, 32)
    layer.train()
    assert not torch.equal(layer(x), layer(x)), "a fresh mask each training forward"
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_lora_xs_and_adalora_variants_train_their_parameters():
    xs = LoRALinear(nn.Linear(12, 10), r=3, core=True)
    ada = LoRALinear(nn.Linear(12, 10), r=3, rank_scale=True)
    x = torch.randn(5, 12)
    xs(x).sum().backward()
    ada(x).sum().backward()
    trainable_xs = {n for n, p in xs.named_parameters() if p.requires_grad}
    assert trainable_xs == {"lora_core.default"}
    assert xs.lora_core["default"].grad is not None and xs.lora_core["default"].grad.abs().sum() > 0
    assert ada.lora_rank_scale["default"].grad.abs().sum() > 0
    assert ada.lora_A["default"].weight.grad is not None


def test_core_and_rank_scale_together_train():
    layer = LoRALinear(nn.Linear(12, 10), r=3, core=True, rank_scale=True)
    layer(torch.randn(5, 12)).sum().backward()
    assert layer.lora_core["default"].grad.abs().sum() > 0, "not stuck at the zero fixed point"


def test_inject_lora():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2)))
    inject_lora(model, ["2.1"], r=2)
    assert isinstance(model[2][1], LoRALinear)
    assert type(model[0]) is nn.Linear and type(model[2][0]) is nn.Linear
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0.weight", "0.bias", "2.0.weight", "2.0.bias", "2.1.lora_A.default.weight",
                         "2.1.lora_B.default.weight"}
    assert model(torch.randn(3, 8)).shape == (3, 2)
    # PEFT's matching: a name matches a target equal to it or ending in "." + target
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2)))
    inject_lora(model, ["0"], r=2)
    assert isinstance(model[0], LoRALinear) and isinstance(model[2][0], LoRALinear)
    assert type(model[2][1]) is nn.Linear
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    inject_lora(model, r"1", r=2)  # one regex over full names
    assert type(model[0]) is nn.Linear and isinstance(model[1], LoRALinear)
    with pytest.raises(ValueError, match="no nn.Linear"):
        inject_lora(nn.Sequential(nn.Linear(2, 2)), ["q_proj"], r=1)
    # a module registered under two names (tied) gets one LoRALinear, reached by both names
    shared = nn.Linear(8, 8)
    model = nn.Module()
    model.a, model.b = shared, shared
    inject_lora(model, ["a", "b"], r=2)
    assert isinstance(model.a, LoRALinear) and model.b is model.a and model.a.base_layer is shared


def test_seed_tensor_is_the_int_seed():
    x, w, b, a, bb, _, _ = _tensors(20, 16, 8, 4, torch.float32, "plain")
    y1, xa1 = lora_forward(x, w, b, a, bb, scale=1.0, dropout_p=0.5, seed=77)
    y2, xa2 = lora_forward(x, w, b, a, bb, scale=1.0, dropout_p=0.5, seed=torch.tensor(77))
    assert torch.equal(y1, y2) and torch.equal(xa1, xa2)
    with pytest.raises(RuntimeError, match="seed_tensor must be a CPU int64"):
        lora_forward(x, w, b, a, bb, scale=1.0, dropout_p=0.5, seed=torch.tensor(77.0))


def test_torch_compile_fullgraph_with_dropout():
    layer = LoRALinear(nn.Linear(16, 8), r=4, dropout=0.25).train()
    nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(2, 3, 16, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.manual_seed(5)
    y = compiled(x)
    (gx,) = torch.autograd.grad(y, [x], torch.ones_like(y))
    torch.manual_seed(5)
    y_eager = layer(x)
    (gx_eager,) = torch.autograd.grad(y_eager, [x], torch.ones_like(y))
    torch.testing.assert_close(y, y_eager, rtol=0, atol=0)  # the same seed draw, so the same mask
    torch.testing.assert_close(gx, gx_eager, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])  # inductor also trusts the fake kernels' strides
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    layer = LoRALinear(nn.Linear(16, 8), r=4)
    nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(2, 3, 16, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    y = compiled(x)
    torch.testing.assert_close(y, layer(x), rtol=0, atol=0)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, [x], g)
    (gx_eager,) = torch.autograd.grad(layer(x), [x], g)
    torch.testing.assert_close(gx, gx_eager, rtol=0, atol=0)


def _layers_that_check_autocast():
    from lowrank_ext.nn import MonarchLinear, MultiLoRALinear, SparseAdapterLinear
    lora = LoRALinear(nn.Linear(16, 8), r=4)
    shira = SparseAdapterLinear(nn.Linear(16, 8), nnz=20)
    shira.sync_()
    multi = MultiLoRALinear(nn.Linear(16, 8), max_adapters=2, max_rank=4)
    ids = torch.tensor([0, 1, 1, 0, 1, 0])
    return [(lora, ()), (MonarchLinear(16, 16, nblocks=4), ()), (shira, ()), (multi, (ids,))]


def test_compiled_layers_do_not_trace_is_autocast_available(monkeypatch):
    # torch 2.11's Dynamo cannot trace torch.amp.is_autocast_available: every fullgraph compile of
    # a layer failed there (H100 gpu-check, 2026-11-25). The layers ask it outside the graph.
    real = torch.amp.is_autocast_available

    def untraceable(device_type):
        if torch.compiler.is_compiling():
            raise RuntimeError("torch.amp.is_autocast_available called in a compiled region")
        return real(device_type)

    monkeypatch.setattr(torch.amp, "is_autocast_available", untraceable)
    for layer, extra in _layers_that_check_autocast():
        torch._dynamo.reset()
        x = torch.randn(6, 16)
        y = torch.compile(layer, fullgraph=True, backend="aot_eager")(x, *extra)
        torch.testing.assert_close(y, layer(x, *extra), rtol=0, atol=0)


def test_autocast_casts_like_nn_linear():
    base = nn.Linear(16, 8)
    layer = LoRALinear(base, r=4)
    nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        assert y.dtype == base(x).dtype == torch.bfloat16
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    want, _ = lora_forward_ref(*(t.bfloat16() for t in (x, base.weight, base.bias, a, b)), scale=layer.scaling)
    _assert_close(y.float(), want.float(), torch.bfloat16, "autocast y")


# ----------------------------------------------------------------------------- PEFT

def _peft_model(dropout=0.0):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.v_proj, self.out = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)

        def forward(self, x):
            return self.out(torch.relu(self.q_proj(x)) * self.v_proj(x))
    model = peft.get_peft_model(Block(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                          target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p)
    return model


def _graph_has_lowrank_op(t: torch.Tensor) -> bool:
    todo, seen = [t.grad_fn], set()
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        if "lowrank" in type(f).__name__:
            return True
        todo += [g for g, _ in f.next_functions]
    return False


def test_peft_accelerate_same_outputs_grads_and_state_dict():
    from lowrank_ext.integrations.peft import accelerate, restore
    model = _peft_model()
    x = torch.randn(4, 7, 16)
    y0 = model(x)
    y0.sum().backward()
    grads0 = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    state0 = {k: v.clone() for k, v in model.state_dict().items()}
    model.zero_grad()
    assert accelerate(model) == 2
    assert accelerate(model) == 0, "idempotent"
    y1 = model(x)
    assert _graph_has_lowrank_op(y1), "the patched layers run lowrank::lora_forward"
    assert not _graph_has_lowrank_op(y0)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    y1.sum().backward()
    for n, g in grads0.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, rtol=1e-5, atol=1e-5)
    assert model.state_dict().keys() == state0.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state0.items())
    assert restore(model) == 2
    layer = model.base_model.model.q_proj
    assert "forward" not in layer.__dict__, "PEFT's own forward again"
    torch.testing.assert_close(model(x), y0, rtol=0, atol=0)


def test_peft_lora_bias_is_not_fused():
    from lowrank_ext.integrations.peft import accelerate, is_fused_call
    model = peft.get_peft_model(nn.Sequential(nn.Linear(8, 8)), peft.LoraConfig(
        r=2, target_modules=["0"], lora_bias=True))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p)
    x = torch.randn(3, 8)
    y0 = model(x)
    accelerate(model)
    assert not is_fused_call(model.base_model.model[0], x, {})
    torch.testing.assert_close(model(x), y0, rtol=0, atol=0)


def test_peft_accelerate_with_dropout_and_fallbacks():
    from lowrank_ext.integrations.peft import accelerate, is_fused_call
    model = _peft_model(dropout=0.1)
    accelerate(model)
    x = torch.randn(3, 16)
    model.train()
    y = model(x)
    assert torch.isfinite(y).all()
    layer = model.base_model.model.q_proj
    assert is_fused_call(layer, x, {})
    with model.disable_adapter():
        assert not is_fused_call(layer, x, {})
    model.eval()
    y_eval = model(x)
    from lowrank_ext.integrations.peft import restore
    restore(model)
    torch.testing.assert_close(model(x), y_eval, rtol=1e-5, atol=1e-5)


def test_peft_accelerated_model_pickles():
    import io
    from lowrank_ext.integrations.peft import accelerate, restore
    model = peft.get_peft_model(nn.Sequential(nn.Linear(8, 8)), peft.LoraConfig(r=2, lora_alpha=4,
                                                                                target_modules=["0"]))
    accelerate(model)
    x = torch.randn(3, 8)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    torch.testing.assert_close(loaded(x), model(x))
    assert restore(loaded) == 1
    torch.testing.assert_close(loaded(x), model(x))


def test_lora_linear_with_no_input_features_is_the_bias():
    # nn.Linear(0, d_out) gives the bias for every row; x of shape [..., 0] holds no elements
    x, w, b = torch.randn(4, 3, 0, requires_grad=True), torch.randn(5, 0), torch.randn(5, requires_grad=True)
    a, bb = torch.randn(2, 0, requires_grad=True), torch.randn(5, 2, requires_grad=True)
    y = lora_linear(x, w, b, a, bb, scale=2.0)
    assert torch.equal(y, b.detach().expand(4, 3, 5))
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(b.grad, torch.full((5,), 12.0))
    assert torch.equal(bb.grad, torch.zeros(5, 2))


def test_double_backward_raises_instead_of_returning_zeros():
    x, w, b, a, bb, _, _ = _tensors(6, 10, 4, 2, torch.float64, "plain")
    for t in (x, a, bb):
        t.requires_grad_()
    y = lora_linear(x, w, b, a, bb, scale=1.0)
    (ga,) = torch.autograd.grad((y ** 2).sum(), a, create_graph=True)
    a2 = a.detach().requires_grad_()
    y_dense = x.detach() @ w.t() + b + (x.detach() @ a2.t()) @ bb.detach().t()
    torch.testing.assert_close(ga, torch.autograd.grad((y_dense ** 2).sum(), a2)[0])  # first order still right
    with pytest.raises(RuntimeError, match="lora_forward: double backward"):
        ga.sum().backward()
    # through autograd.grad to another input too (the node has edges to the formula's inputs):
    # before, d/dx of dA came back without the op's term, silently
    (ga,) = torch.autograd.grad((lora_linear(x, w, b, a, bb, scale=1.0) ** 2).sum() + (x ** 3).sum(), a,
                                create_graph=True)
    with pytest.raises(RuntimeError, match="lora_forward: double backward"):
        torch.autograd.grad(ga.sum(), x)


def test_torch_func_grad_and_jacrev_run_through_the_op():
    # torch.func's transforms need the autograd.Function form with a setup_context staticmethod
    # (the ops' own kernels use it while a transform is active): gradients as autograd of the math
    x, w, b, a, bb, _, _ = _tensors(5, 12, 7, 3, torch.float64, "plain")

    def plain(x, a, bb):
        return x @ w.t() + b + 0.5 * (x @ a.t()) @ bb.t()
    got = torch.func.grad(lambda *t: lora_linear(t[0], w, b, t[1], t[2], scale=0.5).square().sum(),
                          argnums=(0, 1, 2))(x, a, bb)
    leaves = [t.clone().requires_grad_() for t in (x, a, bb)]
    want = torch.autograd.grad(plain(*leaves).square().sum(), leaves)
    for g, ref in zip(got, want):
        torch.testing.assert_close(g, ref)
    with warnings.catch_warnings():  # vmap runs lora_backward per sample (no batching rule), and says so
        warnings.simplefilter("ignore", UserWarning)
        jac = torch.func.jacrev(lambda x: lora_linear(x, w, b, a, bb, scale=0.5))(x)
    torch.testing.assert_close(jac, torch.autograd.functional.jacobian(lambda x: plain(x, a, bb), x))


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # vmap's per-sample fallback
def test_torch_func_keeps_the_gradients_of_captured_tensors():
    # adapters captured from outside a transform are tracked by plain autograd around it: an
    # output of vjp still depends on them, and a gradient of the transform's gradient (a second
    # derivative through the op) raises as autograd.grad(create_graph=True) does, never zeros
    x, w, b, a, bb, _, _ = _tensors(4, 8, 6, 3, torch.float64, "plain")
    a.requires_grad_()
    bb.requires_grad_()
    y, _ = torch.func.vjp(lambda x: lora_linear(x, w, b, a, bb, scale=0.5), x)
    a2, b2 = a.detach().requires_grad_(), bb.detach().requires_grad_()
    want = torch.autograd.grad((x @ w.t() + b + 0.5 * (x @ a2.t()) @ b2.t()).square().sum(), (a2, b2))
    for g, ref in zip(torch.autograd.grad(y.square().sum(), (a, bb)), want):
        torch.testing.assert_close(g, ref)
    gx = torch.func.grad(lambda x: lora_linear(x, w, b, a, bb, scale=0.5).square().sum())(x)
    assert gx.requires_grad
    with pytest.raises(RuntimeError, match="lora_forward: double backward"):
        torch.autograd.grad(gx.square().sum(), a)
    with pytest.raises(RuntimeError, match="lora_forward: double backward"):
        torch.func.grad(lambda a_: torch.func.grad(
            lambda x: lora_linear(x, w, b, a_, bb.detach(), scale=0.5).square().sum())(x).square().sum())(a.detach())
    # nested transforms and a jacobian of captured adapters: raise too, never zeros (a tensor that an
    # outer level tracks reads requires_grad=False inside the transform)
    with pytest.raises(RuntimeError, match="lora_forward: double backward"):
        torch.func.grad(lambda a_: torch.func.grad(
            lambda x: lora_linear(x, w, b, a_, bb.detach(), scale=0.5).sum())(x).square().sum())(a.detach())
    jac = torch.func.jacrev(lambda x: lora_linear(x, w, b, a, bb, scale=0.5))(x)
    assert jac.requires_grad
    with pytest.raises(RuntimeError, match="lora_forward: double backward"):
        jac.square().sum().backward()


def test_compiling_a_torch_func_transform_raises_instead_of_dropping_gradients():
    # the compiled graph calls the op itself, whose kernel cannot reach outer transform levels
    x, w, b, a, bb, _, _ = _tensors(4, 8, 6, 3, torch.float32, "plain")
    with pytest.raises(Exception, match="needs a gradient under a torch.func transform"):
        torch.compile(torch.func.grad(lambda a: lora_linear(x, w, b, a, bb, scale=0.5).square().sum()),
                      fullgraph=True)(a)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch's forward-AD module scripts a helper
def test_forward_mode_ad_raises_instead_of_dropping_the_tangent():
    # the ops have no forward-mode formula: a dual input used to come back with no tangent
    import torch.autograd.forward_ad as fwAD
    x, w, b, a, bb, _, _ = _tensors(4, 8, 6, 3, torch.float32, "plain")
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones_like(x))
        for call in (lambda: lora_linear(dual, w, b, a, bb, scale=0.5),
                     lambda: torch.ops.lowrank.lora_forward(dual, w, b, a, bb, None, None, 0.5)):
            with pytest.raises(NotImplementedError, match="jvp"):
                call()
            with torch.no_grad(), pytest.raises(NotImplementedError, match="jvp"):
                call()
    with pytest.raises(NotImplementedError, match="jvp"):
        torch.func.jvp(lambda x: lora_linear(x, w, b, a, bb, scale=0.5), (x,), (torch.ones_like(x),))


def test_jit_trace_records_the_op():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 6), r=3)
    x = torch.randn(4, 8)
    with warnings.catch_warnings():  # torch 2.14 deprecates torch.jit, still used to ship models
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(layer, x)  # checks that two traces agree
        assert "lowrank::lora_forward" in str(traced.graph)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
    loaded(x).square().sum().backward()
    layer(x).square().sum().backward()
    grads = {n: p.grad for n, p in loaded.named_parameters() if p.grad is not None}
    assert set(grads) == {"lora_A.default.weight", "lora_B.default.weight"}
    for name, g in grads.items():
        torch.testing.assert_close(g, layer.get_parameter(name).grad)


def test_ops_called_directly_differentiate_with_defaults_left_out():
    # the dispatcher hands the autograd kernel no trailing arguments equal to their defaults
    x, w, b, a, bb, _, _ = _tensors(4, 6, 5, 2, torch.float64, "plain")
    a.requires_grad_()
    y, _ = torch.ops.lowrank.lora_forward(x, w, b, a, bb, None, None, 1.0)
    (ga,) = torch.autograd.grad(y.sum(), a)
    a2 = a.detach().requires_grad_()
    (want,) = torch.autograd.grad((x @ w.t() + b + (x @ a2.t()) @ bb.t()).sum(), a2)
    torch.testing.assert_close(ga, want)
    assert type(y.grad_fn).__name__ == "lowrank_lora_forwardBackward"


@pytest.mark.parametrize("strict", [True, False])
def test_torch_export_records_the_fused_op(strict):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 12), r=4, dropout=0.1).eval()
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(3, 5, 16)
    ep = torch.export.export(layer, (x,), strict=strict)
    assert any(n.target is torch.ops.lowrank.lora_forward.default for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(x), layer.base_layer(x) + layer.scaling * layer.lora_B["default"](
        layer.lora_A["default"](x)))


def test_merge_refuses_what_autograd_cannot_record():
    # like torch's in-place ops: a leaf weight that requires grad is written only under no_grad,
    # and adapters that require grad are not read outside it (their gradient would be lost)
    w = torch.nn.Parameter(torch.randn(4, 6))
    a, b = torch.randn(2, 6), torch.randn(4, 2)
    w0 = w.detach().clone()
    with pytest.raises(RuntimeError, match="weight is a leaf tensor that requires grad"):
        lora_merge_(w, a, b, scale=1.0)
    frozen = w.detach().clone()
    with pytest.raises(RuntimeError, match="lora_a requires grad"):
        lora_merge_(frozen, a.requires_grad_(), b, scale=1.0)
    assert torch.equal(w.detach(), w0) and torch.equal(frozen, w0)
    with torch.no_grad():
        lora_merge_(w, a, b, scale=1.0)
    torch.testing.assert_close(w.detach(), w0 + b @ a.detach())


def test_hooks_on_the_base_layer_run_and_the_output_follows_them():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 6), r=2)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(3, 8)
    plain = layer(x)
    handle = layer.base_layer.register_forward_hook(lambda m, i, o: 2 * o)
    branch = plain - layer.base_layer.weight.detach().matmul(x.t()).t() - layer.base_layer.bias.detach()
    torch.testing.assert_close(layer(x), 2 * (plain - branch) + branch)  # the hook doubled the base output
    handle.remove()
    torch.testing.assert_close(layer(x), plain)


def test_merge_refuses_a_parametrized_base_weight():
    from torch.nn.utils.parametrizations import weight_norm
    layer = LoRALinear(weight_norm(nn.Linear(8, 8)), r=2)
    with pytest.raises(ValueError, match="parametrized"):
        layer.merge()
    assert not layer.merged


def test_layers_run_on_the_meta_device():
    from lowrank_ext.nn import MonarchLinear, MultiLoRALinear
    x = torch.empty(3, 16, device="meta")
    assert LoRALinear(nn.Linear(16, 6), r=2).to("meta")(x).shape == (3, 6)
    assert MonarchLinear(16, 16, nblocks=4).to("meta")(x).shape == (3, 16)
    multi = MultiLoRALinear(nn.Linear(16, 6), 2, 4).to("meta")
    assert multi(x, torch.zeros(3, dtype=torch.long, device="meta")).shape == (3, 6)


def test_peft_accelerate_defers_to_peft_when_the_base_layer_has_hooks():
    from lowrank_ext.integrations.peft import accelerate
    torch.manual_seed(0)
    model = peft.get_peft_model(nn.Sequential(nn.Linear(8, 8)), peft.LoraConfig(r=2, target_modules=["0"]))
    lora_layer = model.base_model.model[0]
    with torch.no_grad():
        lora_layer.lora_B["default"].weight.normal_()
    x = torch.randn(3, 8)
    lora_layer.base_layer.register_forward_hook(lambda m, i, o: 2 * o)
    want = model(x)
    accelerate(model)
    torch.testing.assert_close(model(x), want)


class _HalvedLinear(nn.Linear):
    """A Linear subclass with a forward of its own (as fake-quantized or custom Linears have)."""

    def forward(self, x):
        return 0.5 * super().forward(x)


def _peft_model_with_b(base_linear, seed=0, **config):
    torch.manual_seed(seed)
    model = peft.get_peft_model(nn.Sequential(base_linear), peft.LoraConfig(r=2, target_modules=["0"], **config))
    with torch.no_grad():
        model.base_model.model[0].lora_B["default"].weight.normal_()
    return model


def _halve_output_hook():
    from accelerate.hooks import ModelHook

    class Halve(ModelHook):
        def post_forward(self, module, output):
            return 0.5 * output
    return Halve()


def test_base_layer_with_a_forward_of_its_own_is_called():
    import copy
    from lowrank_ext.integrations.peft import accelerate
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    layer = LoRALinear(_HalvedLinear(8, 6), r=2)
    torch.testing.assert_close(layer(x), layer.base_layer(x))  # B = 0: the base alone, halved
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    torch.testing.assert_close(layer(x), layer.base_layer(x) + layer.scaling * x @ a.t() @ b.t())
    model = _peft_model_with_b(_HalvedLinear(8, 6))
    plain = copy.deepcopy(model)
    accelerate(model)
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)


def test_peft_accelerate_keeps_accelerate_hooks_on_every_module():
    import copy
    from accelerate.hooks import add_hook_to_module
    from lowrank_ext.integrations.peft import accelerate, restore
    x = torch.randn(3, 8)
    # a hook (accelerate's: forward replaced on the instance) on the base layer, on the dropout,
    # on the PEFT layer before accelerate(), and on the PEFT layer after it
    for where in ("base", "dropout", "layer_before", "layer_after"):
        plain = _peft_model_with_b(nn.Linear(8, 6), lora_dropout=0.5 if where == "dropout" else 0.0)
        plain.eval()
        model = copy.deepcopy(plain)
        for m in (plain, model):
            layer = m.base_model.model[0]
            target = {"base": layer.base_layer, "dropout": layer.lora_dropout["default"]}.get(where, layer)
            if where != "layer_after":
                add_hook_to_module(target, _halve_output_hook())
        patched = accelerate(model)
        assert patched == (0 if where == "layer_before" else 1), where
        if where == "layer_after":
            for m in (plain, model):
                add_hook_to_module(m.base_model.model[0], _halve_output_hook())
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0, msg=where)
        restore(model)  # a hook installed after accelerate() stays
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0, msg=where)


def test_peft_accelerate_falls_back_for_dropout_one_and_fp64_under_autocast():
    import copy
    from lowrank_ext.integrations.peft import accelerate
    x = torch.randn(3, 8)
    plain = _peft_model_with_b(nn.Linear(8, 6), lora_dropout=1.0)  # PEFT accepts p = 1: the branch is 0
    model = copy.deepcopy(plain)
    accelerate(model)
    torch.testing.assert_close(model.train()(x), plain.base_model.model[0].base_layer(x))
    plain = _peft_model_with_b(nn.Linear(8, 6))
    plain.base_model.model[0].lora_A.double()  # autocast leaves fp64 alone: PEFT casts x to it
    plain.base_model.model[0].lora_B.double()
    model = copy.deepcopy(plain)
    accelerate(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = plain(x), model(x)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_inject_lora_skips_its_own_linears_and_refuses_the_root():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    inject_lora(model, r".*", r=2)
    names = sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))
    assert names == ["0", "1"]
    with pytest.raises(ValueError, match="outside its LoRALinear layers"):
        inject_lora(model, r".*", r=2)  # again: the LoRALinears' own base, A and B are not targets
    assert sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear)) == names
    assert type(model[0].base_layer) is nn.Linear and type(model[0].lora_A["default"]) is nn.Linear
    with pytest.raises(ValueError, match="model itself is an nn.Linear"):
        inject_lora(nn.Linear(4, 4), r".*", r=2)


def _lora_with_adapter(seed: int = 0) -> LoRALinear:
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(16, 12), r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    return layer


def _plain_lora(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """x W^T + b + s x A^T B^T from the unmerged tensors (independent of the layer's forward)."""
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return x @ layer.base_layer.weight.T + layer.base_layer.bias + layer.scaling * (x @ a.T) @ b.T


def test_state_dict_carries_merged_and_loads_take_the_saved_form():
    # merged was a plain attribute: a merged checkpoint loaded into a fresh layer added the
    # adapter twice, an unmerged one loaded into a merged layer dropped it
    x = torch.randn(5, 16)
    src = _lora_with_adapter()
    want = _plain_lora(src, x).detach()
    src.merge()
    merged_sd = src.state_dict()
    assert bool(merged_sd["lora_merged"])
    dst = _lora_with_adapter(seed=1)
    dst.load_state_dict(merged_sd)
    assert dst.merged
    torch.testing.assert_close(dst(x), want, rtol=1e-5, atol=1e-5)
    dst.unmerge()
    torch.testing.assert_close(dst(x), want, rtol=1e-5, atol=1e-5)

    src = _lora_with_adapter(seed=2)
    want = _plain_lora(src, x).detach()
    unmerged_sd = src.state_dict()
    assert "lora_merged" not in unmerged_sd  # PEFT's keys alone
    dst = _lora_with_adapter(seed=3)
    dst.merge()
    dst.load_state_dict(unmerged_sd)
    assert not dst.merged
    torch.testing.assert_close(dst(x), want, rtol=1e-5, atol=1e-5)


def test_merged_layer_refuses_a_partial_load():
    layer = _lora_with_adapter()
    layer.merge()
    w = layer.base_layer.weight.detach().clone()
    adapter_only = {k: v for k, v in _lora_with_adapter(seed=1).state_dict().items() if k.startswith("lora_")}
    with pytest.raises(RuntimeError, match="merged"):
        layer.load_state_dict(adapter_only, strict=False)
    assert torch.equal(layer.base_layer.weight, w) and layer.merged


def _materialise(module: nn.Module) -> nn.Module:
    """torch's recipe for a model built on the meta device: to_empty(), then reset_parameters()
    on every module that has one (FSDP's default)."""
    module = module.to_empty(device="cpu")
    for m in module.modules():
        if callable(getattr(m, "reset_parameters", None)):
            m.reset_parameters()
    return module


@pytest.mark.parametrize("variant", [{}, {"core": True}, {"rank_scale": True}, {"core": True, "rank_scale": True}])
def test_layer_built_on_meta_starts_as_its_base_after_materialising(variant):
    # B got nn.Linear's random init, the core and rank scale stayed uninitialised memory
    with torch.device("meta"):
        layer = LoRALinear(nn.Linear(16, 12), r=4, **variant)
    layer = _materialise(layer)
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)
    if "core" in variant:
        assert torch.equal(layer.lora_core["default"], torch.zeros(4, 4))
    if "rank_scale" in variant:
        want = torch.ones(4) if "core" in variant else torch.zeros(4)
        assert torch.equal(layer.lora_rank_scale["default"], want)


def test_fp16_backward_stays_finite_where_g_b_passes_fp16_range():
    # g B was formed in fp16 and scaled after: with scale < 1 it overflowed (inf in grad A and x)
    # where scale g B, and PEFT's (scale g) B, fit in fp16
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 1024), r=4, alpha=1.0).half()  # scale 0.25
    with torch.no_grad():
        layer.lora_A["default"].weight.uniform_(0.0, 0.1)
        layer.lora_B["default"].weight.uniform_(0.5, 1.0)
    x = (torch.rand(2, 16) * 0.01).half().requires_grad_()
    g = torch.full((2, 1024), 100.0, dtype=torch.float16)  # a loss-scaled gradient
    assert float((g.double() @ layer.lora_B["default"].weight.detach().double()).abs().max()) > 65504
    layer(x).backward(g)
    x64 = x.detach().double().requires_grad_()
    a64, b64 = (t.detach().double().requires_grad_() for t in (layer.lora_A["default"].weight,
                                                             layer.lora_B["default"].weight))
    w64, bias64 = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    (x64 @ w64.T + bias64 + 0.25 * (x64 @ a64.T) @ b64.T).backward(g.double())
    for got, want in ((x.grad, x64.grad), (layer.lora_A["default"].weight.grad, a64.grad),
                      (layer.lora_B["default"].weight.grad, b64.grad)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=2e-3 * float(want.abs().max()))


def test_backward_hooks_on_the_inner_modules_run():
    # only forward hooks sent a call down the module path: backward hooks on base_layer / A / B
    # (and global ones) never fired on the fused path
    layer = _lora_with_adapter()
    fired = []
    layer.base_layer.register_full_backward_hook(lambda *_: fired.append("base"))
    layer.lora_B["default"].register_full_backward_pre_hook(lambda *_: fired.append("B"))
    x = torch.randn(3, 16, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, _plain_lora(layer, x))
    y.sum().backward()
    assert sorted(fired) == ["B", "base"]
    from torch.nn.modules.module import register_module_full_backward_hook
    plain = _lora_with_adapter(seed=1)
    fired.clear()
    handle = register_module_full_backward_hook(lambda m, *_: fired.append(m))
    try:
        plain(x).sum().backward()
    finally:
        handle.remove()
    assert sum(isinstance(m, nn.Linear) for m in fired) == 3  # base, A and B were called


def test_inject_lora_refuses_multihead_attention_out_proj():
    # MultiheadAttention reads out_proj.weight itself: the wrapped layer broke its forward
    enc = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32)
    with pytest.raises(ValueError, match="MultiheadAttention"):
        inject_lora(enc, r".*(linear1|out_proj)", r=2)
    assert isinstance(enc.linear1, nn.Linear) and not isinstance(enc.linear1, LoRALinear)  # nothing replaced
    inject_lora(enc, ["linear1", "linear2"], r=2)
    assert enc(torch.randn(3, 2, 16)).shape == (3, 2, 16)


def test_seed_of_torch_range_and_0d_input():
    x, w = torch.randn(6, 8), torch.randn(5, 8)
    a, b = torch.randn(2, 8), torch.randn(5, 2)
    y_big = lora_linear(x, w, None, a, b, scale=1.0, dropout_p=0.5, seed=2 ** 64 - 1)  # raised before
    torch.testing.assert_close(y_big, lora_linear(x, w, None, a, b, scale=1.0, dropout_p=0.5, seed=-1), rtol=0, atol=0)
    with pytest.raises(ValueError, match="0-d"):
        lora_linear(torch.tensor(1.0), w, None, a, b, scale=1.0)


def test_fp16_backward_keeps_small_b_accurate():
    # folding scale < 1 into an fp16 B pushed small entries (B starts at 0) into fp16's
    # subnormals: grad A's error rose ~10x
    torch.manual_seed(0)
    n, d, r, scale = 64, 256, 16, 1 / 16
    x, w, a = torch.randn(n, d).half(), (torch.randn(d, d) * 0.05).half(), (torch.randn(r, d) * 0.05).half()
    b, g = (torch.randn(d, r) * 1e-4).half(), torch.randn(n, d).half()
    a16 = a.clone().requires_grad_()
    lora_linear(x, w, None, a16, b, scale=scale).backward(g)
    a64 = a.double().requires_grad_()
    (x.double() @ w.double().T + scale * (x.double() @ a64.T) @ b.double().T).backward(g.double())
    assert float((a16.grad.double() - a64.grad).norm() / a64.grad.norm()) < 1e-3


def test_adapter_only_state_dict_of_a_merged_layer_loads_into_an_unmerged_one():
    # PEFT's usual "lora_" filter also picks up lora_merged: such an adapter-only dict was refused
    src = _lora_with_adapter()
    src.merge()
    adapter = {k: v for k, v in src.state_dict().items() if "lora_" in k}
    assert "lora_merged" in adapter
    dst = _lora_with_adapter(seed=1)
    dst.load_state_dict(adapter, strict=False)
    assert not dst.merged and torch.equal(dst.lora_B["default"].weight, src.lora_B["default"].weight)
    base_only = {k: v for k, v in src.state_dict().items() if not k.startswith("lora_") or k == "lora_merged"}
    with pytest.raises(RuntimeError, match="does not include"):
        _lora_with_adapter(seed=2).load_state_dict(base_only, strict=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_a_zero_scale_still_carries_the_adapters_nan(dtype):
    # s (h B^T) with s = 0 and a NaN in B is NaN, as in torch; BLAS with alpha = 0 skipped it in
    # some dtypes (y, the merged weight and dB came back finite)
    torch.manual_seed(0)
    x, w = torch.randn(6, 8).to(dtype), torch.randn(5, 8).to(dtype)
    a, b = torch.randn(2, 8).to(dtype), torch.randn(5, 2).to(dtype)
    b[1, 0] = float("nan")
    y, xa = lora_forward(x, w, None, a, b, scale=0.0)
    assert y[:, 1].isnan().all() and y[:, [0, 2, 3, 4]].isfinite().all()
    a_nan = a.clone()
    a_nan[0, 3] = float("nan")
    _, xa_nan = lora_forward(x, w, None, a_nan, b.nan_to_num(), scale=0.0)
    grads = lora_backward(torch.ones(6, 5, dtype=dtype), x, w, a_nan, b.nan_to_num(), None, None, xa_nan, scale=0.0, dropout_p=0.0, seed=0,
                          output_mask=[False, False, True, False, False])
    # dB = 0 * g^T h: h's first column is NaN in every token (A's NaN), the other one finite
    assert grads[2][:, 0].isnan().all() and (grads[2][:, 1] == 0).all()
    merged = w.clone()
    lora_merge_(merged, a, b, scale=0.0)
    assert merged[1].isnan().all() and torch.equal(merged[[0, 2, 3, 4]], w[[0, 2, 3, 4]])


def test_peft_accelerated_model_is_freed_at_del():
    # the patched forward holds its layer weakly: a strong reference was a cycle that kept the
    # weights alive until the cycle collector ran (a reloaded model's memory)
    import gc
    import weakref

    from lowrank_ext.integrations.peft import accelerate
    model = peft.get_peft_model(nn.Sequential(nn.Linear(8, 8)), peft.LoraConfig(r=2, lora_alpha=4,
                                                                                target_modules=["0"]))
    assert accelerate(model) == 1
    weight = weakref.ref(model.base_model.model[0].base_layer.weight)
    gc.disable()
    try:
        del model
        assert weight() is None
    finally:
        gc.enable()


def test_merge_and_pissa_refuse_a_hook_computed_weight():
    # the older torch.nn.utils.weight_norm / spectral_norm move `weight` out of _parameters and
    # recompute it in a pre-hook: a merge (or PiSSA's residual) written into it was lost
    from lowrank_ext.init import pissa_init
    for norm in (torch.nn.utils.weight_norm, torch.nn.utils.spectral_norm):
        layer = LoRALinear(norm(nn.Linear(8, 6)), r=2)
        with pytest.raises(ValueError, match="computed on each access"):
            layer.merge()
        with pytest.raises(ValueError, match="computed on each access"):
            pissa_init(layer, r=2)


def test_computed_weight_check_passes_stored_weights():
    # a frozen weight kept as a buffer is stored (only weight_norm-style recomputation is refused)
    class BufferLinear(nn.Linear):
        def __init__(self):
            super().__init__(8, 6)
            w = self.weight.detach().clone()
            del self.weight
            self.register_buffer("weight", w)
    layer = LoRALinear(BufferLinear(), r=2)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(3, 8)
    before = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)


def test_a_merged_layer_refuses_a_state_dict_of_other_shapes_before_writing():
    # the children loaded what fit: the merged weight and its adapter came from two places
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(5, 4), r=2)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    layer.merge()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    other = LoRALinear(nn.Linear(5, 7), r=2).state_dict()  # d_out 7: base and B mismatch
    with pytest.raises(RuntimeError, match="nothing was loaded into it"):
        layer.load_state_dict(other)
    assert layer.merged and all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())
