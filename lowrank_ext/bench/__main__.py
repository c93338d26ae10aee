"""CLI: python -m lowrank_ext.bench [family ...] [--quick] [--device cpu|cuda] ..."""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import torch

from . import FAMILIES, get_family
from .harness import RunConfig, run_and_report

# The host allocator every run measures under (each table's header records it). By default
# glibc hands freed blocks of >= 32 MiB (mmap'd) and the heap's free top back to the kernel,
# so an op's fresh output faults its pages in again on every call: on the 2-core dev VMs a
# new 16 MiB tensor can cost 6-8 ms of faults (4 KiB pages; THP with direct compaction) against 0.4 ms
# to write it, and one kernel's fwd+bwd timed 27-43 ms from process to process (monarch,
# d = 1024, 32 blocks). With mmap off and no trimming, freed memory stays in the heap and is
# reused, as with the jemalloc/tcmalloc preload PyTorch's CPU tuning guide recommends: every
# provider in a run, ours and peers alike, then times its kernels, not the kernel's page
# faults. THP_MEM_ALLOC_ENABLE=1 puts torch's large CPU tensors on huge pages (fewer TLB misses).
BENCH_MALLOC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


def provider_names(arg: str) -> list[str]:
    """--providers: names split at commas that a space does not follow (some names hold ", ")."""
    return [p for p in re.split(r",(?! )", arg) if p]


def bench_environment(environ: dict[str, str]) -> dict[str, str]:
    """`environ` with the allocator settings above (other GLIBC_TUNABLES kept)."""
    env = dict(environ, THP_MEM_ALLOC_ENABLE="1")
    tunables = env.get("GLIBC_TUNABLES", "")
    if BENCH_MALLOC_TUNABLES not in tunables:
        env["GLIBC_TUNABLES"] = f"{tunables}:{BENCH_MALLOC_TUNABLES}" if tunables else BENCH_MALLOC_TUNABLES
    return env


DTYPES = {"float32": torch.float32, "fp32": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m lowrank_ext.bench",
        description="Time lowrank_ext ops against their references and installed peers.")
    ap.add_argument("families", nargs="*", metavar="family",
                    help=f"families to run (default: all of {', '.join(FAMILIES)})")
    ap.add_argument("--quick", action="store_true", help="small shapes, short timing budget")
    ap.add_argument("--out", type=Path,
                    default=Path(os.environ.get("RESULTS_DIR", "benchmarks/results")),
                    help="results directory (default: $RESULTS_DIR or benchmarks/results)")
    ap.add_argument("--device", choices=["cpu", "cuda"],
                    default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES),
                    help="run every case in this dtype instead of the family's defaults")
    ap.add_argument("--providers", type=provider_names,
                    help="comma-separated provider names to run (the reference always runs; a comma "
                         "followed by a space is part of a name, e.g. 'lowrank_ext GaLoreAdamW 8-bit, INT4 "
                         "projection')")
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--list", action="store_true", help="list families and exit")
    ap.add_argument("--profile", action="store_true",
                    help="also run our providers' calls under torch.profiler and list, per case, the ops and "
                         "kernels that take the time (a section under each table, a 'profile' list in the JSON)")
    ap.add_argument("--system-allocator", action="store_true",
                    help="keep this process's allocator settings (default: restart under BENCH_MALLOC_TUNABLES "
                         "and THP_MEM_ALLOC_ENABLE=1, which glibc reads only at process start)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Only the command line restarts (a caller of main() keeps its process), and only once.
    env = bench_environment(dict(os.environ))
    if (argv is None and not args.system_allocator and not args.list and env != dict(os.environ)
            and "LOWRANK_BENCH_RESTARTED" not in os.environ):
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, "-m", "lowrank_ext.bench", *sys.argv[1:]],
                  dict(env, LOWRANK_BENCH_RESTARTED="1"))
    if args.list:
        for name in FAMILIES:
            try:
                print(f"{name}: {get_family(name).description}")
            except Exception as e:  # a family whose module cannot import is still listed
                print(f"{name}: (cannot load: {type(e).__name__}: {e})")
        return 0
    names = args.families or list(FAMILIES)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        print(f"unknown families: {', '.join(unknown)}; known: {', '.join(FAMILIES)}",
              file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device available", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    cfg = RunConfig(device=device, quick=args.quick, dtype=DTYPES.get(args.dtype),
                    out_dir=args.out, providers=args.providers, plot=not args.no_plot,
                    progress=not args.no_progress, profile=args.profile)
    ok = True
    for name in names:
        ok &= run_and_report(get_family(name), cfg)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
