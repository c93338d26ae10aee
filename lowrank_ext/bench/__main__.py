"""CLI: python -m lowrank_ext.bench [family ...] [--quick] [--device cpu|cuda] ..."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from . import FAMILIES, get_family
from .harness import RunConfig, run_and_report

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
    ap.add_argument("--providers", type=lambda s: [p for p in s.split(",") if p],
                    help="comma-separated provider names to run (the reference always runs)")
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--list", action="store_true", help="list families and exit")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
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
                    progress=not args.no_progress)
    ok = True
    for name in names:
        ok &= run_and_report(get_family(name), cfg)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
