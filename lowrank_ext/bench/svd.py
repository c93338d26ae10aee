"""Benchmark family `svd`: randomized SVD, batched randomized SVD, the batched Jacobi SVD,
the streaming SVD and the Gaussian sketch.

Cases (benchmarks/shapes/svd.csv). Matrices for rsvd have singular values (1 + i)^-1 for
i < min(m, n, 2048) (orthonormal factors from QR of Gaussians), so the optimal rank-k
Frobenius error is known without an SVD; each rsvd row's note gives its error / optimal.
Providers per op:

* rsvd:          reference ``torch.svd_lowrank`` (q = k + oversample, niter = n_iter: the
                 same algorithm in PyTorch ops), ``lowrank_ext`` (rsvd, same settings),
                 ``torch.linalg.svd`` (full SVD then truncated, cuSOLVER's gesvd driver on
                 CUDA; slow: CPU rows only up to 2048 x 2048)
* batched rsvd:  reference a loop of ``torch.svd_lowrank``; ``lowrank_ext`` one batched call
                 (rsvd of the stack); ``lowrank_ext batched_rsvd (list)`` the same from a list of
                 the matrices, read where they lie (what GaLore's refresh calls: no stacked copy;
                 here the list is views of the stack); ``lowrank_ext rsvd loop`` a loop of
                 single rsvd calls
* jacobi:        reference ``torch.linalg.svd`` (batched LAPACK / cuSOLVER); ``lowrank_ext``
* streaming:     reference ``torch.linalg.svd`` of the whole matrix, truncated;
                 ``lowrank_ext`` StreamingSVD(k) (k + 10 tracked) over 256-column blocks of a
                 rank-k matrix plus 1% noise
* sketch:        reference ``A @ Omega`` with Omega stored (the GEMM alone: the floor);
                 ``lowrank_ext`` gaussian_sketch (Omega generated, never stored);
                 ``torch.randn + matmul``

Checks: rsvd factors orthonormal within 1e-3 and error / optimal <= 1.5 (the error ratios
themselves are in the notes and the summary); singular values against the reference's
within 1e-3 of the largest (streaming: of its top k; jacobi: also U S Vh reconstructs A).
Throughput: rsvd counts 2 m n l FLOPs per pass over A ((2 n_iter + 2) passes).
"""
from __future__ import annotations

import torch

from .harness import Case, Family, Provider, Row, SkipProvider, Timed, check_close, load_shapes, rows_by_case, met

REFERENCE_RSVD, OURS, LINALG, OUR_LOOP = "torch.svd_lowrank", "lowrank_ext", "torch.linalg.svd", "lowrank_ext rsvd loop"
OUR_LIST = "lowrank_ext batched_rsvd (list)"
REFERENCE_LOOP, REFERENCE_SVD, STORED, RANDN = ("torch.svd_lowrank loop", "torch.linalg.svd (reference)",
                                                "A @ Omega (stored)", "torch.randn + matmul")
TARGET_VS_SVD_LOWRANK = 1.5
TARGET_VS_LINALG_GPU = 10.0   # k = 128 on 4096 x 4096
TARGET_BATCHED_VS_LOOP = 3.0
STREAM_BLOCK = 256
_CPU_LINALG_MAX = 2048 * 2048  # torch.linalg.svd above this takes minutes on a 2-core CPU
_BUILD_RANK = 2048


def cases(quick: bool, device: torch.device, dtype: torch.dtype | None) -> list[Case]:
    mode = "quick" if quick else "full"
    out = []
    for r in load_shapes("svd"):
        if r["mode"] != mode or device.type not in r["devices"].split("|"):
            continue
        dt = dtype or getattr(torch, r["dtype"])
        b, m, n, k, p, q = (int(r[c]) for c in ("batch", "m", "n", "k", "oversample", "n_iter"))
        op = r["op"]
        l = min(k + p, m, n)
        flops = None
        if op in ("rsvd", "batched rsvd"):
            flops = b * (2 * q + 2) * 2.0 * m * n * l
        elif op == "sketch":
            flops = 2.0 * m * n * l
        label = {"rsvd": f"{m}x{n} k={k} p={p} q={q}", "batched rsvd": f"{b} x {m}x{n} k={k} p={p} q={q}",
                 "jacobi": f"{b} x {m}x{n}", "streaming": f"{m}x{n} k={k} blocks of {STREAM_BLOCK}",
                 "sketch": f"{m}x{n} l={l}"}[op]
        out.append(Case(family="svd", op=op, label=label, dtype=dt, flops=flops,
                        params={"op": op, "batch": b, "m": m, "n": n, "k": k, "p": p, "q": q, "l": l, "dtype": dt}))
    return out


def _spectrum_matrix(b: int, m: int, n: int, device, g: torch.Generator):
    """[b, m, n] with singular values (1 + i)^-1, i < min(m, n, 2048); and those values."""
    r = min(m, n, _BUILD_RANK)
    u = torch.linalg.qr(torch.randn(b, m, r, generator=g, device=device)).Q
    v = torch.linalg.qr(torch.randn(b, n, r, generator=g, device=device)).Q
    s = 1.0 / (1.0 + torch.arange(r, device=device, dtype=torch.float32))
    return (u * s) @ v.transpose(-2, -1), s


def make_inputs(case: Case, device: torch.device) -> dict:
    p = case.params
    g = torch.Generator(device=device).manual_seed(0)
    op, b, m, n = p["op"], p["batch"], p["m"], p["n"]
    if op in ("rsvd", "batched rsvd"):
        a, s = _spectrum_matrix(b, m, n, device, g)
        return {"a": a[0] if op == "rsvd" else a, "s": s}
    if op == "jacobi":
        return {"a": torch.randn(b, m, n, generator=g, device=device)}
    if op == "streaming":
        # rank k plus 1% noise: a top-k subspace worth tracking, a tail each truncation drops
        k = p["k"]
        a = torch.randn(m, k, generator=g, device=device) @ torch.randn(k, n, generator=g, device=device) / k ** 0.5
        return {"a": a + 1e-2 * torch.randn(m, n, generator=g, device=device)}
    from lowrank_ext.reference.svd import sketch_matrix_ref
    return {"a": torch.randn(m, n, generator=g, device=device), "omega": sketch_matrix_ref(n, p["l"], 0, device)}


def _error_ratio(case: Case, inputs: dict, out) -> float:
    """Frobenius error of U S Vh / the optimal rank-k error (max over a batch; the built
    spectrum has more than k values, so the optimum is never zero)."""
    u, s, vh = out
    a, sv, k = inputs["a"], inputs["s"], case.params["k"]
    opt = float(sv[k:].double().square().sum().sqrt())
    return float(torch.linalg.matrix_norm((u * s.unsqueeze(-2)) @ vh - a).max()) / opt


def _rsvd_timed(case: Case, inputs: dict, fn) -> Timed:
    # torch.svd_lowrank draws from the global generator: seeded, its error note is reproducible
    # (one draw per provider, as ours with seed 0) instead of whatever the run's RNG state gave
    torch.manual_seed(0)
    out = fn()
    return Timed(fn=fn, output=out, note=f"err/opt {_error_ratio(case, inputs, out):.4f}")


def _svd_lowrank_fn(a, p):
    u, s, v = torch.svd_lowrank(a, q=p["l"], niter=p["q"])
    return u[..., :p["k"]], s[..., :p["k"]], v[..., :p["k"]].transpose(-2, -1)


def _reference(case: Case, inputs: dict) -> Timed:
    p, a = case.params, inputs["a"]
    op = p["op"]
    if op == "rsvd":
        return _rsvd_timed(case, inputs, lambda: _svd_lowrank_fn(a, p))
    if op == "batched rsvd":
        def loop():
            outs = [_svd_lowrank_fn(a[i], p) for i in range(a.shape[0])]
            return tuple(torch.stack(t) for t in zip(*outs))
        return _rsvd_timed(case, inputs, loop)
    if op == "jacobi":
        fn = lambda: torch.linalg.svd(a, full_matrices=False)  # noqa: E731
        return Timed(fn=fn, output=fn(), flops=0.0)  # LAPACK's algorithm: no comparable FLOP count
    if op == "streaming":
        fn = lambda: torch.linalg.svd(a, full_matrices=False)[:2]  # noqa: E731
        return Timed(fn=fn, output=fn(), flops=0.0)
    omega = inputs["omega"]
    fn = lambda: (a @ omega,)  # noqa: E731
    return Timed(fn=fn, output=fn(), note="Omega precomputed")


def _ours(case: Case, inputs: dict) -> Timed:
    from lowrank_ext import linalg
    from lowrank_ext.ops import svd as svd_ops
    p, a = case.params, inputs["a"]
    op = p["op"]
    if op in ("rsvd", "batched rsvd"):
        return _rsvd_timed(case, inputs, lambda: linalg.rsvd(a, p["k"], p["p"], p["q"], seed=0))
    if op == "jacobi":
        fn = lambda: svd_ops.jacobi_svd(a)  # noqa: E731
        return Timed(fn=fn, output=fn())
    if op == "streaming":
        def stream():
            svd = linalg.StreamingSVD(p["k"])
            for block in a.split(STREAM_BLOCK, dim=1):
                svd.update(block)
            return svd.U, svd.S
        return Timed(fn=stream, output=stream())
    fn = lambda: (svd_ops.gaussian_sketch(a, p["l"], 0),)  # noqa: E731
    return Timed(fn=fn, output=fn())


def _our_list(case: Case, inputs: dict) -> Timed:
    from lowrank_ext.ops import svd as svd_ops
    p, a = case.params, inputs["a"]
    mats = list(a.unbind(0))
    return _rsvd_timed(case, inputs, lambda: svd_ops.batched_rsvd(mats, p["k"], p["p"], p["q"], seed=0))


def _our_loop(case: Case, inputs: dict) -> Timed:
    from lowrank_ext import linalg
    p, a = case.params, inputs["a"]

    def loop():
        outs = [linalg.rsvd(a[i], p["k"], p["p"], p["q"], seed=0) for i in range(a.shape[0])]
        return tuple(torch.stack(t) for t in zip(*outs))
    return _rsvd_timed(case, inputs, loop)


def _linalg(case: Case, inputs: dict) -> Timed:
    p, a = case.params, inputs["a"]
    if a.device.type == "cpu" and p["m"] * p["n"] > _CPU_LINALG_MAX:
        raise SkipProvider(f"torch.linalg.svd of {p['m']}x{p['n']} takes minutes on this CPU; timed up to 2048^2")
    k = p["k"]
    # CUDA: cuSOLVER's QR-iteration gesvd. torch's default picks gesvdj there, whose fp32 factors
    # were 1e-3 to 5e-3 from orthonormal at 2048^2 and up on an H100 (2026-11-25): not the exact
    # answer this row stands for
    driver = {"driver": "gesvd"} if a.is_cuda else {}

    def fn():
        u, s, vh = torch.linalg.svd(a, full_matrices=False, **driver)
        return u[:, :k], s[:k], vh[:k]
    timed = _rsvd_timed(case, inputs, fn)
    timed.flops = 0.0  # another algorithm: the rsvd's FLOP count would misstate its rate
    if driver:
        timed.note += ", driver gesvd"
    return timed


def _randn(case: Case, inputs: dict) -> Timed:
    a, n, l = inputs["a"], case.params["n"], case.params["l"]
    fn = lambda: (a @ torch.randn(n, l, device=a.device),)  # noqa: E731
    return Timed(fn=fn, output=None, note="another Omega: not checked")


def _is(*ops):
    return lambda case: case.params["op"] in ops


def providers(device: torch.device) -> list[Provider]:
    return [
        Provider(REFERENCE_RSVD, "reference", _reference, applies=_is("rsvd")),
        Provider(REFERENCE_LOOP, "reference", _reference, applies=_is("batched rsvd")),
        Provider(REFERENCE_SVD, "reference", _reference, slow=True, applies=_is("jacobi", "streaming")),
        Provider(STORED, "reference", _reference, applies=_is("sketch")),
        Provider(OURS, "ours", _ours),
        Provider(OUR_LIST, "peer", _our_list, applies=_is("batched rsvd"), ours=True),
        Provider(OUR_LOOP, "peer", _our_loop, applies=_is("batched rsvd"), ours=True),
        Provider(LINALG, "peer", _linalg, slow=True, applies=_is("rsvd")),
        Provider(RANDN, "peer", _randn, applies=_is("sketch")),
    ]


def _orthonormal_error(q: torch.Tensor) -> float:
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype)
    return float((q.transpose(-2, -1) @ q - eye).abs().max())


def check(case: Case, inputs: dict, ref_out, out, provider: Provider) -> str | None:
    op = case.params["op"]
    if provider.name == RANDN:
        return None
    if op in ("rsvd", "batched rsvd"):
        u, s, vh = out
        worst = max(_orthonormal_error(u), _orthonormal_error(vh.transpose(-2, -1)))
        if not worst <= 1e-3:
            return f"factors not orthonormal: max |Q^T Q - I| = {worst:.3g}"
        ratio = _error_ratio(case, inputs, out)
        if not ratio <= 1.5:
            return f"error / optimal = {ratio:.3f}"
        return check_close(["S"], [s], [inputs["s"][:case.params["k"]].expand_as(s)], 1e-2)
    if op == "jacobi":
        u, s, vh = out
        recon = (u * s.unsqueeze(-2)) @ vh
        return check_close(["S", "U S Vh"], [s, recon], [ref_out[1], inputs["a"]], 1e-4)
    if op == "streaming":
        k = case.params["k"]
        return check_close(["S"], [out[1][:k]], [ref_out[1][:k]], 1e-3)
    return check_close(["Y"], out, ref_out, 1e-4)


def summary(rows: list[Row], device: torch.device) -> list[str]:
    lines = []
    for key, rs in rows_by_case(rows).items():
        ours = rs.get(OURS)
        if not ours or ours.status != "ok":
            continue
        p = ours.case.params
        parts = [f"{key}: ours {ours.median_s * 1e3:.1f} ms" + (f" ({ours.note})" if ours.note else "")]
        ref = rs.get(REFERENCE_RSVD)
        if ref and ref.status == "ok":
            vs = ref.median_s / ours.median_s
            parts.append(f"{vs:.2f}x faster than torch.svd_lowrank ({ref.note}; target >= {TARGET_VS_SVD_LOWRANK:g}x "
                         f"at equal or lower error: {met(vs >= TARGET_VS_SVD_LOWRANK)})")
        lin = rs.get(LINALG)
        if lin and lin.status == "ok":
            vs = lin.median_s / ours.median_s
            target = device.type == "cuda" and p["m"] == p["n"] == 4096 and p["k"] == 128
            parts.append(f"{vs:.1f}x faster than torch.linalg.svd" + (
                f" (target >= {TARGET_VS_LINALG_GPU:g}x: {met(vs >= TARGET_VS_LINALG_GPU)})"
                if target else ""))
        for name in (REFERENCE_LOOP, OUR_LOOP):
            peer = rs.get(name)
            if peer and peer.status == "ok":
                vs = peer.median_s / ours.median_s
                parts.append(f"batched {vs:.2f}x faster than a {name}"
                             + f" (target >= {TARGET_BATCHED_VS_LOOP:g}x: {met(vs >= TARGET_BATCHED_VS_LOOP)})")
        for name in (REFERENCE_SVD, STORED, RANDN):
            peer = rs.get(name)
            if peer and peer.status == "ok":
                parts.append(f"{peer.median_s / ours.median_s:.2f}x faster than {name}")
        lines.append("; ".join(parts))
    return lines


FAMILY = Family(
    name="svd",
    description="Randomized SVD vs torch.svd_lowrank and torch.linalg.svd, batched rsvd vs loops, the batched Jacobi "
                "SVD vs torch.linalg.svd, the streaming SVD vs one full SVD, the Gaussian sketch vs a stored Omega",
    cases=cases,
    providers=providers,
    make_inputs=make_inputs,
    check=check,
    plot_metric="speedup",
    summary=summary,
    ops=("lowrank::gaussian_sketch", "lowrank::jacobi_svd", "lowrank::rsvd", "lowrank::batched_rsvd",
         "lowrank::svd_update"),
)
