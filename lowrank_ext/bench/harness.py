"""Generic benchmark machinery shared by every family.

A family module (``lowrank_ext/bench/<family>.py``) exposes ``FAMILY = Family(...)``:
its cases (what to run, with the bytes/FLOPs that define the throughput metric), its
providers (ours, the pure-PyTorch reference, peers), how to build inputs, and how to
check a provider's output against the reference's. This module does the rest, the same
way for every family:

1. For each case, build inputs once and run the reference provider to get the oracle.
2. For each provider: set it up, run it once, check the output (a mismatch marks the row
   FAILED, it is not timed, and the run exits non-zero at the end).
3. Time it with ``torch.utils.benchmark.Timer`` (it synchronises the accelerator around
   each block of calls and runs with all CPU threads here): warm-up calls, then
   ``adaptive_autorange`` until the IQR is within 5% of the median or the time budget is
   spent. We report the median and IQR.
4. Derive GB/s, TFLOP/s, fraction of the device's peak (``device.py``), speed-up vs the
   reference and vs every peer of the same case; print a markdown table, write JSON,
   markdown and a PNG plot under the results directory.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.benchmark import Timer

from . import device as _device
from . import peers as _peers

ProviderKind = Literal["ours", "reference", "peer"]
REPO_ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- model

@dataclass
class Case:
    """One thing to time: an op on one shape/config, the same for every provider."""
    family: str
    op: str                         # e.g. "quantize", "roundtrip"
    label: str                      # shape/config label shown in tables, e.g. "64M fp32 8b bs256"
    params: dict[str, Any]          # everything the family needs to build inputs and call ops
    dtype: torch.dtype = torch.float32   # compute dtype: picks the FLOP/s peak
    bytes: float | None = None      # bytes read + written by an ideal kernel -> GB/s
    flops: float | None = None      # useful floating-point operations -> TFLOP/s
    # Further named throughput metrics (column name -> bytes), e.g. the quant family's
    # "in GB/s" = input bytes / time, the form its performance targets are stated in.
    extra_bytes: dict[str, float] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.op} {self.label}"


class SkipProvider(Exception):
    """Raised by a provider's setup when it does not apply to a case; the message says why."""


@dataclass
class Timed:
    """What a provider's setup returns: the zero-argument callable to time and,
    optionally, the output to check (else the harness checks ``fn()``'s return value)."""
    fn: Callable[[], Any]
    output: Any = None
    note: str = ""                  # shown in the table, e.g. "nf4 code"
    # this provider's own FLOP count where it does other work than the case's (a dense GEMM
    # beside a structured one, a full SVD beside a truncated one); 0: none (no FLOP rate)
    flops: float | None = None
    bytes: float | None = None      # the same for the bytes an ideal kernel of its work moves


@dataclass
class Provider:
    name: str
    kind: ProviderKind
    setup: Callable[[Case, Any], Timed]     # (case, inputs) -> Timed; may raise SkipProvider
    peer: str | None = None   # a peers.py name: if it cannot be imported the provider is skipped
    slow: bool = False        # pure-PyTorch references: time with a small budget
    # Cases this provider is meant for (None: all). A case it does not apply to gets no
    # row at all, unlike SkipProvider, which reports that it *could* not run here.
    applies: Callable[[Case], bool] | None = None
    # a variant of this library's own code listed among the peers (a list API, a loop of our
    # ops): an exception there is a failure, not a peer skipped
    ours: bool = False

    def applies_to(self, case: Case) -> bool:
        return self.applies is None or self.applies(case)


@dataclass
class Row:
    case: Case
    provider: str
    kind: ProviderKind
    status: Literal["ok", "FAILED", "skipped"] = "ok"
    message: str = ""
    note: str = ""
    median_s: float | None = None
    iqr_s: float | None = None
    samples: int = 0
    times_s: list[float] = field(default_factory=list)   # per-call time of each timed block
    gbs: float | None = None
    tflops: float | None = None
    extra_gbs: dict[str, float] = field(default_factory=dict)
    frac_peak: float | None = None
    flops: float | None = None               # Timed.flops: overrides the case's
    bytes: float | None = None               # Timed.bytes: overrides the case's
    vs_ref: float | None = None              # reference time / this time (>1: faster)
    vs_peer: dict[str, float] = field(default_factory=dict)   # peer time / this time
    profile: list[dict[str, Any]] = field(default_factory=list)  # --profile: top ops / kernels per call


@dataclass
class Family:
    name: str
    description: str
    cases: Callable[[bool, torch.device, torch.dtype | None], list[Case]]
    providers: Callable[[torch.device], list[Provider]]
    make_inputs: Callable[[Case, torch.device], Any]
    # (case, inputs, reference output, provider output, provider) -> None if OK, else why not
    check: Callable[[Case, Any, Any, Any, Provider], str | None]
    plot_metric: Literal["GB/s", "TFLOP/s", "speedup"] = "GB/s"
    # Extra lines under the table (e.g. progress against the targets).
    summary: Callable[[list[Row], torch.device], list[str]] | None = None
    # Qualified names of the torch.ops.lowrank ops the family benchmarks,
    # e.g. "lowrank::quantize_blockwise".
    ops: tuple[str, ...] = ()


@dataclass
class RunConfig:
    device: torch.device
    quick: bool = False
    dtype: torch.dtype | None = None
    out_dir: Path = Path("benchmarks/results")
    providers: Sequence[str] | None = None   # only these provider names (None: all)
    plot: bool = True
    progress: bool = True
    profile: bool = False   # our providers' calls under torch.profiler too (a table per family)

    @property
    def min_run_time(self) -> float:
        return 0.1 if self.quick else 0.5

    @property
    def max_run_time(self) -> float:
        return 0.5 if self.quick else 3.0


# ----------------------------------------------------------------------------- helpers

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_close(names, outs, refs, tol: float) -> str | None:
    """None if every output is within ``tol * max |ref|`` of its reference (max abs error),
    else why not: the families' common correctness check."""
    for name, o, r in zip(names, outs, refs):
        if o.shape != r.shape:
            return f"{name}: shape {tuple(o.shape)} vs {tuple(r.shape)}"
        scale = float(r.double().abs().max()) if r.numel() else 0.0
        scale = scale or 1.0
        err = float((o.double() - r.double()).abs().max()) if r.numel() else 0.0
        if not err <= tol * scale:
            return f"{name}: max error {err:.3g} > {tol:g} * max |ref| {scale:.3g}"
    return None


def _dense_parts(t: torch.Tensor) -> list[torch.Tensor]:
    """The strided tensors holding `t`'s data (a sparse tensor's indices and values)."""
    if t.layout == torch.sparse_coo:
        return [t._indices(), t._values()]
    if t.layout in (torch.sparse_csr, torch.sparse_bsr):
        return [t.crow_indices(), t.col_indices(), t.values()]
    if t.layout in (torch.sparse_csc, torch.sparse_bsc):
        return [t.ccol_indices(), t.row_indices(), t.values()]
    return [t]


def saved_bytes(run, frozen: list[torch.Tensor]) -> int:
    """Bytes of the activations `run()`'s autograd graph saves (frozen weights and adapter
    parameters excluded, each storage once; sparse tensors by their indices and values)."""
    skip = {p.untyped_storage().data_ptr() for t in frozen for p in _dense_parts(t)}
    seen: dict[int, int] = {}

    def pack(t):
        for part in _dense_parts(t):
            ptr = part.untyped_storage().data_ptr()
            if ptr not in skip:
                seen[ptr] = max(seen.get(ptr, 0), part.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


def rows_by_case(rows: list[Row]) -> dict[str, dict[str, Row]]:
    """Rows grouped by case key, then by provider name: what the families' summaries read."""
    by_case: dict[str, dict[str, Row]] = {}
    for r in rows:
        by_case.setdefault(r.case.key, {})[r.provider] = r
    return by_case


def met(ok: bool) -> str:
    """How summary lines report a target."""
    return "met" if ok else "NOT met"


def faster(ours: Row, peer: Row | None, name: str, target: float | None = None) -> str | None:
    """"{peer / ours}x faster than {name}", with the target and whether it is met; None when
    the peer has no timing."""
    if not peer or peer.status != "ok" or not peer.median_s or not ours.median_s:
        return None
    vs = peer.median_s / ours.median_s
    return f"{vs:.2f}x faster than {name}" + (f" (target >= {target:g}x: {met(vs >= target)})" if target else "")


def load_shapes(family: str) -> list[dict[str, str]]:
    """Rows of ``benchmarks/shapes/<family>.csv`` ('#' lines are comments).

    Looked up in $LOWRANK_BENCH_SHAPES, then the source checkout, then ./benchmarks/shapes,
    so an installed package still finds the shapes when run from a checkout."""
    candidates = [Path(p) for p in [os.environ.get("LOWRANK_BENCH_SHAPES", "")] if p]
    candidates += [REPO_ROOT / "benchmarks" / "shapes", Path.cwd() / "benchmarks" / "shapes"]
    for d in candidates:
        path = d / f"{family}.csv"
        if path.is_file():
            with path.open(newline="") as f:
                lines = [ln for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
            return [{k: (v or "").strip() for k, v in r.items()} for r in csv.DictReader(lines)]
    raise FileNotFoundError(
        f"no {family}.csv in any of {[str(c) for c in candidates]} "
        "(set LOWRANK_BENCH_SHAPES to the benchmarks/shapes folder)")


def git_commit() -> str:
    """HEAD, with "-dirty" when tracked files differ from it (a copied working tree), or
    LOWRANK_EXT_COMMIT where set: a working tree copied to another machine may carry a stale
    .git (the GPU machines' copies did), so the caller names the commit it sent."""
    if os.environ.get("LOWRANK_EXT_COMMIT"):
        return os.environ["LOWRANK_EXT_COMMIT"]
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def build_info() -> dict[str, Any] | str:
    try:
        import lowrank_ext
        return dict(lowrank_ext.build_info())
    except Exception as e:  # not built yet, or a stale build: record why, still benchmark
        return f"unavailable: {type(e).__name__}: {e}"


def header(device: torch.device) -> dict[str, Any]:
    p = _device.peaks(device)
    return {
        "device": p.name,
        "device_type": device.type,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "commit": git_commit(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        # the host allocator's settings (python -m lowrank_ext.bench sets both, see __main__):
        # page faults on fresh outputs otherwise dominate CPU timings on these VMs
        "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", "0"),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "build_info": build_info(),
        "peak_mem_bw_gbs": round(p.mem_bw_gbs, 1),
        "peak_source": p.source,
        # the FLOP/s peak of each dtype the run used ("% peak" divides by these)
        "peak_tflops": {},
        "peers": {name: _peers.version(name) or _peers.load(name)[1] for name in _peers.PEERS},
    }


def measure(fn: Callable[[], Any], device: torch.device, cfg: RunConfig, slow: bool):
    """Median/IQR of `fn` per call, from torch.utils.benchmark (which syncs the device)."""
    # The correctness call already ran fn once (compiles, allocator warm-up); a couple
    # more calls settle caches and clocks. Slow providers skip this on CPU, where one call is
    # seconds; on a GPU they warm up too (a cold cuBLAS handshake would inflate their time).
    for _ in range(0 if slow and device.type != "cuda" else 2):
        fn()
    synchronize(device)
    timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    if slow:
        return timer.adaptive_autorange(threshold=0.1, min_run_time=0.0,
                                        max_run_time=cfg.max_run_time / 2)
    return timer.adaptive_autorange(threshold=0.05, min_run_time=cfg.min_run_time,
                                    max_run_time=cfg.max_run_time)


def _fill_metrics(row: Row, device: torch.device) -> None:
    case, t = row.case, row.median_s
    assert t is not None
    fracs = []
    nbytes = case.bytes if row.bytes is None else row.bytes
    if nbytes:
        row.gbs = nbytes / t / 1e9
        fracs.append(row.gbs / _device.peaks(device).mem_bw_gbs)
    flops = case.flops if row.flops is None else row.flops
    if flops:
        row.tflops = flops / t / 1e12
        peak, _ = _device.peak_tflops(device, case.dtype)
        fracs.append(row.tflops / peak)
    row.extra_gbs = {name: b / t / 1e9 for name, b in case.extra_bytes.items()}
    # The limiting resource (roofline): whichever peak the row is closest to.
    row.frac_peak = max(fracs) if fracs else None


def _fill_ratios(rows: list[Row]) -> None:
    timed = [r for r in rows if r.status == "ok" and r.median_s]
    ref = next((r for r in timed if r.kind == "reference"), None)
    peer_rows = [r for r in timed if r.kind == "peer"]
    for r in timed:
        if ref is not None:
            r.vs_ref = ref.median_s / r.median_s
        r.vs_peer = {p.provider: p.median_s / r.median_s for p in peer_rows}


# ----------------------------------------------------------------------------- running

def run_family(family: Family, cfg: RunConfig) -> tuple[list[Row], list[str]]:
    """Run every case x provider; returns the rows and the skip messages."""
    from tqdm import tqdm

    def log(msg: str) -> None:
        tqdm.write(msg, file=sys.stderr)

    device = cfg.device
    cases = family.cases(cfg.quick, device, cfg.dtype)
    providers = family.providers(device)
    if cfg.providers:
        wanted = set(cfg.providers)
        providers = [p for p in providers if p.name in wanted or p.kind == "reference"]
    skipped: list[str] = []
    usable: list[Provider] = []
    for p in providers:
        if p.peer is not None:
            module, why = _peers.load(p.peer)
            if module is None:
                skipped.append(f"{p.name}: {why}")
                log(f"[{family.name}] skipping {p.name}: {why}")
                continue
        usable.append(p)
    # The reference runs first in every case: every other output is checked against it.
    usable.sort(key=lambda p: p.kind != "reference")
    if not usable or usable[0].kind != "reference":
        raise RuntimeError(f"family {family.name} has no reference provider")

    rows: list[Row] = []
    total = sum(p.applies_to(c) for c in cases for p in usable)
    bar = tqdm(total=total, desc=family.name, unit="run", file=sys.stderr,
               disable=not cfg.progress, dynamic_ncols=True)
    for case in cases:
        inputs = family.make_inputs(case, device)
        ref_out: Any = None
        case_rows: list[Row] = []
        for p in (p for p in usable if p.applies_to(case)):
            bar.set_postfix_str(f"{case.key} / {p.name}", refresh=True)
            row = Row(case=case, provider=p.name, kind=p.kind)
            case_rows.append(row)
            try:
                out = _run_one(family, cfg, case, inputs, p, row, ref_out, log)
                if p.kind == "reference":
                    ref_out = out
                del out
            except Exception as e:
                why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                if p.kind == "peer" and not p.ours:  # a peer that breaks here is skipped, not our failure
                    row.status, row.message = "skipped", why
                    log(f"[{family.name}] {case.key}: {p.name} skipped: {why}")
                else:
                    row.status, row.message = "FAILED", why
                    log(f"[{family.name}] {case.key}: {p.name} FAILED: {why}")
            bar.update(1)
        del ref_out, inputs
        _fill_ratios(case_rows)
        rows.extend(case_rows)
    bar.close()
    return rows, skipped


def _run_one(family: Family, cfg: RunConfig, case: Case, inputs: Any, p: Provider,
             row: Row, ref_out: Any, log: Callable[[str], None]) -> Any:
    """Set up, check and time one provider on one case, filling `row`. Returns the
    checked output when `p` is the reference (the oracle for the others), else None."""
    try:
        timed = p.setup(case, inputs)
    except SkipProvider as e:
        row.status, row.message = "skipped", str(e)
        return None
    row.note = timed.note
    row.flops, row.bytes = timed.flops, timed.bytes
    out = timed.output if timed.output is not None else timed.fn()
    synchronize(cfg.device)
    if p.kind != "reference" and ref_out is None:
        row.status, row.message = "FAILED", "no reference output to check against"
        return None
    try:
        err = family.check(case, inputs, ref_out if p.kind != "reference" else out, out, p)
    except Exception as e:  # a check that cannot compare is a failed check (for peers too)
        err = f"the check raised {type(e).__name__}: {e}"
    if err:
        row.status, row.message = "FAILED", f"check: {err}"
        log(f"[{family.name}] {case.key}: {p.name} FAILED check: {err}")
        return None
    keep = out if p.kind == "reference" else None
    del out   # free a peer's output before timing: 64M-value cases are large
    timed.output = None
    m = measure(timed.fn, cfg.device, cfg, p.slow)
    row.median_s, row.iqr_s, row.samples, row.times_s = m.median, m.iqr, len(m.times), m.times
    _fill_metrics(row, cfg.device)
    if cfg.profile and (p.kind == "ours" or p.ours):
        row.profile = profile_calls(timed.fn, cfg.device, calls=1 if p.slow else PROFILE_CALLS)
    return keep


PROFILE_CALLS = 5
PROFILE_TOP = 12


def profile_calls(fn: Callable[[], Any], device: torch.device, calls: int = PROFILE_CALLS,
                  top: int = PROFILE_TOP) -> list[dict[str, Any]]:
    """Where one call's time goes: `calls` calls under torch.profiler, the `top` ops and kernels
    by self time on the device (CUDA: kernel time; CPU: the ops' own CPU time), per call. The
    first entry, "(wall)", is the wall time per profiled call, host and device together."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    synchronize(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize(device)
        wall = (time.perf_counter() - t0) / calls
    on_device = device.type == "cuda"

    def self_us(e) -> float:
        return float(e.self_device_time_total if on_device else e.self_cpu_time_total)
    events = [e for e in prof.key_averages() if self_us(e) > 0]
    events.sort(key=self_us, reverse=True)
    out = [{"name": "(wall)", "calls": 1.0, "us": wall * 1e6,
            "measures": "kernel time on the GPU" if on_device else "self CPU time"}]
    out += [{"name": e.key, "calls": e.count / calls, "us": self_us(e) / calls} for e in events[:top]]
    return out


# ----------------------------------------------------------------------------- output

def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    if x == 0:
        return "0"
    mag = math.floor(math.log10(abs(x)))
    return f"{x:.{max(0, digits - 1 - mag)}f}"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{_fmt(x)}x"


def markdown(family: Family, hdr: dict[str, Any], rows: list[Row], skipped: list[str],
             summary: list[str]) -> str:
    extra_names = list(dict.fromkeys(n for r in rows for n in r.case.extra_bytes))
    peer_names = list(dict.fromkeys(r.provider for r in rows if r.kind == "peer"))
    has_gbs = any(r.case.bytes for r in rows)
    has_tflops = any(r.case.flops for r in rows)
    cols = ["op", "case", "provider", "ms", "IQR ms", "n"]
    cols += (["GB/s"] if has_gbs else []) + extra_names + (["TFLOP/s"] if has_tflops else [])
    cols += ["% peak", "vs ref"] + [f"vs {n}" for n in peer_names] + ["status"]
    lines = [f"## {family.name} — {hdr['device']}", ""]
    bi = hdr["build_info"]
    bi_s = ", ".join(f"{k}={v}" for k, v in bi.items()) if isinstance(bi, dict) else bi
    lines += [
        f"- date: {hdr['date']}  commit: {hdr['commit']}  torch: {hdr['torch']}  "
        f"threads: {hdr['threads']}  THP_MEM_ALLOC_ENABLE: {hdr.get('thp_mem_alloc', '?')}  "
        f"GLIBC_TUNABLES: {hdr.get('glibc_tunables') or '(none)'}",
        f"- lowrank_ext build: {bi_s}",
        f"- peak memory bandwidth: {hdr['peak_mem_bw_gbs']} GB/s ({hdr['peak_source']})"
        + "".join(f"; peak {dt} TFLOP/s: {v}" for dt, v in hdr.get("peak_tflops", {}).items()),
        "- ms = median time per call over n timed blocks, IQR = its interquartile range; "
        "vs X = X's time / this row's time (>1: this row is faster)",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "|".join("---" if c in ("op", "case", "provider", "status") else "---:"
                       for c in cols) + "|",
    ]
    for r in rows:
        ms = None if r.median_s is None else r.median_s * 1e3
        # An IQR from fewer than 4 samples (slow references) would be noise: leave it out.
        iqr = None if r.iqr_s is None or r.samples < 4 else r.iqr_s * 1e3
        cells = [r.case.op, r.case.label, r.provider + (f" ({r.note})" if r.note else ""),
                 _fmt(ms), _fmt(iqr), str(r.samples) if r.samples else "-"]
        if has_gbs:
            cells.append(_fmt(r.gbs))
        cells += [_fmt(r.extra_gbs.get(n)) for n in extra_names]
        if has_tflops:
            cells.append(_fmt(r.tflops))
        cells.append("-" if r.frac_peak is None else f"{100 * r.frac_peak:.1f}%")
        cells.append(_ratio(r.vs_ref))
        cells += [_ratio(r.vs_peer.get(n)) for n in peer_names]
        status = r.status if not r.message else f"{r.status}: {r.message}"
        cells.append(status.replace("|", "/"))
        lines.append("| " + " | ".join(cells) + " |")
    if skipped:
        lines += ["", "Skipped peers: " + "; ".join(skipped)]
    if summary:
        lines += [""] + [f"- {s}" for s in summary]
    profiled = [r for r in rows if r.profile]
    if profiled:
        lines += ["", "### Profile (--profile: torch.profiler, per call; ops and kernels by "
                  f"{profiled[0].profile[0]['measures']})", ""]
        for r in profiled:
            wall, entries = r.profile[0], r.profile[1:]
            lines += [f"- {r.case.op} / {r.case.label} / {r.provider}: {wall['us']:.0f} us wall per call; "
                      + "; ".join(f"{e['name'][:60]} {e['us']:.1f} us ({e['calls']:.3g}x)" for e in entries)]
    return "\n".join(lines) + "\n"


def _row_json(r: Row) -> dict[str, Any]:
    d = dataclasses.asdict(r)
    case = d.pop("case")
    case["dtype"] = str(r.case.dtype).removeprefix("torch.")
    case["params"] = {k: (str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v)
                      for k, v in case["params"].items()}
    return {"case": case, **d}


def plot(family: Family, hdr: dict[str, Any], rows: list[Row], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")   # no display on benchmark machines
    import matplotlib.pyplot as plt

    def value(r: Row) -> float | None:
        if family.plot_metric == "GB/s":
            return r.gbs
        if family.plot_metric == "TFLOP/s":
            return r.tflops
        return r.vs_ref

    keys = list(dict.fromkeys(r.case.key for r in rows))
    names = list(dict.fromkeys(r.provider for r in rows))
    width = 0.8 / max(1, len(names))
    # ~0.3 inch per bar keeps labels legible however many cases a family has.
    fig, ax = plt.subplots(figsize=(max(8.0, 0.3 * len(keys) * len(names) + 3), 5))
    for i, name in enumerate(names):
        xs, ys = [], []
        for j, k in enumerate(keys):
            r = next((r for r in rows if r.case.key == k and r.provider == name), None)
            v = value(r) if r is not None and r.status == "ok" else None
            if v:
                xs.append(j + (i - (len(names) - 1) / 2) * width)
                ys.append(v)
        ax.bar(xs, ys, width=width, label=name)
    if family.plot_metric == "GB/s":
        ax.axhline(hdr["peak_mem_bw_gbs"], color="gray", linestyle="--", linewidth=1,
                   label=f"peak {hdr['peak_mem_bw_gbs']} GB/s")
    ax.set_yscale("log")   # references are orders of magnitude slower than kernels
    ylabel = {"speedup": "speed-up vs reference"}.get(family.plot_metric, family.plot_metric)
    ax.set_ylabel(ylabel)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels(keys, rotation=30, ha="right", fontsize=8)
    ax.set_title(f"{family.name} — {hdr['device']}\n{hdr['date']}  commit {hdr['commit']}",
                 fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(family: Family, cfg: RunConfig, hdr: dict[str, Any], rows: list[Row],
                  skipped: list[str], summary: list[str], md: str) -> list[Path]:
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    date = hdr["date"][:10]
    stem = f"{family.name}-{_device.device_tag(cfg.device)}-{date}"
    if cfg.quick:
        stem += "-quick"    # a smoke run must not overwrite the day's full results
    paths = [cfg.out_dir / f"{stem}.json", cfg.out_dir / f"{stem}.md"]
    payload = {"family": family.name, "quick": cfg.quick, "header": hdr,
               "skipped": skipped, "summary": summary, "rows": [_row_json(r) for r in rows]}
    paths[0].write_text(json.dumps(payload, indent=1, default=str) + "\n")
    paths[1].write_text(md)
    if cfg.plot:
        png = cfg.out_dir / f"{stem}.png"
        plot(family, hdr, rows, png)
        paths.append(png)
    return paths


def run_and_report(family: Family, cfg: RunConfig) -> bool:
    """Run one family, print its table, write its files; True if nothing FAILED."""
    hdr = header(cfg.device)
    rows, skipped = run_family(family, cfg)
    for dtype in sorted({str(r.case.dtype).removeprefix("torch.") for r in rows if r.case.flops}):
        tflops, source = _device.peak_tflops(cfg.device, getattr(torch, dtype))
        hdr["peak_tflops"][dtype] = f"{tflops:.3g} ({source})"
    summary = family.summary(rows, cfg.device) if family.summary else []
    md = markdown(family, hdr, rows, skipped, summary)
    print(md, flush=True)
    for path in write_results(family, cfg, hdr, rows, skipped, summary, md):
        print(f"wrote {path}", file=sys.stderr)
    failed = [r for r in rows if r.status == "FAILED"]
    for r in failed:
        print(f"FAILED: {family.name} {r.case.key} {r.provider}: {r.message}", file=sys.stderr)
    return not failed
