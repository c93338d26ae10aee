"""tools/gpu_check.py, the one call a GPU session makes (`make gpu-check`): run here without
a GPU (--allow-cpu), on throwaway test files that pass, fail, crash and hang, to check that
each ends in its own row of the report, that a hung step is killed at the deadline, and that
what comes back through the device tool stays within its eight files."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "tools", "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu_check = _load_gpu_check()


@pytest.mark.parametrize("rc, output, status", [
    (0, "....\n4 passed, 2 skipped in 1.20s\n", "ok"),
    (1, "F.\nFAILED tests/test_x.py::test_a - AssertionError: boom\n1 failed, 1 passed in 0.5s\n", "failed"),
    (-11, "..\nFatal Python error: Segmentation fault\n  File \"tests/test_x.py\", line 3 in test_b\n", "crashed"),
    (None, "....", "timed out"),
    (5, "no tests ran in 0.01s\n", "no tests"),
])
def test_pytest_outcome(rc, output, status):
    got, summary, details = gpu_check.pytest_outcome(rc, output)
    assert got == status
    if status == "ok":
        assert summary == "4 passed, 2 skipped in 1.20s" and details == []
    if status == "failed":
        assert summary.startswith("1 failed, 1 passed") and details[0].startswith("FAILED tests/test_x.py::test_a")
    if status == "crashed":
        assert summary.startswith("SIGSEGV") and any("line 3 in test_b" in d for d in details)


def test_dry_run_isolates_steps_and_keeps_the_deadline(tmp_path):
    cases = {
        "test_passes.py": "def test_ok():\n    assert 1 + 1 == 2\n",
        "test_fails.py": "def test_bad():\n    assert 1 + 1 == 3, 'arithmetic'\n",
        "test_crashes.py": "import os, signal\n\ndef test_segv():\n    os.kill(os.getpid(), signal.SIGSEGV)\n",
        "test_hangs.py": "import time\n\ndef test_sleep():\n    time.sleep(600)\n",
    }
    files = []
    for name, body in cases.items():
        (tmp_path / name).write_text(body)
        files.append(str(tmp_path / name))
    results = tmp_path / "results"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "gpu_check.py"), "--allow-cpu", "--phases", "test,bench",
           # a deadline that leaves the quick files room on a loaded 2-core machine (at 12 s, a CI
           # run saw the passing file's steps themselves time out), while the hang still hits it
           "--results-dir", str(results), "--deadline-s", "40", "--min-step-s", "3", "--report-margin-s", "2",
           "--jobs", "4", "--test-files", *files, "--bench-families", "no-such-family"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    back = sorted(os.listdir(results))
    assert len(back) <= 8 and any(f.endswith(".md") for f in back) and any(f.endswith(".log") for f in back), back
    report = next(open(results / f).read() for f in back if f.endswith(".md"))
    rows = {line.split("|")[2].strip(" `"): line.split("|")[3].strip() for line in report.splitlines()
            if line.startswith("| test |") or line.startswith("| bench |")}
    for marker in ("cuda", "not cuda"):
        assert rows[f"{files[0]} -m '{marker}'"] in ("ok", "no tests")
    assert rows[f"{files[1]} -m 'not cuda'"] == "failed"
    assert rows[f"{files[2]} -m 'not cuda'"] == "crashed"
    assert rows[f"{files[3]} -m 'not cuda'"] == "timed out"
    # the hung file held its slot to the deadline: the bench step after it could not start
    assert rows["no-such-family"] == "not run"
    assert "AssertionError: arithmetic" in report  # the failure's message
    assert "SIGSEGV" in report and "test_crashes.py::test_segv" in report  # the test in flight
    assert "test_hangs.py::test_sleep" in report


def test_bench_step_failure_is_reported(tmp_path):
    results = tmp_path / "results"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "gpu_check.py"), "--allow-cpu", "--phases", "bench",
           "--results-dir", str(results), "--deadline-s", "60", "--bench-families", "no-such-family"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = next(open(results / f).read() for f in os.listdir(results) if f.endswith(".md"))
    assert "| bench | `no-such-family` | failed |" in report
    assert "unknown families: no-such-family" in report


def test_a_hung_step_is_killed_at_its_own_limit_and_the_rest_runs(tmp_path):
    # only the overall deadline killed a hung step: one spinning test file held its slot until
    # the end, and no benchmark family after it ran. 25 s per step: on the H100 machine, beside
    # three other test processes, `python -m lowrank_ext.bench` took over 10 s to import and fail
    (tmp_path / "test_hangs.py").write_text("import time\n\ndef test_sleep():\n    time.sleep(600)\n")
    results = tmp_path / "results"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "gpu_check.py"), "--allow-cpu", "--phases", "test,bench",
           "--results-dir", str(results), "--deadline-s", "100", "--min-step-s", "3", "--step-timeout-s", "25",
           "--jobs", "1", "--test-files", str(tmp_path / "test_hangs.py"), "--bench-families", "no-such-family"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = next(open(results / f).read() for f in os.listdir(results) if f.endswith(".md"))
    assert f"| test | `{tmp_path / 'test_hangs.py'} -m 'not cuda'` | timed out |" in report
    assert "| bench | `no-such-family` | failed |" in report  # it ran: the hang did not take the deadline


def test_the_build_travels_to_a_later_call(tmp_path):
    # a later call on a fresh machine runs --phases bench against the extension a first call built:
    # the archive holds it at its place in the checkout, byte for byte
    import glob
    import tarfile
    built = sorted(glob.glob(os.path.join(ROOT, "lowrank_ext", "_C*.so")))
    if not built:
        pytest.skip("no in-place build of the extension here")
    check = gpu_check.GpuCheck(gpu_check.parse_args(["--allow-cpu", "--results-dir", str(tmp_path)]),
                               {"name": "cpu", "slug": "cpu-dry-run", "torch": "x"})
    check.pack_build()
    check.log.close()
    with tarfile.open(check.build_archive) as tar:
        assert tar.getnames() == [os.path.relpath(f, ROOT) for f in built]
        for f in built:
            with open(f, "rb") as a:
                assert tar.extractfile(os.path.relpath(f, ROOT)).read() == a.read()
