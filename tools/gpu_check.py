"""`make gpu-check`: the one long call to run on a GPU machine whose python3 already has
torch and nvcc (nothing is fetched). Builds the extension for the local GPU's arch, runs
every test including the CUDA ones, runs the benchmarks, and writes
`<gpu>-<date>.md` (device, date, commit, build info, test summary, benchmark tables) into
--results-dir. Exits non-zero when the build, a test or a benchmark check failed; the
report is written either way.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd: list[str], env: dict, log) -> tuple[int, str]:
    print(f"$ {' '.join(cmd)}", flush=True)
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # stream: a long run shows progress, and a killed one keeps its log
        sys.stdout.write(line)
        log.write(line)
        lines.append(line)
    rc = proc.wait()
    log.write(f"[exit {rc} after {time.time() - t0:.0f} s]\n")
    log.flush()
    return rc, "".join(lines)


def _importable(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def git_commit() -> str:
    """HEAD, with "-dirty" when tracked files differ from it (a copied working tree)."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--results-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--bench-args", default="", help="extra arguments for python -m lowrank_ext.bench")
    args = ap.parse_args()
    results_dir = os.path.abspath(args.results_dir)
    os.makedirs(results_dir, exist_ok=True)

    import shutil

    import torch

    missing = [m for m in ("pybind11", "pytest", "hypothesis") if not _importable(m)]
    missing += [t for t in ("cmake", "nvcc") if shutil.which(t) is None and not os.path.exists(f"/usr/local/cuda/bin/{t}")]
    if missing:  # nothing can be fetched on the GPU machines: say what to carry
        print(f"gpu-check: missing here: {', '.join(missing)} (carry them as wheels, see the device tool's README)",
              file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("gpu-check: torch sees no CUDA GPU here; use `make test` on CPU machines", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name()
    major, minor = torch.cuda.get_device_capability()
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    date = datetime.date.today().isoformat()
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=f"{major}.{minor}", LOWRANK_EXT_CUDA="1",
               MAX_JOBS=os.environ.get("MAX_JOBS", str(min(16, os.cpu_count() or 2))),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1",
               THP_MEM_ALLOC_ENABLE="1")

    with open(os.path.join(results_dir, f"{slug}-{date}.log"), "w") as log:
        build_rc, build_out = run([sys.executable, "setup.py", "build_ext", "--inplace"], env, log)
        test_rc, test_out = (1, "not run: the build failed") if build_rc else run(
            [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider"], env, log)
        bench_rc, bench_out = (1, "not run: the build failed") if build_rc else run(
            [sys.executable, "-m", "lowrank_ext.bench", "--out", results_dir] + args.bench_args.split(), env, log)

    info = "unavailable"
    if not build_rc:
        probe = subprocess.run([sys.executable, "-c", "import lowrank_ext, json; print(json.dumps(lowrank_ext.build_info()))"],
                               cwd=ROOT, env=env, capture_output=True, text=True)
        info = probe.stdout.strip() or probe.stderr.strip()[-500:]
    test_summary = "\n".join(test_out.strip().splitlines()[-40:])
    report = [
        f"# gpu-check on {name}",
        "",
        f"- date: {date}",
        f"- commit: {git_commit()}",
        f"- device: {name}, compute capability {major}.{minor}, {torch.cuda.get_device_properties(0).multi_processor_count} SMs",
        f"- torch: {torch.__version__} (CUDA {torch.version.cuda})",
        f"- build info: `{info}`",
        f"- status: build {'ok' if not build_rc else 'FAILED'}, tests {'ok' if not test_rc else 'FAILED'}, "
        f"benchmarks {'ok' if not bench_rc else 'FAILED'}",
        "",
        "## Tests (`pytest -q`, tail)",
        "",
        "```",
        test_summary,
        "```",
        "",
        "## Benchmarks (`python -m lowrank_ext.bench`)",
        "",
        bench_out.strip() if not build_rc else "not run",
        "",
    ]
    if build_rc:
        report += ["## Build log (tail)", "", "```", "\n".join(build_out.strip().splitlines()[-60:]), "```", ""]
    path = os.path.join(results_dir, f"{slug}-{date}.md")
    with open(path, "w") as f:
        f.write("\n".join(report))
    print(f"gpu-check: wrote {path}")
    return 1 if (build_rc or test_rc or bench_rc) else 0


if __name__ == "__main__":
    sys.exit(main())
