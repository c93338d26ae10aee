"""The galore ops: galore_project and galore_apply_ against their fp64 references on every
sample, against independent compositions (a dequantized P and plain matmuls; Fira's limiter
step by step), and their argument checks. GaLoreAdamW's own tests (test_galore.py) run the
ops inside the optimizer against the published algorithm."""
from __future__ import annotations

import pytest
import torch

from lowrank_ext import quant
from lowrank_ext.ops.galore import galore_apply_, galore_project
from lowrank_ext.reference import REFERENCES
from lowrank_ext.reference.quant import dequantize_blockwise_ref, quantize_blockwise_ref
from samples import SAMPLES
from tolerances import tol


def _clone(args):
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def test_project_samples_match_reference(device):
    for s in SAMPLES["lowrank::galore_project"](device):
        got = torch.ops.lowrank.galore_project(*s.args)
        want = REFERENCES["lowrank::galore_project"](*s.args)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-4 * float(want.abs().max()), rtol=1e-4, msg=s.name)


def test_apply_samples_match_reference(device):
    for s in SAMPLES["lowrank::galore_apply_"](device):
        args, ref_args = _clone(s.args), _clone(s.args)
        torch.ops.lowrank.galore_apply_(*args)
        REFERENCES["lowrank::galore_apply_"](*ref_args)
        param, want = args[0], ref_args[0]
        assert not torch.equal(param, s.args[0]), s.name  # something was applied
        torch.testing.assert_close(param, want, **tol(param.dtype), msg=s.name)
        if len(args) > 14:  # Fira: the limiter's state
            torch.testing.assert_close(args[14], ref_args[14], rtol=1e-5, atol=0, msg=s.name)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("right", [False, True])
def test_quantized_projection_is_dequantized_inside(device, bits, right):
    m, n, r = 96, 160, 12
    p = torch.linalg.qr(torch.randn(n if right else m, r)).Q
    p = (p.t() if right else p).contiguous()
    code = quant.linear_code(bits, signed=True)
    q, absmax = quantize_blockwise_ref(p, code, 128, bits)
    dense = dequantize_blockwise_ref(q, absmax, code, 128, bits, list(p.shape))
    g = torch.randn(m, n)
    want = g @ dense.t() if right else dense.t() @ g
    got = galore_project(g.to(device), q.to(device), absmax.to(device), code.to(device), rank=r, blocksize=128,
                         right=right)
    torch.testing.assert_close(got.cpu(), want, **tol(torch.float32))
    # and the update uses the same dequantized P
    w = torch.randn(m, n)
    d = torch.randn(m, r) if right else torch.randn(r, n)
    want_w = (w + (-0.1 * 0.5) * (d @ dense if right else dense @ d)) * (1 - 0.1 * 0.01)
    w_dev = w.to(device)
    galore_apply_(w_dev, d.to(device), q.to(device), absmax.to(device), code.to(device), rank=r, blocksize=128,
                  right=right, lr=0.1, scale=0.5, weight_decay=0.01)
    torch.testing.assert_close(w_dev.cpu(), want_w, **tol(torch.float32))


def test_frugal_is_signsgd_outside_the_subspace(device):
    m, n, r = 30, 50, 5
    p = torch.linalg.qr(torch.randn(m, r)).Q.contiguous().to(device)
    g = torch.randn(m, n, device=device)
    low = p.t() @ g
    d = torch.randn(r, n, device=device)
    w = torch.randn(m, n, device=device)
    want = w - 0.01 * 2.0 * (p @ d) - 0.01 * torch.sign(g - p @ low)
    galore_apply_(w, d, p, rank=r, right=False, lr=0.01, scale=2.0, mode="frugal", grad=g, low=low)
    torch.testing.assert_close(w, want, **tol(torch.float32))


def test_fira_limiter_over_steps(device):
    # the scaled residual's norm may grow by at most 1.01x per step; 0 (first step) means no limit
    m, n, r = 40, 24, 4
    p = torch.linalg.qr(torch.randn(n, r)).Q.t().contiguous().to(device)  # right projection [r, n]
    prev = torch.zeros(1, device=device)
    norms = []
    for step in range(3):
        g = torch.randn(m, n, device=device) * (1 + 10 * step)  # the residual jumps 11x, then 21/11x
        low = g @ p.t()
        d = low * 0.5
        w = torch.zeros(m, n, device=device)
        galore_apply_(w, d, p, rank=r, right=True, lr=1.0, scale=1.0, mode="fira", grad=g, low=low,
                      residual_prev_norm=prev)
        resid = (g - low @ p) * 0.5  # ||d row|| / ||low row|| = 0.5 everywhere
        applied = -(w + d @ p)       # w = -(back(d) + scaled residual)
        norms.append(float(prev))
        if step == 0:
            torch.testing.assert_close(applied, resid, **tol(torch.float32))
            assert norms[0] == pytest.approx(float(resid.norm()), rel=1e-5)
        else:
            assert norms[step] == pytest.approx(1.01 * norms[step - 1], rel=1e-5)
            torch.testing.assert_close(applied, resid * (norms[step] / float(resid.norm())), **tol(torch.float32))


def test_bad_arguments_raise():
    g, p = torch.randn(10, 20), torch.randn(10, 3)
    with pytest.raises(RuntimeError, match="rank must be in"):
        galore_project(g, p, rank=11, right=False)
    with pytest.raises(RuntimeError, match=r"proj \(left: \[m, rank\]\) must have shape"):
        galore_project(g, p, rank=4, right=False)
    with pytest.raises(RuntimeError, match="needs proj_absmax and proj_code"):
        galore_project(g, torch.zeros(30, dtype=torch.uint8), rank=3, right=False)
    code = quant.linear_code(8)
    with pytest.raises(RuntimeError, match="256 .8-bit. or 16"):
        galore_project(g, torch.zeros(30, dtype=torch.uint8), torch.ones(1), code[:100], rank=3, blocksize=64,
                       right=False)
    with pytest.raises(RuntimeError, match="power of two"):
        galore_project(g, torch.zeros(30, dtype=torch.uint8), torch.ones(1), code, rank=3, blocksize=100,
                       right=False)
    with pytest.raises(RuntimeError, match="proj_absmax must have 1 elements"):
        galore_project(g, torch.zeros(30, dtype=torch.uint8), torch.ones(2), code, rank=3, blocksize=64, right=False)
    with pytest.raises(TypeError, match="grad must be float32"):
        galore_project(g.long(), p, rank=3, right=False)
    w, d = torch.randn(10, 20), torch.randn(3, 20)
    with pytest.raises(RuntimeError, match="direction must have shape"):
        galore_apply_(w, d.t(), p, rank=3, right=False, lr=0.1, scale=1.0)
    with pytest.raises(RuntimeError, match="need grad and low"):
        galore_apply_(w, d, p, rank=3, right=False, lr=0.1, scale=1.0, mode="frugal")
    with pytest.raises(RuntimeError, match="needs residual_prev_norm"):
        galore_apply_(w, d, p, rank=3, right=False, lr=0.1, scale=1.0, mode="fira", grad=g, low=d)
    with pytest.raises(TypeError, match="grad must have param's dtype"):
        galore_apply_(w, d, p, rank=3, right=False, lr=0.1, scale=1.0, mode="frugal", grad=g.half(), low=d)
    with pytest.raises(RuntimeError, match="must be finite"):
        galore_apply_(w, d, p, rank=3, right=False, lr=float("nan"), scale=1.0)
    with pytest.raises(ValueError, match="mode must be one of"):
        galore_apply_(w, d, p, rank=3, right=False, lr=0.1, scale=1.0, mode="adam")
    with pytest.raises(RuntimeError, match="residual_mode must be 0"):
        torch.ops.lowrank.galore_apply_(w, d, p, None, None, 3, 0, False, 0.1, 1.0, 0.0, 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_refuses_overlap_before_writing_anything(dtype):
    m, n, r = 8, 6, 2
    p = torch.linalg.qr(torch.randn(m, r)).Q.contiguous()
    g = torch.randn(m, n)
    low, d = p.t() @ g, torch.randn(r, n)
    # a param with internally overlapping rows: raised halfway, after Fira's norm was advanced
    base = torch.randn(1, n).to(dtype)
    before, prev = base.clone(), torch.tensor([0.5])
    with pytest.raises(RuntimeError, match="single memory location"):
        galore_apply_(base.expand(m, n), d, p, rank=r, right=False, lr=1e-2, scale=0.25, mode="fira",
                      grad=g.to(dtype), low=low, residual_prev_norm=prev)
    assert torch.equal(base, before) and float(prev) == 0.5
    # grad aliasing param: the fp32 kernel read the already-updated param as the gradient
    for mode in ("fira", "frugal"):
        w = torch.randn(m, n).to(dtype)
        w0 = w.clone()
        prev = torch.tensor([0.0]) if mode == "fira" else None
        with pytest.raises(RuntimeError, match="single memory location"):
            galore_apply_(w, d, p, rank=r, right=False, lr=0.1, scale=1.0, mode=mode, grad=w,
                          low=p.t() @ w.float(), residual_prev_norm=prev)
        assert torch.equal(w, w0)
    # a strided param sharing the grad's storage (torch's check cannot decide: refused)
    buf = torch.randn(m, 2 * n).to(dtype)
    before = buf.clone()
    with pytest.raises(RuntimeError, match="shares memory with param"):
        galore_apply_(buf[:, ::2], d, p, rank=r, right=False, lr=0.1, scale=1.0, mode="frugal",
                      grad=buf[:, :n], low=low)
    assert torch.equal(buf, before)


def test_apply_updates_a_leaf_param_that_requires_grad(device):
    # called directly with grad mode on (as a user might, outside the optimizer's no_grad):
    # the op's own ATen calls must stay off the autograd tape on every device
    m, n, r = 30, 12, 3
    p = torch.linalg.qr(torch.randn(n, r)).Q.t().contiguous()  # right side: P [r, n]
    base = torch.randn(n, m).t()  # non-contiguous
    d = torch.randn(m, r)
    want = base.clone()
    REFERENCES["lowrank::galore_apply_"](want, d, p, None, None, r, 0, True, 0.1, 0.5, 0.01)
    param = torch.nn.Parameter(base.to(device))
    galore_apply_(param, d.to(device), p.to(device), rank=r, right=True, lr=0.1, scale=0.5, weight_decay=0.01)
    assert param.grad_fn is None
    torch.testing.assert_close(param.detach().cpu(), want, **tol(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_keeps_nan_when_the_decay_is_total(device, dtype):
    # lr * weight_decay = 1: (1 - lr wd) W is 0 * W, NaN where W is; BLAS's (cuBLAS's) beta = 0 ignored W
    m, n, r = 8, 6, 2
    p = torch.linalg.qr(torch.randn(m, r)).Q.contiguous().to(device)
    w = torch.randn(m, n).to(dtype)
    w[3, 3], w[4, 4] = float("nan"), float("inf")
    w = w.to(device)
    galore_apply_(w, torch.randn(r, n, device=device), p, rank=r, right=False, lr=0.5, scale=1.0, weight_decay=2.0)
    bad = torch.zeros(m, n, dtype=torch.bool, device=device)
    bad[3, 3] = bad[4, 4] = True
    assert w[bad].isnan().all() and w[~bad].isfinite().all()
