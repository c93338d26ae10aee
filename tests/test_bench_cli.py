"""The benchmark CLI's allocator environment (lowrank_ext/bench/__main__.py): every run restarts
under it, so the committed tables are comparable; these check what it sets, and that a caller's
own settings survive."""
from __future__ import annotations

from lowrank_ext.bench.__main__ import BENCH_MALLOC_TUNABLES, bench_environment, provider_names


def test_environment_adds_the_tunables_and_huge_pages():
    env = bench_environment({"PATH": "/bin"})
    assert env["GLIBC_TUNABLES"] == BENCH_MALLOC_TUNABLES
    assert env["THP_MEM_ALLOC_ENABLE"] == "1"
    assert env["PATH"] == "/bin"
    assert "glibc.malloc.mmap_max=0" in BENCH_MALLOC_TUNABLES  # freed blocks stay in the heap


def test_environment_keeps_other_tunables_and_is_idempotent():
    env = bench_environment({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F"})
    assert env["GLIBC_TUNABLES"] == "glibc.cpu.hwcaps=-AVX512F:" + BENCH_MALLOC_TUNABLES
    assert bench_environment(env) == env  # already set: no second restart



def test_provider_names_keep_the_commas_inside_names():
    assert provider_names("torch AdamW,lowrank_ext GaLoreAdamW 8-bit, INT4 projection,galore-torch") == [
        "torch AdamW", "lowrank_ext GaLoreAdamW 8-bit, INT4 projection", "galore-torch"]
    assert provider_names("a,,b") == ["a", "b"]


def test_profile_lists_the_ops_that_take_a_calls_time():
    # --profile: torch.profiler over our provider's calls, per call, the heaviest op first
    import torch

    import lowrank_ext  # noqa: F401  (registers torch.ops.lowrank)
    from lowrank_ext.bench.__main__ import parse_args
    from lowrank_ext.bench.harness import profile_calls

    x = torch.randn(1 << 20)
    code = torch.linspace(-1, 1, 256)

    def call():
        q, absmax = torch.ops.lowrank.quantize_blockwise(x, code, 256, 8)
        return torch.ops.lowrank.dequantize_blockwise(q, absmax, code, 256, 8, x.shape, x.dtype)
    prof = profile_calls(call, torch.device("cpu"), calls=3)
    assert prof[0]["name"] == "(wall)" and prof[0]["us"] > 0 and prof[0]["measures"] == "self CPU time"
    by_name = {e["name"]: e for e in prof[1:]}
    assert by_name["lowrank::quantize_blockwise"]["calls"] == 1.0
    assert by_name["lowrank::dequantize_blockwise"]["calls"] == 1.0
    assert [e["us"] for e in prof[1:]] == sorted((e["us"] for e in prof[1:]), reverse=True)
    assert parse_args(["quant", "--profile"]).profile and not parse_args(["quant"]).profile
