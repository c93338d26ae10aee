"""Build lowrank_ext: setup.py only gathers facts about torch and CUDA; CMake builds.

Why not torch.utils.cpp_extension or find_package(Torch): we link torch's libraries
directly (include and lib dirs from the installed torch), which works the same with a
CPU-only torch, with no nvcc, with CMake 4, and with torch 2.11 or 2.14, without the
CUDA-toolkit probing that TorchConfig.cmake does. Environment knobs:
  LOWRANK_EXT_CUDA=auto|0|1   compile the CUDA kernels (auto: when nvcc and a CUDA torch exist)
  TORCH_CUDA_ARCH_LIST        e.g. "8.0;9.0" (default), "9.0", "9.0a"
  MAX_JOBS                    parallel compile jobs (default: all cores)
  CXX, CUDAHOSTCXX            the C++ compiler (see choose_cxx: it must link libstdc++ dynamically)
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"
DEFAULT_ARCHS = "8.0;9.0"


def find_cuda_home():
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if cand and os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return os.path.realpath(cand)
    nvcc = shutil.which("nvcc")
    if nvcc:  # /usr/local/bin/nvcc may be a wrapper script: ask nvcc where it lives
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def wheel_cuda_include_dirs():
    """CUDA library headers (cublas_v2.h, cusparse.h, ...) shipped in torch's nvidia wheels."""
    dirs = []
    for sp in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        # CUDA 13 wheels: one nvidia/cu13/include; CUDA 12 wheels: nvidia/<library>/include
        dirs += sorted(glob.glob(os.path.join(sp, "nvidia", "cu[0-9]*", "include"))) or \
            sorted(glob.glob(os.path.join(sp, "nvidia", "*", "include")))
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def cmake_cuda_archs(arch_list):
    """TORCH_CUDA_ARCH_LIST ("8.0;9.0+PTX", "9.0a") -> CMAKE_CUDA_ARCHITECTURES ("80-real;90")."""
    entries = [a for a in arch_list.replace(" ", ";").split(";") if a]
    out = []
    for i, a in enumerate(entries):
        ptx = a.endswith("+PTX") or i == len(entries) - 1  # PTX for the newest arch: forward compat
        a = a.replace("+PTX", "")
        num = a.replace(".", "")
        out.append(num if ptx else num + "-real")
    return ";".join(out)


def nvcc_major(cuda_home):
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True)
    except OSError:
        return None
    m = re.search(r"release (\d+)\.", out.stdout)
    return int(m.group(1)) if m else None


def cuda_enabled(torch):
    """(build CUDA kernels?, CUDA_HOME). Needs nvcc and a CUDA torch of the same major
    version (a mismatch would link a second libcudart next to torch's)."""
    mode = os.environ.get("LOWRANK_EXT_CUDA", "auto").lower()
    if mode in ("0", "off", "false", "no"):
        return False, None
    cuda_home = find_cuda_home()
    reason = None
    if torch.version.cuda is None:
        reason = "torch is a CPU-only build"
    elif cuda_home is None:
        reason = "nvcc not found (set CUDA_HOME)"
    else:
        major = nvcc_major(cuda_home)
        if major != int(torch.version.cuda.split(".")[0]):
            reason = f"nvcc (CUDA {major}) and torch (CUDA {torch.version.cuda}) differ in major version"
    if reason and mode in ("1", "on", "true", "yes"):
        raise RuntimeError(f"LOWRANK_EXT_CUDA=1 but the CUDA kernels cannot be built: {reason}")
    if reason:
        print(f"lowrank_ext: building the CPU kernels only: {reason}", flush=True)
    return reason is None, cuda_home


def static_libstdcxx(cxx):
    """Why `cxx` would link parts of libstdc++ into the extension statically, else None.
    Such a compiler (an /opt/gcc build without a shared libstdc++, devtoolset-style GCCs
    whose libstdc++.so is a script adding libstdc++_nonshared.a) copies iostream's number
    formatting into the extension; loaded beside torch's libstdc++.so.6, the copy looks up
    locale facets by ids the process never registered, and the first TORCH_CHECK message
    that formats an integer segfaults (seen on a GPU machine's /opt/gcc g++ 13)."""
    def lookup(name):
        out = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
        return out if os.path.isabs(out) and os.path.exists(out) else None
    try:
        shared, static = lookup("libstdc++.so"), lookup("libstdc++.a")
        if shared is None:
            return f"it has no shared libstdc++ ({'only ' + static if static else 'none found'})"
        with open(shared, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if not head.startswith(b"\x7fELF") and re.search(rb"\.a\b|nonshared", head):
        return f"its {shared} adds a static archive"
    return None


def choose_cxx():
    """CXX (else c++), unless it links libstdc++ partly statically; then the first system
    compiler that does not. CMake would pick CXX itself; we pick first to check it."""
    wanted = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if wanted is None:
        raise RuntimeError("lowrank_ext needs a C++20 compiler (g++ >= 11 or clang++ >= 14)")
    why = static_libstdcxx(wanted)
    if why is None:
        return wanted
    for cand in ("/usr/bin/c++", "/usr/bin/g++", shutil.which("g++"), shutil.which("c++")):
        if cand and os.path.exists(cand) and static_libstdcxx(cand) is None:
            print(f"lowrank_ext: not building with {wanted}: {why}, and a static libstdc++ crashes beside "
                  f"torch's; using {cand}", flush=True)
            return cand
    raise RuntimeError(f"{wanted} would link libstdc++ statically ({why}); the extension would crash beside "
                       "torch's libstdc++.so. Set CXX to a compiler that links it dynamically.")


def cuda_host_cxx(cxx):
    """CUDAHOSTCXX when it passes the same check as CXX (the GPU image sets it to the same
    /opt/gcc g++), else the C++ compiler chosen above."""
    host = os.environ.get("CUDAHOSTCXX")
    if host and static_libstdcxx(host) is None:
        return host
    if host:
        print(f"lowrank_ext: CUDA host compiler {cxx}, not CUDAHOSTCXX={host}: {static_libstdcxx(host)}", flush=True)
    return cxx


def find_tool(name):
    here = os.path.join(os.path.dirname(sys.executable), name)  # the venv's own bin first
    return here if os.path.exists(here) else shutil.which(name)


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        try:
            import pybind11
            import torch
        except ImportError as e:  # e.g. `pip install .` with build isolation: a fresh env without them
            raise RuntimeError(
                f"lowrank_ext builds against the torch installed in this environment ({e}): install torch, "
                "pybind11, cmake and ninja first (pip install -r requirements-dev.txt), then run "
                "`pip install --no-build-isolation .` (or `make build`)") from e

        with_cuda, cuda_home = cuda_enabled(torch)
        build_dir = os.path.join(ROOT, "build", "cmake")
        os.makedirs(build_dir, exist_ok=True)
        torch_dir = os.path.dirname(torch.__file__)
        cxx = choose_cxx()
        cache = os.path.join(build_dir, "CMakeCache.txt")
        if os.path.exists(cache):
            configured = re.search(r"^CMAKE_CXX_COMPILER:\w+=(.*)$", open(cache).read(), re.M)
            if configured is None or configured.group(1) != cxx:
                os.remove(cache)  # CMake cannot switch compilers in a configured tree
        cmake = find_tool("cmake")
        if cmake is None:
            raise RuntimeError("lowrank_ext needs CMake >= 3.24 to build (pip install cmake)")
        args = [
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DTORCH_ROOT={torch_dir}",
            f"-DTORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-DTORCH_VERSION_STR={torch.__version__}",
            f"-DLOWRANK_VERSION={VERSION}",
            f"-DLOWRANK_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
            f"-DCMAKE_CXX_COMPILER={cxx}",
        ]
        ninja = find_tool("ninja")
        if ninja:  # else CMake's default generator (Makefiles)
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        ccache = find_tool("ccache")
        if ccache:
            args += [f"-DCMAKE_CXX_COMPILER_LAUNCHER={ccache}", f"-DCMAKE_CUDA_COMPILER_LAUNCHER={ccache}"]
        if with_cuda:
            archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
            args += [
                f"-DCMAKE_CUDA_COMPILER={os.path.join(cuda_home, 'bin', 'nvcc')}",
                f"-DCMAKE_CUDA_HOST_COMPILER={cuda_host_cxx(cxx)}",
                f"-DCUDAToolkit_ROOT={cuda_home}",
                f"-DCMAKE_CUDA_ARCHITECTURES={cmake_cuda_archs(archs)}",
                f"-DLOWRANK_CUDA_ARCH_LIST={archs.replace(';', ',')}",  # a ';' would split the define
                f"-DLOWRANK_CUDA_EXTRA_INCLUDES={';'.join(wheel_cuda_include_dirs())}",
            ]
        print(f"lowrank_ext: CUDA kernels {'ON' if with_cuda else 'OFF'}; cmake {' '.join(args)}", flush=True)
        # CMake also reads CXX/CUDAHOSTCXX from the environment while it probes the CUDA
        # toolchain: a rejected compiler left there adds its lib dir (with libstdc++.a) to the link
        env = dict(os.environ, CXX=cxx, CUDAHOSTCXX=cuda_host_cxx(cxx) if with_cuda else cxx)
        subprocess.check_call([cmake, "-S", ROOT, "-B", build_dir] + args, env=env)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 2)
        subprocess.check_call([cmake, "--build", build_dir, "--parallel", jobs], env=env)
        # this interpreter's module (another Python's may be left in the build tree)
        built = glob.glob(os.path.join(build_dir, "_C" + sysconfig.get_config_var("EXT_SUFFIX")))
        if len(built) != 1:
            raise RuntimeError(f"expected one _C module in {build_dir}, found {built}")
        dest = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        tmp = dest + ".tmp"
        shutil.copyfile(built[0], tmp)
        os.replace(tmp, dest)  # a new file: processes that loaded the old one keep it intact


setup(
    name="lowrank_ext",
    version=VERSION,
    description="Fused CUDA/C++ kernels for low-rank and memory-efficient training",
    packages=["lowrank_ext", "lowrank_ext.ops", "lowrank_ext.optim", "lowrank_ext.reference", "lowrank_ext.bench",
              "lowrank_ext.nn", "lowrank_ext.integrations"],
    ext_modules=[Extension("lowrank_ext._C", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.11",  # the pinned test and bench dependencies (numpy 2.4, ...) need 3.11
    install_requires=["torch>=2.11", "numpy"],  # the oldest torch run (README)
    extras_require={
        "test": ["pytest", "hypothesis"],
        "bench": ["tqdm", "matplotlib", "peft", "bitsandbytes", "torchao", "galore-torch"],
    },
    zip_safe=False,
)
