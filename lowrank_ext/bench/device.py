"""Peak memory bandwidth and FLOP/s of the device a benchmark runs on.

The "fraction of peak" column divides an achieved rate by these numbers, so where they
come from matters and is recorded in every result (`Peaks.source`):

* GPUs we know: **spec-sheet** values (dense, no sparsity), matched by a substring of
  ``torch.cuda.get_device_name()``. Real kernels reach ~90% of HBM bandwidth at best.
* CPUs and unknown GPUs: **measured** once per process with STREAM-like passes over
  ~256 MB (a copy, a read-only reduction, an in-place add, and torch's fused AdamW step,
  seven streams as the optimizer kernels have; the best is the peak, a lower bound of the
  machine's), because
  a CPU's spec sheet is unknown here and its achievable bandwidth is far below the
  DRAM's theoretical one. FLOP/s on those devices is measured with a square matmul,
  only when a family reports FLOPs. ``LOWRANK_BENCH_PEAK_GBS`` overrides the bandwidth.
"""
from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass, field

import torch
from torch.utils.benchmark import Timer


@dataclass(frozen=True)
class Peaks:
    name: str                      # human-readable device name
    mem_bw_gbs: float              # bytes/s / 1e9
    tflops: dict[str, float] = field(default_factory=dict)  # dtype name -> TFLOP/s
    source: str = ""               # "spec sheet" or how it was measured


# (substrings that must all occur in the device name, peaks). First match wins, so the
# more specific names (PCIe, NVL, 80GB) come before the generic ones.
_TB = 1000.0  # GB/s per TB/s
_GPU_TABLE: list[tuple[tuple[str, ...], float, dict[str, float]]] = [
    (("H100", "PCIe"), 2.0 * _TB, {"bfloat16": 756.0, "float16": 756.0, "float32": 51.0}),
    (("H100", "NVL"), 3.9 * _TB, {"bfloat16": 835.0, "float16": 835.0, "float32": 60.0}),
    (("H100",), 3.35 * _TB, {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}),  # SXM5
    (("GH200",), 4.0 * _TB, {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}),  # 96 GB HBM3
    (("H200", "NVL"), 4.8 * _TB, {"bfloat16": 835.0, "float16": 835.0, "float32": 60.0}),
    (("H200",), 4.8 * _TB, {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}),  # SXM
    (("A100", "80GB"), 2.0 * _TB, {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5}),
    (("A100",), 1.555 * _TB, {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5}),
]


def _timed_median(fn, min_run_time: float = 0.5) -> float:
    # Timer defaults to one thread; peaks must use all of them, as the kernels do.
    t = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return t.blocked_autorange(min_run_time=min_run_time).median


def measure_bandwidth_gbs(device: torch.device, mbytes: int = 256) -> tuple[float, str]:
    """STREAM-like estimate: best of a copy (read + write), a read-only sum and an in-place
    add (a += b: two reads and a write, the access pattern of the optimizer steps; on CPUs a
    copy's destination lines are also read first, which its 8 bytes per element do not count,
    so the in-place add measures more of the real traffic)."""
    n = mbytes * (1 << 20) // 4
    src = torch.ones(n, dtype=torch.float32, device=device)  # touched, so pages exist
    dst = torch.empty_like(src)
    dst.copy_(src)
    copy_s = _timed_median(lambda: dst.copy_(src))
    read_s = _timed_median(lambda: src.sum())
    add_s = _timed_median(lambda: dst.add_(src))
    copy_gbs = 2 * n * 4 / copy_s / 1e9
    read_gbs = n * 4 / read_s / 1e9
    add_gbs = 3 * n * 4 / add_s / 1e9
    del src, dst
    # four reads and three writes per element (p, grad, two moments): on the 2-core dev VMs
    # this reached ~47 GB/s where the copy measured ~28, and the AdamW rows read > 100%
    adamw_gbs = _fused_adamw_gbs(device, mbytes * (1 << 20) // 16)
    how = (f"measured: {mbytes} MB fp32 copy {copy_gbs:.1f} GB/s (read+write), "
           f"read-only sum {read_gbs:.1f} GB/s, in-place add {add_gbs:.1f} GB/s (2 reads + write)"
           + (f", torch fused AdamW step {adamw_gbs:.1f} GB/s (28 B/param)" if adamw_gbs else ""))
    return max(copy_gbs, read_gbs, add_gbs, adamw_gbs or 0.0), how


def _fused_adamw_gbs(device: torch.device, n: int) -> float | None:
    """GB/s of torch's fused AdamW step on n fp32 params (28 bytes each), or None where
    torch has no fused AdamW for the device."""
    try:
        p = torch.zeros(n, device=device, requires_grad=True)
        p.grad = torch.zeros_like(p)
        opt = torch.optim.AdamW([p], lr=1e-3, fused=True)
        opt.step()  # the state exists from here on
        return 28 * n / _timed_median(opt.step) / 1e9
    except (RuntimeError, ValueError, NotImplementedError):
        return None


@functools.cache
def measure_tflops(device_str: str, dtype_name: str) -> float:
    """Achievable dense matmul TFLOP/s (only used where no spec-sheet value exists)."""
    device = torch.device(device_str)
    dtype = getattr(torch, dtype_name)
    # Small enough for bf16 on a CPU without bf16 instructions (~50x slower than fp32).
    n = 2048 if (device.type == "cuda" or dtype == torch.float32) else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    # the best of three medians: one short timing swings with the VM's phases, and a peak
    # set too low puts GEMM-bound rows above 100%
    return max(2 * n**3 / _timed_median(lambda: torch.mm(a, b, out=out), 0.3) / 1e12 for _ in range(3))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def device_tag(device: torch.device) -> str:
    """Short file-name tag: 'cpu', or the GPU name slugged ('h100-80gb-hbm3')."""
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device).lower().replace("nvidia", "")
    slug = "".join(c if c.isalnum() else "-" for c in name)
    return "-".join(p for p in slug.split("-") if p)


@functools.cache
def _peaks(device_str: str) -> Peaks:
    device = torch.device(device_str)
    name = device_name(device)
    if device.type == "cuda":
        for keys, bw, tflops in _GPU_TABLE:
            if all(k in name for k in keys):
                return Peaks(name, bw, dict(tflops),
                             f"spec sheet ({'+'.join(keys)}, dense)")
    override = os.environ.get("LOWRANK_BENCH_PEAK_GBS")
    if override:
        return Peaks(name, float(override), {}, "LOWRANK_BENCH_PEAK_GBS override")
    bw, how = measure_bandwidth_gbs(device)
    return Peaks(name, bw, {}, how)


def peaks(device: torch.device | str) -> Peaks:
    """Peaks for `device`, computed once per process (measuring takes ~2 s on a CPU)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _peaks(str(device))


def peak_tflops(device: torch.device | str, dtype: torch.dtype) -> tuple[float, str]:
    """(TFLOP/s, source) for `dtype`: spec sheet if known, else measured."""
    p = peaks(device)
    dtype_name = str(dtype).removeprefix("torch.")
    if dtype_name in p.tflops:
        return p.tflops[dtype_name], "spec sheet"
    return measure_tflops(str(torch.device(device)), dtype_name), "measured matmul"
