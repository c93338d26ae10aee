"""Every op of the `lowrank` namespace must come with everything the design asks for:
a CPU kernel, a CUDA kernel when CUDA was built (unless listed in CPU_ONLY_OPS), a fake kernel, a reference, samples and
a benchmark.
Adding an op without them fails here."""
from __future__ import annotations

import pytest
import torch
from torch._library import simple_registry

import lowrank_ext
from lowrank_ext.bench import FAMILIES, get_family
from lowrank_ext.ops import CPU_ONLY_OPS
from lowrank_ext.reference import REFERENCES
from samples import SAMPLES

BENCHED_OPS = {op for name in FAMILIES for op in get_family(name).ops}
OPS = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("lowrank::"))


def test_namespace_has_ops():
    assert "lowrank::quantize_blockwise" in OPS


@pytest.mark.parametrize("op", OPS)
def test_op_is_complete(op):
    missing = []
    if not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"):
        missing.append("CPU kernel")
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
    if op in CPU_ONLY_OPS:
        assert not has_cuda, f"{op} has a CUDA kernel now: take it out of lowrank_ext.ops.CPU_ONLY_OPS and the README"
    elif lowrank_ext.build_info()["cuda"] and not has_cuda:
        missing.append("CUDA kernel")
    entry = simple_registry.singleton.find(op)
    if entry.fake_impl.kernel is None:
        missing.append("fake kernel (torch.library.register_fake in lowrank_ext/ops/)")
    if op not in REFERENCES:
        missing.append("reference (lowrank_ext/reference/)")
    if op not in SAMPLES:
        missing.append("samples (tests/samples.py)")
    if op not in BENCHED_OPS:
        missing.append("benchmark (a lowrank_ext.bench family listing it in Family.ops)")
    assert not missing, f"{op} lacks: {', '.join(missing)}"


def test_build_info():
    info = lowrank_ext.build_info()
    for key in ("version", "torch_version", "cuda", "cuda_archs", "openmp", "cxx_compiler"):
        assert key in info
    assert info["version"] == lowrank_ext.__version__
    assert info["openmp"], "built without OpenMP: CPU kernels would run on one thread"
