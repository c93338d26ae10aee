"""Benchmark family `lora`: forward + backward of one LoRA linear layer.

Cases (benchmarks/shapes/lora.csv): x [N, d] -> y [N, d] (d_in = d_out = d), rank r,
dropout p on the LoRA branch, alpha = 2r; the timed call is ``y = layer(x)`` then
``torch.autograd.grad(y, [x, A, B], g)`` (x requires grad, as inside a network; the base
weight is frozen). Providers, each on the same x, W, b, A, B and g:

* ``reference (unfused)``   plain PyTorch: x W^T + b + s * ((x * mask) A^T) B^T with the
                            Philox mask of lowrank_ext.reference (materialised)
* ``lowrank_ext``           lowrank_ext.ops.lora.lora_linear (the fused ops)
* ``frozen nn.Linear``      F.linear alone, grads of x only: the floor
* ``PEFT LoRA``             peft.tuners.lora.layer.Linear in train mode (torch dropout)

Check: y and the grads of x, A and B against the reference's, within 1e-4 (fp32) / 2e-2
(bf16) of their max magnitude. PEFT draws its own dropout mask: checked only at p = 0;
the frozen linear only for shapes. Each row's note gives the activation bytes its
autograd graph saves (every saved tensor except the frozen weight and the adapters,
counted once per storage), the number the issue's memory target is about.
Throughput: TFLOP/s over the frozen layer's 4 N d^2 FLOPs (forward + grad of x), so
% of peak reads as the base GEMMs' efficiency.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import peers
from .harness import (Case, Family, Provider, Row, SkipProvider, Timed, check_close, load_shapes, met, rows_by_case,
                      saved_bytes)

SEED = 1234
REFERENCE, OURS, FROZEN, PEFT = "reference (unfused)", "lowrank_ext", "frozen nn.Linear", "PEFT LoRA"
CPU_TARGET_VS_PEFT = 1.3
CUDA_TARGET_VS_FROZEN, CUDA_TARGET_VS_PEFT = 1.10, 1.3
_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def cases(quick: bool, device: torch.device, dtype: torch.dtype | None) -> list[Case]:
    mode = "quick" if quick else "full"
    out = []
    for r in load_shapes("lora"):
        if r["mode"] != mode or device.type not in r["devices"].split("|"):
            continue
        dt = dtype or getattr(torch, r["dtype"])
        n, d, rank, p = int(r["N"]), int(r["d"]), int(r["r"]), float(r["p"])
        out.append(Case(family="lora", op="fwd+bwd", label=f"N={n} d={d} r={rank} p={p:g} {_SHORT.get(dt, dt)}",
                        params={"n": n, "d": d, "r": rank, "p": p, "dtype": dt}, dtype=dt,
                        flops=4.0 * n * d * d))
    return out


def make_inputs(case: Case, device: torch.device) -> dict:
    from lowrank_ext.reference.lora import lora_dropout_mask_ref
    n, d, r, p, dt = (case.params[k] for k in ("n", "d", "r", "p", "dtype"))
    g = torch.Generator(device=device).manual_seed(0)

    def draw(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, device=device) * std).to(dt)

    inputs = {"x": draw(n, d), "w": draw(d, d, std=d ** -0.5), "b": draw(d, std=0.1),
              "a": draw(r, d, std=d ** -0.5), "bb": draw(d, r, std=r ** -0.5), "g": draw(n, d),
              "scale": 2.0, "p": p}
    inputs["mask"] = lora_dropout_mask_ref(SEED, n, d, p).to(device=device, dtype=dt) if p > 0 else None
    return inputs


def _timed(inputs: dict, forward, wrt: list[torch.Tensor], frozen: list[torch.Tensor]) -> Timed:
    g = inputs["g"]

    def step():
        y = forward()
        return (y.detach(), *torch.autograd.grad(y, wrt, g))

    out = step()
    saved = saved_bytes(forward, frozen)
    return Timed(fn=step, output=out, note=f"saves {saved / 2 ** 20:.1f} MiB")


def _leaves(inputs: dict):
    x = inputs["x"].clone().requires_grad_(True)
    a = inputs["a"].clone().requires_grad_(True)
    bb = inputs["bb"].clone().requires_grad_(True)
    return x, a, bb


def _reference(case: Case, inputs: dict) -> Timed:
    x, a, bb = _leaves(inputs)
    w, b, s, mask = inputs["w"], inputs["b"], inputs["scale"], inputs["mask"]

    def forward():
        dropped = x * mask if mask is not None else x
        return F.linear(x, w, b) + s * F.linear(F.linear(dropped, a), bb)
    return _timed(inputs, forward, [x, a, bb], [w, b, a, bb])


def _ours(case: Case, inputs: dict) -> Timed:
    from lowrank_ext.ops.lora import lora_linear
    x, a, bb = _leaves(inputs)
    w, b, s, p = inputs["w"], inputs["b"], inputs["scale"], inputs["p"]

    def forward():
        return lora_linear(x, w, b, a, bb, scale=s, dropout_p=p, seed=SEED)
    return _timed(inputs, forward, [x, a, bb], [w, b, a, bb])


def _frozen(case: Case, inputs: dict) -> Timed:
    x = inputs["x"].clone().requires_grad_(True)
    w, b = inputs["w"], inputs["b"]
    return _timed(inputs, lambda: F.linear(x, w, b), [x], [w, b])


def _peft(case: Case, inputs: dict) -> Timed:
    mod, why = peers.load("peft")
    if mod is None:
        raise SkipProvider(why)
    d, r = case.params["d"], case.params["r"]
    base = torch.nn.Linear(d, d, device=inputs["x"].device, dtype=inputs["x"].dtype)
    with torch.no_grad():
        base.weight.copy_(inputs["w"])
        base.bias.copy_(inputs["b"])
    config = mod.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=inputs["p"], target_modules=["0"])
    model = mod.get_peft_model(torch.nn.Sequential(base), config)
    layer = model.base_model.model[0]         # peft.tuners.lora.layer.Linear around `base`
    layer.to(device=inputs["x"].device, dtype=inputs["x"].dtype).train()
    a, bb = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        a.copy_(inputs["a"])
        bb.copy_(inputs["bb"])
    x = inputs["x"].clone().requires_grad_(True)
    return _timed(inputs, lambda: layer(x), [x, a, bb], [base.weight, base.bias, a, bb])


def providers(device: torch.device) -> list[Provider]:
    return [
        Provider(REFERENCE, "reference", _reference),
        Provider(OURS, "ours", _ours),
        Provider(FROZEN, "peer", _frozen),
        Provider(PEFT, "peer", _peft, peer="peft"),
    ]


def check(case: Case, inputs: dict, ref_out, out, provider: Provider) -> str | None:
    if provider.name == FROZEN or (provider.name == PEFT and case.params["p"] > 0):
        ref_out, out = ref_out[:2], out[:2]    # y and grad x: shapes only (no or another mask)
        for i, (o, r) in enumerate(zip(out, ref_out)):
            if o.shape != r.shape or not bool(torch.isfinite(o).all()):
                return f"output {i}: shape {tuple(o.shape)} vs {tuple(r.shape)}, or non-finite"
        return None
    tol = 1e-4 if case.params["dtype"] == torch.float32 else 2e-2
    return check_close(("y", "grad x", "grad A", "grad B"), out, ref_out, tol)


def summary(rows: list[Row], device: torch.device) -> list[str]:
    lines = []
    for key, rs in rows_by_case(rows).items():
        ours, peft, frozen = rs.get(OURS), rs.get(PEFT), rs.get(FROZEN)
        if not ours or ours.status != "ok":
            continue
        case = ours.case
        parts = [f"{case.label}: ours {ours.median_s * 1e3:.2f} ms"]
        if frozen and frozen.status == "ok":
            vs_frozen = ours.median_s / frozen.median_s
            # the GPU target (H100, bf16, N = 8192, d = 4096, r = 16) is stated for every GPU case
            target = (f" (GPU target <= {CUDA_TARGET_VS_FROZEN:g}x: {met(vs_frozen <= CUDA_TARGET_VS_FROZEN)})"
                      if device.type == "cuda" else "")
            parts.append(f"{vs_frozen:.2f}x the frozen linear{target}")
        if peft and peft.status == "ok":
            vs = peft.median_s / ours.median_s
            target = CPU_TARGET_VS_PEFT if device.type == "cpu" else CUDA_TARGET_VS_PEFT
            parts.append(f"{vs:.2f}x faster than PEFT" + (f" (target >= {target:g}x with p > 0: "
                                                          f"{met(vs >= target)})"
                                                          if case.params["p"] > 0 else ""))
        parts.append(f"{ours.note} vs PEFT {peft.note if peft else '?'}")
        lines.append("; ".join(parts))
    return lines


FAMILY = Family(
    name="lora",
    description="LoRA linear forward + backward: lowrank_ext fused ops vs the unfused reference, "
                "PEFT's LoRA and the frozen nn.Linear alone (the floor)",
    cases=cases,
    providers=providers,
    make_inputs=make_inputs,
    check=check,
    plot_metric="speedup",
    summary=summary,
    ops=("lowrank::lora_forward", "lowrank::lora_backward", "lowrank::lora_merge_"),
)
