"""GaLoreAdamW against the published GaLore step (lowrank_ext/reference/galore.py: full SVD,
fp32 Adam): exact with the full SVD and 32-bit state, close with the randomized SVD and
quantized state; batched refresh equal to per-parameter refreshes; the refresh schedule;
state_dict resume; optimizer bytes per parameter; convergence on a small real task; bad
inputs."""
from __future__ import annotations

import copy

import pytest
import torch

from lowrank_ext import linalg
from lowrank_ext.optim import GaLoreAdamW, state_bytes_per_param
from lowrank_ext.optim import galore as galore_mod
from lowrank_ext.reference.galore import galore_adamw_step_ref

HYPER = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)


def _params():
    torch.manual_seed(0)
    shapes = [(40, 24), (24, 40), (40, 24), (16,), (6, 4)]  # tall, wide, a tall twin, a bias, rank >= min side
    return [torch.nn.Parameter(torch.randn(s)) for s in shapes]


def _low_rank_grads(params, step, rank=4):
    """Gradients of rank `rank`, with distinct singular values (a unique top-r subspace)."""
    g = torch.Generator().manual_seed(100 + step)
    out = []
    for p in params:
        if p.dim() == 2:
            u = torch.linalg.qr(torch.randn(p.shape[0], rank, generator=g)).Q
            v = torch.linalg.qr(torch.randn(p.shape[1], rank, generator=g)).Q
            out.append((u * torch.tensor([8.0, 4.0, 2.0, 1.0][:rank])) @ v.t())
        else:
            out.append(torch.randn(p.shape, generator=g))
    return out


def _run_both(opt_kwargs, steps, grads_fn=_low_rank_grads, rank=4, gap=3, scale=0.5, mode="galore"):
    ours = _params()
    ref = [p.detach().clone() for p in ours]
    opt = GaLoreAdamW(ours, rank=rank, update_proj_gap=gap, scale=scale, mode=mode, **HYPER, **opt_kwargs)
    ref_states = [{} for _ in ref]
    history = []
    for step in range(steps):
        grads = grads_fn(ours, step)
        for p, g in zip(ours, grads):
            p.grad = g.clone()
        opt.step()
        for p, g, st in zip(ref, grads, ref_states):
            galore_rank = rank if (p.dim() == 2 and rank < min(p.shape)) else None
            galore_adamw_step_ref(p, g, st, rank=galore_rank, update_proj_gap=gap, scale=scale, mode=mode, **HYPER)
        history.append(max(float((a.detach() - b).abs().max()) for a, b in zip(ours, ref)))
    return ours, ref, opt, history


def test_full_svd_and_fp32_state_equal_the_published_step():
    _, _, opt, history = _run_both(dict(proj_method="svd"), steps=8)  # refreshes at steps 0, 3, 6
    assert max(history) < 1e-5, history  # one fused addmm_ instead of three passes: rounding only
    assert opt.state[opt.param_groups[0]["params"][0]]["proj_right"] is True
    assert opt.state[opt.param_groups[0]["params"][1]]["proj_right"] is False
    assert "proj" not in opt.state[opt.param_groups[0]["params"][4]]  # rank 4 < min(6, 4) is false: plain Adam


def _full_rank_grads(params, step):
    g = torch.Generator().manual_seed(200 + step)
    # growing gradients: Fira's limiter engages (norms grow ~1.5x per step)
    return [torch.randn(p.shape, generator=g) * 1.5 ** step for p in params]


@pytest.mark.parametrize("mode", ["fira", "frugal"])
def test_fira_and_frugal_equal_the_reference(mode):
    _, _, opt, history = _run_both(dict(proj_method="svd"), steps=7, grads_fn=_full_rank_grads, mode=mode)
    assert max(history) < 1e-4, history
    if mode == "fira":
        assert "fira_prev_norm" in opt.state[opt.param_groups[0]["params"][0]]


def test_fira_and_frugal_train_outside_the_subspace():
    # a gradient orthogonal to the projection: GaLore leaves W alone (but for weight decay),
    # Fira and FRUGAL move it
    for mode, moves in (("galore", False), ("fira", True), ("frugal", True)):
        p = torch.nn.Parameter(torch.zeros(30, 20))
        opt = GaLoreAdamW([p], rank=2, mode=mode, lr=0.1, proj_method="svd")
        g1 = torch.zeros(30, 20)
        g1[0, 0], g1[1, 1] = 2.0, 1.0  # rank 2: the subspace is e0/e1
        p.grad = g1
        opt.step()
        before = p.detach().clone()
        g2 = torch.randn(30, 20)  # rows in and out of the (right) subspace span(e0, e1) of R^20
        p.grad = g2
        opt.step()
        moved = float((p.detach() - before)[:, 5:].abs().max())  # columns 5.. are outside it
        assert (moved > 1e-3) == moves, (mode, moved)


def test_randomized_svd_matches_until_a_refresh_mixes_signs():
    # With a unique top-r subspace the rsvd projection equals LAPACK's up to column signs, and
    # signs commute with the elementwise Adam: equal until the second refresh carries state over.
    _, _, _, history = _run_both(dict(proj_method="rsvd"), steps=3)
    assert max(history) < 1e-4, history


def _run_pair(kwargs_a: dict, kwargs_b: dict, steps: int = 6):
    """Two optimizers on the same params and low-rank grads; returns (a, b, start, opt_b)."""
    a, b = _params(), _params()
    opt_a = GaLoreAdamW(a, rank=4, update_proj_gap=3, **kwargs_a, **HYPER)
    opt_b = GaLoreAdamW(b, rank=4, update_proj_gap=3, **kwargs_b, **HYPER)
    start = [p.detach().clone() for p in a]
    for step in range(steps):
        for pa, pb, g in zip(a, b, _low_rank_grads(a, step)):
            pa.grad, pb.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    return a, b, start, opt_b


@pytest.mark.parametrize("bits,tol", [(8, 0.05), (4, 0.3)])
def test_quantized_state_stays_close_to_fp32(bits, tol):
    a, b, start, opt_b = _run_pair(dict(proj_method="svd"), dict(proj_method="svd", state_bits=bits))
    for pa, pb, p0 in zip(a, b, start):
        moved = float((pa.detach() - p0).abs().max())
        assert float((pa.detach() - pb.detach()).abs().max()) <= tol * moved
    assert "exp_avg_q" in opt_b.state[b[0]] and opt_b.state[b[0]]["exp_avg_q"].dtype == torch.uint8


@pytest.mark.parametrize("bits,tol", [(8, 0.05), (4, 0.2)])
def test_quantized_projections_stay_close_and_save_memory(bits, tol):
    """The movement of each weight over 6 steps, relative Frobenius distance to the one with
    fp32 projections (measured: <= 0.03 for INT8, <= 0.10 for INT4)."""
    a, b, start, opt_b = _run_pair({}, dict(proj_bits=bits))
    opt_a = GaLoreAdamW(_params(), rank=4, update_proj_gap=3, **HYPER)  # for the state size: one step
    for p, g in zip(opt_a.param_groups[0]["params"], _low_rank_grads(a, 0)):
        p.grad = g
    opt_a.step()
    for pa, pb, p0 in zip(a, b, start):
        moved = float((pa.detach() - p0).norm())
        assert float((pa.detach() - pb.detach()).norm()) <= tol * moved
    st = opt_b.state[b[0]]
    assert "proj" not in st and st["proj_q"].dtype == torch.uint8
    assert st["proj_q"].numel() == 4 * 24 * bits // 8  # [r, n] = [4, 24], packed
    assert state_bytes_per_param(opt_b) < state_bytes_per_param(opt_a)


def test_adaptive_refresh_freezes_a_settled_subspace_only(monkeypatch):
    calls = []
    real = galore_mod.batched_rsvd
    monkeypatch.setattr(galore_mod, "batched_rsvd",
                        lambda mats, *args, **kw: calls.append(len(mats)) or real(mats, *args, **kw))
    settled, moving = torch.nn.Parameter(torch.zeros(40, 24)), torch.nn.Parameter(torch.zeros(40, 24).add(1))
    opt = GaLoreAdamW([settled, moving], rank=4, update_proj_gap=1, adaptive_refresh=0.9, refresh_patience=2,
                      **HYPER)
    fixed = _low_rank_grads([settled], 0)[0]
    for step in range(6):
        settled.grad = fixed * (1 + step)  # the same subspace every step
        moving.grad = torch.randn(40, 24)  # a new one every step
        opt.step()
    assert opt.state[settled]["proj_frozen"] and not opt.state[moving]["proj_frozen"]
    # refreshes: both at steps 0-2 (the settled one is frozen after 2 similar refreshes), then only the moving one
    assert calls == [2, 2, 2, 1, 1, 1]


def test_refresh_schedule_and_one_batched_svd_per_shape(monkeypatch):
    calls = []
    real = galore_mod.batched_rsvd

    def counting(mats, k, *args, **kwargs):
        calls.append((len(mats), *mats[0].shape))
        return real(mats, k, *args, **kwargs)
    monkeypatch.setattr(galore_mod, "batched_rsvd", counting)
    params = _params()
    opt = GaLoreAdamW(params, rank=4, update_proj_gap=3, **HYPER)
    projs = []
    for step in range(7):
        for p, g in zip(params, _low_rank_grads(params, step)):
            p.grad = g
        opt.step()
        projs.append(opt.state[params[0]]["proj"].clone())
    # steps 0, 3, 6 refresh; the two 40 x 24 params share one batched call (on G^T: their
    # projection is on the right, rsvd's left factor of G^T)
    assert calls == [(2, 24, 40), (1, 24, 40)] * 3
    assert torch.equal(projs[0], projs[2]) and not torch.equal(projs[2], projs[3])
    # the batched refresh equals a lone rsvd of that gradient with the same seed
    g = params[2].grad.float()
    u_t, _, _ = linalg.rsvd(g.t(), 4, 10, 2, seed=galore_mod._mix(0, 6, 40, 24))
    torch.testing.assert_close(opt.state[params[2]]["proj"], u_t.t(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("proj_bits", [32, 8])
def test_warm_started_refresh_is_rsvd_from_the_current_projection(proj_bits):
    """The first refresh sketches afresh; later ones run warm_start_n_iter power iterations
    from the projection they replace (dequantized, for quantized projections): checked against
    the fp64 reference rsvd started from the same basis, on both projection sides."""
    from lowrank_ext.reference.svd import rsvd_ref
    params = _params()
    opt = GaLoreAdamW(params, rank=4, update_proj_gap=1, warm_start_n_iter=1, proj_bits=proj_bits, **HYPER)
    for step in range(3):
        olds = {id(p): opt._projection(opt.state[p], tuple(p.shape), 4) for p in params[:3] if opt.state.get(p)}
        for p, g in zip(params, _low_rank_grads(params, step)):
            p.grad = g + 0.05 * torch.randn(g.shape)  # full-rank: the start and the iterations count
        opt.step()
        for p in params[:3]:  # tall, wide, tall twin
            m, n = p.shape
            right = m >= n
            g = p.grad.double()
            start = None if step == 0 else (olds[id(p)].t() if right else olds[id(p)])
            u, _, _ = rsvd_ref(g.t() if right else g, 4, 10, 2 if step == 0 else 1, galore_mod._mix(0, step, m, n),
                               start=start)
            new = opt._projection(opt.state[p], (m, n), 4)
            want = u.t() if right else u
            if proj_bits == 32:
                torch.testing.assert_close(new.double(), want, atol=1e-5, rtol=0)
            else:  # 8-bit linear code, blocks of 128: within half a code step of the block's absmax
                assert float((new.double() - want).abs().max()) <= 0.5 / 127 * float(want.abs().max()) + 1e-6


def test_warm_start_tracks_drifting_gradients_with_fewer_passes(monkeypatch):
    """A slow spectrum plus fresh noise at every refresh: warm-started refreshes (one power
    iteration: 3 products with G) keep the projection within 0.5% of the best rank-r one, as the
    cold refreshes (two iterations: 6) do (measured: warm <= 1.0004x, cold <= 1.0021x;
    one iteration from a random start instead: 1.012-1.017x, and cold with one: 1.007-1.013x)."""
    calls = []
    real = galore_mod.batched_rsvd
    monkeypatch.setattr(galore_mod, "batched_rsvd",
                        lambda mats, k, o, n_iter, seed, start=None: calls.append((n_iter, start is not None))
                        or real(mats, k, o, n_iter, seed, start))
    m, n, r = 200, 120, 8
    u0 = torch.linalg.qr(torch.randn(m, n, dtype=torch.float64)).Q
    v0 = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64)).Q
    base = (u0 * (1.0 + torch.arange(n, dtype=torch.float64)) ** -0.5) @ v0.t()
    noise = 0.3 * float((1.0 + r) ** -0.5) / (m ** 0.5 + n ** 0.5)
    ratios = {}
    for warm in (None, 1):
        p = torch.nn.Parameter(torch.zeros(m, n))
        opt = GaLoreAdamW([p], rank=r, update_proj_gap=1, warm_start_n_iter=warm, **HYPER)
        gen = torch.Generator().manual_seed(5)
        worst = 0.0
        for step in range(5):
            g = base + noise * torch.randn(m, n, dtype=torch.float64, generator=gen)
            p.grad = g.float()
            opt.step()
            proj = opt.state[p]["proj"].double()  # right: [r, n]
            err = torch.linalg.matrix_norm(g - (g @ proj.t()) @ proj)
            optimal = torch.linalg.svdvals(g)[r:].square().sum().sqrt()
            worst = max(worst, float(err / optimal)) if step > 0 else worst
        ratios[warm] = worst
    assert ratios[1] <= 1.005 and ratios[None] <= 1.005, ratios
    assert calls == [(2, False)] * 5 + [(2, False)] + [(1, True)] * 4


@pytest.mark.parametrize("proj_method", ["rsvd", "svd"])
@pytest.mark.parametrize("shape", [(64, 48), (48, 64), (56, 56)])
def test_refresh_projected_gradient_is_the_projection_of_g(proj_method, shape):
    # at a refresh the optimizer takes the projected gradient from the SVD's factors instead
    # of projecting G again: it must be P^T G (left) or G Q (right) all the same, for a
    # full-rank G that no rank-8 factorisation reproduces
    p = torch.nn.Parameter(torch.randn(shape))
    opt = GaLoreAdamW([p], rank=8, lr=1e-3, proj_method=proj_method)
    g = torch.randn(shape)
    p.grad = g.clone()
    opt.step()
    st = opt.state[p]
    proj = st["proj"]
    want = g @ proj.t() if st["proj_right"] else proj.t() @ g
    got = st["exp_avg"] / 0.1  # the first step's m = (1 - beta1) R
    assert st["proj_right"] == (shape[0] >= shape[1])
    torch.testing.assert_close(got, want, atol=1e-5 * float(want.abs().max()), rtol=1e-4)


@pytest.mark.parametrize("bits,extra", [(32, {}), (8, {}), (4, dict(proj_bits=4, adaptive_refresh=0.5)),
                                        (32, dict(warm_start_n_iter=1))])
def test_state_dict_resume_is_identical(bits, extra):
    def grads(params, step):
        g = torch.Generator().manual_seed(step)
        return [torch.randn(p.shape, generator=g) for p in params]

    def run(params, opt, steps):
        for step in steps:
            for p, g in zip(params, grads(params, step)):
                p.grad = g
            opt.step()

    a = _params()
    opt_a = GaLoreAdamW(a, rank=4, update_proj_gap=2, state_bits=bits, **extra, **HYPER)
    run(a, opt_a, range(7))
    b = _params()
    opt_b = GaLoreAdamW(b, rank=4, update_proj_gap=2, state_bits=bits, **extra, **HYPER)
    run(b, opt_b, range(3))
    saved = copy.deepcopy(opt_b.state_dict())
    c = [torch.nn.Parameter(p.detach().clone()) for p in b]
    opt_c = GaLoreAdamW(c, rank=4, update_proj_gap=2, state_bits=bits, **extra, **HYPER)
    opt_c.load_state_dict(saved)
    run(c, opt_c, range(3, 7))
    for pa, pc in zip(a, c):
        assert torch.equal(pa, pc)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_keep_the_settings_and_continue_identically(how):
    import pickle
    a = _params()
    opt = GaLoreAdamW(a, rank=4, update_proj_gap=2, state_bits=8, proj_bits=4, mode="fira", seed=3,
                      warm_start_n_iter=1, **HYPER)
    for p, g in zip(a, _low_rank_grads(a, 0)):
        p.grad = g
    opt.step()
    clone = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    assert (clone.proj_bits, clone.mode, clone.seed, clone.state_bits, clone.warm_start_n_iter) == (4, "fira", 3, 8, 1)
    b = clone.param_groups[0]["params"]
    for step in (1, 2, 3):  # a refresh at step 2, with the copy's seed and proj_bits
        for pa, pb, g in zip(a, b, _low_rank_grads(a, step)):
            pa.grad, pb.grad = g, g.clone()
        opt.step()
        clone.step()
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)


def test_an_optimizer_pickled_before_warm_starts_existed_still_steps():
    a = _params()
    opt = GaLoreAdamW(a, rank=4, update_proj_gap=1, **HYPER)
    state = opt.__getstate__()
    del state["warm_start_n_iter"]  # as pickled before the setting existed
    old = GaLoreAdamW.__new__(GaLoreAdamW)
    old.__setstate__(state)
    for step in range(2):
        for p, g in zip(a, _low_rank_grads(a, step)):
            p.grad = g
        old.step()  # cold refreshes, as then
    assert old.warm_start_n_iter is None and "proj" in old.state[a[0]]


def test_param_groups_added_later_are_checked():
    opt = GaLoreAdamW([torch.nn.Parameter(torch.randn(8, 8))], rank=2)
    for bad in (dict(rank=0), dict(rank=2.5), dict(update_proj_gap=0)):
        with pytest.raises(ValueError, match="rank|update_proj_gap"):
            opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(8, 8))], **bad})
    assert len(opt.param_groups) == 1
    saved = opt.state_dict()
    saved["param_groups"][0]["update_proj_gap"] = 0
    with pytest.raises(ValueError, match="cannot continue this state_dict"):
        GaLoreAdamW([torch.nn.Parameter(torch.randn(8, 8))], rank=2).load_state_dict(saved)


def test_8bit_state_small_gradients_that_stop_do_not_blow_up():
    # AdamW8bit's second-moment code had a 0: v of entries whose gradient was 1e-4 of their
    # block's and then stopped rounded to 0 while m did not, and they moved by m / eps
    def run(make):
        p = torch.nn.Parameter(torch.zeros(4096))
        opt = make(p)
        gen = torch.Generator().manual_seed(1)
        for k in range(60):
            g = 1 + 0.1 * torch.randn(4096, generator=gen)
            g[1::2] = 1e-4 if k < 5 else 0.0
            p.grad = g
            opt.step()
        return p.detach()
    want = run(lambda p: torch.optim.AdamW([p], lr=1e-3, weight_decay=0.0))
    got = run(lambda p: GaLoreAdamW([p], lr=1e-3, rank=None, state_bits=8))
    assert float(got[1::2].abs().max()) < 5 * float(want[1::2].abs().max())


def test_bf16_params_keep_fp32_state_through_state_dict():
    p = torch.nn.Parameter(torch.randn(32, 20).bfloat16())
    opt = GaLoreAdamW([p], rank=4, **HYPER)
    p.grad = torch.randn(32, 20).bfloat16()
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.float32 and opt.state[p]["proj"].dtype == torch.float32
    opt2 = GaLoreAdamW([p], rank=4, **HYPER)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.state[p]["exp_avg"].dtype == torch.float32 and opt2.state[p]["proj"].dtype == torch.float32


@pytest.mark.parametrize("bits,limit", [(32, 1.13), (8, 0.38), (4, 0.26)])  # torch AdamW: 8
def test_optimizer_bytes_per_parameter(bits, limit):
    # 2048 x 512 at rank 64: right projection; moments 2 x 2048 x 64, projection 64 x 512
    p = torch.nn.Parameter(torch.randn(2048, 512))
    opt = GaLoreAdamW([p], rank=64, state_bits=bits)
    p.grad = torch.randn(2048, 512)
    opt.step()
    per_param = state_bytes_per_param(opt)
    moments = {32: 8.0, 8: 2.0 + 4 / 256 + 4 / 2048, 4: 1.0 + 4 / 128 + 4 / 256}[bits]  # codes + absmax per block
    want = (moments * 2048 * 64 + 4.0 * 64 * 512) / (2048 * 512)
    assert abs(per_param - want) < 1e-3 and per_param < limit


@pytest.mark.parametrize("gap,warm", [(50, None), (10, 1)])
def test_convergence_on_digits_within_3_percent_of_adamw(gap, warm):
    """The digits MLP of test_optim (two 128-wide GaLore layers at rank 32, 8-bit state; the
    10 x 128 head has plain Adam), 40 full-batch steps; each optimizer at the better of two
    learning rates (GaLore's updates live in a rank-32 subspace: it wants a larger one). Also
    with a refresh every 10 steps, warm-started (three warm refreshes)."""
    from sklearn.datasets import load_digits  # ships its data: no download
    d = load_digits()
    x, y = torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128),
                                torch.nn.ReLU(), torch.nn.Linear(128, 10))

    def train(make_opt, lr, steps=40):
        m = copy.deepcopy(model)
        opt = make_opt(m.parameters(), lr)
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(m(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(m(x), y))
    lrs = (3e-3, 1e-2)
    ref_loss = min(train(lambda p, lr: torch.optim.AdamW(p, lr=lr, weight_decay=0.0), lr) for lr in lrs)
    our_loss = min(train(lambda p, lr: GaLoreAdamW(p, lr=lr, rank=32, update_proj_gap=gap, scale=1.0, state_bits=8,
                                                   warm_start_n_iter=warm), lr) for lr in lrs)
    assert ref_loss < 0.2, "the task must be learnt for the comparison to mean anything"
    assert our_loss <= 1.03 * ref_loss, (our_loss, ref_loss)


def test_bad_arguments():
    p = [torch.nn.Parameter(torch.randn(4, 4))]
    for kwargs, match in [(dict(rank=0), "rank"), (dict(update_proj_gap=0), "update_proj_gap"),
                          (dict(state_bits=16), "state_bits"), (dict(proj_method="qr"), "proj_method"),
                          (dict(mode="lora"), "mode"), (dict(proj_bits=2), "proj_bits"),
                          (dict(adaptive_refresh=1.5), "adaptive_refresh"), (dict(refresh_patience=0), "patience"),
                          (dict(warm_start_n_iter=0), "warm_start_n_iter"),
                          (dict(warm_start_n_iter=1, adaptive_refresh=0.9), "cannot be combined"),
                          (dict(warm_start_n_iter=True), "warm_start_n_iter"),
                          (dict(warm_start_n_iter=1, proj_method="svd"), "proj_method='rsvd'"),
                          (dict(lr=-1.0), "learning rate"), (dict(betas=(1.0, 0.9)), "beta")]:
        with pytest.raises(ValueError, match=match):
            GaLoreAdamW(p, **kwargs)
    q = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.float64))
    q.grad = torch.randn(4, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="float32"):
        GaLoreAdamW([q]).step()


def test_flags_and_state_formats_that_cannot_continue_raise():
    p = torch.nn.Parameter(torch.randn(24, 40))
    with pytest.raises(ValueError, match="maximize"):
        GaLoreAdamW([{"params": [p], "maximize": True}], rank=4)
    late = GaLoreAdamW([p], rank=4)
    late.param_groups[0]["maximize"] = True  # set after construction: read at the step, as torch's AdamW does
    p.grad = torch.randn(24, 40)
    with pytest.raises(ValueError, match="maximize"):
        late.step()
    p.grad = None
    opt32 = GaLoreAdamW([p], rank=4, lr=1e-3)
    p.grad = torch.randn(24, 40)
    opt32.step()
    with pytest.raises(ValueError, match="fp32 moments"):
        GaLoreAdamW([p], rank=4, state_bits=8).load_state_dict(opt32.state_dict())
    opt8 = GaLoreAdamW([p], rank=4, state_bits=8)
    opt8.step()
    with pytest.raises(ValueError, match="quantized moments"):
        GaLoreAdamW([p], rank=4).load_state_dict(opt8.state_dict())
    # projections in another format: a clear error at load, not a KeyError at the next step
    q = torch.nn.Parameter(torch.randn(64, 600))  # 4 x 64 projection entries: the 8- and 4-bit counts differ
    states = {}
    for bits in (32, 8, 4):
        opt = GaLoreAdamW([q], rank=4, proj_bits=bits)
        q.grad = torch.randn(64, 600)
        opt.step()
        states[bits] = opt.state_dict()
    for saved in (32, 8, 4):
        for bits in (32, 8, 4):
            fresh = GaLoreAdamW([q], rank=4, proj_bits=bits)
            if saved == bits:
                fresh.load_state_dict(states[saved])
                fresh.step()
            else:
                with pytest.raises(ValueError, match="projections in another format"):
                    fresh.load_state_dict(states[saved])
    q.grad = None


def test_refuses_state_dicts_it_cannot_continue():
    # torch AdamW's state loaded and failed at the first step (KeyError 'rank'); 8-bit moments
    # loaded into a 4-bit optimizer failed inside the kernel
    params = _params()
    for p in params:
        p.grad = torch.randn_like(p)
    torch_opt = torch.optim.AdamW(params)
    torch_opt.step()
    with pytest.raises(ValueError, match="not saved by a GaLoreAdamW"):
        GaLoreAdamW(params, rank=4).load_state_dict(torch_opt.state_dict())
    eight = GaLoreAdamW(params, rank=4, state_bits=8)
    eight.step()
    with pytest.raises(ValueError, match="another format"):
        GaLoreAdamW(params, rank=4, state_bits=4).load_state_dict(eight.state_dict())


@pytest.mark.parametrize("mode", ["fira", "frugal"])
def test_residual_modes_step_a_grad_of_another_dtype(mode):
    # fp32 param with a bf16 grad (grad_dtype): the residual modes read G and raised mid-step,
    # after other params had moved. bf16 -> fp32 is exact: the step equals one on the upcast grad
    def run(grad_dtype):
        torch.manual_seed(0)
        other, p = torch.nn.Parameter(torch.randn(20, 20)), torch.nn.Parameter(torch.randn(12, 30))
        p.grad_dtype = grad_dtype
        opt = GaLoreAdamW([other, p], lr=1e-2, rank=4, update_proj_gap=2, mode=mode, proj_method="svd")
        for s in range(3):
            gen = torch.Generator().manual_seed(s)
            other.grad = torch.randn(20, 20, generator=gen)
            p.grad = torch.randn(12, 30, generator=gen).to(torch.bfloat16).to(grad_dtype)
            opt.step()
        return other.detach(), p.detach()
    for got, want in zip(run(torch.bfloat16), run(torch.float32)):
        assert torch.equal(got, want)


def test_accepts_torch_adamw_keywords_as_adamw8bit_does():
    p = torch.nn.Parameter(torch.randn(8, 8))
    GaLoreAdamW([p], rank=2, maximize=False, amsgrad=False, foreach=None, fused=False, capturable=False,
                differentiable=False)
    for flag in ("maximize", "amsgrad", "capturable", "differentiable"):
        with pytest.raises(ValueError, match=f"does not support {flag}=True"):
            GaLoreAdamW([p], rank=2, **{flag: True})


def test_a_rank_changed_mid_run_is_refused_before_any_update():
    torch.manual_seed(0)
    other, p = torch.nn.Parameter(torch.randn(6, 6)), torch.nn.Parameter(torch.randn(12, 30))
    opt = GaLoreAdamW([other, p], lr=1e-2, rank=4, update_proj_gap=2)
    for _ in range(2):
        other.grad, p.grad = torch.randn(6, 6), torch.randn(12, 30)
        opt.step()
    for rank in (2, 8, None):
        opt.param_groups[0]["rank"] = rank
        before = [t.detach().clone() for t in (other, p)]
        with pytest.raises(ValueError, match="has state at rank 4"):
            opt.step()
        assert all(torch.equal(t, b) for t, b in zip((other, p), before)) and int(opt.state[p]["step"]) == 2
    opt.param_groups[0]["rank"] = 4
    opt.step()  # back at its rank: steps again, and the state round-trips
    fresh = GaLoreAdamW([torch.nn.Parameter(other.detach().clone()), torch.nn.Parameter(p.detach().clone())],
                        lr=1e-2, rank=4, update_proj_gap=2)
    fresh.load_state_dict(opt.state_dict())


def test_turning_galore_on_mid_run_is_refused_before_any_update():
    # full-Adam state (rank None, or a rank >= min(m, n)) cannot step as GaLore
    for start in (None, 16):
        torch.manual_seed(0)
        bias, p = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(12, 30))
        opt = GaLoreAdamW([bias, p], lr=1e-2, rank=start, update_proj_gap=2)
        for _ in range(2):
            bias.grad, p.grad = torch.randn(5), torch.randn(12, 30)
            opt.step()
        opt.param_groups[0]["rank"] = 4
        before = [t.detach().clone() for t in (bias, p)]
        with pytest.raises(ValueError, match=r"has state at rank None \(full Adam\)"):
            opt.step()
        assert all(torch.equal(t, b) for t, b in zip((bias, p), before)) and int(opt.state[p]["step"]) == 2


def test_a_refused_step_leaves_new_params_without_state():
    # the checks stamped step and rank on params before a later param raised: their group's
    # rank could then not change, though none of them had stepped
    fresh, old = torch.nn.Parameter(torch.randn(12, 30)), torch.nn.Parameter(torch.randn(12, 30))
    opt = GaLoreAdamW([{"params": [old], "rank": 4}, {"params": [fresh], "rank": 4}], lr=1e-2)
    old.grad = torch.randn(12, 30)
    opt.step()
    opt.param_groups[0]["rank"] = 2  # old's rank changed: the next step is refused
    fresh.grad = torch.randn(12, 30)
    with pytest.raises(ValueError, match="has state at rank 4"):
        opt.step()
    assert not opt.state[fresh]
    with pytest.raises(ValueError, match="scale must be a finite number"):
        GaLoreAdamW([fresh], scale=None)


@pytest.mark.parametrize("mode", ["galore", "fira"])
def test_compiled_step_follows_eager(mode, inductor_recording):
    # torch.compile(opt.step): the refresh (batched_rsvd), projection, quantized Adam and
    # project-back ops are captured in graphs and run by Inductor's code; the refresh schedule
    # and the update are eager's. Inductor computes the surrounding elementwise ops (weight
    # decay of the non-projected params, step counters) in its own roundings: equal to eager
    # within a few fp32 ulps, not bit for bit.
    backend, captured = inductor_recording

    def train(compiled):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 10))
        opt = GaLoreAdamW(model.parameters(), lr=1e-2, rank=8, update_proj_gap=2, state_bits=8, mode=mode)
        step = torch.compile(opt.step, backend=backend) if compiled else opt.step
        for _ in range(5):  # refreshes at steps 1, 3 and 5
            model(torch.randn(16, 64)).square().mean().backward()
            step()
            opt.zero_grad()
        return model

    eager, compiled = train(False), train(True)
    for op in ("lowrank.batched_rsvd", "lowrank.galore_project", "lowrank.galore_apply_",
               "lowrank.adamw_step_quantized_"):
        assert op in captured, f"{op} ran outside every compiled graph: {sorted(captured)}"
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        a, b = a.detach(), b.detach()
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6 * float(a.abs().max()), msg=name)
