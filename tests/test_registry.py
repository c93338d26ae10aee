"""Every op of the `lowrank` namespace must come with everything the design asks for:
a CPU kernel, a CUDA kernel when CUDA was built (unless listed in CPU_ONLY_OPS), a fake kernel, a reference, samples and
a benchmark.
Adding an op without them fails here."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch._library import simple_registry
from torch.utils._pytree import tree_leaves, tree_map

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


def _tensors_of(x):
    return [t for t in tree_leaves(x) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("op", OPS)
def test_ops_compute_in_their_inputs_dtypes_under_autocast(op):
    # the kernels compose ATen GEMMs that autocast, left on inside them, ran in bf16: rsvd's U
    # came back bf16 for an fp32 A. Every op has an Autocast kernel that switches it off inside
    # (csrc/registry.cpp: run_without_autocast); outputs and written arguments must equal the
    # call's without autocast, bit for bit
    for key in ("AutocastCPU", "AutocastCUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, key), f"{op}: no {key} kernel"
    fn = getattr(torch.ops.lowrank, op.split("::")[1])
    sample = next(s for s in SAMPLES[op]("cpu")
                  if all(t.dtype != torch.float16 and t.dtype != torch.bfloat16 for t in _tensors_of(s.args)))
    def clone(args):
        return tree_map(lambda a: a.clone() if isinstance(a, torch.Tensor) else a, list(args))
    args_plain, args_autocast = clone(sample.args), clone(sample.args)
    torch.manual_seed(0)
    with torch.no_grad():
        want = fn(*args_plain)
    torch.manual_seed(0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = fn(*args_autocast)
    for g, w in zip(_tensors_of([got, args_autocast]), _tensors_of([want, args_plain])):
        assert g.dtype == w.dtype, f"{op}: {g.dtype} under autocast, {w.dtype} without"
        assert torch.equal(g, w) or (g.is_floating_point() and torch.equal(g.isnan(), w.isnan())
                                     and torch.equal(g.nan_to_num(), w.nan_to_num())), op


def test_build_info():
    info = lowrank_ext.build_info()
    for key in ("version", "torch_version", "cuda", "cuda_archs", "openmp", "cxx_compiler"):
        assert key in info
    assert info["version"] == lowrank_ext.__version__
    assert info["openmp"], "built without OpenMP: CPU kernels would run on one thread"


WRITING_OPS = sorted(op for op in OPS
                     if any(a.alias_info is not None and a.alias_info.is_write
                            for a in getattr(torch.ops.lowrank, op.split("::")[1]).default._schema.arguments))


def test_the_writing_ops_are_known():
    assert WRITING_OPS == ["lowrank::adamw_step_fp32_", "lowrank::adamw_step_quantized_", "lowrank::adamw_step_rank1_",
                           "lowrank::galore_apply_", "lowrank::lora_expand_", "lowrank::lora_merge_",
                           "lowrank::sparse_scatter_add_"]


@pytest.mark.parametrize("op", WRITING_OPS)
def test_writing_ops_bump_the_version_counters_they_write(op):
    # as torch's own in-place ops do: autograd then catches a saved tensor written in between
    schema = getattr(torch.ops.lowrank, op.split("::")[1]).default._schema
    written = [i for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write]
    for sample in SAMPLES[op]("cpu"):
        tensors = [t for i in written if i < len(sample.args) and sample.args[i] is not None
                   for t in (sample.args[i] if isinstance(sample.args[i], (list, tuple)) else [sample.args[i]])]
        before = [t._version for t in tensors]
        getattr(torch.ops.lowrank, op.split("::")[1])(*sample.args)
        assert all(t._version > v for t, v in zip(tensors, before)), f"{op} {sample.name}"


def test_backward_raises_when_a_saved_tensor_was_written_by_an_op():
    from lowrank_ext.ops.sparse import sparse_scatter_add_
    x = torch.nn.Parameter(torch.randn(4, 3))
    y = x * x  # saves x
    with torch.no_grad():
        sparse_scatter_add_(x, torch.tensor([1]), torch.ones(1), 1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_a_refused_call_leaves_the_version_counters_alone():
    # as torch's index_add_: an op that raises writes nothing, so a saved tensor stays usable
    from lowrank_ext.ops.lora import lora_merge_
    from lowrank_ext.ops.sparse import sparse_scatter_add_
    x = torch.nn.Parameter(torch.randn(4, 3))
    y = x * x  # saves x
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="out of range"):
            sparse_scatter_add_(x, torch.tensor([1000]), torch.ones(1), 1.0)
        with pytest.raises(RuntimeError, match="lora_b must have shape"):
            lora_merge_(x, torch.randn(2, 3), torch.randn(5, 2), scale=1.0)
    assert x._version == 0
    y.sum().backward()
    torch.testing.assert_close(x.grad, 2 * x.detach())


def test_views_of_leaves_that_require_grad_are_not_written_outside_no_grad():
    # W[:] or W.view(...) writes W itself: refused as torch refuses W[:].add_(1)
    from lowrank_ext.ops.lora import lora_merge_
    from lowrank_ext.ops.sparse import sparse_scatter_add_
    w = torch.nn.Parameter(torch.randn(5, 6))
    w0 = w.detach().clone()
    with pytest.raises(RuntimeError, match="view of a leaf tensor that requires grad"):
        lora_merge_(w[:], torch.randn(2, 6), torch.randn(5, 2), scale=1.0)
    with pytest.raises(RuntimeError, match="view of a leaf tensor that requires grad"):
        sparse_scatter_add_(w.view(30), torch.tensor([3]), torch.ones(1), 1.0)
    assert torch.equal(w.detach(), w0)
    with torch.no_grad():
        sparse_scatter_add_(w.view(30), torch.tensor([3]), torch.ones(1), 1.0)
    assert w.detach().view(-1)[3] == w0.view(-1)[3] + 1


@pytest.mark.parametrize("op", ["gaussian_sketch", "jacobi_svd", "rsvd", "svd_update", "galore_project", "sddmm",
                                "lora_grouped_outer"])
def test_non_differentiable_ops_return_no_graph(op):
    # their Autograd key falls through to the kernels: nothing inside may be recorded, even for
    # inputs that require grad
    sample = next(iter(SAMPLES[f"lowrank::{op}"]("cpu")))
    args = [a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in sample.args]
    out = getattr(torch.ops.lowrank, op)(*args)
    for t in (out if isinstance(out, (tuple, list)) else [out]):
        assert not t.requires_grad and t.grad_fn is None, op


def test_import_does_not_load_the_compiler():
    # `import lowrank_ext` must stay about as light as `import torch`: torch._dynamo (~2.5 s of
    # import here, pulled in by a module-level torch.compiler.disable once) made every CLI and
    # gpu-check step that imports the package slower
    code = ("import sys, lowrank_ext; "
            "print(sorted(m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
