"""`make gpu-check`: the one long call to run on a GPU machine whose python3 already has
torch and nvcc (nothing is fetched). Builds the extension for the local GPU's arch, runs
every test (the CUDA ones first), runs the benchmarks, and writes into --results-dir:

  <gpu>-<date>.md            device, date, commit, build info, a row per test file and
                             benchmark family (passed/failed/crashed/timed out/not run),
                             the failures, the benchmark tables
  <gpu>-<date>.log           every step's full output
  <gpu>-<date>-bench.tar.gz  the benchmark families' .md and .json files
  <gpu>-<date>-build.tar.gz  the built extension (lowrank_ext/_C*.so), after a build: a later
                             call on a fresh machine unpacks it and runs --phases bench
                             without building again (README: the GPU check in three calls)

Four files, whatever the number of families: the device tool brings back at most eight
from $OUT. Peers for the benchmarks (bitsandbytes, galore-torch: not on those machines) go
on the path from ROOT/.peers when that folder exists (`make gpu-peers` fills it here).
Built for that tool's limits and for kernels that have never run on a GPU:
- every step runs in its own process group with a time limit, the whole check under a
  deadline (--deadline-s, default 570 s: the tool stops a command at 600 s); a step that
  would start too late is listed as not run, so the report always comes back;
- the report is rewritten after every step, so even a check killed from outside leaves one;
- each test file runs in its own pytest process, CUDA tests (-m cuda) of every file first,
  then the CPU tests: a crash or a sticky CUDA error (an illegal address poisons the
  process's context) costs one file, not the run, and the report shows its last lines;
- each benchmark family runs in its own process too;
- --phases picks what runs, so a second call on the still-warm machine can run what the
  first did not reach (`make gpu-check GPU_CHECK_ARGS="--phases bench"`), and the
  `sanitize` phase (not in the default) runs CUDA test files under compute-sanitizer.
Exits non-zero when a step failed, crashed or timed out; the report is written either way.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time

START = time.monotonic()  # the deadline counts from here: importing torch and waking the GPU take time too
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("build", "test", "bench", "sanitize")
DEFAULT_PHASES = ("build", "test", "bench")
# compute-sanitizer runs kernels 10-100x slower: the files whose kernels index memory the most
SANITIZE_FILES = ("tests/test_monarch.py", "tests/test_sparse.py", "tests/test_multilora.py", "tests/test_lora.py")
SANITIZE_TOOLS = ("memcheck", "racecheck")
LOG_TAIL_BYTES = 400_000  # per step, in the main log (the step's own log keeps all of it)


@dataclasses.dataclass
class Step:
    phase: str
    name: str
    status: str = "not run"  # ok | failed | crashed | timed out | not run | no tests
    seconds: float = 0.0
    summary: str = ""        # pytest's counts, or why it did not run
    details: list[str] = dataclasses.field(default_factory=list)  # failures, or a crash's last lines
    output: str = ""         # stdout of a benchmark family (its tables)


def pytest_outcome(rc: int | None, output: str) -> tuple[str, str, list[str]]:
    """(status, summary, details) of one pytest process (run with -v, so the test in flight
    is the last line before a crash or a hang) from its exit code and output. rc None: killed
    at its time limit; rc < 0: killed by a signal; 5: nothing collected."""
    lines = output.strip().splitlines()
    counts = ""
    for line in reversed(lines):
        if re.search(r"\d+ (passed|failed|skipped|errors?|deselected|xfailed|xpassed)\b", line) and " in " in line:
            counts = line.strip("= ").strip()
            break
    failures = [ln.strip() for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
    messages = [ln for ln in lines if ln.startswith("E ") or re.match(r"^\S+\.py:\d+: \w", ln)][:40]
    if rc is None:
        return "timed out", counts or "killed at its time limit", failures + lines[-10:]
    if rc < 0 or rc not in (0, 1, 2, 3, 4, 5):
        sig = -rc if rc < 0 else rc - 128
        name = signal.Signals(sig).name if sig in signal.valid_signals() else f"exit {rc}"
        fatal = next((i for i, ln in enumerate(lines) if "Fatal Python error" in ln), None)
        where = lines[max(0, fatal - 3):fatal + 25] if fatal is not None else lines[-30:]
        return "crashed", name + (f" after: {counts}" if counts else ""), failures + messages + where
    if rc == 5:
        return "no tests", counts or "no tests selected", []
    if rc == 0:
        return "ok", counts, []
    return "failed", counts or f"pytest exit {rc}", (failures + messages) or lines[-30:]


class GpuCheck:
    def __init__(self, args: argparse.Namespace, device: dict):
        self.args = args
        self.device = device
        self.t0 = START
        self.steps: list[Step] = []
        self.results_dir = os.path.abspath(args.results_dir)
        stem = f"{device['slug']}-{datetime.date.today().isoformat()}"
        self.report_path = os.path.join(self.results_dir, f"{stem}.md")
        self.log_path = os.path.join(self.results_dir, f"{stem}.log")
        self.bench_archive = os.path.join(self.results_dir, f"{stem}-bench.tar.gz")
        self.build_archive = os.path.join(self.results_dir, f"{stem}-build.tar.gz")
        self.work_dir = os.path.join(ROOT, "build", "gpu-check", stem)  # step logs, bench files
        self.bench_dir = os.path.join(self.work_dir, "bench")
        os.makedirs(self.results_dir, exist_ok=True)
        os.makedirs(self.bench_dir, exist_ok=True)
        self.log = open(self.log_path, "a")
        jobs = args.jobs or max(1, min(4, (os.cpu_count() or 2) // 4))
        self.jobs = jobs
        threads = max(1, (os.cpu_count() or 2) // jobs)
        peers = os.path.join(ROOT, ".peers")
        path = [ROOT] + ([peers] if os.path.isdir(peers) else []) + [os.environ.get("PYTHONPATH", "")]
        self.env = dict(os.environ, LOWRANK_EXT_CUDA="1", PYTHONUNBUFFERED="1", THP_MEM_ALLOC_ENABLE="1",
                        MAX_JOBS=os.environ.get("MAX_JOBS", str(min(16, os.cpu_count() or 2))),
                        PYTHONPATH=os.pathsep.join(path))
        if device.get("arch") and not os.environ.get("TORCH_CUDA_ARCH_LIST"):  # e.g. a user's 9.0a stays
            self.env["TORCH_CUDA_ARCH_LIST"] = device["arch"]
        self.test_env = dict(self.env, OMP_NUM_THREADS=str(threads))  # parallel pytest processes share the cores

    # -- time ------------------------------------------------------------------------------
    def remaining(self) -> float:
        return self.args.deadline_s - (time.monotonic() - self.t0)

    # -- running steps ---------------------------------------------------------------------
    def _start(self, step: Step, cmd: list[str], env: dict):
        path = os.path.join(self.work_dir, f"{step.phase}-{step.name.replace('/', '_')}.log")
        out = open(path, "w")
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own group: a time limit kills its children too
        return proc, out, path, time.monotonic()

    def _finish(self, step: Step, proc, out, path: str, started: float, rc: int | None) -> str:
        if rc is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        out.close()
        step.seconds = time.monotonic() - started
        with open(path, errors="replace") as f:
            output = f.read()
        self.log.write(f"\n===== {step.phase} {step.name} ({step.seconds:.0f} s, "
                       f"{'killed at its time limit' if rc is None else f'exit {rc}'}) =====\n")
        self.log.write(output[-LOG_TAIL_BYTES:])
        self.log.flush()
        return output

    def run_steps(self, steps: list[tuple[Step, list[str], dict]], jobs: int, judge) -> None:
        """Runs the steps, `jobs` at a time, each under the time left; judge(step, rc, output)
        sets its status. A step not started before the deadline margin stays 'not run'."""
        pending = list(steps)
        running = []  # (step, proc, out, path, started)
        for step, _, _ in steps:
            self.steps.append(step)
        while pending or running:
            while pending and len(running) < jobs:
                step, cmd, env = pending[0]
                if self.remaining() < self.args.min_step_s:
                    break
                pending.pop(0)
                print(f"[{time.monotonic() - self.t0:5.0f} s] start {step.phase} {step.name}", flush=True)
                running.append((step, *self._start(step, cmd, env)))
            if not running:  # out of time: what is left is reported as not run
                for step, _, _ in pending:
                    step.summary = f"not run: under {self.args.min_step_s:.0f} s of the {self.args.deadline_s:.0f} s deadline left"
                break
            time.sleep(0.2)
            still = []
            for step, proc, out, path, started in running:
                rc = proc.poll()
                # a hung step (a never-run kernel that spins, say) must not hold its slot to the end
                overdue = (self.remaining() < self.args.report_margin_s
                           or time.monotonic() - started > self.args.step_timeout_s)
                if rc is None and not overdue:
                    still.append((step, proc, out, path, started))
                    continue
                output = self._finish(step, proc, out, path, started, rc)
                judge(step, rc, output)
                print(f"[{time.monotonic() - self.t0:5.0f} s] {step.status}: {step.phase} {step.name} "
                      f"({step.seconds:.0f} s) {step.summary}", flush=True)
                self.write_report()
            running = still

    # -- phases ----------------------------------------------------------------------------
    def build(self) -> bool:
        step = Step("build", "setup.py build_ext --inplace")

        def judge(s: Step, rc, output):
            s.status = "ok" if rc == 0 else ("timed out" if rc is None else "failed")
            s.summary = "" if rc == 0 else "see the build log below"
            if rc != 0:
                s.details = output.strip().splitlines()[-60:]
        self.run_steps([(step, [sys.executable, "setup.py", "build_ext", "--inplace"], self.env)], 1, judge)
        if step.status == "ok":
            probe = subprocess.run([sys.executable, "-c", "import lowrank_ext, json; print(json.dumps(lowrank_ext.build_info()))"],
                                   cwd=ROOT, env=self.env, capture_output=True, text=True)
            self.device["build_info"] = probe.stdout.strip() or probe.stderr.strip()[-500:]
            self.pack_build()
        return step.status == "ok"

    def pack_build(self) -> None:
        """The built extension, for a later call on a fresh machine (the build takes ~90 s of a
        10-minute call): unpack it in the checkout's root there."""
        tmp = self.build_archive + ".tmp"
        with tarfile.open(tmp, "w:gz") as tar:
            for f in sorted(glob.glob(os.path.join(ROOT, "lowrank_ext", "_C*.so"))):
                tar.add(f, arcname=os.path.relpath(f, ROOT))
        os.replace(tmp, self.build_archive)

    def test(self) -> None:
        files = self.args.test_files or sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "tests", "test_*.py")))
        base = [sys.executable, "-m", "pytest", "-v", "-rfE", "-p", "no:cacheprovider"]

        def judge(s: Step, rc, output):
            s.status, s.summary, s.details = pytest_outcome(rc, output)
        steps = []
        for marker in ("cuda", "not cuda"):  # the GPU's own checks first
            for f in files:
                steps.append((Step("test", f"{f} -m '{marker}'"), base + ["-m", marker, f], self.test_env))
        self.run_steps(steps, self.jobs, judge)

    def bench(self) -> None:
        families = self.args.bench_families or list_families(self.env)
        if isinstance(families, str):  # the listing failed: say why, do not pass with no steps
            self.steps.append(Step("bench", "list families", "failed", summary="python -m lowrank_ext.bench could "
                                   "not list its families", details=families.splitlines()[-30:]))
            return
        extra = self.args.bench_args.split()

        def judge(s: Step, rc, output):
            s.output = output.split("\n", 1)[1] if output.startswith("$ ") else output
            s.status = "ok" if rc == 0 else ("timed out" if rc is None else ("crashed" if rc < 0 else "failed"))
            if rc != 0:
                s.details = output.strip().splitlines()[-30:]
            self.pack_bench()
        steps = [(Step("bench", fam), [sys.executable, "-m", "lowrank_ext.bench", fam, "--out", self.bench_dir,
                                       "--no-progress", "--no-plot"] + extra, self.env) for fam in families]
        self.run_steps(steps, 1, judge)  # one at a time: timings must not share the GPU

    def sanitize(self) -> None:
        tool = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
        if not os.path.exists(tool):
            self.steps.append(Step("sanitize", "compute-sanitizer", "not run", summary="compute-sanitizer not found"))
            return

        def judge(s: Step, rc, output):
            s.status, s.summary, s.details = pytest_outcome(rc, output)
            errors = re.findall(r"=+ (?:ERROR SUMMARY|RACECHECK SUMMARY): .*", output)
            if errors:
                s.summary = f"{s.summary}; {errors[-1].strip('= ')}"
            if rc == 99:  # --error-exitcode: the tool found errors
                s.status = "failed"
                s.details = [ln for ln in output.splitlines() if ln.startswith("=========")][:60]
        steps = []
        for tool_name in self.args.sanitize_tools:
            for f in self.args.sanitize_files:
                cmd = [tool, "--tool", tool_name, "--error-exitcode", "99", "--print-limit", "20",
                       sys.executable, "-m", "pytest", "-v", "-x", "-p", "no:cacheprovider", "-m", "cuda", f]
                steps.append((Step("sanitize", f"{tool_name} {f}"), cmd, self.test_env))
        self.run_steps(steps, 1, judge)

    def pack_bench(self) -> None:
        files = sorted(glob.glob(os.path.join(self.bench_dir, "*.md")) + glob.glob(os.path.join(self.bench_dir, "*.json")))
        if not files:
            return
        tmp = self.bench_archive + ".tmp"
        with tarfile.open(tmp, "w:gz") as tar:
            for f in files:
                tar.add(f, arcname=os.path.basename(f))
        os.replace(tmp, self.bench_archive)

    # -- the report ------------------------------------------------------------------------
    def write_report(self) -> None:
        d = self.device
        counts = {}
        for s in self.steps:
            counts.setdefault(s.phase, []).append(s.status)
        phase_status = ", ".join(
            f"{phase} {'ok' if all(x in ('ok', 'no tests') for x in st) else 'NOT OK'}" for phase, st in counts.items())
        lines = [
            f"# gpu-check on {d['name']}",
            "",
            f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
            f"- commit: {git_commit()}",
            f"- device: {d['name']}" + (f", compute capability {d['arch']}, {d['sms']} SMs" if d.get("arch") else ""),
            f"- torch: {d['torch']}",
            f"- build info: `{d.get('build_info', 'not probed (no build step in this call)')}`",
            f"- phases run: {', '.join(self.args.phases)}; elapsed {time.monotonic() - self.t0:.0f} s of a "
            f"{self.args.deadline_s:.0f} s deadline; {self.jobs} test processes at a time",
            f"- status: {phase_status or 'nothing ran yet'}",
            "",
            "## Steps",
            "",
            "| phase | step | status | s | summary |",
            "|---|---|---|---:|---|",
        ]
        for s in self.steps:
            summary = s.summary.replace("|", "\\|")
            lines.append(f"| {s.phase} | `{s.name}` | {s.status} | {s.seconds:.0f} | {summary} |")
        bad = [s for s in self.steps if s.details and s.status not in ("ok", "no tests")]
        if bad:
            lines += ["", "## Failures, crashes and time-outs", ""]
            for s in bad:
                lines += [f"### {s.phase} `{s.name}`: {s.status}", "", "```", *s.details[-60:], "```", ""]
        benches = [s for s in self.steps if s.phase == "bench" and s.output]
        if benches:
            lines += ["", "## Benchmarks (`python -m lowrank_ext.bench <family>`; files in "
                      f"`{os.path.basename(self.bench_archive)}`)", ""]
            for s in benches:
                lines += [s.output.strip(), ""]
        tmp = self.report_path + ".tmp"
        with open(tmp, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, self.report_path)

    def ok(self) -> bool:
        return all(s.status in ("ok", "no tests") for s in self.steps)


def git_commit() -> str:
    """HEAD, with "-dirty" when tracked files differ from it (a copied working tree), or
    LOWRANK_EXT_COMMIT where set (the device machines' copies carried a stale .git: name the
    commit sent, as the benchmarks also read it)."""
    if os.environ.get("LOWRANK_EXT_COMMIT"):
        return os.environ["LOWRANK_EXT_COMMIT"]
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=ROOT, capture_output=True, text=True)
        return (out.stdout.strip() or "unknown") + " (from .git: LOWRANK_EXT_COMMIT unset)"
    except OSError:
        return "unknown (LOWRANK_EXT_COMMIT unset)"


def list_families(env: dict) -> list[str] | str:
    """The benchmark families, or the error output when they cannot be listed."""
    try:
        out = subprocess.run([sys.executable, "-c", "from lowrank_ext.bench import FAMILIES; print(' '.join(FAMILIES))"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return "listing the families timed out (120 s)"
    return out.stdout.split() if out.returncode == 0 and out.stdout.split() else (out.stderr or out.stdout or "no output")


def import_probe(env: dict) -> str | None:
    """None if the built package imports here, else why not (a call without the build phase
    may land on a fresh machine, where no _C was built)."""
    try:
        out = subprocess.run([sys.executable, "-c", "import lowrank_ext"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return "import lowrank_ext timed out (120 s)"
    return None if out.returncode == 0 else (out.stderr or out.stdout)[-3000:]


def missing_tools(phases: list[str]) -> list[str]:
    """What the phases asked for need and this machine lacks (found as setup.py finds them:
    the interpreter's own bin/, CUDA_HOME / CUDA_PATH, /usr/local/cuda, PATH)."""
    missing = [m for m in ("pybind11",) if "build" in phases and not _importable(m)]
    missing += [m for m in ("pytest", "hypothesis") if {"test", "sanitize"} & set(phases) and not _importable(m)]
    if "build" in phases:
        bins = [os.path.dirname(sys.executable)] + [os.path.join(h, "bin") for h in (
            os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda") if h]
        missing += [t for t in ("cmake", "nvcc")
                    if shutil.which(t) is None and not any(os.path.exists(os.path.join(b, t)) for b in bins)]
    return missing


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--phases", default=",".join(DEFAULT_PHASES),
                    help=f"comma-separated, in this order: {', '.join(PHASES)} (default: {','.join(DEFAULT_PHASES)})")
    ap.add_argument("--deadline-s", type=float, default=570.0, help="the whole check's time (default 570 s)")
    ap.add_argument("--min-step-s", type=float, default=20.0, help="no step starts with less time left")
    ap.add_argument("--report-margin-s", type=float, default=5.0, help="steps still running this close to the deadline are killed")
    ap.add_argument("--step-timeout-s", type=float, default=240.0,
                    help="a single step (a test file, a benchmark family) is killed after this long (default 240 s)")
    ap.add_argument("--jobs", type=int, default=0, help="test files at a time (default: cores / 4, at most 4)")
    ap.add_argument("--test-files", nargs="*", default=None, help="default: tests/test_*.py")
    ap.add_argument("--bench-families", nargs="*", default=None, help="default: every family")
    ap.add_argument("--bench-args", default="", help="extra arguments for python -m lowrank_ext.bench")
    ap.add_argument("--sanitize-files", nargs="*", default=list(SANITIZE_FILES))
    ap.add_argument("--sanitize-tools", nargs="*", default=list(SANITIZE_TOOLS))
    ap.add_argument("--allow-cpu", action="store_true",
                    help="run without a GPU (to check this script itself: the tests run it this way)")
    args = ap.parse_args(argv)
    args.phases = [p for p in args.phases.split(",") if p]
    unknown = [p for p in args.phases if p not in PHASES]
    if unknown:
        ap.error(f"unknown phases {unknown}; known: {', '.join(PHASES)}")
    return args


def describe_device(allow_cpu: bool) -> dict | None:
    import torch
    if not torch.cuda.is_available():
        if not allow_cpu:
            return None
        return {"name": "cpu (gpu-check dry run)", "slug": "cpu-dry-run", "torch": torch.__version__}
    name = torch.cuda.get_device_name()
    major, minor = torch.cuda.get_device_capability()
    return {"name": name, "slug": re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"),
            "arch": f"{major}.{minor}", "sms": torch.cuda.get_device_properties(0).multi_processor_count,
            "torch": f"{torch.__version__} (CUDA {torch.version.cuda})"}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = describe_device(args.allow_cpu)
    if device is None:
        print("gpu-check: torch sees no CUDA GPU here; use `make test` on CPU machines", file=sys.stderr)
        return 2
    check = GpuCheck(args, device)
    missing = missing_tools(args.phases)
    if missing:  # nothing can be fetched on the GPU machines: say what to carry, in the report too
        print(f"gpu-check: missing here: {', '.join(missing)} (carry them as wheels, see the device tool's README)",
              file=sys.stderr)
        check.steps.append(Step("preflight", "tools", "failed", summary=f"missing: {', '.join(missing)}"))
        built = False
    elif "build" not in args.phases:
        why = import_probe(check.env)
        built = why is None
        if why:
            check.steps.append(Step("preflight", "import lowrank_ext", "failed", summary="no build here to run against "
                                    "(a fresh machine? add the build phase)", details=why.splitlines()[-30:]))
    else:
        built = True
    check.write_report()
    for phase in (p for p in PHASES if p in args.phases):
        if phase == "build" and built:
            built = check.build()
        elif not built:
            check.steps.append(Step(phase, "all", "not run", summary="no usable build (see above)"))
        else:
            getattr(check, phase)()
        check.write_report()
    check.pack_bench()
    check.write_report()
    check.log.close()
    print(f"gpu-check: wrote {check.report_path}")
    print(json.dumps({s.status: sum(t.status == s.status for t in check.steps) for s in check.steps}))
    return 0 if check.ok() else 1


def _importable(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    sys.exit(main())
