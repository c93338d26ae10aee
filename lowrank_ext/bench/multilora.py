"""Benchmark family `multilora`: one batch of N tokens over many LoRA adapters (S-LoRA / Punica).

Cases (benchmarks/shapes/multilora.csv): a frozen [d, d] linear with `adapters` adapters in a
stack padded to the largest rank; ranks either one value for all or "8-64" (8, 16, 32, 64 in
turn); token ids either ``shuffled`` (each token its own random adapter: decode batches) or
``sequences`` (equal contiguous runs: prefill). ``forward`` is serving (no autograd);
``lora branch`` times the adapter part of that forward alone (shrink + expand added into
one persistent base output, as serving adds into the base GEMM's output: on 2 CPU cores the
base GEMM's own run-to-run noise is larger than the whole branch; before 2026-11-24 each call
added into a fresh copy, whose ~5 ms copy of 64 MB sat in every provider's time); ``fwd+bwd``
trains every adapter at once (grads of x and both stacks).

Providers:

* ``reference``: lowrank_ext.reference's fp64 loop over adapters (slow; the correctness anchor);
* ours, ``lowrank_ext MultiLoRALinear`` (base GEMM + ``lora_shrink`` + ``lora_expand_``);
* ``one adapter for all tokens``: ours with every token on the adapter whose rank is closest
  to the stack's mean (the batch a single-adapter server runs, with the same work per token;
  the issue's target is the mixed batch at <= 1.3x its time on the CPU, 1.15x on an H100);
* ``frozen nn.Linear``: the base layer alone, the floor (not in branch cases);
* ``torch loop``: per adapter, gather its rows, two matmuls, ``index_add_`` into y in place
  (what a PEFT-style layer does per adapter, without PEFT's Python);
* ``PEFT mixed batch``: a real PEFT LoraModel with every adapter loaded, called with
  ``adapter_names`` (one sample per token, x [N, 1, d]); full forward only.

Check: y (and the gradients) against the reference within 1e-4 of their max magnitude (2e-2 in
bf16, as the lora family); the floor and the one-adapter batch compute something else (shape
only). TFLOP/s counts the base GEMM and the LoRA products at each adapter's own rank.
"""
from __future__ import annotations

import torch

from .harness import (Case, Family, Provider, Row, SkipProvider, Timed, check_close, faster, load_shapes, met,
                      rows_by_case)

REFERENCE, OURS, SINGLE, FLOOR = ("reference", "lowrank_ext MultiLoRALinear", "one adapter for all tokens",
                                  "frozen nn.Linear")
LOOP, PEFT = "torch loop", "PEFT mixed batch"
TARGET_VS_SINGLE = {"cpu": 1.3, "cuda": 1.15}
TARGET_VS_LOOP = 4.0
TARGET_ADAPTERS = 64  # the target is stated for a batch mixing 64 adapters


def _ranks(spec: str, adapters: int) -> list[int]:
    if "-" in spec:  # "8-64": powers of two from 8 to 64, in turn
        lo, hi = (int(v) for v in spec.split("-"))
        cycle = [r for r in (8, 16, 32, 64, 128) if lo <= r <= hi]
        return [cycle[i % len(cycle)] for i in range(adapters)]
    return [int(spec)] * adapters


def cases(quick: bool, device: torch.device, dtype: torch.dtype | None) -> list[Case]:
    mode = "quick" if quick else "full"
    out = []
    for r in load_shapes("multilora"):
        if r["mode"] != mode or device.type not in r["devices"].split("|"):
            continue
        n, d, s = int(r["N"]), int(r["d"]), int(r["adapters"])
        dt = dtype or getattr(torch, r["dtype"])
        ranks = _ranks(r["ranks"], s)
        # each token at its adapter's rank (tokens spread evenly over adapters)
        lora_flops = 2.0 * n * 2 * d * sum(ranks) / s
        # backward: the frozen base GEMM adds grad x only (one more GEMM), the adapters add grad x
        # and both stacks' grads (two more of each product)
        bwd = r["op"] == "fwd+bwd"
        base_flops = 0.0 if r["op"] == "lora branch" else (2.0 if bwd else 1.0) * 2.0 * n * d * d
        params = {"op": r["op"], "n": n, "d": d, "adapters": s, "ranks": ranks, "layout": r["layout"], "dtype": dt}
        label = f"N={n} d={d} {s} adapters r={r['ranks']} {r['layout']}"
        out.append(Case(family="multilora", op=r["op"], label=label, params=params, dtype=dt,
                        flops=base_flops + (3.0 if bwd else 1.0) * lora_flops))
    return out


def make_inputs(case: Case, device: torch.device) -> dict:
    p = case.params
    n, d, s, ranks, dt = p["n"], p["d"], p["adapters"], p["ranks"], p["dtype"]
    g = torch.Generator(device="cpu").manual_seed(0)
    max_rank = max(ranks)
    a = torch.zeros(s, max_rank, d)
    b = torch.zeros(s, d, max_rank)
    for i, rk in enumerate(ranks):
        a[i, :rk] = torch.randn(rk, d, generator=g) * d ** -0.5
        b[i, :, :rk] = torch.randn(d, rk, generator=g) * rk ** -0.5
    if p["layout"] == "shuffled":
        ids = torch.randint(0, s, (n,), generator=g)
    else:  # equal contiguous runs, one per sequence
        ids = torch.arange(n) * s // n
    inputs = {"x": torch.randn(n, d, generator=g).to(device, dt), "w": (torch.randn(d, d, generator=g) * d ** -0.5)
              .to(device, dt), "bias": torch.zeros(d, device=device, dtype=dt), "a": a.to(device, dt),
              "b": b.to(device, dt), "ids": ids.to(device), "ranks": torch.tensor(ranks, device=device),
              "scales": torch.full((s,), 2.0, device=device), "g": torch.randn(n, d, generator=g).to(device, dt)}
    if p["op"] == "lora branch":  # the base output the branch is added to
        inputs["base_out"] = torch.nn.functional.linear(inputs["x"], inputs["w"], inputs["bias"])
    return inputs


def _timed(case: Case, inputs: dict, forward, branch=None) -> Timed:
    """forward(x, a, b) -> y; fwd+bwd cases also take the grads of x, a and b; "lora branch"
    cases run branch(y), adding into one persistent output when timed (the output checked is
    a fresh copy's)."""
    if case.params["op"] == "lora branch":
        def add_fresh():
            with torch.no_grad():
                return (branch(inputs["base_out"].clone()),)
        into = inputs["base_out"].clone()

        def add_into():  # values grow by one branch per call: timing only
            with torch.no_grad():
                branch(into)
        return Timed(fn=add_into, output=add_fresh())
    if case.params["op"] == "forward":
        def run():
            with torch.no_grad():
                return (forward(inputs["x"], inputs["a"], inputs["b"]),)
        return Timed(fn=run, output=run())
    x, a, b = (inputs[k].clone().requires_grad_(True) for k in ("x", "a", "b"))

    def step():
        y = forward(x, a, b)
        return (y.detach(), *torch.autograd.grad(y, [x, a, b], inputs["g"]))
    return Timed(fn=step, output=step())


def _reference(case: Case, inputs: dict) -> Timed:
    from lowrank_ext.reference.multilora import lora_expand_ref, lora_shrink_ref, multi_lora_linear_ref
    ids, ranks, scales = inputs["ids"], inputs["ranks"], inputs["scales"]

    def fwd(x, a, b):
        return multi_lora_linear_ref(x, inputs["w"], inputs["bias"], a, b, ids, ranks, scales)

    def branch(y):
        return lora_expand_ref(y, lora_shrink_ref(inputs["x"], inputs["a"], ids, ranks, scales), inputs["b"], ids,
                               ranks)
    return _timed(case, inputs, fwd, branch)


def _ours(case: Case, inputs: dict, ids_key: str = "ids") -> Timed:
    from lowrank_ext.ops.multilora import lora_expand_, lora_shrink, multi_lora_linear
    ids, ranks, scales = inputs[ids_key], inputs["ranks"], inputs["scales"]

    def fwd(x, a, b):
        return multi_lora_linear(x, inputs["w"], inputs["bias"], a, b, ids, ranks, scales)

    def branch(y):
        lora_expand_(y, lora_shrink(inputs["x"], inputs["a"], ids, ranks, scales), inputs["b"], ids, ranks)
        return y
    return _timed(case, inputs, fwd, branch)


def _single(case: Case, inputs: dict) -> Timed:
    # the adapter whose rank is closest to the batch's mean: the same work per token
    ranks = case.params["ranks"]
    mean = sum(ranks) / len(ranks)
    pick = min(range(len(ranks)), key=lambda i: abs(ranks[i] - mean))
    inputs["ids0"] = torch.full_like(inputs["ids"], pick)
    timed = _ours(case, inputs, "ids0")
    timed.note = f"rank {ranks[pick]}"
    return timed


def _floor(case: Case, inputs: dict) -> Timed:
    n, d = case.params["n"], case.params["d"]

    def fwd(x, a, b):
        return torch.nn.functional.linear(x, inputs["w"], inputs["bias"])
    if case.params["op"] == "forward":
        timed = _timed(case, inputs, fwd)
        timed.flops = 2.0 * n * d * d  # the base GEMM alone: its own rate
        return timed
    x = inputs["x"].clone().requires_grad_(True)

    def step():
        y = fwd(x, None, None)
        return (y.detach(), *torch.autograd.grad(y, [x], inputs["g"]))
    return Timed(fn=step, output=step(), flops=4.0 * n * d * d)


def _loop(case: Case, inputs: dict) -> Timed:
    ids, ranks, scales = inputs["ids"], inputs["ranks"].tolist(), inputs["scales"].tolist()
    # the groups are found once per call, as a layer would (one host sync per call, like PEFT's)

    def branch(y, x=inputs["x"], a=inputs["a"], b=inputs["b"]):
        for i in torch.unique(ids).tolist():
            rows = (ids == i).nonzero().squeeze(1)
            rk = ranks[i]
            y.index_add_(0, rows, (x[rows] @ a[i, :rk].t()) @ b[i, :, :rk].t(), alpha=scales[i])
        return y

    def fwd(x, a, b):
        return branch(torch.nn.functional.linear(x, inputs["w"], inputs["bias"]), x, a, b)
    return _timed(case, inputs, fwd, branch)


def _peft(case: Case, inputs: dict) -> Timed:
    from . import peers
    mod, why = peers.load("peft")
    if mod is None:
        raise SkipProvider(why)
    if case.params["op"] != "forward":
        raise SkipProvider("PEFT's mixed-batch forward is for inference")
    n, d, s, ranks = (case.params[k] for k in ("n", "d", "adapters", "ranks"))
    dev, dt = inputs["x"].device, inputs["x"].dtype
    base = torch.nn.Linear(d, d, device=dev, dtype=dt)
    with torch.no_grad():
        base.weight.copy_(inputs["w"])
        base.bias.copy_(inputs["bias"])
    model = None
    for i, rk in enumerate(ranks):
        cfg = mod.LoraConfig(r=rk, lora_alpha=2 * rk, target_modules=["0"])
        if model is None:
            model = mod.get_peft_model(torch.nn.Sequential(base), cfg, adapter_name="a0")
        else:
            model.add_adapter(f"a{i}", cfg)
        layer = model.base_model.model[0]
        with torch.no_grad():
            layer.lora_A[f"a{i}"].weight.copy_(inputs["a"][i, :rk])
            layer.lora_B[f"a{i}"].weight.copy_(inputs["b"][i, :, :rk])
    model.eval()
    names = [f"a{i}" for i in inputs["ids"].tolist()]
    x3 = inputs["x"].unsqueeze(1)  # one sample per token: PEFT picks adapters per sample

    def run():
        with torch.no_grad():
            return (model(x3, adapter_names=names).squeeze(1),)
    return Timed(fn=run, output=run(), note="x as [N, 1, d], adapter_names per token")


def providers(device: torch.device) -> list[Provider]:
    return [
        Provider(REFERENCE, "reference", _reference, slow=True),
        Provider(OURS, "ours", _ours),
        Provider(SINGLE, "peer", _single, ours=True),
        Provider(FLOOR, "peer", _floor, applies=lambda c: c.params["op"] != "lora branch"),
        Provider(LOOP, "peer", _loop),
        Provider(PEFT, "peer", _peft, peer="peft", applies=lambda c: c.params["op"] == "forward"),
    ]


def check(case: Case, inputs: dict, ref_out, out, provider: Provider) -> str | None:
    names = ["y", "grad x", "grad a", "grad b"][:len(out)]
    if provider.name in (SINGLE, FLOOR):  # other computations: shapes only
        return check_close(names, out, ref_out[:len(out)], float("inf"))
    # fp32: 1e-4 of the max; bf16 (the CUDA cases): as the lora family, a few units in the last
    # place of y's largest entries (one bf16 ulp there is 2^-8 of it)
    return check_close(names, out, ref_out, 1e-4 if case.params["dtype"] == torch.float32 else 2e-2)


def _ms(row: Row) -> str:
    return f"{row.median_s * 1e3:.1f} ms"


def summary(rows: list[Row], device: torch.device) -> list[str]:
    target_single = TARGET_VS_SINGLE.get(device.type, TARGET_VS_SINGLE["cuda"])
    lines = []
    for key, rs in rows_by_case(rows).items():
        ours = rs.get(OURS)
        if not ours or ours.status != "ok":
            continue
        case = ours.case
        parts = [f"{key}: ours {_ms(ours)} = {case.params['n'] / ours.median_s:,.0f} tokens/s"]
        single = rs.get(SINGLE)
        if single and single.status == "ok":
            vs = ours.median_s / single.median_s
            target = f" (target <= {target_single:g}x at {TARGET_ADAPTERS} adapters: {met(vs <= target_single)})" \
                if case.params["adapters"] == TARGET_ADAPTERS else ""
            parts.append(f"{vs:.2f}x the one-adapter batch's time{target}")
        for name in (LOOP, PEFT):  # the issue's >= 4x is stated against the per-adapter loop only
            text = faster(ours, rs.get(name), name, TARGET_VS_LOOP if name == LOOP else None)
            if text:
                parts.append(text)
        lines.append("; ".join(parts))
    return lines


FAMILY = Family(
    name="multilora",
    description="Many LoRA adapters in one batch (S-LoRA / Punica): MultiLoRALinear vs a one-adapter batch, the "
                "frozen linear, a per-adapter torch loop and PEFT's mixed-batch forward",
    cases=cases,
    providers=providers,
    make_inputs=make_inputs,
    check=check,
    plot_metric="TFLOP/s",
    summary=summary,
    ops=("lowrank::lora_shrink", "lowrank::lora_expand_", "lowrank::lora_expand", "lowrank::lora_grouped_outer"),
)
