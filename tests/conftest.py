"""Shared test fixtures: seeding, the device fixture and the `cuda` marker."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import lowrank_ext  # noqa: F401  (registers the ops)

HAS_CUDA = torch.cuda.is_available() and lowrank_ext.build_info()["cuda"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU and the CUDA kernels (skipped otherwise)")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="no CUDA GPU or lowrank_ext built without CUDA kernels")
    for item in items:
        # the marker itself: "cuda" in item.keywords also matched a parameter id "cuda" (test_svd's
        # cpu_algorithms, CUDA's algorithms run on the CPU), skipping tests that need no GPU
        if item.get_closest_marker("cuda") is not None and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same seed, so failures reproduce."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(params=[pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request) -> str:
    """Runs a test on the CPU and, when a GPU and the CUDA kernels are there, on CUDA."""
    return request.param


@pytest.fixture(params=["avx2", "portable"])
def cpu_table_search(request, monkeypatch):
    """Runs a quantization test through both CPU table-lookup paths (csrc/quant/cpu_search.h,
    and the fused step's 4-bit dequantize): the hand-written AVX2 ones and the portable loops. Both must give
    the reference's bits. The variable only steers CPU kernels, so CUDA runs once."""
    if request.param == "portable" and "device" in request.fixturenames and request.getfixturevalue("device") != "cpu":
        pytest.skip("LOWRANK_CPU_TABLE_SEARCH only steers the CPU kernels")
    if request.param == "avx2" and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("this CPU has no AVX2: the avx2 case would run the portable path again")
    monkeypatch.setenv("LOWRANK_CPU_TABLE_SEARCH", request.param)
    return request.param


@pytest.fixture
def inductor_recording():
    """(backend, ops): a torch.compile backend that compiles with Inductor and records the ops of
    every graph it gets, to check that an op ran inside a compiled graph (Dynamo reset first)."""
    from torch._inductor.compile_fx import compile_fx
    torch._dynamo.reset()
    ops: set[str] = set()

    def backend(gm, example_inputs):
        ops.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return compile_fx(gm, example_inputs)
    return backend, ops
