"""Benchmark family `monarch`: the Monarch product y = P L P R x, forward and forward + backward.

Cases (benchmarks/shapes/monarch.csv): x [N, d], square blocks of size bs = d / nblocks;
ops ``fwd`` / ``fwd+bwd`` of the Monarch product and ``blockdiag fwd+bwd`` of one factor
(the BOFT/Bone-style op; its providers do the one-factor version of each product below).
Providers, each on the same x, w1, w2 (and g for fwd+bwd: grads of x, w1 and w2):

* ``reference (bmm)``       plain PyTorch in the compute dtype: bmm, transpose, contiguous
                            copy, bmm, permute (HazyResearch's blockdiag_butterfly_multiply);
                            autograd through those ops
* ``lowrank_ext``           lowrank_ext.ops.monarch.monarch (saves R x for backward)
* ``dense nn.Linear``       F.linear with a dense [d, d] weight (grads of x and the weight)
* ``same-size GEMMs``       the FLOP-rate yardstick: plain GEMMs [N*nblocks, bs] x [bs, bs]
                            doing exactly the Monarch FLOPs (2 for fwd; 6 for fwd+bwd: the
                            forward's 2, 2 input-gradient and 2 weight-gradient GEMMs; half
                            that for blockdiag), no permutation: this time / ours is the
                            fraction of that FLOP rate reached

Check: y and the grads against the reference's within 1e-4 (fp32) / 3e-2 (bf16) of their
max magnitude. Throughput: TFLOP/s over the Monarch FLOPs (2 N d bs per stage, x3 with backward).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .harness import Case, Family, Provider, Row, Timed, check_close, load_shapes, rows_by_case, met

REFERENCE, OURS, DENSE, GEMMS = "reference (bmm)", "lowrank_ext", "dense nn.Linear", "same-size GEMMs"
TARGET_VS_REFERENCE = 1.5
CPU_TARGET_FLOP_RATE = 0.8
CUDA_TARGET_VS_DENSE = 1.8  # d = 4096, nblocks = 4, fwd+bwd
_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def cases(quick: bool, device: torch.device, dtype: torch.dtype | None) -> list[Case]:
    mode = "quick" if quick else "full"
    out = []
    for r in load_shapes("monarch"):
        if r["mode"] != mode or device.type not in r["devices"].split("|"):
            continue
        dt = dtype or getattr(torch, r["dtype"])
        n, d, nb, op = int(r["N"]), int(r["d"]), int(r["nblocks"]), r["op"]
        backward, factors = op.endswith("fwd+bwd"), 1 if op.startswith("blockdiag") else 2
        flops = factors * 2.0 * n * d * (d // nb) * (3 if backward else 1)
        out.append(Case(family="monarch", op=op, label=f"N={n} d={d} nblocks={nb} {_SHORT.get(dt, dt)}",
                        params={"n": n, "d": d, "nb": nb, "dtype": dt, "backward": backward, "factors": factors},
                        dtype=dt, flops=flops))
    return out


def make_inputs(case: Case, device: torch.device) -> dict:
    n, d, nb, dt = (case.params[k] for k in ("n", "d", "nb", "dtype"))
    bs = d // nb
    g = torch.Generator(device=device).manual_seed(0)

    def draw(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, device=device) * std).to(dt)
    return {"x": draw(n, d), "w1": draw(nb, bs, bs, std=bs ** -0.5), "w2": draw(nb, bs, bs, std=bs ** -0.5),
            "g": draw(n, d)}


def _timed(case: Case, inputs: dict, forward, wrt: list[torch.Tensor]) -> Timed:
    if not case.params["backward"]:
        with torch.no_grad():
            return Timed(fn=forward, output=(forward(),))
    g = inputs["g"]

    def step():
        y = forward()
        return (y.detach(), *torch.autograd.grad(y, wrt, g))
    return Timed(fn=step, output=step())


def _leaves(case: Case, inputs: dict):
    need = case.params["backward"]
    return tuple(inputs[k].clone().requires_grad_(need) for k in ("x", "w1", "w2"))


def _reference(case: Case, inputs: dict) -> Timed:
    from lowrank_ext.reference.monarch import _stage1, _stage2
    x, w1, w2 = _leaves(case, inputs)
    if case.params["factors"] == 1:
        return _timed(case, inputs, lambda: _stage1(x, w1), [x, w1])
    return _timed(case, inputs, lambda: _stage2(_stage1(x, w1), w2), [x, w1, w2])


def _ours(case: Case, inputs: dict) -> Timed:
    from lowrank_ext.ops.monarch import blockdiag, monarch
    x, w1, w2 = _leaves(case, inputs)
    if case.params["factors"] == 1:
        return _timed(case, inputs, lambda: blockdiag(x, w1), [x, w1])
    return _timed(case, inputs, lambda: monarch(x, w1, w2), [x, w1, w2])


def _dense(case: Case, inputs: dict) -> Timed:
    d = case.params["d"]
    x = inputs["x"].clone().requires_grad_(case.params["backward"])
    w = (torch.randn(d, d, device=x.device) * d ** -0.5).to(x.dtype).requires_grad_(case.params["backward"])
    timed = _timed(case, inputs, lambda: F.linear(x, w), [x, w])
    n = case.params["n"]
    timed.flops = 2.0 * n * d * d * (3 if case.params["backward"] else 1)  # its own rate, not Monarch's
    return timed


def _gemms(case: Case, inputs: dict) -> Timed:
    n, d, nb, factors = (case.params[k] for k in ("n", "d", "nb", "factors"))
    bs = d // nb
    a = inputs["x"].reshape(n * nb, bs)
    w = inputs["w1"][0].contiguous()
    c1, c2, wg = torch.empty_like(a), torch.empty_like(a), torch.empty_like(w)

    def run():  # one [N*nblocks, bs] x [bs, bs] GEMM (or its weight-gradient form) per factor and pass
        torch.mm(a, w.t(), out=c1)
        if factors == 2:
            torch.mm(c1, w, out=c2)
        if case.params["backward"]:
            torch.mm(a, w, out=c1)
            torch.mm(c1.t(), a, out=wg)
            if factors == 2:
                torch.mm(c1, w.t(), out=c2)
                torch.mm(c2.t(), a, out=wg)
        return (c1,)
    return Timed(fn=run, output=None, note="FLOP-rate yardstick")


def providers(device: torch.device) -> list[Provider]:
    return [
        Provider(REFERENCE, "reference", _reference, slow=True),
        Provider(OURS, "ours", _ours),
        Provider(DENSE, "peer", _dense, slow=True),
        Provider(GEMMS, "peer", _gemms),
    ]


def check(case: Case, inputs: dict, ref_out, out, provider: Provider) -> str | None:
    if provider.name in (DENSE, GEMMS):
        return None  # other products: timed for comparison only
    tol = 1e-4 if case.params["dtype"] == torch.float32 else 3e-2
    return check_close(("y", "grad x", "grad w1", "grad w2"), out, ref_out, tol)


def summary(rows: list[Row], device: torch.device) -> list[str]:
    lines = []
    for key, rs in rows_by_case(rows).items():
        ours, ref, dense, gemms = (rs.get(k) for k in (OURS, REFERENCE, DENSE, GEMMS))
        if not ours or ours.status != "ok":
            continue
        p = ours.case.params
        parts = [f"{key}: ours {ours.median_s * 1e3:.2f} ms"]
        if ref and ref.status == "ok":
            vs = ref.median_s / ours.median_s
            parts.append(f"{vs:.2f}x faster than the bmm reference (target >= {TARGET_VS_REFERENCE:g}x: "
                         f"{met(vs >= TARGET_VS_REFERENCE)})")
        if gemms and gemms.status == "ok":
            frac = gemms.median_s / ours.median_s
            parts.append(f"{frac:.0%} of the same-size GEMMs' FLOP rate" + (
                f" (CPU target >= {CPU_TARGET_FLOP_RATE:.0%}: {met(frac >= CPU_TARGET_FLOP_RATE)})"
                if device.type == "cpu" else ""))
        if dense and dense.status == "ok":
            vs = dense.median_s / ours.median_s
            target = (device.type == "cuda" and p["backward"] and p["d"] == 4096 and p["nb"] == 4)
            parts.append(f"{vs:.2f}x faster than dense" + (
                f" (target >= {CUDA_TARGET_VS_DENSE:g}x: {met(vs >= CUDA_TARGET_VS_DENSE)})"
                if target else ""))
        lines.append("; ".join(parts))
    return lines


FAMILY = Family(
    name="monarch",
    description="Monarch product y = P L P R x, fwd and fwd+bwd: lowrank_ext vs the plain-PyTorch bmm reference, "
                "a dense nn.Linear of the same size and same-size GEMMs (the FLOP-rate yardstick)",
    cases=cases,
    providers=providers,
    make_inputs=make_inputs,
    check=check,
    plot_metric="speedup",
    summary=summary,
    ops=("lowrank::monarch_forward", "lowrank::monarch_backward", "lowrank::blockdiag_forward",
         "lowrank::blockdiag_backward"),
)
